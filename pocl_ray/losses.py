"""White-box KD losses of METHODS.md §3 and the reference cross-entropy, from causal-LM logits or
from final hidden states and LM-head weights, against an online teacher or the cached one.

Conventions: p = teacher, q = student, both softmax(logits / T); labels follow Hugging Face (unshifted,
-100 = ignored), so the logits at position t-1 are scored wherever labels[:, t] != -100
(`data.predicted_labels`). Every loss is a sum over scored positions divided by ``num_tokens``: the
caller passes the global count under data parallelism / gradient accumulation so per-worker losses add
up to the one-big-batch loss. Every entry point takes the same keyword options (`KDOptions`).

Memory: the scored positions are found first; then ``chunk_positions`` of them at a time are gathered,
turned into logits (``hidden @ head.T`` on the hidden-state path, in the inputs' dtype), evaluated in
fp32 and differentiated at once (the fused-linear approach of Liger-Kernel and torchtune). The
gradients go into a buffer shaped like the student input (logits or hidden states, input dtype) and,
on the hidden-state path, an fp32 buffer shaped like the LM head; backward only scales them. Peak
memory is those buffers plus one chunk's (chunk, vocab) intermediates: the hidden-state path never
holds logits for more than one chunk, nor any for prompt and padding positions.

Finding the scored positions on a GPU (nonzero) makes the host wait for it; a training step passes
them as ``scored_positions`` instead, found on the host while it builds the batch: the flattened
(batch·seq) indices of the positions to visit, any superset of the scored ones (the rest add nothing).

A cached teacher's top-K form (`teacher_cache.TeacherCache`, METHODS.md §4: top-K log-probs, tail
statistics and a few tokens drawn from the tail per scored position, stored by the scoring pass)
replaces the teacher's chunk logits in the same engine (`cached_kd_and_ce`): each divergence is exact on
the top K and estimated on the tail (the tail estimators below; `teacher_cache.at_temperature` reads
the stored tail at T).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, NamedTuple, TypedDict

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from pocl_ray.data import IGNORE_INDEX, predicted_labels, scored_mask
from pocl_ray.logprobs import LOG_FLOOR, log_mix, log_probs_
from pocl_ray.teacher_cache import TAIL_STATS, TeacherAtT, TeacherCache, at_temperature

if TYPE_CHECKING:
    from typing_extensions import Unpack

KD_KINDS = ("fkl", "rkl", "js", "tvd", "skl", "srkl", "akl")

# Scored positions per chunk when the caller gives none: the largest chunk before CPU time degrades
# (benchmarks/README.md, loss_memory.py, has the sweep), so the fewest chunks (a GPU pays a kernel launch
# per op per chunk) within about 0.75 GiB at a 49,152-token vocabulary. Liger-Kernel's fused-linear JSD
# heuristic picks 256 at this shape too. Not yet measured on a GPU.
DEFAULT_CHUNK_POSITIONS = 256


class _StudentAtCache(NamedTuple):
    top: torch.Tensor  # (n, K) log q of the teacher's top-K tokens
    rest: torch.Tensor  # (n,) log Q_rest, the student's mass outside them
    rest_neg_entropy: torch.Tensor  # (n,) Σ_{j ∉ top-K} q_j log q_j
    sample: torch.Tensor  # (n, M) log q of the drawn tail tokens


def _student_buckets(logq: torch.Tensor, ids: torch.Tensor, sample_ids: torch.Tensor) -> _StudentAtCache:
    """What the cached divergences need of the student's floored log-probs (n, V): the top-K entries, the
    rest's mass and q log q summed over the rest, and the drawn tokens' entries; all differentiable.

    The top-K entries are overwritten with a finite value far below the floor rather than -inf, so an
    empty rest (K = V) has log-mass ~ 2·floor with a finite gradient (exp(-inf + inf) would be NaN).
    """
    rest = logq.scatter(-1, ids, 2 * LOG_FLOOR).logsumexp(-1).clamp_min(LOG_FLOOR)
    neg_entropy = (logq.exp() * logq).scatter(-1, ids, 0.0).sum(-1)
    return _StudentAtCache(logq.gather(-1, ids), rest, neg_entropy, logq.gather(-1, sample_ids))


def _akl_head_weight(p: torch.Tensor, gap: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL's weight on FKL per row: the share of Σ|p − q| (``gap`` per outcome) on the head, the outcomes
    left when the smallest teacher probabilities summing to < mu are set aside as the tail."""
    p_sorted, order = p.sort(dim=-1)
    # Inclusive cumulative sum from the smallest teacher probability: the largest one always
    # reaches 1 > mu, so every row keeps a non-empty head.
    tail = p_sorted.cumsum(-1) < mu
    gap_sorted = gap.gather(-1, order)
    g_tail = gap_sorted.masked_fill(~tail, 0.0).sum(-1)
    g_head = gap_sorted.masked_fill(tail, 0.0).sum(-1)
    total = g_head + g_tail
    # p == q gives 0/0; both KLs are 0 there, so any convex weights do: take an even split.
    return torch.where(total > 0, g_head / total, torch.full_like(total, 0.5))


