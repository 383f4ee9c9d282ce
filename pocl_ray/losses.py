"""White-box KD losses of METHODS.md §3 and the reference cross-entropy, over causal-LM logits.

Conventions: p = teacher, q = student, both softmax(logits / T); labels follow Hugging Face (unshifted,
-100 = ignored), so the logits at position t-1 are scored wherever labels[:, t] != -100. Every loss is
a sum over scored positions divided by ``num_tokens``: the caller passes the global count under
data parallelism / gradient accumulation so per-worker losses add up to the one-big-batch loss.

Memory: the scored positions are found first; then ``chunk_size`` of them at a time are gathered and
evaluated in fp32, and the student gradient of each chunk is taken at once into a buffer in the
logits' dtype. Peak memory is that buffer plus one chunk's fp32 (chunk, vocab) intermediates, never
several fp32 (batch, seq, vocab) tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

KD_KINDS = ("fkl", "rkl", "js", "tvd", "skl", "srkl", "akl")
IGNORE_INDEX = -100

# Log-probs are floored far below fp32's exp underflow (about -104), so masked vocabulary entries
# (-inf logits) have probability exactly 0 and their 0·log0 terms evaluate to 0 with no inf-inf or
# 0·inf reaching a value or a gradient. A token one side masks and the other supports (a truly
# infinite divergence) then costs at most ~1e4 nats: large, finite, and summable over a batch.
_LOG_FLOOR = -1e4


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).clamp_min(_LOG_FLOOR)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p·p + (1 − weight_p)·q), computed in log space."""
    if weight_p == 0.0:
        return logq
    if weight_p == 1.0:
        return logp
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


# Each divergence maps teacher and student log-probs, both (N, V) fp32, to per-position values (N,).


