"""The driver of a distillation run (`train`): every check before any Ray work, then one
CurriculumCoordinator actor and one Ray Train TorchTrainer whose workers run `worker.train_func`, then
the exported students and train/selection.json.

    train(cfg)
      inputs = prepare(...)      # scores, plan, stage lengths, dev rows (with their cache): all checked
      result = fit(...)          # the coordinator actor + TorchTrainer(train_func), resumed by name
      export(...)                # student/, student_best/, selection.json, TrainResult

A second call with the same config `name` and output directory resumes from the latest checkpoint
(Ray Train restores it; the coordinator's state rides in it). The layout of OUTPUT/train is in
docs/ARCHITECTURE.md.

The training read is not Ray Data: each worker reads its own rows straight from the scores files
(`shards.StepReader`), in an order the coordinator deals per epoch, so a resume replays the same data
(docs/ARCHITECTURE.md says why).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pocl_ray import storage
from pocl_ray.config import ConfigError, RunConfig, is_uri
from pocl_ray.coordinator import best_candidate, coordinator, failure_reporter
from pocl_ray.curriculum import Plan, StageSpec, plan_from_config, stage_specs
from pocl_ray.data import read_table, validate_and_tokenize
from pocl_ray.losses import KD_KINDS
from pocl_ray.model_source import ModelSource
from pocl_ray.models import check_tokenizers, has_model_files, load_tokenizer, local_folder
from pocl_ray.preflight import (
    STUDENT,
    TEACHER,
    TOKENIZER,
    Sources,
    check_inputs,
    model_sources,
    records,
    stage_sources,
    to_wire,
)
from pocl_ray.probes import PROBE_SEED, probe_ranks, read_probe_rows
from pocl_ray.scores import scores_path
from pocl_ray.sharding import check_shardable
from pocl_ray.shards import ScoresIndex
from pocl_ray.teacher_cache import cache_rows, check_teacher_cache
from pocl_ray.tracking import CLOSE_TIMEOUT_S
from pocl_ray.training.worker import train_func

SCORE_COLUMNS = ("rank", "input_ids", "labels", "num_prompt_tokens")


@dataclass(frozen=True)
class TrainResult:
    # Paths are Paths for a local output.dir, URI strings for one in object storage.
    output_dir: str | Path  # DIR/train
    student_dir: str | Path  # the final student
    best_student_dir: str | Path | None  # the best selection candidate's student; None without a dev set
    selection_path: str | Path
    metrics_path: str | Path
    plan_path: str | Path
    checkpoint_path: str
    steps: int
    stages_completed: int
    metrics: dict  # the last checkpoint's report (step, stage, loss, dev_loss, dev_kd_loss, ...)
    dev_rejected: int
    wall_seconds: float


# ---------------------------------------------------------------------------------------------
# Checks and inputs


def _layer_counts(cfg: RunConfig, sources: Sources) -> tuple[int, int]:
    """Teacher and student layer counts from the model configs, without loading weights."""
    from transformers import AutoConfig

    def layers(source: ModelSource) -> int:
        return AutoConfig.from_pretrained(local_folder(source, weights=False)).get_text_config().num_hidden_layers

    teacher = layers(sources[TEACHER])
    if cfg.models.student is not None:
        return teacher, layers(sources[STUDENT])
    if cfg.models.student_layers is not None:
        return teacher, len(cfg.models.student_layers)
    # models.student_from_teacher's default: every k-th layer counting back from the last.
    return teacher, len(range(teacher - 1, -1, -cfg.models.student_keep_every))


def _check_stage_teachers(cfg: RunConfig, plan: Plan, sources: Sources, teachers: Sources) -> None:
    """A plan's stage teachers (a progressive plan's teacher checkpoints; `teachers`: each as the driver
    resolved it, `preflight.stage_sources`) have heads and tokenizers that fit the run's tokenizer, as
    models.teacher's and models.student's do (`prepare`)."""
    named = {
        f"curriculum.progressive.teacher_checkpoints[{s.index}]": teachers[s.teacher] for s in plan.stages if s.teacher
    }
    if named:
        check_tokenizers(cfg.models.model_copy(update={"student": None}), named, sources)


def _check_shardable(cfg: RunConfig, sources: Sources, stage_teachers: Sources) -> None:
    """With training.strategy: fsdp, the models to shard have decoder layers FSDP can shard one by one
    (`sharding.check_shardable`: configs only, no weights read)."""
    if cfg.training.strategy != "fsdp":
        return
    student = STUDENT if cfg.models.student is not None else TEACHER
    models = {student: sources[student]}
    if cfg.training.sharded_teacher and cfg.kd.teacher == "online":
        models[TEACHER] = sources[TEACHER]
        models.update({f"curriculum.progressive.teacher_checkpoints ({name})": s for name, s in stage_teachers.items()})
    for field, source in models.items():
        check_shardable(local_folder(source, weights=False), field)


def run_plan(cfg: RunConfig, sources: Sources | None = None) -> Plan:
    """The curriculum plan `train` follows for cfg (extraction plans read the models' layer counts, of
    `sources` or of the models cfg names, resolved here)."""
    extraction = cfg.curriculum.plan == "extraction"
    counts = _layer_counts(cfg, sources or model_sources(cfg)) if extraction else (None, None)
    try:
        return plan_from_config(cfg, *counts)
    except ValueError as err:
        raise ConfigError(f"curriculum: {err}") from None


def cached_tail_warning(cfg: RunConfig, plan: Plan) -> str | None:
    """The caveat a cached-teacher run with RKL or AKL stages needs (METHODS.md §4), else None."""
    kinds = sorted({s.loss for s in plan.stages if s.target == "logits" and s.kd_weight > 0} & {"rkl", "akl"})
    if cfg.kd.teacher != "cached" or cfg.scoring.teacher_hidden or not kinds:
        return None
    return (
        f"kd.teacher: cached with {', '.join(kinds)}: RKL's cached tail (AKL's RKL part too) is a rough model, "
        "far off once the student nears the teacher (METHODS.md §4, 'Near the teacher'); "
        "scoring.teacher_hidden (the teacher's int8 hidden states) or kd.teacher: online compute it exactly"
    )


def _check_plan(cfg: RunConfig, plan: Plan, sources: Sources) -> None:
    """Stage settings the workers would only trip over mid-run: KD loss kinds and matched layers."""
    for s in plan.stages:
        if s.target == "logits" and s.kd_weight > 0 and s.loss not in KD_KINDS:
            raise ConfigError(f"stage {s.index}: unknown KD loss {s.loss!r}; allowed: {', '.join(KD_KINDS)}")
    hidden = [s for s in plan.stages if s.target == "hidden"]
    if not hidden:
        return
    teacher_layers, student_layers = _layer_counts(cfg, sources)
    for s in hidden:
        assert s.teacher_layer is not None and s.student_layer is not None  # a hidden Stage has both
        if not 0 <= s.teacher_layer <= teacher_layers:
            raise ConfigError(f"stage {s.index}: teacher layer {s.teacher_layer} outside 0..{teacher_layers}")
        if not 0 <= s.student_layer <= student_layers:
            raise ConfigError(
                f"curriculum.extraction.layer_map: student layer {s.student_layer} (stage {s.index}) "
                f"outside 0..{student_layers}"
            )


def _num_ranked_rows(dataset: pads.Dataset, scores_dir: str | Path) -> int:
    missing = [c for c in SCORE_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"scores at {scores_dir} lack the columns {missing}; re-run `pocl-ray score`")
    ranks = dataset.to_table(columns=["rank"]).column("rank")
    n = len(ranks)
    if n == 0:
        raise ValueError(f"scores at {scores_dir} hold no rows")
    lo, hi = pc.min_max(ranks).values()
    if lo.as_py() != 0 or hi.as_py() != n - 1 or pc.count_distinct(ranks).as_py() != n:
        raise ValueError(f"scores at {scores_dir}: the rank column must hold 0..{n - 1} once each")
    return n


def _dev_rows(cfg: RunConfig, plan: Plan, sources: Sources) -> tuple[list[dict], int]:
    """Tokenised dev rows (small; shipped to the workers with the config) and the rejected count."""
    if cfg.data.dev is None:
        if any(s.until_plateau for s in plan.stages):
            raise ConfigError("curriculum.advance: 'plateau' needs a dev set (data.dev) to watch")
        return [], 0
    tokenizer = load_tokenizer(sources[TOKENIZER])
    good, rejects = validate_and_tokenize(read_table(cfg.data.dev, cfg.data.format).to_pylist(), tokenizer, cfg.data)
    if not good:
        raise ValueError(
            f"data.dev: no usable row in {cfg.data.dev} ({len(rejects)} rejected, "
            f"e.g. {rejects[0]['reason'] if rejects else ''})"
        )
    keep = ("id", "input_ids", "labels", "attention_mask", "num_prompt_tokens", "response")
    rows = [{k: r[k] for k in keep} for r in good]
    if cfg.kd.teacher == "cached":
        # The workers hold no teacher: the dev rows (never scored) get their cache here, once.
        cache_rows(cfg, rows, sources[TEACHER], sources[TOKENIZER])
    return rows, len(rejects)


def _storage_path(cfg: RunConfig, out: str) -> str:
    path = cfg.training.storage_path
    if path is None:
        return storage.join(out, "checkpoints")
    return path if is_uri(path) else str(Path(path).resolve())


def write_selection(path: str, cfg: RunConfig, candidates: list[dict], dev_rows: int) -> str | Path:
    """train/selection.json: the protocol, every candidate, the best one (student_best/) and the final
    one (student/). Which of the two the evaluation uses is eval.checkpoint's business (`selected_student`)."""
    if not candidates:
        print(
            "[train] no dev set (data.dev): no checkpoint-selection candidates; the final student is the only one",
            flush=True,
        )
    final_step = max((c["step"] for c in candidates), default=None)
    storage.write_text(
        path,
        json.dumps(
            {
                "protocol": {
                    "metric": "dev_rougeL",
                    "decoding": "greedy",
                    "dev_rows": dev_rows,
                    "max_new_tokens": f"min(eval.max_new_tokens = {cfg.eval.max_new_tokens}, "
                    f"data.max_length ({cfg.data.max_length}) - prompt tokens)",
                    "candidates_at": "every stage end"
                    + (f" and every {cfg.training.select_every} steps" if cfg.training.select_every else ""),
                    "tie_break": "lower dev_kd_loss, then the later step",
                },
                "candidates": candidates,
                "best": best_candidate(candidates),
                "final": next((c for c in candidates if c["step"] == final_step), None),
                "students": {"best": "student_best", "final": "student"},
            },
            indent=1,
        ),
        "output.dir",
    )
    return storage.as_path(path)


