"""The cached teacher as stored in the scores (METHODS.md §4): its columns, their bytes, the check a
training driver runs before any Ray work, and the collation of a batch's cache onto the device.

It comes in two forms, one per scoring setting. With scoring.teacher_hidden the scoring pass stores,
per scored position (position t with labels[t + 1] != -100, in order), the teacher's final normed
hidden state in int8 (`quantize_hidden`: one float16 scale per HIDDEN_GROUP channels), and once, in
the scores directory, the teacher's LM head (HEAD_FILE): training applies that head to the hidden state
and takes every KD kind at any temperature exactly as online, up to the int8 rounding. Bytes per token:
hidden_size + hidden_size / 32.

With scoring.teacher_top_k: K it stores, per scored position (`losses.teacher_top_k`):
- teacher_top_ids: the top-K token ids, uint16 when the vocabulary fits (≤ 65,536 tokens), else int32;
- teacher_top_logprobs: their log-softmax at T = 1 in float16. Log-probs rather than logits: they are
  ≤ 0 and near 0 exactly where the mass is, where float16 is most precise (absolute error ~1e-5 at
  log p ≈ -0.01), while a logit's error grows with its offset (~0.01 at a logit of 20); softmax at T
  is shift-invariant, so log p / T re-tempers them exactly as logits / T would. float16 rather than
  bfloat16: 8x the precision, and log-probs need no more range than float16's;
- teacher_tail: log Σ_{j ∉ top-K} p_j^(1/T) for T in losses.TAIL_TEMPERATURES, then the mean log p_j over
  the tail at T = 1, float32;
- teacher_sample_ids / teacher_sample_logprobs: losses.TAIL_SAMPLES tail tokens drawn with replacement
  from the teacher's tail at losses.SAMPLE_TEMPERATURE (ids as teacher_top_ids) and their log-softmax at
  T = 1 (float16). The draws are a fixed function of the row id (`tail_uniforms`), so re-scoring a row
  stores the same tokens.
Its bytes per token do not grow with the teacher's width, but its tail is estimated (METHODS.md §4).

Each column is a list (one entry per scored position) of fixed-size lists, which `shards.StepReader`
returns as a 2-D numpy array per row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pocl_ray.config import ConfigError, RunConfig
from pocl_ray.data import IGNORE_INDEX
from pocl_ray.losses import SAMPLE_TEMPERATURE, TAIL_SAMPLES, TAIL_TEMPERATURES, TeacherCache
from pocl_ray.sampling import row_uniforms, stream_seed

TAIL_STATS = len(TAIL_TEMPERATURES) + 1  # the tail sums, then the tail mean log-prob
# Each column in TeacherCache order: its width per scored position (None: K) and its stored dtype
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


class HiddenCache(NamedTuple):
    """The hidden form of a batch: per KD-scored position (row-major) the int8 values (N, hidden) and
    their float16 scales (N, ceil(hidden / HIDDEN_GROUP))."""

    values: torch.Tensor
    scales: torch.Tensor


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def cache_form(scoring) -> int | str | None:
    """What a scoring config asks the measurers to store (measurers.py): K, "hidden" or None."""
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


def teacher_hidden_states(
    cache: HiddenCache, positions: torch.Tensor, shape: tuple[int, int], head: torch.Tensor
) -> torch.Tensor:
    """The batch's teacher final hidden states (batch, seq, hidden) in the head's dtype: the cache's at
    the flattened KD-scored ``positions`` (`build_batch`'s scored_positions, the cache's order), zero
    elsewhere (no loss reads them)."""
    out = torch.zeros((shape[0] * shape[1], head.shape[1]), dtype=head.dtype, device=head.device)
    if len(positions):
        out.index_copy_(0, positions, dequantize_hidden(cache.values, cache.scales, head.dtype))
    return out.view(*shape, -1)


def tail_uniforms(row_id: str, positions: int) -> torch.Tensor:
    """float64 (positions, TAIL_SAMPLES) in [0, 1) for a row's tail draws, a function of its id alone; two
    24-bit uniforms make each one (48 bits), so tail tokens far below 2^-24 of the proposal are reachable."""
    u = row_uniforms([stream_seed(0, "teacher_tail", row_id)], 2 * positions * TAIL_SAMPLES)[0].double()
    return (u[0::2] + u[1::2] * 2.0**-24).reshape(positions, TAIL_SAMPLES)


def storage_arrays(cache: TeacherCache, vocab_size: int) -> tuple[np.ndarray, ...]:
    """A top-K cache (any device/dtype) as the numpy arrays that are stored (CACHE_COLUMNS order), in the storage dtypes."""
    return tuple(t.cpu().numpy().astype(dtype or id_dtype(vocab_size)) for t, (_, _, dtype) in zip(cache, _LAYOUT))


def hidden_arrays(hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states (N, H) as the hidden form stores them (HIDDEN_COLUMNS order)."""
    values, scales = quantize_hidden(hidden)
    return values.cpu().numpy(), scales.cpu().numpy()


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


