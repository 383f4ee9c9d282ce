"""Experiment tracking (pocl_ray.tracking, pocl_ray.tracked) against each tracker's real local store,
read back through the tracker's own library: MLflow's client on a SQLite store, TensorBoard's event
reader, W&B's offline run folder. The coordinator (a plain class here) logs what it appends to
metrics.jsonl, so the trackers' training series must equal the file. Also: the fixed bucket probe
(pocl_ray.probes) and the report's per-bucket plot drawn from metrics.jsonl.

The pipeline's run tree (compared runs as children, the report as an artifact) is tested on a real
`run_distill` in test_sft_teacher.py; a Tune sweep's trial runs in test_tuning.py.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port
from tracker_stores import (
    mlflow_children,
    mlflow_series,
    tensorboard_scalars,
    tensorboard_tags,
    wandb_history,
    wandb_records,
    wandb_run_dirs,
)

from pocl_ray import tracked, tracking
from pocl_ray.config import ConfigError, parse_config
from pocl_ray.coordinator import CurriculumCoordinator
from pocl_ray.curriculum import pocl_plan
from pocl_ray.probes import PROBE_KIND, probe_ranks, probe_record, read_probe_rows
from pocl_ray.report import read_metrics, write_report


def run_config(tmp_path: Path, name: str, trackers: list[str], **output) -> object:
    return parse_config(
        {
            "name": name,
            "data": {"train": "train.jsonl"},
            "models": {"teacher": "teacher"},
            "output": {"dir": str(tmp_path / "out"), "trackers": trackers, **output},
        }
    )


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def step_records(steps: range, seed: int = 0) -> list[dict]:
    """metrics.jsonl step records as the training loop writes them (`worker.step_meta` + the read-back)."""
    rng = random.Random(seed)
    return [
        {
            "step": s,
            "stage": (s - 1) // 3,
            "epoch": 0,
            "stage_step": (s - 1) % 3 + 1,
            "temperature": 1.0 + 0.5 * ((s - 1) // 3),
            "kd_weight": 0.7,
            "pool_rows": 16 * (1 + (s - 1) // 3),
            "lr": rng.uniform(1e-5, 1e-3),
            "seconds": rng.uniform(0.1, 1.0),
            "cpu_seconds": 0.1,
            "time": 1.7e9 + s,
            "target": "logits",
            "data_wait": rng.uniform(0, 0.01),
            "loss": rng.uniform(1, 5),
            "kd_loss": rng.uniform(1, 5),
            "ce_loss": rng.uniform(1, 5),
            "tokens": rng.randrange(100, 900),
            "ce_tokens": rng.randrange(100, 900),
            "grad_norm": rng.uniform(0.1, 3),
        }
        for s in steps
    ]


def probes_at(step: int, stage: int, buckets: int = 2) -> list[dict]:
    return [
        probe_record(
            step=step,
            stage=stage,
            samples=16 * step,
            at="stage_end",
            bucket=b,
            rows=4,
            tokens=40,
            kd_loss=1.0 / (b + 1) + step / 100,
            ce_loss=2.0 / (b + 1) + step / 100,
        )
        for b in range(buckets)
    ]


def coordinator(tmp_path: Path, handle: dict | None) -> CurriculumCoordinator:
    return CurriculumCoordinator(
        pocl_plan(2, steps_per_stage=3).to_dict(),
        num_rows=32,
        global_batch=16,
        micro_batch=8,
        seed=0,
        metrics_path=str(tmp_path / "train" / "metrics.jsonl"),
        world_size=2,
        row_group_bounds=[0, 16, 32],
        tracking_handle=handle,
    )


def expected_series(records: list[dict]) -> dict[str, dict[int, float]]:
    """Every tracker metric by step, taken from metrics.jsonl records."""
    out: dict[str, dict[int, float]] = {}
    for step, metrics in tracked.series(records):
        for key, value in metrics.items():
            out.setdefault(key, {})[step] = value
    return out


def train_with_restart(tmp_path: Path, handle: dict | None) -> tuple[CurriculumCoordinator, list[dict]]:
    """A coordinator through a 6-step run whose workers restart after step 5 from the step-3
    checkpoint and replay steps 4-5; candidates at the stage ends (3, 6). Returns it and the records."""
    records = step_records(range(1, 7))
    c = coordinator(tmp_path, handle)
    c.restore(None)
    c.log(records[:3] + probes_at(3, 0))
    c.select({"step": 3, "stage": 0, "samples": 48, "dev_rougeL": 10.0, "dev_kd_loss": 2.5})
    state = c.checkpoint({"stage": 1, "stage_step": 0, "step": 3, "samples": 48}, [])
    c.log(records[3:5])  # then the worker group fails
    c.restore(state)  # and restarts from step 3: steps 4-5 replayed (an exact resume: the same numbers)
    c.log(records[3:5])
    c.log(records[5:] + probes_at(6, 1))
    c.select({"step": 6, "stage": 1, "samples": 96, "dev_rougeL": 12.5, "dev_kd_loss": 2.25})
    c.close()
    return c, records


# -- configuration -----------------------------------------------------------------------------


def test_trackers_config_and_a_missing_library_names_its_extra(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="output.trackers.0: Input should be 'mlflow', 'tensorboard' or 'wandb'"):
        run_config(tmp_path, "x", ["neptune"])
    with pytest.raises(ConfigError, match="output.trackers: Value error, trackers has duplicates|trackers has dup"):
        run_config(tmp_path, "x", ["mlflow", "mlflow"])
    cfg = run_config(tmp_path, "x", ["mlflow", "wandb"])
    tracking.check_trackers(cfg)  # installed here (the test extra)
    # The one thing a test cannot do is uninstall wandb: find_spec is told it is missing.
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    missing = r"output.trackers: 'wandb' needs the wandb library: pip install 'pocl-ray\[wandb\]'"
    with pytest.raises(ConfigError, match=missing):
        tracking.check_trackers(cfg)
    assert parse_config({"data": {"train": "t"}, "models": {"teacher": "t"}}).output.trackers == []


def test_settings_take_the_config_then_the_tools_environment_then_defaults(tmp_path):
    cfg = run_config(tmp_path, "exp", ["mlflow", "tensorboard", "wandb"])
    out = (tmp_path / "out").resolve()
    assert tracking.settings(cfg, env={}) == {
        "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "exp"},
        "tensorboard": {"log_dir": str(out / "tensorboard")},
        "wandb": {"project": "pocl-ray", "entity": None, "mode": "online", "dir": str(out)},
    }
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_EXPERIMENT_NAME": "from-env",
        "WANDB_PROJECT": "p-env",
        "WANDB_ENTITY": "team",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wb"),
    }
    from_env = tracking.settings(cfg, env=env)
    assert from_env["mlflow"] == {"tracking_uri": "http://mlflow:5000", "experiment": "from-env"}
    assert from_env["wandb"] == {"project": "p-env", "entity": "team", "mode": "offline", "dir": str(tmp_path / "wb")}
    given = run_config(
        tmp_path,
        "exp",
        ["mlflow", "wandb"],
        mlflow={"tracking_uri": "sqlite:///x.db", "experiment": "given"},
        wandb={"project": "p", "mode": "disabled"},
    )
    resolved = tracking.settings(given, env=env)
    assert resolved["mlflow"] == {"tracking_uri": "sqlite:///x.db", "experiment": "given"}
    assert resolved["wandb"]["project"] == "p" and resolved["wandb"]["mode"] == "disabled"
    assert resolved["wandb"]["entity"] == "team"


def test_with_output_dir_in_a_bucket_a_default_store_beside_it_is_refused_naming_the_setting(tmp_path):
    def bucket_config(**output):
        cfg = run_config(tmp_path, "b", ["mlflow", "tensorboard", "wandb"], **output)
        return cfg.with_overrides({"output.dir": "s3://pocl-bucket/run"})

    given = {
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
        "tensorboard": {"log_dir": str(tmp_path / "tb")},
        "wandb": {"dir": str(tmp_path / "wb")},
    }
    for setting in ("output.mlflow.tracking_uri", "output.tensorboard.log_dir", "output.wandb.dir"):
        tool = setting.split(".")[1]
        cfg = bucket_config(**{k: v for k, v in given.items() if k != tool})
        with pytest.raises(ConfigError, match=rf"^{re.escape(setting)}: not set, and its default lies beside the"):
            tracking.check_trackers(cfg, env={})
    tracking.check_trackers(bucket_config(**given), env={})
    # The tools' own environment variables are settings given too.
    from_env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "WANDB_DIR": str(tmp_path / "wb")}
    tracking.check_trackers(bucket_config(tensorboard=given["tensorboard"]), env=from_env)
    assert tracking.settings(bucket_config(tensorboard=given["tensorboard"]), env=from_env)["wandb"]["dir"] == str(
        tmp_path / "wb"
    )


def test_artifacts_in_a_bucket_are_logged_from_a_download_and_a_missing_one_is_an_error(s3, mlflow_uri, tmp_path):
    """With output.dir in a bucket, the files a step logs (a folder: the report; a file: the manifest) are read
    from the bucket into a temporary folder, logged to MLflow's store and TensorBoard's event files as a local
    file is, and the temporary folder is removed. A path with nothing there is an error naming it, for a
    bucket's and a local path alike (never a silent skip)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from pocl_ray import storage

    bucket = s3.bucket()
    report_md = "# Report\nall in a bucket\n"
    storage.write_text(f"{bucket}/run/report/report.md", report_md)
    storage.write_text(f"{bucket}/run/report/data.csv", "a,b\n1,2\n")
    storage.write_json(f"{bucket}/run/scores/manifest.json", {"rows": 3})
    cfg = run_config(
        tmp_path, "in-bucket", ["mlflow", "tensorboard"], mlflow={"tracking_uri": mlflow_uri}
    ).with_overrides({"output.dir": f"{bucket}/run", "output.tensorboard.log_dir": str(tmp_path / "tb")})
    tracking.check_trackers(cfg, env={})
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("pocl-artifact-*"))
    with tracking.start(cfg) as parent:
        parent.artifacts(f"{bucket}/run/report", "report")
        parent.artifacts(f"{bucket}/run/scores/manifest.json", "scores")
        for missing in (f"{bucket}/run/report/none.md", tmp_path / "none.md"):
            with pytest.raises(
                FileNotFoundError, match=f"tracker artifact \\(x\\): nothing at {re.escape(str(missing))}"
            ):
                parent.artifacts(missing, "x")

    client = MlflowClient(mlflow_uri)
    run_id = parent.handle["mlflow"]["run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/data.csv", "report/report.md"]
    assert [a.path for a in client.list_artifacts(run_id, "scores")] == ["scores/manifest.json"]
    logged = Path(client.download_artifacts(run_id, "report/report.md", str(tmp_path / "back")))
    assert logged.read_text() == report_md
    tags = tensorboard_tags(tmp_path / "tb" / parent.handle["group"])
    assert {"report/report.md/text_summary", "scores/manifest.json/text_summary"} <= set(tags["tensors"])
    assert set(temp.glob("pocl-artifact-*")) == before, "the downloads were removed"


