"""An epoch's rows across a change of worker count (pocl_ray/elastic.py; pure numpy, no Ray): the rows
not yet trained re-dealt to the new count, each row of the epoch once, the same count replaying exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_shards import write_scores

from pocl_ray.elastic import epoch_shards, redeal, resized, step_sizes
from pocl_ray.shards import ScoresIndex, StepReader, blocks, worker_shard

ARGS = {"seed": 3, "stage": 1, "global_batch": 16, "micro_batch": 2}
POOL = blocks([(5, 5 + 203)], [0, 7, 30, 50, 90, 130, 250], block_rows=16)  # 203 rows: a short last step
STEPS = math.ceil(203 / 16)


def _fresh(world: int, window_rows: int = 40):
    return epoch_shards(POOL, [(0, world)], epoch=2, window_rows=window_rows, **ARGS)


def _rows(shards, steps) -> list[int]:
    return [int(x) for s in shards for k in steps for m in s.step(k) for x in m]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (3, 2), (4, 3), (3, 5)])
@pytest.mark.parametrize("steps_done", [0, 1, 5, STEPS - 1, STEPS], ids=["step0", "step1", "mid", "last", "end"])
def test_an_epoch_across_a_resize_trains_its_pool_once(before, after, steps_done):
    old = _fresh(before)
    new = redeal(old, steps_done, after, ARGS["micro_batch"])
    assert len(new) == after and all(len(s) == STEPS for s in new), "every new worker spans the epoch"
    assert _rows(new, range(steps_done)) == [], "the steps trained before the resize are not dealt again"
    trained, rest = _rows(old, range(steps_done)), _rows(new, range(steps_done, STEPS))
    assert sorted(trained + rest) == list(range(5, 5 + 203)), "each row of the epoch once, none skipped"
    assert step_sizes(new)[steps_done:].tolist() == step_sizes(old)[steps_done:].tolist(), "the global batch kept"
    for k in range(steps_done, STEPS):
        shares = [sum(len(m) for m in s.step(k)) for s in new]
        assert max(shares) - min(shares) <= 1, "an uneven split differs by one row at most"
        assert len({len(s.step(k)) for s in new}) == 1, "the same micro-batch count on every worker"
        assert max(len(m) for s in new for m in s.step(k)) <= ARGS["micro_batch"]
    for s in new:
        assert s.windows[0] == 0 and s.windows[-1] == len(s.ranks) and (np.diff(s.windows) > 0).all()
        assert (np.diff(s.windows) <= 40).all(), "a re-dealt window is a piece of an old one"


@pytest.mark.parametrize("steps_done", [0, 1, 6, STEPS - 1])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_same_worker_count_gets_exactly_its_rows_and_windows_again(world, steps_done):
    old = _fresh(world)
    for before, after in zip(old, redeal(old, steps_done, world, ARGS["micro_batch"])):
        for k in range(steps_done, STEPS):
            assert [m.tolist() for m in after.step(k)] == [m.tolist() for m in before.step(k)]
        lo = before.step_rows[steps_done]
        assert np.array_equal(after.ranks, before.ranks[lo:])
        assert np.array_equal(after.windows, np.unique(np.clip(before.windows, lo, len(before.ranks))) - lo)


def test_a_history_of_resizes_replays_and_keeps_the_pool_once():
    history = [(0, 2)]
    for steps_done, world in ((3, 1), (5, 3), (9, 2)):
        history = resized(history, steps_done, world)
    assert history == [(0, 2), (3, 1), (5, 3), (9, 2)]
    shards = epoch_shards(POOL, history, epoch=2, **ARGS)
    assert len(shards) == 2
    trained = []
    for (start, world), (stop, _) in zip(history, [*history[1:], (STEPS, 0)]):
        dealt = epoch_shards(POOL, [h for h in history if h[0] <= start], epoch=2, **ARGS)
        assert len(dealt) == world
        trained += _rows(dealt, range(start, stop))
    assert sorted(trained) == list(range(5, 5 + 203))


def test_resized_histories():
    assert resized([(0, 2)], 0, 3) == [(0, 3)], "an epoch not begun is dealt fresh"
    assert resized([(0, 2)], 4, 2) == [(0, 2)], "the same count: nothing re-dealt"
    assert resized([(0, 2), (4, 1)], 4, 3) == [(0, 2), (4, 3)], "no step ran on 1 worker: its entry is replaced"
    assert resized([(0, 2), (4, 1)], 4, 2) == [(0, 2)], "back to 2 before any step: the first dealing again"
    assert resized([(0, 2), (4, 1)], 7, 2) == [(0, 2), (4, 1), (7, 2)]
    fresh = [worker_shard(POOL, epoch=2, world_size=2, worker=r, **ARGS) for r in range(2)]
    back = epoch_shards(POOL, resized([(0, 2), (4, 1)], 4, 2), epoch=2, **ARGS)
    assert all(
        np.array_equal(a.ranks, b.ranks) and np.array_equal(a.step_rows, b.step_rows) for a, b in zip(back, fresh)
    )
    with pytest.raises(ValueError, match="starts at step 0"):
        epoch_shards(POOL, [(3, 2)], epoch=2, **ARGS)
    with pytest.raises(ValueError, match="steps_done 99 outside"):
        redeal(fresh, 99, 1, 2)


def test_the_reader_trains_a_redealt_epoch_then_fresh_epochs(tmp_path):
    scores = write_scores(tmp_path, num_rows=240, rows_per_file=80, row_group_size=20)
    pool = blocks([(0, 240)], ScoresIndex(scores).bounds)
    args = {**ARGS, "global_batch": 12}
    interrupted = redeal(epoch_shards(pool, [(0, 2)], epoch=0, **args), 7, 3, args["micro_batch"])
    later = epoch_shards(pool, [(0, 3)], epoch=1, **args)
    for worker in range(3):
        with StepReader(scores, [interrupted[worker], later[worker]], start_step=8, num_steps=20) as reader:
            steps = [[[int(r["input_ids"][0]) for r in m] for m in step] for step in reader]
        expected = [interrupted[worker].step(k) for k in range(8, 20)] + [later[worker].step(k) for k in range(8)]
        assert steps == [[m.tolist() for m in step] for step in expected]
