"""One Ray Train worker of a distillation run (`train_func`), top to bottom:

    w = setup_worker(config)              # the restored position, the models, the run's teachers, dev batches
    for each stage from the position on:  #   and the bucket probe's batches
        run = start_stage(...)            # its teacher, optimizer, projection and row reader
        for each step of the stage:       # train_stage
            train_step(...)               # rows -> batches -> step.accumulate_gradients -> optimizer step
            end = end_of_step(...)        # dev losses, plateau, selection candidate, checkpoint: one decision
            record_candidate / probe_buckets / report_checkpoint / end the stage, as `end` says

The step itself is step.py (pure torch); this module is the Ray glue around it: the coordinator actor
(stages, epoch shards, plateaus, selection candidates, step records), the read-ahead of the rows
(`shards.StepReader`), checkpoints and rank 0's step log.

Checkpoint selection (METHODS.md §5): every stage end (and every training.select_every steps) is a
candidate, scored by the dev ROUGE-L of greedy responses and the dev KD loss; the coordinator keeps
the candidates (they ride in every checkpoint, so a resume keeps them) and says when one is the best
so far, rank 0 then keeps a copy of its weights on local disk, and every later checkpoint carries
that copy as student_best/. The driver exports it next to the final student.

A checkpoint (docs/ARCHITECTURE.md): student/ (HF folder), student_best/ (once there is a best
candidate), optimizer.pt, coordinator.json (the coordinator's state: plan, position, candidates). Step
records are handed to the coordinator before it, so metrics.jsonl always holds every step up to the
latest checkpoint; the copy to storage runs in Ray Train's background thread.

training.strategy: fsdp (sharding.py) shards the student over the workers, and the online teacher too
(training.teacher_sharding): rank 0 alone reads weights, every forward and generate call is a collective
(dev batches padded to one count, generation in lockstep), and a checkpoint holds student_shards/ (every
worker's DCP shards of the student and its optimizer, each worker reporting its own) in place of student/
and optimizer.pt; the final checkpoint and the best candidate also get the whole student as an HF folder.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pocl_ray import sharded_checkpoint
from pocl_ray.config import FSDPConfig, KDConfig, RunConfig
from pocl_ray.conversations import stop_token_ids
from pocl_ray.coordinator import resize_line
from pocl_ray.curriculum import Stage, StageSpec, lr_at
from pocl_ray.evaluation import greedy_rouge_sum
from pocl_ray.extraction import layer_projection
from pocl_ray.models import (
    checkpoint_activations,
    has_model_files,
    hidden_size,
    load_model,
    load_tokenizer,
    meta_model,
    resolve_dtype,
    student_from_teacher,
)
from pocl_ray.preflight import STUDENT, TEACHER, TOKENIZER, Sources, from_wire
from pocl_ray.probes import is_probe, probe_record
from pocl_ray.progress import duration, progress_line
from pocl_ray.sampling import sample_on_policy
from pocl_ray.seeds import stream_seed
from pocl_ray.sharding import in_lockstep, is_sharded, load_sharded, release
from pocl_ray.shards import ROW_COLUMNS, ScoresIndex, StepReader, read_rows
from pocl_ray.teacher_cache import load_head
from pocl_ray.training.step import (
    StepValues,
    _all_reduce,
    accumulate_gradients,
    adamw,
    build_batch,
    dev_losses,
    length_grouped,
    optimizer_step,
    probe_losses,
    unwrap,
)
from pocl_ray.training.teacher import (
    CachedHiddenTeacher,
    CachedTeachers,
    CachedTopKTeacher,
    HiddenStatesLM,
    OnlineTeacher,
    OnlineTeachers,
    Teacher,
    Teachers,
    logits_form,
)

SHARDS = "student_shards"  # a sharded run's checkpoint: every worker's DCP shards of the student and optimizer
LOG_EVERY = 20  # at most this many steps between rank 0's read-backs of step records
PRINT_SECONDS = 10.0  # at most this long between progress lines (and read-backs)
# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers and warns on the old name.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@dataclass(frozen=True)
class Position:
    """Where a run stands, as checkpoints store it: `stage_step` steps of stage `stage` done (its next
    step is stage_step + 1; 0: the stage has not begun), `step` steps and `samples` rows of the run done."""

    stage: int
    stage_step: int
    step: int
    samples: int


@dataclass
class Worker:
    """What one training worker holds for the whole run."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    coord: Any  # the CurriculumCoordinator actor
    specs: list[StageSpec]
    start: Position  # where this attempt starts (the latest checkpoint's position, or the top)
    student: torch.nn.Module  # HiddenStatesLM, DDP-wrapped when world > 1 (strategy ddp); its lm sharded (fsdp)
    optimizer_state: dict | None
    tokenizer: Any
    teachers: Teachers
    scores: ScoresIndex
    dev_rows: list[dict]  # this worker's share of the dev rows (with their reference "response")
    log: StepLog | None  # rank 0 only
    scratch: Path  # this worker's local folder for the run (worker_scratch)
    best_dir: Path | None  # rank 0 only: a local copy of the best selection candidate's student
    dev_batches: list[dict[str, Any]] = field(default_factory=list)  # the same rows, batched for the dev losses
    probe_batches: list[list[dict[str, Any]]] = field(default_factory=list)  # per bucket, this worker's probe rows
    probe_rows: list[int] = field(default_factory=list)  # per bucket, the probe rows of all workers
    resume: Path | None = None  # strategy fsdp: the resumed checkpoint's local directory (optimizer shards read there)
    resume_files: ExitStack = field(default_factory=ExitStack)  # holds `resume` (a bucket's: downloaded once)
    gloo: Any = None  # strategy fsdp: the process group the checkpoint shards are written over in the background


