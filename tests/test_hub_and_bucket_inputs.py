"""Models by Hub id, data and scores in a bucket, checkpoints in a bucket (issue 24, phase 2): the
command's preflight checks the data and resolves each model once on the driver, before any Ray work; the
scoring actors and the training workers load the models from the resolved sources; the manifest, plan and
report record the pinned revision; training reads its scores (rows, manifest, the cached teacher's head)
from a bucket, writes its checkpoints to one (training.storage_path) and resumes from them.

The Hub is huggingface_hub's real resolution and download code against a cache in the hub's own layout
(conftest.put_in_hub_cache) under a temporary HF_HOME with HF_HUB_OFFLINE=1, set in the environment
before this module's Ray starts, so that its workers resolve from the same cache. The bucket is moto's
S3 server (conftest `s3`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.dataset as pds
import pytest
import yaml
from conftest import put_in_hub_cache
from training_helpers import read_metrics, run_config, train_worker_pids, write_scores

from pocl_ray import storage
from pocl_ray.cli import main
from pocl_ray.config import parse_config
from pocl_ray.probes import is_probe

COMMIT_MAIN = "c" * 40  # org/tiny at main: the 4-layer tiny teacher
COMMIT_V1 = "d" * 40  # org/tiny at tag v1: the 2-layer student cut from it
HUB_TEACHER = {"kind": "hub", "location": "org/tiny", "revision": COMMIT_MAIN}


@pytest.fixture(scope="module")
def hf_home(tiny_assets, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    put_in_hub_cache(home / "hub", "org/tiny", COMMIT_MAIN, tiny_assets.teacher_dir, refs=("main",))
    put_in_hub_cache(home / "hub", "org/tiny", COMMIT_V1, tiny_assets.cut_student_dir, refs=("v1",))
    return home


def _offline(mp: pytest.MonkeyPatch, home) -> None:
    """This process (and a Ray started afterwards) as under HF_HOME=home HF_HUB_OFFLINE=1 (huggingface_hub
    reads both at import: its constants are set as the environment would have set them)."""
    from huggingface_hub import constants

    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)


def _score_config(tiny_assets, out, train, **models) -> dict:
    return {
        "name": "hub",
        "data": {"train": str(train), "max_prompt_length": 96, "max_length": 128},
        "models": {"teacher": "org/tiny", "student_layers": [1, 3], **models},
        "scoring": {"metrics": ["student_ce", "teacher_ce"], "num_actors": 1, "batch_size": 8},
        "curriculum": {"num_buckets": 2},
        "output": {"dir": str(out)},
    }


# -- Before any Ray work (these tests carry no `ray` marker: a ray.init would fail them) --------------


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"teacher": "org/missing"}, "models.teacher: org/missing (revision main) is not in the Hugging Face cache"),
        ({"revision": "v9"}, "models.teacher: org/tiny (revision v9) is not in the Hugging Face cache"),
        ({"tokenizer": "org/missing-tok"}, "models.tokenizer: org/missing-tok (revision main) is not in"),
    ],
)
def test_a_hub_id_missing_from_the_cache_fails_before_ray_naming_the_setting(
    hf_home, tiny_assets, tmp_path, monkeypatch, capsys, models, expected
):
    _offline(monkeypatch, hf_home)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_score_config(tiny_assets, tmp_path / "out", tiny_assets.train_path, **models)))
    for command in ("score", "train", "eval"):
        assert main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "HF_HUB_OFFLINE=1 is set" in err, err
    assert not (tmp_path / "out").exists()


def test_missing_data_in_a_bucket_fails_before_ray_naming_the_setting(s3, tiny_assets, tmp_path, capsys):
    bucket = s3.bucket()
    config = _score_config(
        tiny_assets, tmp_path / "out", f"{bucket}/data/none.jsonl", teacher=str(tiny_assets.teacher_dir)
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["score", "--config", str(path)]) == 2
    assert f"data.train: not found: {bucket}/data/none.jsonl" in capsys.readouterr().err
    config["data"]["train"] = str(tiny_assets.train_path)
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--scores", f"{bucket}/scores"]) == 2
    assert f"--scores: not found: {bucket}/scores" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("command", "extra", "expected"),
    [
        ("run", {"output": {"trackers": ["mlflow"]}}, "output.mlflow.tracking_uri: not set, and its default lies"),
        (
            "tune",
            {
                "output": {"trackers": ["tensorboard"]},
                "tune": {"search_space": {"training.lr": {"type": "grid", "values": [1e-3, 2e-3]}}},
            },
            "output.tensorboard.log_dir: not set, and its default",
        ),
        ("run", {"output": {"dir": "s3://pocl-no-such-bucket/run"}}, "output.dir: s3://pocl-no-such-bucket/run: the"),
    ],
)
def test_what_cannot_write_to_a_bucket_fails_before_ray_naming_the_setting(
    s3, tiny_assets, tmp_path, capsys, monkeypatch, command, extra, expected
):
    """A tracker whose default store lies beside the outputs (MLflow's SQLite file, TensorBoard's event files),
    with output.dir in a bucket and no location of its own, is refused before any Ray work (a ray.init here
    would fail the test), naming the setting to give; so is an output.dir in a bucket that does not exist."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = f"{s3.bucket()}/run"
    config = _score_config(tiny_assets, run, tiny_assets.train_path, teacher=str(tiny_assets.teacher_dir))
    config["data"]["dev"] = str(tiny_assets.dev_path)  # the sweep's objective is measured on it
    for section, values in extra.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([command, "--config", str(path)]) == 2
    assert expected in capsys.readouterr().err
    assert storage.list_files(run) == []


