"""The training data path: what one worker reads for its share of an epoch, how fast, in how much memory.

    python benchmarks/data_path.py --rows 100000 --workers 8 [--teacher-top-k K] [--old] [--step-ms MS]
    python benchmarks/data_path.py --rows 1000000 --workers 8 --order-sweep
    python benchmarks/data_path.py --rows 250000 --workers 2 --store s3

Writes synthetic scores of N rows x 300 tokens as scoring writes them (rank-ordered files of
`scoring.rows_per_file` rows through pyarrow's dataset writer, as Ray Data's write_parquet does:
row groups of at most 32,768 rows), with teacher-cache columns when K is set (per token K int32 ids
and K float16 log-probs, as lists of fixed-size lists), under a temporary directory that is deleted
afterwards. Then each of the W simulated workers reads its shard of one epoch with
`shards.StepReader`, in its own process so its peak RSS is its own, and the JSON line gives:
  read_amplification   compressed bytes of the row groups a worker opened / bytes of its own rows
                       (its share of each row group), worst worker; `syscall_amplification` is the
                       same from the bytes the process read (/proc/self/io rchar);
  seconds_per_epoch    per worker (mean, max); rows_per_s per worker;
  peak_rss_mb          per worker (max), next to the RSS of the process before reading;
  data_wait            with --step-ms, a simulated GPU step: seconds the loop waited for data after
                       its first step, over the epoch's seconds (the first step's read is covered
                       in training by opening the stage's reader ahead).
  fs_amplification     bytes the reader pulled through the filesystem (counted by a wrapper around it:
                       column chunks and the footers it re-reads) / bytes of its own rows, worst
                       worker; `fs_amplification_with_index` adds the footers ScoresIndex reads.
--store s3 puts the scores in a bucket of an S3 server on the loopback (moto's, as the tests use,
started here; AWS_ENDPOINT_URL and fake credentials in the workers' environment) and the workers
read them by s3:// URI, as training workers do from object storage.
--old runs the path training used before (`training.read_rows`: every worker filters the whole
dataset with rank.isin over a permutation of the pool) for comparison. --order-sweep prints the
randomness / read-amplification / memory table of the order's granularity (shards module docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pocl_ray import storage
from pocl_ray.shards import BLOCK_ROWS, ROW_COLUMNS, WINDOW_ROWS, ScoresIndex, StepReader, blocks, worker_shard

TOKENS = 300
SEED = 0
EPOCHS = 5  # epochs averaged in the order sweep


def scoring_rows_per_file() -> int:
    """Rows per file as scoring writes TOKENS-token rows (imported here: scoring imports torch,
    which the worker processes must not load, or their RSS would be torch's)."""
    from pocl_ray.scoring import rows_per_file

    return rows_per_file(
        SimpleNamespace(scoring=SimpleNamespace(rows_per_file=None), data=SimpleNamespace(max_length=TOKENS))
    )


def write_scores(directory: Path, rows: int, top_k: int | None) -> tuple[Path, list[str]]:
    """Rank-ordered synthetic scores, file by file (memory: one file); returns the path and the
    columns a worker reads."""
    path = directory / "rows"
    per_file = scoring_rows_per_file()
    rng = np.random.default_rng(SEED)
    columns = list(ROW_COLUMNS)
    if top_k:
        columns += ["teacher_topk_ids", "teacher_topk_logprobs"]
    for n, start in enumerate(range(0, rows, per_file)):
        count = min(per_file, rows - start)
        offsets = pa.array(np.arange(count + 1, dtype=np.int32) * TOKENS)
        ids = rng.integers(0, 50_000, count * TOKENS, dtype=np.int32)
        labels = ids.copy()
        labels.reshape(count, TOKENS)[:, :100] = -100
        data = {
            "id": pa.array([f"row-{r}" for r in range(start, start + count)]),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
            "num_prompt_tokens": pa.array(np.full(count, 100, dtype=np.int32)),
            "num_response_tokens": pa.array(np.full(count, TOKENS - 100, dtype=np.int32)),
            "fused_score": pa.array(np.sort(rng.random(count))),
            "rank": pa.array(np.arange(start, start + count, dtype=np.int64)),
        }
        if top_k:
            top_ids = pa.array(rng.integers(0, 50_000, count * TOKENS * top_k, dtype=np.int32))
            top_lp = pa.array(-rng.random(count * TOKENS * top_k, dtype=np.float32).astype(np.float16))
            data["teacher_topk_ids"] = pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(top_ids, top_k)
            )
            data["teacher_topk_logprobs"] = pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(top_lp, top_k)
            )
        # Ray Data's ParquetDatasink writes each block with pyarrow.dataset.write_dataset (defaults
        # when sorted: no row-group or file limits), one block per rank range of per_file rows.
        pads.write_dataset(
            pa.table(data),
            path,
            format="parquet",
            basename_template=f"part-{n:05d}-{{i}}.parquet",
            existing_data_behavior="overwrite_or_ignore",
        )
    (directory / "manifest.json").write_text(json.dumps({"scores_path": "rows", "rows_per_file": per_file}))
    return path, columns


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's peak across
    fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


