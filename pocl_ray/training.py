"""Distillation along a curriculum plan on Ray Train: TorchTrainer, DDP workers, exact resume.

Read top to bottom: small pieces (rows by rank, batches, the loss of one micro-batch, the gradient of
one optimizer step, dev evaluation, checkpoints), then `train_func` (what every worker runs: an
explicit loop over stages, epochs and steps), then `train` (the driver: checks before any Ray work,
the CurriculumCoordinator actor, the TorchTrainer, the exported student).

Loss of one optimizer step (METHODS.md §1, §3):
    loss = (1 - alpha) * CE(reference) + alpha * KD_stage(T)
Both terms are sums over response tokens divided by the GLOBAL number of such tokens in the step
(all workers, all micro-batches), so gradient accumulation and data parallelism give the gradient of
one big batch: each worker all-reduces its token counts before the first backward, divides its
local sums by the global counts, and multiplies its loss by the world size before backward because
DDP averages gradients over workers (mean of world x local = sum of local = the global loss).
With on-policy distillation (kd.on_policy_fraction > 0) part of each micro-batch is replaced by
responses the student samples; the KD term covers every row and the CE term only the reference rows,
each with its own global count.
Hidden-state stages (curriculum extraction) use extraction.hidden_match_loss between the student's
layer and the projected teacher layer in place of the KD term.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
import torch.distributed as dist

from pocl_ray.config import ConfigError, KDConfig, RunConfig
from pocl_ray.curriculum import Plan, Stage, StageSpec, coordinator, lr_at, plan_from_config, stage_specs
from pocl_ray.data import collate, generation_batch, read_table, validate_and_tokenize
from pocl_ray.extraction import hidden_match_loss, layer_projection
from pocl_ray.losses import IGNORE_INDEX, KD_KINDS, count_tokens, cross_entropy, kd_loss
from pocl_ray.models import (
    check_compatible,
    hidden_size,
    load_model,
    load_tokenizer,
    resolve_dtype,
    student_from_teacher,
)

SCORE_COLUMNS = ("rank", "input_ids", "labels", "num_prompt_tokens")
LOG_EVERY = 20  # steps between rank 0's batches of step records to the coordinator


# ---------------------------------------------------------------------------------------------
# Rows and batches


def scores_path(scores_dir: Path) -> Path:
    """The scored rows of a scoring output directory (a parquet file or a directory of them)."""
    manifest = scores_dir / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"run `pocl-ray score` first: no scores at {scores_dir} (missing manifest.json)")
    path = scores_dir / json.loads(manifest.read_text()).get("scores_path", "scores.parquet")
    if not path.exists():
        raise FileNotFoundError(f"run `pocl-ray score` first: no scores at {path}")
    return path


def read_rows(dataset: pads.Dataset, ranks: np.ndarray) -> dict[int, dict]:
    """The rows with the given ranks, as {rank: {input_ids, labels, attention_mask, num_prompt_tokens}}.

    Filtered by rank inside pyarrow (the rank range first, so sorted files prune row groups), so a
    worker reads only its own rows.
    """
    if len(ranks) == 0:
        return {}
    wanted = pa.array(np.asarray(ranks, dtype=np.int64))
    rank = pc.field("rank")
    condition = (rank >= int(wanted.to_numpy().min())) & (rank <= int(wanted.to_numpy().max())) & rank.isin(wanted)
    table = dataset.to_table(columns=list(SCORE_COLUMNS), filter=condition)
    got = table.column("rank").to_numpy()
    missing = np.setdiff1d(wanted.to_numpy(), got)
    if len(missing):
        raise ValueError(f"scores have no row with rank {int(missing[0])} ({len(missing)} ranks missing)")
    ids, labels = (table.column(c).combine_chunks() for c in ("input_ids", "labels"))
    id_values, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
    label_values, label_offsets = labels.values.to_numpy(), labels.offsets.to_numpy()
    prompt = table.column("num_prompt_tokens").to_numpy()
    rows = {}
    for i, r in enumerate(got.tolist()):
        input_ids = id_values[id_offsets[i] : id_offsets[i + 1]]
        rows[r] = {
            "input_ids": input_ids,
            "labels": label_values[label_offsets[i] : label_offsets[i + 1]],
            "attention_mask": np.ones(len(input_ids), dtype=np.int64),
            "num_prompt_tokens": int(prompt[i]),
        }
    return rows


def build_batch(rows: list[dict], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Collate rows; `ce_labels` masks the on-policy rows, whose tokens are the student's own.

    No rows (a worker's share of a short last step) gives one all-masked row: it counts zero tokens
    and contributes zero gradient, but keeps the worker in step with the DDP collectives.
    """
    if not rows:
        rows = [{"input_ids": [pad_token_id] * 2, "attention_mask": [1, 1], "labels": [IGNORE_INDEX] * 2}]
    batch = collate(rows, pad_token_id)
    ce_labels = batch["labels"].clone()
    ce_labels[torch.tensor([bool(r.get("on_policy")) for r in rows])] = IGNORE_INDEX
    batch["ce_labels"] = ce_labels
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def sample_responses(model, rows: list[dict], *, pad_token_id: int, eos_token_id: int, max_new_tokens: int, max_length: int) -> list[dict]:
    """On-policy rows: the student samples a response to each row's prompt (temperature 1, full
    vocabulary); the response, up to and including its first EOS, becomes the scored tokens."""
    if not rows:
        return []
    prompts = [list(map(int, r["input_ids"][: r["num_prompt_tokens"]])) for r in rows]
    batch = {k: v.to(next(model.parameters()).device) for k, v in generation_batch(prompts, pad_token_id).items()}
    room = max(1, min(max_new_tokens, max_length - max(len(p) for p in prompts)))
    was_training = model.training
    model.eval()
    out = model.generate(
        **batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=room,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id,
    )
    model.train(was_training)
    sampled = []
    for prompt, new in zip(prompts, out[:, batch["input_ids"].shape[1] :].tolist()):
        if eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
        sampled.append({
            "input_ids": prompt + new,
            "attention_mask": [1] * (len(prompt) + len(new)),
            "labels": [IGNORE_INDEX] * len(prompt) + new,
            "on_policy": True,
        })
    return sampled