# -- Through the stages ----------------------------------------------------------------------------


# The module's cluster: 2 nodes of NODE_CPUS; a training worker of TRAIN_CPUS has a node to itself.
NODE_CPUS = 4
TRAIN_CPUS = 3


@pytest.fixture(scope="module")
def hub_ray(s3, hf_home):
    """A local Ray cluster of 2 nodes (ray.cluster_utils.Cluster), the second with a temp dir of its own (so
    its own session logs, and no folder shared with the head's, Ray's default), started with the offline Hub
    cache (and the bucket's endpoint, from `s3`) in its environment. OMP_NUM_THREADS=1: a worker given
    TRAIN_CPUS would otherwise run that many torch threads on this machine's 2 cores."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "this module starts its own 2-node cluster; a Ray session is still running"
    node_temp = tempfile.mkdtemp(prefix="rn")  # short: Ray's socket paths are under it
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, hf_home)
        mp.setenv("OMP_NUM_THREADS", "1")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=NODE_CPUS, temp_dir=node_temp)
            ray.init(address=cluster.address)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(node_temp, ignore_errors=True)


@pytest.mark.ray
def test_scoring_reads_a_bucket_and_loads_the_teacher_by_hub_id(hub_ray, s3, tiny_assets, tmp_path):
    """The same rows scored with the teacher by Hub id from data in a bucket, and with the teacher's
    local folder from a local file, give the same metrics and ranks; the manifest, the summary and the
    report name the commit the id was pinned to."""
    from pocl_ray.report import write_report
    from pocl_ray.scoring import format_summary, score_dataset

    lines = tiny_assets.train_path.read_text().splitlines()[:48]
    local = tmp_path / "train.jsonl"
    local.write_text("\n".join(lines) + "\n")
    bucket = s3.bucket()
    storage.write_bytes(f"{bucket}/data/part-0.jsonl", local.read_bytes())
    since = len(s3.requests)
    by_id = score_dataset(parse_config(_score_config(tiny_assets, tmp_path / "hub", f"{bucket}/data")))
    assert s3.object_reads(f"{bucket.removeprefix('s3://')}/data/part-0.jsonl", since), "the rows came from the bucket"
    manifest = by_id.manifest
    assert manifest["models"]["teacher"] == manifest["models"]["tokenizer"] == HUB_TEACHER
    assert f"teacher: org/tiny (revision {COMMIT_MAIN})" in format_summary(manifest)
    assert f"org/tiny (revision {COMMIT_MAIN})" in write_report(tmp_path / "hub").read_text()

    by_folder = score_dataset(
        parse_config(_score_config(tiny_assets, tmp_path / "local", local, teacher=str(tiny_assets.teacher_dir)))
    )
    columns = ["id", "student_ce", "teacher_ce", "rank", "bucket"]
    hub_rows = pds.dataset(str(by_id.scores_path)).to_table(columns=columns).sort_by("id")
    local_rows = pds.dataset(str(by_folder.scores_path)).to_table(columns=columns).sort_by("id")
    assert hub_rows.num_rows == len(lines) and hub_rows.equals(local_rows)


@pytest.mark.ray
def test_training_loads_the_teacher_by_hub_id_at_a_revision(hub_ray, tiny_assets, tmp_path):
    """models.revision v1 pins org/tiny to the 2-layer model: the workers distil from it (its loss
    differs from main's 4-layer teacher's) and plan.json records the commit."""
    from pocl_ray.training.driver import train

    scores = write_scores(tmp_path / "scores_run", tiny_assets, num_buckets=2)
    overrides = {
        "curriculum.num_buckets": 2,
        "curriculum.epochs_per_stage": None,
        "curriculum.steps_per_stage": 2,
        "data.dev": None,
        "models.teacher": "org/tiny",
        "training.num_workers": 1,  # a worker's loss tells the teachers apart; a second one only costs its start
    }
    losses = {}
    for revision, commit in (("v1", COMMIT_V1), (None, COMMIT_MAIN)):
        cfg = run_config(tiny_assets, tmp_path / f"out-{revision}", name=f"hub-{revision}", **overrides)
        result = train(cfg.with_overrides({"models.revision": revision}), scores)
        plan = json.loads(result.plan_path.read_text())
        assert plan["models"]["models.teacher"] == {"kind": "hub", "location": "org/tiny", "revision": commit}
        assert plan["models"]["models.student"]["kind"] == "local"
        assert result.steps == 4
        steps = [r for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "kd_loss" in r]
        losses[revision] = steps[0]["kd_loss"]  # the first step: the same student and rows, another teacher
    assert losses["v1"] != losses[None], "both revisions gave the same teacher"


@pytest.mark.ray
def test_training_reads_scores_and_the_cached_teacher_head_from_a_bucket(hub_ray, s3, tiny_assets, tmp_path):
    """`pocl-ray train --scores s3://...`: the driver checks the manifest, the rows' columns and the
    teacher head's shape in the bucket, and the workers read their rows and the head from it; the
    steps are those of the same scores read from the local folder."""
    from pocl_ray.training.driver import train

    local = write_scores(tmp_path / "scores_run", tiny_assets, num_buckets=2, cache_form="hidden")
    bucket = s3.bucket()
    storage.copy_folder(local, f"{bucket}/scores")
    overrides = {
        "curriculum.num_buckets": 2,
        "curriculum.epochs_per_stage": None,
        "curriculum.steps_per_stage": 2,
        "data.dev": None,
        "kd.teacher": "cached",
        "scoring.teacher_hidden": True,
        "training.checkpoint_every": 100,
        "training.num_workers": 1,  # one worker's reads show where the rows and the head came from
    }
    steps = {}
    for name, scores in (("bucket", f"{bucket}/scores"), ("local", local)):
        since = len(s3.requests)
        result = train(run_config(tiny_assets, tmp_path / name, name=f"scores-{name}", **overrides), scores)
        assert result.steps == 4
        bucket_name = bucket.removeprefix("s3://")
        for key in ("rows.parquet", "teacher_head.safetensors"):
            read = s3.object_reads(f"{bucket_name}/scores/{key}", since)
            assert bool(read) == (name == "bucket"), (name, key)
        steps[name] = [(r["step"], r["tokens"], r["kd_loss"]) for r in read_metrics(result.metrics_path)]
    assert steps["bucket"] == steps["local"]


def _bucket_checkpoints(prefix: str) -> list[str]:
    """The step_* checkpoints Ray Train has committed under prefix (its snapshot lists them)."""
    files = storage.list_files(prefix)
    if not any(f.endswith("/checkpoint_manager_snapshot.json") for f in files):
        return []
    return sorted({f.split("/")[-2] for f in files if f.split("/")[-2].startswith("step_")})


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_resumes_from_its_checkpoint_in_a_bucket(hub_ray, s3, tiny_assets, tmp_path):
    """output.dir in a bucket, so the checkpoints too (training.storage_path unset: OUTPUT/train/checkpoints),
    under training.strategy: fsdp, where every worker reads the checkpoint (its shards of the student and of
    AdamW) at two points of its set-up (the student, then the optimizer with the stage): after a training
    worker is killed the restarted worker group reads the last checkpoint back from the bucket, each worker
    once, and finishes the plan, and metrics.jsonl in the bucket (rewritten whole at each checkpoint, cut
    back to the checkpoint's step on the restart) holds every step once."""
    from pocl_ray.training.driver import train

    scores = write_scores(tmp_path / "scores_run", tiny_assets, num_buckets=2)
    out = f"{s3.bucket()}/run"
    checkpoints = f"{out}/train/checkpoints"
    cfg = run_config(
        tiny_assets,
        out,
        name="bucket-resume",
        **{
            "curriculum.num_buckets": 2,
            "data.dev": None,
            "training.checkpoint_every": 2,
            "training.max_failures": 1,
            "training.strategy": "fsdp",
        },
    )
    run_prefix = f"{checkpoints}/{cfg.name}"
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = train(cfg, scores)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not _bucket_checkpoints(run_prefix) and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    pids = train_worker_pids()
    assert pids and thread.is_alive(), f"the run ended before a checkpoint was taken: {outcome}"
    since = len(s3.requests)
    killed_at = time.time()
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=420)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]

    assert result.metrics_path == f"{out}/train/metrics.jsonl"
    records = [r for r in map(json.loads, storage.read_text(result.metrics_path).splitlines()) if not is_probe(r)]
    assert [r["step"] for r in records] == list(range(1, result.steps + 1)) and result.stages_completed == 2
    kept = [r["step"] for r in records if r["time"] < killed_at]
    assert kept and len(kept) < len(records), "steps before the kill were kept, the rest trained after it"
    bucket_name = checkpoints.removeprefix("s3://")
    restored = s3.object_reads(f"{bucket_name}/{cfg.name}/step_", since)
    resumed_from = f"/step_{kept[-1]:08d}/"  # metrics.jsonl keeps the steps up to the checkpoint resumed from
    downloads = [r for r in restored if r[1].endswith(resumed_from + "coordinator.json")]
    assert downloads, "the restart read its checkpoint from the bucket"
    assert len(downloads) <= cfg.training.max_workers, "every worker downloaded the checkpoint at most once"
    assert any(resumed_from + "student_shards/" in r[1] for r in restored)
    assert result.checkpoint_path.startswith(run_prefix.removeprefix("s3://"))
    assert storage.is_dir(result.student_dir) and [p.name for p in tmp_path.iterdir()] == ["scores_run"]