def save_head(head: torch.Tensor, directory: str | Path) -> Path:
    """The teacher's LM head (vocab, hidden) into the scores directory, for the hidden form."""
    from safetensors.torch import save_file

    path = Path(directory) / HEAD_FILE
    save_file({"weight": head.detach().cpu().contiguous()}, str(path))
    return path


def load_head(directory: str | Path, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / HEAD_FILE))["weight"].to(device, dtype)


def _scores_dir(scores_path: str | Path) -> Path:
    path = Path(scores_path)
    return path if (path / "manifest.json").is_file() or not (path.parent / "manifest.json").is_file() else path.parent


def _check_form(entry: dict, directory: Path, cfg: RunConfig) -> None:
    """The stored form, and its parameters, are the ones cfg asks for and this version reads."""
    form = entry.get("form", "top_k")
    if cfg.scoring.teacher_hidden and form != "hidden":
        raise ConfigError(
            f"scoring.teacher_hidden: true, but the scores at {directory} cache the teacher's top "
            f"{entry.get('top_k')}; re-score, or set scoring.teacher_top_k: {entry.get('top_k')}"
        )
    if form == "hidden":
        if not cfg.scoring.teacher_hidden:
            raise ConfigError(
                f"scoring.teacher_top_k: {cfg.scoring.teacher_top_k}, but the scores at {directory} cache "
                f"the teacher's hidden states; re-score, or set scoring.teacher_hidden: true"
            )
        if entry.get("group_size") != HIDDEN_GROUP:
            raise ConfigError(
                f"kd.teacher: cached: the teacher cache at {directory} groups {entry.get('group_size')} channels "
                f"per scale, this version reads {HIDDEN_GROUP}; {_FIX}"
            )
        head = directory / HEAD_FILE
        if not head.is_file():
            raise ConfigError(f"kd.teacher: cached: the teacher's LM head {head} is missing; {_FIX}")
        from safetensors import safe_open

        with safe_open(str(head), "pt") as f:
            shape = tuple(f.get_slice("weight").get_shape()) if "weight" in f.keys() else None
        if shape != (entry["vocab_size"], entry["hidden_size"]):
            raise ConfigError(
                f"kd.teacher: cached: the LM head {head} is {shape}, expected "
                f"({entry['vocab_size']}, {entry['hidden_size']}); {_FIX}"
            )
        return
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


def check_teacher_cache(scores_path: str | Path, cfg: RunConfig) -> dict | None:
    """For kd.teacher: cached, fail before any Ray work unless the scores at ``scores_path`` (the scores
    directory or its rows/) hold a teacher cache of cfg's teacher in the form cfg asks for; returns the
    manifest's cache entry (None for kd.teacher: online)."""
    import pyarrow.dataset as pds

    if cfg.kd.teacher != "cached":
        return None
    directory = _scores_dir(scores_path)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"kd.teacher: cached: no scoring manifest at {manifest_path}; run `pocl-ray score` first"
        )
    manifest = json.loads(manifest_path.read_text())
    entry = manifest.get("teacher_cache")
    if not entry:
        raise ConfigError(
            f"kd.teacher: cached: the scores at {directory} hold no teacher cache (scored without "
            f"scoring.teacher_top_k or scoring.teacher_hidden); {_FIX}"
        )
    _check_form(entry, directory, cfg)
    teacher = str(Path(cfg.models.teacher).resolve())
    if manifest.get("models", {}).get("teacher") != teacher:
        raise ConfigError(
            f"models.teacher: {teacher}, but the teacher cache at {directory} comes from "
            f"{manifest.get('models', {}).get('teacher')}; {_FIX}"
        )
    if cfg.models.student is not None:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(cfg.models.student).get_text_config().vocab_size
        if vocab != entry["vocab_size"]:
            raise ConfigError(
                f"models.student: vocab_size {vocab} differs from the {entry['vocab_size']} of the teacher "
                f"cached at {directory}; KD needs one shared vocabulary"
            )
    data = directory / manifest["scores_path"]
    schema = pds.dataset(str(data), format="parquet").schema
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
    return entry


def collate_teacher_cache(
    rows: Sequence[dict], device: torch.device, hidden: bool = False
) -> TeacherCache | HiddenCache:
    """The cache of a micro-batch's rows (row dicts as `shards.StepReader` gives them with the cache
    columns asked for), concatenated in row order onto ``device``: aligned with `build_batch`'s
    scored positions when given the same rows in the same order. The top-K form (a TeacherCache):
    ids become int64 (for gather), the log-probs stay float16 on the way to the device (half the bytes;
    the loss computes in fp32). The hidden form (``hidden``, a HiddenCache) travels as stored, int8.
    No rows (build_batch's all-masked stand-in row) gives an empty cache."""
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
        scored = int((np.asarray(row["labels"])[1:] != IGNORE_INDEX).sum())
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
        return kind(*(t.pin_memory().to(device, non_blocking=True) for t in tensors))
    return kind(*(t.to(device) for t in tensors))
