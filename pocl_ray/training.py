"""Distillation along a curriculum plan on Ray Train: TorchTrainer, DDP workers, exact resume.

Read top to bottom: small pieces (rows and batches, the models as the losses see them, the loss of
one micro-batch, the gradient of one optimizer step, dev evaluation, checkpoints, checkpoint
selection, rank 0's step log), then the worker (`setup_worker`, then `train_func`: for each stage,
for each step), then `train` (the driver: checks before any Ray work, the CurriculumCoordinator
actor, the TorchTrainer, the exported students and selection.json).

Checkpoint selection (METHODS.md §5): every stage end (and every training.select_every steps) is a
candidate, scored by the dev ROUGE-L of greedy responses and the dev KD loss; the coordinator keeps
the candidates (they ride in every checkpoint, so a resume keeps them) and says when one is the best
so far, rank 0 then keeps a copy of its weights on local disk, and every later checkpoint carries
that copy as student_best/. `train` exports it next to the final student.

Loss of one optimizer step (METHODS.md §1, §3):
    loss = (1 - kd_weight) * CE(reference) + kd_weight * KD_stage(T)    (METHODS.md's POCL alpha)
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

Speed (issue: the step as fast as a hand-written loop): neither model computes full-vocabulary
logits; the losses start from the final hidden states and apply the LM heads chunk by chunk at the
scored positions only (`HiddenStatesLM`, `losses.linear_kd_and_ce`). A step never waits for the GPU:
losses, token counts and gradient norms stay on the device until rank 0 reads a batch of steps back
(`StepLog`). Micro-batches are regrouped by length inside each step and padded to a multiple of 8;
the copy of a checkpoint to storage runs in the background.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pocl_ray.config import ConfigError, KDConfig, RunConfig
from pocl_ray.coordinator import best_candidate, coordinator
from pocl_ray.curriculum import Plan, Stage, StageSpec, lr_at, plan_from_config, stage_specs
from pocl_ray.data import IGNORE_INDEX, collate, read_table, validate_and_tokenize
from pocl_ray.evaluation import greedy_rouge_sum
from pocl_ray.extraction import hidden_match_loss, layer_projection
from pocl_ray.losses import (
    KD_KINDS,
    cached_kd_and_ce,
    count_tokens,
    cross_entropy,
    kd_loss,
    linear_kd_and_ce,
)
from pocl_ray.models import (
    check_compatible,
    checkpoint_activations,
    has_model_files,
    hidden_size,
    linear_head,
    load_model,
    load_tokenizer,
    resolve_dtype,
    student_from_teacher,
)
from pocl_ray.sampling import sample_on_policy
from pocl_ray.scores import scores_path
from pocl_ray.shards import ROW_COLUMNS, ScoresIndex, StepReader
from pocl_ray.teacher_cache import (
    CACHE_COLUMNS,
    HIDDEN_COLUMNS,
    HiddenCache,
    TeacherCache,
    cache_rows,
    check_teacher_cache,
    collate_teacher_cache,
    load_head,
    teacher_hidden_states,
)

SCORE_COLUMNS = ("rank", "input_ids", "labels", "num_prompt_tokens")
LOG_EVERY = 20  # at most this many steps between rank 0's read-backs of step records
PRINT_SECONDS = 10.0  # at most this long between progress lines (and read-backs)


# ---------------------------------------------------------------------------------------------
# Rows and batches


def length_grouped(micro: list[list[dict]]) -> list[list[dict]]:
    """A step's rows regrouped into as many micro-batches, shortest rows together, so each pads little.

    The gradient of the step does not change (the loss is a sum over tokens divided by global
    counts); the grouping is a stable sort of a seeded order, so a restart regroups identically.
    """
    rows = sorted((r for m in micro for r in m), key=lambda r: len(r["input_ids"]))
    sizes = [len(c) for c in np.array_split(np.arange(len(rows)), len(micro))]
    bounds = np.cumsum([0, *sizes])
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def build_batch(rows: list[dict], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Collate rows (padded to a multiple of 8, for tensor-core shapes) onto the device; `ce_labels`
    masks the on-policy rows, whose tokens are the student's own.

    No rows (a worker's share of a short last step) gives one all-masked row: it counts zero tokens
    and contributes zero gradient, but keeps the worker in step with the DDP collectives.
    Host-to-GPU copies go from pinned memory without blocking, so the copy overlaps the previous
    micro-batch's compute.
    """
    if not rows:
        rows = [{"input_ids": [pad_token_id] * 2, "attention_mask": [1, 1], "labels": [IGNORE_INDEX] * 2}]
    batch = collate(rows, pad_token_id, pad_to_multiple_of=8)
    ce_labels = batch["labels"].clone()
    ce_labels[torch.tensor([bool(r.get("on_policy")) for r in rows])] = IGNORE_INDEX
    batch["ce_labels"] = ce_labels
    # The positions whose logits the output losses score (CE's are a subset), found here on the host.
    row, column = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero().unbind(1)
    batch["scored_positions"] = row * batch["labels"].shape[1] + column
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Models as the losses see them


class LMOutputs(NamedTuple):
    final: torch.Tensor  # final normed hidden states (batch, seq, hidden), or logits when the head is not plain
    hidden_states: tuple[torch.Tensor, ...] | None  # every layer's, when asked for
    head: torch.Tensor | None  # the LM head weight (vocab, hidden) as the loss must use it; None with logits