def _pointwise(kind: str, skew_alpha: float, beta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The f-divergence ``kind`` outcome by outcome: (log p, log q) -> f(p, q), summing to the divergence
    (`_kd_rows` has the online one's values, with its gradient in closed form); the cached teacher sums them
    over its top K and estimates the tail (`_cached_divergence`)."""

    def fkl_terms(lp, lq):
        return lp.exp() * (lp - lq)

    def rkl_terms(lp, lq):
        return lq.exp() * (lq - lp)

    def js_terms(lp, lq):
        lm = log_mix(lp, lq, beta)
        return beta * lp.exp() * (lp - lm) + (1.0 - beta) * lq.exp() * (lq - lm)

    def tvd_terms(lp, lq):
        return 0.5 * (lp.exp() - lq.exp()).abs()

    def skl_terms(lp, lq):
        return lp.exp() * (lp - log_mix(lp, lq, skew_alpha))

    def srkl_terms(lp, lq):
        return lq.exp() * (lq - log_mix(lp, lq, 1.0 - skew_alpha))

    return {"fkl": fkl_terms, "rkl": rkl_terms, "js": js_terms, "tvd": tvd_terms, "skl": skl_terms, "srkl": srkl_terms}[
        kind
    ]


# Each online divergence maps teacher and student log-probs, both (n, V) fp32 and floored, to its value per
# row and g = ∂value/∂log q (the student's log-probs taken as free; `_logit_gradient` turns g into the
# gradient w.r.t. the logits, g - q·Σg, which a row's c·q does not change: RKL's + q is left out, as it
# would only cancel there at fp32's cost). Closed forms, evaluated in place: the teacher's buffer is used up as work
# space, the student's is left as it was, and at most two more (n, V) buffers are alive at any time, so a
# chunk never holds an autograd graph's saved tensors and gradients (issue 22, item 7).


def _mixture(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """`logprobs.log_mix` in a buffer of its own (the callers overwrite it), with one temporary."""
    if weight_p in (0.0, 1.0):
        return (logq if weight_p == 0.0 else logp).clone()
    mixed = logp + math.log(weight_p)
    return torch.logaddexp(mixed, logq + math.log1p(-weight_p), out=mixed)


def _fkl_rows(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    diff = logp - logq
    p = logp.exp_()
    return diff.mul_(p).sum(-1), p.neg_()  # g = -p


def _rkl_rows(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    diff = logp.sub_(logq).neg_()  # log q - log p
    q = logq.exp()
    g = diff.mul_(q)  # q (log q - log p): the + q of ∂/∂log q drops out through the softmax (see above)
    return g.sum(-1), g


def _js_rows(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    logm = _mixture(logp, logq, beta)
    teacher_side = (logp - logm).mul_(logp.exp_()).sum(-1)
    g = logm.sub_(logq).neg_().mul_(logq.exp())  # q (log q - log m): the mixture's own terms cancel
    return beta * teacher_side + (1.0 - beta) * g.sum(-1), g.mul_(1.0 - beta)


def _tvd_rows(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = logq.exp()
    gap = logp.exp_().sub_(q).neg_()  # q - p
    return 0.5 * gap.abs().sum(-1), gap.sign_().mul_(q).mul_(0.5)  # g = q sign(q - p) / 2


def _skl_rows(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    logm = _mixture(logp, logq, alpha)
    p_diff = logp - logm
    p = logp.exp_()
    value = p_diff.mul_(p).sum(-1)
    if alpha == 1.0:  # m = p: the loss ignores the student (and q / m is unbounded)
        return value, p.zero_()
    return value, logm.sub_(logq).neg_().exp_().mul_(p).mul_(alpha - 1.0)  # g = -(1 - a) p q / m


def _srkl_rows(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    logm = _mixture(logp, logq, 1.0 - alpha)
    # (1 - a) p / m, the share of the mixture that does not move with q; 0 when a = 1 (m = q, p / m unbounded)
    fixed = logp.zero_() if alpha == 1.0 else logp.sub_(logm).exp_().mul_(1.0 - alpha)
    q = logq.exp()
    own = logm.sub_(logq).neg_().mul_(q)  # q (log q - log m)
    return own.sum(-1), own.add_(fixed.mul_(q))  # g = q (log q - log m) + (1 - a) p q / m


def _akl_rows(logp: torch.Tensor, logq: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    diff = logq - logp
    p = logp.exp_()
    fkl_value = -(p * diff).sum(-1)
    q = logq.exp()
    w = torch.cat([_akl_head_weight(pb, (pb - qb).abs(), mu) for pb, qb in zip(p.split(_AKL_ROWS), q.split(_AKL_ROWS))])
    rkl_value = diff.mul_(q).sum(-1)
    # g = (1 - w) q (log q - log p) - w p: RKL's gradient and FKL's, in AKL's proportions
    g = diff.mul_((1.0 - w)[:, None]).sub_(p.mul_(w[:, None]))
    return w * fkl_value + (1.0 - w) * rkl_value, g


# AKL's weights sort each row: taken a few rows at a time, the sort's index and value copies stay small
# next to the chunk's buffers.
_AKL_ROWS = 16


def _kd_rows(
    kind: str, skew_alpha: float, beta: float, mu: float
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The online divergence ``kind``: (log p, log q) -> (value per row, ∂value/∂log q); see above."""
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; allowed kinds: {', '.join(KD_KINDS)}")
    for name, value in (("skew_alpha", skew_alpha), ("beta", beta), ("mu", mu)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    rows: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
        "fkl": _fkl_rows,
        "rkl": _rkl_rows,
        "js": partial(_js_rows, beta=beta),
        "tvd": _tvd_rows,
        "skl": partial(_skl_rows, alpha=skew_alpha),
        "srkl": partial(_srkl_rows, alpha=skew_alpha),
        "akl": partial(_akl_rows, mu=mu),
    }
    return rows[kind]


def _sampled_tail(f, teacher: TeacherAtT, student: _StudentAtCache) -> torch.Tensor:
    """Σ_{j ∉ top-K} f(p̂_j, q_j) for an f with f(0, q) linear in q (every kind but RKL): the student-only
    part f(0, Q_rest) exactly, plus the draws' importance-weighted f(p̂, q) − f(0, q) (unbiased), but
    never below f(p̂_rest, Q_rest)."""
    floor = torch.full_like(student.sample, LOG_FLOOR)
    correction = ((f(teacher.sample, student.sample) - f(floor, student.sample)) * teacher.weight).sum(-1)
    estimate = f(torch.full_like(student.rest, LOG_FLOOR), student.rest) + correction
    # The tail's divergence is at least that of its two totals (data processing), so a draw that lands
    # below it is lifted to it: that never moves a position's estimate away from the true value, and the
    # position's loss stays at least the rest-bucket divergence, which is >= 0.
    return torch.maximum(estimate, f(teacher.rest, student.rest))


def _rkl_tail(teacher: TeacherAtT, student: _StudentAtCache) -> torch.Tensor:
    """Σ_{j ∉ top-K} q_j (log q_j − log p̂_j) with every tail log p̂_j taken as the tail's mean (the
    student-weighted one is unknown without the student): Σ q log q − Q_rest·mean."""
    return student.rest_neg_entropy - student.rest.exp() * teacher.tail_logp


def _cached_divergence(
    kind: str, skew_alpha: float, beta: float, mu: float
) -> Callable[[TeacherAtT, _StudentAtCache], torch.Tensor]:
    """``kind`` against the cached teacher, per position (METHODS.md §4): exact on the top K, the tail by
    importance-weighted draws (RKL: the tail-mean model; AKL: its FKL and RKL parts so, its split with the
    tail as one outcome of mass p̂_rest and gap Σ_tail |p̂ − q| estimated as TVD's)."""
    _kd_rows(kind, skew_alpha, beta, mu)  # validates kind and options
    if kind == "akl":
        fkl_div, rkl_div = (
            _cached_divergence("fkl", skew_alpha, beta, mu),
            _cached_divergence("rkl", skew_alpha, beta, mu),
        )
        tvd_terms = _pointwise("tvd", skew_alpha, beta)

        def akl_cached(teacher: TeacherAtT, student: _StudentAtCache) -> torch.Tensor:
            with torch.no_grad():
                p = torch.cat([teacher.top, teacher.rest[:, None]], -1).exp()
                gap_top = (p[:, :-1] - student.top.exp()).abs()
                gap_rest = 2 * _sampled_tail(tvd_terms, teacher, student)
                w_head = _akl_head_weight(p, torch.cat([gap_top, gap_rest[:, None]], -1), mu)
            return w_head * fkl_div(teacher, student) + (1.0 - w_head) * rkl_div(teacher, student)

        return akl_cached
    f = _pointwise(kind, skew_alpha, beta)
    tail = _rkl_tail if kind == "rkl" else partial(_sampled_tail, f)
    return lambda teacher, student: f(teacher.top, student.top).sum(-1) + tail(teacher, student)


# ---------------------------------------------------------------------------------------------
# The keyword options every entry point takes


class LossOptions(TypedDict, total=False):
    """Keyword options of every loss below (an option not given takes its LOSS_DEFAULTS value)."""

    num_tokens: int | torch.Tensor | None  # the count the sum is divided by; None: this batch's scored positions
    chunk_positions: int | None  # scored positions per chunk; None: DEFAULT_CHUNK_POSITIONS
    scored_positions: torch.Tensor | None  # flattened positions to visit, found on the host (module docstring)


class KDOptions(LossOptions, total=False):
    """Keyword options of the KD losses: LossOptions and the divergence's own."""

    temperature: float  # T of both softmaxes
    scale_by_t2: bool  # KD × T² (keeps the gradient's scale as T changes)
    skew_alpha: float  # the SKL / SRKL skew
    beta: float  # the generalised JSD's weight
    mu: float  # AKL's head / tail split


class KDAndCEOptions(KDOptions, total=False):
    """Keyword options of the losses that return KD and CE in one pass: KDOptions and CE's own count."""

    ce_num_tokens: int | torch.Tensor | None  # CE's count, as num_tokens is KD's


LOSS_DEFAULTS = KDAndCEOptions(
    num_tokens=None,
    chunk_positions=None,
    scored_positions=None,
    temperature=1.0,
    scale_by_t2=True,
    skew_alpha=0.1,
    beta=0.5,
    mu=0.5,
    ce_num_tokens=None,
)


class _Options(NamedTuple):
    num_tokens: int | torch.Tensor | None
    chunk_positions: int | None
    scored_positions: torch.Tensor | None
    temperature: float
    scale_by_t2: bool
    skew_alpha: float
    beta: float
    mu: float
    ce_num_tokens: int | torch.Tensor | None


def _options(entry: str, given: Mapping[str, object], accepted: type) -> _Options:
    """The options an entry point was given, over LOSS_DEFAULTS; a key ``accepted`` lacks is a TypeError."""
    keys = accepted.__required_keys__ | accepted.__optional_keys__  # type: ignore[attr-defined]
    unknown = sorted(set(given) - keys)
    if unknown:
        raise TypeError(f"{entry}() got an unexpected keyword argument {unknown[0]!r}")
    return _Options(**{**LOSS_DEFAULTS, **given})  # type: ignore[arg-type]


def count_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of scored positions (0-d int64 tensor, ready for an all-reduce across workers)."""
    return scored_mask(labels).sum()


def _check_positions(name: str, tensor: torch.Tensor, last: str, labels_name: str, labels: torch.Tensor) -> None:
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be (batch, seq, {last}), got shape {tuple(tensor.shape)}")
    if labels.shape != tensor.shape[:2]:
        raise ValueError(
            f"{labels_name} shape {tuple(labels.shape)} does not match {name} (batch, seq) {tuple(tensor.shape[:2])}"
        )


def _check_logits(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    _check_positions(name, logits, "vocab", "labels", labels)


def _check_linear(side: str, hidden: torch.Tensor, head: torch.Tensor, labels_name: str, labels: torch.Tensor) -> None:
    _check_positions(f"{side}_hidden", hidden, "hidden", labels_name, labels)
    if head.dim() != 2 or head.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{side}_head must be (vocab, hidden) with hidden = {side}_hidden's last dimension {hidden.shape[-1]}, "
            f"got shape {tuple(head.shape)}"
        )


def _check_same_vocab(student_vocab: int, teacher_vocab: int) -> None:
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"teacher vocab size {teacher_vocab} != student vocab size {student_vocab}; "
            "token-level KD needs a shared vocabulary"
        )


def _check_kd_options(kind: str, options: _Options):
    divergence = _kd_rows(kind, options.skew_alpha, options.beta, options.mu)
    if options.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {options.temperature}")
    return divergence


def _check_kd_weight(kd_weight: float) -> None:
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}")


def _next_labels(labels: torch.Tensor) -> torch.Tensor:
    """`data.predicted_labels`, flattened to the (batch·seq) rows the chunks visit."""
    return predicted_labels(labels).flatten()


def _row_logits(x: torch.Tensor, head: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows -> the logits of those rows of the flattened ``x``, which holds logits itself when head is None."""
    if head is None:
        return lambda rows: x.index_select(0, rows)
    return lambda rows: F.linear(x.index_select(0, rows), head)


# A chunk's losses: (its logits, its rows, whether to differentiate) -> (the K fp32 sums of the chunk, the
# gradient of Σ_k scales[k]·sum_k w.r.t. the logits, in their dtype; None when not differentiating or when
# the loss does not depend on the student). It may overwrite the logits, which nothing else holds.
ChunkLosses = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


class _ChunkedTerms(torch.autograd.Function):
    """Σ_k scales[k]·Σ_chunks term_k over chunks of ``chunk_positions`` scored rows, each chunk's gradient
    taken at once.

    ``student`` is (N, D) flattened rows; a chunk's logits are ``student[rows] @ head.T`` (the rows
    themselves when head is None), made in the inputs' dtype and handed to ``chunk_losses``. Their
    gradient goes right away into a buffer shaped like ``student`` (its dtype) and an fp32 one shaped
    like ``head``, so nothing of a chunk outlives it, and backward has nothing to recompute: it only
    scales the buffers. Returns the loss and the K unscaled totals (not differentiable, for logging).
    """

    @staticmethod
    def forward(
        ctx,
        chunk_losses: ChunkLosses,
        scales: torch.Tensor,
        chunk_positions: int,
        rows: torch.Tensor,
        student: torch.Tensor,
        head,
    ):
        grad_student = torch.zeros_like(student) if ctx.needs_input_grad[4] else None
        # At least fp32 because the head gradient sums over every chunk, which bf16 would round away.
        accumulate = torch.promote_types(head.dtype, torch.float32) if head is not None else None
        grad_head = torch.zeros_like(head, dtype=accumulate) if ctx.needs_input_grad[5] else None
        differentiate = grad_student is not None or grad_head is not None
        totals = torch.zeros(scales.shape, dtype=torch.float32, device=student.device)
        for chunk_rows in rows.split(chunk_positions):
            x = student.index_select(0, chunk_rows)
            values, grad_logits = chunk_losses(x if head is None else F.linear(x, head), chunk_rows, differentiate)
            totals += values
            if grad_logits is None:
                continue
            if head is None:
                assert grad_student is not None  # the loss needs a gradient only through the student
                grad_student.index_copy_(0, chunk_rows, grad_logits)
                continue
            if grad_student is not None:
                grad_student.index_copy_(0, chunk_rows, (grad_logits @ head).to(grad_student.dtype))
            if grad_head is None:
                continue
            if grad_logits.dtype == x.dtype == grad_head.dtype:
                grad_head.addmm_(grad_logits.T, x)  # in place: no head-sized temporary
            else:
                grad_head += grad_logits.T @ x
        ctx.head_dtype = None if head is None else head.dtype
        ctx.save_for_backward(grad_student, grad_head)
        ctx.mark_non_differentiable(totals)
        return (totals * scales).sum(), totals

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_totals: torch.Tensor):
        grad_student, grad_head = ctx.saved_tensors
        # In place to avoid second buffers; a repeated backward through this node then fails autograd's
        # saved-tensor version check instead of reusing scaled gradients.
        if grad_student is not None:
            grad_student = grad_student.mul_(grad_loss)
        if grad_head is not None:
            grad_head = grad_head.mul_(grad_loss).to(ctx.head_dtype)
        return None, None, None, None, grad_student, grad_head


def _logit_gradient(
    logq: torch.Tensor,
    g: torch.Tensor | None,
    kd_scale: torch.Tensor | None,
    ce_scale: torch.Tensor | None,
    target: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """∂(kd_scale·KD + ce_scale·CE)/∂logits of one chunk, written over ``g`` (or, CE alone, over ``logq``).

    ``logq`` = log softmax(logits / T), floored (used up); ``g`` = ∂KD/∂log q per outcome (None: no KD);
    kd_scale, ce_scale per row (n, 1) or scalar, 0 where a term does not score the row; ``target`` (n, 1)
    the CE labels (any valid id on rows CE skips).
    """
    if g is None:
        assert ce_scale is not None
        grad = logq.exp_().mul_(ce_scale)  # CE alone is taken at T = 1
    else:
        assert kd_scale is not None
        # Floored log-probs are constants, as autograd's clamp_min has them.
        g.masked_fill_(logq <= LOG_FLOOR, 0.0).mul_(kd_scale / temperature)
        # Through log softmax(logits / T): (g - q Σg) / T, the 1 / T already in g.
        grad = g.addcmul_(logq.exp(), g.sum(-1, keepdim=True), value=-1.0)
        if ce_scale is not None:
            # CE's softmax(logits) = softmax(T·log q): the floored entries stay 0.
            q1 = logq.exp_() if temperature == 1.0 else log_probs_(logq.mul_(temperature), 1.0).exp_()
            grad.addcmul_(q1, ce_scale)
    if target is not None:
        assert ce_scale is not None
        grad.scatter_add_(-1, target, -ce_scale.expand_as(target))
    return grad


def _online_chunk_losses(
    divergence,
    teacher_rows: Callable[[torch.Tensor], torch.Tensor] | None,
    kd_rows: torch.Tensor | None,
    ce_targets: torch.Tensor | None,
    scales: torch.Tensor,
    temperature: float,
) -> ChunkLosses:
    """KD against an online teacher (``divergence`` a `_kd_rows`, None: no KD) and CE, in closed form.

    Per chunk: the student's fp32 logits become log q in place, the teacher's log p in a buffer of
    their own, which the divergence uses up while it forms its values and g (`_kd_rows`); the teacher's
    buffers are gone before g becomes the logits' gradient (`_logit_gradient`). ``kd_rows`` (None:
    every row) marks the rows KD scores.
    """

    def chunk_losses(logits: torch.Tensor, rows: torch.Tensor, differentiate: bool):
        dtype, s = logits.dtype, logits.float()
        del logits  # a bf16 chunk is not needed beside its fp32 copy
        values, ce_scale, target = [], None, None
        if ce_targets is not None:
            target = ce_targets[rows]
            on = (target != IGNORE_INDEX)[:, None]
            target = target.where(target != IGNORE_INDEX, 0)[:, None]
            # -log softmax(logits) at the label, unfloored so CE is exact
            nll = torch.logsumexp(s, -1, keepdim=True) - s.gather(-1, target)
            ce_value = torch.where(on, nll, 0.0).sum()
            ce_scale = scales[-1] * on
        logq = log_probs_(s, temperature if divergence is not None else 1.0)
        g, kd_scale = None, None
        if divergence is not None:
            assert teacher_rows is not None
            per_row, g = divergence(log_probs_(teacher_rows(rows), temperature), logq)
            kd_scale = scales[0]
            if kd_rows is not None:
                per_row = per_row.where(kd_rows[rows], 0.0)
                kd_scale = scales[0] * kd_rows[rows][:, None]
            values.append(per_row.sum())
        if ce_targets is not None:
            values.append(ce_value)
        if not differentiate:
            return torch.stack(values), None
        return torch.stack(values), _logit_gradient(logq, g, kd_scale, ce_scale, target, temperature).to(dtype)

    return chunk_losses


def _autograd_chunk_losses(
    terms: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]], scales: torch.Tensor
) -> ChunkLosses:
    """Chunk losses from ``terms(logits, rows)`` (the K sums, differentiable), their gradient by autograd."""

    def chunk_losses(logits: torch.Tensor, rows: torch.Tensor, differentiate: bool):
        with torch.set_grad_enabled(differentiate):
            logits.requires_grad_(differentiate)
            values = torch.stack(terms(logits, rows))
            loss = (values * scales).sum()
        # A loss that ignores the student (SKL at skew_alpha = 1) leaves the zero gradients as they are.
        if not loss.requires_grad:
            return values.detach(), None
        (grad_logits,) = torch.autograd.grad(loss, logits)
        return values.detach(), grad_logits

    return chunk_losses


