"""The CurriculumCoordinator: the single source of curriculum truth during a training run.

A Ray actor created by the driver (`coordinator`); the class itself is plain Python, so its logic is
tested without Ray. It serves the plan's stages and each worker's epoch (`pocl_ray.shards`), tracks
plateaus and the checkpoint-selection candidates, writes the step records to metrics.jsonl, and its
state rides in every checkpoint.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import numpy as np

from pocl_ray import storage, tracked, tracking
from pocl_ray.config import is_uri
from pocl_ray.curriculum import Plan, StageSpec, stage_specs
from pocl_ray.elastic import epoch_shards, resized
from pocl_ray.shards import BLOCK_ROWS, WINDOW_ROWS, WorkerShard, blocks, worker_shard
from pocl_ray.tracked import RESIZE_KIND


def _plateaued(best: float | None, bad: int, loss: float, patience: int) -> tuple[float, int, bool]:
    """Update (best, evaluations without improvement) with a new dev loss; True once patience runs out."""
    if best is None or loss < best:
        return loss, 0, False
    return best, bad + 1, bad + 1 >= patience


def best_candidate(candidates: list[dict]) -> dict | None:
    """The selection candidate with the highest dev ROUGE-L; a tie goes to the lower dev KD loss,
    then to the later step (METHODS.md §5)."""
    return max(candidates, key=lambda c: (c["dev_rougeL"], -c["dev_kd_loss"], c["step"]), default=None)


# 2: the epoch order of pocl_ray.shards (depends on the worker count and row groups);
# 3: samples seen in the position, checkpoint-selection candidates;
# 4: elastic training: the worker count may change, the interrupted epoch's dealing history rides along.
STATE_VERSION = 4


class CurriculumCoordinator:
    """The single source of curriculum truth during a training run (a Ray actor; see `coordinator`).

    It holds the plan, the run's position (next stage, step within it, global step) and the seeds,
    and serves each worker, at every stage and epoch boundary, the stage's settings and that
    worker's rows. Its state goes into every checkpoint (`checkpoint`) and comes back on a restart
    (`restore`).

    Transport (benchmarks/data_path.py measures it; results in benchmarks/README.md): the coordinator
    hands out rank numbers, not rows (a `WorkerShard`: 8 bytes per row of the worker's epoch), and each
    worker reads only the row groups holding them with a `shards.StepReader`, ahead of its loop. Ray
    Data `streaming_split` cost 17-40 s per stage here, deadlocked when split inside an actor on 2 CPUs,
    and its iterators cannot resume mid-epoch; the driver never materialises the data, and the
    actor stays tiny. The price is that the scores directory must be readable from every worker
    node (shared filesystem or a URI pyarrow reads), as Ray Train's storage_path already must be
    on a multi-node cluster.

    The epoch order depends on the worker count and on the scores' row groups (`row_group_bounds`,
    from `shards.ScoresIndex`), so both are part of the state. Re-written scores are refused. Another
    worker count (Ray Train's elastic scaling after a failure or a resize, or a re-run with another
    training.num_workers) is told to `restore`: the rows of the interrupted epoch not yet trained are
    dealt to the new count (`elastic.redeal`; the epoch's dealing history rides in the state), later
    epochs are dealt fresh, and the change goes to metrics.jsonl as a resize record, with the seconds
    from the failure Ray Train reported (`failed`), or from the new group's start, to its first step.

    Step records: rank 0 sends its per-step records in batches (`log`, fire-and-forget between
    checkpoints, awaited at each checkpoint) and the coordinator appends them to metrics.jsonl.
    The actor runs on the driver's node, so the file lands in the driver's output directory on any
    cluster; a restart truncates the file back to the checkpoint's step, so every step appears
    exactly once. An object store cannot append: with metrics.jsonl at a URI the coordinator keeps the
    file's lines in memory and rewrites the whole object at every checkpoint and at `close` (so the
    object, like the local file, holds every step up to the latest checkpoint).

    Trackers: given a tracking handle (`tracking.Run.child`), the coordinator also logs every record
    it appends, and each selection candidate, to that run (`tracked.record_metrics`), so the
    trackers' series are metrics.jsonl's. A resumed run first sends the records it kept (the steps
    before the checkpoint, for a run the trackers have not seen); after a worker-group restart the
    replayed steps already sent are not sent twice. Tracker calls run on a thread of their own and
    never hold up a worker's `log` call. `close` detaches (the driver finishes the run).
    """

    def __init__(
        self,
        plan: dict,
        num_rows: int,
        global_batch: int,
        micro_batch: int,
        seed: int,
        metrics_path: str,
        world_size: int,
        row_group_bounds: list[int],
        tracking_handle: dict | None = None,
    ):
        self.plan = Plan.from_dict(plan)
        self.num_rows = int(num_rows)
        self.global_batch = int(global_batch)
        self.micro_batch = int(micro_batch)
        self.seed = int(seed)
        self.world_size = int(world_size)
        bounds = np.asarray(row_group_bounds, dtype=np.int64)
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != self.num_rows:
            raise ValueError(
                f"row_group_bounds must run from 0 to num_rows ({self.num_rows}), got {bounds[:1]}..{bounds[-1:]}"
            )
        # What the epoch order depends on besides the seeds; a checksum, not the list, so the state
        # stays small however many row groups there are.
        self.layout = (
            f"{len(bounds) - 1} row groups, crc32 {zlib.crc32(bounds.tobytes()):08x}; "
            f"blocks of {BLOCK_ROWS} rows, windows of {WINDOW_ROWS}"
        )
        self.specs = stage_specs(self.plan, self.num_rows, self.global_batch)
        self.blocks = [blocks(s.pool_ranges, bounds) for s in self.specs]
        self.metrics_path = metrics_path
        # metrics.jsonl's lines when it is an object (rewritten whole by `_flush_metrics`); None: a local file.
        self.metrics_lines: list[str] | None = [] if is_uri(metrics_path) else None
        self.metrics_dirty = False
        self.position = {"stage": 0, "stage_step": 0, "step": 0, "samples": 0}
        # {"stage", "best" (the stage's best dev loss or None), "bad" (evaluations since)}: in the checkpoint.
        self.plateau: dict[str, Any] = {"stage": 0, "best": None, "bad": 0}
        self.candidates: list[dict] = []
        self.tracker = tracking.attach(tracking_handle)
        # The highest step sent to the trackers (None before the first `restore`), and the one a
        # restart replays up to: its steps and candidates were sent before the restart.
        self.sent_until: int | None = None
        self.skip_until = -1
        # The interrupted epoch's dealing history {"stage", "epoch", "history"} (None: every epoch is
        # dealt fresh to world_size), the last dealing computed (every worker asks for its shard of it),
        # the resize waiting for its first step, and when the failure that started it was reported.
        self.dealing: dict | None = None
        self._dealt: tuple[tuple, list[WorkerShard]] | None = None
        self.resize: dict | None = None
        self.failed_at: float | None = None

    # -- position and state ------------------------------------------------------------------

    def state(self) -> dict:
        """Everything a restart needs: plan, data settings, seeds, position, plateau tracking and
        the selection candidates recorded so far."""
        return {
            "version": STATE_VERSION,
            "plan": self.plan.to_dict(),
            "num_rows": self.num_rows,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "dealing": self.dealing,
            "layout": self.layout,
            "position": dict(self.position),
            "plateau": dict(self.plateau),
            "candidates": list(self.candidates),
        }

    def restore(self, state: dict | None, world_size: int | None = None) -> dict:
        """Start from a checkpoint's state (None = from the beginning) on `world_size` workers (None: as
        created) and return the state, with "resize" (the change of worker count, or None) added.

        Records in metrics.jsonl and selection candidates past the checkpoint's step are dropped:
        the steps after it are about to be trained (and their candidates evaluated) again.
        """
        first_start = self.sent_until is None
        world = self.world_size if world_size is None else int(world_size)
        # The count that trained last (a re-run: the checkpoint's); a resize whose group failed before
        # its first step is still the same outage, timed from its start.
        pending, self.resize, self._dealt = self.resize, None, None
        if pending is not None:
            cause, since, before = pending["cause"], pending["since"], pending["workers_before"]
        else:
            cause = "resume" if first_start else "failure" if self.failed_at is not None else "resize"
            since = self.failed_at if self.failed_at is not None else time.time()
            before = None if first_start else self.world_size
        self.failed_at = None
        if state is not None:
            self._check_compatible(state)
            self.position = dict(state["position"])
            self.plateau = dict(state["plateau"])
            self.candidates = list(state["candidates"])
            self.dealing = state["dealing"]
            if world != state["world_size"]:
                self.dealing = self._redealt(state["world_size"], world)
            before = state["world_size"] if before is None else before
        else:
            self.position = {"stage": 0, "stage_step": 0, "step": 0, "samples": 0}
            self.plateau = {"stage": 0, "best": None, "bad": 0}
            self.candidates = []
            self.dealing = None
        if before is not None and before != world:
            self.resize = {
                "kind": RESIZE_KIND,
                "step": self.position["step"],
                "stage": self.position["stage"],
                "workers_before": before,
                "workers_after": world,
                "cause": cause,
                "since": since,
            }
        self.world_size = world
        kept = self._truncate_metrics(self.position["step"])
        if self.sent_until is None:  # this actor's first start: the trackers have seen none of the kept steps
            self.sent_until = -1
            self._track(kept, self.candidates)
        self.skip_until = self.sent_until
        return {**self.state(), "resize": None if self.resize is None else dict(self.resize)}

    def _redealt(self, before: int, after: int) -> dict | None:
        """The dealing history of the position's epoch, written on `before` workers, continued on `after`."""
        stage, stage_step = self.position["stage"], self.position["stage_step"]
        if stage >= len(self.specs):  # the run is complete
            return self.dealing
        epoch, done = divmod(stage_step, self.specs[stage].steps_per_epoch)
        d = self.dealing
        history = d["history"] if d is not None and (d["stage"], d["epoch"]) == (stage, epoch) else [(0, before)]
        return {"stage": stage, "epoch": epoch, "history": resized(history, done, after)}

    def failed(self, at: float) -> None:
        """Ray Train reported a failed worker at `at` (epoch seconds): the next `restore` is its recovery."""
        if self.failed_at is None:
            self.failed_at = at

    def _check_compatible(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"the checkpoint being resumed holds coordinator state version {state.get('version')}, written "
                f"by an older pocl-ray (this one reads version {STATE_VERSION}, which records how each epoch was "
                "dealt to a changing worker count); finish it with that version, or start a new run under another name"
            )
        mismatches = [
            name
            for name, saved, now in (
                ("plan", Plan.from_dict(state["plan"]), self.plan),
                ("num_rows", state["num_rows"], self.num_rows),
                ("global_batch", state["global_batch"], self.global_batch),
                ("seed", state["seed"], self.seed),
                ("scores layout", state["layout"], self.layout),
            )
            if saved != now
        ]
        if mismatches:
            raise ValueError(
                f"the checkpoint being resumed was written with a different {', '.join(mismatches)}; "
                "use another run name (config `name`) or output directory for a different run"
            )

    def checkpoint(self, position: dict, records: list[dict]) -> dict:
        """Append the last records, move to `position` (the next step to train) and return the state."""
        self.log(records)
        self._flush_metrics()
        self.position = dict(position)
        return self.state()

    # -- serving stages and rows -------------------------------------------------------------

    def stage(self, index: int) -> StageSpec:
        return self.specs[index]

    def shard(self, stage: int, epoch: int, worker: int) -> WorkerShard:
        """Worker `worker`'s rows, steps and micro-batches for one epoch of a stage: the interrupted
        epoch as its dealing history says (`elastic.epoch_shards`), any other dealt fresh."""
        d = self.dealing
        if d is None or (d["stage"], d["epoch"]) != (stage, epoch) or len(d["history"]) == 1:
            return worker_shard(
                self.blocks[stage],
                seed=self.seed,
                stage=stage,
                epoch=epoch,
                world_size=self.world_size,
                worker=worker,
                global_batch=self.global_batch,
                micro_batch=self.micro_batch,
            )
        key = (stage, epoch, tuple(map(tuple, d["history"])))
        if self._dealt is None or self._dealt[0] != key:
            history = [(int(s), int(w)) for s, w in d["history"]]
            shards = epoch_shards(
                self.blocks[stage],
                history,
                seed=self.seed,
                stage=stage,
                epoch=epoch,
                global_batch=self.global_batch,
                micro_batch=self.micro_batch,
            )
            self._dealt = (key, shards)
        return self._dealt[1][worker]

    def report_eval(self, stage: int, dev_loss: float) -> bool:
        """Record a dev-loss evaluation of `stage`; True when the stage has stopped improving."""
        if self.plateau["stage"] != stage:
            self.plateau = {"stage": stage, "best": None, "bad": 0}
        best, bad, stop = _plateaued(
            self.plateau["best"], self.plateau["bad"], float(dev_loss), self.specs[stage].stage.patience
        )
        self.plateau.update(best=best, bad=bad)
        return stop

    def select(self, candidate: dict) -> bool:
        """Record a selection candidate (step, stage, samples, dev_rougeL, dev_kd_loss); True when
        it is the best so far, i.e. its weights are the ones to keep."""
        self.candidates.append(dict(candidate))
        self._track([], [candidate])
        return best_candidate(self.candidates) is self.candidates[-1]

    # -- step records ------------------------------------------------------------------------

    def log(self, records: list[dict]) -> None:
        if not records:
            return
        if self.resize is not None:
            # The first step on the new worker count (always the first record after `restore`): the
            # resize is complete, and timed from `since` (epoch seconds) to the step's end.
            records = [{**self.resize, "seconds": records[0]["time"] - self.resize["since"]}, *records]
            self.resize = None
        lines = [json.dumps(r) + "\n" for r in records]
        if self.metrics_lines is None:
            with open(self.metrics_path, "a") as f:
                f.writelines(lines)
        else:
            self.metrics_lines += lines
            self.metrics_dirty = True
        self._track(records, [])

    def _flush_metrics(self) -> None:
        """metrics.jsonl at a URI rewritten whole with the records held (a local file is written as they come)."""
        if self.metrics_lines is not None and self.metrics_dirty:
            storage.write_text(self.metrics_path, "".join(self.metrics_lines), "output.dir")
            self.metrics_dirty = False

    def _truncate_metrics(self, step: int) -> list[dict]:
        """Drop the records past `step`; returns those kept."""
        kept = []
        if storage.exists(self.metrics_path, "output.dir"):
            text = storage.read_text(self.metrics_path, "output.dir")
            kept = [line for line in text.splitlines() if line.strip() and json.loads(line)["step"] <= step]
        lines = [line + "\n" for line in kept]
        storage.write_text(self.metrics_path, "".join(lines), "output.dir")
        if self.metrics_lines is not None:
            self.metrics_lines, self.metrics_dirty = lines, False
        return [json.loads(line) for line in kept]

    # -- trackers ----------------------------------------------------------------------------

    def _track(self, records: list[dict], candidates: list[dict]) -> None:
        """Send the records and candidates past `skip_until` (what a restart replays was sent already)."""
        fresh = [r for r in records if r["step"] > self.skip_until]
        for step, metrics in tracked.series(fresh):
            self.tracker.metrics(metrics, step)
        fresh_candidates = [c for c in candidates if c["step"] > self.skip_until]
        for c in fresh_candidates:
            self.tracker.metrics(tracked.candidate_metrics(c), c["step"])
        steps = [x["step"] for x in fresh + fresh_candidates]
        self.sent_until = max([self.sent_until if self.sent_until is not None else -1, *steps])

    def close(self) -> None:
        """metrics.jsonl written, the selected candidate logged, then the trackers detached (their calls sent first)."""
        self._flush_metrics()
        best = best_candidate(self.candidates)
        if best is not None:
            self.tracker.metrics(tracked.selected_metrics(best), best["step"])
        self.tracker.close()