class HiddenStatesLM(torch.nn.Module):
    """A causal LM whose forward stops before its LM head.

    The losses apply the head themselves, chunk by chunk at the scored positions only
    (`losses.linear_kd_and_ce`), so no full-vocabulary logits exist for prompt or padding positions.
    The student is wrapped in this before DDP, so its forward still runs through the DDP module and
    gradients synchronise. The head comes out of the forward as a view, so DDP sees it as used (its
    unused-parameter search starts from the outputs) although it enters the graph in the loss.
    With `plain_head` False (a head that is not a plain `hidden @ W.T`, or a teacher with one) the
    forward returns the model's own logits and the losses take the logits path.
    """

    def __init__(self, lm, plain_head: bool = True):
        super().__init__()
        self.lm = lm
        self.plain_head = plain_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False
    ) -> LMOutputs:
        # use_cache=False: a training forward has no use for the KV cache HF would otherwise build.
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "output_hidden_states": output_hidden_states,
            "use_cache": False,
        }
        if self.plain_head:
            out = self.lm.base_model(**inputs)
            head = self.lm.get_output_embeddings().weight
            return LMOutputs(out.last_hidden_state, out.hidden_states, head.view_as(head))
        out = self.lm(**inputs)
        return LMOutputs(out.logits, out.hidden_states, None)


def plain_heads(*models) -> bool:
    """True when every model's logits are `hidden @ head.T`; otherwise says in one line why not."""
    for model in models:
        weight, reason = linear_head(model.lm if isinstance(model, HiddenStatesLM) else model)
        if weight is None:
            print(f"[pocl-ray] KD on full-vocabulary logits: {reason}", flush=True)
            return False
    return True


# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers and warns on the old name.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def unwrap(model):
    """The bare module inside a DDP wrapper (prepare_model only wraps when world size > 1)."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------
# Loss and gradient


def token_counts(batch: dict[str, torch.Tensor], stage: Stage) -> torch.Tensor:
    """[CE tokens, KD tokens] of a batch: shifted response positions for output losses, the response
    positions themselves for hidden-state matching (as hidden_match_loss scores them)."""
    kd_tokens = (batch["labels"] != IGNORE_INDEX).sum() if stage.target == "hidden" else count_tokens(batch["labels"])
    return torch.stack([count_tokens(batch["ce_labels"]), kd_tokens])


def forward_pair(student, teacher, batch: dict[str, torch.Tensor], stage: Stage):
    """Student outputs (with graph) and the teacher's (None when the stage needs no teacher): the
    frozen teacher's forward, or with `teacher` None (kd.teacher: cached) the batch's cache."""
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "output_hidden_states": stage.target == "hidden",
    }
    s_out = student(**inputs)
    t_out = None
    if stage.kd_weight > 0 and teacher is None:
        t_out = cached_teacher(batch, logits=s_out.head is None)
    elif stage.kd_weight > 0:
        with torch.no_grad():
            t_out = teacher(**inputs)
    return s_out, t_out


def cached_teacher(batch: dict, logits: bool) -> LMOutputs | TeacherCache:
    """A batch's cached teacher as the losses take it: the top-K form as it is; the hidden form as an
    online teacher's outputs (its final hidden states and LM head, or, when ``logits``, for a student
    whose head is not plain, their logits)."""
    cache = batch["teacher_cache"]
    if not isinstance(cache, HiddenCache):
        return cache
    head = batch["teacher_head"]
    hidden = teacher_hidden_states(cache, batch["scored_positions"], tuple(batch["labels"].shape), head)
    return LMOutputs(F.linear(hidden, head), None, None) if logits else LMOutputs(hidden, None, head)


def output_terms(
    s: LMOutputs,
    t: LMOutputs | TeacherCache | None,
    batch: dict[str, torch.Tensor],
    stage: Stage,
    kd: KDConfig,
    n_ce,
    n_kd,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight·KD + (1 − kd_weight)·CE, KD, CE) on the output distribution, the last two detached;
    without teacher outputs `t` the loss is CE. One pass over the scored positions on the hidden-state
    path; the logits path for heads that are not plain; a cached teacher's top-K form (METHODS.md §4)
    (its hidden form comes as teacher outputs, `cached_teacher`)."""
    kd_weight = stage.kd_weight if t is not None else 0.0
    options = {
        "temperature": stage.temperature,
        "scale_by_t2": kd.scale_by_t2,
        "skew_alpha": kd.skew_alpha,
        "beta": kd.js_beta,
        "mu": kd.akl_mu,
        "chunk_positions": kd.chunk_positions,
    }
    if isinstance(t, TeacherCache):
        return cached_kd_and_ce(
            stage.loss,
            s.final,
            s.head,
            t,
            batch["labels"],
            batch["ce_labels"],
            kd_weight=kd_weight,
            num_tokens=n_kd,
            ce_num_tokens=n_ce,
            scored_positions=batch["scored_positions"],
            **options,
        )
    if s.head is not None:
        return linear_kd_and_ce(
            stage.loss,
            s.final,
            s.head,
            t.final if t is not None else None,
            t.head if t is not None else None,
            batch["labels"],
            batch["ce_labels"],
            kd_weight=kd_weight,
            num_tokens=n_kd,
            ce_num_tokens=n_ce,
            scored_positions=batch["scored_positions"],
            **options,
        )
    ce_term = cross_entropy(
        s.final,
        batch["ce_labels"],
        num_tokens=n_ce,
        chunk_positions=kd.chunk_positions,
        scored_positions=batch["scored_positions"],
    )
    if t is None:
        return ce_term, torch.zeros_like(ce_term), ce_term.detach()
    kd_term = kd_loss(
        stage.loss,
        s.final,
        t.final,
        batch["labels"],
        num_tokens=n_kd,
        scored_positions=batch["scored_positions"],
        **options,
    )
    return kd_weight * kd_term + (1 - kd_weight) * ce_term, kd_term.detach(), ce_term.detach()


