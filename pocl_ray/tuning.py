"""Ray Tune sweeps over the curriculum: one scoring pass, one Ray Train run per trial.

Scores are stored, buckets are derived: the sweep scores DIR/scores once (skipped when
already done for this config) and every trial re-cuts its buckets from the stored ranks, so the
search space may change anything that training reads (curriculum, kd, training, eval) but nothing
the scoring pass depends on.

Per trial, a driver function (`run_trial`, the Tune trainable) builds the trial's RunConfig from
the sampled dotted-path values, with its own output directory DIR/tune/trials/<trial id> and Train
run name, and calls `training.driver.train`, which builds the TorchTrainer: the trial's resources are its
own Train workers (training.num_workers, GPUs when training.use_gpu) plus a small CPU share for the
driver function (tune.cpus_per_trial). `Tuner(trainer)` is not used: Train V2 refuses it.

Training reports reach Tune through `BudgetReport`, Ray's Train-to-Tune report callback limited to
the reports that carry a dev KD loss (every checkpoint: each training.checkpoint_every steps and
each stage end) before the run's last one, with `samples_seen` (optimizer steps x
global_batch_size) added. ASHA's clock is `samples_seen`, not the stage count: trials whose plans
cut different bucket counts or intervals reach their first stage end after very different budgets,
so stage k of one is no fair match for stage k of another. Its rungs (tune.grace_samples x
reduction_factor^k samples) are checked to fall on every trial's checkpoint steps, so each trial is
recorded at a rung exactly at the rung's budget. The report of a run's last step is held back, so
ASHA never stops a trial whose training is done (only the student's export, and the objective,
remain). With the dev_rougeL objective ASHA still ranks trials by their dev KD loss, the one signal
there is during training; the objective itself (ROUGE-L of generations on data.dev) is computed when
a trial's training ends, and picks the best trial.

Outputs in DIR/tune/:
  results.csv       one row per trial: trial_id, status (finished / stopped / error), the searched
                    parameters, objective, dev_kd_loss, steps, samples_seen, stages_completed,
                    num_stages, stopped_early, error, output_dir
  best.yaml         the best finished trial's full run config (output.dir = DIR, so `pocl-ray run`
                    reuses the sweep's scoring pass; pipeline.compare cleared: one run)
  objective.png     objective against each searched parameter
  ended.jsonl       the trials that ended (finished, stopped or failed), as Tune reported them
  sweep/            the Tune experiment
  trials/<id>/      each trial's run: trial.json (its parameters), train/, eval/dev/ (dev_rougeL only)

With `output.trackers`, the sweep is one parent run (`tracking.start`, its config as parameters and
results.csv, best.yaml and objective.png as artifacts) and Ray Tune's own logger callbacks log each
trial as one run under it (`tracking.tune_callbacks`): its searched parameters and every result it
reported, the objective in its last.

Re-running the same sweep (same config fingerprint) after an interruption restores the Tune
experiment: ended trials are kept, unfinished ones start again and their Train runs resume from
their last checkpoint. Tune does not save scheduler state, so after a restore ASHA's rungs start
empty (trials ended before the interruption no longer set its cut-offs). A finished sweep is not
run again; a changed config clears DIR/tune and starts over (pipeline_steps.run_pipeline_step).

DIR may be a bucket (s3://, gs://, abfs://): the Tune experiment's storage_path is DIR/tune/sweep
there (through storage.py's filesystem), the trials' runs, ended.jsonl, results.csv, objective.png and
best.yaml are written there, and an interrupted sweep is restored from it; so is the teacher prepared or
fine-tuned (teacher_prep). The trackers' default stores need a local DIR, else their settings (tracking).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from pocl_ray import preflight, storage, tracked, tracking
from pocl_ray.config import SHARED_SECTIONS, ConfigError, ParamSpec, RunConfig, TuneConfig, is_uri, parse_config
from pocl_ray.curriculum import Plan
from pocl_ray.data import python_value
from pocl_ray.pipeline_steps import SCORE_KEYS, TRAIN_KEYS, fingerprint, run_pipeline_step
from pocl_ray.ray_session import init_ray

SWEEP_NAME = "sweep"
# Sections a trial may not change: the shared ones, and the sweep's own settings and name.
FIXED_SECTIONS = (*SHARED_SECTIONS, "tune", "name")
MODES = {"dev_kd_loss": "min", "dev_rougeL": "max"}
# ASHA's clock: training rows seen, the budget trials are compared at (module doc).
TIME_ATTR = "samples_seen"
# Training's own greedy dev ROUGE-L (checkpoint selection) has the objective's name; the objective is
# the finished student's evaluation, so training reports never carry it to Tune.
FINAL_ONLY = ("dev_rougeL",)
# Discrete combinations validated one by one before any Ray work; above it, each value alone.
MAX_CHECKED_COMBINATIONS = 4096
DEV_SET = "dev"


# ---------------------------------------------------------------------------------------------
# Search space (pure)


def _candidates(spec: ParamSpec) -> list[Any]:
    """Values that stand for a spec when validating: every discrete value, or both bounds."""
    if spec.type in ("grid", "choice"):
        assert spec.values is not None  # ParamSpec's validator: grid and choice specs have values
        return list(spec.values)
    return [spec.low, spec.high]


def check_search_space(cfg: RunConfig) -> list[RunConfig]:
    """Validate the sweep before any Ray work; returns the configs of the checked combinations.

    Every path must name a config field outside FIXED_SECTIONS and every value must validate
    there. When the discrete combinations are few (MAX_CHECKED_COMBINATIONS), each one is
    validated as a whole, so values that only clash together (a batch size against a worker
    count) are reported before any trial starts.
    """
    tc = cfg.tune
    if not tc.search_space:
        raise ConfigError("tune.search_space is empty: map at least one dotted config path to a spec")
    if cfg.data.dev is None:
        raise ConfigError(f"tune.objective: {tc.objective!r} is measured on a dev set; set data.dev")
    searcher_alg = tc.search_alg in ("optuna", "hyperopt")
    for path, spec in tc.search_space.items():
        if path.split(".")[0] in FIXED_SECTIONS:
            raise ConfigError(
                f"tune.search_space.{path}: {FIXED_SECTIONS} are shared by every trial (one scoring pass, "
                "one sweep layout); sweep curriculum, kd, training or eval settings"
            )
        if tc.search_alg == "grid" and spec.type not in ("grid", "choice"):
            raise ConfigError(
                f"tune.search_space.{path}: search_alg 'grid' needs grid or choice specs, got {spec.type!r}"
            )
        if searcher_alg and spec.type == "grid":
            raise ConfigError(
                f"tune.search_space.{path}: search_alg {tc.search_alg!r} samples values; "
                "use type 'choice' instead of 'grid'"
            )
        for value in _candidates(spec):
            try:
                cfg.with_overrides({path: value})
            except ConfigError as err:
                raise ConfigError(f"tune.search_space.{path} = {value!r}: {err}") from None

    paths = list(tc.search_space)
    grid = [_candidates(tc.search_space[p]) for p in paths]
    if math.prod(len(values) for values in grid) > MAX_CHECKED_COMBINATIONS:
        return [cfg.with_overrides({p: v}) for p, values in zip(paths, grid) for v in values]
    checked = []
    for combo in itertools.product(*grid):
        params = dict(zip(paths, combo))
        try:
            checked.append(cfg.with_overrides(params))
        except ConfigError as err:
            raise ConfigError(f"tune.search_space: the combination {params} is not a valid config:\n{err}") from None
    return checked


def param_space(tc: TuneConfig) -> dict[str, Any]:
    """Tune's param_space, keyed by dotted config path. With search_alg 'grid' choices are crossed too."""
    from ray import tune

    space = {}
    for path, spec in tc.search_space.items():
        if spec.type in ("grid", "choice"):
            assert spec.values is not None  # ParamSpec's validator: grid and choice specs have values
            grid = spec.type == "grid" or tc.search_alg == "grid"
            space[path] = tune.grid_search(list(spec.values)) if grid else tune.choice(list(spec.values))
            continue
        assert spec.low is not None and spec.high is not None  # ParamSpec's validator: ranges have both
        if spec.type == "uniform":
            space[path] = tune.uniform(spec.low, spec.high)
        else:
            space[path] = tune.loguniform(spec.low, spec.high)
    return space