# ---------------------------------------------------------------------------------------------
# Loss and gradient


def unwrap(model):
    """The bare model inside a DDP wrapper (prepare_model only wraps when world size > 1)."""
    return getattr(model, "module", model)


def token_counts(batch: dict[str, torch.Tensor], stage: Stage) -> torch.Tensor:
    """[CE tokens, KD tokens] of a batch: shifted response positions for output losses, the response
    positions themselves for hidden-state matching (as hidden_match_loss scores them)."""
    kd_tokens = (batch["labels"] != IGNORE_INDEX).sum() if stage.target == "hidden" else count_tokens(batch["labels"])
    return torch.stack([count_tokens(batch["ce_labels"]), kd_tokens])


def forward_pair(student, teacher, batch: dict[str, torch.Tensor], stage: Stage):
    """Student outputs (with graph) and frozen-teacher outputs (None when the stage needs no teacher)."""
    hidden = stage.target == "hidden"
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_out = student(**inputs, output_hidden_states=hidden)
    t_out = None
    if stage.kd_weight > 0:
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=hidden)
    return s_out, t_out


def stage_terms(
    s_out, t_out, batch: dict[str, torch.Tensor], stage: Stage, kd: KDConfig, n_ce, n_kd,
    projection: torch.Tensor | None = None, normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KD term, CE term) of one micro-batch, each a local sum over the global token counts."""
    alpha = stage.kd_weight
    if t_out is None:
        kd_term = s_out.logits.new_zeros((), dtype=torch.float32)
    elif stage.target == "hidden":
        kd_term = hidden_match_loss(
            s_out.hidden_states[stage.student_layer], t_out.hidden_states[stage.teacher_layer], projection,
            batch["labels"], normalize=normalize, num_tokens=n_kd,
        )
    else:
        kd_term = kd_loss(
            stage.loss, s_out.logits, t_out.logits, batch["labels"], temperature=stage.temperature,
            scale_by_t2=kd.scale_by_t2, alpha=kd.skew_alpha, beta=kd.js_beta, mu=kd.akl_mu,
            num_tokens=n_kd, chunk_size=kd.chunk_size,
        )
    # With alpha = 1 the CE term is only logged, so it is computed without a graph.
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):
        ce_term = cross_entropy(s_out.logits, batch["ce_labels"], num_tokens=n_ce, chunk_size=kd.chunk_size)
    return (1 - alpha) * ce_term + alpha * kd_term, kd_term, ce_term


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def accumulate_gradients(
    student, teacher, batches: list[dict[str, torch.Tensor]], stage: Stage, kd: KDConfig, *,
    projection: torch.Tensor | None = None, normalize: bool = True, autocast=nullcontext,
) -> torch.Tensor:
    """Forward + backward of this worker's micro-batches of one optimizer step.

    Returns [loss, KD, CE, CE tokens, KD tokens] summed over all workers (the step's global values).
    Gradients are synchronised once, on the last micro-batch (DDP no_sync before it).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    counts = _all_reduce(torch.stack([token_counts(b, stage) for b in batches]).sum(0))
    n_ce, n_kd = counts[0], counts[1]
    sums = torch.zeros(3, device=counts.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last or not hasattr(student, "no_sync") else student.no_sync():
            with autocast():
                s_out, t_out = forward_pair(student, teacher, batch, stage)
                loss, kd_term, ce_term = stage_terms(s_out, t_out, batch, stage, kd, n_ce, n_kd, projection, normalize)
            (loss * world).backward()
        sums += torch.stack([loss, kd_term, ce_term]).detach().float()
    return torch.cat([_all_reduce(sums), counts.float()])


def adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, not on biases and norm gains (our choice, as nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def optimizer_step(model, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float) -> float:
    """Set the LR, clip the (already synchronised) gradient, step, clear; returns the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one worker's step (dropout, sampling), so a restart replays it exactly."""
    return int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1)[0])


@torch.no_grad()
def dev_losses(
    student, teacher, batches: list[dict[str, torch.Tensor]], stage: Stage, kd: KDConfig, *,
    projection: torch.Tensor | None = None, normalize: bool = True, autocast=nullcontext,
) -> dict[str, float]:
    """Global dev losses of this worker's dev batches (all workers together): `dev_loss`, the
    stage's own objective (what plateau detection watches), and `dev_kd_loss`, forward KL at T = 1
    without T² (comparable across stages, plans and KD losses: the tuning objective)."""
    student = unwrap(student)
    was_training = student.training
    student.eval()
    hidden = stage.target == "hidden"
    counts = _all_reduce(
        torch.stack([torch.cat([token_counts(b, stage), count_tokens(b["labels"]).view(1)]) for b in batches]).sum(0)
    )
    sums = torch.zeros(2, device=counts.device)
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with autocast():
            s_out = student(**inputs, output_hidden_states=hidden)
            t_out = teacher(**inputs, output_hidden_states=hidden)
            loss, _, _ = stage_terms(s_out, t_out if stage.kd_weight > 0 else None, batch, stage, kd,
                                     counts[0], counts[1], projection, normalize)
            fkl = kd_loss("fkl", s_out.logits, t_out.logits, batch["labels"], temperature=1.0,
                          scale_by_t2=False, num_tokens=counts[2], chunk_size=kd.chunk_size)
        sums += torch.stack([loss, fkl]).float()
    sums = _all_reduce(sums)
    student.train(was_training)
    return {"dev_loss": float(sums[0]), "dev_kd_loss": float(sums[1])}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(directory: Path, student, optimizer, state: dict, tokenizer=None) -> None:
    """Student (HF folder), optimizer and coordinator state; the tokenizer rides with the final one."""
    unwrap(student).save_pretrained(directory / "student")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / "student")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "coordinator.json").write_text(json.dumps(state))


