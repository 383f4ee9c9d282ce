"""One optimizer step of distillation, pure torch (no Ray): rows -> batches -> both models' outputs ->
loss terms -> gradients (summed over workers) -> optimizer step; and the dev losses, the same forward
and terms without gradients.

Start from `bare_loop` in benchmarks/training.py: a run of steps in about 20 lines, these functions
in a plain loop without Ray; `hand_loop` beside it writes the same step by hand (full logits, FKL + CE,
AdamW), and the benchmark holds this module to its speed. A Ray worker (`worker.py`) makes the same
calls, with its rows, checkpoints and logging around them.

Loss of one optimizer step (METHODS.md §1, §3):
    loss = (1 - kd_weight) * CE(reference) + kd_weight * KD_stage(T)    (METHODS.md's POCL alpha)
Both terms are sums over response tokens divided by the GLOBAL number of such tokens in the step
(all workers, all micro-batches), so gradient accumulation and data parallelism give the gradient of
one big batch: each worker all-reduces its token counts before the first backward, divides its
local sums by the global counts, and multiplies its loss by the world size before backward because
DDP averages gradients over workers (mean of world x local = sum of local = the global loss).
With on-policy distillation (kd.on_policy_fraction > 0) part of each micro-batch is replaced by
responses the student samples; the KD term covers every row and the CE term only the reference rows,
each with its own global count. Hidden-state stages (curriculum extraction) use
extraction.hidden_match_loss between the student's layer and the projected teacher layer in place of
the KD term. The stage's temperature, loss kind and weights reach the losses here, in `loss_options`.

Speed: neither model computes full-vocabulary logits; the losses start from the final hidden states
and apply the LM heads chunk by chunk at the scored positions only (`teacher.LMOutputs`,
`losses.linear_kd_and_ce`). A step never waits for the GPU: losses, token counts and gradient norms
stay on the device (`StepValues`) until the caller reads a batch of steps back. Micro-batches are
regrouped by length inside each step and padded to a multiple of 8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.distributed as dist

from pocl_ray.config import KDConfig
from pocl_ray.curriculum import Stage
from pocl_ray.data import IGNORE_INDEX, collate, scored_mask
from pocl_ray.extraction import hidden_match_loss
from pocl_ray.losses import KDOptions, cached_kd_and_ce, count_tokens, cross_entropy, kd_loss, linear_kd_and_ce
from pocl_ray.teacher_cache import TeacherCache
from pocl_ray.training.teacher import HiddenStatesLM, LMOutputs, Teacher, TeacherOutputs

Autocast = Callable[[], AbstractContextManager]


# ---------------------------------------------------------------------------------------------
# Rows -> batches


def length_grouped(micro: list[list[dict]]) -> list[list[dict]]:
    """A step's rows regrouped into as many micro-batches, shortest rows together, so each pads little.

    The gradient of the step does not change (the loss is a sum over tokens divided by global
    counts); the grouping is a stable sort of a seeded order, so a restart regroups identically.
    """
    rows = sorted((r for m in micro for r in m), key=lambda r: len(r["input_ids"]))
    sizes = [len(c) for c in np.array_split(np.arange(len(rows)), len(micro))]
    bounds = np.cumsum([0, *sizes])
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def build_batch(
    rows: Sequence[dict], pad_token_id: int, device: torch.device, teacher: Teacher | None = None
) -> dict[str, Any]:
    """Collate rows (padded to a multiple of 8, for tensor-core shapes) onto the device, with the
    teacher's part of the batch (a cached teacher's rows, aligned with the scored positions); `ce_labels`
    masks the on-policy rows, whose tokens are the student's own.

    No rows (a worker's share of a short last step) gives one all-masked row: it counts zero tokens
    and contributes zero gradient, but keeps the worker in step with the DDP collectives.
    Host-to-GPU copies go from pinned memory without blocking, so the copy overlaps the previous
    micro-batch's compute.
    """
    stand_in = [{"input_ids": [pad_token_id] * 2, "attention_mask": [1, 1], "labels": [IGNORE_INDEX] * 2}]
    batch = collate(list(rows) or stand_in, pad_token_id, pad_to_multiple_of=8)
    ce_labels = batch["labels"].clone()
    ce_labels[torch.tensor([bool(r.get("on_policy")) for r in rows or stand_in])] = IGNORE_INDEX
    batch["ce_labels"] = ce_labels
    # The positions whose logits the output losses score (CE's are a subset), found here on the host.
    batch["scored_positions"] = scored_mask(batch["labels"]).flatten().nonzero().squeeze(1)
    if device.type == "cuda":
        batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    else:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch if teacher is None else {**batch, **teacher.collate(rows, device)}


# ---------------------------------------------------------------------------------------------
# Both models' outputs -> loss terms


def token_counts(batch: dict[str, Any], stage: Stage) -> torch.Tensor:
    """[CE tokens, KD tokens] of a batch: shifted response positions for output losses, the response
    positions themselves for hidden-state matching (as hidden_match_loss scores them)."""
    kd_tokens = (batch["labels"] != IGNORE_INDEX).sum() if stage.target == "hidden" else count_tokens(batch["labels"])
    return torch.stack([count_tokens(batch["ce_labels"]), kd_tokens])


def model_outputs(
    student: torch.nn.Module, teacher: Teacher, batch: dict[str, Any], stage: Stage
) -> tuple[LMOutputs, TeacherOutputs | None]:
    """The student's outputs (with graph) and the teacher's (None when the stage needs no teacher)."""
    layers = stage.target == "hidden"
    s_out = student(batch["input_ids"], batch["attention_mask"], output_hidden_states=layers)
    return s_out, teacher.outputs(batch, layers) if stage.kd_weight > 0 else None


def loss_options(stage: Stage, kd: KDConfig) -> KDOptions:
    """The losses' options for a stage: its temperature, and the run's KD settings."""
    return KDOptions(
        temperature=stage.temperature,
        scale_by_t2=kd.scale_by_t2,
        skew_alpha=kd.skew_alpha,
        beta=kd.js_beta,
        mu=kd.akl_mu,
        chunk_positions=kd.chunk_positions,
    )


def output_terms(
    s_out: LMOutputs,
    t_out: TeacherOutputs | None,
    batch: dict[str, Any],
    stage: Stage,
    kd: KDConfig,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight·KD + (1 − kd_weight)·CE, KD, CE) on the output distribution, the last two detached,
    over the global ``counts`` [CE tokens, KD tokens]; without teacher outputs the loss is CE. One pass
    over the scored positions against model outputs in the hidden form or a cached top-K teacher; KD
    and CE apart in the logits form."""
    kd_weight = stage.kd_weight if t_out is not None else 0.0
    positions = batch["scored_positions"]
    options = {**loss_options(stage, kd), "num_tokens": counts[1], "scored_positions": positions}
    both = {**options, "kd_weight": kd_weight, "ce_num_tokens": counts[0]}
    labels, ce_labels = batch["labels"], batch["ce_labels"]
    if isinstance(t_out, TeacherCache):
        return cached_kd_and_ce(stage.loss, s_out.loss_input, s_out.head, t_out, labels, ce_labels, **both)
    if s_out.head is not None:
        t_hidden, t_head = (None, None) if t_out is None else (t_out.hidden, t_out.head)
        return linear_kd_and_ce(stage.loss, s_out.loss_input, s_out.head, t_hidden, t_head, labels, ce_labels, **both)
    ce_term = cross_entropy(
        s_out.loss_input,
        ce_labels,
        num_tokens=counts[0],
        chunk_positions=kd.chunk_positions,
        scored_positions=positions,
    )
    if t_out is None:
        return ce_term, torch.zeros_like(ce_term), ce_term.detach()
    kd_term = kd_loss(stage.loss, s_out.loss_input, t_out.loss_input, labels, **options)
    return kd_weight * kd_term + (1 - kd_weight) * ce_term, kd_term.detach(), ce_term.detach()


def loss_terms(
    s_out: LMOutputs,
    t_out: TeacherOutputs | None,
    batch: dict[str, Any],
    stage: Stage,
    kd: KDConfig,
    counts: torch.Tensor,
    projection: torch.Tensor | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KD term, CE term) of one micro-batch, each a local sum over the global token ``counts``;
    the loss carries the graph, the terms are for logging."""
    if stage.target == "logits":
        return output_terms(s_out, t_out, batch, stage, kd, counts)
    kd_weight = stage.kd_weight
    # With kd_weight = 1 the CE term of a hidden stage is only logged, so it is computed without a graph.
    with torch.set_grad_enabled(torch.is_grad_enabled() and kd_weight < 1):
        ce_term, _, _ = output_terms(s_out, None, batch, stage, kd, counts)
    kd_term = torch.zeros_like(ce_term)
    if isinstance(t_out, LMOutputs):
        assert s_out.layers is not None and t_out.layers is not None and projection is not None
        assert stage.student_layer is not None and stage.teacher_layer is not None
        kd_term = hidden_match_loss(
            s_out.layers[stage.student_layer],
            t_out.layers[stage.teacher_layer],
            projection,
            batch["labels"],
            normalize=normalize,
            num_tokens=counts[1],
        )
    return (1 - kd_weight) * ce_term + kd_weight * kd_term, kd_term.detach(), ce_term.detach()


# ---------------------------------------------------------------------------------------------
# Gradients and the optimizer step


class StepValues(NamedTuple):
    """One step's numbers, summed over all workers, each a 0-d tensor on the device (reading them back
    is the caller's choice: a step never waits for the GPU)."""

    loss: torch.Tensor  # the loss backward ran on
    kd_loss: torch.Tensor  # its KD term (hidden matching in a hidden stage)
    ce_loss: torch.Tensor  # its CE term
    ce_tokens: torch.Tensor  # the tokens CE scored
    kd_tokens: torch.Tensor  # the tokens KD scored


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def accumulate_gradients(
    student: torch.nn.Module,
    teacher: Teacher,
    batches: list[dict[str, Any]],
    stage: Stage,
    kd: KDConfig,
    *,
    projection: torch.Tensor | None = None,
    normalize: bool = True,
    autocast: Autocast = nullcontext,
) -> StepValues:
    """Forward + backward of this worker's micro-batches of one optimizer step; the step's global
    values. Gradients are synchronised once, on the last micro-batch (DDP no_sync before it)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    counts = _all_reduce(torch.stack([token_counts(b, stage) for b in batches]).sum(0))
    sums = torch.zeros(3, device=counts.device)
    no_sync = getattr(student, "no_sync", None)  # DDP's; a bare module (one worker) has none
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last or no_sync is None else no_sync():
            with autocast():
                s_out, t_out = model_outputs(student, teacher, batch, stage)
                loss, kd_term, ce_term = loss_terms(s_out, t_out, batch, stage, kd, counts, projection, normalize)
            (loss * world).backward()
        sums += torch.stack([loss, kd_term, ce_term]).detach().float()
    return StepValues(*torch.cat([_all_reduce(sums), counts.float()]).unbind())


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, not on biases and norm gains (our choice, as nanoGPT);
    the fused CUDA kernel on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=params[0].device.type == "cuda")


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float
) -> torch.Tensor:
    """Set the LR, clip the (already synchronised) gradient, step, clear; returns the gradient norm
    (a device tensor: no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def unwrap(model: torch.nn.Module) -> HiddenStatesLM:
    """The student inside a DDP wrapper (prepare_model only wraps when world size > 1)."""
    return cast(HiddenStatesLM, getattr(model, "module", model))


# ---------------------------------------------------------------------------------------------
# Dev losses


@torch.no_grad()
def dev_losses(
    student: torch.nn.Module,
    teacher: Teacher,
    final_teacher: Teacher,
    batches: list[dict[str, Any]],
    stage: Stage,
    kd: KDConfig,
    *,
    projection: torch.Tensor | None = None,
    normalize: bool = True,
    autocast: Autocast = nullcontext,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Global dev losses of this worker's dev batches (all workers together): `dev_loss`, the
    stage's own objective against the stage's teacher (what plateau detection watches), and
    `dev_kd_loss`, forward KL at T = 1 without T² against the run's final teacher (comparable across
    stages, plans and KD losses: the tuning objective). `on_batch(rows)` is called after each batch
    (a progress line's hook; it gets no device value, so it never waits for the device)."""
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
            s_out, t_out = model_outputs(student, teacher, batch, stage)
            loss, _, _ = loss_terms(s_out, t_out, batch, stage, kd, counts[:2], projection, normalize)
            same = final_teacher is teacher and stage.target == "logits" and t_out is not None
            final = t_out if same else final_teacher.outputs(batch)
            _, fkl_term, _ = output_terms(s_out, final, batch, fkl, fkl_options, counts[::2])
        sums += torch.stack([loss, fkl_term]).float()
        if on_batch is not None:
            on_batch(len(batch["input_ids"]))
    dev_loss, dev_kd_loss = _all_reduce(sums).tolist()
    student.train(was_training)
    return {"dev_loss": dev_loss, "dev_kd_loss": dev_kd_loss}


@torch.no_grad()
def probe_losses(
    student: torch.nn.Module,
    teacher: Teacher,
    buckets: list[list[dict[str, Any]]],
    stage: Stage,
    kd: KDConfig,
    *,
    autocast: Autocast = nullcontext,
) -> list[tuple[float, float, int]]:
    """Per bucket (this worker's batches of its probe rows, all workers together): (KD, CE, tokens),
    forward KL at T = 1 without T² against `teacher` (the run's final one, as `dev_kd_loss`) and the
    student's response cross-entropy, each a global mean over the bucket's probe response tokens."""
    student = unwrap(student)
    was_training = student.training
    student.eval()
    fkl = replace(stage, temperature=1.0, kd_weight=1.0, loss="fkl", target="logits")
    fkl_options = kd.model_copy(update={"scale_by_t2": False})
    tokens = _all_reduce(torch.stack([torch.stack([count_tokens(b["labels"]) for b in bs]).sum() for bs in buckets]))
    sums = torch.zeros(len(buckets), 2, device=tokens.device)
    for index, batches in enumerate(buckets):
        counts = tokens[index].clamp(min=1).expand(2)
        for batch in batches:
            with autocast():
                s_out, t_out = model_outputs(student, teacher, batch, fkl)
                _, kd_term, ce_term = output_terms(s_out, t_out, batch, fkl, fkl_options, counts)
            sums[index] += torch.stack([kd_term, ce_term]).float()
    values = _all_reduce(sums).tolist()
    student.train(was_training)
    return [(kd_mean, ce_mean, int(n)) for (kd_mean, ce_mean), n in zip(values, tokens.tolist())]
