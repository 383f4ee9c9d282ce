"""model_source: models by local folder, Hub id and object-storage URI, pinned on the driver and
fetched once per node.

Hub ids run huggingface_hub's real resolution and download code against a cache laid out as the Hub
writes it (models--org--name/blobs, snapshots/<commit>, refs/<revision>) under a temporary HF_HOME,
with HF_HUB_OFFLINE=1: no network, the cache is the only source. URIs run against moto's S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import put_in_hub_cache

from pocl_ray import models, storage
from pocl_ray.config import ConfigError
from pocl_ray.model_source import ModelSource, resolve_model

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_assets):
    """HF_HOME whose hub cache holds org/tiny at two commits: main = the 4-layer teacher, tag v1 =
    the 2-layer student (each with the tokenizer)."""
    home = tmp_path_factory.mktemp("hf_home")
    put_in_hub_cache(home / "hub", "org/tiny", COMMIT_MAIN, tiny_assets.teacher_dir, refs=("main",))
    put_in_hub_cache(home / "hub", "org/tiny", COMMIT_V1, tiny_assets.cut_student_dir, refs=("v1",))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_assets.cut_student_dir / name).is_file()
    return home


@pytest.fixture
def offline_hub(hf_home, monkeypatch):
    """This process as under HF_HOME=hf_home HF_HUB_OFFLINE=1 (huggingface_hub reads both once, at
    import: its constants are set as the environment would have set them)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def _layers(source) -> int:
    return models.load_model(source).config.num_hidden_layers


def test_a_hub_id_resolves_to_the_commit_its_revision_names(offline_hub):
    main = resolve_model("org/tiny", "models.teacher")
    assert main == ModelSource("hub", "org/tiny", COMMIT_MAIN, "models.teacher")
    assert main.record() == {"kind": "hub", "location": "org/tiny", "revision": COMMIT_MAIN}
    assert _layers(main) == 4
    assert main.local_dir() == offline_hub / "hub" / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    tagged = resolve_model("org/tiny", "models.teacher", revision="v1")
    assert tagged.revision == COMMIT_V1 and _layers(tagged) == 2
    assert resolve_model("org/tiny@v1", "models.student").revision == COMMIT_V1
    assert resolve_model("org/tiny", "models.teacher", revision=COMMIT_V1).revision == COMMIT_V1
    assert models.load_tokenizer(tagged).pad_token == "<|endoftext|>"


def test_a_hub_id_missing_from_the_cache_fails_naming_setting_and_cache(offline_hub):
    cache = str(offline_hub / "hub")
    with pytest.raises(
        ConfigError, match=r"models\.teacher: org/absent \(revision main\) is not in the Hugging Face cache"
    ) as err:
        resolve_model("org/absent", "models.teacher")
    assert (
        cache in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value) and "hf download org/absent" in str(err.value)
    )
    with pytest.raises(
        ConfigError, match=r"models\.teacher: org/tiny \(revision v2\) is not in the Hugging Face cache"
    ):
        resolve_model("org/tiny", "models.teacher", revision="v2")
    with pytest.raises(ConfigError, match=rf"revision {'c' * 40}\) is not in the Hugging Face cache"):
        resolve_model("org/tiny", "models.teacher", revision="c" * 40)  # a commit: pinned, but not here
    # A worker on a node whose cache lacks the pinned commit says which node.
    with pytest.raises(ConfigError, match=r"models\.teacher on node .*: org/tiny \(revision c{40}\)"):
        ModelSource("hub", "org/tiny", "c" * 40, "models.teacher").local_dir()