def selected_student(train_dir: str | Path, checkpoint: str) -> str | Path:
    """The student folder eval.checkpoint names: train/student (final) or train/student_best (the best
    dev ROUGE-L). A training without selection candidates (no data.dev, or no selection.json: a run
    from before checkpoint selection) falls back to the final student, saying so in one line."""
    final, best = (storage.as_path(storage.join(train_dir, name)) for name in ("student", "student_best"))
    if checkpoint == "final":
        return final
    path = storage.join(train_dir, "selection.json")
    if not storage.is_file(path):
        print(
            f"[eval] eval.checkpoint: best_dev_rougeL found no {path} (training predates checkpoint "
            "selection): evaluating the final student",
            flush=True,
        )
        return final
    if storage.read_json(path)["best"] is None:
        print(
            "[eval] eval.checkpoint: best_dev_rougeL has no candidates to choose from (no data.dev in "
            "training): evaluating the final student",
            flush=True,
        )
        return final
    return best


@dataclass(frozen=True)
class RunInputs:
    """What `prepare` checked and `fit` hands to the workers."""

    sources: Sources  # the models, resolved on the driver (preflight.py)
    stage_teachers: Sources  # each stage teacher the plan names, resolved (preflight.stage_sources)
    scores_dir: str | Path  # a local folder or an object-storage URI
    scores: str  # the ranked rows, in scores_dir's form
    teacher_cache: dict | None  # the manifest's cache entry (kd.teacher: cached)
    num_rows: int
    index: ScoresIndex
    plan: Plan
    specs: tuple[StageSpec, ...]
    dev_rows: list[dict]
    dev_rejected: int
    probe_ranks: list[list[int]]  # per difficulty bucket, the ranks of its fixed probe rows (none: no probe)