def test_params_leave_credentials_out():
    params = tracked.loggable_params(
        {
            "kd": {"on_policy_max_new_tokens": 128, "loss": "fkl"},
            "models": {"tokenizer": "tok"},
            "output": {"mlflow": {"tracking_uri": "https://alice:s3cret@mlflow.example:443/path"}},
            "storage": {"api_key": "K1", "hf_token": "T1", "aws_secret_access_key": "S1", "password": "P1"},
            "eval": {"sets": [{"name": "a", "path": "p"}], "seeds": [1, 2]},
            "empty": {},
        }
    )
    assert params == {
        "kd.on_policy_max_new_tokens": "128",
        "kd.loss": "fkl",
        "models.tokenizer": "tok",
        "output.mlflow.tracking_uri": "https://***@mlflow.example:443/path",
        "eval.sets": '[{"name": "a", "path": "p"}]',
        "eval.seeds": "[1, 2]",
        "empty": "{}",
    }
    assert not any(secret in " ".join(params.values()) for secret in ("s3cret", "K1", "T1", "S1", "P1"))


def test_metric_names_from_records_candidates_and_results():
    record = step_records(range(4, 5))[0]
    metrics = tracked.record_metrics(record)
    assert metrics["train/loss"] == record["loss"] and metrics["train/lr"] == record["lr"]
    assert metrics["train/tokens_per_s"] == record["tokens"] / record["seconds"]
    assert "train/target" not in metrics and "train/time" not in metrics
    probe = tracked.record_metrics(probes_at(6, 1)[1])
    assert probe == {
        "probe/bucket_1/kd_loss": 0.5 + 0.06,
        "probe/bucket_1/ce_loss": 1.0 + 0.06,
        "probe/bucket_1/rows": 4.0,
        "probe/bucket_1/tokens": 40.0,
    }
    resize = {"kind": "resize", "step": 8, "stage": 1, "workers_before": 2, "workers_after": 1, "seconds": 4.5}
    assert tracked.record_metrics({**resize, "cause": "failure"}) == {"resize/workers": 1.0, "resize/seconds": 4.5}
    assert tracked.reason_kind("duplicate id 'a-1' (first seen at row 3)") == "duplicate_id"
    assert tracked.reason_kind("field 'response' (column 'output') must be a string, got int: 5") == (
        "field_must_be_a_string_got_int"
    )
    assert tracked.reason_kind("metric student_ce is not finite") == "metric_student_ce_is_not_finite"
    results = {
        "sets": {
            "kjv": {
                "rougeL_mean": 20.0,
                "rougeL_std": 1.0,
                "rougeL_per_seed": {"10": 19.0, "20": 21.0},
                "ce_mean": 3.5,
                "rows_rejected": 2,
            }
        },
        "average": {"rougeL_mean": 20.0, "ce_mean": 3.5},
    }
    assert tracked.eval_metrics(results) == {
        "eval/kjv/rougeL": 20.0,
        "eval/kjv/rougeL_std": 1.0,
        "eval/kjv/ce": 3.5,
        "eval/kjv/rougeL_seed_10": 19.0,
        "eval/kjv/rougeL_seed_20": 21.0,
        "eval/kjv/rows_rejected": 2.0,
        "eval/average/rougeL": 20.0,
        "eval/average/ce": 3.5,
    }