class _CountedReads:
    """A file whose reads add what they return to counter[0]; everything else is the inner file's."""

    def __init__(self, inner, counter: list[int]):
        self.inner, self.counter = inner, counter

    def read(self, nbytes=None):
        data = self.inner.read(nbytes)
        self.counter[0] += len(data)
        return data

    def read_buffer(self, nbytes=None):  # what pa.PythonFile calls when the handle has it
        data = self.inner.read_buffer(nbytes)
        self.counter[0] += data.size
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)


class CountingFileSystem(pafs.FileSystemHandler):
    """Read-only view of a pyarrow filesystem that counts the bytes read through it (`counter[0]`):
    what the parquet reader asks the store for, local disk or S3 ranged GETs alike."""

    def __init__(self, inner: pafs.FileSystem):
        self.inner, self.counter = inner, [0]

    def get_type_name(self):
        return f"counting-{self.inner.type_name}"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def open_input_file(self, path):
        return pa.PythonFile(_CountedReads(self.inner.open_input_file(path), self.counter), mode="r")

    def open_input_stream(self, path):
        return pa.PythonFile(_CountedReads(self.inner.open_input_stream(path), self.counter), mode="r")

    def _read_only(self, *args, **kwargs):
        raise OSError("read-only view")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only

    def equals(self, other):
        return self is other


def _own_bytes(index: ScoresIndex, ranks: np.ndarray, columns: list[str]) -> float:
    """A worker's share of the compressed bytes: each row group's bytes x its rows it owns / its rows."""
    counts = np.bincount(index.locate(ranks), minlength=len(index.groups))
    rows = np.diff(index.bounds)
    return float(sum(index.bytes_of(g, columns) * counts[g] / rows[g] for g in np.flatnonzero(counts)))


def _read_old(path: str, filesystem: pafs.FileSystem, ranks: np.ndarray, columns: list[str]) -> dict[int, dict]:
    """training.read_rows as it was (inlined so this process does not import torch): the whole
    dataset filtered by rank.isin, then one dict per row."""
    wanted = pa.array(ranks)
    rank = pc.field("rank")
    condition = (rank >= int(ranks.min())) & (rank <= int(ranks.max())) & rank.isin(wanted)
    dataset = pads.dataset(path, format="parquet", filesystem=filesystem)
    table = dataset.to_table(columns=["rank", *columns], filter=condition)
    ids, labels = (table.column(c).combine_chunks() for c in ("input_ids", "labels"))
    id_values, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
    label_values, label_offsets = labels.values.to_numpy(), labels.offsets.to_numpy()
    prompt = table.column("num_prompt_tokens").to_numpy()
    rows = {}
    for i, r in enumerate(table.column("rank").to_numpy().tolist()):
        input_ids = id_values[id_offsets[i] : id_offsets[i + 1]]
        rows[r] = {
            "input_ids": input_ids,
            "labels": label_values[label_offsets[i] : label_offsets[i + 1]],
            "attention_mask": np.ones(len(input_ids), dtype=np.int64),
            "num_prompt_tokens": int(prompt[i]),
        }
    return rows


