"""One worker's training rows: the epoch order over a pool of ranks, and a reader that fetches them
from the scores parquet ahead of the GPU (pure pyarrow/numpy/threading, no Ray). The scores may be
a local folder or an object-storage URI (`storage.resolve`): the reader asks for the same row groups
either way, as byte ranges of the files.

The order. Scoring writes rows in rank order, so a rank range is a run of row groups. A pool (a
union of rank ranges, `StageSpec.pool_ranges`) is cut into *blocks*: rank-contiguous pieces that
never straddle a row group and hold at most `BLOCK_ROWS` rows. Each epoch:
1. the blocks are permuted, seeded by (seed, stage, epoch), and laid end to end;
2. that sequence is cut into `world_size` consecutive segments, worker r's segment being exactly
   the rows the step dealing below gives it (sizes differ by at most one row per step);
3. each worker's segment is cut into *windows* of whole consecutive blocks (pieces of blocks at its
   two ends), as many as fit in `WINDOW_ROWS` rows, and the rows inside each window are shuffled,
   seeded by (seed, stage, epoch, worker);
4. step k (global_batch rows, the last step the remainder: every row once per epoch) takes each
   worker's next share of ceil-or-floor(rows / world) rows, split into the same number of
   micro-batches on every worker, so the DDP collectives line up (`WorkerShard`).
So the shards of an epoch are disjoint and cover the pool, and an epoch is a pure function of
(seed, stage, epoch, world size, pool, row-group layout): a restart replays identical steps.
Unlike a plain permutation of the pool, the order depends on the worker count; the coordinator
records it in the checkpoint and refuses a resume with another one.

The trade-off: randomness of the order against read amplification and memory, measured by
`benchmarks/data_path.py --order-sweep` (the table and its reading are in benchmarks/README.md). A
worker reads whole row groups, so a block smaller than a row group makes several workers read the
same row group; with blocks = row groups each row group is read by one worker, or two where
neighbouring segments meet: amplification ~ 1 + rows per row group / rows per worker on average, up
to twice that excess for the worst worker, so it shrinks as data grows but is large when a worker's
share is under a row group. Randomness then comes from the window: a step draws from world x
(blocks per window) blocks, and consecutive steps share them until the window is used up. A window
costs memory: the reader holds `prefetch` + 1 windows and one row group while it decodes it. So the
window is fixed in rows, not blocks (`WINDOW_ROWS`), and smaller row groups written by scoring buy
both randomness and fewer reads for the same memory.

From object storage the reader fetches the same byte ranges (ranged GETs of the row groups it
opens and of their files' footers, never a whole file), so the amplification holds there
(`benchmarks/data_path.py --store s3`; its figures are in benchmarks/README.md).

Ray Data was the first candidate and is not used: its iterators (`streaming_split`,
`iter_torch_batches`) cannot resume mid-epoch, and a resumed run must replay the exact steps, so a
restart would re-train or skip rows; a stage switch through `streaming_split` also cost 17-40 s on a
2-core machine when it was tried (not re-measured since) against well under a second to
read a window here. The prefetch is a plain background thread per worker (`StepReader`).
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pocl_ray.storage import resolve

BLOCK_ROWS = 32768  # pyarrow's dataset writer (Ray's write_parquet) caps row groups at this many rows
WINDOW_ROWS = 65536  # rows shuffled together per worker (whole blocks); benchmarks/README.md, data_path
PREFETCH = 1  # windows read ahead of the one being trained on
ROW_COLUMNS = ("input_ids", "labels", "num_prompt_tokens")


# ---------------------------------------------------------------------------------------------
# The order (pure)


def blocks(
    pool_ranges: Sequence[tuple[int, int]], row_group_bounds: Sequence[int] | np.ndarray, block_rows: int = BLOCK_ROWS
) -> np.ndarray:
    """A pool's blocks as an (n, 2) array of rank ranges [start, stop): the pool cut at every row
    group boundary and every `block_rows` rows from a row group's start."""
    bounds = np.asarray(row_group_bounds, dtype=np.int64)
    cuts = np.unique(np.concatenate([np.arange(a, b, block_rows) for a, b in zip(bounds[:-1], bounds[1:])] + [bounds]))
    out = []
    for a, b in pool_ranges:
        inner = cuts[(cuts > a) & (cuts < b)]
        edges = np.concatenate([[a], inner, [b]])
        out.append(np.stack([edges[:-1], edges[1:]], axis=1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), dtype=np.int64)