# ---------------------------------------------------------------------------------------------
# The run


def train(
    cfg: RunConfig,
    scores_dir: str | Path | None = None,
    *,
    plan: Plan | None = None,
    callbacks: list | None = None,
    sources: Sources | None = None,
    tracking: dict | None = None,
) -> TrainResult:
    """Distil the student along the configured plan (or `plan`, any Plan); outputs under OUTPUT/train.

    A second call with the same config `name` and output directory resumes from the latest
    checkpoint. `callbacks` go to Ray Train's RunConfig (Tune passes its report callback here).
    `sources`: the models as the command's preflight resolved them; None: checked and resolved here.
    `tracking` (a `tracking.Run.child` handle, detached by its caller meanwhile) is the run the
    coordinator logs every step record, candidate and the selected one to, as they come.
    """
    started = time.time()
    sources = check_inputs(cfg, training=True) if sources is None else sources
    root = cfg.output.dir if is_uri(cfg.output.dir) else str(Path(cfg.output.dir).resolve())
    out = storage.join(root, "train")
    if scores_dir is None:
        scores_dir = storage.join(root, "scores")
    elif not is_uri(scores_dir):
        scores_dir = Path(scores_dir).resolve()
    inputs = prepare(cfg, scores_dir, plan, sources)
    plan_path = write_plan(storage.join(out, "plan.json"), inputs, cfg.training.global_batch_size)
    write_probe(storage.join(out, "probe.json"), inputs)
    result = fit(cfg, out, inputs, callbacks, tracking)
    return export(cfg, out, inputs, result, plan_path, started)