def load_checkpoint(checkpoint) -> tuple[dict, object, dict]:
    """(coordinator state, student in fp32, optimizer state) of a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / "coordinator.json").read_text())
        student = load_model(d / "student", dtype=torch.float32)
        optimizer_state = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
    return state, student, optimizer_state


# ---------------------------------------------------------------------------------------------
# The worker


def initial_student(cfg: RunConfig):
    """The configured student in fp32, or one cut from the teacher's layers."""
    if cfg.models.student is not None:
        return load_model(cfg.models.student, dtype=torch.float32)
    teacher = load_model(cfg.models.teacher, dtype=torch.float32)
    return student_from_teacher(teacher, keep_layers=cfg.models.student_layers, keep_every=cfg.models.student_keep_every)


def _micro_batches(rows: dict[int, dict], step: list[np.ndarray]) -> list[list[dict]]:
    return [[rows[int(r)] for r in micro] for micro in step]


def _broadcast(value, rank: int):
    """Rank 0's Python value on every worker."""
    box = [value if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def train_func(config: dict) -> None:
    """One training worker: restore, build models, then stages -> epochs -> optimizer steps."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(config["cfg"])
    t, kd, ex = cfg.training, cfg.kd, cfg.curriculum.extraction
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    coord = ray.get_actor(config["coordinator"], namespace=config["namespace"])
    scores = pads.dataset(config["scores_path"], format="parquet")
    torch.manual_seed(t.seed)

    # Where to start: the latest checkpoint's position (same stage, step and data order), or the top.
    checkpoint = ray.train.get_checkpoint()
    saved_state, student, optimizer_state = load_checkpoint(checkpoint) if checkpoint else (None, None, None)
    state = _broadcast(ray.get(coord.restore.remote(saved_state)) if rank == 0 else None, rank)
    plan = Plan.from_dict(state["plan"])
    position = state["position"]

    # Models: the student (from the checkpoint or the config) wrapped for DDP; teachers frozen, per stage.
    tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.teacher)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    student = student if student is not None else initial_student(cfg)
    student.train()
    # Hidden-state stages leave the layers above the matched one without gradient. Buffers (rotary
    # tables, masks) are constants in these models, so they are not re-broadcast every forward.
    hidden_stages = any(s.target == "hidden" for s in plan.stages)
    student = ray.train.torch.prepare_model(
        student, parallel_strategy_kwargs={"find_unused_parameters": hidden_stages, "broadcast_buffers": False}
    )
    teacher, teacher_path = None, None
    dev_rows = config["dev_rows"][rank::world]
    dev_batches = [
        build_batch(dev_rows[i : i + t.micro_batch_size], pad_id, device)
        for i in range(0, max(len(dev_rows), 1), t.micro_batch_size)
    ] if config["dev_rows"] else []

    step, optimizer, pending, in_flight = position["step"], None, [], None
    for stage_index in range(position["stage"], len(plan.stages)):
        spec: StageSpec = ray.get(coord.stage.remote(stage_index))
        stage = spec.stage
        if teacher_path != (stage.teacher or cfg.models.teacher):
            teacher_path = stage.teacher or cfg.models.teacher
            teacher = load_model(teacher_path, dtype=resolve_dtype(cfg.models.dtype, device), device=device, frozen=True)
            check_compatible(teacher, unwrap(student), tokenizer)
        resume_here = stage_index == position["stage"]
        stage_step = position["stage_step"] if resume_here else 0
        if optimizer is None or stage.restart_optimizer:
            optimizer = adamw(student, t.lr, t.weight_decay)
        if resume_here and optimizer_state is not None and not (stage_step == 0 and stage.restart_optimizer):
            optimizer.load_state_dict(optimizer_state)
        projection = None
        if stage.target == "hidden":
            projection = layer_projection(hidden_size(teacher), hidden_size(unwrap(student)), stage.teacher_layer,
                                          seed=ex.seed, kind=ex.projection).to(device)
        terms = {"projection": projection, "normalize": ex.normalize, "autocast": autocast}

        epoch, epoch_steps, rows, stop = None, None, None, False
        while stage_step < spec.steps and not stop:
            # This worker's rows of the epoch: ranks from the coordinator, tokens read from the scores.
            if spec.epoch_of(stage_step) != epoch:
                epoch = spec.epoch_of(stage_step)
                epoch_steps = ray.get(coord.shard.remote(stage_index, epoch, rank, world))
                rows = read_rows(scores, np.concatenate([m for s in epoch_steps for m in s] or [np.zeros(0, np.int64)]))
            started, cpu_started = time.perf_counter(), time.thread_time()
            torch.manual_seed(step_seed(t.seed, step, rank))
            micro = _micro_batches(rows, epoch_steps[stage_step % spec.steps_per_epoch])
            if kd.on_policy_fraction > 0 and stage.target == "logits":
                micro = [_with_on_policy(unwrap(student), m, kd, pad_id, eos_id, cfg.data.max_length) for m in micro]
            batches = [build_batch(m, pad_id, device) for m in micro]

            out = accumulate_gradients(student, teacher, batches, stage, kd, **terms)
            lr = lr_at(spec.lr_offset + stage_step, spec.lr_total, t.lr, t.min_lr, t.warmup_steps)
            optimizer_step(student, optimizer, lr, t.grad_clip)
            step, stage_step = step + 1, stage_step + 1

            if rank == 0:
                seconds = (time.perf_counter() - started, time.thread_time() - cpu_started)
                pending.append(_record(step, stage_step, epoch, stage, spec, out, lr, seconds))
                if len(pending) >= LOG_EVERY:
                    if in_flight is not None:
                        ray.get(in_flight)
                    in_flight, pending = coord.log.remote(pending), []

            report = {}
            if stage.until_plateau and stage_step % t.eval_every == 0 and stage_step < spec.steps and dev_batches:
                report = dev_losses(student, teacher, dev_batches, stage, kd, **terms)
                stop = _broadcast(ray.get(coord.report_eval.remote(stage_index, report["dev_loss"])) if rank == 0 else None, rank)
            stage_done = stop or stage_step == spec.steps
            if stage_done or step % t.checkpoint_every == 0:
                if dev_batches and not report:
                    report = dev_losses(student, teacher, dev_batches, stage, kd, **terms)
                next_position = (
                    {"stage": stage_index + 1, "stage_step": 0, "step": step}
                    if stage_done else {"stage": stage_index, "stage_step": stage_step, "step": step}
                )
                metrics = {"step": step, "stage": stage_index, "epoch": epoch, "loss": float(out[0]),
                           "stages_completed": next_position["stage"], **report}
                final = stage_done and stage_index == len(plan.stages) - 1
                _report(coord, rank, metrics, next_position, pending, student, optimizer, tokenizer if final else None)
                pending, in_flight = [], None


def _with_on_policy(model, rows: list[dict], kd: KDConfig, pad_id: int, eos_id: int, max_length: int) -> list[dict]:
    """The first round(fraction x rows) rows of a micro-batch (already in random order) replaced by
    the student's own samples for their prompts."""
    n = math.floor(kd.on_policy_fraction * len(rows) + 0.5)
    sampled = sample_responses(model, rows[:n], pad_token_id=pad_id, eos_token_id=eos_id,
                               max_new_tokens=kd.on_policy_max_new_tokens, max_length=max_length)
    return sampled + rows[n:]


def _record(
    step: int, stage_step: int, epoch: int, stage: Stage, spec: StageSpec, out: torch.Tensor, lr: float,
    seconds: tuple[float, float],
) -> dict:
    """One metrics.jsonl line. `seconds` is the step's wall time; `cpu_seconds` the training
    thread's CPU time in it (robust to other processes on a shared machine); `time` its end."""
    loss, kd_term, ce_term, ce_tokens, kd_tokens = out.tolist()
    record = {
        "step": step, "stage": stage.index, "epoch": epoch, "stage_step": stage_step,
        "temperature": stage.temperature, "kd_weight": stage.kd_weight, "pool_rows": spec.pool_rows,
        "loss": loss, "kd_loss": kd_term, "ce_loss": ce_term, "lr": lr, "tokens": int(kd_tokens),
        "ce_tokens": int(ce_tokens), "seconds": seconds[0], "cpu_seconds": seconds[1], "time": time.time(),
        "target": stage.target,
    }
    if stage.target == "hidden":
        record.update(teacher_layer=stage.teacher_layer, student_layer=stage.student_layer)
    return record


def _report(coord, rank: int, metrics: dict, position: dict, pending: list[dict], student, optimizer, tokenizer) -> None:
    """A checkpoint (rank 0 writes it) reported by every worker; step records are flushed first, so
    metrics.jsonl always holds every step up to the latest checkpoint."""
    import ray
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = ray.get(coord.checkpoint.remote(position, pending))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), student, optimizer, state, tokenizer)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{metrics['step']:08d}")


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path  # DIR/train
    student_dir: Path
    metrics_path: Path
    plan_path: Path
    checkpoint_path: str
    steps: int
    stages_completed: int
    metrics: dict  # the last checkpoint's report (step, stage, loss, dev_loss, dev_kd_loss, ...)
    dev_rejected: int
    wall_seconds: float


