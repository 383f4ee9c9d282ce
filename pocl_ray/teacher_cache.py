"""The cached teacher (kd.teacher: cached; METHODS.md §4): the teacher stored once, in the scores, by
the scoring pass's teacher forward, so training loads no teacher. Everything about it lives here: its
two forms and their columns, the top-K form's tail statistics and how they are read at a temperature,
the hidden form's int8 quantization, its production (scoring pass and dev rows), the LM-head file, the
check a training driver runs before any Ray work, and the collation of a batch's cache onto the device.
The divergences against it are in losses.py (`cached_kd_and_ce`); the teacher a training step reads
it through is `training.teacher`.

Every entry is per scored position (position t with labels[t + 1] != -100, `data.scored_mask`), in
position order, one list per row. Two forms, one per scoring setting:

With scoring.teacher_hidden the teacher's final normed hidden state in int8 (`quantize_hidden`: one
float16 scale per HIDDEN_GROUP channels) and once, in the scores directory, the teacher's LM head
(HEAD_FILE): training applies that head to the hidden state and takes every KD kind at any temperature
exactly as online, up to the int8 rounding. Bytes per token: hidden_size + hidden_size / 32.

With scoring.teacher_top_k: K (`teacher_top_k`):
- teacher_top_ids: the top-K token ids, uint16 when the vocabulary fits (≤ 65,536 tokens), else int32;
- teacher_top_logprobs: their log-softmax at T = 1 in float16. Log-probs rather than logits: they are
  ≤ 0 and near 0 exactly where the mass is, where float16 is most precise (absolute error ~1e-5 at
  log p ≈ -0.01), while a logit's error grows with its offset (~0.01 at a logit of 20); softmax at T
  is shift-invariant, so log p / T re-tempers them exactly as logits / T would. float16 rather than
  bfloat16: 8x the precision, and log-probs need no more range than float16's;
- teacher_tail: log Σ_{j ∉ top-K} p_j^(1/T) for T in TAIL_TEMPERATURES, then the mean log p_j over
  the tail at T = 1, float32;
- teacher_sample_ids / teacher_sample_logprobs: TAIL_SAMPLES tail tokens drawn with replacement from
  the teacher's tail at SAMPLE_TEMPERATURE (ids as teacher_top_ids) and their log-softmax at T = 1
  (float16). The draws are a fixed function of the row id (`tail_uniforms`), so re-scoring a row
  stores the same tokens.
Its bytes per token do not grow with the teacher's width, but its tail is estimated (METHODS.md §4).

Each column is a list (one entry per scored position) of fixed-size lists, which `shards.StepReader`
returns as a 2-D numpy array per row.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pocl_ray import storage
from pocl_ray.config import ConfigError, RunConfig, is_uri
from pocl_ray.data import collate, scored_mask
from pocl_ray.logprobs import LOG_FLOOR
from pocl_ray.model_source import ModelSource
from pocl_ray.models import ModelLocation, linear_head, load_model, load_tokenizer, meta_model, output_embedding_rows
from pocl_ray.sampling import row_uniforms
from pocl_ray.scores import MANIFEST_FILE, scores_dir_of
from pocl_ray.seeds import stream_seed

# ---------------------------------------------------------------------------------------------
# The format

# The top-K form's tail, per scored position: the log of its tail Σ_{j ∉ top-K} p_j^(1/T) at these
# temperatures; the tail's mean log p at T = 1; and TAIL_SAMPLES tail tokens drawn (with replacement)
# from the teacher's tail at SAMPLE_TEMPERATURE, with their log-probs at T = 1. A tail at another
# temperature is interpolated linearly in 1/T between the two nearest (extrapolated from the end
# segments outside, `_tail_at`): log Σ p_j^β is convex in β, so between grid points the estimate is an
# upper bound, outside a lower one. 1 and 2 are the default schedule's ends (exact there); 1.5 halves
# the interpolation span between them.
TAIL_TEMPERATURES = (1.0, 1.5, 2.0, 4.0)
# 16 draws fill the 600-byte budget at K = 128 (METHODS.md §4). Drawing at T = 2 rather than 1 spreads
# the draws over more of the tail, so the importance weights p̂/r stay bounded at every T ≤ 2 (they grow
# like p^(1/T − 1/2) as p -> 0 only above T = 2); it must be a grid temperature, whose tail sum normalises r.
TAIL_SAMPLES = 16
SAMPLE_TEMPERATURE = 2.0
TAIL_STATS = len(TAIL_TEMPERATURES) + 1  # the tail sums, then the tail mean log-prob


class TeacherCache(NamedTuple):
    """The top-K form at N scored positions, in the order the KD mask visits them (row-major).

    top_ids (N, K) integer token ids; top_logprobs (N, K) the teacher's log-softmax at T = 1 of those
    tokens (any float dtype); tail (N, TAIL_STATS): log Σ_{j ∉ top-K} p_j^(1/T) for each T of
    TAIL_TEMPERATURES, then the mean of log p_j over the tail at T = 1, floored at LOG_FLOOR (an empty
    tail, K = vocab, has mass exactly 0); sample_ids (N, M) tail tokens drawn from the teacher's tail at
    SAMPLE_TEMPERATURE, sample_logprobs (N, M) their log-softmax at T = 1 (LOG_FLOOR when the tail is
    empty, which makes their importance weight 0).
    """

    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    tail: torch.Tensor
    sample_ids: torch.Tensor
    sample_logprobs: torch.Tensor


class HiddenCache(NamedTuple):
    """The hidden form of a batch: per KD-scored position (row-major) the int8 values (N, hidden) and
    their float16 scales (N, ceil(hidden / HIDDEN_GROUP))."""

    values: torch.Tensor
    scales: torch.Tensor


# Each top-K column in TeacherCache order: its width per scored position (None: K) and its stored dtype
# (None: the id dtype, `id_dtype`); storage, arrow types and collation all read it from here.
_LAYOUT = (
    ("teacher_top_ids", None, None),
    ("teacher_top_logprobs", None, np.float16),
    ("teacher_tail", TAIL_STATS, np.float32),
    ("teacher_sample_ids", TAIL_SAMPLES, None),
    ("teacher_sample_logprobs", TAIL_SAMPLES, np.float16),
)
CACHE_COLUMNS = tuple(name for name, _, _ in _LAYOUT)
# The hidden form: int8 values, and one float16 scale per HIDDEN_GROUP channels (the last group padded).
# Groups of 64 rather than one scale per token: a few channels of an LM's final hidden state are 20-40x
# the typical one, and a per-token scale spends the int8 range on them (the testbed teacher's logits'
# rounding error: 0.16 per token, 0.08 in groups of 64; benchmarks/teacher_cache.py measures the loss).
HIDDEN_GROUP = 64
HIDDEN_COLUMNS = ("teacher_hidden", "teacher_hidden_scale")
HEAD_FILE = "teacher_head.safetensors"
_FIX = "re-run `pocl-ray score` with scoring.teacher_top_k or scoring.teacher_hidden set, or use kd.teacher: online"


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def cache_form(scoring) -> int | str | None:
    """What a scoring config asks the measurers to store: K, "hidden" or None."""
    return "hidden" if scoring.teacher_hidden else scoring.teacher_top_k


def hidden_groups(hidden_size: int) -> int:
    return -(-hidden_size // HIDDEN_GROUP)


def layout(k: int | None, vocab_size: int, hidden_size: int | None = None) -> tuple[tuple[str, int, np.dtype], ...]:
    """The stored columns, each (name, width per scored position, dtype): the top-K form, or with k
    None the hidden form of a teacher ``hidden_size`` wide."""
    if k is None:
        if hidden_size is None:
            raise ValueError("the hidden form of the teacher cache needs the teacher's hidden_size")
        return (
            ("teacher_hidden", hidden_size, np.dtype(np.int8)),
            ("teacher_hidden_scale", hidden_groups(hidden_size), np.dtype(np.float16)),
        )
    return tuple((name, width or k, np.dtype(dtype or id_dtype(vocab_size))) for name, width, dtype in _LAYOUT)


def bytes_per_token(k: int | None, vocab_size: int, hidden_size: int | None = None) -> int:
    """Stored bytes per scored token before parquet compression."""
    return sum(width * dtype.itemsize for _, width, dtype in layout(k, vocab_size, hidden_size))


def arrow_types(k: int | None, vocab_size: int, hidden_size: int | None = None) -> dict[str, pa.DataType]:
    return {
        name: pa.list_(pa.list_(pa.from_numpy_dtype(dtype), width))
        for name, width, dtype in layout(k, vocab_size, hidden_size)
    }


def manifest_entry(k: int | None, vocab_size: int, hidden_size: int | None = None) -> dict:
    """The manifest's "teacher_cache" entry: the top-K form, or with k None the hidden form."""
    columns = [name for name, _, _ in layout(k, vocab_size, hidden_size)]
    if k is None:
        return {
            "form": "hidden",
            "top_k": None,
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "values": f"final normed hidden state, int8 with a float16 scale per {HIDDEN_GROUP} channels",
            "group_size": HIDDEN_GROUP,
            "head": HEAD_FILE,
            "bytes_per_scored_token": bytes_per_token(None, vocab_size, hidden_size),
            "columns": columns,
        }
    return {
        "form": "top_k",
        "top_k": k,
        "vocab_size": vocab_size,
        "id_dtype": id_dtype(vocab_size).name,
        "values": "log-softmax at T = 1, float16",
        "tail_temperatures": list(TAIL_TEMPERATURES),
        "tail_samples": TAIL_SAMPLES,
        "sample_temperature": SAMPLE_TEMPERATURE,
        "bytes_per_scored_token": bytes_per_token(k, vocab_size),
        "columns": columns,
    }


