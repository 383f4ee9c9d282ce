"""An evaluation's results file (results.json) and its markdown twin: writing and reading them.

No Ray and no torch: `pocl_ray.evaluation` writes these files, `pocl_ray.report` reads them, in a local
folder or in object storage (storage.py).
The fields of results.json are listed in pocl_ray/evaluation.py's module doc.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pocl_ray import storage

RESULTS_FILE = "results.json"


def format_number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    cfg = results["config"]
    seeds = [str(s) for s in cfg["seeds"]]
    headers = ["set", "rows", "rejected", "ROUGE-L", "± std", *[f"seed {s}" for s in seeds], "CE"]
    rows = [
        [
            name,
            s["rows"],
            s["rows_rejected"],
            format_number(s["rougeL_mean"]),
            format_number(s["rougeL_std"]),
            *[format_number(s["rougeL_per_seed"].get(k)) for k in seeds],
            format_number(s["ce_mean"], 3),
        ]
        for name, s in results["sets"].items()
    ]
    avg = results["average"]
    rows.append(
        [
            "**average**",
            "",
            "",
            format_number(avg["rougeL_mean"]),
            "",
            *[""] * len(seeds),
            format_number(avg["ce_mean"], 3),
        ]
    )
    sampling = "greedy" if cfg["temperature"] == 0 else f"temperature {cfg['temperature']}, top-p {cfg['top_p']}"
    return (
        f"# Evaluation: {results['label'] or 'model'}\n\nmodel: `{results['model']}`  \n"
        f"sampling: {sampling}, max new tokens {cfg['max_new_tokens']}, seeds {', '.join(seeds)}  \n"
        f"ROUGE-L: F1 ×100 (rouge-score, stemming), mean over rows per seed, then mean ± std over seeds; "
        f"CE: mean teacher-forced cross-entropy on the reference response (nats/token)\n\n"
        + pd.DataFrame(rows, columns=headers).astype(str).to_markdown(index=False, disable_numparse=True)
        + "\n"
    )


def write_results(
    results: Mapping[str, Any],
    directory: str | Path,
    generations: Sequence[Mapping[str, Any]] = (),
    rejected: Sequence[Mapping[str, Any]] = (),
) -> str | Path:
    """Write results.json, results.md, generations.jsonl and rejected.jsonl (each whole, as an object
    store takes it); returns results.json's path."""
    path = storage.join(directory, RESULTS_FILE)
    storage.write_text(path, json.dumps(results, indent=2) + "\n", "output.dir")
    storage.write_text(storage.join(directory, "results.md"), results_markdown(results), "output.dir")
    for name, records in (("generations.jsonl", generations), ("rejected.jsonl", rejected)):
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        storage.write_text(storage.join(directory, name), lines, "output.dir")
    return storage.as_path(path)


def load_results(path: str | Path) -> dict:
    """A results.json (or the directory holding it)."""
    if storage.is_dir(path):
        path = storage.join(path, RESULTS_FILE)
    return storage.read_json(path)
