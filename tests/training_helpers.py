"""Helpers shared by the training and fault tests: a scores directory as the scoring stage writes
it, a small training config, and readers for what a training run leaves behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pocl_ray.config import parse_config
from pocl_ray.curriculum import plan_from_config, stage_specs
from pocl_ray.data import read_table, validate_and_tokenize
from pocl_ray.difficulty import bucket_of_rank
from pocl_ray.elastic import epoch_shards, resized
from pocl_ray.models import load_tokenizer
from pocl_ray.probes import is_probe
from pocl_ray.shards import ScoresIndex, blocks
from pocl_ray.tracked import RESIZE_KIND


def write_scores(directory: Path, assets, num_buckets: int = 4, cache_form: int | str | None = None) -> Path:
    """A scoring output in the layout `scoring.score_dataset` writes, ranked by response length (then id) as a stand-in
    for the fused difficulty score; with `cache_form` (K, or "hidden"), the teacher cache columns
    (and the hidden form's head) as scoring writes them (from the tiny teacher's forward)."""
    tokenizer = load_tokenizer(assets.tokenizer_dir)
    good, rejects = validate_and_tokenize(read_table(assets.train_path).to_pylist(), tokenizer, assets.data_config())
    assert not rejects
    good.sort(key=lambda r: (r["num_response_tokens"], r["id"]))
    m = len(good)
    ranks = np.arange(m)
    scores = directory / "scores"
    scores.mkdir(parents=True)
    table = pa.table(
        {
            "id": pa.array([r["id"] for r in good], pa.string()),
            "prompt": pa.array([r["prompt"] for r in good], pa.string()),
            "response": pa.array([r["response"] for r in good], pa.string()),
            "input_ids": pa.array([r["input_ids"] for r in good], pa.list_(pa.int32())),
            "labels": pa.array([r["labels"] for r in good], pa.list_(pa.int32())),
            "num_prompt_tokens": pa.array([r["num_prompt_tokens"] for r in good], pa.int32()),
            "num_response_tokens": pa.array([r["num_response_tokens"] for r in good], pa.int32()),
            "length": pa.array([float(r["num_response_tokens"]) for r in good], pa.float64()),
            "fused_score": pa.array((1.0 / (61 + ranks)).tolist(), pa.float64()),
            "rank": pa.array(ranks, pa.int64()),
            "bucket": pa.array(bucket_of_rank(ranks, m, num_buckets), pa.int32()),
        }
    )
    cache = None
    if cache_form is not None:
        table, cache = _with_teacher_cache(table, good, assets, cache_form, tokenizer.pad_token_id, scores)
    pq.write_table(table, scores / "rows.parquet", row_group_size=64)
    buckets = bucket_of_rank(ranks, m, num_buckets)
    (scores / "manifest.json").write_text(
        json.dumps(
            {
                "rows_in": m,
                "rows_scored": m,
                "rows_rejected": 0,
                "metrics": [{"name": "length", "direction": "lower"}],
                "rrf_k": 60,
                "num_buckets": num_buckets,
                "buckets": [
                    {"id": b, "rows": int((buckets == b).sum()), "fused_min": None, "fused_max": None}
                    for b in range(num_buckets)
                ],
                "models": {"teacher": str(Path(assets.teacher_dir).resolve())},
                "config": {},
                "ray_version": "",
                "wall_seconds": 0.0,
                "scores_path": "rows.parquet",
                "teacher_cache": cache,
            }
        )
    )
    return scores


def _with_teacher_cache(
    table: pa.Table, rows: list[dict], assets, form: int | str, pad_id: int, scores: Path
) -> tuple[pa.Table, dict]:
    from pocl_ray import teacher_cache
    from pocl_ray.models import load_model

    teacher = load_model(assets.teacher_dir, frozen=True)
    vocab, hidden = teacher.config.vocab_size, teacher.config.hidden_size
    k = None if form == "hidden" else form
    per_row = teacher_cache.teacher_caches(teacher, rows, pad_id, form, vocab)
    for name, column in teacher_cache.arrow_columns(per_row, k, vocab, hidden).items():
        table = table.append_column(name, column)
    if k is None:
        teacher_cache.save_head(teacher.get_output_embeddings().weight, scores)
    return table, teacher_cache.manifest_entry(k, vocab, hidden)


def run_config(assets, out: Path, name: str = "t", **overrides):
    """A small 2-worker POCL config over the tiny assets: 4 stages of 1 epoch, global batch 16."""
    cfg = parse_config(
        {
            "name": name,
            "data": {
                "train": str(assets.train_path),
                "dev": str(assets.dev_path),
                "max_prompt_length": 96,
                "max_length": 128,
            },
            "models": {"teacher": str(assets.teacher_dir), "student": str(assets.student_dir)},
            "curriculum": {"plan": "pocl", "num_buckets": 4, "epochs_per_stage": 1.0},
            "training": {
                "num_workers": 2,
                "global_batch_size": 16,
                "micro_batch_size": 4,
                "lr": 1e-3,
                "min_lr": 1e-4,
                "checkpoint_every": 10,
                "max_failures": 0,
            },
            "output": {"dir": str(out)},
        }
    )
    return cfg.with_overrides(overrides) if overrides else cfg


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's step records (not its bucket-probe records, `read_probes`, nor its resize records,
    `read_resizes`)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if not is_probe(r) and r.get("kind") is None]


def read_resizes(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == RESIZE_KIND]


def read_probes(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if is_probe(r)]


def planned_steps(cfg, scores: Path, plan=None, resizes: list[dict] = ()) -> list[tuple[int, int, np.ndarray]]:
    """(stage, epoch, the ranks of all workers) of every planned step, from the seeded epoch shards: the
    rows the workers together must have trained on if each step got exactly its planned rows. With
    `resizes` (metrics.jsonl's resize records, in order: the run went on with workers_after workers
    after its step `step`), the rest of an interrupted epoch is re-dealt and later epochs are dealt to
    the new count (elastic.py); stages of planned length only."""
    t = cfg.training
    num_rows = pq.read_metadata(scores / "rows.parquet").num_rows
    bounds = ScoresIndex(scores / "rows.parquet").bounds
    specs = stage_specs(plan or plan_from_config(cfg), num_rows, t.global_batch_size)

    def world_after(step: int) -> int:  # the worker count training the steps after `step`
        return next((r["workers_after"] for r in reversed(resizes) if r["step"] <= step), t.max_workers)

    out: list[tuple[int, int, np.ndarray]] = []
    for index, spec in enumerate(specs):
        pool = blocks(spec.pool_ranges, bounds)
        for k in range(spec.steps):
            epoch, j = divmod(k, spec.steps_per_epoch)
            epoch_start = len(out) - j  # steps of the run done when this epoch began
            history = [(0, world_after(epoch_start))]
            for r in resizes:  # the resizes inside this epoch, up to this step
                if epoch_start < r["step"] <= len(out):
                    history = resized(history, r["step"] - epoch_start, r["workers_after"])
            args = {"seed": t.seed, "stage": index, "epoch": epoch, "micro_batch": t.micro_batch_size}
            shards = epoch_shards(pool, history, global_batch=t.global_batch_size, **args)
            out.append((index, epoch, np.concatenate([m for s in shards for m in s.step(j)])))
    return out


def expected_tokens(cfg, scores: Path, plan=None, resizes: list[dict] = ()) -> list[int]:
    """Global response tokens of every planned step (`planned_steps`)."""
    table = pq.read_table(scores / "rows.parquet", columns=["rank", "num_response_tokens"])
    tokens = np.zeros(table.num_rows, dtype=np.int64)
    tokens[table.column("rank").to_numpy()] = table.column("num_response_tokens").to_numpy()
    return [int(tokens[ranks].sum()) for _, _, ranks in planned_steps(cfg, scores, plan, resizes)]


def rows_per_epoch(cfg, scores: Path, resizes: list[dict]) -> dict[tuple[int, int], list[int]]:
    """(stage, epoch) -> the ranks its planned steps train, sorted (`planned_steps`)."""
    out: dict[tuple[int, int], list[int]] = {}
    for stage, epoch, ranks in planned_steps(cfg, scores, resizes=resizes):
        out.setdefault((stage, epoch), []).extend(ranks.tolist())
    return {key: sorted(ranks) for key, ranks in out.items()}


def committed_checkpoints(storage: Path) -> list[str]:
    """The checkpoints Ray Train has committed under `storage` (its checkpoint manager's snapshot): a
    step_* folder still being written or uploaded is not one, and a resume would not start from it."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):  # none yet, or caught mid-write
        return []
    return sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"])


def train_worker_pids() -> list[int]:
    """PIDs of Ray Train workers among this test process's descendants (never another cluster's)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                if b"RayTrainWorker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(child)
            except OSError:
                continue
    return found


def kill_after_a_checkpoint(train, cfg, scores: Path, storage: Path, at: str | None = None) -> float:
    """Run `train(cfg, scores)` (training.max_failures: 0) in a thread, SIGKILL one of its workers once a
    checkpoint (`at`: that one, e.g. "step_00000010") is committed under `storage`, and check that the
    run failed; the time of the kill."""
    failure: list[BaseException] = []

    def first_attempt():
        try:
            train(cfg, scores)
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=first_attempt)
    thread.start()
    deadline = time.time() + 300
    while thread.is_alive() and time.time() < deadline:
        committed = committed_checkpoints(storage)
        if committed and (at is None or at in committed):
            break
        time.sleep(0.05)
    pids = train_worker_pids()
    assert pids and thread.is_alive(), "the run ended before a checkpoint could be taken"
    killed_at = time.time()
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and failure, "max_failures=0: killing a worker must fail the run"
    return killed_at