def stage_terms(
    s_out: LMOutputs,
    t_out: LMOutputs | None,
    batch: dict[str, torch.Tensor],
    stage: Stage,
    kd: KDConfig,
    n_ce,
    n_kd,
    projection: torch.Tensor | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KD term, CE term) of one micro-batch, each a local sum over the global token counts;
    the loss carries the graph, the terms are for logging."""
    if stage.target == "logits":
        return output_terms(s_out, t_out, batch, stage, kd, n_ce, n_kd)
    kd_weight = stage.kd_weight
    # With kd_weight = 1 the CE term of a hidden stage is only logged, so it is computed without a graph.
    with torch.set_grad_enabled(torch.is_grad_enabled() and kd_weight < 1):
        ce_term, _, _ = output_terms(s_out, None, batch, stage, kd, n_ce, n_kd)
    kd_term = torch.zeros_like(ce_term)
    if t_out is not None:
        kd_term = hidden_match_loss(
            s_out.hidden_states[stage.student_layer],
            t_out.hidden_states[stage.teacher_layer],
            projection,
            batch["labels"],
            normalize=normalize,
            num_tokens=n_kd,
        )
    return (1 - kd_weight) * ce_term + kd_weight * kd_term, kd_term.detach(), ce_term.detach()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def accumulate_gradients(
    student,
    teacher,
    batches: list[dict[str, torch.Tensor]],
    stage: Stage,
    kd: KDConfig,
    *,
    projection: torch.Tensor | None = None,
    normalize: bool = True,
    autocast=nullcontext,
) -> torch.Tensor:
    """Forward + backward of this worker's micro-batches of one optimizer step.

    Returns [loss, KD, CE, CE tokens, KD tokens] summed over all workers (the step's global values),
    on the device: reading it back is the caller's choice, so a step never waits for the GPU.
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
    """AdamW with weight decay on matrices only, not on biases and norm gains (our choice, as nanoGPT);
    the fused CUDA kernel on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=params[0].device.type == "cuda")


def optimizer_step(model, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float) -> torch.Tensor:
    """Set the LR, clip the (already synchronised) gradient, step, clear; returns the gradient norm
    (a device tensor: no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one worker's step (dropout, sampling), so a restart replays it exactly."""
    return int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1)[0])


@torch.no_grad()
def dev_losses(
    student,
    teacher,
    final_teacher,
    batches: list[dict[str, torch.Tensor]],
    stage: Stage,
    kd: KDConfig,
    *,
    projection: torch.Tensor | None = None,
    normalize: bool = True,
    autocast=nullcontext,
) -> dict[str, float]:
    """Global dev losses of this worker's dev batches (all workers together): `dev_loss`, the
    stage's own objective against the stage's teacher (what plateau detection watches), and
    `dev_kd_loss`, forward KL at T = 1 without T² against the final teacher (comparable across
    stages, plans and KD losses: the tuning objective)."""
    student = unwrap(student)
    was_training = student.training
    student.eval()
    fkl = replace(stage, temperature=1.0, kd_weight=1.0, loss="fkl", target="logits")
    fkl_options = kd.model_copy(update={"scale_by_t2": False})
    counts = _all_reduce(
        torch.stack([torch.cat([token_counts(b, stage), count_tokens(b["labels"]).view(1)]) for b in batches]).sum(0)
    )
    sums = torch.zeros(2, device=counts.device)
    for batch in batches:
        with autocast():
            s_out, t_out = forward_pair(student, teacher, batch, stage)
            loss, _, _ = stage_terms(s_out, t_out, batch, stage, kd, counts[0], counts[1], projection, normalize)
            same = final_teacher is teacher and stage.target == "logits" and t_out is not None
            if final_teacher is None:  # kd.teacher: cached, the dev rows' cache made on the driver
                final = cached_teacher(batch, logits=s_out.head is None)
            else:
                final = t_out if same else final_teacher(batch["input_ids"], batch["attention_mask"])
            _, fkl_term, _ = output_terms(s_out, final, batch, fkl, fkl_options, counts[0], counts[2])
        sums += torch.stack([loss, fkl_term]).float()
    sums = _all_reduce(sums).tolist()
    student.train(was_training)
    return {"dev_loss": sums[0], "dev_kd_loss": sums[1]}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(directory: Path, student, optimizer, state: dict, best_dir: Path, tokenizer=None) -> None:
    """Student (HF folder), optimizer, coordinator state and the best candidate's student so far
    (from `best_dir`, once there is one); the tokenizer rides with the final checkpoint's students."""
    unwrap(student).lm.save_pretrained(directory / "student")
    students = [directory / "student"]
    if has_model_files(best_dir):
        shutil.copytree(best_dir, directory / "student_best")
        students.append(directory / "student_best")
    if tokenizer is not None:
        for folder in students:
            tokenizer.save_pretrained(folder)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "coordinator.json").write_text(json.dumps(state))