def trial_config(cfg: RunConfig, params: Mapping[str, Any], trial_id: str, trials_dir: str | Path) -> RunConfig:
    """The trial's run: the sweep's config with the sampled values, its own output dir and run name."""
    overrides = {p: python_value(v) for p, v in params.items()}
    return cfg.with_overrides(
        {
            **overrides,
            "name": f"{cfg.name}-{trial_id}",
            "output.dir": storage.join(trials_dir, trial_id),
            "pipeline.compare": {},
        }
    )


def dev_eval_config(cfg: RunConfig) -> RunConfig:
    """The trial config that evaluates on data.dev alone (the dev_rougeL objective)."""
    return cfg.with_overrides({"eval.sets": [{"name": DEV_SET, "path": cfg.data.dev}]})


def best_config(cfg: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """A full run config for the best trial, runnable with `pocl-ray run` in the sweep's own
    output dir: its scoring fingerprint is the sweep's, so the scoring pass is reused."""
    overrides = {p: python_value(v) for p, v in params.items()}
    return cfg.with_overrides({**overrides, "name": f"{cfg.name}-best", "pipeline.compare": {}})


# ---------------------------------------------------------------------------------------------
# Results (pure)


def trial_row(
    trial_id: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    error: str | None,
    objective: str,
    num_stages: int | None,
    output_dir: str | Path,
) -> dict[str, Any]:
    """One results.csv row from a trial's last reported metrics (None when it reported nothing).

    A trial that reported `finished` ran its whole plan; one that ended without it and without an
    error was stopped early by the scheduler.
    """
    metrics = metrics or {}
    finished = bool(metrics.get("finished"))
    status = "error" if error else "finished" if finished else "stopped"
    value = metrics.get(objective)
    return {
        "trial_id": trial_id,
        "status": status,
        **{p: python_value(v) for p, v in params.items()},
        "objective": float(value) if value is not None else math.nan,
        "dev_kd_loss": float(metrics["dev_kd_loss"]) if metrics.get("dev_kd_loss") is not None else math.nan,
        "steps": int(metrics.get("step", 0)),
        "samples_seen": int(metrics.get(TIME_ATTR, 0)),
        "stages_completed": int(metrics.get("stages_completed", 0)),
        "num_stages": num_stages,
        "stopped_early": status == "stopped",
        "error": error or "",
        "output_dir": str(output_dir),
    }


def best_trial(frame: pd.DataFrame, objective: str) -> pd.Series:
    """The finished trial with the best objective (min for losses, max for ROUGE-L)."""
    done = frame[(frame["status"] == "finished") & frame["objective"].notna()]
    if done.empty:
        errors = frame.loc[frame["status"] == "error", "error"].tolist()
        raise RuntimeError(
            f"no trial finished with a {objective}: {len(frame)} trials, "
            f"{(frame['status'] == 'error').sum()} errors" + (f"; first error: {errors[0]}" if errors else "")
        )
    index = done["objective"].idxmin() if MODES[objective] == "min" else done["objective"].idxmax()
    return done.loc[index]


def plot_objective(frame: pd.DataFrame, tc: TuneConfig, path: str | Path) -> str | Path:
    """Objective against each searched parameter; hollow markers are trials stopped early, at the
    value they had when stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(tc.search_space)
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.4), squeeze=False)
    for ax, param in zip(axes[0], params):
        spec = tc.search_space[param]
        values = frame[param]
        numeric = spec.type in ("uniform", "loguniform") or all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        )
        if numeric:
            x = values.astype(float).to_numpy()
            if spec.type in ("grid", "choice"):
                ax.set_xticks(sorted(set(x[np.isfinite(x)])))
        else:
            labels = sorted({str(v) for v in values})
            x = np.array([labels.index(str(v)) for v in values], dtype=float)
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        stopped = frame["stopped_early"].to_numpy(dtype=bool)
        y = frame["objective"].to_numpy(dtype=float)
        ax.scatter(x[~stopped], y[~stopped], color="C0", label="finished")
        if stopped.any():
            ax.scatter(
                x[stopped], y[stopped], facecolors="none", edgecolors="C3", label="stopped early (value at the stop)"
            )
        if spec.type == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(tc.objective)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue(), "output.dir")
    return storage.as_path(path)


# ---------------------------------------------------------------------------------------------
# Ray shell


def is_decision_point(metrics: Mapping[str, Any], num_stages: int) -> bool:
    """Whether a training report is one a scheduler may act on: it has a dev KD loss (checkpoints
    do, when data.dev is set) and it is not the last stage's end. That report is held back so a
    scheduler never stops a trial whose training is done (its result reaches Tune from
    `run_trial`, with the objective, once the student is saved)."""
    return metrics.get("dev_kd_loss") is not None and metrics.get("stages_completed", num_stages) < num_stages


class BudgetReport(TuneReportCallback):
    """Ray's Train-to-Tune report callback, forwarding only the reports `is_decision_point` accepts,
    without FINAL_ONLY keys, with the samples seen (ASHA's clock) and the trial's stage count added
    (results.csv takes it from Tune's results, on the driver)."""

    def __init__(self, num_stages: int, global_batch_size: int):
        super().__init__()
        self.num_stages = num_stages
        self.global_batch_size = global_batch_size

    def after_report(self, run_context, metrics, checkpoint):
        if is_decision_point(metrics[0], self.num_stages):
            kept = {k: v for k, v in metrics[0].items() if k not in FINAL_ONLY}
            report = {**kept, TIME_ATTR: metrics[0]["step"] * self.global_batch_size, "num_stages": self.num_stages}
            super().after_report(run_context, [report], checkpoint)


def run_trial(params: dict, *, base: dict, models: dict, scores_dir: str, trials_dir: str) -> None:
    """The Tune trainable: train one trial's config (resuming its Train run if it has one), then
    report its final metrics and objective. `models`: the sweep's models as its driver resolved them
    (`preflight.to_wire`)."""
    from ray import tune

    from pocl_ray.training.driver import run_plan, train

    cfg = parse_config(base)
    trial_id = tune.get_context().get_trial_id()
    trial_cfg = trial_config(cfg, params, trial_id, trials_dir)
    out = trial_cfg.output.dir
    storage.write_json(
        storage.join(out, "trial.json"),
        {"trial_id": trial_id, "params": {p: python_value(v) for p, v in params.items()}},
        "output.dir",
    )
    sources = preflight.model_sources(trial_cfg, preflight.from_wire(models))
    num_stages = len(run_plan(trial_cfg, sources).stages)
    gbs = trial_cfg.training.global_batch_size
    result = train(trial_cfg, scores_dir=scores_dir, callbacks=[BudgetReport(num_stages, gbs)], sources=sources)
    final = {
        "step": result.steps,
        TIME_ATTR: result.steps * gbs,
        "stages_completed": result.stages_completed,
        "num_stages": num_stages,
        "dev_kd_loss": result.metrics.get("dev_kd_loss"),
        "finished": True,
    }
    if cfg.tune.objective == "dev_rougeL":
        from pocl_ray.evaluation import evaluate

        evaluated = evaluate(
            dev_eval_config(trial_cfg), result.student_dir, output_dir=out, label=DEV_SET, sources=sources
        )
        final["dev_rougeL"] = evaluated.results["sets"][DEV_SET]["rougeL_mean"]
    tune.report(final)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def report_interval(cfg: RunConfig) -> int:
    """Samples between a trial's dev-KD-loss reports: one checkpoint interval."""
    return cfg.training.checkpoint_every * cfg.training.global_batch_size


@dataclass(frozen=True)
class Budget:
    """What ASHA's rungs are laid on: the grace period and the largest trial budget, in samples."""

    grace: int
    max_samples: int


def sweep_budget(tc: TuneConfig, trials: list[tuple[RunConfig, int]]) -> Budget:
    """ASHA's grace period and max_t in samples from (config, total steps) of the checked trials.

    Every rung below the largest budget must be a multiple of every trial's report interval, so a
    trial reports its dev loss exactly at each rung it reaches (module doc); otherwise a ConfigError
    names tune.grace_samples with the value that would fit.
    """
    intervals = sorted({report_interval(c) for c, _ in trials})
    common = math.lcm(*intervals)
    grace = tc.grace_samples or common
    max_samples = max(steps * c.training.global_batch_size for c, steps in trials)
    if grace >= max_samples:
        raise ConfigError(
            f"tune.grace_samples ({grace}) leaves ASHA nothing to stop: the longest trial sees {max_samples} samples"
        )
    rung = float(grace)
    while rung < max_samples:
        off = [i for i in intervals if not float(rung / i).is_integer()]
        if off:
            raise ConfigError(
                f"tune.grace_samples ({grace}) x tune.reduction_factor ({tc.reduction_factor})^k gives a rung at "
                f"{rung:g} samples, not a multiple of the report interval {off[0]} (training.checkpoint_every x "
                f"global_batch_size), so trials would be compared at different budgets; use a multiple of {common} "
                "and an integer reduction_factor"
            )
        rung *= tc.reduction_factor
    return Budget(grace=grace, max_samples=max_samples)


def _scheduler(tc: TuneConfig, budget: Budget | None):
    """FIFO, or ASHA on samples seen (budget: from `sweep_budget`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tc.scheduler == "fifo":
        return FIFOScheduler()
    assert budget is not None, "ASHA runs on the sweep's budget (sweep_budget)"
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric="dev_kd_loss",
        mode="min",
        grace_period=budget.grace,
        max_t=budget.max_samples,
        reduction_factor=tc.reduction_factor,
        stop_last_trials=False,
    )


def _search_alg(tc: TuneConfig):
    import importlib.util

    from ray.tune.search import BasicVariantGenerator

    if tc.search_alg in ("random", "grid"):
        # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in; it takes it here.
        return BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)
    if importlib.util.find_spec(tc.search_alg) is None:
        raise ConfigError(
            f"tune.search_alg: {tc.search_alg!r} needs the {tc.search_alg} package (pip install {tc.search_alg})"
        )
    mode = MODES[tc.objective]
    if tc.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=tc.objective, mode=mode, seed=tc.seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(metric=tc.objective, mode=mode, random_state_seed=tc.seed)


@contextmanager
def _tune_env() -> Iterator[None]:
    """Environment for the Tune run, restored afterwards.

    RAY_CHDIR_TO_TRIAL_DIR=0 (propagated to the trial actors by Tune): a trial resolves relative
    config paths like every other command does, not against Tune's trial folder.
    TUNE_DISABLE_STRICT_METRIC_CHECKING=1: stage reports carry the dev KD loss only, the final
    report carries the objective too; Tune would otherwise demand every metric in every report.
    MLFLOW_TRACKING_URI is put back too: Ray's MLflowLoggerCallback (output.trackers) calls
    mlflow.set_tracking_uri, which exports it, and a later run in this process, or a process it
    starts, would then log into the sweep's store instead of its own (`tracking.settings` reads it).
    """
    wanted = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    saved = {k: os.environ.get(k) for k in (*wanted, "MLFLOW_TRACKING_URI")}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SweepInterrupted(RuntimeError):
    """The Tune run stopped before every trial ended; running the sweep again resumes it."""


class EndedTrials(Callback):
    """Appends each trial that ended (ran its plan, was stopped by the scheduler, or failed) to
    a JSONL file in the driver (in a bucket: the object rewritten whole, object stores have no append).

    After an interruption Tune marks the trials it had to stop TERMINATED in the ResultGrid, like
    those the scheduler stopped (only its saved experiment state keeps them RUNNING, to be
    resumed); this record tells the two apart, across resumes too.
    """

    def __init__(self, path: str):
        self.path = path

    def _record(self, trial, how: str) -> None:
        before = storage.read_text(self.path, "output.dir") if storage.is_file(self.path, "output.dir") else ""
        line = json.dumps({"trial_id": trial.trial_id, "ended": how})
        storage.write_text(self.path, before + line + "\n", "output.dir")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "complete")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "error")


def ended_trials(path: str | Path) -> set[str]:
    if not storage.is_file(path, "output.dir"):
        return set()
    lines = storage.read_text(path, "output.dir").splitlines()
    return {json.loads(line)["trial_id"] for line in lines if line.strip()}


def _experiment_storage(tune_dir: str) -> tuple[str, Any]:
    """Tune's (storage_path, storage_filesystem) for tune_dir: a bucket through storage.py's own
    filesystem (the endpoint and credentials every other output uses), a local folder as a path."""
    if not is_uri(tune_dir):
        return tune_dir, None
    filesystem, path = storage.resolve(tune_dir)
    return path, filesystem


def _sweep(
    cfg: RunConfig,
    sources: preflight.Sources,
    root: str | Path,
    scores_dir: str | Path,
    budget: Budget | None,
    callbacks: list,
) -> None:
    """Run (or resume) the Tune experiment, then write results.csv, best.yaml and objective.png.
    `callbacks`: more Tune callbacks (the trackers'); a resumed sweep keeps those it started with."""
    from ray import tune

    tc = cfg.tune
    tune_dir = storage.join(root, "tune")
    trials_dir = storage.join(tune_dir, "trials")
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=cfg.model_dump(mode="json"),
            models=preflight.to_wire(sources),
            scores_dir=str(scores_dir),
            trials_dir=trials_dir,
        ),
        {"CPU": tc.cpus_per_trial},
    )
    storage_path, filesystem = _experiment_storage(tune_dir)
    experiment = f"{storage_path}/{SWEEP_NAME}"
    ended_path = storage.join(tune_dir, "ended.jsonl")
    with _tune_env():
        if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
            print(f"[tune] resuming the interrupted sweep in {storage.join(tune_dir, SWEEP_NAME)}", flush=True)
            tuner = tune.Tuner.restore(
                experiment,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=filesystem,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(tc),
                tune_config=tune.TuneConfig(
                    num_samples=tc.num_samples,
                    scheduler=_scheduler(tc, budget),
                    search_alg=_search_alg(tc),
                    max_concurrent_trials=None if tc.search_alg in ("random", "grid") else tc.max_concurrent_trials,
                    trial_dirname_creator=_trial_dirname,
                    trial_name_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=SWEEP_NAME,
                    storage_path=storage_path,
                    storage_filesystem=filesystem,
                    failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[EndedTrials(ended_path), *callbacks],
                ),
            )
        grid = tuner.fit()
    results = [grid[i] for i in range(len(grid))]  # ResultGrid is a sequence by __getitem__, unknown to mypy
    ended = ended_trials(ended_path)
    unfinished = [r for r in results if Path(r.path).name not in ended]
    if unfinished:
        raise SweepInterrupted(
            f"the sweep stopped with {len(unfinished)} of {len(grid)} trials unfinished; "
            "run the same command again to resume it (finished trials are kept)"
        )

    rows, params_of = [], {}
    for result in results:
        trial_id = Path(result.path).name
        trial_dir = storage.join(trials_dir, trial_id)
        params = result.config
        if params is None and storage.is_file(storage.join(trial_dir, "trial.json")):
            params = storage.read_json(storage.join(trial_dir, "trial.json"), "output.dir")["params"]
        params = {p: (params or {}).get(p) for p in tc.search_space}
        params_of[trial_id] = params
        error = str(result.error).strip().splitlines()[-1] if result.error else None
        num_stages = (result.metrics or {}).get("num_stages")
        rows.append(trial_row(trial_id, params, result.metrics, error, tc.objective, num_stages, trial_dir))
    frame = pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)
    storage.write_text(storage.join(tune_dir, "results.csv"), frame.to_csv(index=False), "output.dir")
    plot_objective(frame, tc, storage.join(tune_dir, "objective.png"))

    best = best_trial(frame, tc.objective)
    best_path = storage.join(tune_dir, "best.yaml")  # --config reads a local file
    header = (
        f"# Best trial {best['trial_id']} of the sweep in {tune_dir}: {tc.objective} = {best['objective']:.6g}\n"
        f"# swept: {json.dumps(params_of[best['trial_id']])}\n"
        f"# run it with: pocl-ray run --config {best_path}" + (" (a local copy of it)\n" if is_uri(best_path) else "\n")
    )
    best_yaml = header + best_config(cfg, params_of[best["trial_id"]]).to_yaml()
    storage.write_text(best_path, best_yaml, "output.dir")


@dataclass(frozen=True)
class TuneResult:
    """Paths in output.dir's own form: Paths for a local folder, URIs for a bucket."""

    output_dir: str | Path  # DIR/tune
    results_csv: str | Path
    best_config_path: str | Path
    plot_path: str | Path
    best_trial_id: str
    best_objective: float
    objective: str
    trials: pd.DataFrame  # results.csv


def _total_steps(plans: list[tuple[RunConfig, Plan]], scores_dir: str | Path) -> list[tuple[RunConfig, int]]:
    """(config, planned optimizer steps) of every checked combination; each plan must cut the scored
    rows into non-empty steps."""
    from pocl_ray.curriculum import stage_specs
    from pocl_ray.scores import load_manifest

    num_rows = load_manifest(scores_dir)["rows_scored"]
    totals = []
    for c, plan in plans:
        try:
            specs = stage_specs(plan, num_rows, c.training.global_batch_size)
        except ValueError as err:
            raise ConfigError(
                f"tune.search_space: {err} (with curriculum.num_buckets = {c.curriculum.num_buckets})"
            ) from None
        totals.append((c, sum(s.steps for s in specs)))
    return totals


def tune(cfg: RunConfig) -> TuneResult:
    """Sweep cfg.tune.search_space (module docstring); a re-run resumes an interrupted sweep, and a
    finished one is not run again for the same config. output.dir may be a bucket: the Tune experiment,
    every trial's run and the results are written there."""
    check_search_space(cfg)  # bad trial settings fail before the teacher is built or fine-tuned
    preflight.check_data(cfg)  # and unreadable data (the models: once the teacher is there, below)
    _search_alg(cfg.tune)  # a missing optuna / hyperopt is reported before any Ray work
    tracking.check_trackers(cfg)
    with tracking.start(cfg, kind="sweep") as sweep:
        return _tune(cfg, sweep)


def _tune(cfg: RunConfig, sweep: tracking.Run) -> TuneResult:
    from pocl_ray.scoring import score_dataset
    from pocl_ray.teacher_prep import resolve_teacher
    from pocl_ray.training.driver import run_plan

    root: str | Path = cfg.output.dir
    if not is_uri(root):
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
    # The same teacher as `pocl-ray run`: prepared and / or fine-tuned (pipeline.sft_teacher) first.
    cfg = resolve_teacher(cfg, root, min_cpus=8)
    sources = preflight.model_sources(cfg)  # pinned once: every trial loads the same models
    # The trials, now on the resolved teacher.
    plans = [(c, run_plan(c, preflight.model_sources(c, sources))) for c in check_search_space(cfg)]
    scores_dir = storage.join(root, "scores")

    def score() -> None:
        init_ray(min_cpus=8)
        score_dataset(cfg, sources)

    run_pipeline_step("score", scores_dir, fingerprint(cfg, SCORE_KEYS), score)
    totals = _total_steps(plans, scores_dir)
    budget = sweep_budget(cfg.tune, totals) if cfg.tune.scheduler == "asha" else None

    tune_dir = storage.join(root, "tune")
    key = fingerprint(cfg, (*TRAIN_KEYS, "eval", "tune"), {"name": cfg.name})
    sweep.params(tracked.loggable_params(cfg.model_dump(mode="json")))
    callbacks = tracking.tune_callbacks(sweep.handle)

    def run_sweep() -> None:
        init_ray(min_cpus=8)
        _sweep(cfg, sources, root, scores_dir, budget, callbacks)

    run_pipeline_step("tune", tune_dir, key, run_sweep)
    csv = storage.join(tune_dir, "results.csv")
    frame = pd.read_csv(io.StringIO(storage.read_text(csv, "output.dir")), dtype={"trial_id": str})
    best = best_trial(frame, cfg.tune.objective)
    sweep.metrics({f"best/{cfg.tune.objective}": float(best["objective"])}, 0)
    for name in ("results.csv", "best.yaml", "objective.png"):
        sweep.artifacts(storage.join(tune_dir, name), "tune")
    return TuneResult(
        output_dir=storage.as_path(tune_dir),
        results_csv=storage.as_path(csv),
        best_config_path=storage.as_path(storage.join(tune_dir, "best.yaml")),
        plot_path=storage.as_path(storage.join(tune_dir, "objective.png")),
        best_trial_id=str(best["trial_id"]),
        best_objective=float(best["objective"]),
        objective=cfg.tune.objective,
        trials=frame,
    )
