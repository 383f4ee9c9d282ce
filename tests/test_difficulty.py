"""Pure tests of rank fusion and bucketing (pocl_ray.difficulty)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pocl_ray.difficulty import (
    METRIC_DIRECTIONS,
    average_ranks,
    bucket_bounds,
    bucket_of_rank,
    bucket_summary,
    easy_to_hard,
    fuse,
    metric_directions,
    rebucket,
    rrf,
    tie_keys,
)


def python_average_ranks(values, direction):
    """Reference: a row's rank is 1 + #rows strictly easier + (#other rows equal to it) / 2."""
    sign = 1.0 if direction == "lower" else -1.0
    keys = [sign * v for v in values]
    return [1 + sum(o < v for o in keys) + (sum(o == v for o in keys) - 1) / 2 for v in keys]


def python_rrf_order(ids, metrics, directions, k=60.0, tie_seed=0):
    """Reference: average ranks per metric, sum 1/(k+rank), sort by (-score, seeded tie key)."""
    terms = {i: [] for i in ids}
    for name, values in metrics.items():
        for i, r in zip(ids, python_average_ranks(values, directions[name])):
            terms[i].append(1.0 / (k + r))
    fused = {i: math.fsum(terms[i]) for i in ids}
    key = dict(zip(ids, tie_keys(ids, tie_seed).tolist()))
    return sorted(ids, key=lambda i: (-fused[i], key[i])), fused


def test_default_directions_follow_the_paper():
    assert METRIC_DIRECTIONS["student_ce"] == "lower"
    assert METRIC_DIRECTIONS["student_rougeL"] == "higher"
    assert metric_directions(["student_ce", "length"], {"length": "higher"}) == {
        "student_ce": "lower",
        "length": "higher",
    }


def test_directions_reject_unknown_and_stray_metrics():
    with pytest.raises(ValueError, match="no direction known.*'perplexity'"):
        metric_directions(["perplexity"])
    with pytest.raises(ValueError, match="not used.*teacher_ce"):
        metric_directions(["student_ce"], {"teacher_ce": "lower"})
    with pytest.raises(ValueError, match="'lower' or 'higher'"):
        metric_directions(["student_ce"], {"student_ce": "up"})


def test_average_ranks_respect_direction_and_share_ties():
    values = np.array([1.0, 2.0, 1.0, 0.5, 1.0])
    # The three 1.0 rows hold places 2..4 and all get 3; flipping the direction maps r -> M + 1 - r.
    assert average_ranks(values, "lower").tolist() == [3, 5, 3, 1, 3]
    assert average_ranks(values, "higher").tolist() == [3, 1, 3, 5, 3]
    assert average_ranks(np.zeros(4), "higher").tolist() == [2.5] * 4
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 4, 40).astype(float)
    assert average_ranks(coarse, "lower").tolist() == python_average_ranks(coarse.tolist(), "lower")


def test_ranks_reject_duplicate_ids_and_non_finite_values():
    with pytest.raises(ValueError, match="unique.*'a'"):
        fuse(["a", "a"], {"length": np.array([1.0, 2.0])}, {"length": "lower"})
    with pytest.raises(ValueError, match="'length' is not finite at row positions \\[1\\]"):
        fuse(["a", "b"], {"length": np.array([1.0, np.nan])}, {"length": "lower"})


def test_rrf_values_and_exact_ties():
    scores = rrf(np.array([[1, 2], [2, 1], [3, 3]]), k=60)
    assert scores[0] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[0] == scores[1]  # bit-identical, so the seeded tie key decides
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