def load_checkpoint(checkpoint, best_dir: Path | None) -> tuple[dict, object, dict]:
    """(coordinator state, student in fp32, optimizer state) of a Ray Train checkpoint; its best
    candidate's student, if it has one, is copied into `best_dir` (rank 0's; None elsewhere)."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / "coordinator.json").read_text())
        student = load_model(d / "student", dtype=torch.float32)
        optimizer_state = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
        if best_dir is not None and has_model_files(d / "student_best"):
            shutil.copytree(d / "student_best", best_dir, dirs_exist_ok=True)
    return state, student, optimizer_state


# ---------------------------------------------------------------------------------------------
# Step records (rank 0)


class StepLog:
    """Rank 0's step records and its progress line.

    A step's numbers stay on the device until a flush (every LOG_EVERY steps or PRINT_SECONDS,
    whichever comes first, and at every checkpoint): one read-back for many steps, so the loop never
    waits for the GPU to hand over a loss. Flushed records go to the coordinator, which appends them
    to metrics.jsonl on the driver's node; one concise line per flush says where the run is.
    """

    def __init__(self, coord, specs: list[StageSpec], first_step: int):
        self.coord, self.specs = coord, specs
        self.total_steps = sum(s.steps for s in specs)
        self.pending: list[tuple[dict, torch.Tensor]] = []
        self.unsent: list[dict] = []
        self.in_flight = None
        self.started, self.first_step = time.perf_counter(), first_step
        self.last_flush = self.started

    def add(self, meta: dict, values: torch.Tensor) -> None:
        self.pending.append((meta, values.detach()))
        if len(self.pending) >= LOG_EVERY or time.perf_counter() - self.last_flush >= PRINT_SECONDS:
            self._read_back()
            self._print()
            import ray

            if self.in_flight is not None:
                ray.get(self.in_flight)
            self.in_flight, self.unsent = self.coord.log.remote(self.unsent), []

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
        if not self.unsent:
            return
        r = self.unsent[-1]
        done = r["step"] - self.first_step
        elapsed = time.perf_counter() - self.started
        tokens = sum(x["tokens"] for x in self.unsent) / max(sum(x["seconds"] for x in self.unsent), 1e-9)
        eta = elapsed / max(done, 1) * (self.total_steps - r["step"])
        print(
            f"[train] stage {r['stage'] + 1}/{len(self.specs)} step {r['step']}/{self.total_steps} "
            f"loss {r['loss']:.4f} KD {r['kd_loss']:.4f} T {r['temperature']:.2f} α {r['kd_weight']:.2f} "
            f"{tokens:,.0f} tok/s ETA {_duration(eta)}",
            flush=True,
        )


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


def _step_meta(
    step: int, stage_step: int, stage: Stage, spec: StageSpec, lr: float, started: tuple[float, float]
) -> dict:
    """A metrics.jsonl line without the numbers still on the device. `seconds` is the step's wall
    time as the host saw it, `cpu_seconds` the training thread's CPU time in it (robust to other
    processes on a shared machine), `time` its end."""
    record = {
        "step": step,
        "stage": stage.index,
        "epoch": spec.epoch_of(stage_step - 1),
        "stage_step": stage_step,
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


# ---------------------------------------------------------------------------------------------
# The worker


@dataclass
class Worker:
    """What one training worker holds for the whole run."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    autocast: Callable
    coord: object
    specs: list[StageSpec]
    position: dict
    student: torch.nn.Module  # HiddenStatesLM, DDP-wrapped when world > 1
    optimizer_state: dict | None
    tokenizer: object
    teachers: Teachers | None  # None with kd.teacher: cached (no teacher on the workers)
    cache: CacheReader | None  # with kd.teacher: cached
    scores: ScoresIndex
    dev_rows: list[dict]  # this worker's share of the dev rows (with their reference "response")
    dev_batches: list[dict[str, torch.Tensor]]  # the same rows, batched for the dev losses
    log: StepLog | None  # rank 0 only
    best_dir: Path | None  # rank 0 only: a local copy of the best selection candidate's student


class CacheReader(NamedTuple):
    """What a worker reads of a cached teacher (kd.teacher: cached): the cache columns of each row and,
    for the hidden form, the teacher's LM head on the device (None: the top-K form)."""

    columns: tuple[str, ...]
    head: torch.Tensor | None

    @classmethod
    def of(cls, entry: dict, scores_dir: str, dtype: torch.dtype, device: torch.device) -> CacheReader:
        if entry.get("form") == "hidden":
            return cls(HIDDEN_COLUMNS, load_head(scores_dir, dtype, device))
        return cls(CACHE_COLUMNS, None)


class Teachers:
    """The frozen teachers on the device: the run's final teacher (dev_kd_loss is always measured
    against it) and the current stage's checkpoint teacher when that differs. Loading one checks
    that it shares the student's vocabulary and decides whether the losses can start from hidden
    states (every loaded model's head plain) or need logits."""

    def __init__(self, cfg: RunConfig, device: torch.device, student: HiddenStatesLM, tokenizer):
        self.cfg, self.device, self.student, self.tokenizer = cfg, device, student, tokenizer
        self.loaded: dict[str, HiddenStatesLM] = {}

    def adopt(self, path: str, lm) -> None:
        """A teacher already read from disk (the one a student was cut from), made frozen and moved."""
        lm.to(self.device, dtype=resolve_dtype(self.cfg.models.dtype, self.device))
        lm.eval()
        lm.requires_grad_(False)
        self._add(path, lm)

    def get(self, path: str | None = None) -> HiddenStatesLM:
        path = path or self.cfg.models.teacher
        if path not in self.loaded:
            self.loaded = {p: m for p, m in self.loaded.items() if p == self.cfg.models.teacher}
            self._add(
                path,
                load_model(
                    path, dtype=resolve_dtype(self.cfg.models.dtype, self.device), device=self.device, frozen=True
                ),
            )
        return self.loaded[path]

    def _add(self, path: str, lm) -> None:
        check_compatible(lm, self.student.lm, self.tokenizer)
        self.loaded[path] = HiddenStatesLM(lm)
        plain = plain_heads(self.student, *self.loaded.values())
        for model in (self.student, *self.loaded.values()):
            model.plain_head = plain


