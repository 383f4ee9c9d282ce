"""Progress of a Ray stage on the driver: rows done, counted by the Ray workers that do them, printed
as one line every few seconds with the rate and the time left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray


class RowCounter:
    """Rows done, added by the Ray workers that do them; read by `row_progress` on the driver
    (a Ray actor of no CPU that `row_progress` starts)."""

    def __init__(self) -> None:
        self.rows = 0

    @ray.method  # typed `.remote` for the type checker (ray.method is Ray's annotation of actor methods)
    def add(self, rows: int) -> None:
        self.rows += rows

    @ray.method
    def get(self) -> int:
        return self.rows


def duration(seconds: float) -> str:
    """`1h05m` from an hour on, `4m07s` below."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(what: str, done: int, total: int, seconds: float) -> str:
    """`[what] done/total rows (pct), rows/s, ETA` in one line."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = duration((total - done) / rate) if rate > 0 and total >= done else "?"
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    return f"[{what}] {done}/{total} rows{pct}, {rate:.1f} rows/s, ETA {eta}"


@contextmanager
def row_progress(what: str, total: int, every_s: float = 10.0) -> Iterator[Any]:
    """A `RowCounter` for the workers of a Ray stage; meanwhile a driver thread prints
    `progress_line` every `every_s` seconds, and once more when the block ends."""
    counter = ray.remote(RowCounter).options(num_cpus=0).remote()
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
        # Ray types a new actor as ActorProxy (handle | class) while ray.kill takes the handle.
        ray.kill(counter)  # type: ignore[arg-type]
    print(progress_line(what, done, total, time.time() - started), flush=True)