def run_worker(job: dict) -> dict:
    """One simulated worker's epoch(s), in this (fresh) process."""
    path, columns, world, rank = job["path"], job["columns"], job["workers"], job["rank"]
    filesystem, inner = storage.resolve(path)
    counting = CountingFileSystem(filesystem)
    counted = pafs.PyFileSystem(counting)  # both paths read through it
    index = ScoresIndex(inner, counted)
    index_bytes = counting.counter[0]
    pool_blocks = blocks([(0, index.num_rows)], index.bounds)
    shard_args = dict(
        seed=SEED,
        stage=0,
        world_size=world,
        worker=rank,
        global_batch=job["global_batch"],
        micro_batch=job["micro_batch"],
    )
    base_rss = _peak_rss_mb()
    rchar, started = _rchar(), time.perf_counter()
    if job["old"]:
        ranks = np.random.default_rng([SEED, 0, 0]).permutation(index.num_rows)[rank::world]
        rows = _read_old(inner, counted, ranks, columns)
        opened = range(len(index.groups))  # the rank range of a permutation's shard spans every row group
        read_bytes, row_count, wait, after_first = (
            sum(index.bytes_of(g, ["rank", *columns]) for g in opened),
            len(rows),
            None,
            None,
        )
    else:
        shards = [worker_shard(pool_blocks, epoch=e, **shard_args) for e in range(job["epochs"])]
        ranks = np.concatenate([s.ranks for s in shards])
        reader = StepReader(index, shards, columns=columns)
        row_count, first_wait = 0, None
        with reader:
            for step in reader:
                if first_wait is None:
                    first_wait = reader.stats.wait_seconds
                row_count += sum(len(m) for m in step)
                if job["step_ms"]:
                    time.sleep(job["step_ms"] / 1000)
        read_bytes, wait, after_first = (
            reader.stats.bytes,
            reader.stats.wait_seconds,
            reader.stats.wait_seconds - first_wait,
        )
    seconds = time.perf_counter() - started
    own = _own_bytes(index, ranks, ["rank", *columns])
    return {
        "rank": rank,
        "rows": row_count,
        "seconds": seconds,
        "read_bytes": read_bytes,
        "own_bytes": own,
        "syscall_bytes": _rchar() - rchar,
        "fs_bytes": counting.counter[0] - index_bytes,
        "index_bytes": index_bytes,
        "peak_rss_mb": _peak_rss_mb(),
        "base_rss_mb": base_rss,
        "wait_seconds": wait,
        "wait_after_first_step": after_first,
    }


def measure(path: str, columns: list[str], args, old: bool) -> dict:
    workers = []
    for rank in range(args.workers):
        job = {
            "path": str(path),
            "columns": columns,
            "workers": args.workers,
            "rank": rank,
            "old": old,
            "global_batch": args.global_batch,
            "micro_batch": args.micro_batch,
            "epochs": args.epochs,
            "step_ms": args.step_ms,
        }
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(job)], check=True, capture_output=True, text=True
        )
        workers.append(json.loads(out.stdout))
    seconds = [w["seconds"] / args.epochs for w in workers] if not old else [w["seconds"] for w in workers]
    result = {
        "path": "old: rank.isin over the whole dataset" if old else "StepReader",
        "read_amplification": round(max(w["read_bytes"] / w["own_bytes"] for w in workers), 3),
        # /proc/self/io counts file reads, not an S3 client's socket reads
        "syscall_amplification": None
        if storage.is_uri(path)
        else round(max(w["syscall_bytes"] / w["own_bytes"] for w in workers), 3),
        "fs_amplification": round(max(w["fs_bytes"] / w["own_bytes"] for w in workers), 3),
        "fs_amplification_with_index": round(
            max((w["fs_bytes"] + w["index_bytes"]) / w["own_bytes"] for w in workers), 3
        ),
        "seconds_per_epoch_per_worker": {"mean": round(float(np.mean(seconds)), 3), "max": round(max(seconds), 3)},
        "rows_per_s_per_worker": round(float(np.mean([w["rows"] / w["seconds"] for w in workers]))),
        "peak_rss_mb": round(max(w["peak_rss_mb"] for w in workers)),
        "rss_before_reading_mb": round(max(w["base_rss_mb"] for w in workers)),
    }
    if not old and args.step_ms:
        total = sum(w["seconds"] for w in workers)
        result["data_wait"] = {
            "step_ms": args.step_ms,
            "epochs": args.epochs,
            "first_step_seconds_max": round(max(w["wait_seconds"] - w["wait_after_first_step"] for w in workers), 3),
            "after_first_step_fraction": round(sum(w["wait_after_first_step"] for w in workers) / total, 5),
        }
    return result