def _inverse_count(
    num_tokens: int | torch.Tensor | None, local_count: Callable[[], int], device: torch.device
) -> torch.Tensor:
    """1 / the count a loss sum is divided by: ``num_tokens`` when given, else the local scored count.

    A count given as a device tensor (the all-reduced global count of a training step) is used as it
    is: checking it against the local count would make the host wait for the GPU.
    """
    if torch.is_tensor(num_tokens) and num_tokens.device.type != "cpu":
        return num_tokens.to(device, torch.float32).clamp_min(1).reciprocal()
    n_local = local_count()
    if num_tokens is None:
        return torch.tensor(1.0 / max(n_local, 1), device=device)
    if int(num_tokens) < n_local:
        raise ValueError(f"num_tokens ({int(num_tokens)}) is smaller than the {n_local} scored positions in this batch")
    if torch.is_tensor(num_tokens):
        return num_tokens.to(device, torch.float32).clamp_min(1).reciprocal()
    return torch.tensor(1.0 / max(num_tokens, 1), device=device)


def _fused_losses(
    student: torch.Tensor,
    student_head: torch.Tensor | None,
    teacher: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    labels: torch.Tensor | None,
    ce_labels: torch.Tensor | None,
    *,
    divergence,
    kd_weight: float,
    options: _Options,
    cache: TeacherCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight·KD + (1 − kd_weight)·CE, KD, CE) in one pass over the chunks; the last two detached.

    KD is scored where ``labels`` are, CE where ``ce_labels`` are; either may be None (that term is 0).
    ``student``/``teacher`` are logits when their head is None, else hidden states. With ``cache`` (and
    no teacher) KD is taken against the cached teacher (METHODS.md §4) and ``divergence`` is a
    `_cached_divergence`, reading the cache at T and the student's log-probs at its tokens. Callers check shapes.
    """
    temperature, positions = options.temperature, options.scored_positions
    chunk_positions = DEFAULT_CHUNK_POSITIONS if options.chunk_positions is None else options.chunk_positions
    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    if not torch.is_grad_enabled():
        # needs_input_grad ignores grad mode: detached inputs keep a no-grad call (evaluation) from
        # filling gradient buffers.
        student = student.detach()
        student_head = None if student_head is None else student_head.detach()
    device = student.device
    kd_mask = None if labels is None else _next_labels(labels) != IGNORE_INDEX
    ce_targets = None if ce_labels is None else _next_labels(ce_labels)
    masks = [m for m in (kd_mask, None if ce_targets is None else ce_targets != IGNORE_INDEX) if m is not None]
    scored = masks[0] if len(masks) == 1 else masks[0] | masks[1]
    # Positions found on the host (`scored_positions`) spare the GPU sync of nonzero().
    rows = scored.nonzero().squeeze(1) if positions is None else positions

    def local_count(mask: torch.Tensor) -> Callable[[], int]:
        return lambda: int(mask.sum())

    scales, norms = [], []
    teacher_rows = kd_rows = None
    if kd_mask is not None and cache is None:
        assert teacher is not None, "KD needs a teacher or a cache"
        teacher_rows = _row_logits(
            teacher.detach().flatten(0, 1), None if teacher_head is None else teacher_head.detach()
        )
    if kd_mask is not None and cache is not None:
        cached = at_temperature(cache, temperature)
        # Each flattened position's index among the KD-scored ones (row-major, the cache's order), found
        # on the device; positions before the first one get -1, the dummy last row of the cache.
        slot = kd_mask.cumsum(0) - 1
    if kd_mask is not None:
        # The pass may also visit rows KD does not score (CE-only ones, given positions); KD must not count them.
        kd_rows = kd_mask if ce_targets is not None or positions is not None else None
        t2 = temperature**2 if options.scale_by_t2 else 1.0
        norms.append(_inverse_count(options.num_tokens, local_count(kd_mask), device) * t2)
        scales.append(kd_weight * norms[-1])
    if ce_targets is not None:
        norms.append(_inverse_count(options.ce_num_tokens, local_count(ce_targets != IGNORE_INDEX), device))
        scales.append((1.0 - kd_weight) * norms[-1])

    def cached_terms(logits: torch.Tensor, chunk_rows: torch.Tensor) -> list[torch.Tensor]:
        logq = torch.log_softmax(logits.float() / temperature, dim=-1)
        at = slot[chunk_rows]
        teacher_at = TeacherAtT(*(x[at] for x in cached))
        per_row = divergence(
            teacher_at, _student_buckets(logq.clamp_min(LOG_FLOOR), teacher_at.top_ids, teacher_at.sample_ids)
        )
        values = [(per_row if kd_rows is None else per_row.where(kd_rows[chunk_rows], 0.0)).sum()]
        if ce_targets is not None:
            # At T = 1 the student log-probs of KD serve CE as they are (unfloored, so CE is exact).
            if temperature != 1.0:
                logq = torch.log_softmax(logits.float(), dim=-1)
            values.append(F.nll_loss(logq, ce_targets[chunk_rows], ignore_index=IGNORE_INDEX, reduction="sum"))
        return values

    stacked = torch.stack(scales)
    if cache is None:
        chunk_losses = _online_chunk_losses(divergence, teacher_rows, kd_rows, ce_targets, stacked, temperature)
    else:
        chunk_losses = _autograd_chunk_losses(cached_terms, stacked)
    loss, totals = _ChunkedTerms.apply(
        chunk_losses, stacked, chunk_positions, rows, student.flatten(0, 1), student_head
    )
    values = totals * torch.stack(norms)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    kd_value = values[0] if kd_mask is not None else zero
    ce_value = values[-1] if ce_targets is not None else zero
    return loss, kd_value, ce_value


# ---------------------------------------------------------------------------------------------
# Entry points


def kd_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    **options: Unpack[KDOptions],
) -> torch.Tensor:
    """Token-level KD divergence ``kind`` between teacher and student, a scalar fp32 tensor.

    Gradients reach the student logits only; the teacher is a constant.
    """
    o = _options("kd_loss", options, KDOptions)
    divergence = _check_kd_options(kind, o)
    _check_logits("student_logits", student_logits, labels)
    _check_logits("teacher_logits", teacher_logits, labels)
    _check_same_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    loss, _, _ = _fused_losses(
        student_logits, None, teacher_logits, None, labels, None, divergence=divergence, kd_weight=1.0, options=o
    )
    return loss


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, **options: Unpack[LossOptions]) -> torch.Tensor:
    """Causal-LM cross-entropy on the reference (HF shift, fp32), summed over scored positions / num_tokens."""
    o = _options("cross_entropy", options, LossOptions)
    _check_logits("student_logits", student_logits, labels)
    loss, _, _ = _fused_losses(
        student_logits, None, None, None, None, labels, divergence=None, kd_weight=0.0, options=_as_ce(o)
    )
    return loss


def linear_kd_and_ce(
    kind: str,
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    labels: torch.Tensor,
    ce_labels: torch.Tensor,
    *,
    kd_weight: float,
    **options: Unpack[KDAndCEOptions],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KD, CE) from hidden states in one pass: each chunk's student logits serve both terms.

    loss = kd_weight·KD + (1 − kd_weight)·CE is the differentiable one (its gradients equal those of that
    sum of ``linear_kd_loss`` and ``linear_cross_entropy``); KD and CE come back detached, for logging.
    KD is scored at ``labels`` over ``num_tokens``, CE at ``ce_labels`` over ``ce_num_tokens``. With no
    teacher (both ``teacher_hidden`` and ``teacher_head`` None) KD is 0 and ``kind`` is not used.
    """
    o = _options("linear_kd_and_ce", options, KDAndCEOptions)
    _check_kd_weight(kd_weight)
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head must both be given, or both be None (CE only)")
    _check_linear("student", student_hidden, student_head, "ce_labels", ce_labels)
    divergence = None
    if teacher_hidden is not None and teacher_head is not None:
        divergence = _check_kd_options(kind, o)
        _check_positions("student_hidden", student_hidden, "hidden", "labels", labels)
        _check_linear("teacher", teacher_hidden, teacher_head, "labels", labels)
        _check_same_vocab(student_head.shape[0], teacher_head.shape[0])
    kd_labels = None if divergence is None else labels
    return _fused_losses(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        kd_labels,
        ce_labels,
        divergence=divergence,
        kd_weight=kd_weight,
        options=o,
    )


