"""Ray Tune sweeps: the search space and results as plain functions, then two real sweeps on local
Ray over the tiny assets (1 Train worker per trial, 2 steps per stage).

The 4-trial grid sweep writes into a bucket (moto's S3 server, conftest `s3`): it is interrupted
(SIGUSR1, Tune's own stop signal) once two trials finished, then run again: it must restore the Tune
experiment from the bucket with those two kept, not re-score, end with all four trials, and leave
nothing in the local working folder.
The ASHA sweep pits a sane learning rate against a wrecking one and must stop the latter at its
first rung (ASHA's clock is samples seen, the rungs checked to fall on the trials' report points).

Tune over Train V2 needs the State API (Train's placement-group cleaner watches the controller
through it), so this module starts its own Ray with the dashboard instead of `ray_local`.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import local_ray

from pocl_ray import storage
from pocl_ray.config import ConfigError, parse_config
from pocl_ray.curriculum import schedule
from pocl_ray.probes import is_probe
from pocl_ray.report import write_report
from pocl_ray.tuning import (
    TIME_ATTR,
    Budget,
    BudgetReport,
    _scheduler,
    best_config,
    best_trial,
    check_search_space,
    is_decision_point,
    param_space,
    plot_objective,
    sweep_budget,
    trial_config,
    trial_row,
)

GRID = {
    "curriculum.num_buckets": {"type": "grid", "values": [2, 4]},
    "curriculum.temperature_end": {"type": "grid", "values": [1.0, 2.0]},
}


def sweep_config(assets, out: Path, search_space: dict | None = None, **overrides):
    """A tiny POCL sweep: 1 Train worker per trial, 2 steps per stage, length-only scoring, 8 new tokens."""
    cfg = parse_config(
        {
            "name": "sw",
            "data": {
                "train": str(assets.train_path),
                "dev": str(assets.dev_path),
                "max_prompt_length": 96,
                "max_length": 128,
            },
            "models": {"teacher": str(assets.teacher_dir), "student": str(assets.student_dir)},
            "scoring": {"metrics": ["length"], "batch_size": 64},
            "curriculum": {"plan": "pocl", "num_buckets": 4, "steps_per_stage": 2, "temperature_start": 1.0},
            "training": {
                "num_workers": 1,
                "global_batch_size": 16,
                "micro_batch_size": 16,
                "lr": 1e-3,
                "min_lr": 1e-4,
                "checkpoint_every": 100,
                "max_failures": 0,
            },
            # Each stage end is a selection candidate: the student generates for the 60 dev rows. With
            # the eval defaults (512 new tokens, up to max_length) that cost 2.5 s a stage end, 0.3 s with 8.
            "eval": {"max_new_tokens": 8, "batch_size": 32},
            "tune": {"search_space": search_space or GRID, "max_concurrent_trials": 2},
            "output": {"dir": str(out)},
        }
    )
    return cfg.with_overrides(overrides) if overrides else cfg


# -- search space, checked before any Ray work -------------------------------------------------


def test_search_space_errors_name_the_path(tiny_assets, tmp_path):
    def check(space=None, **overrides):
        check_search_space(sweep_config(tiny_assets, tmp_path, space, **overrides))

    with pytest.raises(ConfigError, match=r"tune.search_space.curriculum.num_bucket = 2: .*no such config field"):
        check({"curriculum.num_bucket": {"type": "grid", "values": [2]}})
    with pytest.raises(
        ConfigError, match=r"(?s)tune.search_space.curriculum.num_buckets = 0: .*greater than or equal to 1"
    ):
        check({"curriculum.num_buckets": {"type": "choice", "values": [2, 0]}})
    with pytest.raises(ConfigError, match=r"tune.search_space.scoring.rrf_k: .*shared by every trial"):
        check({"scoring.rrf_k": {"type": "uniform", "low": 1, "high": 60}})
    with pytest.raises(ConfigError, match=r"tune.search_space.training.lr: search_alg 'grid' needs grid or choice"):
        check({"training.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}, **{"tune.search_alg": "grid"})
    with pytest.raises(ConfigError, match=r"search_alg 'optuna' samples values; use type 'choice'"):
        check(**{"tune.search_alg": "optuna"})
    with pytest.raises(ConfigError, match="tune.search_space is empty"):
        check(**{"tune.search_space": {}})
    with pytest.raises(ConfigError, match=r"tune.objective: 'dev_kd_loss' is measured on a dev set; set data.dev"):
        check(**{"data.dev": None})
    # Each value alone is valid (the base runs fsdp); a sharded teacher needs the fsdp strategy.
    clash = {
        "training.strategy": {"type": "grid", "values": ["fsdp", "ddp"]},
        "training.teacher_sharding": {"type": "grid", "values": ["replicate", "fsdp"]},
    }
    with pytest.raises(
        ConfigError, match=r"(?s)combination .*'training.strategy': 'ddp', 'training.teacher_sharding': 'fsdp'"
    ):
        check(clash, **{"training.strategy": "fsdp"})


def test_missing_search_package_is_a_config_error(tiny_assets, tmp_path):
    import importlib.util

    from pocl_ray.tuning import tune

    if importlib.util.find_spec("hyperopt") is not None:
        pytest.skip("hyperopt is installed")
    space = {"training.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}
    with pytest.raises(ConfigError, match=r"'hyperopt' needs the hyperopt package \(pip install hyperopt\)"):
        tune(sweep_config(tiny_assets, tmp_path, space, **{"tune.search_alg": "hyperopt"}))
    assert not (tmp_path / "scores").exists()


def test_checked_combinations_cover_the_grid(tiny_assets, tmp_path):
    checked = check_search_space(sweep_config(tiny_assets, tmp_path))
    assert sorted((c.curriculum.num_buckets, c.curriculum.temperature_end) for c in checked) == [
        (2, 1.0),
        (2, 2.0),
        (4, 1.0),
        (4, 2.0),
    ]


def test_param_space_maps_each_spec_type(tiny_assets, tmp_path):
    from ray.tune.search.sample import Categorical, Float, LogUniform

    space = {
        "curriculum.num_buckets": {"type": "grid", "values": [2, 4]},
        "kd.loss": {"type": "choice", "values": ["fkl", "rkl"]},
        "curriculum.kd_weight_start": {"type": "uniform", "low": 0.3, "high": 0.9},
        "training.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
    }
    tc = sweep_config(tiny_assets, tmp_path, space).tune
    got = param_space(tc)
    assert got["curriculum.num_buckets"] == {"grid_search": [2, 4]}
    assert isinstance(got["kd.loss"], Categorical) and got["kd.loss"].categories == ["fkl", "rkl"]
    assert isinstance(got["curriculum.kd_weight_start"], Float)
    assert (got["curriculum.kd_weight_start"].lower, got["curriculum.kd_weight_start"].upper) == (0.3, 0.9)
    assert isinstance(got["training.lr"].get_sampler(), LogUniform)
    discrete = {k: v for k, v in space.items() if v["type"] in ("grid", "choice")}
    grid_tc = sweep_config(tiny_assets, tmp_path, discrete, **{"tune.search_alg": "grid"}).tune
    assert param_space(grid_tc)["kd.loss"] == {"grid_search": ["fkl", "rkl"]}


def test_trial_and_best_configs(tiny_assets, tmp_path):
    cfg = sweep_config(tiny_assets, tmp_path).with_overrides(
        {"pipeline.compare": {"b": {"curriculum.plan": "baseline"}}}
    )
    params = {"curriculum.num_buckets": np.int64(2), "curriculum.temperature_end": np.float64(1.5)}
    trial = trial_config(cfg, params, "abc_00001", tmp_path / "tune" / "trials")
    assert (trial.curriculum.num_buckets, trial.curriculum.temperature_end) == (2, 1.5)
    assert trial.name == "sw-abc_00001" and trial.output.dir == str(tmp_path / "tune" / "trials" / "abc_00001")
    assert trial.pipeline.compare == {} and trial.data == cfg.data and trial.training == cfg.training
    best = best_config(cfg, params)
    assert best.output.dir == cfg.output.dir and best.name == "sw-best" and best.pipeline.compare == {}
    assert best.curriculum.num_buckets == 2 and best.tune == cfg.tune


def test_decision_points_are_reports_with_a_dev_loss_before_the_last():
    assert is_decision_point({"stage": 0, "stages_completed": 1, "dev_kd_loss": 3.0}, num_stages=4)  # stage end
    assert is_decision_point(
        {"stage": 1, "stages_completed": 1, "dev_kd_loss": 2.0}, num_stages=4
    )  # mid-stage checkpoint
    assert is_decision_point(
        {"stage": 3, "stages_completed": 3, "dev_kd_loss": 2.0}, num_stages=4
    )  # inside the last stage
    assert not is_decision_point({"stage": 3, "stages_completed": 4, "dev_kd_loss": 3.0}, num_stages=4)  # the run's end
    assert not is_decision_point({"stage": 1, "stages_completed": 1, "loss": 2.0}, num_stages=4)  # no dev set


def test_budget_report_forwards_samples_seen(monkeypatch):
    from ray.tune.integration.ray_train import TuneReportCallback

    sent = []
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)  # it refuses to exist outside a Tune trial
    monkeypatch.setattr(TuneReportCallback, "after_report", lambda self, ctx, metrics, ckpt: sent.append(metrics[0]))
    callback = BudgetReport(num_stages=4, global_batch_size=16)
    # Training's greedy dev ROUGE-L (checkpoint selection) must not pass for the dev_rougeL objective.
    callback.after_report(
        None, [{"step": 6, "stage": 1, "stages_completed": 1, "dev_kd_loss": 2.5, "dev_rougeL": 9.0}], None
    )
    callback.after_report(None, [{"step": 7, "stage": 1, "stages_completed": 1, "loss": 2.0}], None)  # no dev loss
    callback.after_report(None, [{"step": 20, "stage": 3, "stages_completed": 4, "dev_kd_loss": 1.0}], None)  # the end
    assert sent == [{"step": 6, "stage": 1, "stages_completed": 1, "dev_kd_loss": 2.5, TIME_ATTR: 96, "num_stages": 4}]


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def test_asha_compares_trials_at_equal_samples_not_stage_index(tiny_assets, tmp_path):
    from ray.tune.schedulers import TrialScheduler

    tc = sweep_config(tiny_assets, tmp_path, **{"tune.scheduler": "asha"}).tune
    scheduler = _scheduler(tc, Budget(grace=64, max_samples=256))
    assert (scheduler._time_attr, scheduler._metric, scheduler._max_t) == (TIME_ATTR, "dev_kd_loss", 256)
    four, two = _Trial("four_stages"), _Trial("two_stages")
    scheduler.on_trial_add(None, four)
    scheduler.on_trial_add(None, two)

    def report(trial, samples, stages_completed, loss):
        return scheduler.on_trial_result(
            None, trial, {TIME_ATTR: samples, "stages_completed": stages_completed, "dev_kd_loss": loss}
        )

    # 4 stages of 32 samples: a poor first stage (before the grace period), then 2.0 at 64 samples.
    assert report(four, 32, 1, 5.0) == TrialScheduler.CONTINUE
    assert report(four, 64, 2, 2.0) == TrialScheduler.CONTINUE
    # 2 stages of 64 samples: its first stage end (3.0) beats the other's first (5.0), but it is
    # measured against the other at the same 64 samples (2.0), and stopped.
    assert report(two, 64, 1, 3.0) == TrialScheduler.STOP
    rung_64 = dict(scheduler._trial_info["four_stages"]._rungs)[64]
    assert rung_64 == {"four_stages": -2.0, "two_stages": -3.0}


def test_sweep_budget_lays_rungs_on_report_points(tiny_assets, tmp_path):
    cfg = sweep_config(tiny_assets, tmp_path, **{"tune.scheduler": "asha", "training.checkpoint_every": 2})
    wide = cfg.with_overrides({"training.global_batch_size": 32, "training.micro_batch_size": 32})
    # Report intervals 32 (2 steps x 16) and 64 samples: the default grace is their common multiple.
    assert sweep_budget(cfg.tune, [(cfg, 8), (wide, 6)]) == Budget(grace=64, max_samples=192)
    assert sweep_budget(cfg.with_overrides({"tune.grace_samples": 96}).tune, [(cfg, 20)]).grace == 96
    with pytest.raises(
        ConfigError, match=r"tune.grace_samples \(48\) .*rung at 48 samples, not a multiple of the report interval 32"
    ):
        sweep_budget(cfg.with_overrides({"tune.grace_samples": 48}).tune, [(cfg, 20)])
    with pytest.raises(
        ConfigError, match=r"reduction_factor \(1.5\).*rung at 96 samples, not a multiple of the report interval 64"
    ):
        sweep_budget(
            cfg.with_overrides({"tune.grace_samples": 64, "tune.reduction_factor": 1.5}).tune, [(cfg, 20), (wide, 6)]
        )
    with pytest.raises(
        ConfigError, match=r"tune.grace_samples \(320\) leaves ASHA nothing to stop: the longest trial sees 320"
    ):
        sweep_budget(cfg.with_overrides({"tune.grace_samples": 320}).tune, [(cfg, 20)])


def test_rows_best_trial_plot_and_report_section(tmp_path):
    p = "curriculum.num_buckets"
    rows = [
        trial_row(
            "t0",
            {p: 2},
            {"finished": True, "dev_kd_loss": 2.0, "step": 8, "stages_completed": 2},
            None,
            "dev_kd_loss",
            2,
            tmp_path,
        ),
        trial_row(
            "t1",
            {p: 4},
            {"finished": True, "dev_kd_loss": 1.5, "step": 8, "stages_completed": 4},
            None,
            "dev_kd_loss",
            4,
            tmp_path,
        ),
        trial_row(
            "t2", {p: 4}, {"dev_kd_loss": 0.5, "step": 2, "stages_completed": 1}, None, "dev_kd_loss", 4, tmp_path
        ),
        trial_row("t3", {p: 8}, None, "ValueError: boom", "dev_kd_loss", None, tmp_path),
    ]
    frame = pd.DataFrame(rows)
    assert frame["status"].tolist() == ["finished", "finished", "stopped", "error"]
    assert frame["stopped_early"].tolist() == [False, False, True, False]
    assert math.isnan(frame.loc[3, "objective"]) and frame.loc[3, "steps"] == 0
    # A stopped trial's intermediate loss does not compete with finished trials.
    assert best_trial(frame, "dev_kd_loss")["trial_id"] == "t1"
    rouge = pd.DataFrame([{**r, "objective": v} for r, v in zip(rows, [30.0, 20.0, 50.0, math.nan])])
    assert best_trial(rouge, "dev_rougeL")["trial_id"] == "t0"
    with pytest.raises(
        RuntimeError, match="no trial finished with a dev_kd_loss: 1 trials, 1 errors; first error: ValueError: boom"
    ):
        best_trial(frame.iloc[3:], "dev_kd_loss")

    tune_dir = tmp_path / "tune"
    tc = parse_config(
        {
            "data": {"train": "x"},
            "models": {"teacher": "t"},
            "tune": {"search_space": {p: {"type": "grid", "values": [2, 4, 8]}}},
        }
    ).tune
    png = plot_objective(frame, tc, tune_dir / "objective.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frame.to_csv(tune_dir / "results.csv", index=False)
    # The run report's sweep section (table padding collapsed: the cells are what matters).
    lines = [" ".join(line.split()) for line in write_report(tmp_path).read_text().splitlines()]
    sweep = lines[lines.index("## Sweep") :]
    assert sweep[2].startswith("4 trials")
    assert any(line.startswith("| t2 | stopped | 4 |") for line in sweep)
    assert (tmp_path / "report" / "tune_objective.png").is_file()
    shutil.rmtree(tune_dir)
    assert "## Sweep" not in write_report(tmp_path).read_text()


# -- sweeps on local Ray -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_tune(s3):
    # Tune over Train needs the dashboard: without it, sweeps hung. Started after `s3`: its workers
    # reach the bucket through the endpoint and credentials `s3` put in the environment.
    yield from local_ray(include_dashboard=True)


def _finished_trials(experiment: str) -> list[str]:
    """Trials whose final result Tune has recorded (result.json lines are written by the driver)."""
    done = []
    for path in storage.list_files(experiment, "/result.json"):
        if any(json.loads(line).get("finished") for line in storage.read_text(path).splitlines() if line.strip()):
            done.append(path.split("/")[-2])
    return sorted(done)


def _csv(path) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(storage.read_text(path)), dtype={"trial_id": str})


def _interrupt_after(experiment: str, finished: int, stop: threading.Event) -> threading.Thread:
    """SIGUSR1 (Tune's stop signal, installed while Tuner.fit runs) once `finished` trials ended."""

    def watch():
        while not stop.wait(1.0):
            if len(_finished_trials(experiment)) >= finished:
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def grid_sweep(ray_tune, s3, tiny_assets, tmp_path_factory):
    """The 4-trial grid with output.dir in a bucket, interrupted after 2 finished trials and run again
    from an empty working folder; (cfg, result, log, kept, workdir, resumed): kept, the trials finished
    before the interruption; resumed, the trials the second run wrote objects under. Its trials train
    from one cached teacher (the hidden form), written by the sweep's one scoring pass."""
    from contextlib import redirect_stdout

    from pocl_ray.tuning import SweepInterrupted, tune

    root = f"{s3.bucket()}/grid"
    cfg = sweep_config(tiny_assets, root, **{"scoring.teacher_hidden": True, "kd.teacher": "cached"})
    experiment = f"{root}/tune/sweep"
    workdir = tmp_path_factory.mktemp("grid_cwd")
    log = io.StringIO()
    stop = threading.Event()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        watcher = _interrupt_after(experiment, 2, stop)
        try:
            with redirect_stdout(log), pytest.raises(SweepInterrupted, match="run the same command again to resume"):
                tune(cfg)
        finally:
            stop.set()
            watcher.join()
        kept = _finished_trials(experiment)
        since = len(s3.requests)
        with redirect_stdout(log):
            result = tune(cfg)
    trials = f"/{root.removeprefix('s3://')}/tune/trials/"
    resumed = {
        path.removeprefix(trials).split("/")[0]
        for method, path, _ in s3.requests[since:]
        if method == "PUT" and path.startswith(trials)
    } - {""}  # "" is the trials/ folder's own marker object
    return cfg, result, log.getvalue(), kept, workdir, resumed


@pytest.mark.ray
def test_grid_sweep_runs_every_trial_with_its_settings(grid_sweep):
    cfg, result, _, _, _, _ = grid_sweep
    frame = _csv(result.results_csv)
    assert len(frame) == 4 and set(frame["status"]) == {"finished"} and not frame["stopped_early"].any()
    assert sorted(zip(frame["curriculum.num_buckets"], frame["curriculum.temperature_end"])) == [
        (2, 1.0),
        (2, 2.0),
        (4, 1.0),
        (4, 2.0),
    ]
    for _, row in frame.iterrows():
        n, t_end = int(row["curriculum.num_buckets"]), float(row["curriculum.temperature_end"])
        assert row.output_dir == f"{cfg.output.dir}/tune/trials/{row.trial_id}"
        lines = storage.read_text(f"{row.output_dir}/train/metrics.jsonl").splitlines()
        records = [r for r in map(json.loads, lines) if not is_probe(r)]
        # The trial's own plan ran: n stages of 2 steps, temperatures rising from 1 to its T_end.
        assert [r["stage"] for r in records] == [s for s in range(n) for _ in range(2)]
        temps = schedule(1.0, t_end, n)
        assert all(r["temperature"] == pytest.approx(temps[r["stage"]]) for r in records)
        assert {r["pool_rows"] for r in records if r["stage"] == n - 1} == {records[-1]["pool_rows"]}
        assert row.num_stages == n and row.stages_completed == n and row.steps == 2 * n
        assert np.isfinite(row.objective) and row.objective == pytest.approx(row.dev_kd_loss)
    assert result.best_objective == frame["objective"].min()
    assert storage.read_bytes(result.plot_path)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
def test_grid_sweep_writes_everything_into_the_bucket(grid_sweep):
    cfg, result, _, _, workdir, _ = grid_sweep
    tune_dir = f"{cfg.output.dir}/tune"
    assert result.output_dir == tune_dir and result.results_csv == f"{tune_dir}/results.csv"
    names = {p.removeprefix(f"{tune_dir}/") for p in storage.list_files(tune_dir)}
    assert {"results.csv", "best.yaml", "objective.png", "ended.jsonl", ".stage.json"} <= names
    trials = _csv(result.results_csv)["trial_id"].tolist()
    ended = [json.loads(line) for line in storage.read_text(f"{tune_dir}/ended.jsonl").splitlines()]
    assert sorted(e["trial_id"] for e in ended) == sorted(trials) and {e["ended"] for e in ended} == {"complete"}
    for t in trials:
        # Tune's experiment (storage_path in the bucket) and the trial's own run, side by side.
        assert {f"sweep/{t}/result.json", f"trials/{t}/trial.json", f"trials/{t}/train/metrics.jsonl"} <= names
        assert f"trials/{t}/train/student/model.safetensors" in names
    assert any(n.startswith("sweep/experiment_state") for n in names), sorted(names)
    assert storage.is_file(f"{cfg.output.dir}/scores/manifest.json")
    assert not any(workdir.iterdir()), list(workdir.iterdir())


@pytest.mark.ray
def test_grid_sweep_scores_once_and_resumes_keeping_finished_trials(grid_sweep):
    cfg, result, log, kept, _, resumed = grid_sweep
    assert log.count("[pipeline] score: starting") == 1
    assert log.count("[pipeline] score: done already") == 1
    manifest = storage.read_json(f"{cfg.output.dir}/scores/manifest.json")
    assert manifest["teacher_cache"]["form"] == "hidden"  # the one pass every trial trained from
    assert f"[tune] resuming the interrupted sweep in {cfg.output.dir}/tune/sweep" in log
    assert len(kept) == 2
    # Not trained again: the second run wrote under the other two trials' folders only.
    assert resumed == set(_csv(result.results_csv)["trial_id"]) - set(kept) and len(resumed) == 2


@pytest.mark.ray
def test_best_yaml_is_a_runnable_config_of_the_best_trial(grid_sweep):
    cfg, result, _, _, _, _ = grid_sweep
    best = parse_config(yaml.safe_load(storage.read_text(result.best_config_path)))
    frame = _csv(result.results_csv)
    row = frame.set_index("trial_id").loc[result.best_trial_id]
    assert best.curriculum.num_buckets == row["curriculum.num_buckets"]
    assert best.curriculum.temperature_end == row["curriculum.temperature_end"]
    assert best.output.dir == cfg.output.dir and best.data == cfg.data and best.training == cfg.training


@pytest.mark.ray
def test_asha_stops_the_clearly_worse_trial_and_rouge_picks_the_best(grid_sweep, tiny_assets, tmp_path):
    """Also logged to MLflow (the default SQLite store beside the outputs): one run per trial, through
    Tune's own MLflowLoggerCallback, under the sweep's run; the process's MLFLOW_TRACKING_URI is left
    as it was."""
    from mlflow.tracking import MlflowClient

    from pocl_ray.tuning import tune

    first, _, _, _, _, _ = grid_sweep
    storage.copy_folder(f"{first.output.dir}/scores", tmp_path / "scores")  # the same scoring pass
    # Sequential trials in grid order: the sane learning rate sets the first rung (its dev KD loss
    # after 32 samples, one report interval), the wrecking one falls below it there. The objective
    # is dev ROUGE-L, generated after training.
    space = {"training.lr": {"type": "grid", "values": [1e-3, 0.5]}}
    cfg = sweep_config(
        tiny_assets,
        tmp_path,
        space,
        **{
            "curriculum.num_buckets": 2,
            "training.checkpoint_every": 2,
            "tune.scheduler": "asha",
            "tune.max_concurrent_trials": 1,
            "tune.objective": "dev_rougeL",
            "eval.seeds": [1],
            "scoring.teacher_hidden": True,
            "kd.teacher": "cached",
            "output.trackers": ["mlflow"],
        },
    )
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    result = tune(cfg)
    # Ray's MLflow callback exports the sweep's store as MLFLOW_TRACKING_URI; a later run in this
    # process (or a job it submits) must not log there.
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri
    frame = pd.read_csv(result.results_csv).set_index("training.lr")
    good, bad = frame.loc[1e-3], frame.loc[0.5]
    assert good["status"] == "finished" and good["stages_completed"] == 2 and not good["stopped_early"]
    assert bad["status"] == "stopped" and bool(bad["stopped_early"])
    assert (
        bad["stages_completed"] == 1
        and bad["num_stages"] == 2
        and bad["steps"] == 2
        and bad["dev_kd_loss"] > good["dev_kd_loss"]
    )
    assert bad["samples_seen"] == 32 and good["samples_seen"] == 64  # 2 and 4 steps of 16 rows
    # Only a finished trial is evaluated; its objective is the dev set's ROUGE-L from evaluation.
    evaluated = json.loads((Path(good["output_dir"]) / "eval" / "dev" / "results.json").read_text())
    assert good["objective"] == pytest.approx(evaluated["sets"]["dev"]["rougeL_mean"])
    assert evaluated["sets"]["dev"]["rows"] == tiny_assets.num_dev and 0 <= good["objective"] <= 100
    assert math.isnan(bad["objective"]) and not (Path(bad["output_dir"]) / "eval").exists()
    assert result.best_objective == pytest.approx(good["objective"]) and result.objective == "dev_rougeL"

    client = MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.name)
    (sweep,) = client.search_runs([experiment.experiment_id], filter_string="tags.`pocl_ray.kind` = 'sweep'")
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["best/dev_rougeL"] == result.best_objective
    assert {a.path for a in client.list_artifacts(sweep.info.run_id, "tune")} >= {"tune/results.csv", "tune/best.yaml"}
    trials = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'"
    )
    by_lr = {float(t.data.params["training.lr"]): t for t in trials}
    assert len(trials) == 2 and set(by_lr) == {1e-3, 0.5}
    assert by_lr[1e-3].data.metrics["dev_rougeL"] == pytest.approx(good["objective"])
    assert "dev_rougeL" not in by_lr[0.5].data.metrics  # stopped by ASHA: never evaluated
    assert by_lr[0.5].data.metrics["dev_kd_loss"] == pytest.approx(bad["dev_kd_loss"])
