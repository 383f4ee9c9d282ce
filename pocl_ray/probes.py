"""The curriculum made visible: a fixed probe sample of every difficulty bucket.

At every stage end and selection candidate the trainer measures the student on the same few rows of
each bucket (output.bucket_probe_rows, default 32): the KD loss (forward KL at T = 1 against the
run's final teacher, as dev_kd_loss, so stages, plans and KD losses compare) and the student's
response cross-entropy on the reference. One line per bucket against samples seen answers whether
the easy buckets are learned before the hard ones arrive, and whether each new bucket starts harder
than the last.

The rows are drawn once from the ranks (`probe_ranks`: seeded, a function of the scored row count,
the bucket count and the sample size alone, so every compared run on the same scores probes the
same rows) and read from the scores (`read_probe_rows`). Each measurement is one metrics.jsonl
record per bucket (`probe_record`), beside the step records and told apart by its `kind`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pocl_ray import storage
from pocl_ray.difficulty import bucket_bounds

PROBE_KIND = "bucket_probe"
# Fixed: the probe is the same rows whatever the run's seeds, so runs that differ in them compare.
PROBE_SEED = 0


def probe_ranks(num_rows: int, num_buckets: int, rows_per_bucket: int, seed: int = PROBE_SEED) -> list[np.ndarray]:
    """Per bucket (easiest first), the sorted ranks of its probe rows: `rows_per_bucket` drawn
    without replacement from the bucket's rank range (all of it when the bucket is smaller)."""
    if rows_per_bucket < 0:
        raise ValueError(f"rows_per_bucket must be >= 0, got {rows_per_bucket}")
    ranks = []
    for b in range(num_buckets):
        start, stop = bucket_bounds(b, num_rows, num_buckets)
        rng = np.random.default_rng([seed, num_rows, num_buckets, b])
        take = min(rows_per_bucket, stop - start)
        ranks.append(np.sort(rng.choice(np.arange(start, stop, dtype=np.int64), size=take, replace=False)))
    return ranks


def read_probe_rows(scores_path: str | Path, ranks: Sequence[np.ndarray], columns: Sequence[str]) -> list[list[dict]]:
    """Per bucket, its probe rows from the scores parquet (a file or a directory of them): `columns`
    plus id and rank, in rank order."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    wanted = np.concatenate([np.asarray(r, dtype=np.int64) for r in ranks]) if ranks else np.zeros(0, np.int64)
    names = list(dict.fromkeys(["id", "rank", *columns]))
    filesystem, inner = storage.resolve(scores_path)
    table = pads.dataset(inner, filesystem=filesystem, format="parquet").to_table(
        columns=names, filter=pc.field("rank").isin(wanted)
    )
    by_rank = {row["rank"]: row for row in table.to_pylist()}
    missing = sorted(set(wanted.tolist()) - set(by_rank))
    if missing:
        raise ValueError(f"scores at {scores_path} lack the probe ranks {missing[:5]}; re-run `pocl-ray score`")
    return [[by_rank[int(r)] for r in bucket] for bucket in ranks]


def probe_record(
    *, step: int, stage: int, samples: int, at: str, bucket: int, rows: int, tokens: int, kd_loss: float, ce_loss: float
) -> dict:
    """One bucket's probe measurement as a metrics.jsonl record. `at` is "stage_end" or "candidate";
    kd_loss and ce_loss are means over the bucket's probe response tokens (`tokens` of them)."""
    return {
        "kind": PROBE_KIND,
        "step": int(step),
        "stage": int(stage),
        "samples": int(samples),
        "at": at,
        "bucket": int(bucket),
        "rows": int(rows),
        "tokens": int(tokens),
        "kd_loss": float(kd_loss),
        "ce_loss": float(ce_loss),
    }


def is_probe(record: Mapping) -> bool:
    return record.get("kind") == PROBE_KIND