@dataclass
class StageRun:
    """One stage as a worker trains it."""

    index: int
    spec: StageSpec
    teacher: Teacher  # the stage's
    final_teacher: Teacher  # the run's, which dev_kd_loss is measured against
    optimizer: torch.optim.Optimizer
    projection: torch.Tensor | None  # a hidden stage's projection of the teacher's layer
    rows: StepReader  # this worker's micro-batches of rows, step by step

    @property
    def stage(self) -> Stage:
        return self.spec.stage


class StepEnd(NamedTuple):
    """What the end of a step does, decided in one place (`end_of_step`)."""

    dev: dict[str, float]  # the dev losses, when measured this step
    stage_done: bool  # the stage's last step, or a plateau stage whose dev loss stopped improving
    select: bool  # a checkpoint-selection candidate
    checkpoint: bool  # a checkpoint


# ---------------------------------------------------------------------------------------------
# The loop


def train_func(config: dict) -> None:
    """One training worker: set-up, then each stage's steps from the restored position on."""
    w = setup_worker(config)
    position, optimizer, reader = w.start, None, None
    try:
        for index in range(w.start.stage, len(w.specs)):
            run = start_stage(w, index, position, optimizer, reader)
            w.resume_files.close()  # the resumed checkpoint is read by now: a downloaded copy is deleted
            # The next stage (always from its first step) is read while this one trains.
            reader = stage_reader(w, index + 1, 0) if index + 1 < len(w.specs) else None
            position = train_stage(w, run, position)
            optimizer = run.optimizer
            run.rows.close()
    finally:
        if w.best_dir is not None:
            shutil.rmtree(w.best_dir, ignore_errors=True)