def setup_worker(config: dict) -> Worker:
    """Restore the run's position, build the models (student wrapped for DDP), the dev batches and
    rank 0's step log."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train.collective import broadcast_from_rank_zero

    cfg = RunConfig.model_validate(config["cfg"])
    t = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    coord = ray.get_actor(config["coordinator"], namespace=config["namespace"])
    torch.manual_seed(t.seed)

    # Where to start: the latest checkpoint's position (same stage, step and data order), or the top.
    checkpoint = ray.train.get_checkpoint()
    best_dir = Path(tempfile.mkdtemp(prefix="pocl-best-")) if rank == 0 else None
    saved_state, student_lm, optimizer_state = (
        load_checkpoint(checkpoint, best_dir) if checkpoint else (None, None, None)
    )
    state = broadcast_from_rank_zero(ray.get(coord.restore.remote(saved_state)) if rank == 0 else None)
    specs = ray.get([coord.stage.remote(i) for i in range(len(state["plan"]["stages"]))])

    tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.teacher)
    cached = cfg.kd.teacher == "cached"
    cut_from = None
    if student_lm is None and cfg.models.student is not None:
        student_lm = load_model(cfg.models.student, dtype=torch.float32)
    elif student_lm is None:
        # Read the teacher once, in fp32 so the student starts from its exact weights; it then
        # becomes the frozen teacher (cast and moved tensor by tensor) instead of being read twice.
        cut_from = load_model(cfg.models.teacher, dtype=torch.float32)
        student_lm = student_from_teacher(
            cut_from, keep_layers=cfg.models.student_layers, keep_every=cfg.models.student_keep_every
        )
    if t.gradient_checkpointing:
        checkpoint_activations(student_lm)
    student_lm.train()
    bare = HiddenStatesLM(student_lm)
    teachers, cache = None, None
    if cached:
        cache = CacheReader.of(
            config["teacher_cache"], config["scores_dir"], resolve_dtype(cfg.models.dtype, device), device
        )
        bare.plain_head = plain_heads(bare)
        del cut_from  # read only to cut the student: no teacher stays on a worker
    else:
        teachers = Teachers(cfg, device, bare, tokenizer)
        if cut_from is not None:
            teachers.adopt(cfg.models.teacher, cut_from)
    # Hidden-state stages leave the layers above the matched one without gradient. Buffers (rotary
    # tables, masks) are constants in these models, so they are not re-synced every forward.
    hidden_stages = any(s.stage.target == "hidden" for s in specs)
    student = ray.train.torch.prepare_model(
        bare, parallel_strategy_kwargs={"find_unused_parameters": hidden_stages, **_NO_BUFFER_SYNC}
    )
    dev_rows = config["dev_rows"][rank::world]
    dev_batches = (
        [
            batch_of(dev_rows[i : i + t.micro_batch_size], tokenizer.pad_token_id, device, cache)
            for i in range(0, max(len(dev_rows), 1), t.micro_batch_size)
        ]
        if config["dev_rows"]
        else []
    )
    return Worker(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        autocast=partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        coord=coord,
        specs=specs,
        position=state["position"],
        student=student,
        optimizer_state=optimizer_state,
        tokenizer=tokenizer,
        teachers=teachers,
        cache=cache,
        scores=ScoresIndex(config["scores_path"]),
        dev_rows=dev_rows,
        dev_batches=dev_batches,
        log=StepLog(coord, specs, state["position"]["step"]) if rank == 0 else None,
        best_dir=best_dir,
    )


def stage_optimizer(w: Worker, stage: Stage, first_step: int, optimizer, resuming: bool):
    """The stage's AdamW: fresh where the stage restarts it, the checkpoint's state on a resume that
    lands inside the optimizer's segment."""
    t = w.cfg.training
    if optimizer is None or stage.restart_optimizer:
        optimizer = adamw(w.student, t.lr, t.weight_decay)
    if resuming and w.optimizer_state is not None and not (first_step == 0 and stage.restart_optimizer):
        optimizer.load_state_dict(w.optimizer_state)
    return optimizer


def stage_rows(w: Worker, stage_index: int, spec: StageSpec, first_step: int) -> StepReader:
    """This worker's steps of a stage from `first_step` on, each its micro-batches of row dicts,
    read ahead by a background thread (shards.py): only the row groups that hold its rows, with the
    teacher's cache columns when kd.teacher is cached."""
    import ray

    first_epoch, skip = divmod(first_step, spec.steps_per_epoch)
    shards = (
        ray.get(w.coord.shard.remote(stage_index, epoch, w.rank))
        for epoch in range(first_epoch, spec.epoch_of(spec.steps - 1) + 1)
    )
    columns = ROW_COLUMNS if w.cache is None else (*ROW_COLUMNS, *w.cache.columns)
    return StepReader(w.scores, shards, start_step=skip, num_steps=spec.steps - first_step, columns=columns)