def resize_line(resize: dict) -> str:
    """The progress line of a change of worker count (`restore`'s "resize")."""
    why = {"failure": "after a failure", "resize": "Ray Train resized the group", "resume": "a resumed run"}
    return (
        f"[train] {resize['workers_before']} -> {resize['workers_after']} workers at step {resize['step']} "
        f"({why[resize['cause']]}): the rest of the interrupted epoch is dealt to {resize['workers_after']}, "
        "later epochs as a fresh run on them"
    )


def failure_reporter(name: str, namespace: str):
    """A Ray Train callback (it runs in Ray Train's controller) that tells the named coordinator when a
    worker failed, so the resize that follows is timed from the failure (`CurriculumCoordinator.failed`)."""
    import ray
    from ray.train import UserCallback

    class ReportFailures(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            try:
                actor = ray.get_actor(name, namespace=namespace)
            except ValueError:  # the coordinator is gone (the run is ending): nothing to time
                return
            actor.failed.remote(time.time())

    return ReportFailures()


def coordinator(
    name: str,
    *,
    plan: Plan,
    num_rows: int,
    global_batch: int,
    micro_batch: int,
    seed: int,
    metrics_path: str,
    world_size: int,
    row_group_bounds: list[int],
    tracking_handle: dict | None = None,
):
    """Start the named coordinator actor on this (the driver's) node, so its files land here.

    It asks for no CPU: it only answers small calls, and a CPU slot held by it could starve the
    training workers on a small cluster.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(CurriculumCoordinator).options(name=name, num_cpus=0, scheduling_strategy=here, max_restarts=0)
    return actor.remote(
        plan.to_dict(),
        num_rows,
        global_batch,
        micro_batch,
        seed,
        metrics_path,
        world_size,
        row_group_bounds,
        tracking_handle,
    )