def scratch_folder(train_dir: str, name: str, rank: int) -> Path:
    """`rank`'s local folder on this node for the run `name` writing to `train_dir`: the same for every
    attempt at that run (a restart's, a resume's), as its checkpoints are."""
    run = hashlib.sha256(f"{train_dir}\n{name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "pocl-ray" / run / f"rank{rank}"


def worker_scratch(train_dir: str, name: str, rank: int) -> Path:
    """The run's local folder of `rank` on this node (the best student's copy, checkpoints being written),
    emptied first. A killed worker (a lost node, a preemption, a killed job) cannot delete its own; the next
    worker of that rank on the node, in a restart or a resume, does, so a run leaves at most one per rank
    and node instead of one copy of the student per kill."""
    folder = scratch_folder(train_dir, name, rank)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def start_stage(
    w: Worker, index: int, position: Position, optimizer: torch.optim.Optimizer | None, reader: StepReader | None
) -> StageRun:
    """A stage's teacher, its optimizer (fresh where the stage restarts it), its projection (a hidden
    stage) and its rows from ``position`` on (``reader``, when already read ahead)."""
    spec, ex = w.specs[index], w.cfg.curriculum.extraction
    stage = spec.stage
    teacher = w.teachers.get(stage.teacher)
    projection = None
    if stage.target == "hidden":
        # Hidden-state stages read the teacher's layers: an online teacher (the config refuses a cached one).
        assert isinstance(teacher, OnlineTeacher) and stage.teacher_layer is not None
        d_teacher, d_student = hidden_size(teacher.lm), hidden_size(unwrap(w.student).lm)
        projection = layer_projection(d_teacher, d_student, stage.teacher_layer, seed=ex.seed, kind=ex.projection)
    return StageRun(
        index=index,
        spec=spec,
        teacher=teacher,
        # Loaded (kept beside a stage's own) only for the dev losses and the bucket probe: without
        # either nothing reads it.
        final_teacher=w.teachers.get() if w.dev_batches or w.probe_batches else teacher,
        optimizer=stage_optimizer(w, stage, position.stage_step, optimizer, resuming=index == w.start.stage),
        projection=None if projection is None else projection.to(w.device),
        rows=reader if reader is not None else stage_reader(w, index, position.stage_step),
    )


def train_stage(w: Worker, run: StageRun, position: Position) -> Position:
    """The stage's steps from ``position`` on; returns the position after its last step (or plateau)."""
    training = w.cfg.training
    step, samples = position.step, position.samples
    for stage_step in range(position.stage_step + 1, run.spec.steps + 1):
        samples += rows_in_step(run.spec, stage_step, training.global_batch_size)
        values = train_step(w, run, step, stage_step, samples)
        step += 1
        end = end_of_step(w, run, stage_step, step)
        position = Position(run.index, stage_step, step, samples)
        if end.stage_done:
            position = Position(run.index + 1, 0, step, samples)
        if end.select:
            record_candidate(w, step, run.index, samples, end.dev)
        if end.stage_done or end.select:
            probe_buckets(w, run, step, samples, "stage_end" if end.stage_done else "candidate")
        if end.checkpoint:
            metrics = {
                "step": step,
                "stage": run.index,
                "epoch": run.spec.epoch_of(stage_step - 1),
                "loss": float(values.loss),
                "stages_completed": position.stage,
                **end.dev,
            }
            final = end.stage_done and run.index == len(w.specs) - 1
            report_checkpoint(w, metrics, position, run.optimizer, final)
        if end.stage_done:
            return position
    return Position(run.index + 1, 0, step, samples)


def train_step(w: Worker, run: StageRun, step: int, stage_step: int, samples: int) -> StepValues:
    """Step ``stage_step`` of the stage (``step`` steps of the run done before it, ``samples`` rows
    of the run done with it): its rows, batched (with on-policy samples where the stage asks for them),
    forward and backward, the optimizer step; rank 0 logs it. Seeded by (run seed, step, rank), so a
    restart replays it."""
    training, stage = w.cfg.training, run.stage
    started = (time.perf_counter(), time.thread_time())
    seed = stream_seed(training.seed, step, w.rank)
    torch.manual_seed(seed)
    micro = next(run.rows)
    data_wait = time.perf_counter() - started[0]
    batches = step_batches(w, micro, stage, run.teacher, seed)
    values = accumulate_gradients(
        w.student,
        run.teacher,
        batches,
        stage,
        w.cfg.kd,
        projection=run.projection,
        normalize=w.cfg.curriculum.extraction.normalize,
        autocast=w.autocast,
    )
    lr = lr_at(
        run.spec.lr_offset + stage_step - 1, run.spec.lr_total, training.lr, training.min_lr, training.warmup_steps
    )
    grad_norm = optimizer_step(w.student, run.optimizer, lr, training.grad_clip)
    if w.log is not None:
        meta = step_meta(step + 1, stage_step, samples, stage, run.spec, lr, started)
        w.log.add({**meta, "data_wait": data_wait}, values, grad_norm)
    return values


def end_of_step(w: Worker, run: StageRun, stage_step: int, step: int) -> StepEnd:
    """Every end-of-step decision: a plateau stage's dev loss every training.eval_every steps (the
    coordinator says whether it stopped improving), a selection candidate at the stage's end and
    every training.select_every steps, a checkpoint at the stage's end and every
    training.checkpoint_every steps; the dev losses are measured at most once, when any of them needs
    them (with a dev set)."""
    training, stage, last = w.cfg.training, run.stage, stage_step == run.spec.steps
    has_dev = bool(w.dev_batches)
    plateau_due = stage.until_plateau and has_dev and stage_step % training.eval_every == 0 and not last
    checkpoint_due = step % training.checkpoint_every == 0
    select_due = has_dev and training.select_every is not None and step % training.select_every == 0
    dev = {}
    if has_dev and (plateau_due or last or checkpoint_due or select_due):
        dev = measure_dev(w, run)
    stage_done = last or (plateau_due and plateaued(w, run.index, dev["dev_loss"]))
    return StepEnd(
        dev=dev,
        stage_done=stage_done,
        select=has_dev and (stage_done or select_due),
        checkpoint=stage_done or checkpoint_due,
    )


# ---------------------------------------------------------------------------------------------
# Set-up


def setup_worker(config: dict) -> Worker:
    """Restore the run's position, build the student (wrapped for DDP, or sharded) and the run's teachers,
    the dev and probe batches and rank 0's step log."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    coord = ray.get_actor(config["coordinator"], namespace=config["namespace"])
    torch.manual_seed(cfg.training.seed)
    scratch = worker_scratch(config["train_dir"], cfg.name, rank)
    best_dir = scratch / "best" if rank == 0 else None
    if best_dir is not None:
        best_dir.mkdir()
    sharded = cfg.training.strategy == "fsdp"
    resume_files = ExitStack()
    state, student_lm, optimizer_state, resume = restore(coord, rank, world, best_dir, sharded, resume_files)
    specs: list[StageSpec] = ray.get([coord.stage.remote(i) for i in range(len(state["plan"]["stages"]))])
    sources = from_wire(config["models"])
    tokenizer = load_tokenizer(sources[TOKENIZER])
    student, teachers = build_models(cfg, config, device, student_lm, tokenizer, specs, sources)
    if resume is not None:
        sharded_checkpoint.load(resume / SHARDS, unwrap(student).lm)
    start = Position(**state["position"])
    w = Worker(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        autocast=partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        coord=coord,
        specs=specs,
        start=start,
        student=student,
        optimizer_state=optimizer_state,
        tokenizer=tokenizer,
        teachers=teachers,
        scores=ScoresIndex(config["scores_path"]),
        dev_rows=config["dev_rows"][rank::world],
        log=StepLog(coord, specs, start.step) if rank == 0 else None,
        scratch=scratch,
        best_dir=best_dir,
        resume=resume,
        resume_files=resume_files,
        gloo=torch.distributed.new_group(backend="gloo") if sharded else None,
    )
    w.dev_batches = dev_share(w) if config["dev_rows"] else []
    w.probe_rows = [len(r) for r in config["probe_ranks"]]
    w.probe_batches = [probe_share(w, np.asarray(r)[rank::world]) for r in config["probe_ranks"]]
    return w


def restore(
    coord: Any, rank: int, world: int, best_dir: Path | None, sharded: bool, files: ExitStack
) -> tuple[dict, Any, dict | None, Path | None]:
    """(coordinator state, student or None, optimizer state or None, checkpoint directory or None): the
    latest checkpoint's (same stage, step and data order; on another worker count the rest of its epoch
    re-dealt, and one progress line says so), or the top of the run; every worker gets rank 0's state.
    A sharded run's student and optimizer are read from the checkpoint's directory (returned, held open
    by `files`: a checkpoint in a bucket is downloaded once per worker) once they exist."""
    import ray
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    checkpoint = ray.train.get_checkpoint()
    saved_state, student_lm, optimizer_state, local = None, None, None, None
    if checkpoint is not None:
        local = Path(files.enter_context(checkpoint.as_directory()))
        saved_state, student_lm, optimizer_state = load_checkpoint(local, best_dir, sharded)
        if not sharded:
            files.close()
    state = broadcast_from_rank_zero(ray.get(coord.restore.remote(saved_state, world)) if rank == 0 else None)
    if rank == 0 and state["resize"] is not None:
        print(resize_line(state["resize"]), flush=True)
    return state, student_lm, optimizer_state, local if sharded else None


def build_models(
    cfg: RunConfig,
    config: dict,
    device: torch.device,
    student_lm: Any,
    tokenizer: Any,
    specs: list[StageSpec],
    sources: Sources,
) -> tuple[torch.nn.Module, Teachers]:
    """The student as the step takes it (`HiddenStatesLM`: DDP-wrapped, or its LM sharded with
    training.strategy: fsdp) and the run's teachers. `student_lm`: a checkpoint's (DDP), else None."""
    import ray.train.torch

    sharded = cfg.training.strategy == "fsdp"
    if sharded:
        student_lm, cut_from = sharded_student(cfg, device, sources)
    else:
        student_lm, cut_from = initial_student(cfg, sources) if student_lm is None else (student_lm, None)
        if cfg.training.gradient_checkpointing:
            checkpoint_activations(student_lm)
        student_lm.train()
    teachers, logits = run_teachers(cfg, config, device, student_lm, tokenizer, specs, cut_from)
    del cut_from  # no copy of the teacher outside `teachers` (none at all with kd.teacher: cached)
    student = HiddenStatesLM(student_lm, logits, len(tokenizer))
    if sharded:
        return student, teachers
    # Hidden-state stages leave the layers above the matched one without gradient. Buffers (rotary
    # tables, masks) are constants in these models, so they are not re-synced every forward.
    hidden_stages = any(s.stage.target == "hidden" for s in specs)
    return ray.train.torch.prepare_model(
        student, parallel_strategy_kwargs={"find_unused_parameters": hidden_stages, **_NO_BUFFER_SYNC}
    ), teachers


def shard_options(cfg: RunConfig, device: torch.device) -> dict[str, bool]:
    """`sharding.shard_model`'s options from training.fsdp (mixed precision on CUDA only)."""
    f = cfg.training.fsdp or FSDPConfig()
    return {
        "reshard_after_forward": f.reshard_after_forward,
        "cpu_offload": f.cpu_offload,
        "mixed_precision": f.mixed_precision and device.type == "cuda",
    }