def _layer_counts(cfg: RunConfig) -> tuple[int, int]:
    """Teacher and student layer counts from the model configs, without loading weights."""
    from transformers import AutoConfig

    def layers(path: str) -> int:
        return AutoConfig.from_pretrained(path).get_text_config().num_hidden_layers

    teacher = layers(cfg.models.teacher)
    if cfg.models.student is not None:
        return teacher, layers(cfg.models.student)
    if cfg.models.student_layers is not None:
        return teacher, len(cfg.models.student_layers)
    # models.student_from_teacher's default: every k-th layer counting back from the last.
    return teacher, len(range(teacher - 1, -1, -cfg.models.student_keep_every))


def _check_models(cfg: RunConfig, plan: Plan) -> None:
    paths = {"models.teacher": cfg.models.teacher, "models.student": cfg.models.student,
             "models.tokenizer": cfg.models.tokenizer}
    paths.update({f"curriculum.progressive.teacher_checkpoints[{s.index}]": s.teacher for s in plan.stages})
    for field, path in paths.items():
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{field}: model folder not found: {path}")


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Model paths made absolute here, on the driver: workers need not share its working directory."""
    m, p = cfg.models, cfg.curriculum.progressive

    def absolute(path: str | None) -> str | None:
        return None if path is None or "://" in path else str(Path(path).resolve())

    return cfg.with_overrides({
        "models.teacher": absolute(m.teacher), "models.student": absolute(m.student),
        "models.tokenizer": absolute(m.tokenizer),
        "curriculum.progressive.teacher_checkpoints": [absolute(c) for c in p.teacher_checkpoints],
    })


def run_plan(cfg: RunConfig) -> Plan:
    """The curriculum plan `train` follows for cfg (extraction plans read the models' layer counts)."""
    counts = _layer_counts(cfg) if cfg.curriculum.plan == "extraction" else (None, None)
    try:
        return plan_from_config(cfg, *counts)
    except ValueError as err:
        raise ConfigError(f"curriculum: {err}") from None


def _check_plan(cfg: RunConfig, plan: Plan) -> None:
    """Stage settings the workers would only trip over mid-run: KD loss kinds and matched layers."""
    for s in plan.stages:
        if s.target == "logits" and s.kd_weight > 0 and s.loss not in KD_KINDS:
            raise ConfigError(f"stage {s.index}: unknown KD loss {s.loss!r}; allowed: {', '.join(KD_KINDS)}")
    hidden = [s for s in plan.stages if s.target == "hidden"]
    if not hidden:
        return
    teacher_layers, student_layers = _layer_counts(cfg)
    for s in hidden:
        if not 0 <= s.teacher_layer <= teacher_layers:
            raise ConfigError(f"stage {s.index}: teacher layer {s.teacher_layer} outside 0..{teacher_layers}")
        if not 0 <= s.student_layer <= student_layers:
            raise ConfigError(
                f"curriculum.extraction.layer_map: student layer {s.student_layer} (stage {s.index}) "
                f"outside 0..{student_layers}"
            )


def _num_ranked_rows(dataset: pads.Dataset, scores_dir: Path) -> int:
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


def _dev_rows(cfg: RunConfig, plan: Plan) -> tuple[list[dict], int]:
    """Tokenised dev rows (small; shipped to the workers with the config) and the rejected count."""
    if cfg.data.dev is None:
        if any(s.until_plateau for s in plan.stages):
            raise ConfigError("curriculum.advance: 'plateau' needs a dev set (data.dev) to watch")
        return [], 0
    tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.teacher)
    good, rejects = validate_and_tokenize(read_table(cfg.data.dev, cfg.data.format).to_pylist(), tokenizer, cfg.data)
    if not good:
        raise ValueError(f"data.dev: no usable row in {cfg.data.dev} ({len(rejects)} rejected, e.g. {rejects[0]['reason'] if rejects else ''})")
    keep = ("input_ids", "labels", "attention_mask", "num_prompt_tokens")
    return [{k: r[k] for k in keep} for r in good], len(rejects)