# ---------------------------------------------------------------------------------------------
# The top-K form: made from the teacher's logits, read back at a temperature (the tail rules)


def teacher_top_k(logits: torch.Tensor, k: int, uniforms: torch.Tensor | None = None) -> TeacherCache:
    """The cache of teacher ``logits`` (N, V): top-k log-probs at T = 1 (fp32, unfloored), the tail terms
    and TAIL_SAMPLES tail draws, one per column of ``uniforms`` (N, M) in [0, 1) (float64 for resolution
    below 2^-24; a fixed-seed stream when None, for callers without row ids)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top-k size must lie in 1..{logits.shape[-1]} (the vocabulary), got {k}")
    if uniforms is None:
        uniforms = torch.rand(
            (logits.shape[0], TAIL_SAMPLES), generator=torch.Generator().manual_seed(0), dtype=torch.float64
        ).to(logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf"))
    sums = [(rest / temperature).logsumexp(-1) for temperature in TAIL_TEMPERATURES]
    mean = logp.clamp_min(LOG_FLOOR).scatter(-1, ids, 0.0).sum(-1) / max(logp.shape[-1] - k, 1)
    tail = torch.stack([*sums, mean], -1).clamp_min(LOG_FLOOR)
    # Inverse-CDF draws in float64: tail tokens far below 2^-24 of the proposal keep their probability.
    weights = (rest.double() / SAMPLE_TEMPERATURE).exp()
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    # right=True lands on the first token whose cdf exceeds the target: one with positive mass (never a
    # top-K token, whose cdf step is 0), so long as the tail has any mass at all.
    sample_ids = torch.searchsorted(cdf, uniforms.to(cdf) * total, right=True).clamp_max(logp.shape[-1] - 1)
    empty = total == 0
    sample_ids = sample_ids.masked_fill(empty, 0)
    sample_logprobs = logp.gather(-1, sample_ids).masked_fill(empty, LOG_FLOOR).clamp_min(LOG_FLOOR)
    return TeacherCache(ids, top, tail, sample_ids, sample_logprobs)


def tail_uniforms(row_id: str, positions: int) -> torch.Tensor:
    """float64 (positions, TAIL_SAMPLES) in [0, 1) for a row's tail draws, a function of its id alone; two
    24-bit uniforms make each one (48 bits), so tail tokens far below 2^-24 of the proposal are reachable."""
    u = row_uniforms([stream_seed(0, "teacher_tail", row_id)], 2 * positions * TAIL_SAMPLES)[0].double()
    return (u[0::2] + u[1::2] * 2.0**-24).reshape(positions, TAIL_SAMPLES)


def _tail_at(tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """log Σ_tail p_j^(1/T) per row: the stored value at a grid temperature, else piecewise linear in 1/T."""
    betas = [1.0 / temperature for temperature in TAIL_TEMPERATURES]  # decreasing
    beta = 1.0 / temperature
    i = next((i for i in range(len(betas) - 2) if beta >= betas[i + 1]), len(betas) - 2)
    w = (betas[i] - beta) / (betas[i] - betas[i + 1])
    # At a grid point w is exactly 0 or 1, so the stored value comes back bit for bit.
    return (
        tail[:, i].float()
        if w == 0.0
        else tail[:, i + 1].float()
        if w == 1.0
        else ((1.0 - w) * tail[:, i].float() + w * tail[:, i + 1].float())
    )


class TeacherAtT(NamedTuple):
    """The cached teacher re-tempered to T, per position: what the cached divergences read."""

    top_ids: torch.Tensor  # (N, K) long
    top: torch.Tensor  # (N, K) log p̂_i(T) of the top-K tokens
    rest: torch.Tensor  # (N,) log p̂_rest(T), the tail's mass
    tail_logp: torch.Tensor  # (N,) the tail-uniform model of log p̂_j(T): β·mean log p − log Z(β)
    sample_ids: torch.Tensor  # (N, M) long
    sample: torch.Tensor  # (N, M) log p̂_s(T) of the drawn tail tokens
    weight: torch.Tensor  # (N, M) importance weight of each draw, 1 / (M·r_s), r_s its draw probability


def at_temperature(cache: TeacherCache, temperature: float) -> TeacherAtT:
    """The cache at T, each tensor with one extra last row, a benign finite dummy (uniform over the top,
    draws of weight 0), that positions outside the KD mask index (their terms are masked)."""
    beta = 1.0 / temperature
    top = cache.top_logprobs.float() * beta
    tail_sum = _tail_at(cache.tail, temperature)[:, None]
    log_z = torch.cat([top, tail_sum], -1).logsumexp(-1, keepdim=True)
    logp_s = cache.sample_logprobs.float()
    gamma = 1.0 / SAMPLE_TEMPERATURE
    log_r = gamma * logp_s - cache.tail[:, TAIL_TEMPERATURES.index(SAMPLE_TEMPERATURE), None].float()
    m = logp_s.shape[1]
    # log r ≫ 0 only for the floored draws of an empty tail: their weight underflows to exactly 0.
    weight = (-log_r).exp() / m
    k, device = top.shape[1], top.device
    parts = (
        (cache.top_ids.long(), torch.zeros((1, k), dtype=torch.long, device=device)),
        ((top - log_z).clamp_min(LOG_FLOOR), torch.full((1, k), -math.log(k + 1), device=device)),
        ((tail_sum - log_z).squeeze(1).clamp_min(LOG_FLOOR), torch.full((1,), -math.log(k + 1), device=device)),
        (
            (beta * cache.tail[:, -1].float() - log_z.squeeze(1)).clamp_min(LOG_FLOOR),
            torch.full((1,), LOG_FLOOR, device=device),
        ),
        (cache.sample_ids.long(), torch.zeros((1, m), dtype=torch.long, device=device)),
        ((beta * logp_s - log_z).clamp_min(LOG_FLOOR), torch.full((1, m), LOG_FLOOR, device=device)),
        (weight, torch.zeros((1, m), device=device)),
    )
    return TeacherAtT(*(torch.cat(p) for p in parts))


# ---------------------------------------------------------------------------------------------
# The hidden form: int8 quantization


def quantize_hidden(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) hidden states -> int8 values (N, H) and float16 scales (N, G): symmetric, each group of
    HIDDEN_GROUP channels scaled by its largest magnitude / 127, rounded to nearest. The scale is
    rounded to float16 before dividing, so `dequantize_hidden` inverts exactly what was rounded."""
    n, h = hidden.shape
    groups = hidden_groups(h)
    x = F.pad(hidden.float(), (0, groups * HIDDEN_GROUP - h)).view(n, groups, HIDDEN_GROUP)
    scales = (x.abs().amax(-1) / 127).half()
    divisor = scales.float().masked_fill(scales == 0, 1.0)[..., None]  # an all-zero group stays 0
    values = (x / divisor).round().clamp(-127, 127).to(torch.int8)
    return values.view(n, -1)[:, :h], scales


