"""The sparse-parity sandbox's Ray runner (`pocl-ray parity`): one task per teacher, one per
(seed, method) student, at most `max_concurrent_tasks` in flight; results and plot in the output folder (a
local one or an object-storage URI, through storage.py).

The tasks run the pure sandbox of `pocl_ray.parity.sandbox`; the config is `pocl_ray.parity.config`.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from pocl_ray import storage
from pocl_ray.parity.config import ParityConfig
from pocl_ray.parity.sandbox import distill_student, format_summary, plot_curves, summarize, train_teacher
from pocl_ray.ray_session import init_ray


def _bounded(thunks: Sequence[Callable[[], Any]], limit: int) -> list[Any]:
    """Submit Ray tasks in order with at most `limit` in flight; returns each thunk's ref(s).

    A thunk returns one ObjectRef or a tuple of them (the first is waited on). Later thunks may take
    earlier refs as arguments; submission order keeps their producers ahead of them.
    """
    out: list[Any] = []
    in_flight: list[Any] = []
    for thunk in thunks:
        if len(in_flight) >= limit:
            _, in_flight = ray.wait(in_flight, num_returns=1)
        refs = thunk()
        out.append(refs)
        in_flight.append(refs[0] if isinstance(refs, tuple) else refs)
    return out


def run_parity(cfg: ParityConfig, output_dir: str | Path) -> dict:
    """Teachers, then every (seed, method) student, as Ray tasks; writes DIR/parity/{results.json, curves.png}
    (DIR: a local folder or a URI, checked writable before any Ray work)."""
    out = storage.join(output_dir, "parity")
    storage.check_writable(out, "--output")
    started = time.perf_counter()
    we_started = init_ray(cfg.num_cpus, include_dashboard=False)
    try:
        resources = {"num_cpus": cfg.cpus_per_task, "num_gpus": cfg.gpus_per_task}
        teacher_task = ray.remote(train_teacher).options(num_returns=3, **resources)
        student_task = ray.remote(distill_student).options(**resources)
        teacher_refs: dict[int, tuple] = {}

        def teacher_thunk(seed: int) -> Callable[[], tuple]:
            def submit() -> tuple:
                # Ray's stubs type .remote as one ObjectRef; with num_returns=3 it returns three.
                teacher_refs[seed] = tuple(teacher_task.remote(cfg, seed))  # type: ignore[arg-type]
                return teacher_refs[seed]

            return submit

        def student_thunk(seed: int, method: str) -> Callable[[], Any]:
            def submit() -> Any:
                _, final, ckpts = teacher_refs[seed]
                # Only progressive needs the checkpoints; the others never fetch them.
                return student_task.remote(cfg, seed, method, final, *([ckpts] if method == "progressive" else []))

            return submit

        thunks = [teacher_thunk(s) for s in cfg.seeds]
        thunks += [student_thunk(s, m) for s in cfg.seeds for m in cfg.methods]
        refs = _bounded(thunks, cfg.max_concurrent_tasks)
        student_refs = refs[len(cfg.seeds) :]
        teachers = ray.get([teacher_refs[s][0] for s in cfg.seeds])
        runs = ray.get(student_refs)
        ray_version = ray.__version__
    finally:
        if we_started:
            ray.shutdown()

    results: dict[str, Any] = {
        "target_accuracy": cfg.target_accuracy,
        "runs": [{k: r[k] for k in ("method", "seed", "steps_to_target", "final_accuracy")} for r in runs],
        "summary": summarize(runs, cfg.target_accuracy, cfg.student_steps),
        "teachers": teachers,
        "curves": [{k: r[k] for k in ("method", "seed", "curve", "stages", "steps", "seconds")} for r in runs],
        "config": cfg.model_dump(mode="json"),
        "wall_seconds": time.perf_counter() - started,
        "ray_version": ray_version,
        "torch_version": torch.__version__,
        "host": platform.node(),
    }
    results_path, plot_path = write_results(results, out)
    print(format_summary(results))
    print(f"results: {results_path}\nplot:    {plot_path}")
    return results


def write_results(results: dict, out: str | Path) -> tuple[str, str]:
    """out/results.json and out/curves.png (drawn from the results' curves in a temporary folder, then
    copied), out a local folder or a URI; returns their paths."""
    results_path, plot_path = storage.join(out, "results.json"), storage.join(out, "curves.png")
    storage.write_text(results_path, json.dumps(results, indent=1), "--output")
    with tempfile.TemporaryDirectory(prefix="pocl-parity-") as tmp:
        drawn = plot_curves(results["curves"], results["target_accuracy"], results["config"], Path(tmp) / "curves.png")
        storage.upload_file(drawn, plot_path, "--output")
    return results_path, plot_path
