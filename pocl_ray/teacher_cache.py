"""The cached teacher as stored in the scores (METHODS.md §4): its columns, their bytes, the check a
training driver runs before any Ray work, and the collation of a batch's cache onto the device.

Per scored position of a row (position t with labels[t + 1] != -100, in order) the scoring pass
stores (`losses.teacher_top_k`):
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
Each column is a list (one entry per scored position) of fixed-size lists, which `shards.StepReader`
returns as a 2-D numpy array per row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

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
_FIX = "re-run `pocl-ray score` with scoring.teacher_top_k set, or use kd.teacher: online"


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def bytes_per_token(k: int, vocab_size: int) -> int:
    """Stored bytes per scored token before parquet compression."""
    return sum((width or k) * np.dtype(dtype or id_dtype(vocab_size)).itemsize for _, width, dtype in _LAYOUT)


def arrow_types(k: int, vocab_size: int) -> dict[str, pa.DataType]:
    return {name: pa.list_(pa.list_(pa.from_numpy_dtype(dtype or id_dtype(vocab_size)), width or k))
            for name, width, dtype in _LAYOUT}


def tail_uniforms(row_id: str, positions: int) -> torch.Tensor:
    """float64 (positions, TAIL_SAMPLES) in [0, 1) for a row's tail draws, a function of its id alone; two
    24-bit uniforms make each one (48 bits), so tail tokens far below 2^-24 of the proposal are reachable."""
    u = row_uniforms([stream_seed(0, "teacher_tail", row_id)], 2 * positions * TAIL_SAMPLES)[0].double()
    return (u[0::2] + u[1::2] * 2.0**-24).reshape(positions, TAIL_SAMPLES)


def storage_arrays(cache: TeacherCache, vocab_size: int) -> tuple[np.ndarray, ...]:
    """A cache (any device/dtype) as the numpy arrays that are stored (CACHE_COLUMNS order), in the storage dtypes."""
    return tuple(t.cpu().numpy().astype(dtype or id_dtype(vocab_size)) for t, (_, _, dtype) in zip(cache, _LAYOUT))


def arrow_columns(per_row: Sequence[tuple[np.ndarray, ...] | None], k: int, vocab_size: int) -> dict[str, pa.Array]:
    """The cache columns of a batch of rows; a None row (rejected, unscored) gets empty lists."""
    types = arrow_types(k, vocab_size)
    lengths = [0 if r is None else len(r[0]) for r in per_row]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    out = {}
    for j, name in enumerate(CACHE_COLUMNS):
        inner = types[name].value_type
        dtype = inner.value_type.to_pandas_dtype()
        parts = [r[j].reshape(-1) for r in per_row if r is not None]
        flat = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=inner.value_type), inner.list_size)
        out[name] = pa.ListArray.from_arrays(offsets, values)
    return out


def manifest_entry(k: int, vocab_size: int) -> dict:
    return {
        "top_k": k,
        "vocab_size": vocab_size,
        "id_dtype": id_dtype(vocab_size).name,
        "values": "log-softmax at T = 1, float16",
        "tail_temperatures": list(TAIL_TEMPERATURES),
        "tail_samples": TAIL_SAMPLES,
        "sample_temperature": SAMPLE_TEMPERATURE,
        "bytes_per_scored_token": bytes_per_token(k, vocab_size),
        "columns": list(CACHE_COLUMNS),
    }


def _scores_dir(scores_path: str | Path) -> Path:
    path = Path(scores_path)
    return path if (path / "manifest.json").is_file() or not (path.parent / "manifest.json").is_file() else path.parent


def check_teacher_cache(scores_path: str | Path, cfg: RunConfig) -> dict | None:
    """For kd.teacher: cached, fail before any Ray work unless the scores at ``scores_path`` (the scores
    directory or its rows/) hold a teacher cache of cfg's teacher and top-k; returns the
    manifest's cache entry (None for kd.teacher: online)."""
    import pyarrow.dataset as pds

    if cfg.kd.teacher != "cached":
        return None
    directory = _scores_dir(scores_path)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"kd.teacher: cached: no scoring manifest at {manifest_path}; run `pocl-ray score` first")
    manifest = json.loads(manifest_path.read_text())
    entry = manifest.get("teacher_cache")
    if not entry:
        raise ConfigError(f"kd.teacher: cached: the scores at {directory} hold no teacher cache (scored without "
                          f"scoring.teacher_top_k); {_FIX}")
    if entry.get("tail_temperatures") != list(TAIL_TEMPERATURES):
        raise ConfigError(f"kd.teacher: cached: the teacher cache at {directory} stores its tail at temperatures "
                          f"{entry.get('tail_temperatures')}, this version reads {list(TAIL_TEMPERATURES)}; {_FIX}")
    if (entry.get("tail_samples"), entry.get("sample_temperature")) != (TAIL_SAMPLES, SAMPLE_TEMPERATURE):
        raise ConfigError(f"kd.teacher: cached: the teacher cache at {directory} stores {entry.get('tail_samples')} tail "
                          f"draws at T = {entry.get('sample_temperature')}, this version reads {TAIL_SAMPLES} at "
                          f"T = {SAMPLE_TEMPERATURE}; {_FIX}")
    if cfg.scoring.teacher_top_k != entry["top_k"]:
        raise ConfigError(f"scoring.teacher_top_k: {cfg.scoring.teacher_top_k}, but the scores at {directory} cache the "
                          f"top {entry['top_k']}; re-score or set scoring.teacher_top_k: {entry['top_k']}")
    teacher = str(Path(cfg.models.teacher).resolve())
    if manifest.get("models", {}).get("teacher") != teacher:
        raise ConfigError(f"models.teacher: {teacher}, but the teacher cache at {directory} comes from "
                          f"{manifest.get('models', {}).get('teacher')}; {_FIX}")
    data = directory / manifest["scores_path"]
    schema = pds.dataset(str(data), format="parquet").schema
    expected = arrow_types(entry["top_k"], entry["vocab_size"])
    missing = [c for c in CACHE_COLUMNS if c not in schema.names]
    wrong = [f"{c} is {schema.field(c).type}, expected {expected[c]}" for c in CACHE_COLUMNS
             if c not in missing and schema.field(c).type != expected[c]]
    if missing or wrong:
        problem = f"lack the columns {missing}" if missing else "have malformed columns: " + "; ".join(wrong)
        raise ConfigError(f"kd.teacher: cached: the scores at {data} {problem}; {_FIX}")
    return entry