def sharded_student(cfg: RunConfig, device: torch.device, sources: Sources) -> tuple[Any, Any]:
    """(the student sharded over every worker, the teacher it was cut from or None): only rank 0 reads
    weights (`initial_student`) and holds the teacher it cut the student from; the others build the
    student on the meta device and receive their shards (`sharding.load_sharded`)."""
    cut: list[Any] = [None]

    def build() -> Any:
        student, cut[0] = initial_student(cfg, sources)
        return student

    training = cfg.training
    lm = load_sharded(
        build,
        device=device,
        trainable=True,
        gradient_checkpointing=training.gradient_checkpointing,
        **shard_options(cfg, device),
    )
    return lm, cut[0]


def initial_student(cfg: RunConfig, sources: Sources) -> tuple[Any, Any]:
    """(the student models.student names, None), or (the student cut from the teacher, the teacher):
    the teacher is read once, in fp32 so the student starts from its exact weights, and then becomes
    the frozen online teacher (cast and moved tensor by tensor) instead of being read twice."""
    m = cfg.models
    if m.student is not None:
        return load_model(sources[STUDENT], dtype=torch.float32), None
    teacher = load_model(sources[TEACHER], dtype=torch.float32)
    return student_from_teacher(teacher, keep_layers=m.student_layers, keep_every=m.student_keep_every), teacher