def prepare(cfg: RunConfig, scores_dir: str | Path, plan: Plan | None, sources: Sources) -> RunInputs:
    """Everything a run needs, checked on the driver before any Ray work: the scores (and their teacher
    cache), the plan and its stage lengths, the dev rows; the models (`sources`) the preflight resolved."""
    scores = scores_path(scores_dir)
    # The models and their tokenizers, before anything reads them.
    vocab = check_tokenizers(cfg.models, sources=sources)
    cache_entry = check_teacher_cache(scores_dir, cfg, vocab, sources[TEACHER])
    filesystem, inner = storage.resolve(scores)
    num_rows = _num_ranked_rows(pads.dataset(inner, filesystem=filesystem, format="parquet"), scores_dir)
    index = ScoresIndex(scores)
    plan = plan if plan is not None else run_plan(cfg, sources)
    _check_plan(cfg, plan, sources)
    warning = cached_tail_warning(cfg, plan)
    if warning:
        print(f"[train] {warning}", flush=True)
    stage_teachers = stage_sources(cfg, plan, sources)
    _check_stage_teachers(cfg, plan, sources, stage_teachers)
    _check_shardable(cfg, sources, stage_teachers)
    try:
        specs = stage_specs(plan, num_rows, cfg.training.global_batch_size)
    except ValueError as err:
        raise ConfigError(f"curriculum.num_buckets: {err}") from None
    dev_rows, dev_rejected = _dev_rows(cfg, plan, sources)
    probe = probe_ranks(num_rows, cfg.curriculum.num_buckets, cfg.output.bucket_probe_rows)
    return RunInputs(
        sources=sources,
        stage_teachers=stage_teachers,
        scores_dir=scores_dir,
        scores=scores,
        teacher_cache=cache_entry,
        num_rows=num_rows,
        index=index,
        plan=plan,
        specs=specs,
        dev_rows=dev_rows,
        dev_rejected=dev_rejected,
        probe_ranks=[r.tolist() for r in probe] if cfg.output.bucket_probe_rows else [],
    )


def write_plan(path: str, inputs: RunInputs, global_batch_size: int) -> str | Path:
    """train/plan.json: the plan and every stage's length, as the workers will follow them."""
    stages = [{k: v for k, v in s.to_dict().items() if k != "stage"} for s in inputs.specs]
    plan = {
        "plan": inputs.plan.to_dict(),
        "num_rows": inputs.num_rows,
        "global_batch_size": global_batch_size,
        "stages": stages,
        "total_steps": sum(s.steps for s in inputs.specs),
        "models": records(inputs.sources),
    }
    storage.write_json(path, plan, "output.dir")
    return storage.as_path(path)


def write_probe(path: str, inputs: RunInputs) -> None:
    """train/probe.json: the bucket probe's rows (ranks and ids per bucket), the same at every
    measurement and in every run on these scores; none without a probe."""
    rows = read_probe_rows(inputs.scores, [np.asarray(r, dtype=np.int64) for r in inputs.probe_ranks], [])
    buckets = [{"bucket": b, "ranks": r, "ids": [x["id"] for x in rows[b]]} for b, r in enumerate(inputs.probe_ranks)]
    storage.write_json(path, {"seed": PROBE_SEED, "buckets": buckets}, "output.dir")


def _train_settings() -> None:
    """Ray Train settings from the driver's environment (its controller and workers inherit them)."""
    # Ray Train's controller notices a finished (or failed) worker group at its next poll, every 2 s
    # by default: measured on 2 CPU cores, a 0.25 s poll cut 3-4 s from every fit's end and ~1 s from
    # its start. The controller propagates this setting to itself from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Ray Train reroutes a worker's print() to its logger, and also to the worker's stdout where that is
    # wrapped (as in a Ray worker): every progress line reached the job log twice. Plain print, once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def start_coordinator(name: str, cfg: RunConfig, out: str, inputs: RunInputs, tracking: dict | None):
    """The run's curriculum-coordinator actor, writing train/metrics.jsonl under `out` and logging to `tracking`."""
    training = cfg.training
    return coordinator(
        name,
        plan=inputs.plan,
        num_rows=inputs.num_rows,
        global_batch=training.global_batch_size,
        micro_batch=training.micro_batch_size,
        seed=training.seed,
        metrics_path=storage.join(out, "metrics.jsonl"),
        world_size=training.max_workers,
        row_group_bounds=inputs.index.bounds.tolist(),
        tracking_handle=tracking,
    )


