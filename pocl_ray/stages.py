"""Ray stage helpers shared by the pipeline (`pocl-ray run`), the sweep (`pocl-ray tune`), the Ray
Data stages and the parity runner: starting or joining Ray, quieting Ray Data, the actor pool of
the model-running Ray Data stages, and resumable stages keyed by a config fingerprint.

Every stage records a fingerprint of the config it depends on in `<stage dir>/.stage.json`.
A re-run skips a stage whose fingerprint matches and that finished; an unfinished stage with the
same fingerprint is re-entered (training resumes from its last checkpoint); a stage whose
fingerprint changed is cleared and redone, so stale outputs are never mixed with new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from pocl_ray.config import RunConfig

# Config sections each stage's outputs depend on (the output dir itself is not part of them).
SCORE_KEYS = ("data", "models", "scoring")
TRAIN_KEYS = ("data", "models", "scoring", "curriculum", "kd", "training")
EVAL_KEYS = (*TRAIN_KEYS, "eval")


def fingerprint(cfg: RunConfig, sections: tuple[str, ...], extra: dict | None = None) -> str:
    dumped = cfg.model_dump(mode="json")
    payload = {k: dumped[k] for k in sections} | (extra or {})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_stage(name: str, stage_dir: Path, key: str, fn: Callable[[], Any]) -> bool:
    """Run fn unless stage_dir already finished with this key; returns whether it ran.

    Prints one line when the stage starts and one summary line with its time when it ends.
    """
    marker = stage_dir / ".stage.json"
    how = "starting"
    if marker.is_file():
        state = json.loads(marker.read_text())
        if state.get("key") == key and state.get("done"):
            print(f"[pipeline] {name}: done already for this config, skipped ({stage_dir})", flush=True)
            return False
        if state.get("key") != key:
            how = "config changed since the last run, redoing"
            shutil.rmtree(stage_dir)
        else:
            how = "resuming an unfinished run"
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "done": False}))
    t0 = time.time()
    print(f"[pipeline] {name}: {how} ({stage_dir})", flush=True)
    fn()
    seconds = time.time() - t0
    marker.write_text(json.dumps({"key": key, "done": True, "seconds": round(seconds, 1)}))
    print(f"[pipeline] {name}: finished in {seconds:.0f}s", flush=True)
    return True


# ------------------------------------------------------------------------------------------- Ray


def _live_head() -> str | None:
    """The address of a head `ray start` left on this machine, if its GCS still answers.

    Ray records the head's address in `ray_current_cluster` under its temp folder and keeps it when
    the head dies without `ray stop`; a plain `ray.init(num_cpus=...)` then tries to join that
    address and fails. A TCP connect to the GCS port tells a live head from a stale file.
    """
    from ray._private.utils import read_ray_address  # the file Ray itself reads; no public API

    address = read_ray_address()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        return None


def init_ray(num_cpus: int | None = None, *, min_cpus: int = 1, include_dashboard: bool | None = None) -> bool:
    """Join a live cluster, else start a local Ray instance; returns True if this call started Ray.

    A live cluster is RAY_ADDRESS (as inside `ray job submit`; RAY_ADDRESS=local asks for a local
    instance) or a head `ray start` runs on this machine. Otherwise the local instance advertises
    num_cpus logical CPUs (default: all cores, at least min_cpus, so Ray Data read tasks, measurer
    actors, train workers and Tune trial drivers fit together even on 2 cores). Says in one line
    which it did.
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local" asks Ray for a fresh instance, as below
        ray.init()
        print(f"[ray] joined the cluster at RAY_ADDRESS={address}", flush=True)
        return False
    head = None if address else _live_head()
    if head:
        ray.init(address=head)
        print(f"[ray] joined the running Ray head at {head}", flush=True)
        return False
    cpus = num_cpus or max(min_cpus, os.cpu_count() or 1)
    # address="local": a stale head address left on disk must not be joined.
    ray.init(address="local", num_cpus=cpus, include_dashboard=include_dashboard)
    print(f"[ray] started a local Ray instance with {cpus} logical CPUs", flush=True)
    return True


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's progress display off (unless verbose) in this driver's DataContext.

    In a non-interactive log (`ray job submit`, a file) Ray Data dumps a block of lines per operator
    every 10 s and two plan lines per execution; our stages print one progress line instead
    (`row_progress`). Its one-time hint that progress bars are off is silenced with it.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)


def actor_pool(num_actors: int | str):
    """Ray Data's compute strategy for a model actor pool: a fixed size, or for "auto" a pool that
    starts with one actor and grows while there is work and free resources for another (on an
    autoscaling cluster, GPU nodes that join are used as they come)."""
    import ray.data

    if num_actors == "auto":
        return ray.data.ActorPoolStrategy(min_size=1, max_size=None)
    return ray.data.ActorPoolStrategy(size=int(num_actors))


def actor_resources(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """map_batches resource arguments of one model actor.

    Ray Data reserves 1 CPU for a GPU actor given no num_cpus, and warns ("experimental") when both
    are given; so with a GPU, num_cpus is passed only when it is not that 1.
    """
    if num_gpus > 0:
        return {"num_gpus": num_gpus} | ({"num_cpus": num_cpus} if num_cpus != 1 else {})
    return {"num_cpus": num_cpus}


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows done, added by the Ray workers that do them; read by `row_progress` on the driver."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def get(self) -> int:
        return self.rows


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(what: str, done: int, total: int, seconds: float) -> str:
    """`[what] done/total rows (pct), rows/s, ETA` in one line."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = _duration((total - done) / rate) if rate > 0 and total >= done else "?"
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    return f"[{what}] {done}/{total} rows{pct}, {rate:.1f} rows/s, ETA {eta}"


@contextmanager
def row_progress(what: str, total: int, every_s: float = 10.0) -> Iterator[Any]:
    """A `RowCounter` for the workers of a Ray stage; meanwhile a driver thread prints
    `progress_line` every `every_s` seconds, and once more when the block ends."""
    counter = RowCounter.remote()
    stop = threading.Event()
    started = time.time()

    def report() -> None:
        while not stop.wait(every_s):
            print(progress_line(what, ray.get(counter.get.remote()), total, time.time() - started), flush=True)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        done = ray.get(counter.get.remote())
        ray.kill(counter)
    print(progress_line(what, done, total, time.time() - started), flush=True)