def test_identical_metric_values_give_identical_fused_scores():
    ids = ["gcide-7", "austen-2", "gcide-1", "austen-9", "kjv-3"]
    metrics = {"student_rougeL": np.array([0.0, 0.0, 0.0, 0.5, 0.0]), "student_ce": np.array([2.0, 2.0, 2.0, 1.0, 3.0])}
    out = fuse(ids, metrics, metric_directions(list(metrics)))
    # The three (0.0, 2.0) rows share every per-metric rank, hence one fused score.
    assert out.metric_ranks["student_rougeL"].tolist() == [3.5, 3.5, 3.5, 1, 3.5]
    assert out.metric_ranks["student_ce"].tolist() == [3, 3, 3, 1, 5]
    assert out.fused_score[0] == out.fused_score[1] == out.fused_score[2]
    assert len(set(out.fused_score.tolist())) == 3
    # The tie occupies ranks 1..3 between the easiest (austen-9) and the hardest (kjv-3) row.
    assert (out.rank[3], out.rank[4]) == (0, 4) and sorted(out.rank[:3].tolist()) == [1, 2, 3]


def test_a_constant_metric_leaves_the_order_to_the_others():
    # A weak initial student scores ROUGE-L = 0 on every row: that measure must not order anything.
    # (Ranking its ties by id put every "austen-" row ahead of every "gcide-" row.)
    rng = np.random.default_rng(4)
    ids = [f"{src}-{i:03d}" for src in ("austen", "gcide") for i in range(60)]
    ce = rng.random(120)
    both = fuse(
        ids, {"student_rougeL": np.zeros(120), "student_ce": ce}, metric_directions(["student_rougeL", "student_ce"])
    )
    ce_only = fuse(ids, {"student_ce": ce}, {"student_ce": "lower"})
    assert both.rank.tolist() == ce_only.rank.tolist() == np.argsort(np.argsort(ce)).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tie_across_buckets_is_not_sorted_by_source(seed):
    # 200 rows measuring exactly the same: one fused score, cut into 4 buckets. A lexical tie-break
    # puts all 100 "austen-" rows in buckets 0-1 and all "gcide-" rows in 2-3.
    ids = [f"{src}-{i:04d}" for src in ("gcide", "austen") for i in range(100)]
    metrics = {"student_rougeL": np.zeros(200), "student_ce": np.full(200, 3.5)}
    out = fuse(ids, metrics, metric_directions(list(metrics)), tie_seed=seed)
    assert len(set(out.fused_score.tolist())) == 1
    buckets = rebucket(out.rank, 4)
    austen = np.array([i.startswith("austen") for i in ids])
    share = [austen[buckets == b].mean() for b in range(4)]
    # Each bucket draws 50 of the 200 rows at random: its austen share is 0.5 +- 0.06 (one sd).
    assert all(0.3 <= s <= 0.7 for s in share), share
    # The order within the tie is the seeded hash's, not the ids' spelling.
    assert [ids[i] for i in np.argsort(out.rank)] != sorted(ids)
    assert np.argsort(out.rank).tolist() == np.argsort(tie_keys(ids, seed), kind="stable").tolist()


def test_the_tie_seed_reorders_exact_ties_only():
    rng = np.random.default_rng(5)
    n = 300
    ids = [f"{('austen', 'gcide', 'kjv')[i % 3]}-{i:04d}" for i in range(n)]
    metrics = {"student_rougeL": rng.integers(0, 3, n) / 4, "student_ce": rng.integers(0, 5, n).astype(float)}
    dirs = metric_directions(list(metrics))
    a, b = fuse(ids, metrics, dirs, tie_seed=0), fuse(ids, metrics, dirs, tie_seed=1)
    assert np.array_equal(a.fused_score, b.fused_score)
    assert not np.array_equal(a.rank, b.rank)
    # A row's rank stays inside the rank block of its fused score under either seed.
    for value in np.unique(a.fused_score):
        block = a.fused_score == value
        assert sorted(a.rank[block].tolist()) == sorted(b.rank[block].tolist())
    assert np.array_equal(fuse(ids, metrics, dirs, tie_seed=1).rank, b.rank)  # same seed, same order
    assert not np.array_equal(tie_keys(ids, 0), tie_keys(ids, 1))


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