def dequantize_hidden(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, h = values.shape
    x = F.pad(values.float(), (0, scales.shape[1] * HIDDEN_GROUP - h)).view(n, -1, HIDDEN_GROUP)
    return (x * scales.float()[..., None]).view(n, -1)[:, :h].to(dtype)


# ---------------------------------------------------------------------------------------------
# Production: from a teacher forward, in the scoring pass (measurers.py) and for the dev rows


def teacher_forward(teacher, inputs: Mapping[str, torch.Tensor], form: int | str | None, logits: bool, vocab_size: int):
    """(logits or None, final hidden states or None) of one teacher forward: the hidden form needs the
    final hidden states, and the logits (when asked for) are then its head applied to them. The logits
    cover the tokenizer's `vocab_size` tokens only (a padded head's extra rows are no token)."""
    if form != "hidden":
        return (teacher(**inputs).logits[..., :vocab_size] if logits else None), None
    hidden = teacher.base_model(**inputs, use_cache=False).last_hidden_state
    return (teacher.get_output_embeddings()(hidden)[..., :vocab_size] if logits else None), hidden


def storage_arrays(cache: TeacherCache, vocab_size: int) -> tuple[np.ndarray, ...]:
    """A top-K cache (any device/dtype) as the numpy arrays that are stored (CACHE_COLUMNS order)."""
    return tuple(x.cpu().numpy().astype(dtype or id_dtype(vocab_size)) for x, (_, _, dtype) in zip(cache, _LAYOUT))


def hidden_arrays(hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states (N, H) as the hidden form stores them (HIDDEN_COLUMNS order)."""
    values, scales = quantize_hidden(hidden)
    return values.cpu().numpy(), scales.cpu().numpy()


def row_caches(
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    vocab_size: int,
    row_ids: Sequence[str],
    chunk_positions: int = 512,
) -> list[tuple[np.ndarray, ...]]:
    """Each row's top-K cache in the storage dtypes (`storage_arrays`): one entry per scored position,
    in position order, its tail draws fixed by ``row_ids`` (one per row of ``labels``);
    `chunk_positions` positions at a time (the draws hold a float64 (chunk, vocab) cdf)."""
    rows, cols = scored_mask(labels).nonzero(as_tuple=True)  # row-major: each row's positions in order
    counts = torch.bincount(rows, minlength=labels.shape[0]).cpu().numpy()
    uniforms = torch.cat([tail_uniforms(str(i), int(n)) for i, n in zip(row_ids, counts)]).to(labels.device)
    chunks = [
        storage_arrays(
            teacher_top_k(
                teacher_logits[rows[a : a + chunk_positions], cols[a : a + chunk_positions]],
                k,
                uniforms[a : a + chunk_positions],
            ),
            vocab_size,
        )
        for a in range(0, rows.numel(), chunk_positions)
    ] or [storage_arrays(teacher_top_k(teacher_logits[:0, 0], k, uniforms), vocab_size)]  # nothing scored
    ends = np.cumsum(counts)[:-1]
    return list(zip(*(np.split(np.concatenate([c[j] for c in chunks]), ends) for j in range(len(CACHE_COLUMNS)))))


def row_hidden(labels: torch.Tensor, hidden: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's hidden-form cache (`hidden_arrays`): the teacher's final hidden state (rows, seq,
    hidden) at each scored position, in position order."""
    scored = scored_mask(labels)
    values, scales = hidden_arrays(hidden[scored])  # row-major: each row's positions in order
    ends = np.cumsum(scored.sum(1).cpu().numpy())[:-1]
    return list(zip(np.split(values, ends), np.split(scales, ends)))


def batch_caches(
    labels: torch.Tensor, teacher_logits, teacher_hidden, form: int | str, vocab_size: int, row_ids
) -> Sequence[tuple[np.ndarray, ...]]:
    """Each row's cache in ``form`` from one teacher forward (`teacher_forward`) over a batch."""
    if form == "hidden":
        return row_hidden(labels, teacher_hidden)
    return row_caches(labels, teacher_logits, int(form), vocab_size, row_ids)


@torch.no_grad()
def teacher_caches(
    teacher, rows: Sequence[dict], pad_token_id: int, form: int | str, vocab_size: int, batch_size: int = 16
) -> list[tuple[np.ndarray, ...]]:
    """Each row's cache (as `row_caches` or `row_hidden`), from a forward of `teacher` over the rows
    (dicts with id, input_ids, attention_mask and labels) in batches: for rows outside a scoring pass.
    The top-K form is over the tokenizer's `vocab_size` tokens."""
    out: list[tuple[np.ndarray, ...]] = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(teacher.device) for k, v in collate(list(rows[i : i + batch_size]), pad_token_id).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        t_logits, t_hidden = teacher_forward(teacher, inputs, form, form != "hidden", vocab_size)
        out += batch_caches(
            batch["labels"], t_logits, t_hidden, form, vocab_size, [r["id"] for r in rows[i : i + batch_size]]
        )
    return out


def cache_rows(cfg: RunConfig, rows: list[dict], teacher: ModelLocation, tokenizer: ModelLocation) -> None:
    """Add the teacher's cache, in the form cfg's scoring settings store, to each row (in place): for the
    dev rows of a kd.teacher: cached run, which are never scored (a few hundred, on the driver, once)."""
    form = cache_form(cfg.scoring)
    if form is None:
        raise ValueError("kd.teacher: cached needs scoring.teacher_top_k or scoring.teacher_hidden")
    model = load_model(teacher, dtype=torch.float32, frozen=True)
    tok = load_tokenizer(tokenizer)
    columns = HIDDEN_COLUMNS if cfg.scoring.teacher_hidden else CACHE_COLUMNS
    for row, cache in zip(rows, teacher_caches(model, rows, tok.pad_token_id, form, len(tok))):
        row.update(zip(columns, cache))


def arrow_columns(
    per_row: Sequence[tuple[np.ndarray, ...] | None], k: int | None, vocab_size: int, hidden_size: int | None = None
) -> dict[str, pa.Array]:
    """The cache columns of a batch of rows; a None row (rejected, unscored) gets empty lists."""
    lengths = [0 if r is None else len(r[0]) for r in per_row]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    out = {}
    for j, (name, width, dtype) in enumerate(layout(k, vocab_size, hidden_size)):
        parts = [r[j].reshape(-1) for r in per_row if r is not None]
        flat = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.from_numpy_dtype(dtype)), width)
        out[name] = pa.ListArray.from_arrays(offsets, values)
    return out


