"""Where a model is: a local folder, a Hugging Face Hub id (`org/name`, optionally `org/name@revision`)
or an object-storage URI; pinned once on the driver, turned into a local folder on each node.

`resolve_model(value, setting)` runs on the driver before any Ray work. It decides the kind, checks
the model is reachable (a clear error naming the setting otherwise) and pins it: a Hub id to the
commit its revision points to now (huggingface_hub's `resolve_revision`), so every node loads the
same weights even if the repo moves during the run; a URI to a version key of its files (names,
sizes, modification times: pyarrow reports no ETag). The `ModelSource` it returns travels to the
workers; `record()` is what a manifest or report writes down.

`ModelSource.local_dir()` runs where the model is loaded and fetches it at most once per node:
- a Hub id: `snapshot_download` of the pinned commit into the node's Hugging Face cache (HF_HOME /
  HF_HUB_CACHE). Concurrent workers on a node do not download a file twice: huggingface_hub takes a
  file lock per blob (`<cache>/.locks/…`) and the second process finds the blob in place. Under
  HF_HUB_OFFLINE=1 nothing is downloaded: the commit must be in the node's cache.
- a URI: a copy into `<cache>/models/<hash of URI and version>/` (cache = $POCL_RAY_CACHE, else
  $XDG_CACHE_HOME/pocl-ray, else ~/.cache/pocl-ray), made under a file lock by one process while the
  others wait, then reused without a request to the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pyarrow.fs as pafs

from pocl_ray import storage
from pocl_ray.config import ConfigError, is_uri

# org/name: what from_pretrained and the Hub take (huggingface_hub.utils.validate_repo_id has the full rule).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMPLETE = "pocl-ray-source.json"
# What a model folder holds besides its config and tokenizer (snapshot_download's ignore_patterns).
WEIGHT_FILES = [
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.onnx",
]  # written last into a cached copy: its presence means complete


@dataclass(frozen=True)
class ModelSource:
    """kind: local | hub | uri; location: the folder, the Hub id or the URI; revision: the Hub
    commit, the URI's version key (None for a local folder); setting: the config field, for errors."""

    kind: Literal["local", "hub", "uri"]
    location: str
    revision: str | None = None
    setting: str = "model"

    def record(self) -> dict:
        """What a manifest or report records about the model (no credential: a URI carries none)."""
        return {k: v for k, v in asdict(self).items() if k != "setting"}

    def local_dir(self, weights: bool = True) -> Path:
        """A local folder holding the model, fetched into this node's cache on first use. weights=False:
        a Hub model's config and tokenizer files only (the driver's checks, without pulling the weights
        onto a CPU head); a URI model is always copied whole."""
        if self.kind == "local":
            return Path(self.location)
        if self.kind == "hub":
            return _hub_snapshot(self.location, self.revision, self.setting, None if weights else WEIGHT_FILES)
        return _cached_copy(self)


def resolve_model(value: str, setting: str, revision: str | None = None) -> ModelSource:
    """`value` (a config setting's model) pinned, on the driver; `revision` applies to a Hub id
    without an `@revision` of its own.

    A local folder wins over a Hub id of the same spelling (as in from_pretrained). Errors name the
    setting and what to fix: FileNotFoundError for a missing folder or object, ConfigError (or
    storage.StorageError) for a Hub id that cannot be resolved or a store that cannot be read.
    """
    if is_uri(value):
        storage.check_readable(value, setting)
        return ModelSource("uri", value, _uri_version(value, setting), setting)
    if Path(value).is_dir():
        if revision is not None:
            raise ConfigError(f"{setting}: {value} is a local folder; a revision applies to a Hub id only")
        return ModelSource("local", str(Path(value).resolve()), None, setting)
    name, _, inline = value.partition("@")
    if not HUB_ID.match(name):
        raise FileNotFoundError(f"{setting}: model folder not found: {value} (nor is it a Hub id org/name)")
    if inline and revision is not None and inline != revision:
        raise ConfigError(f"{setting}: {value} names revision {inline!r} and models.revision says {revision!r}")
    commit = _hub_commit(name, inline or revision, setting)
    return ModelSource("hub", name, commit, setting)


def _offline_hint(name: str, revision: str | None) -> str:
    from huggingface_hub import constants

    mode = "HF_HUB_OFFLINE=1 is set" if constants.is_offline_mode() else "the Hub could not be reached"
    return (
        f"{name} (revision {revision or 'main'}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} and {mode}: "
        f"download it into every node's cache first (`hf download {name}"
        f"{f' --revision {revision}' if revision else ''}`, HF_HOME chooses the cache), or point the setting "
        "at a local folder"
    )


def _hub_commit(name: str, revision: str | None, setting: str) -> str:
    """The commit `revision` of Hub repo `name` points to (offline: the cache's refs), checked to be
    in this machine's cache when offline."""
    from huggingface_hub import constants, resolve_revision, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    try:
        commit = resolve_revision(name, revision=revision).resolved
        if constants.is_offline_mode():
            snapshot_download(name, revision=commit, local_files_only=True)
    except (RevisionResolutionError, LocalEntryNotFoundError):
        raise ConfigError(f"{setting}: {_offline_hint(name, revision)}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{setting}: the Hub repo {name} has no revision {revision!r}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ConfigError(
            f"{setting}: no model {name} on the Hub, or it is private or gated and HF_TOKEN does not grant access"
        ) from None
    return commit


def _hub_snapshot(name: str, commit: str | None, setting: str, ignore: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import disable_progress_bars

    # A bar per file from every worker would flood a job's log (as models._quiet_progress_bars says).
    disable_progress_bars()
    try:
        return Path(snapshot_download(name, revision=commit, ignore_patterns=ignore))
    except LocalEntryNotFoundError:
        raise ConfigError(f"{setting} on node {socket.gethostname()}: {_offline_hint(name, commit)}") from None


def _uri_version(uri: str, setting: str) -> str:
    """A key that changes when any file under uri is added, removed, resized or rewritten."""
    fs, inner = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    files = sorted(
        (i.path[len(inner.rstrip("/")) + 1 :], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File
    )
    if not files:
        raise FileNotFoundError(f"{setting}: no files under {uri}")
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """This node's cache of models copied from object storage."""
    if os.environ.get("POCL_RAY_CACHE"):
        return Path(os.environ["POCL_RAY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pocl-ray"


def _cached_copy(source: ModelSource) -> Path:
    from filelock import FileLock

    key = hashlib.sha256(f"{source.location}\n{source.revision}".encode()).hexdigest()[:24]
    target = cache_root() / "models" / key
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE).is_file():  # another process copied it while this one waited
            return target
        version = _uri_version(source.location, source.setting)
        if source.revision is not None and version != source.revision:
            raise ConfigError(
                f"{source.setting}: the files under {source.location} changed after the run resolved them "
                f"(version {source.revision}, now {version}); start the run again to use the new files"
            )
        partial = target.with_name(f"{key}.partial-{uuid.uuid4().hex[:8]}")
        storage.copy_folder(source.location, partial, source.setting)
        (partial / _COMPLETE).write_text(json.dumps(source.record()))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target