def linear_kd_loss(
    kind: str,
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor,
    **options: Unpack[KDOptions],
) -> torch.Tensor:
    """``kd_loss`` on the logits ``hidden @ head.T`` of each side, without ever holding more than one chunk of them.

    Hidden states are (batch, seq, hidden), each model's final normed ones; heads are (vocab, hidden).
    Gradients reach ``student_hidden`` and ``student_head`` (through autograd, so a head tied to the
    input embedding gets both gradients summed); the teacher is a constant.
    """
    o = _options("linear_kd_loss", options, KDOptions)
    divergence = _check_kd_options(kind, o)
    _check_linear("student", student_hidden, student_head, "labels", labels)
    _check_linear("teacher", teacher_hidden, teacher_head, "labels", labels)
    _check_same_vocab(student_head.shape[0], teacher_head.shape[0])
    loss, _, _ = _fused_losses(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        labels,
        None,
        divergence=divergence,
        kd_weight=1.0,
        options=o,
    )
    return loss


def linear_cross_entropy(
    student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor, **options: Unpack[LossOptions]
) -> torch.Tensor:
    """``cross_entropy`` on the logits ``student_hidden @ student_head.T``, one chunk of scored positions at a time."""
    o = _options("linear_cross_entropy", options, LossOptions)
    _check_linear("student", student_hidden, student_head, "labels", labels)
    loss, _, _ = _fused_losses(
        student_hidden, student_head, None, None, None, labels, divergence=None, kd_weight=0.0, options=_as_ce(o)
    )
    return loss