# ---------------------------------------------------------------------------------------------
# The hidden form's LM-head file


def check_hidden_form(teacher: ModelLocation) -> None:
    """scoring.teacher_hidden stores hidden states for training to apply the teacher's head to, which
    is only the teacher when its logits are exactly hidden @ head.T (checked on an empty model)."""
    weight, reason = linear_head(meta_model(teacher))
    if weight is None:
        raise ConfigError(
            f"scoring.teacher_hidden: {reason}, so its hidden states do not give its logits; "
            f"use scoring.teacher_top_k instead"
        )


def save_head(head: torch.Tensor, directory: str | Path) -> str | Path:
    """The teacher's LM head (vocab, hidden) into the scores directory (local, or a URI: one upload),
    for the hidden form."""
    from safetensors.torch import save, save_file

    path = storage.join(directory, HEAD_FILE)
    weights = {"weight": head.detach().cpu().contiguous()}
    if is_uri(path):
        storage.write_bytes(path, save(weights), "output.dir")
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(weights, path)
    return storage.as_path(path)


def save_teacher_head(teacher: ModelLocation, directory: str | Path, vocab_size: int) -> str | Path:
    """The other half of the hidden form: the teacher's LM head, once, beside the rows (float32); its
    first `vocab_size` rows, the tokenizer's tokens (a padded head's extra rows are no token)."""
    return save_head(output_embedding_rows(teacher, vocab_size), directory)