def collate_teacher_cache(rows: Sequence[dict], device: torch.device) -> TeacherCache:
    """The cache of a micro-batch's rows (row dicts as `shards.StepReader` gives them with the
    CACHE_COLUMNS asked for), concatenated in row order onto ``device``: aligned with `build_batch`'s
    scored positions when given the same rows in the same order. Ids become int64 (for gather); the
    log-probs stay float16 on the way to the device (half the bytes; the loss computes in fp32).
    No rows (build_batch's all-masked stand-in row) gives an empty cache."""
    widths = [width for _, width, _ in _LAYOUT]
    dtypes = [np.int64 if dtype is None else dtype for _, _, dtype in _LAYOUT]  # ids as int64, for gather
    if not rows:
        return TeacherCache(*(torch.zeros((0, w or 1), dtype=getattr(torch, np.dtype(d).name), device=device)
                              for w, d in zip(widths, dtypes)))
    missing = [c for c in CACHE_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"kd.teacher: cached: the rows lack {missing}; read them with StepReader(columns=[..., *CACHE_COLUMNS])")
    k = np.shape(rows[0]["teacher_top_ids"])[-1]
    parts: list[list[np.ndarray]] = [[] for _ in CACHE_COLUMNS]
    for i, row in enumerate(rows):
        scored = int((np.asarray(row["labels"])[1:] != IGNORE_INDEX).sum())
        shapes = [np.shape(row[c]) for c in CACHE_COLUMNS]
        if shapes != [(scored, w or k) for w in widths]:
            raise ValueError(f"row {row.get('id', i)}: teacher cache shapes {shapes} do not match its {scored} scored "
                             f"positions (top-k {k}, {TAIL_STATS} tail statistics, {TAIL_SAMPLES} tail draws); {_FIX}")
        for j, c in enumerate(CACHE_COLUMNS):
            parts[j].append(np.asarray(row[c]))
    tensors = [torch.from_numpy(np.concatenate(p).astype(d)) for p, d in zip(parts, dtypes)]
    if device.type == "cuda":
        return TeacherCache(*(t.pin_memory().to(device, non_blocking=True) for t in tensors))
    return TeacherCache(*(t.to(device) for t in tensors))