# -- MLflow ------------------------------------------------------------------------------------


def test_mlflow_run_tree_params_metrics_and_artifacts(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = run_config(tmp_path, "tree", ["mlflow"], mlflow={"tracking_uri": mlflow_uri})
    parent = tracking.start(cfg)
    parent.params(tracked.loggable_params(cfg.model_dump(mode="json")))
    handle = parent.child("pocl", "train")
    c, records = train_with_restart(tmp_path, handle)  # the coordinator attaches and detaches
    with tracking.attach(handle) as run:  # the driver's turn: the evaluation, then the run is finished
        run.metrics({"eval/kjv/rougeL": 21.5}, 0)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# Report\n")
    parent.artifacts(tmp_path / "report", "report")
    parent.close("FINISHED")

    client = MlflowClient(mlflow_uri)
    parent_run = client.get_run(parent.handle["mlflow"]["run_id"])
    assert parent_run.info.run_name == "tree" and parent_run.info.status == "FINISHED"
    assert parent_run.data.params["curriculum.num_buckets"] == "4"
    assert parent_run.data.params["output.trackers"] == '["mlflow"]'
    assert [a.path for a in client.list_artifacts(parent_run.info.run_id, "report")] == ["report/report.md"]
    children = mlflow_children(client, parent_run.info.run_id)
    assert list(children) == ["pocl"] and children["pocl"].info.status == "FINISHED"
    child = children["pocl"].info.run_id
    # Every series is metrics.jsonl's, each step once, although steps 4-5 were logged twice.
    file_records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in file_records if r.get("kind") != PROBE_KIND] == [1, 2, 3, 4, 5, 6]
    for key, by_step in expected_series(file_records).items():
        assert mlflow_series(client, child, key) == by_step, key
        assert len(client.get_metric_history(child, key)) == len(by_step), key
    assert mlflow_series(client, child, "probe/bucket_0/kd_loss") == {3: 1.03, 6: 1.06}
    assert mlflow_series(client, child, "dev/rougeL") == {3: 10.0, 6: 12.5}
    assert mlflow_series(client, child, "selected/step") == {6: 6.0}
    assert mlflow_series(client, child, "eval/kjv/rougeL") == {0: 21.5}


