"""The scores directory: what `pocl-ray score` writes and training, tuning and the report read.

    scores/
      rows/                     parquet files of the ranked rows (SCORES_DIR; `scoring.py` lists the columns)
      manifest.json             MANIFEST_FILE: counts, metrics, buckets, models, config, "scores_path"
                                (the rows, relative to the directory) and "teacher_cache" (its form, or None)
      rejected.jsonl            REJECTED_FILE: one line per row that was not scored, with its reason
      teacher_head.safetensors  the cached teacher's LM head, for its hidden form (`teacher_cache.HEAD_FILE`)

docs/ARCHITECTURE.md describes the data flow around it.
"""

from __future__ import annotations

import json
from pathlib import Path

SCORES_DIR = "rows"
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.jsonl"


def load_manifest(scores_dir: str | Path) -> dict:
    path = Path(scores_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scoring manifest at {path}; run `pocl-ray score` first")
    return json.loads(path.read_text())


def scores_path(scores_dir: Path) -> Path:
    """The scored rows of a scores directory (a parquet file or a directory of them)."""
    manifest = scores_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"run `pocl-ray score` first: no scores at {scores_dir} (missing {MANIFEST_FILE})")
    path = scores_dir / json.loads(manifest.read_text())["scores_path"]
    if not path.exists():
        raise FileNotFoundError(f"run `pocl-ray score` first: no scores at {path}")
    return path


def scores_dir_of(path: str | Path) -> Path:
    """The scores directory of ``path``: the directory itself, or the one holding its rows."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file() or not (path.parent / MANIFEST_FILE).is_file():
        return path
    return path.parent
