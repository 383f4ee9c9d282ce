"""Resumable pipeline steps (`pocl-ray run`, `pocl-ray tune`, the teacher's preparation), keyed by a
config fingerprint.

Every step records a fingerprint of the config sections it depends on in `<step dir>/.stage.json`
(a local folder or an object-storage prefix: written and read through storage.py).
A re-run skips a step whose fingerprint matches and that finished; an unfinished step with the
same fingerprint is re-entered (training resumes from its last checkpoint); a step whose
fingerprint changed is cleared and redone, so stale outputs are never mixed with new ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pocl_ray import storage
from pocl_ray.config import RunConfig

# Config sections each step's outputs depend on (the output dir itself is not part of them).
SCORE_KEYS = ("data", "models", "scoring")
TRAIN_KEYS = ("data", "models", "scoring", "curriculum", "kd", "training")
EVAL_KEYS = (*TRAIN_KEYS, "eval")


def fingerprint(cfg: RunConfig, sections: tuple[str, ...], extra: dict | None = None) -> str:
    dumped = cfg.model_dump(mode="json")
    payload = {k: dumped[k] for k in sections} | (extra or {})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# The marker's name from when these were called stages: kept so that existing output folders resume.
MARKER = ".stage.json"


def run_pipeline_step(name: str, step_dir: str | Path, key: str, fn: Callable[[], Any]) -> bool:
    """Run fn unless step_dir already finished with this key; returns whether it ran.

    Prints one line when the step starts and one summary line with its time when it ends.
    """
    marker = storage.join(step_dir, MARKER)
    how = "starting"
    if storage.is_file(marker):
        state = storage.read_json(marker)
        if state.get("key") == key and state.get("done"):
            print(f"[pipeline] {name}: done already for this config, skipped ({step_dir})", flush=True)
            return False
        if state.get("key") != key:
            how = "config changed since the last run, redoing"
            storage.remove_tree(step_dir)
        else:
            how = "resuming an unfinished run"
    storage.write_json(marker, {"key": key, "done": False})
    t0 = time.time()
    print(f"[pipeline] {name}: {how} ({step_dir})", flush=True)
    fn()
    seconds = time.time() - t0
    storage.write_json(marker, {"key": key, "done": True, "seconds": round(seconds, 1)})
    print(f"[pipeline] {name}: finished in {seconds:.0f}s", flush=True)
    return True