def _kl(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) per row."""
    return (loga.exp() * (loga - logb)).sum(-1)


def fkl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return _kl(logp, logq)


def rkl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return _kl(logq, logp)


def js(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    logm = _log_mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def tvd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def skl(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    return _kl(logp, _log_mix(logp, logq, alpha))


def srkl(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    return _kl(logq, _log_mix(logp, logq, 1.0 - alpha))


def akl(logp: torch.Tensor, logq: torch.Tensor, mu: float) -> torch.Tensor:
    with torch.no_grad():
        p = logp.exp()
        gap = (p - logq.exp()).abs()
        p_sorted, order = p.sort(dim=-1)
        # Inclusive cumulative sum from the smallest teacher probability: the largest one always
        # reaches 1 > mu, so every row keeps a non-empty head.
        tail = p_sorted.cumsum(-1) < mu
        gap_sorted = gap.gather(-1, order)
        g_tail = gap_sorted.masked_fill(~tail, 0.0).sum(-1)
        g_head = gap_sorted.masked_fill(tail, 0.0).sum(-1)
        total = g_head + g_tail
        # p == q gives 0/0; both KLs are 0 there, so any convex weights do: take an even split.
        w_head = torch.where(total > 0, g_head / total, torch.full_like(total, 0.5))
    return w_head * fkl(logp, logq) + (1.0 - w_head) * rkl(logp, logq)


def _divergence(kind: str, alpha: float, beta: float, mu: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; allowed kinds: {', '.join(KD_KINDS)}")
    for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return {
        "fkl": fkl,
        "rkl": rkl,
        "js": partial(js, beta=beta),
        "tvd": tvd,
        "skl": partial(skl, alpha=alpha),
        "srkl": partial(srkl, alpha=alpha),
        "akl": partial(akl, mu=mu),
    }[kind]


def count_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of scored positions (0-d int64 tensor, ready for an all-reduce across workers)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _check_logits(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"{name} must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {name} (batch, seq) {tuple(logits.shape[:2])}")


def _next_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (HF shift), flattened; the last position of a row predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()


def _scored_rows(labels: torch.Tensor) -> torch.Tensor:
    """Indices into the (batch·seq) flattened logits of the positions that predict a scored label."""
    return (_next_labels(labels) != IGNORE_INDEX).nonzero().squeeze(1)


class _ChunkedRowSum(torch.autograd.Function):
    """Σ over chunks of ``chunk_size`` scored rows of fn(student rows, row indices) -> fp32 scalar.

    Each chunk's rows are gathered, evaluated in fp32 and, when the student needs a gradient,
    differentiated right away into one buffer shaped like the logits (input dtype). So no chunk's fp32
    intermediates outlive the chunk, and backward has nothing to recompute: it only scales the buffer.
    """

    @staticmethod
    def forward(ctx, fn, chunk_size: int, student: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(student) if ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for chunk_rows in rows.split(chunk_size):
            chunk = student.index_select(0, chunk_rows)
            if grad is None:
                total += fn(chunk, chunk_rows)
                continue
            with torch.enable_grad():
                chunk.requires_grad_()
                value = fn(chunk, chunk_rows)
            # A loss that ignores the student (SKL at alpha = 1) leaves its zero gradient as is.
            if value.requires_grad:
                (chunk_grad,) = torch.autograd.grad(value, chunk)
                grad.index_copy_(0, chunk_rows, chunk_grad)
            total += value.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # In place to avoid a second logits-sized buffer; a repeated backward through this node then
        # fails autograd's saved-tensor version check instead of reusing a scaled gradient.
        return None, None, grad.mul_(grad_total), None


def _chunked_sum(fn: Callable[..., torch.Tensor], student_logits: torch.Tensor, rows: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Σ fn(student rows, row indices) over ``rows`` of the flattened student logits, chunk by chunk."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedRowSum.apply(fn, chunk_size, student_logits.flatten(0, 1), rows)


def _normalise(total: torch.Tensor, num_tokens: int | torch.Tensor | None, n_local: int) -> torch.Tensor:
    if num_tokens is None:
        return total / max(n_local, 1)
    if int(num_tokens) < n_local:
        raise ValueError(f"num_tokens ({int(num_tokens)}) is smaller than the {n_local} scored positions in this batch")
    if torch.is_tensor(num_tokens):
        return total / num_tokens.to(total.device).clamp_min(1)
    return total / max(num_tokens, 1)


def kd_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    alpha: float = 0.1,
    beta: float = 0.5,
    mu: float = 0.5,
    num_tokens: int | torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Token-level KD divergence ``kind`` between teacher and student, a scalar fp32 tensor.

    Gradients reach the student logits only; the teacher is a constant. ``alpha`` is the SKL/SRKL
    skew, ``beta`` the generalised-JSD weight, ``mu`` the AKL head/tail split.
    """
    divergence = _divergence(kind, alpha, beta, mu)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_logits("student_logits", student_logits, labels)
    _check_logits("teacher_logits", teacher_logits, labels)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"teacher vocab size {teacher_logits.shape[-1]} != student vocab size {student_logits.shape[-1]}; "
            "token-level KD needs a shared vocabulary"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} differ in shape")

    teacher = teacher_logits.detach().flatten(0, 1)

    def per_chunk(student: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logp = _log_probs(teacher.index_select(0, rows), temperature)
        return divergence(logp, _log_probs(student, temperature)).sum()

    rows = _scored_rows(labels)
    total = _chunked_sum(per_chunk, student_logits, rows, chunk_size)
    if scale_by_t2:
        total = total * temperature**2
    return _normalise(total, num_tokens, rows.numel())


def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_tokens: int | torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Causal-LM cross-entropy on the reference (HF shift, fp32), summed over scored positions / num_tokens."""
    _check_logits("student_logits", student_logits, labels)
    targets = _next_labels(labels)
    rows = _scored_rows(labels)

    def per_chunk(student: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student.float(), targets[rows], reduction="sum")

    return _normalise(_chunked_sum(per_chunk, student_logits, rows, chunk_size), num_tokens, rows.numel())