def test_a_resumed_training_sends_the_steps_before_its_checkpoint(mlflow_uri, tmp_path):
    """A new coordinator (a re-run of an interrupted stage) on a metrics.jsonl that already holds
    steps 1-6: the child run of this invocation gets the kept steps 1-3, then the new ones."""
    from mlflow.tracking import MlflowClient

    first, records = train_with_restart(tmp_path, None)
    state = first.state() | {"position": {"stage": 1, "stage_step": 0, "step": 3, "samples": 48}}
    state["candidates"] = state["candidates"][:1]
    cfg = run_config(tmp_path, "resumed", ["mlflow"], mlflow={"tracking_uri": mlflow_uri})
    with tracking.start(cfg) as parent:
        handle = parent.child("pocl", "train")
        c = coordinator(tmp_path, handle)
        c.restore(state)
        c.log(records[3:])
        c.close()
        tracking.attach(handle).close("FINISHED")
    client = MlflowClient(mlflow_uri)
    child = handle["mlflow"]["run_id"]
    assert mlflow_series(client, child, "train/loss") == {r["step"]: r["loss"] for r in records}
    assert mlflow_series(client, child, "probe/bucket_1/ce_loss") == {3: 1.03}  # kept; step 6's were past it
    assert mlflow_series(client, child, "dev/rougeL") == {3: 10.0}


