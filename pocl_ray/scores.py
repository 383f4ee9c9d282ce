"""The scores directory: what `pocl-ray score` writes and training, tuning and the report read.

    scores/
      rows/                     parquet files of the ranked rows (SCORES_DIR; `scoring.py` lists the columns)
      manifest.json             MANIFEST_FILE: counts, metrics, buckets, models, config, "scores_path"
                                (the rows, relative to the directory) and "teacher_cache" (its form, or None)
      rejected.jsonl            REJECTED_FILE: one line per row that was not scored, with its reason
      teacher_head.safetensors  the cached teacher's LM head, for its hidden form (`teacher_cache.HEAD_FILE`)

The directory is a local folder or an object-storage URI (read through storage.py); the functions here
return paths in the form they were given. docs/ARCHITECTURE.md describes the data flow around it.
"""

from __future__ import annotations

from pathlib import Path

from pocl_ray import storage
from pocl_ray.config import is_uri

SCORES_DIR = "rows"
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.jsonl"


def load_manifest(scores_dir: str | Path) -> dict:
    path = storage.join(scores_dir, MANIFEST_FILE)
    if not storage.is_file(path, "scores"):
        raise FileNotFoundError(f"no scoring manifest at {path}; run `pocl-ray score` first")
    return storage.read_json(path, "scores")


def scores_path(scores_dir: str | Path) -> str:
    """The scored rows of a scores directory (a parquet file or a directory of them), in the directory's
    own form: a local path, or a URI of a directory in object storage."""
    manifest = storage.join(scores_dir, MANIFEST_FILE)
    if not storage.is_file(manifest, "scores"):
        raise FileNotFoundError(f"run `pocl-ray score` first: no scores at {scores_dir} (missing {MANIFEST_FILE})")
    path = storage.join(scores_dir, storage.read_json(manifest, "scores")["scores_path"])
    if not storage.exists(path, "scores"):
        raise FileNotFoundError(f"run `pocl-ray score` first: no scores at {path}")
    return path


def scores_dir_of(path: str | Path) -> str:
    """The scores directory of ``path``: the directory itself, or the one holding its rows."""
    path = str(path).rstrip("/")
    parent = path.rsplit("/", 1)[0] if is_uri(path) else str(Path(path).parent)
    if storage.is_file(storage.join(path, MANIFEST_FILE)) or not storage.is_file(storage.join(parent, MANIFEST_FILE)):
        return path
    return parent
