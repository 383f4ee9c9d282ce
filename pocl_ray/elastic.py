"""An epoch's rows across a change of worker count (elastic training), pure numpy, no Ray.

`shards.worker_shard` deals an epoch to a fixed number of workers. When a run continues on W' workers
after `steps_done` steps of an epoch dealt to W (a failure, a resize, a re-run with another
training.num_workers), the rows already trained stay trained and the rest are dealt again (`redeal`):

1. each old worker's rows after its first `steps_done` steps (in its training order, with its shuffle
   windows) are laid end to end, worker 0 first;
2. the remaining steps keep their global sizes (global_batch, the epoch's last step the remainder);
   step k gives new worker r its share of them as `worker_shard` does (sizes differ by at most one
   row), and worker r takes the next consecutive segment of that sequence;
3. every new worker splits its step into max(1, ceil(largest share / micro_batch)) micro-batches.

So the epoch's rows are each trained once across the resize, and with W' = W each worker gets exactly
the rows and steps it had (a replay stays step for step identical). The windows carry over, so a
worker still reads whole windows of the old dealing, a window at a time. An epoch's *dealing history*
[(0, W0), (s1, W1), ...] (`resized`) says who dealt its steps; `epoch_shards` replays it. Epochs that
start after a resize are dealt fresh to the new count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pocl_ray.shards import WINDOW_ROWS, WorkerShard, worker_shard

History = Sequence[tuple[int, int]]  # (steps of the epoch done before, worker count from there on)


def step_sizes(shards: Sequence[WorkerShard]) -> np.ndarray:
    """Rows per step of the epoch, all workers together."""
    return np.sum([np.diff(s.step_rows) for s in shards], axis=0)


def redeal(shards: Sequence[WorkerShard], steps_done: int, world_size: int, micro_batch: int) -> list[WorkerShard]:
    """The rows of an epoch not trained in its first `steps_done` steps on len(shards) workers, dealt
    to `world_size` workers for the remaining steps (module docstring). Each new shard spans the whole
    epoch: its first `steps_done` steps hold no rows (they were trained before), so a reader starts
    at step `steps_done` or later as on any shard."""
    sizes = step_sizes(shards)
    if not 0 <= steps_done <= len(sizes):
        raise ValueError(f"steps_done {steps_done} outside 0..{len(sizes)}")
    tails, cuts, offset = [], [], 0
    for s in shards:
        lo = int(s.step_rows[steps_done])
        tails.append(s.ranks[lo:])
        cuts.append(np.clip(s.windows, lo, len(s.ranks)) - lo + offset)
        offset += len(s.ranks) - lo
    rest = np.concatenate(tails)
    rest_windows = np.unique(np.concatenate(cuts))
    left = np.where(np.arange(len(sizes)) >= steps_done, sizes, 0)
    shares = left[None, :] // world_size + (np.arange(world_size)[:, None] < left % world_size)
    largest_share = -(-sizes // world_size)
    micro = np.maximum(1, -(-largest_share // micro_batch))
    stops = np.cumsum(shares.sum(axis=1))
    out = []
    for worker in range(world_size):
        start, stop = int(stops[worker] - shares[worker].sum()), int(stops[worker])
        out.append(
            WorkerShard(
                ranks=rest[start:stop],
                step_rows=np.concatenate([[0], np.cumsum(shares[worker])]).astype(np.int64),
                micro_batches=micro.astype(np.int64),
                windows=(np.unique(np.clip(rest_windows, start, stop)) - start).astype(np.int64),
            )
        )
    return out


def epoch_shards(
    pool_blocks: np.ndarray,
    history: History,
    *,
    seed: int,
    stage: int,
    epoch: int,
    global_batch: int,
    micro_batch: int,
    window_rows: int = WINDOW_ROWS,
) -> list[WorkerShard]:
    """Every worker's shard of one epoch under its dealing `history` [(0, W0), (s1, W1), ...]: dealt
    to W0 workers by `worker_shard`, then re-dealt at each later entry (`redeal`)."""
    (first, world), *later = history
    if first != 0:
        raise ValueError(f"a dealing history starts at step 0, got {list(history)}")
    shards = [
        worker_shard(
            pool_blocks,
            seed=seed,
            stage=stage,
            epoch=epoch,
            world_size=world,
            worker=r,
            global_batch=global_batch,
            micro_batch=micro_batch,
            window_rows=window_rows,
        )
        for r in range(world)
    ]
    for steps_done, world in later:
        shards = redeal(shards, steps_done, world, micro_batch)
    return shards


def resized(history: History, steps_done: int, world_size: int) -> list[tuple[int, int]]:
    """The dealing history of an epoch that continues on `world_size` workers after `steps_done` of its
    steps. At step 0 the epoch is dealt fresh; an entry at the same step is replaced (no step was
    trained on it), so going back to the count before it replays that dealing exactly."""
    if steps_done == 0:
        return [(0, int(world_size))]
    kept = [(int(s), int(w)) for s, w in history if s < steps_done]
    return kept if kept[-1][1] == world_size else [*kept, (int(steps_done), int(world_size))]
