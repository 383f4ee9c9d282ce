"""Teacher fine-tuning before distillation (`pipeline.sft_teacher`): a tiny random teacher is
fine-tuned on the tiny training rows through the real stage (length-only scoring + one Ray Train run
on the sft plan), inside a real `run_distill` (scoring, one compared training, its evaluation and
the teacher's). The fine-tuning must lower the teacher's CE on the training rows, be skipped on a
re-run, and be the teacher of every later stage: the scores record it and cache it (the hidden form,
which the compared run trains from), the student is cut from it, and the teacher's evaluation
evaluates it. The same run logs to MLflow (its default SQLite store beside the outputs) and
TensorBoard: each invocation one parent run, each stage a child under it whose series are the
stage's own files.

One compared run (POCL), as in tests/test_quickstart_chat.py: every compared run is built by the same
loop from the one resolved config (`pipeline.compared_runs`), and two of them side by side (trained,
evaluated, each a tracker child, live and replayed) are tests/test_e2e.py's business. A second one here
cost a Ray Train run and an evaluation.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from tracker_stores import mlflow_children, mlflow_series, tensorboard_scalars

import pocl_ray.teacher_prep
from pocl_ray.config import ConfigError, parse_config
from pocl_ray.data import read_table, validate_and_tokenize
from pocl_ray.evaluation import response_ce
from pocl_ray.models import load_model, load_tokenizer
from pocl_ray.probes import is_probe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sft_config(assets, out: Path, **overrides):
    cfg = parse_config(
        {
            "name": "sftt",
            "data": {"train": str(assets.train_path), "max_prompt_length": 96, "max_length": 128},
            "models": {"teacher": str(assets.teacher_dir)},  # the student is cut from the (fine-tuned) teacher
            "scoring": {"metrics": ["teacher_ce"], "batch_size": 64, "teacher_hidden": True},
            "kd": {"teacher": "cached"},
            "curriculum": {"plan": "pocl", "num_buckets": 2, "steps_per_stage": 1},
            # A learning rate so small that each trained student stays the teacher layers it was cut from.
            "training": {
                "num_workers": 1,
                "global_batch_size": 16,
                "micro_batch_size": 16,
                "lr": 1e-12,
                "min_lr": 0.0,
                "checkpoint_every": 100,
                "max_failures": 0,
            },
            "eval": {
                "sets": [{"name": "dev", "path": str(assets.dev_path), "max_rows": 8}],
                "seeds": [0],
                "max_new_tokens": 4,
                "checkpoint": "final",
            },
            "pipeline": {
                "sft_teacher": {"steps": 30, "lr": 3e-3, "min_lr": 3e-4},
                "compare": {"pocl": {"curriculum.plan": "pocl"}},
                "evaluate_teacher": True,
            },
            "output": {"dir": str(out), "trackers": ["mlflow", "tensorboard"]},
        }
    )
    return cfg.with_overrides(overrides) if overrides else cfg


def mean_train_ce(model_dir: Path, cfg) -> float:
    """The model's mean response CE (nats/token) over the training rows."""
    tokenizer = load_tokenizer(model_dir)
    rows, _ = validate_and_tokenize(read_table(cfg.data.train, "auto").to_pylist(), tokenizer, cfg.data)
    model = load_model(model_dir, dtype=torch.float32, frozen=True)
    return statistics.fmean(
        ce
        for i in range(0, len(rows), 64)
        for ce in response_ce(model, rows[i : i + 64], tokenizer.pad_token_id, len(tokenizer))
    )


def test_sft_settings_are_checked_against_the_run():
    from pocl_ray.teacher_prep import sft_overrides

    base = {"data": {"train": "x"}, "models": {"teacher": "t"}, "training": {"num_workers": 1, "micro_batch_size": 16}}
    # Its own batch, dealt as the run's are (24 rows on 1 worker of micro-batch 16: 16 + 8).
    cfg = parse_config({**base, "pipeline": {"sft_teacher": {"global_batch_size": 24}}})
    assert cfg.with_overrides(sft_overrides(cfg)).training.global_batch_size == 24
    with pytest.raises(ConfigError, match="pipeline.sft_teacher: set epochs or steps"):
        parse_config({**base, "pipeline": {"sft_teacher": {"epochs": None}}})
    steps = parse_config({**base, "pipeline": {"sft_teacher": {"steps": 7}}})
    assert steps.pipeline.sft_teacher.epochs is None  # steps alone replace the epochs default
    assert sft_overrides(steps)["curriculum.steps_per_stage"] == 7


