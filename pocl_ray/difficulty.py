"""Difficulty ordering of POCL (METHODS.md §1): per-metric ranks, reciprocal rank fusion, equal buckets.

Pure numpy/pandas over one value per (row, metric); the Ray scoring stage computes the metrics and
calls these functions on the driver. Equal metric values are equal ranks (average ranks), so rows
that measure the same get the same fused score; only the order among exactly equal fused scores is
decided, by a hash of the sample id keyed with a seed (``scoring.tie_seed``). Never by the id's
spelling: the testbed's ids start with their source, and an id order would sort buckets by source.
The same scores and seed always give the same order, whatever order the rows arrived in.

Buckets, as the scores store them: ``rank`` is the 0-based position in the easy->hard order over the M
scored rows and ``bucket_of_rank(rank, M, N) = rank * N // M``. Buckets are therefore contiguous rank
ranges of sizes that differ by at most one, and any N can be re-cut from the stored ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args, overload

import numpy as np
import pandas as pd

Direction = Literal["lower", "higher"]

# Which end of each metric is the easy one.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "student_ce": "lower",
    "student_rougeL": "higher",
    "teacher_ce": "lower",
    "teacher_student_kl": "lower",
    "length": "lower",
}


def metric_directions(metrics: Sequence[str], overrides: Mapping[str, str] | None = None) -> dict[str, Direction]:
    """The easy direction of each metric in ``metrics``: the default, or the override where given."""
    overrides = dict(overrides or {})
    unknown = [m for m in metrics if m not in METRIC_DIRECTIONS and m not in overrides]
    if unknown:
        raise ValueError(f"no direction known for metrics {unknown}; known: {sorted(METRIC_DIRECTIONS)}")
    stray = sorted(set(overrides) - set(metrics))
    if stray:
        raise ValueError(f"directions given for metrics that are not used: {stray}")
    out: dict[str, Direction] = {}
    for m in metrics:
        d = overrides.get(m, METRIC_DIRECTIONS.get(m))
        if d not in get_args(Direction):
            raise ValueError(f"direction of {m!r} must be 'lower' or 'higher', got {d!r}")
        out[m] = cast(Direction, d)
    return out


def _check_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """The ids as strings; duplicates are an error (a row's place must not depend on its twin's)."""
    ids = np.asarray(ids, dtype=object).astype(str)
    if len(np.unique(ids)) != len(ids):
        counts = pd.Series(ids).value_counts()
        raise ValueError(f"sample ids must be unique; repeated: {counts[counts > 1].index[:5].tolist()}")
    return ids


def tie_keys(ids: Sequence[str] | np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded pseudo-random uint64 per id: the order among exactly equal fused scores.

    BLAKE2b keyed by the seed, so the order is the same on every machine and Python process (unlike
    ``hash``) and unrelated to the ids' spelling: ids that share a prefix ("austen-…", "gcide-…")
    spread over the tie instead of sorting by source, and another seed gives another order.
    """
    return _tie_keys(_check_ids(ids), seed)


def _tie_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    key = int(seed).to_bytes(8, "little", signed=True)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "little") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


def _check_values(name: str, values: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"metric {name!r} has {values.shape} values, expected ({n},)")
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"metric {name!r} is not finite at row positions {np.flatnonzero(bad)[:5].tolist()}")
    return values


def _average_ranks(name: str, values: np.ndarray, n: int, direction: Direction) -> np.ndarray:
    values = _check_values(name, values, n)
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction of {name!r} must be 'lower' or 'higher', got {direction!r}")
    key = values if direction == "lower" else -values
    # A block of equal values occupying positions start+1..stop all get (start + 1 + stop) / 2.
    _, block, counts = np.unique(key, return_inverse=True, return_counts=True)
    stop = np.cumsum(counts)
    return ((stop - counts + 1 + stop) / 2.0)[block.reshape(-1)]


def average_ranks(values: np.ndarray, direction: Direction) -> np.ndarray:
    """1-based rank of each row on one metric (1 = easiest); equal values share their average rank.

    The average is the rank a tied row gets in expectation under a uniformly random tie-break, so
    a large tie (many ROUGE-L = 0) is placed neither ahead of nor behind where it belongs, and
    flipping the direction maps rank r to M + 1 - r exactly (METHODS.md §1, ties).
    """
    values = np.asarray(values)
    return _average_ranks("values", values, len(values), direction)


def rrf(ranks: np.ndarray, k: float = 60.0) -> np.ndarray:
    """Reciprocal rank fusion of an (rows, metrics) matrix of 1-based ranks: Σ_m 1 / (k + rank_m).

    Terms are summed in sorted order so rows holding the same ranks in different metrics get
    bit-identical scores (a true tie, then broken by the seeded tie keys) rather than a
    rounding-order difference.
    """
    if k <= 0:
        raise ValueError(f"rrf k must be > 0, got {k}")
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be a (rows, metrics) matrix, got shape {ranks.shape}")
    return np.sort(1.0 / (k + ranks), axis=1).sum(axis=1)