def test_training_reads_its_rows_from_the_scores_so_it_does_not_check_data_train(tmp_path):
    from pocl_ray.preflight import data_paths

    dev = tmp_path / "dev.jsonl"
    cfg = parse_config(
        {
            "name": "t",
            "data": {"train": str(tmp_path / "gone.jsonl"), "dev": str(dev)},
            "models": {"teacher": str(tmp_path / "teacher")},
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    assert data_paths(cfg, tmp_path / "scores", training=True) == {
        "data.dev": str(dev),
        "--scores": str(tmp_path / "scores"),
    }
    assert data_paths(cfg)["data.train"] == str(tmp_path / "gone.jsonl")


# -- Everything in a bucket: `pocl-ray run` -------------------------------------------------------------

# The files a run writes: any of them appearing on local disk during the bucket run is a stray output.
OUTPUT_NAMES = {".stage.json", "config.yaml", "manifest.json", "rejected.jsonl", "plan.json", "probe.json"} | {
    "metrics.jsonl",
    "selection.json",
    "results.json",
    "results.md",
    "generations.jsonl",
    "report.md",
    "coordinator.json",
    "model.safetensors",
}


def _secret_forms(secret: str) -> set[bytes]:
    """A secret as it could appear in a file or a log line: as is, base64 and URL-encoded."""
    import base64
    from urllib.parse import quote

    return {secret.encode(), base64.b64encode(secret.encode()), quote(secret, safe="").encode()}


def _local_files_since(root, since: float) -> list[str]:
    return sorted(
        str(p) for p in root.rglob("*") if p.is_file() and p.name in OUTPUT_NAMES and p.stat().st_mtime >= since - 1
    )


@pytest.mark.ray
def test_a_run_with_data_output_and_checkpoints_in_a_bucket_leaves_nothing_local_and_no_secret(
    hub_ray, s3, tiny_assets, tmp_path, tmp_path_factory, monkeypatch, capfd
):
    """`pocl-ray run` (score -> train -> eval -> report) with data, eval set, output.dir and so the
    checkpoints in a bucket and the teacher by Hub id, fine-tuned first (pipeline.sft_teacher), on the module's
    2-node cluster whose nodes share no folder, with one training worker on each node (each asks for more than
    half a node's CPUs; each node's session logs show a Ray Train worker): the bucket holds the fine-tuned
    teacher, which the later stages load from it by URI, the scores, the train outputs (plan, probe, metrics,
    selection, both students), the checkpoints, the evaluation and the report, and no run file was written
    to local disk (the working directory, the test's temporary folders, either node's temp dir).
    With fake AWS credentials (and a fake HF_TOKEN for the driver) in the environment, no object in the
    bucket and no line of the printed log or of either node's Ray session logs holds one of them."""
    from conftest import FAKE_AWS_KEY_ID, FAKE_AWS_SECRET

    from pocl_ray.config import load_config

    hf_token = "hf_pocl_ray_fake_token_000"
    monkeypatch.setenv("HF_TOKEN", hf_token)
    bucket = s3.bucket()
    lines = tiny_assets.train_path.read_text().splitlines()
    dev = tiny_assets.dev_path.read_text().splitlines()
    for name, rows in (("train", lines[:48]), ("dev", dev[:8]), ("test", dev[8:16])):
        storage.write_text(f"{bucket}/data/{name}.jsonl", "\n".join(rows) + "\n")
    run = f"{bucket}/run"
    config = {
        **_score_config(tiny_assets, run, f"{bucket}/data/train.jsonl"),
        "name": "all-in-a-bucket",
        "curriculum": {"plan": "pocl", "num_buckets": 2, "steps_per_stage": 1},
        "training": {
            "num_workers": 2,
            "cpus_per_worker": TRAIN_CPUS,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "checkpoint_every": 100,
        },
        "eval": {
            "sets": [{"name": "test", "path": f"{bucket}/data/test.jsonl"}],
            "seeds": [10],
            "max_new_tokens": 8,
            "batch_size": 8,
        },
        "pipeline": {
            "compare": {"pocl": {"curriculum.plan": "pocl"}},
            "evaluate_teacher": False,
            "sft_teacher": {"steps": 1, "lr": 1e-3},
        },
        "output": {"dir": run, "bucket_probe_rows": 2},
    }
    config["data"]["dev"] = f"{bucket}/data/dev.jsonl"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "run.yaml").write_text(yaml.safe_dump(config))
    assert load_config(inputs / "run.yaml").output.dir == run
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    started = time.time()

    assert main(["run", "--config", str(inputs / "run.yaml")]) == 0
    printed = capfd.readouterr()
    assert f"report: {run}/report/report.md" in printed.out

    objects = storage.list_files(bucket)
    names = {o.removeprefix(f"{run}/") for o in objects}
    pocl = "runs/pocl"
    expected = {"config.yaml", "scores/.stage.json", "scores/manifest.json", "scores/rejected.jsonl"} | {
        f"{pocl}/train/{name}" for name in (".stage.json", "plan.json", "probe.json", "metrics.jsonl", "selection.json")
    }
    expected |= {
        f"{pocl}/train/{s}/{f}" for s in ("student", "student_best") for f in ("config.json", "model.safetensors")
    }
    expected |= {f"{pocl}/eval/{f}" for f in (".stage.json", "results.json", "results.md", "generations.jsonl")}
    expected |= {"report/report.md", "report/schedule.png", "report/difficulty.png", "report/rouge.png"}
    expected |= {"teacher_sft/.stage.json", "teacher_sft/train/plan.json", "teacher_sft/model/config.json"}
    expected |= {"teacher_sft/model/model.safetensors"}
    assert expected <= names, sorted(expected - names)
    assert any(n.startswith("scores/rows/") and n.endswith(".parquet") for n in names)
    checkpoints = [n for n in names if n.startswith(f"{pocl}/train/checkpoints/all-in-a-bucket/")]
    assert any(n.endswith("/coordinator.json") for n in checkpoints), "the checkpoints went to the bucket"

    records = [json.loads(line) for line in storage.read_text(f"{run}/{pocl}/train/metrics.jsonl").splitlines()]
    steps = [r for r in records if not is_probe(r)]
    assert [r["step"] for r in steps] == [1, 2] and {r["stage"] for r in steps} == {0, 1}
    assert any(is_probe(r) for r in records), "the bucket probe's records went to the bucket too"
    results = storage.read_json(f"{run}/{pocl}/eval/results.json")
    assert results["model"]["kind"] == "uri" and results["model"]["location"] == f"{run}/{pocl}/train/student_best"
    assert results["sets"]["test"]["rows"] == 8
    report = storage.read_text(f"{run}/report/report.md")
    assert "### Selection: pocl" in report
    # The fine-tuning started from the Hub id pinned to its commit; every later stage read the teacher it
    # wrote to the bucket (the report naming the pinned revision: test_scoring_reads_a_bucket_...).
    sft_plan = storage.read_json(f"{run}/teacher_sft/train/plan.json")
    assert sft_plan["models"]["models.teacher"] == HUB_TEACHER
    fine_tuned = storage.read_json(f"{run}/scores/manifest.json")["models"]["teacher"]
    assert fine_tuned["kind"] == "uri" and fine_tuned["location"] == f"{run}/teacher_sft/model", fine_tuned
    assert storage.read_json(f"{run}/{pocl}/train/plan.json")["models"]["models.teacher"] == fine_tuned

    nodes = hub_ray.list_all_nodes()
    node_logs = [sorted(p for p in (Path(n.get_session_dir_path()) / "logs").rglob("*") if p.is_file()) for n in nodes]
    assert len(nodes) == 2 and len({n.get_temp_dir_path() for n in nodes}) == 2
    for logs in node_logs:  # Ray marks an actor's log files with the actor's class
        worker_logs = [p for p in logs if p.name.startswith("worker-")]
        assert any(b":actor_name:RayTrainWorker" in p.read_bytes() for p in worker_logs), "no training worker here"

    assert workdir.exists() and not any(workdir.iterdir()), list(workdir.iterdir())
    for root in [tmp_path_factory.getbasetemp()] + [Path(n.get_temp_dir_path()) for n in nodes]:
        stray = _local_files_since(root, started)
        assert not stray, stray

    session_logs = [p for logs in node_logs for p in logs]
    texts = {o: storage.read_bytes(o) for o in objects}
    texts |= {str(p): p.read_bytes() for p in session_logs}
    texts["printed log"] = (printed.out + printed.err).encode()
    # The search sees what it should: the run's own config in the bucket and the worker logs of this session.
    assert bucket.encode() in texts[f"{run}/config.yaml"] and bucket.encode() in texts["printed log"]
    assert any(p.name.startswith("worker-") for p in session_logs) and any(p.name == "raylet.out" for p in session_logs)
    for secret in (FAKE_AWS_KEY_ID, FAKE_AWS_SECRET, hf_token):
        leaks = [where for where, text in texts.items() if any(form in text for form in _secret_forms(secret))]
        assert not leaks, (secret, leaks)