def _windows(pieces: np.ndarray, window_rows: int) -> np.ndarray:
    """Offsets of the shuffle windows over consecutive pieces: whole pieces, as many as fit in
    window_rows rows (one piece alone may be longer)."""
    cuts, size, total = [0], 0, 0
    for n in pieces.tolist():
        if size and size + n > window_rows:
            cuts.append(total)
            size = 0
        size, total = size + n, total + n
    if cuts[-1] != total:
        cuts.append(total)
    return np.array(cuts, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class WorkerShard:
    """One worker's epoch: its rows (ranks) in training order, where each step's rows start, how
    many micro-batches each step has (the same on every worker), and the shuffle windows (offsets
    into `ranks`; the reader reads one window at a time)."""

    ranks: np.ndarray
    step_rows: np.ndarray
    micro_batches: np.ndarray
    windows: np.ndarray

    def __len__(self) -> int:
        return len(self.micro_batches)

    def step(self, k: int) -> list[np.ndarray]:
        """Step k's micro-batches of ranks (np.array_split: sizes differ by at most one)."""
        return np.array_split(self.ranks[self.step_rows[k] : self.step_rows[k + 1]], int(self.micro_batches[k]))


def worker_shard(
    pool_blocks: np.ndarray,
    *,
    seed: int,
    stage: int,
    epoch: int,
    world_size: int,
    worker: int,
    global_batch: int,
    micro_batch: int,
    window_rows: int = WINDOW_ROWS,
) -> WorkerShard:
    """Worker `worker`'s rows of one epoch over `pool_blocks` (see the module docstring).

    Step k of ceil(pool / global_batch) has global_batch rows (the last the remainder), dealt as
    row j -> worker j mod world: worker r gets g // world + (r < g % world) of them, and every
    worker splits its share into max(1, ceil(ceil(g / world) / micro_batch)) micro-batches, so a
    micro-batch may be empty only when a step has fewer rows than workers (the trainer runs an
    empty one as a zero-token batch).
    """
    if not 0 <= worker < world_size:
        raise ValueError(f"worker {worker} outside 0..{world_size - 1}")
    perm = np.random.default_rng([int(seed), int(stage), int(epoch)]).permutation(len(pool_blocks))
    ordered = pool_blocks[perm]
    lengths = ordered[:, 1] - ordered[:, 0]
    pool = int(lengths.sum())
    num_steps = math.ceil(pool / global_batch)
    sizes = np.full(num_steps, global_batch, dtype=np.int64)
    sizes[-1] = pool - (num_steps - 1) * global_batch
    shares = sizes[None, :] // world_size + (np.arange(world_size)[:, None] < sizes % world_size)
    largest_share = -(-sizes // world_size)
    micro = np.maximum(1, -(-largest_share // micro_batch))
    start = int(shares[:worker].sum())
    stop = start + int(shares[worker].sum())

    # The pieces of the permuted block sequence that fall in [start, stop): this worker's segment.
    ends = np.cumsum(lengths)
    begins = ends - lengths
    first, last = int(np.searchsorted(ends, start, "right")), int(np.searchsorted(begins, stop, "left"))
    lo = np.maximum(begins[first:last], start) - begins[first:last] + ordered[first:last, 0]
    hi = np.minimum(ends[first:last], stop) - begins[first:last] + ordered[first:last, 0]
    windows = _windows(hi - lo, window_rows)

    shuffle = np.random.default_rng([int(seed), int(stage), int(epoch), worker + 1])
    ranks = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(lo, hi)] or [np.zeros(0, np.int64)])
    for a, b in zip(windows[:-1], windows[1:]):
        ranks[a:b] = shuffle.permutation(ranks[a:b])
    return WorkerShard(
        ranks=ranks,
        step_rows=np.concatenate([[0], np.cumsum(shares[worker])]).astype(np.int64),
        micro_batches=micro.astype(np.int64),
        windows=windows.astype(np.int64),
    )


# ---------------------------------------------------------------------------------------------
# Where the rows are: row groups by rank, from the parquet footers


class ScoresIndex:
    """The row groups of a scores parquet (a file or a directory of files) in rank order.

    Built from the footers alone (rank min/max statistics), so opening it reads a few KB per file.
    Training needs rank-ordered scores (scoring.sort_output: true): each row group must hold one
    rank range, and the row groups together 0..rows-1.

    `path` is a local path or a URI (s3://…, gs://…), or, with `filesystem`, a path inside that
    filesystem; messages name `path` as given.
    """

    def __init__(self, path: str | Path, filesystem: pafs.FileSystem | None = None):
        self.path = str(path)
        self.filesystem, inner = (filesystem, self.path) if filesystem is not None else resolve(path)
        dataset = pads.dataset(inner, filesystem=self.filesystem, format="parquet")
        groups = []  # (first rank, rows, file, row group, {column: compressed bytes})
        for file in dataset.files:
            meta = pq.read_metadata(file, filesystem=self.filesystem)
            for i in range(meta.num_row_groups):
                group = meta.row_group(i)
                sizes: dict[str, int] = {}
                low = high = None
                for j in range(group.num_columns):
                    chunk = group.column(j)
                    name = chunk.path_in_schema.split(".")[0]
                    sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size
                    if name == "rank" and chunk.statistics is not None and chunk.statistics.has_min_max:
                        low, high = chunk.statistics.min, chunk.statistics.max
                if group.num_rows == 0:
                    continue
                if low is None:
                    raise ValueError(
                        f"scores at {self.path}: {file} row group {i} has no rank statistics; re-run `pocl-ray score`"
                    )
                if high - low + 1 != group.num_rows:
                    raise ValueError(
                        f"scores at {self.path} are not in rank order ({file} row group {i} holds ranks "
                        f"{low}..{high} in {group.num_rows} rows); training reads scores written with "
                        "scoring.sort_output: true"
                    )
                groups.append((low, group.num_rows, file, i, sizes))
        groups.sort(key=lambda g: g[0])
        starts = np.array([g[0] for g in groups], dtype=np.int64)
        stops = starts + np.array([g[1] for g in groups], dtype=np.int64)
        if not groups or starts[0] != 0 or (starts[1:] != stops[:-1]).any():
            raise ValueError(f"scores at {self.path}: the row groups do not hold ranks 0..rows-1 once each")
        self.bounds = np.append(starts, stops[-1])
        self.groups = [(g[2], g[3]) for g in groups]  # (file, row group in it), in rank order
        self.column_bytes = [g[4] for g in groups]

    @property
    def num_rows(self) -> int:
        return int(self.bounds[-1])

    def locate(self, ranks: np.ndarray) -> np.ndarray:
        """The row group holding each rank; a rank outside 0..rows-1 is an error naming the scores."""
        bad = (ranks < 0) | (ranks >= self.num_rows)
        if bad.any():
            raise ValueError(
                f"scores at {self.path} have no row with rank {int(ranks[bad][0])} ({int(bad.sum())} ranks missing)"
            )
        return np.searchsorted(self.bounds, ranks, "right") - 1

    def bytes_of(self, group: int, columns: Iterable[str]) -> int:
        return sum(self.column_bytes[group].get(c, 0) for c in columns)


# ---------------------------------------------------------------------------------------------
# Rows as the trainer takes them


def _column_values(column: pa.ChunkedArray) -> list:
    """One value per row: a numpy view for a list of numbers (2-D for a list of fixed-size lists,
    e.g. top-k per token), a Python scalar otherwise."""
    # combine_chunks copies even a single chunk (a take's result is one), and that copy would be
    # what the row views keep alive.
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets, inner = array.offsets.to_numpy(), array.values
        if pa.types.is_fixed_size_list(inner.type) and inner.null_count == 0:
            width = inner.type.list_size
            flat = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        elif pa.types.is_integer(inner.type) or pa.types.is_floating(inner.type):
            flat = inner.to_numpy(zero_copy_only=False)
        else:
            return array.to_pylist()
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(array))]
    return array.to_pylist()