def _storage_path(cfg: RunConfig, out: Path) -> str:
    path = cfg.training.storage_path
    if path is None:
        return str(out / "checkpoints")
    return path if "://" in path else str(Path(path).resolve())


def train(
    cfg: RunConfig, scores_dir: str | Path | None = None, *, plan: Plan | None = None, callbacks: list | None = None
) -> TrainResult:
    """Distil the student along the configured plan (or `plan`, any Plan); outputs under
    OUTPUT/train (CONTRACTS.md).

    A second call with the same config `name` and output directory resumes from the latest
    checkpoint. `callbacks` go to Ray Train's RunConfig (Tune passes its report callback here).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.time()
    cfg = _absolute_paths(cfg)
    out = Path(cfg.output.dir).resolve() / "train"
    scores_dir = Path(scores_dir).resolve() if scores_dir is not None else out.parent / "scores"
    scores = scores_path(scores_dir)
    dataset = pads.dataset(str(scores), format="parquet")
    num_rows = _num_ranked_rows(dataset, scores_dir)
    plan = plan if plan is not None else run_plan(cfg)
    _check_plan(cfg, plan)
    _check_models(cfg, plan)
    t = cfg.training
    try:
        specs = stage_specs(plan, num_rows, t.global_batch_size)
    except ValueError as err:
        raise ConfigError(f"curriculum.num_buckets: {err}") from None
    dev_rows, dev_rejected = _dev_rows(cfg, plan)

    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps({
        "plan": plan.to_dict(), "num_rows": num_rows, "global_batch_size": t.global_batch_size,
        "stages": [{k: v for k, v in s.to_dict().items() if k != "stage"} for s in specs],
        "total_steps": sum(s.steps for s in specs),
    }, indent=1))
    metrics_path = out / "metrics.jsonl"

    if not ray.is_initialized():
        ray.init()
    name = f"pocl-coordinator-{cfg.name}-{uuid.uuid4().hex[:8]}"
    coord = coordinator(name, plan=plan, num_rows=num_rows, global_batch=t.global_batch_size,
                        micro_batch=t.micro_batch_size, seed=t.seed, metrics_path=str(metrics_path))
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "coordinator": name,
            "namespace": ray.get_runtime_context().namespace,
            "scores_path": str(scores),
            "dev_rows": dev_rows,
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RayRunConfig(
            name=cfg.name, storage_path=_storage_path(cfg, out),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    finally:
        ray.kill(coord)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.name!r} ended without a checkpoint")

    # The student is copied from the final checkpoint in (shared) storage, so this works from any node.
    student_dir = out / "student"
    shutil.rmtree(student_dir, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "student", student_dir)
    metrics = dict(result.metrics or {})
    return TrainResult(
        output_dir=out, student_dir=student_dir, metrics_path=metrics_path, plan_path=plan_path,
        checkpoint_path=result.checkpoint.path, steps=int(metrics.get("step", 0)),
        stages_completed=int(metrics.get("stages_completed", 0)), metrics=metrics,
        dev_rejected=dev_rejected, wall_seconds=time.time() - started,
    )