def run_teachers(
    cfg: RunConfig,
    config: dict,
    device: torch.device,
    student_lm: Any,
    tokenizer: Any,
    specs: list[StageSpec],
    cut_from: Any,
) -> tuple[Teachers, bool]:
    """The run's teachers, chosen here once, and whether every model gives the losses its logits
    (`teacher.logits_form`, decided for the student and every teacher together). A sharded teacher
    (training.teacher_sharding) cut from on rank 0 is adopted on every worker: sharding it is a collective."""
    dtype = resolve_dtype(cfg.models.dtype, device)
    if cfg.kd.teacher == "cached":
        logits = logits_form(student_lm)
        if config["teacher_cache"].get("form") == "hidden":
            head = load_head(config["scores_dir"], dtype, device)
            return CachedTeachers(CachedHiddenTeacher(head, logits, len(tokenizer))), logits
        return CachedTeachers(CachedTopKTeacher()), logits
    teacher = from_wire(config["models"])[TEACHER]
    stage_sources = from_wire(config["stage_teachers"])
    distinct = dict.fromkeys([teacher, *stage_sources.values()])
    teacher_models = [cut_from if s == teacher and cut_from is not None else meta_model(s) for s in distinct]
    logits = logits_form(student_lm, teacher_models)
    shard = {**shard_options(cfg, device), "mixed_precision": False} if cfg.training.sharded_teacher else None
    teachers = OnlineTeachers(teacher, stage_sources, dtype, device, tokenizer, logits, shard)
    if cut_from is not None or (shard is not None and cfg.models.student is None):
        teachers.adopt(cut_from)
    return teachers, logits


def stage_optimizer(
    w: Worker, stage: Stage, steps_done: int, optimizer: torch.optim.Optimizer | None, resuming: bool
) -> torch.optim.Optimizer:
    """The stage's AdamW: fresh where the stage restarts it, the checkpoint's state on a resume that
    lands inside the optimizer's segment (``steps_done`` steps of the stage done)."""
    training = w.cfg.training
    if optimizer is None or stage.restart_optimizer:
        optimizer = adamw(w.student, training.lr, training.weight_decay)
    if resuming and not (steps_done == 0 and stage.restart_optimizer):
        if w.optimizer_state is not None:
            optimizer.load_state_dict(w.optimizer_state)
        elif w.resume is not None:  # sharded: each worker reads its shards (and the student's again, unchanged)
            sharded_checkpoint.load(w.resume / SHARDS, unwrap(w.student).lm, optimizer)
    return optimizer


# ---------------------------------------------------------------------------------------------
# Rows


def stage_reader(w: Worker, index: int, steps_done: int) -> StepReader:
    """This worker's steps of stage ``index`` after its first ``steps_done``, each its micro-batches of
    row dicts, read ahead by a background thread (shards.py): only the row groups that hold its rows,
    with the columns the run's teachers read (a cached teacher's)."""
    import ray

    spec = w.specs[index]
    first_epoch, skip = divmod(steps_done, spec.steps_per_epoch)
    shards = (
        ray.get(w.coord.shard.remote(index, epoch, w.rank))
        for epoch in range(first_epoch, spec.epoch_of(spec.steps - 1) + 1)
    )
    columns = (*ROW_COLUMNS, *w.teachers.columns)
    return StepReader(w.scores, shards, start_step=skip, num_steps=spec.steps - steps_done, columns=columns)


def rows_in_step(spec: StageSpec, stage_step: int, global_batch: int) -> int:
    """Rows (all workers) in step `stage_step` (1-based) of a stage: global_batch, the remainder in
    an epoch's last step (as `shards.worker_shard` cuts it)."""
    k = (stage_step - 1) % spec.steps_per_epoch
    return min(global_batch, spec.pool_rows - k * global_batch)


def step_batches(w: Worker, micro: list[list[dict]], stage: Stage, teacher: Teacher, seed: int) -> list[dict]:
    """One step's device batches: on-policy rows sampled where the stage asks for them (row streams
    seeded by the step's seed, so a restart samples the same responses), then the step's rows
    regrouped by length so each micro-batch pads little."""
    kd, lm = w.cfg.kd, unwrap(w.student).lm
    if kd.on_policy_fraction > 0 and stage.target == "logits":
        offsets = np.cumsum([0, *(len(m) for m in micro)])
        micro = [
            with_on_policy(lm, m, kd, w.tokenizer, w.cfg.data.max_length, seed, int(offset))
            for m, offset in zip(micro, offsets)
        ]
        release(lm)  # a sharded student's root, gathered by generation
    return [build_batch(m, w.tokenizer.pad_token_id, w.device, teacher) for m in length_grouped(micro)]


def with_on_policy(
    model: Any, rows: list[dict], kd: KDConfig, tokenizer: Any, max_length: int, seed: int, row_offset: int
) -> list[dict]:
    """The first round(fraction x rows) rows of a micro-batch (already in random order) replaced by
    the student's own samples for their prompts: tokenizer ids only (never a padding row of its head),
    each ending at eos or the chat template's end of turn (`conversations.stop_token_ids`).
    A sharded student samples even with no row to sample (a one-token prompt, dropped): each generate
    call is a collective, and every worker has as many micro-batches."""
    n = math.floor(kd.on_policy_fraction * len(rows) + 0.5)
    idle = [{"input_ids": [tokenizer.pad_token_id], "num_prompt_tokens": 1}] if n == 0 and is_sharded(model) else []
    sampled = sample_on_policy(
        model,
        rows[:n] or idle,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        max_new_tokens=kd.on_policy_max_new_tokens,
        max_length=max_length,
        seed=seed,
        row_offset=row_offset,
        vocab_size=len(tokenizer),
    )
    return sampled[:n] + rows[n:]