def test_unreachable_mlflow_server_one_warning_and_the_run_goes_on(tmp_path, capsys):
    cfg = run_config(
        tmp_path, "down", ["mlflow", "tensorboard"], mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"}
    )
    with tracking.start(cfg) as parent:
        handle = parent.child("pocl", "train")
        assert "mlflow" not in handle and "tensorboard" in handle
        _, records = train_with_restart(tmp_path, handle)
        with tracking.attach(handle) as run:
            run.metrics({"eval/kjv/rougeL": 21.5}, 0)
    out = capsys.readouterr().out
    assert out.count("[track] warning") == 1, out
    assert "mlflow failed (MLflow server 127.0.0.1:" in out and "tracking is off for the rest of down" in out
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "kind" not in line] == [1, 2, 3, 4, 5, 6]
    scalars = tensorboard_scalars(Path(handle["tensorboard"]["log_dir"]))
    assert scalars["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in records})


def test_a_tracker_failing_mid_run_warns_once_and_the_others_go_on(mlflow_uri, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    cfg = run_config(tmp_path, "midway", ["mlflow", "tensorboard"], mlflow={"tracking_uri": mlflow_uri})
    records = step_records(range(1, 7))
    with tracking.start(cfg) as parent:
        handle = parent.child("pocl", "train")
        run = tracking.attach(handle)
        for r in records[:3]:
            run.metrics(tracked.record_metrics(r), r["step"])
        run.close()
        MlflowClient(mlflow_uri).delete_run(handle["mlflow"]["run_id"])  # the server loses the run
        with tracking.attach(handle) as run:
            for r in records[3:]:
                run.metrics(tracked.record_metrics(r), r["step"])
    out = capsys.readouterr().out
    assert out.count("[track] warning: mlflow failed") == 1 and out.count("[track] warning") == 1, out
    scalars = tensorboard_scalars(Path(handle["tensorboard"]["log_dir"]))
    assert scalars["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in records})


# -- TensorBoard and W&B ---------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_same_scalars(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = run_config(tmp_path, "tb", ["tensorboard"])
    with tracking.start(cfg) as parent:
        parent.params({"kd.loss": "fkl"})
        handle = parent.child("pocl", "train")
        _, _ = train_with_restart(tmp_path, handle)
        tracking.attach(handle).close("FINISHED")
        report = tmp_path / "report"
        report.mkdir()
        (report / "report.md").write_text("# Report\n")
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        fig.savefig(report / "loss.png")
        plt.close(fig)
        parent.artifacts(report, "report")
    log_dir = tmp_path / "out" / "tensorboard" / parent.handle["group"]
    assert handle["tensorboard"]["log_dir"] == str(log_dir / "pocl")
    file_records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(log_dir / "pocl")
    expected = expected_series(file_records)
    selection = {"dev/rougeL", "dev/kd_loss", "selected/step", "selected/dev_rougeL", "selected/dev_kd_loss"}
    assert set(scalars) == set(expected) | selection
    for key, by_step in expected.items():  # event files hold float32
        assert scalars[key] == {s: float(np.float32(v)) for s, v in by_step.items()}, key
    tags = tensorboard_tags(log_dir)
    assert "report/loss.png" in tags["images"]
    assert {"params/text_summary", "report/report.md/text_summary"} <= set(tags["tensors"])


def test_wandb_offline_run_folders_hold_the_metrics(tmp_path):
    cfg = run_config(tmp_path, "wb", ["wandb"], wandb={"mode": "offline", "project": "pocl-test"})
    with tracking.start(cfg) as parent:
        parent.params({"kd.loss": "fkl"})
        handle = parent.child("pocl", "train")
        _, records = train_with_restart(tmp_path, handle)
        with tracking.attach(handle) as run:
            run.metrics({"eval/kjv/rougeL": 21.5}, 0)
    folders = wandb_run_dirs(tmp_path / "out")
    by_id = {}
    for folder in folders:
        run_records = [r.run for r in wandb_records(folder) if r.WhichOneof("record_type") == "run"]
        by_id.setdefault(run_records[0].run_id, []).append((run_records[0], folder))
    # The parent, and the child attached twice: by the coordinator, then by the driver (resumed).
    assert set(by_id) == {parent.handle["wandb"]["id"], handle["wandb"]["id"]}
    child_runs = by_id[handle["wandb"]["id"]]
    assert len(child_runs) == 2
    names = {(r.run_group, r.job_type, r.display_name) for r, _ in child_runs}
    assert names == {(parent.handle["group"], "train", "pocl")}
    rows = [row for _, folder in child_runs for row in wandb_history(folder)]
    file_records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and key != "step":
                logged.setdefault(key, {})[row["step"]] = value
    for key, by_step in expected_series(file_records).items():
        assert logged[key] == by_step, key
    assert logged["dev/rougeL"] == {3: 10.0, 6: 12.5} and logged["eval/kjv/rougeL"] == {0: 21.5}


def test_tune_callbacks_group_trials_under_the_sweep():
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    handle = {
        "name": "sw",
        "group": "sw-1",
        "mlflow": {"tracking_uri": "sqlite:///x.db", "experiment": "sw", "experiment_id": "1", "run_id": "abc"},
        "wandb": {"project": "p", "entity": None, "mode": "offline", "dir": "/tmp", "group": "sw-1", "id": "i"},
    }
    mlflow_cb, wandb_cb = tracking.tune_callbacks(handle)
    assert isinstance(mlflow_cb, MLflowLoggerCallback) and mlflow_cb.tags["mlflow.parentRunId"] == "abc"
    assert mlflow_cb.experiment_name == "sw" and mlflow_cb.tracking_uri == "sqlite:///x.db"
    assert isinstance(wandb_cb, WandbLoggerCallback) and wandb_cb.group == "sw-1" and wandb_cb.project == "p"
    assert wandb_cb.kwargs == {"entity": None, "mode": "offline", "dir": "/tmp"}
    assert tracking.tune_callbacks({"name": "sw"}) == []


# -- the bucket probe ------------------------------------------------------------------------------


def test_probe_rows_are_the_same_every_time_and_drawn_from_each_bucket():
    first = probe_ranks(1000, 4, 32)
    assert all(np.array_equal(a, b) for a, b in zip(first, probe_ranks(1000, 4, 32)))
    for b, ranks in enumerate(first):
        assert len(ranks) == 32 and len(set(ranks.tolist())) == 32
        assert ranks.min() >= 250 * b and ranks.max() < 250 * (b + 1) and np.all(np.diff(ranks) > 0)
    assert not np.array_equal(first[0], probe_ranks(1000, 4, 32, seed=1)[0])  # seeded, not a fixed stride
    small = probe_ranks(10, 3, 32)  # buckets smaller than the sample: all their rows
    assert [r.tolist() for r in small] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(r) for r in probe_ranks(10, 3, 0)] == [0, 0, 0]


def test_probe_rows_are_read_from_the_scores(tmp_path):
    ranks = np.random.default_rng(0).permutation(100)
    folder = tmp_path / "rows"
    folder.mkdir()
    for i in range(2):  # two files, rows in no particular order
        part = ranks[i * 50 : (i + 1) * 50]
        pq.write_table(
            pa.table({"id": [f"row-{r}" for r in part], "rank": part, "input_ids": [[int(r)] * 3 for r in part]}),
            folder / f"{i}.parquet",
        )
    wanted = probe_ranks(100, 4, 5)
    rows = read_probe_rows(folder, wanted, ["input_ids"])
    for bucket, expected in zip(rows, wanted):
        assert [r["rank"] for r in bucket] == expected.tolist()
        assert [r["id"] for r in bucket] == [f"row-{r}" for r in expected]
        assert all(r["input_ids"] == [r["rank"]] * 3 for r in bucket)
    with pytest.raises(ValueError, match=r"lack the probe ranks \[100\]"):
        read_probe_rows(folder, [np.array([100])], ["input_ids"])


def test_report_draws_the_bucket_probe_from_metrics_jsonl(tmp_path):
    train = tmp_path / "run" / "train"
    train.mkdir(parents=True)
    records = step_records(range(1, 7))
    lines = records[:3] + probes_at(3, 0, buckets=3) + records[3:] + probes_at(6, 1, buckets=3)
    (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    metrics = read_metrics(train / "metrics.jsonl")
    assert metrics.frame["step"].tolist() == [1, 2, 3, 4, 5, 6] and metrics.skipped == 0
    assert sorted(metrics.probes.groupby("bucket")["samples"].apply(list).to_dict().items()) == [
        (0, [48, 96]),
        (1, [48, 96]),
        (2, [48, 96]),
    ]
    report = write_report(tmp_path / "run").read_text()
    assert "## Curriculum: the difficulty buckets" in report and "0: 4 rows, 1: 4 rows, 2: 4 rows" in report
    assert "![per-bucket probe against samples seen](bucket_probe.png)" in report
    assert (tmp_path / "run" / "report" / "bucket_probe.png").stat().st_size > 0
    assert re.search(r"\|\s*0\s*\|\s*3\s*\|", report)  # the stage table counts step records only
    (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "Curriculum: the difficulty buckets" not in write_report(tmp_path / "run").read_text()