def fit(cfg: RunConfig, out: str, inputs: RunInputs, callbacks: list | None, tracking: dict | None = None):
    """The coordinator actor (logging to the `tracking` run) and the TorchTrainer whose workers run
    `train_func`; Ray Train's result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    # Train V2's, with elastic scaling (the name ray.train exports is V2's at run time, V1's to a type checker).
    from ray.train.v2.api.config import ScalingConfig

    training = cfg.training
    if not ray.is_initialized():
        ray.init()
    _train_settings()
    name = f"pocl-coordinator-{cfg.name}-{uuid.uuid4().hex[:8]}"
    coord = start_coordinator(name, cfg, out, inputs, tracking)
    namespace = ray.get_runtime_context().namespace
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "models": to_wire(inputs.sources),
            "stage_teachers": to_wire(inputs.stage_teachers),
            "coordinator": name,
            "train_dir": out,
            "namespace": namespace,
            "scores_path": str(inputs.scores),
            "scores_dir": str(inputs.scores_dir),
            "teacher_cache": inputs.teacher_cache,
            "dev_rows": inputs.dev_rows,
            "probe_ranks": inputs.probe_ranks,
        },
        scaling_config=ScalingConfig(
            num_workers=training.num_workers,
            elastic_resize_monitor_interval_s=training.resize_check_s,
            use_gpu=training.use_gpu,
            resources_per_worker={"CPU": training.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=_storage_path(cfg, out),
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=training.keep_checkpoints),
            callbacks=[*(callbacks or []), failure_reporter(name, namespace)],
        ),
    )
    try:
        return trainer.fit()
    finally:
        close_coordinator(coord)


def close_coordinator(coord) -> None:
    """The coordinator's tracker calls sent (and the selected candidate logged) before the actor is
    killed: killing it drops what is still queued. A coordinator that cannot close (it died with the
    run) is warned about, not raised: the run's own error, if any, is the one to see."""
    import ray

    try:
        ray.get(coord.close.remote(), timeout=CLOSE_TIMEOUT_S + 30)
    except ray.exceptions.RayError as err:  # the actor died, or close outlived its own time-out
        print(f"[track] warning: the coordinator could not close its tracker run: {type(err).__name__}", flush=True)
    ray.kill(coord)


def export(cfg: RunConfig, out: str, inputs: RunInputs, result, plan_path: str | Path, started: float) -> TrainResult:
    """The students of the final checkpoint (in shared storage, so this works from any node; Ray downloads
    a checkpoint in object storage to a local folder) copied to train/student and train/student_best
    (uploaded when OUTPUT is a URI), selection.json written; the run's TrainResult."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.name!r} ended without a checkpoint")
    student_dir, best_dir = storage.join(out, "student"), storage.join(out, "student_best")
    for folder in (student_dir, best_dir):
        storage.remove_tree(folder, "output.dir")
    with result.checkpoint.as_directory() as d:
        storage.copy_folder(Path(d) / "student", student_dir, "output.dir")
        has_best = has_model_files(Path(d) / "student_best")
        if has_best:
            storage.copy_folder(Path(d) / "student_best", best_dir, "output.dir")
        candidates = json.loads((Path(d) / "coordinator.json").read_text())["candidates"]
    selection_path = write_selection(storage.join(out, "selection.json"), cfg, candidates, len(inputs.dev_rows))
    metrics = dict(result.metrics or {})
    return TrainResult(
        output_dir=storage.as_path(out),
        student_dir=storage.as_path(student_dir),
        best_student_dir=storage.as_path(best_dir) if has_best else None,
        selection_path=selection_path,
        metrics_path=storage.as_path(storage.join(out, "metrics.jsonl")),
        plan_path=plan_path,
        checkpoint_path=result.checkpoint.path,
        steps=int(metrics.get("step", 0)),
        stages_completed=int(metrics.get("stages_completed", 0)),
        metrics=metrics,
        dev_rejected=inputs.dev_rejected,
        wall_seconds=time.time() - started,
    )