# ---------------------------------------------------------------------------------------------
# Dev set: losses, plateaus, checkpoint selection


def measure_dev(w: Worker, run: StageRun) -> dict[str, float]:
    """The stage's dev losses (`step.dev_losses`), over every worker's dev batches; rank 0 prints a
    progress line for its share when they take a while."""
    return dev_losses(
        w.student,
        run.teacher,
        run.final_teacher,
        w.dev_batches,
        run.stage,
        w.cfg.kd,
        projection=run.projection,
        normalize=w.cfg.curriculum.extraction.normalize,
        autocast=w.autocast,
        on_batch=row_progress_printer(progress_label(w, "dev losses"), len(w.dev_rows)) if w.rank == 0 else None,
    )


def progress_label(w: Worker, what: str) -> str:
    """`train: what` for rank 0's progress lines of work every worker shares, whose rows are rank 0's share."""
    return f"train: {what}" + (f", rank 0 of {w.world}" if w.world > 1 else "")


def row_progress_printer(what: str, total: int, every_s: float = PRINT_SECONDS) -> Callable[[int], None]:
    """A hook that counts rows done out of `total` and prints `progress.progress_line` every
    `every_s` seconds, and once more at the end when it printed before: long work speaks, short
    work stays quiet."""
    started = time.perf_counter()
    done, shown, printed = 0, started, False

    def advance(rows: int) -> None:
        nonlocal done, shown, printed
        done += rows
        now = time.perf_counter()
        if now - shown >= every_s or (printed and done >= total):
            print(progress_line(what, done, total, now - started), flush=True)
            shown, printed = now, True

    return advance


def dev_share(w: Worker) -> list[dict[str, Any]]:
    """This worker's dev rows batched for the dev losses (`in_step`)."""
    micro, teacher = w.cfg.training.micro_batch_size, w.teachers.get()
    return in_step(
        w,
        [
            build_batch(w.dev_rows[i : i + micro], w.tokenizer.pad_token_id, w.device, teacher)
            for i in range(0, max(len(w.dev_rows), 1), micro)
        ],
    )


def probe_share(w: Worker, ranks: np.ndarray) -> list[dict[str, Any]]:
    """This worker's probe rows of one bucket (its share of the ranks), batched as the dev rows are;
    no rows gives one all-masked batch that keeps the worker in the collectives (`in_step`)."""
    rows = read_rows(w.scores, ranks, (*ROW_COLUMNS, *w.teachers.columns))
    micro, teacher = w.cfg.training.micro_batch_size, w.teachers.get()
    return in_step(
        w,
        [
            build_batch(rows[i : i + micro], w.tokenizer.pad_token_id, w.device, teacher)
            for i in range(0, max(len(rows), 1), micro)
        ],
    )