def order_sweep(rows: int, workers: int, global_batch: int, row_group: int) -> list[dict]:
    """Randomness, read amplification and window memory of the order's granularity (no I/O: row
    groups of `row_group` rows as scoring writes them, or a quarter of that, and reads counted as
    the reader does them)."""
    steps = -(-rows // global_batch)

    def step_means(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        sums = np.zeros(steps)
        for ranks, step_rows in parts:
            sums += np.add.reduceat(np.append(ranks, 0).astype(np.float64), step_rows[:-1])[:steps] * (
                np.diff(step_rows) > 0
            )
        sizes = np.minimum(global_batch, rows - np.arange(steps) * global_batch)
        return sums / sizes

    def stats(means: np.ndarray) -> tuple[float, float]:
        centred = means - means.mean()
        return float(means.std()), float((centred[:-1] * centred[1:]).mean() / centred.var())

    perm = np.random.default_rng(SEED).permutation(rows)
    full_std, full_lag = stats(
        step_means([(perm[r::workers], np.arange(steps + 1) * (global_batch // workers)) for r in range(workers)])
    )
    out = [
        {
            "order": "full permutation",
            "read_amplification": workers,
            "step_spread": 1.0,
            "lag1": round(full_lag, 2),
            "window_rows": "epoch",
        }
    ]
    quarter = row_group // 4
    for group, block_rows, window in [
        (row_group, row_group, row_group),
        (row_group, row_group, WINDOW_ROWS),
        (row_group, row_group, 2 * WINDOW_ROWS),
        (row_group, quarter, WINDOW_ROWS),
        (quarter, quarter, WINDOW_ROWS),
    ]:
        bounds = np.append(np.arange(0, rows, group), rows)
        pool_blocks = blocks([(0, rows)], bounds, block_rows)
        amplification, spread, lag1 = [], [], []
        for epoch in range(EPOCHS):  # the step statistics of one epoch are noisy: windows are few
            shards = [
                worker_shard(
                    pool_blocks,
                    seed=SEED,
                    stage=0,
                    epoch=epoch,
                    world_size=workers,
                    worker=r,
                    global_batch=global_batch,
                    micro_batch=global_batch,
                    window_rows=window,
                )
                for r in range(workers)
            ]
            for s in shards:
                opened = sum(
                    len(np.unique(np.searchsorted(bounds, s.ranks[a:b], "right")))
                    for a, b in zip(s.windows[:-1], s.windows[1:])
                )
                amplification.append(opened * group / len(s.ranks))
            std, lag = stats(step_means([(s.ranks, s.step_rows) for s in shards]))
            spread.append(std / full_std)
            lag1.append(lag)
        out.append(
            {
                "row_group_rows": group,
                "block_rows": block_rows,
                "window_rows": window,
                "read_amplification": round(max(amplification), 2),
                "step_spread": round(float(np.mean(spread)), 2),
                "lag1": round(float(np.mean(lag1)), 2),
            }
        )
    return out


def _upload_to_s3(path: Path) -> str:
    """The scores copied into a bucket of a moto S3 server started on the loopback for this process's
    life; the endpoint and fake credentials go into the environment the workers inherit."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="benchmark",
        AWS_SECRET_ACCESS_KEY="benchmark",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("scores")
    storage.copy_folder(path, "s3://scores/rows")
    return "s3://scores/rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--teacher-top-k", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated GPU step time, to measure the data wait")
    parser.add_argument("--old", action="store_true", help="also run the old path (rank.isin over the whole dataset)")
    parser.add_argument("--order-sweep", action="store_true", help="print the order granularity table instead")
    parser.add_argument(
        "--store", choices=["local", "s3"], default="local", help="where the workers read the scores from"
    )
    parser.add_argument(
        "--dir", default=tempfile.gettempdir(), help="where the synthetic scores go (deleted afterwards)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    if args.order_sweep:
        row_group = min(scoring_rows_per_file(), BLOCK_ROWS)
        table = order_sweep(args.rows, args.workers, args.global_batch, row_group)
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "workers": args.workers,
                    "global_batch": args.global_batch,
                    "row_group_rows": row_group,
                    "default": {"block_rows": BLOCK_ROWS, "window_rows": WINDOW_ROWS},
                    "orders": table,
                }
            )
        )
        return
    work = Path(tempfile.mkdtemp(prefix="pocl-data-path-", dir=args.dir))
    try:
        started = time.perf_counter()
        path, columns = write_scores(work, args.rows, args.teacher_top_k)
        index = ScoresIndex(path)
        source = str(path) if args.store == "local" else _upload_to_s3(path)
        report = {
            "rows": args.rows,
            "workers": args.workers,
            "tokens_per_row": TOKENS,
            "teacher_top_k": args.teacher_top_k,
            "global_batch": args.global_batch,
            "micro_batch": args.micro_batch,
            "scores_mb": round(sum(f.stat().st_size for f in path.iterdir()) / 2**20),
            "files": len({f for f, _ in index.groups}),
            "row_groups": len(index.groups),
            "rows_per_row_group": int(np.median(np.diff(index.bounds))),
            "write_seconds": round(time.perf_counter() - started, 1),
            "store": args.store,
            "new": measure(source, columns, args, old=False),
        }
        if args.old:
            report["old"] = measure(source, columns, args, old=True)
        print(json.dumps(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
