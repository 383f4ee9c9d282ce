"""The distill pipeline: [prepare teacher] -> [fine-tune teacher] -> score -> train -> eval -> report,
from one config. With pipeline.sft_teacher every step after the fine-tuning (scoring, training,
evaluation, the teacher's own evaluation) uses the fine-tuned teacher (`teacher_prep.resolve_teacher`).

Each step is resumable and keyed by a fingerprint of the config it depends on (`pocl_ray.pipeline_steps`).

With `pipeline.compare`, each label gets its own student under DIR/runs/<label>/{train,eval}
while the scoring pass (DIR/scores) is shared: buckets are re-cut from the stored ranks.

With `output.trackers`, the invocation is one parent run in each tracker (`tracking.start`) and
each step a child under it: the teacher's preparation and fine-tuning, the scoring pass, each
compared run (its config, plan, training steps, selection and evaluation, side by side in the
tracker's UI), the teacher's evaluation; the report goes to the parent as artifacts. A compared
run's training steps and selection candidates are logged live, by the coordinator actor as they
come; everything else (and a training done already in an earlier invocation) is logged from the
step's output files once the step is done.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from pocl_ray import preflight, storage, tracked, tracking
from pocl_ray.config import SHARED_SECTIONS, ConfigError, RunConfig
from pocl_ray.eval_results import RESULTS_FILE
from pocl_ray.pipeline_steps import EVAL_KEYS, SCORE_KEYS, TRAIN_KEYS, fingerprint, run_pipeline_step
from pocl_ray.ray_session import init_ray


def compared_runs(cfg: RunConfig) -> dict[str, RunConfig]:
    """label -> the run config of that label (its output.dir is its own run directory)."""
    root = cfg.output.dir
    if not cfg.pipeline.compare:
        return {"": cfg}
    runs = {}
    for label, overrides in cfg.pipeline.compare.items():
        if not label or "/" in label or label.startswith("."):
            raise ConfigError(f"pipeline.compare: {label!r} is not a usable run label")
        bad = [k for k in overrides if k.split(".")[0] in SHARED_SECTIONS]
        if bad:
            raise ConfigError(
                f"pipeline.compare.{label}: {bad} change the shared scoring pass or layout; "
                "only curriculum, kd, training and eval settings may differ between compared runs"
            )
        try:
            run = cfg.with_overrides({**overrides, "output.dir": storage.join(root, "runs", label)})
        except ConfigError as err:
            raise ConfigError(f"pipeline.compare.{label}: {err}") from None
        runs[label] = run
    return runs


def _evaluate_selected_student(run: RunConfig, run_dir: str, sources: preflight.Sources) -> None:
    """Evaluate the student of run_dir/train that eval.checkpoint names."""
    from pocl_ray.evaluation import evaluate
    from pocl_ray.training.driver import selected_student

    evaluate(run, selected_student(storage.join(run_dir, "train"), run.eval.checkpoint), label=None, sources=sources)


def _log_step(parent: tracking.Run, name: str, kind: str, log) -> None:
    """A child run of `parent` filled by log(run) and finished (FAILED when log raises)."""
    with tracking.attach(parent.child(name, kind)) as run:
        log(run)


def _log_teacher(parent: tracking.Run, cfg: RunConfig, root: str) -> None:
    """The teacher's preparation and fine-tuning steps that ran for this config, as child runs."""
    for folder, name, asked in (
        ("teacher_prep", "teacher-prep", cfg.pipeline.prepare_teacher),
        ("teacher_sft", "teacher-sft", cfg.pipeline.sft_teacher),
    ):
        train_dir = storage.join(root, folder, "train")
        if asked is not None and storage.is_file(storage.join(train_dir, "metrics.jsonl")):
            _log_step(parent, name, "teacher", lambda run, d=train_dir: tracked.log_training(run, d))


def _train_tracked(run: RunConfig, scores_dir: str, label: str, handle: dict, sources: preflight.Sources) -> bool:
    """The training step of one (compared) run, logging live to the tracker run `handle`: its config
    as parameters, then detached while the coordinator actor logs the steps (a W&B run is held by one
    process at a time). Returns whether it trained (False: done already); a failure finishes the run FAILED."""
    from pocl_ray.training.driver import train

    params = tracking.attach(handle)
    params.params(tracked.loggable_params(run.model_dump(mode="json")))
    params.close()
    tag = f" [{label}]" if label else ""
    # Training's checkpoint selection decodes the dev rows within eval.max_new_tokens.
    key = fingerprint(run, TRAIN_KEYS, {"eval.max_new_tokens": run.eval.max_new_tokens})
    fn = partial(train, run, scores_dir=scores_dir, sources=sources, tracking=handle)
    try:
        return run_pipeline_step(f"train{tag}", storage.join(run.output.dir, "train"), key, fn)
    except BaseException:
        tracking.attach(handle).close("FAILED")
        raise