def test_local_folders_win_and_typos_are_not_hub_lookups(offline_hub, tiny_assets, tmp_path, monkeypatch):
    local = resolve_model(str(tiny_assets.teacher_dir), "models.teacher")
    assert local == ModelSource("local", str(tiny_assets.teacher_dir.resolve()), None, "models.teacher")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # a folder spelled like the Hub id
    assert resolve_model("org/tiny", "models.teacher").kind == "local"
    with pytest.raises(FileNotFoundError, match=r"models\.student: model folder not found: runs/x/student"):
        resolve_model("runs/x/student", "models.student")
    with pytest.raises(ConfigError, match="a revision applies to a Hub id only"):
        resolve_model(str(tiny_assets.teacher_dir), "models.teacher", revision="v1")
    with pytest.raises(ConfigError, match="names revision 'v1' and models.revision says 'main'"):
        resolve_model("org/other@v1", "models.teacher", revision="main")


def test_hf_home_and_hf_hub_offline_come_from_the_environment(hf_home):
    # A fresh interpreter, configured by the environment alone, as a Ray worker would be.
    script = (
        "from pocl_ray.model_source import resolve_model; from pocl_ray.models import load_model;"
        "s = resolve_model('org/tiny', 'models.teacher', revision='v1');"
        "print(s.revision, load_model(s).config.num_hidden_layers, s.local_dir())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    commit, layers, folder = out.stdout.split()
    assert (commit, layers) == (COMMIT_V1, "2") and folder.startswith(str(hf_home / "hub"))


@pytest.fixture
def bucket_model(s3, tiny_assets, tmp_path, monkeypatch):
    """The tiny teacher in a fresh bucket, and an empty node cache (POCL_RAY_CACHE)."""
    monkeypatch.setenv("POCL_RAY_CACHE", str(tmp_path / "node-cache"))
    uri = storage.join(s3.bucket(), "models", "teacher")
    storage.copy_folder(tiny_assets.teacher_dir, uri)
    return uri


def test_a_uri_model_is_copied_to_the_node_cache_once(s3, bucket_model, tiny_assets):
    source = resolve_model(bucket_model, "models.teacher")
    assert source.kind == "uri" and source.location == bucket_model and len(source.revision) == 16
    first = len(s3.requests)
    assert _layers(source) == 4
    folder = source.local_dir()
    assert folder.is_relative_to(Path(os.environ["POCL_RAY_CACHE"]))
    assert sorted(p.name for p in tiny_assets.teacher_dir.iterdir()) == sorted(
        p.name for p in folder.iterdir() if p.name != "pocl-ray-source.json"
    )
    assert json.loads((folder / "pocl-ray-source.json").read_text()) == source.record()
    assert s3.object_reads(bucket_model.removeprefix("s3://"), since=first), "the first load read the objects"
    again = len(s3.requests)
    assert _layers(source) == 4
    assert s3.requests[again:] == [], "the second load sent the store no request at all"


def test_concurrent_loads_on_a_node_copy_the_model_once(s3, bucket_model, tmp_path, monkeypatch):
    source = resolve_model(bucket_model, "models.teacher")
    prefix = bucket_model.removeprefix("s3://")
    first = len(s3.requests)
    source.local_dir()
    one_copy = sorted(s3.object_reads(prefix, since=first))  # a large object is read in several ranges
    monkeypatch.setenv("POCL_RAY_CACHE", str(tmp_path / "another-node"))
    first = len(s3.requests)
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: source.local_dir(), range(4)))
    assert len(set(folders)) == 1 and folders[0].is_relative_to(tmp_path / "another-node")
    assert one_copy and sorted(s3.object_reads(prefix, since=first)) == one_copy, "four loads, one copy"


def test_a_uri_model_changed_after_resolution_is_refused(s3, bucket_model):
    source = resolve_model(bucket_model, "models.teacher")
    storage.write_text(storage.join(bucket_model, "config.json"), "{}")  # a different size
    with pytest.raises(
        ConfigError, match=r"models\.teacher: the files under s3://.* changed after the run resolved them"
    ):
        source.local_dir()


def test_a_missing_uri_model_names_setting_and_uri(s3):
    uri = storage.join(s3.bucket(), "no-model")
    with pytest.raises(FileNotFoundError, match=rf"models\.student: not found: {uri}"):
        resolve_model(uri, "models.student")