def step_batches(w: Worker, micro: list[list[dict]], stage: Stage, seed: int) -> list[dict[str, torch.Tensor]]:
    """One step's device batches: on-policy rows sampled where the stage asks for them (row streams
    seeded by the step's seed, so a restart samples the same responses), then the step's rows
    regrouped by length so each micro-batch pads little."""
    kd = w.cfg.kd
    if kd.on_policy_fraction > 0 and stage.target == "logits":
        offsets = np.cumsum([0, *(len(m) for m in micro)])
        micro = [
            _with_on_policy(unwrap(w.student).lm, m, kd, w.tokenizer, w.cfg.data.max_length, seed, int(offset))
            for m, offset in zip(micro, offsets)
        ]
    return [batch_of(m, w.tokenizer.pad_token_id, w.device, w.cache) for m in length_grouped(micro)]


def batch_of(rows: list[dict], pad_token_id: int, device: torch.device, cache: CacheReader | None) -> dict:
    """build_batch, plus with a cached teacher the rows' cache (aligned with its scored positions) and,
    for the hidden form, the head to apply to it (`cached_teacher` builds the teacher's outputs only
    when the step reaches the micro-batch, so a step holds one micro-batch's hidden states at a time)."""
    batch = build_batch(rows, pad_token_id, device)
    if cache is not None:
        batch["teacher_cache"] = collate_teacher_cache(rows, device, hidden=cache.head is not None)
        if cache.head is not None:
            batch["teacher_head"] = cache.head
    return batch


def _with_on_policy(
    model, rows: list[dict], kd: KDConfig, tokenizer, max_length: int, seed: int, row_offset: int
) -> list[dict]:
    """The first round(fraction x rows) rows of a micro-batch (already in random order) replaced by
    the student's own samples for their prompts."""
    n = math.floor(kd.on_policy_fraction * len(rows) + 0.5)
    sampled = sample_on_policy(
        model,
        rows[:n],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=kd.on_policy_max_new_tokens,
        max_length=max_length,
        seed=seed,
        row_offset=row_offset,
    )
    return sampled + rows[n:]


def plateaued(w: Worker, stage_index: int, dev_loss: float) -> bool:
    """The coordinator's verdict on a plateau stage's latest dev loss, the same on every worker."""
    import ray
    from ray.train.collective import broadcast_from_rank_zero

    return broadcast_from_rank_zero(ray.get(w.coord.report_eval.remote(stage_index, dev_loss)) if w.rank == 0 else None)


# ---------------------------------------------------------------------------------------------
# Checkpoint selection


def step_rows(spec: StageSpec, stage_step: int, global_batch: int) -> int:
    """Rows (all workers) in step `stage_step` (1-based) of a stage: global_batch, the remainder in
    an epoch's last step (as `shards.worker_shard` cuts it)."""
    k = (stage_step - 1) % spec.steps_per_epoch
    return min(global_batch, spec.pool_rows - k * global_batch)


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
    )
    lm.train(was_training)
    sums = _all_reduce(torch.tensor([total, len(w.dev_rows)], dtype=torch.float64, device=w.device)).tolist()
    return sums[0] / sums[1]


def record_candidate(w: Worker, candidate: dict) -> None:
    """Rank 0 hands a selection candidate to the coordinator and, when it is the best so far, saves
    the student's weights to its local `best_dir` (later checkpoints copy them from there)."""
    import ray

    if w.rank != 0:
        return
    is_best = ray.get(w.coord.select.remote(candidate))
    if is_best:
        unwrap(w.student).lm.save_pretrained(w.best_dir)
    print(
        f"[train] selection candidate at step {candidate['step']}: dev ROUGE-L {candidate['dev_rougeL']:.2f}, "
        f"dev KD loss {candidate['dev_kd_loss']:.4f}{' (best so far)' if is_best else ''}",
        flush=True,
    )


def report_checkpoint(w: Worker, metrics: dict, position: dict, optimizer, final: bool) -> None:
    """A checkpoint written by rank 0 and reported by every worker. Step records are handed over
    first, so metrics.jsonl always holds every step up to the latest checkpoint. The copy to
    storage runs in Ray Train's background thread, so the loop waits only for the local write."""
    import ray
    import ray.train

    mode = ray.train.CheckpointUploadMode.ASYNC
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=mode)
        return
    state = ray.get(w.coord.checkpoint.remote(position, w.log.take()))
    directory = Path(tempfile.mkdtemp(prefix="pocl-checkpoint-"))
    save_checkpoint(directory, w.student, optimizer, state, w.best_dir, w.tokenizer if final else None)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
        checkpoint_dir_name=f"step_{metrics['step']:08d}",
        checkpoint_upload_mode=mode,
    )