def in_step(w: Worker, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`batches`, and with a sharded student as many all-masked ones (zero tokens) as make every worker's
    count that of the worker with the most: each forward of a sharded model is a collective."""
    if not is_sharded(unwrap(w.student).lm):
        return batches
    padded: list[dict[str, Any]] = []
    in_lockstep(batches, padded.append, build_batch([], w.tokenizer.pad_token_id, w.device, w.teachers.get()))
    return padded


def probe_buckets(w: Worker, run: StageRun, step: int, samples: int, at: str) -> None:
    """The bucket probe (probes.py), at a stage end or selection candidate: every worker measures its
    share of each bucket's fixed rows (`step.probe_losses`) and rank 0 queues one record per bucket
    behind the step records, so they reach metrics.jsonl and the trackers in step order."""
    if not w.probe_batches:
        return
    values = probe_losses(w.student, run.final_teacher, w.probe_batches, run.stage, w.cfg.kd, autocast=w.autocast)
    if w.log is None:
        return
    w.log.queue(
        [
            probe_record(
                step=step,
                stage=run.index,
                samples=samples,
                at=at,
                bucket=b,
                rows=rows,
                tokens=n,
                kd_loss=kd,
                ce_loss=ce,
            )
            for b, (rows, (kd, ce, n)) in enumerate(zip(w.probe_rows, values))
        ]
    )


def plateaued(w: Worker, stage_index: int, dev_loss: float) -> bool:
    """The coordinator's verdict on a plateau stage's latest dev loss, the same on every worker."""
    import ray
    from ray.train.collective import broadcast_from_rank_zero

    return broadcast_from_rank_zero(ray.get(w.coord.report_eval.remote(stage_index, dev_loss)) if w.rank == 0 else None)


def dev_rouge(w: Worker) -> float:
    """Mean dev ROUGE-L ×100 of the student's greedy responses over every worker's dev rows.

    Each worker decodes its own share (the rows of its dev losses) and one all-reduce of (sum, rows)
    gives the mean: the decoding is split across workers instead of idling all but rank 0, and the
    mean is the same for any split."""
    lm = unwrap(w.student).lm
    e = w.cfg.eval
    was_training = lm.training
    lm.eval()
    total = greedy_rouge_sum(
        lm,
        w.tokenizer,
        w.dev_rows,
        max_new_tokens=e.max_new_tokens,
        max_length=w.cfg.data.max_length,
        batch_size=e.batch_size,
        autocast=w.autocast,
        progress=progress_label(w, "dev ROUGE-L") if w.rank == 0 else None,
        lockstep=is_sharded(lm),
    )
    release(lm)
    lm.train(was_training)
    sums = _all_reduce(torch.tensor([total, len(w.dev_rows)], dtype=torch.float64, device=w.device)).tolist()
    return sums[0] / sums[1]


def record_candidate(w: Worker, step: int, stage_index: int, samples: int, dev: dict[str, float]) -> None:
    """A selection candidate: every worker decodes its dev rows (`dev_rouge`); rank 0 hands the
    candidate to the coordinator and, when it is the best so far, saves the student's weights to its
    local `best_dir` (later checkpoints copy them from there); a sharded student is exported there by
    every worker together."""
    import ray

    candidate = {
        "step": step,
        "stage": stage_index,
        "samples": samples,
        "dev_rougeL": dev_rouge(w),
        "dev_kd_loss": dev["dev_kd_loss"],
        "dev_loss": dev["dev_loss"],
    }
    is_best = ray.get(w.coord.select.remote(candidate)) if w.rank == 0 else None
    lm = unwrap(w.student).lm
    if is_sharded(lm):
        from ray.train.collective import broadcast_from_rank_zero

        # Exporting a sharded student gathers it from every worker; rank 0 writes it.
        if broadcast_from_rank_zero(is_best):
            sharded_checkpoint.export_pretrained(lm, w.best_dir)
    if w.rank != 0:
        return
    assert w.best_dir is not None  # rank 0's
    if is_best and not is_sharded(lm):
        lm.save_pretrained(w.best_dir)
    print(
        f"[train] selection candidate at step {candidate['step']}: dev ROUGE-L {candidate['dev_rougeL']:.2f}, "
        f"dev KD loss {candidate['dev_kd_loss']:.4f}{' (best so far)' if is_best else ''}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    directory: Path,
    student: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    best_dir: Path,
    tokenizer=None,
) -> None:
    """Student (HF folder), optimizer, coordinator state and the best candidate's student so far
    (from `best_dir`, once there is one); the tokenizer rides with the final checkpoint's students.
    A sharded student and its optimizer (None here) are in `directory` already (`save_shards`)."""
    if student is not None and optimizer is not None:
        unwrap(student).lm.save_pretrained(directory / "student")
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    students = [directory / "student"]
    if has_model_files(best_dir):
        shutil.copytree(best_dir, directory / "student_best")
        students.append(directory / "student_best")
    if tokenizer is not None:
        for folder in students:
            tokenizer.save_pretrained(folder)
    (directory / "coordinator.json").write_text(json.dumps(state))


def save_shards(w: Worker, directory: Path, optimizer: torch.optim.Optimizer, final: bool) -> Future:
    """Every worker's part of a sharded checkpoint: its shards of the student and the optimizer (DCP,
    student_shards/), written in the background over the gloo group while the loop goes on; in the final
    checkpoint the whole student exported as an HF folder (student/, gathered to rank 0, which writes it).
    The Future is done once the shards are on disk."""
    lm = unwrap(w.student).lm
    written = sharded_checkpoint.save(directory / SHARDS, lm, optimizer, asynchronous=True, process_group=w.gloo)
    assert written is not None
    if final:
        sharded_checkpoint.export_pretrained(lm, directory / "student")
    return written


def load_checkpoint(d: Path, best_dir: Path | None, sharded: bool = False) -> tuple[dict, Any, dict | None]:
    """(coordinator state, student in fp32, optimizer state) of a Ray Train checkpoint's local directory
    (a sharded one's student and optimizer: None, read once they exist); its best candidate's student, if
    it has one, is copied into `best_dir` (rank 0's; None elsewhere)."""
    state = json.loads((d / "coordinator.json").read_text())
    student, optimizer_state = None, None
    if not sharded:
        student = load_model(d / "student", dtype=torch.float32)
        optimizer_state = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
    if best_dir is not None and has_model_files(d / "student_best"):
        shutil.copytree(d / "student_best", best_dir, dirs_exist_ok=True)
    return state, student, optimizer_state


def report_checkpoint(
    w: Worker, metrics: dict, position: Position, optimizer: torch.optim.Optimizer, final: bool
) -> None:
    """A checkpoint reported by every worker: written by rank 0, and with a sharded student each worker's
    shards too (Ray Train puts every worker's directory into the one checkpoint). Step records are handed
    over first, so metrics.jsonl always holds every step up to the latest checkpoint. The copy to storage
    runs in Ray Train's background thread, so the loop waits only for the local write."""
    import ray
    import ray.train

    mode = ray.train.CheckpointUploadMode.ASYNC
    sharded = is_sharded(unwrap(w.student).lm)
    if w.rank != 0 and not sharded:
        ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=mode)
        return
    directory = Path(tempfile.mkdtemp(prefix=f"step_{metrics['step']:08d}-", dir=w.scratch))
    written = save_shards(w, directory, optimizer, final) if sharded else None
    if w.rank == 0:
        assert w.log is not None and w.best_dir is not None  # rank 0's
        state = ray.get(w.coord.checkpoint.remote(asdict(position), w.log.take()))
        student, state_of = (None, None) if sharded else (w.student, optimizer)
        save_checkpoint(directory, student, state_of, state, w.best_dir, w.tokenizer if final else None)
    if written is not None:
        written.result()
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
        checkpoint_dir_name=f"step_{metrics['step']:08d}",
        checkpoint_upload_mode=mode,
    )