def _row_dicts(table: pa.Table, columns: Sequence[str]) -> list[dict]:
    values = {c: _column_values(table.column(c)) for c in columns}
    rows = [{c: values[c][i] for c in columns} for i in range(table.num_rows)]
    if "input_ids" in values:
        # Views of one array of ones: an int64 mask per row would double a window's memory.
        ones = np.ones(max((len(v) for v in values["input_ids"]), default=0), dtype=np.int64)
        for row in rows:
            row["attention_mask"] = ones[: len(row["input_ids"])]
    return rows


@dataclass
class ReadStats:
    """What a reader has done: the row groups it opened (index positions, in order), their
    compressed bytes (the columns read), and the seconds the consumer waited for data."""

    groups_read: list[int] = field(default_factory=list)
    bytes: int = 0
    wait_seconds: float = 0.0


def _read_window(index: ScoresIndex, ranks: np.ndarray, columns: Sequence[str], stats: ReadStats) -> list[dict]:
    """The rows of `ranks`, in that order: each row group they touch is read once (the columns
    asked for, plus rank to check the layout) and only the wanted rows are kept.

    A file is opened per row group and closed at once: an open ParquetFile keeps ~its last row
    group's compressed bytes, so keeping the files open grew memory with the files touched."""
    groups = index.locate(ranks)
    out: dict[int, dict] = {}
    wanted = [*columns, "rank"]
    for g in np.unique(groups):
        where = np.flatnonzero(groups == g)
        local = ranks[where] - index.bounds[g]
        file, group = index.groups[g]
        with pq.ParquetFile(file, filesystem=index.filesystem) as parquet:
            table = parquet.read_row_group(group, columns=wanted).take(pa.array(local))
        if not np.array_equal(table.column("rank").to_numpy(), ranks[where]):
            raise ValueError(
                f"scores at {index.path}: {file} row group {group} does not hold the ranks its statistics claim"
            )
        for i, row in zip(where.tolist(), _row_dicts(table, columns)):
            out[i] = row
        stats.groups_read.append(int(g))
        stats.bytes += index.bytes_of(g, wanted)
    return [out[i] for i in range(len(ranks))]