def train_func(config: dict) -> None:
    """One training worker: set-up, then for each stage its optimizer and teacher, then its steps."""
    w = setup_worker(config)
    t, kd, ex = w.cfg.training, w.cfg.kd, w.cfg.curriculum.extraction
    step, samples, optimizer, upcoming = w.position["step"], w.position["samples"], None, None
    for stage_index in range(w.position["stage"], len(w.specs)):
        spec = w.specs[stage_index]
        stage = spec.stage
        resuming = stage_index == w.position["stage"]
        first = w.position["stage_step"] if resuming else 0
        teacher = w.teachers.get(stage.teacher) if w.teachers is not None else None
        # dev_kd_loss is measured against the run's final teacher (loaded once, kept beside a stage's own).
        final_teacher = w.teachers.get() if w.teachers is not None and w.dev_batches else None
        optimizer = stage_optimizer(w, stage, first, optimizer, resuming)
        projection = None
        if stage.target == "hidden":
            projection = layer_projection(
                hidden_size(teacher.lm),
                hidden_size(unwrap(w.student).lm),
                stage.teacher_layer,
                seed=ex.seed,
                kind=ex.projection,
            ).to(w.device)
        terms = {"projection": projection, "normalize": ex.normalize, "autocast": w.autocast}
        rows = upcoming if upcoming is not None else stage_rows(w, stage_index, spec, first)
        # The next stage (always from its step 0) is read while this one trains.
        upcoming = (
            stage_rows(w, stage_index + 1, w.specs[stage_index + 1], 0) if stage_index + 1 < len(w.specs) else None
        )

        for stage_step in range(first + 1, spec.steps + 1):  # counts steps done, as the checkpoints do
            started = (time.perf_counter(), time.thread_time())
            seed = step_seed(t.seed, step, w.rank)
            torch.manual_seed(seed)
            micro = next(rows)
            data_wait = time.perf_counter() - started[0]
            batches = step_batches(w, micro, stage, seed)
            out = accumulate_gradients(w.student, teacher, batches, stage, kd, **terms)
            lr = lr_at(spec.lr_offset + stage_step - 1, spec.lr_total, t.lr, t.min_lr, t.warmup_steps)
            grad_norm = optimizer_step(w.student, optimizer, lr, t.grad_clip)
            step += 1
            samples += step_rows(spec, stage_step, t.global_batch_size)
            if w.log is not None:
                meta = _step_meta(step, stage_step, stage, spec, lr, started)
                w.log.add({**meta, "data_wait": data_wait}, torch.cat([out, grad_norm.view(1)]))

            dev, stop = {}, False
            if stage.until_plateau and stage_step % t.eval_every == 0 and stage_step < spec.steps and w.dev_batches:
                dev = dev_losses(w.student, teacher, final_teacher, w.dev_batches, stage, kd, **terms)
                stop = plateaued(w, stage_index, dev["dev_loss"])
            stage_done = stop or stage_step == spec.steps
            checkpoint = stage_done or step % t.checkpoint_every == 0
            select = bool(w.dev_batches) and (stage_done or (t.select_every is not None and step % t.select_every == 0))
            if (checkpoint or select) and w.dev_batches and not dev:
                dev = dev_losses(w.student, teacher, final_teacher, w.dev_batches, stage, kd, **terms)
            if select:
                record_candidate(
                    w,
                    {
                        "step": step,
                        "stage": stage_index,
                        "samples": samples,
                        "dev_rougeL": dev_rouge(w),
                        "dev_kd_loss": dev["dev_kd_loss"],
                    },
                )
            if checkpoint:
                position = (
                    {"stage": stage_index + 1, "stage_step": 0, "step": step, "samples": samples}
                    if stage_done
                    else {"stage": stage_index, "stage_step": stage_step, "step": step, "samples": samples}
                )
                metrics = {
                    "step": step,
                    "stage": stage_index,
                    "epoch": spec.epoch_of(stage_step - 1),
                    "loss": float(out[0]),
                    "stages_completed": position["stage"],
                    **dev,
                }
                report_checkpoint(w, metrics, position, optimizer, final=stage_done and stage_index == len(w.specs) - 1)
            if stop:
                break
        rows.close()
    if w.best_dir is not None:
        shutil.rmtree(w.best_dir)


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path  # DIR/train
    student_dir: Path  # the final student
    best_student_dir: Path | None  # the best selection candidate's student; None without a dev set
    selection_path: Path
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
    paths = {
        "models.teacher": cfg.models.teacher,
        "models.student": cfg.models.student,
        "models.tokenizer": cfg.models.tokenizer,
    }
    paths.update({f"curriculum.progressive.teacher_checkpoints[{s.index}]": s.teacher for s in plan.stages})
    for field, path in paths.items():
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{field}: model folder not found: {path}")


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Model paths made absolute here, on the driver: workers need not share its working directory."""
    m, p = cfg.models, cfg.curriculum.progressive

    def absolute(path: str | None) -> str | None:
        # A URI stays as it is, never dropped: re-validation below refuses it, naming its field.
        return path if path is None or "://" in path else str(Path(path).resolve())

    return cfg.with_overrides(
        {
            "models.teacher": absolute(m.teacher),
            "models.student": absolute(m.student),
            "models.tokenizer": absolute(m.tokenizer),
            "curriculum.progressive.teacher_checkpoints": [absolute(c) for c in p.teacher_checkpoints],
        }
    )


def run_plan(cfg: RunConfig) -> Plan:
    """The curriculum plan `train` follows for cfg (extraction plans read the models' layer counts)."""
    counts = _layer_counts(cfg) if cfg.curriculum.plan == "extraction" else (None, None)
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
        raise ValueError(
            f"data.dev: no usable row in {cfg.data.dev} ({len(rejects)} rejected, e.g. {rejects[0]['reason'] if rejects else ''})"
        )
    keep = ("id", "input_ids", "labels", "attention_mask", "num_prompt_tokens", "response")
    rows = [{k: r[k] for k in keep} for r in good]
    if cfg.kd.teacher == "cached":
        # The workers hold no teacher: the dev rows (never scored) get their cache here, once.
        cache_rows(cfg, rows)
    return rows, len(rejects)


def _storage_path(cfg: RunConfig, out: Path) -> str:
    path = cfg.training.storage_path
    if path is None:
        return str(out / "checkpoints")
    return path if "://" in path else str(Path(path).resolve())


def write_selection(path: Path, cfg: RunConfig, candidates: list[dict], dev_rows: int) -> Path:
    """train/selection.json: the protocol, every candidate, the best one (student_best/) and the final
    one (student/). Which of the two the evaluation uses is eval.checkpoint's business (`selected_student`)."""
    if not candidates:
        print(
            "[train] no dev set (data.dev): no checkpoint-selection candidates; the final student is the only one",
            flush=True,
        )
    final_step = max((c["step"] for c in candidates), default=None)
    path.write_text(
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
        )
    )
    return path


