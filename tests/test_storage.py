"""storage: the same calls on a local folder and on an S3 bucket (moto's server on the loopback),
and the errors a user gets for a missing object, an unknown bucket, refused credentials and an
unreachable endpoint: each names the setting and the path."""

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import FAKE_AWS_KEY_ID, FAKE_AWS_SECRET, free_port

from pocl_ray import storage
from pocl_ray.config import check_uri
from pocl_ray.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder to work under: a local one, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    return storage.join(request.getfixturevalue("s3").bucket(), "run")


def test_small_files_round_trip(root):
    manifest = storage.join(root, "scores", "manifest.json")
    assert not storage.exists(manifest)
    storage.write_json(manifest, {"rows": 3, "path": "rows"})
    storage.write_text(storage.join(root, "report", "report.md"), "# report\n")
    assert storage.read_json(manifest) == {"rows": 3, "path": "rows"}
    assert storage.is_file(manifest) and storage.is_dir(storage.join(root, "scores"))
    assert storage.read_text(storage.join(root, "report", "report.md")) == "# report\n"
    assert storage.list_files(root) == [storage.join(root, "report", "report.md"), manifest]
    assert storage.list_files(root, suffix=".md") == [storage.join(root, "report", "report.md")]
    assert storage.list_files(storage.join(root, "nothing-here")) == []


def test_folder_copies_up_and_down(root, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 100)
    remote = storage.join(root, "model")
    storage.copy_folder(src, remote)
    assert storage.list_files(remote) == [
        storage.join(remote, "config.json"),
        storage.join(remote, "sub", "weights.bin"),
    ]
    back = tmp_path / "back"
    storage.copy_folder(remote, back)
    assert (back / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    assert (back / "config.json").read_text() == '{"a": 1}'


def test_sub_folders_uploads_and_a_removed_tree(root, tmp_path):
    """What the run's writers use besides the small files: listing the runs/ and eval/ folders, a large
    local file streamed up (rejected.jsonl), a step's folder cleared when its config changed."""
    for name in ("b", "a"):
        storage.write_text(storage.join(root, "runs", name, "eval", "results.json"), "{}")
    storage.write_text(storage.join(root, "runs", "top.txt"), "x")
    assert storage.list_dirs(storage.join(root, "runs")) == [storage.join(root, "runs", n) for n in ("a", "b")]
    assert storage.list_dirs(storage.join(root, "nothing-here")) == []
    local = tmp_path / "rejected.jsonl"
    local.write_bytes(b'{"row": 1}\n' * 50_000)
    storage.upload_file(local, storage.join(root, "scores", "rejected.jsonl"))
    assert storage.read_bytes(storage.join(root, "scores", "rejected.jsonl")) == local.read_bytes()
    storage.remove_tree(storage.join(root, "runs", "a"))
    storage.remove_tree(storage.join(root, "runs", "top.txt"))
    storage.remove_tree(storage.join(root, "runs", "never-there"))
    assert storage.list_files(storage.join(root, "runs")) == [storage.join(root, "runs", "b", "eval", "results.json")]
    assert storage.as_path(storage.join(root, "x")) == (root + "/x" if "://" in root else tmp_path / "run" / "x")


def test_resolve_hands_pyarrow_dataset_the_filesystem(root):
    table = pa.table({"rank": list(range(10)), "x": [f"r{i}" for i in range(10)]})
    fs, inner = storage.resolve(storage.join(root, "rows"))
    pads.write_dataset(table, inner, filesystem=fs, format="parquet")
    fs, inner = storage.resolve(storage.join(root, "rows"))
    assert pads.dataset(inner, filesystem=fs, format="parquet").to_table().sort_by("rank").equals(table)


def test_the_endpoint_comes_from_aws_endpoint_url(s3):
    # Nothing of the project's: pyarrow's from_uri read AWS_ENDPOINT_URL, so the object is in moto.
    uri = storage.join(s3.bucket(), "probe.txt")
    before = len(s3.requests)
    storage.write_text(uri, "x")
    assert any(uri.removeprefix("s3:/") in path for _, path, _ in s3.requests[before:])


def test_check_readable_and_writable_pass(root):
    storage.write_text(storage.join(root, "data", "train.jsonl"), "{}\n")
    storage.check_readable(storage.join(root, "data", "train.jsonl"), "data.train")
    storage.check_readable(storage.join(root, "data"), "data.train")
    storage.check_writable(storage.join(root, "out"), "output.dir")
    assert storage.list_files(storage.join(root, "out")) == []  # the probe is gone


def test_missing_object_names_setting_and_path(s3):
    uri = storage.join(s3.bucket(), "data", "train.jsonl")
    with pytest.raises(FileNotFoundError, match=r"data\.train: not found: s3://pocl-\w+/data/train\.jsonl"):
        storage.check_readable(uri, "data.train")
    with pytest.raises(FileNotFoundError, match="data.train: no such file"):
        storage.read_text(uri, "data.train")


def test_unknown_bucket_names_setting_and_path(s3):
    uri = "s3://pocl-no-such-bucket/run"
    with pytest.raises(StorageError, match=r"output\.dir: s3://pocl-no-such-bucket/run: the bucket does not exist"):
        storage.check_writable(uri, "output.dir")


def test_refused_credentials_name_the_variables(s3):
    from moto.core.authorization import enable_iam_authentication

    uri = storage.join(s3.bucket(), "data")
    storage.write_text(storage.join(uri, "a.jsonl"), "{}\n")
    # moto now checks every request against its IAM users, of which the fake key is none: what a
    # real store answers to a wrong or missing key.
    with enable_iam_authentication():
        with pytest.raises(StorageError, match=r"data\.train: s3://.*refused the credentials: check AWS_ACCESS_KEY_ID"):
            storage.check_readable(uri, "data.train")


def test_unreachable_endpoint_names_it(s3, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StorageError, match=rf"data\.dev: s3://b/dev\.jsonl: the store cannot be reached at {endpoint}"):
        storage.check_readable("s3://b/dev.jsonl", "data.dev")


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        (f"s3://{FAKE_AWS_KEY_ID}:{FAKE_AWS_SECRET}@bucket/x", "carries a credential"),
        (f"s3://bucket/x?access_key={FAKE_AWS_KEY_ID}", "carries a credential"),
        ("abfs://key:secret@account.dfs.core.windows.net/x", "carries a credential"),
        ("hf://datasets/x", "unsupported URI scheme 'hf'"),
        ("s3:///x", "names no bucket"),
    ],
)
def test_check_uri_refuses(uri, error):
    with pytest.raises(ValueError, match=error) as info:
        check_uri(uri)
    assert FAKE_AWS_SECRET not in str(info.value) and FAKE_AWS_KEY_ID not in str(info.value)


def test_check_uri_accepts():
    for uri in ("s3://b/x", "gs://b/x", "abfs://container@account.dfs.core.windows.net/x", "file:///tmp/x"):
        assert check_uri(uri) == uri
    assert storage.join("s3://b/", "a/", "b") == "s3://b/a/b" and not storage.is_uri("C:/x")
