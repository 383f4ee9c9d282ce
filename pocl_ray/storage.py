"""A run's files wherever they live: a local folder or object storage (s3://, gs://, abfs://, file://).

One thin layer over pyarrow.fs, the filesystems Ray Data and Ray Train use themselves
(`pyarrow.fs.FileSystem.from_uri`), so a path that works here works for their readers, writers and
`storage_path` too. Credentials and endpoints come from the standard places and nowhere else: the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE, AWS_ENDPOINT_URL
for an S3-compatible store, AWS_DEFAULT_REGION; GOOGLE_APPLICATION_CREDENTIALS; AZURE_CLIENT_ID /
AZURE_TENANT_ID / AZURE_CLIENT_SECRET) or the instance's role. pyarrow 26 reads AWS_ENDPOINT_URL in
`from_uri`, which is why every filesystem here is made by `from_uri` and never by a constructor (the
S3FileSystem constructor ignores it). A URI that carries a credential is refused (config.check_uri):
it would be copied into manifests, logs and Ray's dashboard.

Paths keep the form the user wrote (a URI stays a URI, a local path stays local); `resolve` gives the
(filesystem, path inside it) pair that Ray Data (`filesystem=`) and pyarrow.dataset take.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pocl_ray.config import ConfigError, check_uri, is_uri

# What a user sets to reach each store: named in every error about it.
_AWS = ("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the instance role)", "AWS_ENDPOINT_URL")
_GCP = ("GOOGLE_APPLICATION_CREDENTIALS (or the instance service account)", "the GCS endpoint")
_AZURE = ("AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET (or a managed identity)", "the account's endpoint")
_SETTINGS = {"s3": _AWS, "gs": _GCP, "gcs": _GCP, "abfs": _AZURE, "abfss": _AZURE}
# Fragments of pyarrow's messages (AWS SDK, google-cloud-cpp, Azure SDK) by cause.
_DENIED = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "EXPIRED_TOKEN",
    "response code: 403",
)
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not resolve",
    "Couldn't resolve",
    "UNAVAILABLE",
    "Connection refused",
    "timed out",
    "Timeout",
)
_NO_BUCKET = ("NO_SUCH_BUCKET", "ContainerNotFound", "bucket does not exist")


class StorageError(ConfigError):
    """A setting names a storage location this process cannot use: the store is unreachable, the
    credentials are missing or refused, or the bucket does not exist. The message names the setting,
    the path and the environment variables that decide it."""


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path (made absolute): the pair Ray Data's
    readers and writers (`filesystem=`) and pyarrow.dataset take."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).resolve())
    check_uri(str(path))
    return pafs.FileSystem.from_uri(str(path))


def join(base: str | Path, *parts: str) -> str:
    """base/part/…, keeping a URI a URI (pathlib would turn s3://b into s3:/b)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _describe(err: OSError, path: str, setting: str) -> Exception:
    """The error a user can act on for pyarrow's `err` on `path`."""
    scheme = urlsplit(path).scheme.lower() if is_uri(path) else "file"
    credentials, endpoint = _SETTINGS.get(scheme, ("its credentials", "its endpoint"))
    text = str(err)
    if isinstance(err, PermissionError):
        return StorageError(f"{setting}: {path}: permission denied ({err})")
    if any(s in text for s in _DENIED):
        why = f"the store refused the credentials: check {credentials}"
    elif any(s in text for s in _UNREACHABLE):
        where = os.environ.get("AWS_ENDPOINT_URL", "AWS's own endpoint") if scheme == "s3" else endpoint
        why = f"the store cannot be reached at {where}: check {endpoint} and the network"
    elif any(s in text for s in _NO_BUCKET):
        why = "the bucket does not exist (or these credentials cannot see it)"
    else:
        return err
    return StorageError(f"{setting}: {path}: {why} ({text.splitlines()[0][:300]})")


def _info(path: str | Path, setting: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    try:
        return fs.get_file_info(inner)
    except OSError as err:
        raise _describe(err, str(path), setting) from None


def exists(path: str | Path, setting: str = "path") -> bool:
    return _info(path, setting).type != pafs.FileType.NotFound


def is_file(path: str | Path, setting: str = "path") -> bool:
    return _info(path, setting).type == pafs.FileType.File


def is_dir(path: str | Path, setting: str = "path") -> bool:
    """A local folder, or a prefix with objects under it (object stores have no empty folders)."""
    return _info(path, setting).type == pafs.FileType.Directory


def read_bytes(path: str | Path, setting: str = "path") -> bytes:
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{setting}: no such file: {path}") from None
    except OSError as err:
        if _info(path, setting).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{setting}: no such file: {path}") from None
        raise _describe(err, str(path), setting) from None


def write_bytes(path: str | Path, data: bytes, setting: str = "path") -> None:
    """The whole file at once (an object store replaces the object; a local folder is created)."""
    fs, inner = resolve(path)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(str(Path(inner).parent), recursive=True)
        with fs.open_output_stream(inner) as stream:
            stream.write(data)
    except OSError as err:
        raise _describe(err, str(path), setting) from None


def as_path(path: str | Path) -> str | Path:
    """A local path as a Path (what callers open directly), a URI as its string."""
    return str(path) if is_uri(path) else Path(path)


def remove_tree(path: str | Path, setting: str = "path") -> None:
    """Delete the file or the folder (a prefix: every object under it) at path; nothing there is fine."""
    fs, inner = resolve(path)
    try:
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(inner)
        elif kind == pafs.FileType.File:
            fs.delete_file(inner)
    except OSError as err:
        raise _describe(err, str(path), setting) from None


def upload_file(local: str | Path, path: str | Path, setting: str = "path") -> None:
    """A local file to path (a URI or a local path), streamed: for files too large to hold in memory."""
    src_fs, src = resolve(local)
    dst_fs, dst = resolve(path)
    try:
        if isinstance(dst_fs, pafs.LocalFileSystem):
            dst_fs.create_dir(str(Path(dst).parent), recursive=True)
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except OSError as err:
        raise _describe(err, str(path), setting) from None


def read_text(path: str | Path, setting: str = "path") -> str:
    return read_bytes(path, setting).decode()


def write_text(path: str | Path, text: str, setting: str = "path") -> None:
    write_bytes(path, text.encode(), setting)


def read_json(path: str | Path, setting: str = "path") -> Any:
    return json.loads(read_text(path, setting))


def write_json(path: str | Path, value: Any, setting: str = "path") -> None:
    write_text(path, json.dumps(value, indent=1), setting)


def list_files(path: str | Path, suffix: str = "", setting: str = "path") -> list[str]:
    """Every file under path (recursive, sorted), in path's own form (URIs stay URIs); [] when
    nothing is there."""
    fs, inner = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    except OSError as err:
        raise _describe(err, str(path), setting) from None
    base = str(path).rstrip("/") if is_uri(path) else inner
    names = sorted(i.path[len(inner.rstrip("/")) + 1 :] for i in infos if i.type == pafs.FileType.File)
    return [join(base, n) for n in names if n.endswith(suffix)]


def list_dirs(path: str | Path, setting: str = "path") -> list[str]:
    """The sub-folders directly under path (for a URI: the prefixes one level down), sorted, in path's
    own form; [] when nothing is there."""
    fs, inner = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    except OSError as err:
        raise _describe(err, str(path), setting) from None
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return [join(path, n) for n in names]


def copy_folder(source: str | Path, destination: str | Path, setting: str = "path") -> None:
    """Every file under source to the same relative path under destination, either side local or
    a URI (pyarrow.fs.copy_files: parallel, multipart uploads)."""
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    if src_fs.get_file_info(src).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{setting}: no such folder: {source}")
    try:
        if isinstance(dst_fs, pafs.LocalFileSystem):
            dst_fs.create_dir(dst, recursive=True)
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except OSError as err:
        raise _describe(err, str(destination if is_uri(destination) else source), setting) from None


def download(path: str | Path, local_dir: str | Path, setting: str = "path") -> Path:
    """The file or the folder at path copied into local_dir under its own name; returns the local copy."""
    target = Path(local_dir) / str(path).rstrip("/").rsplit("/", 1)[-1]
    if is_dir(path, setting):
        copy_folder(path, target, setting)
    else:
        upload_file(path, target, setting)
    return target


def check_readable(path: str | Path, setting: str) -> None:
    """Before any Ray work: path exists and this process may read it, or an error naming `setting`,
    the path and what to fix (StorageError; FileNotFoundError when the store answers "no such object")."""
    if not exists(path, setting):
        raise FileNotFoundError(f"{setting}: not found: {path}")
    if is_dir(path, setting):
        list_files(path, setting=setting)  # listing is what a reader does first; a stat alone may pass
    else:
        fs, inner = resolve(path)
        try:
            with fs.open_input_file(inner) as f:
                f.read(1)
        except OSError as err:
            raise _describe(err, str(path), setting) from None


def check_writable(path: str | Path, setting: str) -> None:
    """Before any Ray work: this process can create files under path (it writes and deletes one
    small probe object), or an error naming `setting`, the path and what to fix."""
    fs, inner = resolve(join(path, ".pocl-ray-write-probe"))
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(str(Path(inner).parent), recursive=True)
        with fs.open_output_stream(inner) as stream:
            stream.write(b"")
        fs.delete_file(inner)
    except OSError as err:
        raise _describe(err, str(path), setting) from None
