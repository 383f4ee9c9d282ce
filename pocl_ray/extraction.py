"""Curriculum extraction (METHODS.md §2): seeded random projections of teacher hidden states and the
loss that matches a student layer to them.

Pure torch, no Ray. The same functions serve Hugging Face causal LMs (hidden states (B, S, D) with
labels marking the response positions) and plain MLPs (hidden activations (N, D), every row scored).

Projections are drawn on the CPU from a private generator, so every worker, every restart and every
device gets the same matrix for the same (seed, teacher layer); callers move it with ``.to(device)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pocl_ray.data import IGNORE_INDEX
from pocl_ray.seeds import stream_seed

PROJECTION_KINDS = ("gaussian", "orthogonal")


def projection_matrix(
    d_teacher: int,
    d_student: int,
    *,
    seed: int,
    kind: str = "gaussian",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A fixed random (d_teacher, d_student) map from the teacher's width down to the student's.

    gaussian: i.i.d. N(0, 1) / sqrt(d_student) entries. orthogonal: orthonormal columns from the QR of
    a seeded Gaussian (`torch.nn.init.orthogonal_`; needs d_teacher >= d_student), signs fixed so
    the draw is Haar-distributed.
    """
    if d_teacher < 1 or d_student < 1:
        raise ValueError(f"projection sizes must be positive, got d_teacher={d_teacher}, d_student={d_student}")
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"projection kind {kind!r} unknown; allowed: {', '.join(PROJECTION_KINDS)}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "gaussian":
        return (torch.randn(d_teacher, d_student, generator=gen, dtype=torch.float64) / math.sqrt(d_student)).to(dtype)
    if d_teacher < d_student:
        raise ValueError(
            f"an orthogonal projection needs d_teacher >= d_student for orthonormal columns, "
            f"got d_teacher={d_teacher} < d_student={d_student}"
        )
    # Drawn in float64 (the same Gaussian as above), then cast: the same matrix in every dtype.
    q = torch.nn.init.orthogonal_(torch.empty(d_teacher, d_student, dtype=torch.float64), generator=gen)
    return q.to(dtype)


def layer_projection(
    d_teacher: int,
    d_student: int,
    teacher_layer: int,
    *,
    seed: int,
    kind: str = "gaussian",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The projection for one teacher layer; a function of (seed, teacher_layer) alone."""
    if teacher_layer < 0:
        raise ValueError(f"teacher_layer must be >= 0, got {teacher_layer}")
    return projection_matrix(d_teacher, d_student, seed=stream_seed(seed, teacher_layer), kind=kind, dtype=dtype)


def hidden_match_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    num_tokens: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over scored positions of mean_features (norm(s) - norm(t @ P))^2, divided by num_tokens.

    student_hidden (..., Ds) and teacher_hidden (..., Dt) share their leading shape: (B, S) for
    sequence models, (N,) for MLPs. labels (same leading shape) selects positions with
    labels != -100 (unshifted: a position is scored where its own label is a response token);
    None scores every position. normalize applies a layer norm without affine parameters to both
    sides. num_tokens defaults to the number of scored positions here; pass the global count under
    data parallelism / gradient accumulation. The teacher side never receives gradient.
    """
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must agree on every dimension but the last"
        )
    d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if projection.shape != (d_t, d_s):
        raise ValueError(f"projection must be (d_teacher, d_student) = ({d_t}, {d_s}), got {tuple(projection.shape)}")
    if labels is None:
        s = student_hidden.reshape(-1, d_s)
        t = teacher_hidden.reshape(-1, d_t)
    else:
        if labels.shape != lead:
            raise ValueError(f"labels {tuple(labels.shape)} must match the hidden states' leading shape {tuple(lead)}")
        mask = labels != IGNORE_INDEX
        s = student_hidden[mask]
        t = teacher_hidden[mask]
    s = s.float()
    target = t.detach().float() @ projection.detach().to(device=t.device, dtype=torch.float32)
    if normalize:
        s = F.layer_norm(s, (d_s,))
        target = F.layer_norm(target, (d_s,))
    total = (s - target).pow(2).mean(dim=-1).sum()
    if num_tokens is None:
        num_tokens = s.shape[0]
    if isinstance(num_tokens, torch.Tensor):
        num_tokens = num_tokens.to(device=total.device, dtype=total.dtype)
    elif num_tokens <= 0:
        if s.shape[0]:
            raise ValueError(f"num_tokens must be positive when positions are scored, got {num_tokens}")
        # Nothing scored anywhere: a zero that still carries the graph, so backward works.
        return total * 0.0
    return total / num_tokens