def _as_ce(options: _Options) -> _Options:
    """A CE-only call's options: its count is CE's (the one term it has), at T = 1."""
    return options._replace(num_tokens=None, ce_num_tokens=options.num_tokens, temperature=1.0, scale_by_t2=False)


def _check_cache(cache: TeacherCache, vocab: int, labels: torch.Tensor) -> None:
    ids, values, tail, sample_ids, sample_values = cache
    n, stats = ids.shape[0] if ids.dim() == 2 else -1, TAIL_STATS
    if (
        ids.dim() != 2
        or values.shape != ids.shape
        or tail.shape != (n, stats)
        or sample_ids.dim() != 2
        or sample_ids.shape[0] != n
        or sample_values.shape != sample_ids.shape
    ):
        raise ValueError(
            f"teacher cache must be top_ids (N, K), top_logprobs (N, K), tail (N, {stats}), sample_ids (N, M), "
            f"sample_logprobs (N, M); got {', '.join(str(tuple(x.shape)) for x in cache)}"
        )
    if ids.shape[1] > vocab or ids.dtype.is_floating_point or sample_ids.dtype.is_floating_point:
        raise ValueError(
            f"teacher cache top_ids must be integer ids, at most the vocabulary ({vocab}) per row; "
            f"got {ids.dtype} K = {ids.shape[1]}"
        )
    # Counting the scored positions makes a GPU host wait, so the alignment is checked on CPU only
    # (collate_teacher_cache checks it per row while building the batch).
    if labels.device.type == "cpu" and int(count_tokens(labels)) != ids.shape[0]:
        raise ValueError(f"teacher cache holds {ids.shape[0]} positions but labels score {int(count_tokens(labels))}")