@pytest.fixture(scope="module")
def pipeline_with_sft(ray_local, tiny_assets, tmp_path_factory):
    """run_distill twice on one output directory: (cfg, root, [(printed log, fine-tuned model's mtime)])."""
    import io
    from contextlib import redirect_stdout

    from pocl_ray.pipeline import run_distill

    root = tmp_path_factory.mktemp("sft_pipeline")
    cfg = sft_config(tiny_assets, root)
    runs = []
    for _ in range(2):
        log = io.StringIO()
        with redirect_stdout(log):
            run_distill(cfg)
        runs.append((log.getvalue(), (root / "teacher_sft" / "model" / "config.json").stat().st_mtime_ns))
    return cfg, root, runs


@pytest.mark.ray
def test_fine_tuning_lowers_the_teachers_ce_on_the_train_rows(pipeline_with_sft, tiny_assets):
    cfg, root, _ = pipeline_with_sft
    before = mean_train_ce(tiny_assets.teacher_dir, cfg)
    after = mean_train_ce(root / "teacher_sft" / "model", cfg)
    assert after < before - 1.0, (before, after)  # 30 steps from a random init: far below chance
    plan = json.loads((root / "teacher_sft" / "train" / "plan.json").read_text())
    assert plan["plan"]["name"] == "sft" and plan["total_steps"] == 30
    assert {s["kd_weight"] for s in plan["plan"]["stages"]} == {0.0}  # references only


def _embeddings(model_dir: Path) -> torch.Tensor:
    return load_model(model_dir, dtype=torch.float32).get_input_embeddings().weight.detach()


@pytest.mark.ray
def test_later_stages_get_the_fine_tuned_teacher(pipeline_with_sft, tiny_assets):
    _, root, runs = pipeline_with_sft
    log, _ = runs[0]
    tuned = root / "teacher_sft" / "model"
    assert "[pipeline] teacher fine-tuning: starting" in log
    manifest = json.loads((root / "scores" / "manifest.json").read_text())
    assert manifest["models"]["teacher"] == {"kind": "local", "location": str(tuned.resolve()), "revision": None}
    # The cached teacher is the fine-tuned one: its head, and the KD the compared runs trained on.
    from safetensors.torch import load_file

    assert manifest["teacher_cache"]["form"] == "hidden"
    head = load_file(str(root / "scores" / "teacher_head.safetensors"))["weight"]
    torch.testing.assert_close(head, load_model(tuned, dtype=torch.float32).get_output_embeddings().weight.detach())
    pocl = _records(root / "runs" / "pocl" / "train" / "metrics.jsonl")
    kd_steps = [r["kd_loss"] for r in pocl if r["kd_weight"] > 0]
    assert kd_steps and all(v > 0 for v in kd_steps)
    # The compared run's student was cut from the fine-tuned teacher (lr 1e-12 leaves it as cut):
    # its embeddings are the fine-tuned teacher's, which the fine-tuning moved away from the original's.
    original, fine_tuned = _embeddings(tiny_assets.teacher_dir), _embeddings(tuned)
    assert not torch.allclose(original, fine_tuned, atol=1e-3)
    student = root / "runs" / "pocl" / "train" / "student"
    torch.testing.assert_close(_embeddings(student), fine_tuned, rtol=0, atol=1e-6)
    assert json.loads((root / "runs" / "pocl" / "eval" / "results.json").read_text())["model"] == str(student)
    # The teacher is evaluated as the preflight resolved it: its source record.
    teacher_eval = json.loads((root / "runs" / "teacher" / "eval" / "results.json").read_text())
    assert teacher_eval["model"] == {"kind": "local", "location": str(tuned), "revision": None}


@pytest.mark.ray
def test_fine_tuning_is_skipped_on_a_rerun(pipeline_with_sft):
    _, _, runs = pipeline_with_sft
    (_, first_mtime), (log, second_mtime) = runs
    assert "[pipeline] teacher fine-tuning: done already for this config, skipped" in log
    assert second_mtime == first_mtime
    # The later stages are keyed on the fine-tuned teacher, which did not change: skipped as well.
    assert "[pipeline] score: done already for this config, skipped" in log
    assert "[pipeline] eval [teacher]: done already for this config, skipped" in log