def selected_student(train_dir: Path, checkpoint: str) -> Path:
    """The student folder eval.checkpoint names: train/student (final) or train/student_best (the best
    dev ROUGE-L). A training without selection candidates (no data.dev, or no selection.json: a run
    from before checkpoint selection) falls back to the final student, saying so in one line."""
    if checkpoint == "final":
        return train_dir / "student"
    path = train_dir / "selection.json"
    if not path.is_file():
        print(
            f"[eval] eval.checkpoint: best_dev_rougeL found no {path} (training predates checkpoint "
            "selection): evaluating the final student",
            flush=True,
        )
        return train_dir / "student"
    if json.loads(path.read_text())["best"] is None:
        print(
            "[eval] eval.checkpoint: best_dev_rougeL has no candidates to choose from (no data.dev in "
            "training): evaluating the final student",
            flush=True,
        )
        return train_dir / "student"
    return train_dir / "student_best"


def train(
    cfg: RunConfig, scores_dir: str | Path | None = None, *, plan: Plan | None = None, callbacks: list | None = None
) -> TrainResult:
    """Distil the student along the configured plan (or `plan`, any Plan); outputs under
    OUTPUT/train (CONTRACTS.md).

    A second call with the same config `name` and output directory resumes from the latest
    checkpoint. `callbacks` go to Ray Train's RunConfig (Tune passes its report callback here).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    started = time.time()
    cfg = _absolute_paths(cfg)
    out = Path(cfg.output.dir).resolve() / "train"
    scores_dir = Path(scores_dir).resolve() if scores_dir is not None else out.parent / "scores"
    scores = scores_path(scores_dir)
    cache_entry = check_teacher_cache(scores_dir, cfg)
    dataset = pads.dataset(str(scores), format="parquet")
    num_rows = _num_ranked_rows(dataset, scores_dir)
    index = ScoresIndex(scores)
    plan = plan if plan is not None else run_plan(cfg)
    _check_plan(cfg, plan)
    warning = cached_tail_warning(cfg, plan)
    if warning:
        print(f"[train] {warning}", flush=True)
    _check_models(cfg, plan)
    t = cfg.training
    try:
        specs = stage_specs(plan, num_rows, t.global_batch_size)
    except ValueError as err:
        raise ConfigError(f"curriculum.num_buckets: {err}") from None
    dev_rows, dev_rejected = _dev_rows(cfg, plan)

    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan_path.write_text(
        json.dumps(
            {
                "plan": plan.to_dict(),
                "num_rows": num_rows,
                "global_batch_size": t.global_batch_size,
                "stages": [{k: v for k, v in s.to_dict().items() if k != "stage"} for s in specs],
                "total_steps": sum(s.steps for s in specs),
            },
            indent=1,
        )
    )
    metrics_path = out / "metrics.jsonl"

    if not ray.is_initialized():
        ray.init()
    # Ray Train's controller notices a finished (or failed) worker group at its next poll, every 2 s
    # by default: measured on 2 CPU cores, a 0.25 s poll cut 3-4 s from every fit's end and ~1 s from
    # its start. The controller propagates this setting to itself from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Ray Train reroutes a worker's print() to its logger, and also to the worker's stdout where that is
    # wrapped (as in a Ray worker): every progress line reached the job log twice. Plain print, once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    name = f"pocl-coordinator-{cfg.name}-{uuid.uuid4().hex[:8]}"
    coord = coordinator(
        name,
        plan=plan,
        num_rows=num_rows,
        global_batch=t.global_batch_size,
        micro_batch=t.micro_batch_size,
        seed=t.seed,
        metrics_path=str(metrics_path),
        world_size=t.num_workers,
        row_group_bounds=index.bounds.tolist(),
    )
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "coordinator": name,
            "namespace": ray.get_runtime_context().namespace,
            "scores_path": str(scores),
            "scores_dir": str(scores_dir),
            "teacher_cache": cache_entry,
            "dev_rows": dev_rows,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=_storage_path(cfg, out),
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

    # The students are copied from the final checkpoint in (shared) storage, so this works from any node.
    student_dir, best_dir = out / "student", out / "student_best"
    for folder in (student_dir, best_dir):
        shutil.rmtree(folder, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "student", student_dir)
        if has_model_files(Path(d) / "student_best"):
            shutil.copytree(Path(d) / "student_best", best_dir)
        candidates = json.loads((Path(d) / "coordinator.json").read_text())["candidates"]
    selection_path = write_selection(out / "selection.json", cfg, candidates, len(dev_rows))
    metrics = dict(result.metrics or {})
    return TrainResult(
        output_dir=out,
        student_dir=student_dir,
        best_student_dir=best_dir if has_model_files(best_dir) else None,
        selection_path=selection_path,
        metrics_path=metrics_path,
        plan_path=plan_path,
        checkpoint_path=result.checkpoint.path,
        steps=int(metrics.get("step", 0)),
        stages_completed=int(metrics.get("stages_completed", 0)),
        metrics=metrics,
        dev_rejected=dev_rejected,
        wall_seconds=time.time() - started,
    )