# ---------------------------------------------------------------------------------------------
# Step records (rank 0)


def step_meta(
    step: int, stage_step: int, samples: int, stage: Stage, spec: StageSpec, lr: float, started: tuple[float, float]
) -> dict:
    """A metrics.jsonl line without the numbers still on the device. `samples` is the rows of the run
    trained on up to this step (with it), `seconds` the step's wall time as the host saw it,
    `cpu_seconds` the training thread's CPU time in it (robust to other processes on a shared
    machine), `time` its end."""
    record: dict[str, Any] = {
        "step": step,
        "stage": stage.index,
        "epoch": spec.epoch_of(stage_step - 1),
        "stage_step": stage_step,
        "samples": samples,
        "temperature": stage.temperature,
        "kd_weight": stage.kd_weight,
        "pool_rows": spec.pool_rows,
        "lr": lr,
        "seconds": time.perf_counter() - started[0],
        "cpu_seconds": time.thread_time() - started[1],
        "time": time.time(),
        "target": stage.target,
    }
    if stage.target == "hidden":
        record.update(teacher_layer=stage.teacher_layer, student_layer=stage.student_layer)
    return record


class StepLog:
    """Rank 0's step records and its progress line.

    A step's numbers stay on the device until a flush (every LOG_EVERY steps or PRINT_SECONDS,
    whichever comes first, and at every checkpoint): one read-back for many steps, so the loop never
    waits for the GPU to hand over a loss. Flushed records go to the coordinator, which appends them
    to metrics.jsonl on the driver's node; one concise line per flush says where the run is.
    """

    def __init__(self, coord: Any, specs: list[StageSpec], first_step: int):
        self.coord, self.specs = coord, specs
        self.total_steps = sum(s.steps for s in specs)
        self.pending: list[tuple[dict, torch.Tensor]] = []
        self.unsent: list[dict] = []
        self.in_flight = None
        self.started, self.first_step = time.perf_counter(), first_step
        self.last_flush = self.started

    def add(self, meta: dict, values: StepValues, grad_norm: torch.Tensor) -> None:
        self.pending.append((meta, torch.stack([*values, grad_norm]).detach()))
        if len(self.pending) >= LOG_EVERY or time.perf_counter() - self.last_flush >= PRINT_SECONDS:
            self._read_back()
            self._print()
            import ray

            if self.in_flight is not None:
                ray.get(self.in_flight)
            self.in_flight, self.unsent = self.coord.log.remote(self.unsent), []

    def queue(self, records: list[dict]) -> None:
        """Records measured between steps (the bucket probe), sent behind the steps before them."""
        self._read_back()
        self.unsent.extend(records)

    def take(self) -> list[dict]:
        """Every record not yet sent (for the checkpoint, which appends them itself)."""
        self._read_back()
        if self.in_flight is not None:
            import ray

            ray.get(self.in_flight)
            self.in_flight = None
        records, self.unsent = self.unsent, []
        return records

    def _read_back(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for _, v in self.pending]).tolist()
        # Peak device memory so far (the allocator's own count: no sync), for users sizing batches.
        peak = {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}
        for (meta, _), (loss, kd_term, ce_term, ce_tokens, kd_tokens, grad_norm) in zip(self.pending, values):
            self.unsent.append(
                {
                    **meta,
                    "loss": loss,
                    "kd_loss": kd_term,
                    "ce_loss": ce_term,
                    "tokens": int(kd_tokens),
                    "ce_tokens": int(ce_tokens),
                    "grad_norm": grad_norm,
                    **peak,
                }
            )
        self.pending = []
        self.last_flush = time.perf_counter()

    def _print(self) -> None:
        steps = [x for x in self.unsent if not is_probe(x)]
        if not steps:
            return
        r = steps[-1]
        done = r["step"] - self.first_step
        elapsed = time.perf_counter() - self.started
        tokens = sum(x["tokens"] for x in steps) / max(sum(x["seconds"] for x in steps), 1e-9)
        eta = elapsed / max(done, 1) * (self.total_steps - r["step"])
        print(
            f"[train] stage {r['stage'] + 1}/{len(self.specs)} step {r['step']}/{self.total_steps} "
            f"loss {r['loss']:.4f} KD {r['kd_loss']:.4f} T {r['temperature']:.2f} α {r['kd_weight']:.2f} "
            f"{tokens:,.0f} tok/s ETA {duration(eta)}",
            flush=True,
        )