def cached_kd_and_ce(
    kind: str,
    student: torch.Tensor,
    student_head: torch.Tensor | None,
    cache: TeacherCache,
    labels: torch.Tensor,
    ce_labels: torch.Tensor,
    *,
    kd_weight: float,
    **options: Unpack[KDAndCEOptions],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear_kd_and_ce`` against a cached teacher: (loss, KD, CE), the last two detached.

    ``student`` is hidden states (batch, seq, hidden) with ``student_head`` (vocab, hidden), or logits
    (batch, seq, vocab) with ``student_head`` None. ``cache`` holds one entry per KD-scored position
    (labels[:, t + 1] != -100), row-major: the order of the batch's ``scored_positions`` and of
    ``teacher_cache.collate_teacher_cache``. Each kind is exact on the teacher's top-K tokens and estimated
    on the rest of the vocabulary (METHODS.md §4); with K = vocab it is the online loss.
    """
    o = _options("cached_kd_and_ce", options, KDAndCEOptions)
    _check_kd_weight(kd_weight)
    _check_kd_options(kind, o)
    divergence = _cached_divergence(kind, o.skew_alpha, o.beta, o.mu)
    if student_head is None:
        _check_logits("student", student, ce_labels)
        _check_logits("student", student, labels)
        vocab = student.shape[-1]
    else:
        _check_linear("student", student, student_head, "ce_labels", ce_labels)
        _check_positions("student_hidden", student, "hidden", "labels", labels)
        vocab = student_head.shape[0]
    _check_cache(cache, vocab, labels)
    return _fused_losses(
        student,
        student_head,
        None,
        None,
        labels,
        ce_labels,
        divergence=divergence,
        kd_weight=kd_weight,
        options=o,
        cache=cache,
    )


def cached_kd_loss(
    kind: str, student_logits: torch.Tensor, cache: TeacherCache, labels: torch.Tensor, **options: Unpack[KDOptions]
) -> torch.Tensor:
    """``kd_loss`` against a cached teacher (see ``cached_kd_and_ce``), from student logits."""
    o = _options("cached_kd_loss", options, KDOptions)
    _check_kd_options(kind, o)
    divergence = _cached_divergence(kind, o.skew_alpha, o.beta, o.mu)
    _check_logits("student_logits", student_logits, labels)
    _check_cache(cache, student_logits.shape[-1], labels)
    loss, _, _ = _fused_losses(
        student_logits, None, None, None, labels, None, divergence=divergence, kd_weight=1.0, options=o, cache=cache
    )
    return loss