def load_head(directory: str | Path, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The stored head, from a local scores directory (memory-mapped) or one in object storage."""
    from safetensors.torch import load, load_file

    path = storage.join(directory, HEAD_FILE)
    weights = load(storage.read_bytes(path, "scores")) if is_uri(path) else load_file(path)
    return weights["weight"].to(device, dtype)


def _head_shape(path: str) -> tuple[int, ...] | None:
    """The stored head's shape from the safetensors header alone (an 8-byte little-endian length, then
    that many bytes of JSON): the driver checks a head in a bucket without downloading its weights."""
    filesystem, inner = storage.resolve(path)
    with filesystem.open_input_file(inner) as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return tuple(header["weight"]["shape"]) if "weight" in header else None


# ---------------------------------------------------------------------------------------------
# Before training: the scores hold the cache the config asks for


def _check_hidden_entry(entry: dict, directory: str) -> None:
    if entry.get("group_size") != HIDDEN_GROUP:
        raise ConfigError(
            f"kd.teacher: cached: the teacher cache at {directory} groups {entry.get('group_size')} channels "
            f"per scale, this version reads {HIDDEN_GROUP}; {_FIX}"
        )
    head = storage.join(directory, HEAD_FILE)
    if not storage.is_file(head, "scores"):
        raise ConfigError(f"kd.teacher: cached: the teacher's LM head {head} is missing; {_FIX}")
    shape = _head_shape(head)
    if shape != (entry["vocab_size"], entry["hidden_size"]):
        raise ConfigError(
            f"kd.teacher: cached: the LM head {head} is {shape}, expected "
            f"({entry['vocab_size']}, {entry['hidden_size']}); {_FIX}"
        )


def _check_top_k_entry(entry: dict, directory: str, cfg: RunConfig) -> None:
    if entry.get("tail_temperatures") != list(TAIL_TEMPERATURES):
        raise ConfigError(
            f"kd.teacher: cached: the teacher cache at {directory} stores its tail at temperatures "
            f"{entry.get('tail_temperatures')}, this version reads {list(TAIL_TEMPERATURES)}; {_FIX}"
        )
    if (entry.get("tail_samples"), entry.get("sample_temperature")) != (TAIL_SAMPLES, SAMPLE_TEMPERATURE):
        raise ConfigError(
            f"kd.teacher: cached: the teacher cache at {directory} stores {entry.get('tail_samples')} tail "
            f"draws at T = {entry.get('sample_temperature')}, this version reads {TAIL_SAMPLES} at "
            f"T = {SAMPLE_TEMPERATURE}; {_FIX}"
        )
    if cfg.scoring.teacher_top_k != entry["top_k"]:
        raise ConfigError(
            f"scoring.teacher_top_k: {cfg.scoring.teacher_top_k}, but the scores at {directory} cache the "
            f"top {entry['top_k']}; re-score or set scoring.teacher_top_k: {entry['top_k']}"
        )


def _check_form(entry: dict, directory: str, cfg: RunConfig) -> None:
    """The stored form, and its parameters, are the ones cfg asks for and this version reads."""
    form = entry.get("form", "top_k")
    if cfg.scoring.teacher_hidden and form != "hidden":
        raise ConfigError(
            f"scoring.teacher_hidden: true, but the scores at {directory} cache the teacher's top "
            f"{entry.get('top_k')}; re-score, or set scoring.teacher_top_k: {entry.get('top_k')}"
        )
    if form == "hidden" and not cfg.scoring.teacher_hidden:
        raise ConfigError(
            f"scoring.teacher_top_k: {cfg.scoring.teacher_top_k}, but the scores at {directory} cache "
            f"the teacher's hidden states; re-score, or set scoring.teacher_hidden: true"
        )
    if form == "hidden":
        _check_hidden_entry(entry, directory)
    else:
        _check_top_k_entry(entry, directory, cfg)


def _check_models(
    manifest: dict, entry: dict, directory: str, cfg: RunConfig, teacher: ModelSource, vocab_size: int
) -> None:
    """The cache is the run's teacher's (the same folder, Hub commit or URI version), over the run's
    tokenizer (whose `vocab_size` tokens every model's head covers: `models.check_tokenizers`)."""
    cached = manifest.get("models", {}).get("teacher")
    if isinstance(cached, str):  # a manifest from before model sources: the teacher's absolute folder
        cached = ModelSource("local", cached).record()
    if cached != teacher.record():
        raise ConfigError(
            f"models.teacher: {teacher.record()}, but the teacher cache at {directory} comes from {cached}; {_FIX}"
        )
    if entry["vocab_size"] != vocab_size:
        raise ConfigError(
            f"the teacher cached at {directory} covers {entry['vocab_size']} tokens, the run's tokenizer "
            f"({cfg.models.tokenizer or cfg.models.teacher}) has {vocab_size}; {_FIX}"
        )


def _check_columns(data: str, entry: dict) -> None:
    import pyarrow.dataset as pds

    filesystem, inner = storage.resolve(data)
    schema = pds.dataset(inner, filesystem=filesystem, format="parquet").schema
    expected = arrow_types(entry["top_k"], entry["vocab_size"], entry.get("hidden_size"))
    missing = [c for c in expected if c not in schema.names]
    wrong = [
        f"{c} is {schema.field(c).type}, expected {expected[c]}"
        for c in expected
        if c not in missing and schema.field(c).type != expected[c]
    ]
    if missing or wrong:
        problem = f"lack the columns {missing}" if missing else "have malformed columns: " + "; ".join(wrong)
        raise ConfigError(f"kd.teacher: cached: the scores at {data} {problem}; {_FIX}")


def check_teacher_cache(
    scores_path: str | Path, cfg: RunConfig, vocab_size: int, teacher: ModelSource | None = None
) -> dict | None:
    """For kd.teacher: cached, fail before any Ray work unless the scores at ``scores_path`` (the scores
    directory or its rows/) hold a teacher cache of the run's teacher (``teacher`` as the preflight
    resolved it; default: cfg's models.teacher as a local folder) in the form cfg asks for; returns the
    manifest's cache entry (None for kd.teacher: online). `vocab_size`: len(tokenizer) of the run, the
    tokens the cache must cover (`models.check_tokenizers`)."""
    if cfg.kd.teacher != "cached":
        return None
    directory = scores_dir_of(scores_path)
    manifest_path = storage.join(directory, MANIFEST_FILE)
    if not storage.is_file(manifest_path, "scores"):
        raise FileNotFoundError(
            f"kd.teacher: cached: no scoring manifest at {manifest_path}; run `pocl-ray score` first"
        )
    manifest = storage.read_json(manifest_path, "scores")
    entry = manifest.get("teacher_cache")
    if not entry:
        raise ConfigError(
            f"kd.teacher: cached: the scores at {directory} hold no teacher cache (scored without "
            f"scoring.teacher_top_k or scoring.teacher_hidden); {_FIX}"
        )
    _check_form(entry, directory, cfg)
    if teacher is None:
        teacher = ModelSource("local", str(Path(cfg.models.teacher).resolve()))
    _check_models(manifest, entry, directory, cfg, teacher, vocab_size)
    _check_columns(storage.join(directory, manifest["scores_path"]), entry)
    return entry


# ---------------------------------------------------------------------------------------------
# In training: a batch's cache on the device


def collate_teacher_cache(
    rows: Sequence[dict], device: torch.device, hidden: bool = False
) -> TeacherCache | HiddenCache:
    """The cache of a micro-batch's rows (row dicts as `shards.StepReader` gives them with the cache
    columns asked for), concatenated in row order onto ``device``: aligned with the batch's scored
    positions (`training.step.build_batch`) when given the same rows in the same order. The top-K form
    (a TeacherCache): ids become int64 (for gather), the log-probs stay float16 on the way to the device
    (half the bytes; the loss computes in fp32). The hidden form (``hidden``, a HiddenCache) travels as
    stored, int8. No rows (build_batch's all-masked stand-in row) gives an empty cache."""
    names = HIDDEN_COLUMNS if hidden else CACHE_COLUMNS
    kind = HiddenCache if hidden else TeacherCache
    # Widths and value dtypes come from the layout; ids become int64 here whatever their stored dtype,
    # so the vocabulary size passed to `layout` does not matter.
    if not rows:
        stand_in = layout(None, 0, 1) if hidden else layout(1, 0)
        return kind(
            *(
                torch.zeros(
                    (0, width), dtype=torch.int64 if c.endswith("_ids") else getattr(torch, dtype.name), device=device
                )
                for c, width, dtype in stand_in
            )
        )
    missing = [c for c in names if c not in rows[0]]
    if missing:
        raise ValueError(
            f"kd.teacher: cached: the rows lack {missing}; read them with StepReader(columns=[..., *{list(names)}])"
        )
    if hidden:
        width = np.shape(rows[0]["teacher_hidden"])[-1]
        shapes = layout(None, 0, width)
        about = f"hidden size {width}, {hidden_groups(width)} scales"
    else:
        k = np.shape(rows[0]["teacher_top_ids"])[-1]
        shapes = layout(k, 0)
        about = f"top-k {k}, {TAIL_STATS} tail statistics, {TAIL_SAMPLES} tail draws"
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i, row in enumerate(rows):
        scored = int(scored_mask(torch.as_tensor(np.asarray(row["labels"]))).sum())
        got = [np.shape(row[c]) for c in names]
        if got != [(scored, width) for _, width, _ in shapes]:
            raise ValueError(
                f"row {row.get('id', i)}: teacher cache shapes {got} do not match its {scored} scored "
                f"positions ({about}); {_FIX}"
            )
        for j, c in enumerate(names):
            parts[j].append(np.asarray(row[c]))
    # Ids as int64, for gather; values in their stored dtype.
    tensors = [
        torch.from_numpy(np.concatenate(p).astype(np.int64 if c.endswith("_ids") else dtype))
        for p, c, (_, _, dtype) in zip(parts, names, shapes)
    ]
    if device.type == "cuda":
        return kind(*(x.pin_memory().to(device, non_blocking=True) for x in tensors))
    return kind(*(x.to(device) for x in tensors))


def teacher_hidden_states(
    cache: HiddenCache, positions: torch.Tensor, shape: tuple[int, int], head: torch.Tensor
) -> torch.Tensor:
    """The batch's teacher final hidden states (batch, seq, hidden) in the head's dtype: the cache's at
    the flattened KD-scored ``positions`` (the batch's scored_positions, the cache's order), zero
    elsewhere (no loss reads them)."""
    out = torch.zeros((shape[0] * shape[1], head.shape[1]), dtype=head.dtype, device=head.device)
    if len(positions):
        out.index_copy_(0, positions, dequantize_hidden(cache.values, cache.scales, head.dtype))
    return out.view(*shape, -1)
