"""The epoch order over rank blocks and the prefetching row reader (pure: pyarrow, numpy, threads)."""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pocl_ray.curriculum import pocl_plan, stage_specs
from pocl_ray.shards import ScoresIndex, StepReader, WorkerShard, blocks, worker_shard


def _tokens(rank: int) -> list[int]:
    return [rank, rank + 1, rank + 2][: rank % 3 + 1]


def write_scores(directory, num_rows: int, rows_per_file: int, row_group_size: int):
    """Rank-ordered files as scoring writes them, each row's tokens a function of its rank; a
    teacher-cache style column (top-2 ids per token) rides along."""
    path = directory / "rows"
    path.mkdir(parents=True)
    for n, start in enumerate(range(0, num_rows, rows_per_file)):
        ranks = np.arange(start, min(num_rows, start + rows_per_file))
        ids = [_tokens(int(r)) for r in ranks]
        table = pa.table(
            {
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "labels": pa.array([[-100] + t[1:] for t in ids], pa.list_(pa.int32())),
                "num_prompt_tokens": pa.array(np.ones(len(ranks)), pa.int32()),
                "topk_ids": pa.array([[[t, -t] for t in ts] for ts in ids], pa.list_(pa.list_(pa.int32(), 2))),
                "rank": pa.array(ranks, pa.int64()),
            }
        )
        # Written out of name order: the index must order files by rank, not by name.
        pq.write_table(table, path / f"part-{(7 * n) % 11:02d}.parquet", row_group_size=row_group_size)
    return path


def _epoch(pool_blocks, world, epoch=0, **kw):
    args = {"seed": 3, "stage": 1, "global_batch": 8, "micro_batch": 2, **kw}
    return [worker_shard(pool_blocks, epoch=epoch, world_size=world, worker=r, **args) for r in range(world)]


# -- the order -----------------------------------------------------------------------------------


def test_blocks_cut_the_pool_at_row_groups():
    bounds = [0, 10, 20, 25]
    assert blocks([(3, 22)], bounds).tolist() == [[3, 10], [10, 20], [20, 22]]
    assert blocks([(0, 4), (12, 25)], bounds, block_rows=4).tolist() == [
        [0, 4],
        [12, 14],
        [14, 18],
        [18, 20],
        [20, 24],
        [24, 25],
    ]


@pytest.mark.parametrize("pool", [1, 3, 17, 64, 101])
@pytest.mark.parametrize("world,micro,accum", [(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 1, 3)])
def test_epoch_shards_are_disjoint_cover_the_pool_and_line_up(pool, world, micro, accum):
    global_batch = world * micro * accum
    pool_blocks = blocks([(5, 5 + pool)], [0, 7, 30, 50, 200], block_rows=16)
    shards = _epoch(pool_blocks, world, global_batch=global_batch, micro_batch=micro)
    steps = math.ceil(pool / global_batch)
    assert all(len(s) == steps for s in shards), "every worker runs every step"
    for k in range(steps):
        micro_counts = {len(s.step(k)) for s in shards}
        assert len(micro_counts) == 1 and micro_counts.pop() <= accum, "the DDP collectives line up"
        assert sum(len(m) for s in shards for m in s.step(k)) == min(global_batch, pool - k * global_batch)
        for s in shards:
            sizes = [len(m) for m in s.step(k)]
            assert max(sizes) <= micro and max(sizes) - min(sizes) <= 1
    seen = np.concatenate([s.ranks for s in shards])
    assert sorted(seen.tolist()) == list(range(5, 5 + pool)), "disjoint, and together the whole pool"


def test_epochs_are_seeded_and_differ():
    pool_blocks = blocks([(0, 300)], [0, 40, 80, 120, 160, 200, 240, 300])
    a = _epoch(pool_blocks, 2)
    assert all(np.array_equal(x.ranks, y.ranks) for x, y in zip(a, _epoch(pool_blocks, 2)))
    for other in (_epoch(pool_blocks, 2, epoch=1), _epoch(pool_blocks, 2, seed=4), _epoch(pool_blocks, 2, stage=2)):
        assert not np.array_equal(a[0].ranks, other[0].ranks)


def test_a_window_holds_whole_blocks_up_to_window_rows():
    bounds = np.arange(0, 1001, 50)
    for s in _epoch(blocks([(0, 1000)], bounds), 3, window_rows=120):
        assert s.windows[-1] == len(s.ranks)
        for a, b in zip(s.windows[:-1], s.windows[1:]):
            assert 0 < b - a <= 120
            assert len(np.unique(np.searchsorted(bounds, s.ranks[a:b], "right"))) <= 3, (
                "a window reads its blocks' row groups"
            )


def test_short_last_step_leaves_an_idle_worker_one_empty_micro_batch():
    shards = _epoch(blocks([(0, 5)], [0, 5]), 2, global_batch=4, micro_batch=2)
    assert [len(m) for m in shards[0].step(1)] + [len(m) for m in shards[1].step(1)] == [1, 0]
    with pytest.raises(ValueError, match="worker 2 outside"):
        worker_shard(
            blocks([(0, 5)], [0, 5]), seed=0, stage=0, epoch=0, world_size=2, worker=2, global_batch=4, micro_batch=2
        )


# -- reading -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    return write_scores(tmp_path_factory.mktemp("scores"), num_rows=400, rows_per_file=100, row_group_size=25)


def _all(reader) -> list:
    with reader:
        return list(reader)