def test_tune_resolves_the_teacher_as_the_pipeline_does(tiny_assets, tmp_path, monkeypatch):
    from pocl_ray.tuning import tune

    class Resolved(Exception):
        pass

    def resolve(cfg, root, min_cpus=4):
        raise Resolved(cfg.pipeline.sft_teacher, root)

    monkeypatch.setattr(pocl_ray.teacher_prep, "resolve_teacher", resolve)
    cfg = sft_config(
        tiny_assets,
        tmp_path,
        **{
            "data.dev": str(tiny_assets.dev_path),
            "tune.search_space": {"curriculum.num_buckets": {"type": "grid", "values": [2]}},
        },
    )
    with pytest.raises(Resolved) as raised:
        tune(cfg)
    assert raised.value.args == (cfg.pipeline.sft_teacher, tmp_path.resolve())


def _records(path: Path) -> list[dict]:
    """metrics.jsonl's step records."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if not is_probe(r)]


@pytest.mark.ray
def test_every_stage_is_a_child_of_its_pipeline_run_in_the_trackers(pipeline_with_sft):
    """Both invocations log the whole run tree: the first logs the compared runs' training live (the
    coordinator's), the second (which skips every stage) from the stages' files."""
    from mlflow.tracking import MlflowClient

    _, root, _ = pipeline_with_sft
    root = root.resolve()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sftt")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`pocl_ray.kind` = 'pipeline'")
    assert len(parents) == 2
    parents = sorted(parents, key=lambda p: p.info.start_time)
    manifest = json.loads((root / "scores" / "manifest.json").read_text())
    for invocation, parent in enumerate(parents):
        assert (
            parent.info.status == "FINISHED" and parent.data.params["pipeline.compare.pocl.curriculum.plan"] == "pocl"
        )
        assert parent.data.params["models.teacher"] == str(root / "teacher_sft" / "model")  # the resolved config
        assert "report/report.md" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
        children = mlflow_children(client, parent.info.run_id)
        assert set(children) == {"teacher-sft", "score", "pocl", "teacher"}
        assert {c.info.status for c in children.values()} == {"FINISHED"}
        sft = _records(root / "teacher_sft" / "train" / "metrics.jsonl")
        assert mlflow_series(client, children["teacher-sft"].info.run_id, "train/loss") == {
            r["step"]: r["loss"] for r in sft
        }
        score = children["score"].data.metrics
        assert score["scoring/rows_scored"] == manifest["rows_scored"]
        assert score["scoring/bucket_1/rows"] == manifest["buckets"][1]["rows"]
        label = "pocl"
        child = children[label]
        records = _records(root / "runs" / label / "train" / "metrics.jsonl")
        for key in ("loss", "kd_loss", "ce_loss", "temperature", "kd_weight", "lr", "grad_norm", "data_wait"):
            assert mlflow_series(client, child.info.run_id, f"train/{key}") == {r["step"]: r[key] for r in records}
        assert mlflow_series(client, child.info.run_id, "train/samples") == {r["step"]: r["samples"] for r in records}
        # Each step logged once: live, or replayed, never both.
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(history) == len(records)
        if invocation == 0:
            # Live: every step reached MLflow before the training wrote selection.json (a replay
            # from the files would log them after it).
            selection_written = (root / "runs" / label / "train" / "selection.json").stat().st_mtime
            assert max(m.timestamp for m in history) <= 1000 * selection_written + 1
        assert child.data.params["curriculum.plan"] == label and child.data.params["plan.name"] == label
        results = json.loads((root / "runs" / label / "eval" / "results.json").read_text())
        assert child.data.metrics["eval/dev/rougeL"] == results["sets"]["dev"]["rougeL_mean"]
        teacher = json.loads((root / "runs" / "teacher" / "eval" / "results.json").read_text())
        assert children["teacher"].data.metrics["eval/dev/ce"] == teacher["sets"]["dev"]["ce_mean"]
    groups = sorted(p for p in (root / "tensorboard").iterdir())
    assert len(groups) == 2
    records = _records(root / "runs" / "pocl" / "train" / "metrics.jsonl")
    for group in groups:
        scalars = tensorboard_scalars(group / "pocl")
        assert scalars["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in records})