def run_distill(cfg: RunConfig) -> str | Path:
    """Run every step the config asks for; returns the report's path (a URI when output.dir is one)."""
    root = cfg.output.dir
    compared_runs(cfg)  # validates the compared configs before any work starts
    preflight.check_data(cfg)  # unreadable data fails here; the models once the teacher is there (_run_steps)
    if cfg.pipeline.sft_teacher is not None:
        from pocl_ray.teacher_prep import sft_overrides

        sft_overrides(cfg)  # and the fine-tuning's settings
    tracking.check_trackers(cfg)
    with tracking.start(cfg, kind="pipeline") as parent:
        return _run_steps(cfg, root, parent)


def _run_steps(cfg: RunConfig, root: str, parent: tracking.Run) -> str | Path:
    from pocl_ray.evaluation import evaluate
    from pocl_ray.report import write_report
    from pocl_ray.scoring import score_dataset
    from pocl_ray.teacher_prep import resolve_teacher

    started = time.time()
    # Builds and / or fine-tunes the teacher when asked (each a step that starts Ray itself); a missing
    # teacher that nothing would build fails here, before Ray starts.
    resolved = resolve_teacher(cfg, root)
    # Every model pinned once, before this run's Ray work (a compared run resolves its own teacher checkpoints).
    sources = preflight.model_sources(resolved)
    run_sources = {label: preflight.model_sources(run, sources) for label, run in compared_runs(resolved).items()}
    init_ray(min_cpus=4)
    storage.write_text(storage.join(root, "config.yaml"), cfg.to_yaml(), "output.dir")  # the config as given
    parent.artifacts(storage.join(root, "config.yaml"), "config")
    _log_teacher(parent, cfg, root)  # the config as given: the resolved one no longer asks for a fine-tuning
    cfg = resolved
    parent.params(tracked.loggable_params(cfg.model_dump(mode="json")))
    runs = compared_runs(cfg)

    scores = storage.join(root, "scores")
    run_pipeline_step("score", scores, fingerprint(cfg, SCORE_KEYS), lambda: score_dataset(cfg, sources))
    _log_step(parent, "score", "score", lambda run: tracked.log_scoring(run, scores))

    for label, run in runs.items():
        handle = parent.child(label or cfg.name, "train")
        trained = _train_tracked(run, scores, label, handle, run_sources[label])
        run_dir = run.output.dir
        tag = f" [{label}]" if label else ""
        with tracking.attach(handle) as tracked_run:
            # Steps trained in this invocation went to the run live (the coordinator's); a training done
            # already (skipped) is replayed from its files.
            tracked.log_training(tracked_run, storage.join(run_dir, "train"), live=trained)
            if run.eval.sets:
                # EVAL_KEYS hold the eval section, eval.checkpoint (which student is evaluated) included.
                run_pipeline_step(
                    f"eval{tag}",
                    storage.join(run_dir, "eval"),
                    fingerprint(run, EVAL_KEYS),
                    partial(_evaluate_selected_student, run, run_dir, run_sources[label]),
                )
                tracked.log_eval(tracked_run, storage.join(run_dir, "eval", RESULTS_FILE))
    report_runs = {label or "student": f"runs/{label}" if label else "." for label in runs}
    if cfg.pipeline.evaluate_teacher and cfg.eval.sets:
        teacher_dir = storage.join(root, "runs", "teacher")
        run_pipeline_step(
            "eval [teacher]",
            storage.join(teacher_dir, "eval"),
            fingerprint(cfg, ("data", "models", "eval")),
            lambda: evaluate(cfg, sources[preflight.TEACHER], output_dir=teacher_dir, label=None, sources=sources),
        )
        teacher_results = storage.join(teacher_dir, "eval", RESULTS_FILE)
        _log_step(parent, "teacher", "eval", lambda run: tracked.log_eval(run, teacher_results))
        report_runs["teacher"] = "runs/teacher"
    report = write_report(root, report_runs)
    parent.artifacts(storage.join(root, "report"), "report")
    print(f"[pipeline] all steps done in {time.time() - started:.0f}s; report written to {report}", flush=True)
    return report