def _ranks_of(steps) -> list[list[list[int]]]:
    return [[[int(r["input_ids"][0]) for r in m] for m in step] for step in steps]


def test_reader_yields_each_steps_rows_with_extra_columns(scores):
    shard = _epoch(blocks([(0, 400)], ScoresIndex(scores).bounds), 2)[1]
    steps = _all(StepReader(scores, [shard], columns=("input_ids", "labels", "num_prompt_tokens", "topk_ids")))
    assert _ranks_of(steps) == [[m.tolist() for m in shard.step(k)] for k in range(len(shard))]
    row = steps[0][0][0]
    rank = int(row["input_ids"][0])
    assert row["input_ids"].tolist() == _tokens(rank) and row["attention_mask"].tolist() == [1] * len(_tokens(rank))
    assert row["num_prompt_tokens"] == 1 and row["topk_ids"].tolist() == [[t, -t] for t in _tokens(rank)]


def test_a_pocl_stage_reads_only_its_buckets_row_groups_each_once(scores):
    index = ScoresIndex(scores)
    spec = stage_specs(pocl_plan(4, epochs_per_stage=1), 400, 8)[1]  # buckets 0-1: ranks 0..199, 8 row groups
    shards = _epoch(blocks(spec.pool_ranges, index.bounds), 4)
    read = []
    for s in shards:
        reader = StepReader(index, [s])
        _all(reader)
        read.append(reader.stats.groups_read)
        own = np.unique(index.locate(s.ranks))
        assert sorted(reader.stats.groups_read) == own.tolist(), "each row group holding its rows, once"
        assert reader.stats.bytes == sum(
            index.bytes_of(g, ["input_ids", "labels", "num_prompt_tokens", "rank"]) for g in own
        )
    groups = np.concatenate(read)
    assert set(groups.tolist()) == set(range(8)), "nothing outside the pool"
    assert len(groups) <= 8 + 3, "a row group is read twice at most where two workers' segments meet"


def test_resume_mid_epoch_replays_the_remaining_steps(scores):
    pool_blocks = blocks([(0, 400)], ScoresIndex(scores).bounds)
    epochs = [_epoch(pool_blocks, 2, epoch=e)[0] for e in range(2)]
    full = _ranks_of(_all(StepReader(scores, epochs)))
    assert len(full) == 2 * 50
    for k in (0, 1, 7, 49):
        assert _ranks_of(_all(StepReader(scores, epochs, start_step=k))) == full[k:]
    # A stage that stops 3 steps into its second epoch, resumed at step 40 of the first.
    assert _ranks_of(_all(StepReader(scores, epochs, start_step=40, num_steps=13))) == full[40:53]


def test_stopping_early_ends_the_thread(scores):
    # Small windows: the thread is waiting for a free slot, with more to read, when the loop stops.
    shard = _epoch(blocks([(0, 400)], ScoresIndex(scores).bounds), 1, global_batch=2, micro_batch=1, window_rows=50)[0]
    assert len(shard.windows) > 4
    before = set(threading.enumerate())
    with StepReader(scores, [shard], prefetch=1) as reader:
        next(reader)
    assert set(threading.enumerate()) == before
    abandoned = StepReader(scores, [shard], prefetch=1)
    thread = abandoned._thread
    next(abandoned)
    del abandoned
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive(), "a reader dropped without close() stops its thread"


def test_errors_name_the_scores(scores, tmp_path):
    bad = WorkerShard(
        ranks=np.array([3, 400]), step_rows=np.array([0, 2]), micro_batches=np.array([1]), windows=np.array([0, 2])
    )
    reader = StepReader(scores, [bad])
    with pytest.raises(ValueError, match=f"scores at {scores} have no row with rank 400"):
        next(reader)
    assert not reader._thread.is_alive()
    unsorted = tmp_path / "unsorted.parquet"
    pq.write_table(pa.table({"rank": pa.array([0, 2, 1, 3], pa.int64())}), unsorted, row_group_size=2)
    with pytest.raises(ValueError, match=f"scores at {unsorted} are not in rank order"):
        ScoresIndex(unsorted)


def test_the_reader_reads_the_same_rows_from_a_bucket(scores, s3):
    from pocl_ray import storage

    remote = storage.join(s3.bucket(), "scores", "rows")
    storage.copy_folder(scores, remote)
    local, bucket = ScoresIndex(scores), ScoresIndex(remote)
    assert bucket.bounds.tolist() == local.bounds.tolist() and bucket.column_bytes == local.column_bytes
    shard = _epoch(blocks([(100, 300)], local.bounds), 3)[2]
    columns = ("input_ids", "labels", "num_prompt_tokens", "topk_ids")
    logged = len(s3.requests)  # after the footers: what the reader itself asks for
    here, there = StepReader(local, [shard], columns=columns), StepReader(bucket, [shard], columns=columns)
    assert (
        _ranks_of(_all(there))
        == _ranks_of(_all(here))
        == [[m.tolist() for m in shard.step(k)] for k in range(len(shard))]
    )
    assert there.stats.groups_read == here.stats.groups_read and there.stats.bytes == here.stats.bytes
    # It reads byte ranges (206) of the files holding the row groups it opened, and no other file.
    opened = {local.groups[g][0].rsplit("/", 1)[1] for g in there.stats.groups_read}
    reads = s3.object_reads(remote.removeprefix("s3://"), since=logged)
    assert {path.rsplit("/", 1)[1] for _, path, _ in reads} == opened
    assert {status for _, _, status in reads} == {206}