def read_rows(index: ScoresIndex, ranks: np.ndarray, columns: Sequence[str]) -> list[dict]:
    """The rows of `ranks` (in that order) as the training reads them: row dicts of `columns`
    (the bucket probe's rows, measured with the step's batches)."""
    return _read_window(index, np.asarray(ranks, dtype=np.int64), columns, ReadStats())


def _split(rows: list, parts: int) -> list[list]:
    """np.array_split for a list: `parts` runs whose sizes differ by at most one."""
    size, extra = divmod(len(rows), parts)
    cuts = np.cumsum([0] + [size + (i < extra) for i in range(parts)])
    return [rows[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


_DONE = object()


def _produce(
    index,
    shards,
    start_step,
    num_steps,
    columns,
    out: queue.Queue,
    slots: threading.Semaphore,
    stop: threading.Event,
    stats: ReadStats,
) -> None:
    """The reader thread: window by window, the steps each window completes go to `out` as one
    item (a list of steps); then _DONE, or the exception that ended it. A window is read only once
    it has a slot (the consumer frees one per item it takes), so at most `prefetch` windows exist
    beyond the one being trained on."""

    def take_slot() -> bool:
        while not stop.is_set():
            if slots.acquire(timeout=0.05):
                return True
        return False

    left = num_steps
    try:
        for shard in shards:
            if left is not None and left <= 0:
                break
            first = start_step
            if first > len(shard):
                raise ValueError(f"start_step {first} is past the epoch's {len(shard)} steps")
            start_step = 0
            end = len(shard) if left is None else min(len(shard), first + left)
            lo, hi = int(shard.step_rows[first]), int(shard.step_rows[end])
            buffer, buffer_start, k = [], lo, first
            cuts = np.unique(np.clip(shard.windows, lo, hi))
            for a, b in zip(cuts[:-1], cuts[1:]):
                if not take_slot():
                    return
                buffer.extend(_read_window(index, shard.ranks[a:b], columns, stats))
                steps = []
                while k < end and shard.step_rows[k + 1] <= b:
                    rows = buffer[shard.step_rows[k] - buffer_start : shard.step_rows[k + 1] - buffer_start]
                    steps.append(_split(rows, int(shard.micro_batches[k])))
                    k += 1
                del buffer[: shard.step_rows[k] - buffer_start]
                buffer_start = int(shard.step_rows[k])
                if steps:
                    out.put(steps)
                else:  # a window smaller than a step: its rows wait in the buffer for the next one
                    slots.release()
            # Steps with no rows for this worker (the short last step on a small pool) still run.
            if k < end:
                if not take_slot():
                    return
                out.put([[[] for _ in range(int(shard.micro_batches[j]))] for j in range(k, end)])
            if left is not None:
                left -= end - first
        out.put(_DONE)
    except BaseException as err:  # handed to the consumer, which raises it
        out.put(err)


class StepReader:
    """One worker's optimizer steps, read and collated by a background thread ahead of the loop.

    Iterating yields one item per step: its micro-batches, each a list of row dicts with the
    `columns` (default input_ids, labels, num_prompt_tokens; list columns as numpy views, scalars
    as Python values) and an attention_mask (views of one shared array of ones: do not write into
    it). `shards` is an iterable of `WorkerShard`, one per epoch, consumed lazily by the thread, so
    the next epoch is read while this one finishes; `start_step` skips steps of the first shard
    (resume mid-epoch) and `num_steps` caps the total (a stage that ends mid-epoch). Memory: the
    window being trained on plus `prefetch` windows read ahead (and one row group while it is
    decoded). Errors in the thread are raised by the iteration.

    The thread starts reading at construction: open the next stage's reader when a stage starts,
    and its first steps are ready when the stage ends (a stage always starts at its step 0 unless
    resumed). Close a reader (or use `with`) when stopping early; the thread also stops when the
    reader is garbage-collected. `stats` counts what was read and how long the loop waited.
    `scores` is a path or URI (with `filesystem`: a path inside it, as `ScoresIndex` takes) or an index.
    """

    def __init__(
        self,
        scores: str | Path | ScoresIndex,
        shards: Iterable[WorkerShard],
        *,
        start_step: int = 0,
        num_steps: int | None = None,
        columns: Sequence[str] = ROW_COLUMNS,
        prefetch: int = PREFETCH,
        filesystem: pafs.FileSystem | None = None,
    ):
        index = scores if isinstance(scores, ScoresIndex) else ScoresIndex(scores, filesystem)
        self.stats = ReadStats()
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(max(1, prefetch))
        self._stop = threading.Event()
        self._steps: Iterator[list] = iter(())
        self._finished = False
        # The thread gets no reference to self, so an abandoned reader is collected and its
        # finalizer stops the thread.
        self._thread = threading.Thread(
            target=_produce,
            args=(
                index,
                shards,
                start_step,
                num_steps,
                tuple(columns),
                self._queue,
                self._slots,
                self._stop,
                self.stats,
            ),
            name="pocl-step-reader",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._stop.set)

    def __iter__(self) -> StepReader:
        return self

    def __next__(self) -> list[list[dict]]:
        while True:
            step = next(self._steps, None)
            if step is not None:
                return step
            if self._finished:
                raise StopIteration
            started = time.perf_counter()
            item = self._queue.get()
            self.stats.wait_seconds += time.perf_counter() - started
            if item is _DONE:
                self.close()
                raise StopIteration
            if isinstance(item, BaseException):
                self.close()
                raise item
            self._slots.release()
            self._steps = iter(item)

    def close(self) -> None:
        """Stop the thread and drop what it read ahead."""
        self._finished = True
        self._stop.set()
        self._thread.join()
        self._steps = iter(())
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> StepReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
