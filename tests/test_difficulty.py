"""Pure tests of rank fusion and bucketing (pocl_ray.difficulty)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pocl_ray.difficulty import (
    METRIC_DIRECTIONS,
    bucket_bounds,
    bucket_of_rank,
    bucket_summary,
    easy_to_hard,
    fuse,
    metric_directions,
    ordinal_ranks,
    rebucket,
    rrf,
)


def python_rrf_order(ids, metrics, directions, k=60.0):
    """Reference: rank each metric with sorted() (ties by id), sum 1/(k+rank), sort by (-score, id)."""
    fused = {i: 0.0 for i in ids}
    terms = {i: [] for i in ids}
    for name, values in metrics.items():
        sign = 1.0 if directions[name] == "lower" else -1.0
        ordered = sorted(zip(ids, values), key=lambda p: (sign * p[1], p[0]))
        for r, (i, _) in enumerate(ordered, start=1):
            terms[i].append(1.0 / (k + r))
    for i in ids:
        fused[i] = math.fsum(terms[i])
    return sorted(ids, key=lambda i: (-fused[i], i)), fused


def test_default_directions_follow_the_paper():
    assert METRIC_DIRECTIONS["student_ce"] == "lower"
    assert METRIC_DIRECTIONS["student_rougeL"] == "higher"
    assert metric_directions(["student_ce", "length"], {"length": "higher"}) == {"student_ce": "lower", "length": "higher"}


def test_directions_reject_unknown_and_stray_metrics():
    with pytest.raises(ValueError, match="no direction known.*'perplexity'"):
        metric_directions(["perplexity"])
    with pytest.raises(ValueError, match="not used.*teacher_ce"):
        metric_directions(["student_ce"], {"teacher_ce": "lower"})
    with pytest.raises(ValueError, match="'lower' or 'higher'"):
        metric_directions(["student_ce"], {"student_ce": "up"})


def test_ordinal_ranks_respect_direction_and_break_ties_by_id():
    ids = ["c", "a", "b", "d"]
    values = np.array([1.0, 2.0, 1.0, 0.5])
    assert ordinal_ranks(values, ids, "lower").tolist() == [3, 4, 2, 1]
    # "b" and "c" tie on 1.0 in both directions; "b" < "c" comes first either way.
    assert ordinal_ranks(values, ids, "higher").tolist() == [3, 1, 2, 4]


def test_ranks_reject_duplicate_ids_and_non_finite_values():
    with pytest.raises(ValueError, match="unique.*'a'"):
        ordinal_ranks(np.array([1.0, 2.0]), ["a", "a"], "lower")
    with pytest.raises(ValueError, match="not finite at row positions \\[1\\]"):
        ordinal_ranks(np.array([1.0, np.nan]), ["a", "b"], "lower")


def test_rrf_values_and_exact_ties():
    scores = rrf(np.array([[1, 2], [2, 1], [3, 3]]), k=60)
    assert scores[0] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[0] == scores[1]  # bit-identical, so the id decides
    assert scores[2] == pytest.approx(2 / 63)
    with pytest.raises(ValueError, match="k must be > 0"):
        rrf(np.array([[1]]), k=0)


def test_fuse_matches_pure_python_rrf_with_ties():
    rng = np.random.default_rng(0)
    n = 257
    ids = [f"s{int(i):04d}" for i in rng.permutation(n)]
    # Coarse values force many ties on each metric.
    metrics = {
        "student_ce": rng.integers(0, 20, n).astype(float),
        "student_rougeL": rng.integers(0, 10, n) / 10,
        "length": rng.integers(1, 50, n).astype(float),
    }
    directions = metric_directions(list(metrics))
    expected_order, expected_fused = python_rrf_order(ids, {m: v.tolist() for m, v in metrics.items()}, directions)

    out = fuse(ids, metrics, directions, k=60.0)
    got_order = [ids[i] for i in np.argsort(out.rank)]
    assert got_order == expected_order
    assert sorted(out.rank.tolist()) == list(range(n))
    for i, sid in enumerate(ids):
        assert out.fused_score[i] == pytest.approx(expected_fused[sid], abs=1e-15)


def test_fusion_is_independent_of_row_order():
    rng = np.random.default_rng(1)
    n = 100
    ids = np.array([f"r{i}" for i in range(n)], dtype=object)
    metrics = {"student_ce": rng.integers(0, 5, n).astype(float), "student_rougeL": rng.random(n)}
    dirs = metric_directions(list(metrics))
    base = dict(zip(ids, fuse(ids, metrics, dirs).rank))
    perm = rng.permutation(n)
    shuffled = fuse(ids[perm], {m: v[perm] for m, v in metrics.items()}, dirs)
    assert dict(zip(ids[perm], shuffled.rank)) == base


def test_flipping_a_direction_reverses_a_single_metric_order():
    ids = [f"x{i}" for i in range(6)]
    values = {"student_ce": np.array([0.3, 0.1, 0.5, 0.2, 0.6, 0.4])}
    lower = fuse(ids, values, {"student_ce": "lower"})
    higher = fuse(ids, values, {"student_ce": "higher"})
    assert easy_to_hard(lower.fused_score, ids).tolist() == [1, 3, 0, 5, 2, 4]
    assert np.array_equal(higher.rank, len(ids) - 1 - lower.rank)


@pytest.mark.parametrize("m,n", [(10, 4), (7, 3), (100, 7), (5, 5), (3, 5), (1, 1), (64, 4)])
def test_buckets_are_contiguous_equal_and_complete(m, n):
    ranks = np.arange(m)
    buckets = rebucket(ranks, n)
    sizes = np.bincount(buckets, minlength=n)
    assert sizes.sum() == m
    assert sizes.max() - sizes.min() <= 1
    assert np.all(np.diff(buckets) >= 0)  # easiest bucket first, contiguous in rank
    for b in range(n):
        start, stop = bucket_bounds(b, m, n)
        assert stop - start == sizes[b]
        assert np.all(buckets[start:stop] == b)
        assert all(bucket_of_rank(r, m, n) == b for r in range(start, stop))


def test_rebucket_reuses_stored_ranks_of_a_subset():
    # A reader holding only ranks 5..9 of M = 10 gets the same buckets as the full re-cut.
    full = rebucket(np.arange(10), 3)
    assert rebucket(np.arange(5, 10), 3, num_rows=10).tolist() == full[5:].tolist()


def test_bucket_inputs_are_validated():
    with pytest.raises(ValueError, match="num_buckets must be >= 1"):
        bucket_of_rank(0, 10, 0)
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 10\)"):
        bucket_of_rank(10, 10, 2)
    with pytest.raises(ValueError, match=r"bucket must lie in \[0, 2\)"):
        bucket_bounds(2, 10, 2)


def test_bucket_summary_orders_fused_ranges_easy_to_hard():
    rng = np.random.default_rng(2)
    ids = [f"id{i}" for i in range(50)]
    metrics = {"student_ce": rng.random(50), "student_rougeL": rng.random(50)}
    out = fuse(ids, metrics, metric_directions(list(metrics)))
    summary = bucket_summary(out.fused_score, rebucket(out.rank, 4), 4)
    assert [b["rows"] for b in summary] == [13, 12, 13, 12]
    for easier, harder in zip(summary, summary[1:]):
        assert easier["fused_min"] >= harder["fused_max"]
    assert summary[0]["fused_max"] == out.fused_score.max()
    assert summary[-1]["fused_min"] == out.fused_score.min()


def test_bucket_summary_reports_empty_buckets():
    summary = bucket_summary(np.array([0.5, 0.4]), rebucket(np.arange(2), 3), 3)
    assert [b["rows"] for b in summary] == [1, 1, 0]
    assert summary[2] == {"id": 2, "rows": 0, "fused_min": None, "fused_max": None}