def easy_to_hard(fused: np.ndarray, ids: Sequence[str] | np.ndarray, tie_seed: int = 0) -> np.ndarray:
    """Row positions from easiest to hardest: fused score descending, exact ties by ``tie_keys``.

    The id itself is the last key only so that two ids whose 64-bit keys collide (odds ~M²/2⁶⁵)
    still get one fixed order.
    """
    ids = _check_ids(ids)
    return _easy_to_hard(_check_values("fused_score", fused, len(ids)), ids, tie_seed)


def _easy_to_hard(fused: np.ndarray, ids: np.ndarray, tie_seed: int) -> np.ndarray:
    return np.lexsort((ids, _tie_keys(ids, tie_seed), -fused))


@dataclass(frozen=True)
class Fusion:
    """Fused difficulty of M rows, aligned with the input rows."""

    fused_score: np.ndarray  # float64, higher = easier
    rank: np.ndarray  # int64, 0 = easiest
    metric_ranks: dict[str, np.ndarray]  # 1-based per-metric average ranks (float64)


def fuse(
    ids: Sequence[str] | np.ndarray,
    metrics: Mapping[str, np.ndarray],
    directions: Mapping[str, Direction],
    k: float = 60.0,
    tie_seed: int = 0,
) -> Fusion:
    """Rank every metric (1 = easiest by its direction, ties averaged), fuse by RRF, order easy->hard.

    Rows with the same metric values get the same fused score; only the order among exactly equal
    fused scores is decided, by ``tie_keys(ids, tie_seed)``.
    """
    if not metrics:
        raise ValueError("fusion needs at least one metric")
    missing = [m for m in metrics if m not in directions]
    if missing:
        raise ValueError(f"no direction given for metrics {missing}")
    ids = _check_ids(ids)
    n = len(ids)
    metric_ranks = {m: _average_ranks(m, v, n, directions[m]) for m, v in metrics.items()}
    fused = rrf(np.stack(list(metric_ranks.values()), axis=1), k)
    order = _easy_to_hard(fused, ids, tie_seed)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return Fusion(fused_score=fused, rank=rank, metric_ranks=metric_ranks)


def _check_counts(num_rows: int, num_buckets: int) -> None:
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")


@overload
def bucket_of_rank(rank: int, num_rows: int, num_buckets: int) -> int: ...
@overload
def bucket_of_rank(rank: np.ndarray, num_rows: int, num_buckets: int) -> np.ndarray: ...
def bucket_of_rank(rank: int | np.ndarray, num_rows: int, num_buckets: int) -> int | np.ndarray:
    """Bucket id of a 0-based rank among ``num_rows``: rank * N // M (easiest bucket = 0)."""
    _check_counts(num_rows, num_buckets)
    r = np.asarray(rank, dtype=np.int64)
    if r.size and (r.min() < 0 or r.max() >= num_rows):
        raise ValueError(f"ranks must lie in [0, {num_rows}), got range [{r.min()}, {r.max()}]")
    b = r * num_buckets // num_rows if num_rows else r
    return int(b) if np.ndim(rank) == 0 else b.astype(np.int32)


def bucket_bounds(bucket: int, num_rows: int, num_buckets: int) -> tuple[int, int]:
    """Half-open rank range [start, stop) of ``bucket``: [ceil(b*M/N), ceil((b+1)*M/N))."""
    _check_counts(num_rows, num_buckets)
    if not 0 <= bucket < num_buckets:
        raise ValueError(f"bucket must lie in [0, {num_buckets}), got {bucket}")
    return -(-bucket * num_rows // num_buckets), -(-(bucket + 1) * num_rows // num_buckets)


def rebucket(ranks: np.ndarray, num_buckets: int, num_rows: int | None = None) -> np.ndarray:
    """Re-cut stored ranks into ``num_buckets`` buckets without re-scoring.

    ``num_rows`` is the M the ranks were computed over; default: ``len(ranks)`` (all rows given).
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    return bucket_of_rank(ranks, len(ranks) if num_rows is None else num_rows, num_buckets)


def bucket_summary(fused: np.ndarray, buckets: np.ndarray, num_buckets: int) -> list[dict]:
    """Per bucket: {id, rows, fused_min, fused_max}; an empty bucket (N > M) has None bounds."""
    frame = pd.DataFrame({"bucket": np.asarray(buckets), "fused": np.asarray(fused, dtype=np.float64)})
    stats = frame.groupby("bucket")["fused"].agg(["size", "min", "max"])
    out: list[dict[str, Any]] = []
    for b in range(num_buckets):
        if b in stats.index:
            row = stats.loc[b]
            out.append(
                {"id": b, "rows": int(row["size"]), "fused_min": float(row["min"]), "fused_max": float(row["max"])}
            )
        else:
            out.append({"id": b, "rows": 0, "fused_min": None, "fused_max": None})
    return out
