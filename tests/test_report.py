"""Report: real metrics.jsonl / scores parquet + manifest / results.json files in, report.md + PNGs out."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pocl_ray.difficulty import bucket_of_rank, bucket_summary, fuse, metric_directions
from pocl_ray.eval_results import write_results
from pocl_ray.evaluation import average, summarize
from pocl_ray.report import read_metrics, write_report

NUM_BUCKETS = 3


def _write_metrics(
    folder: Path, stages: list[tuple[int, float, float, int]], start_loss: float, extra: str = ""
) -> list[dict]:
    """stages: (steps, temperature, kd_weight, pool_rows) each; loss falls by 0.1 a step."""
    records, step = [], 0
    for index, (steps, temperature, kd_weight, pool_rows) in enumerate(stages):
        for _ in range(steps):
            step += 1
            loss = start_loss - 0.1 * step
            records.append(
                {
                    "step": step,
                    "stage": index,
                    "epoch": 0,
                    "temperature": temperature,
                    "kd_weight": kd_weight,
                    "pool_rows": pool_rows,
                    "loss": loss,
                    "kd_loss": loss * 0.9,
                    "ce_loss": loss * 1.1,
                    "lr": 1e-4,
                    "tokens": 100,
                    "seconds": 0.5,
                    "time": 1000.0 + step,
                }
            )
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra)
    return records


def _write_scores(run_dir: Path, n: int = 90) -> dict:
    rng = np.random.default_rng(0)
    ids = [f"row-{i:03d}" for i in range(n)]
    metrics = {"student_ce": rng.uniform(1, 5, n), "student_rougeL": rng.uniform(0, 60, n)}
    fusion = fuse(ids, metrics, metric_directions(list(metrics)))
    bucket = bucket_of_rank(fusion.rank, n, NUM_BUCKETS)
    table = pa.table(
        {
            "id": ids,
            "prompt": ["p"] * n,
            "response": ["r"] * n,
            "input_ids": pa.array([[1, 2, 3]] * n, pa.list_(pa.int32())),
            "labels": pa.array([[-100, 2, 3]] * n, pa.list_(pa.int32())),
            "num_prompt_tokens": pa.array([1] * n, pa.int32()),
            "num_response_tokens": pa.array([2] * n, pa.int32()),
            **{name: pa.array(v, pa.float64()) for name, v in metrics.items()},
            "fused_score": pa.array(fusion.fused_score),
            "rank": pa.array(fusion.rank, pa.int64()),
            "bucket": pa.array(bucket, pa.int32()),
        }
    ).sort_by("rank")
    scores = run_dir / "scores"
    scores.mkdir(parents=True)
    pq.write_table(table, scores / "rows.parquet")
    manifest = {
        "rows_in": n + 2,
        "rows_scored": n,
        "rows_rejected": 2,
        "metrics": [{"name": "student_ce", "direction": "lower"}, {"name": "student_rougeL", "direction": "higher"}],
        "rrf_k": 60.0,
        "num_buckets": NUM_BUCKETS,
        "buckets": bucket_summary(fusion.fused_score, bucket, NUM_BUCKETS),
        "models": {},
        "config": {},
        "ray_version": "2.60.0",
        "wall_seconds": 12.5,
        "scores_path": "rows.parquet",
    }
    (scores / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _write_eval(folder: Path, label: str | None, per_set: dict[str, list[tuple[float, float]]]) -> dict:
    """Results via the evaluation's own writer; per_set: per-row ROUGE-L for seeds 10 and 20."""
    rows = [
        {"set": name, "id": str(i), "reject_reason": None, "ce": 2.0 + i, "generations": ["g", "g"], "rougeL": list(v)}
        for name, values in per_set.items()
        for i, v in enumerate(values)
    ]
    sets, rejected, _ = summarize(rows, list(per_set), [10, 20])
    results = {
        "model": f"/models/{label}",
        "label": label,
        "sets": sets,
        "average": average(sets),
        "config": {"seeds": [10, 20], "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64},
        "wall_seconds": 3.0,
    }
    write_results(results, folder / "eval" / label if label else folder / "eval", rejected=rejected)
    return results


def _text(report: Path) -> str:
    """report.md with each line's runs of spaces collapsed: tables are padded to their widest cell."""
    return "\n".join(" ".join(line.split()) for line in report.read_text().splitlines())


def _images(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert width > 300 and height > 200
    assert pixels.std() > 5  # drawn content, not a blank canvas


def test_full_report_with_compared_runs(tmp_path):
    run_dir = tmp_path / "quick"
    manifest = _write_scores(run_dir)
    # After step 4, pocl lost a worker: a resize record at step 4 (it must not replace step 4's record).
    resize = {"kind": "resize", "step": 4, "stage": 0, "workers_before": 2, "workers_after": 1, "cause": "failure"}
    pocl = _write_metrics(
        run_dir / "runs" / "pocl",
        [(4, 1.0, 0.7, 30), (4, 1.5, 0.85, 60), (4, 2.0, 1.0, 90)],
        5.0,
        extra="{not json\n" + json.dumps({**resize, "seconds": 3.25}) + "\n",
    )
    base = _write_metrics(run_dir / "runs" / "baseline", [(12, 1.0, 1.0, 90)], 6.0)
    _write_eval(run_dir / "runs" / "pocl", None, {"dolly": [(30.0, 34.0), (20.0, 22.0)], "vicuna": [(12.0, 14.0)]})
    _write_eval(run_dir / "runs" / "baseline", None, {"dolly": [(18.0, 20.0), (16.0, 16.0)], "vicuna": [(9.0, 11.0)]})
    _write_eval(run_dir, "teacher", {"dolly": [(40.0, 40.0)], "vicuna": [(30.0, 30.0)]})

    path = write_report(run_dir)
    assert path == run_dir / "report" / "report.md"
    text = _text(path)
    images = _images(path)
    assert sorted(images) == ["difficulty.png", "loss.png", "rouge.png", "schedule.png"]
    for name in images:
        _check_png(path.parent / name)

    # Scores: manifest summary and bucket table.
    assert "| rows in | 92 |" in text and "| rows scored | 90 |" in text and "| rows rejected | 2 |" in text
    assert "student_ce (lower = easier), student_rougeL (higher = easier)" in text
    for b in manifest["buckets"]:
        assert f"| {b['id']} | {b['rows']} | {b['fused_min']:.6g} | {b['fused_max']:.6g} |" in text
    # Training: one row per run (steps, stages, final loss, summed step seconds, time-stamp span, tokens).
    assert f"| pocl | 12 | 3 | {pocl[-1]['loss']:.4g} | 6 | 11.5 | 1200 |" in text
    assert f"| baseline | 12 | 1 | {base[-1]['loss']:.4g} | 6 | 11.5 | 1200 |" in text
    assert "pocl: skipped 1 malformed line(s)" in text
    assert "| run | after step | workers | cause | seconds to the first step on them |" in text
    assert "| pocl | 4 | 2 → 1 | failure | 3.25 |" in text
    assert "| 1 | 4 | 60 | 1.5 | 0.85 |" in text  # pocl's stage table
    # Evaluation: runs and the shared teacher side by side.
    assert "| set | baseline | pocl | teacher |" in text
    assert "| dolly | 17.50 ± 0.50 | 26.50 ± 1.50 | 40.00 ± 0.00 |" in text
    assert "| vicuna | 10.00 ± 1.00 | 13.00 ± 1.00 | 30.00 ± 0.00 |" in text


def test_explicit_runs_and_partial_outputs(tmp_path):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir / "a", [(3, 1.0, 0.5, 10), (3, 2.0, 1.0, 20)], 3.0)
    (run_dir / "b").mkdir(parents=True)  # started, nothing written yet
    path = write_report(run_dir, runs={"alpha": "a", "beta": run_dir / "b"})
    text = _text(path)
    assert sorted(_images(path)) == ["loss.png", "schedule.png"]
    for name in _images(path):
        _check_png(path.parent / name)
    assert "No scores yet" in text
    assert f"beta: no training metrics yet (no {run_dir / 'b' / 'train' / 'metrics.jsonl'})" in text
    assert "No evaluation results yet" in text
    assert "| alpha | 6 | 2 |" in text


def test_an_evaluation_only_run_has_no_training_notes(tmp_path):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir / "runs" / "pocl", [(3, 1.0, 1.0, 10)], 3.0)
    _write_eval(run_dir / "runs" / "teacher", None, {"dolly": [(30.0, 30.0)]})  # as the pipeline's teacher
    text = _text(write_report(run_dir, runs={"pocl": "runs/pocl", "teacher": "runs/teacher"}))
    assert "pocl: no selection yet" in text  # a trained run still says what it lacks
    assert "teacher: no training metrics" not in text and "teacher: no selection" not in text
    assert "| set | teacher |" in text  # its evaluation is reported


def test_single_run_layout_names_evaluations_by_label(tmp_path):
    run_dir = tmp_path / "solo"
    _write_metrics(run_dir, [(5, 1.0, 1.0, 40)], 2.0)
    _write_eval(run_dir, "student", {"dolly": [(10.0, 12.0)]})
    _write_eval(run_dir, "teacher", {"dolly": [(30.0, 30.0)]})
    text = _text(write_report(run_dir))
    assert "| set | student | teacher |" in text
    assert "| dolly | 11.00 ± 1.00 | 30.00 ± 0.00 |" in text
    assert "| solo | 5 | 1 |" in text


def test_empty_run_dir_says_what_is_missing(tmp_path):
    text = _text(write_report(tmp_path))
    assert "No scores yet" in text and "no training metrics yet" in text and "No evaluation results yet" in text
    assert _images(tmp_path / "report" / "report.md") == []


def test_bad_layout_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"runs: folders not found: x \("):
        write_report(tmp_path, runs={"x": "runs/x"})


def test_read_metrics_keeps_the_last_record_of_a_replayed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"loss": 9.0}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n[1, 2]\n\n")
    metrics = read_metrics(path)
    assert metrics.frame["step"].tolist() == [1, 2]
    assert metrics.frame["loss"].tolist() == [3.0, 1.5]
    assert metrics.skipped == 2


def test_evidence_table_pairs_pocl_and_baseline_per_loss(tmp_path):
    from pocl_ray.report import evidence_pairs, evidence_table

    run_dir = tmp_path / "evidence"
    per_run = {
        "pocl-fkl": {"dolly": [(30.0, 34.0), (20.0, 22.0)], "vicuna": [(12.0, 14.0)]},
        "baseline-fkl": {"dolly": [(18.0, 20.0), (16.0, 16.0)], "vicuna": [(9.0, 11.0)]},
        "pocl-rkl": {"dolly": [(10.0, 10.0)], "vicuna": [(5.0, 7.0)]},
        "baseline-rkl": {"dolly": [(12.0, 12.0)], "vicuna": [(4.0, 4.0)]},
        "pocl-skl": {"dolly": [(1.0, 1.0)], "vicuna": [(1.0, 1.0)]},  # no baseline-skl: left out
    }
    for label, per_set in per_run.items():
        _write_eval(run_dir / "runs" / label, None, per_set)
    _write_eval(run_dir, "teacher", {"dolly": [(40.0, 40.0)], "vicuna": [(30.0, 30.0)]})

    text = _text(write_report(run_dir))
    section = text[text.index("### POCL against the baseline per KD loss") :]
    assert (
        "| set | FKL baseline | FKL POCL | FKL POCL − baseline | RKL baseline | RKL POCL | RKL POCL − baseline |"
        in section
    )
    # Per set: mean ± std over the seeds' means (pocl-fkl dolly: seeds 25 and 28).
    assert "| dolly | 17.50 ± 0.50 | 26.50 ± 1.50 | +9.00 | 12.00 ± 0.00 | 10.00 ± 0.00 | -2.00 |" in section
    assert "| vicuna | 10.00 ± 1.00 | 13.00 ± 1.00 | +3.00 | 4.00 ± 0.00 | 6.00 ± 1.00 | +2.00 |" in section
    # Average: over the sets per seed (pocl-fkl: 18.5 and 21), then mean ± std over the seeds.
    assert "| **average** | 13.75 ± 0.75 | 19.75 ± 1.25 | +6.00 | 8.00 ± 0.00 | 8.00 ± 0.50 | +0.00 |" in section
    assert "SKL" not in section.split("\n\n")[1]

    # Only labels <plan>-<loss> with both plans make a pair; plain compared runs get no table.
    assert evidence_pairs(["pocl", "baseline", "pocl-skl", "teacher", "baseline-js", "pocl-js"]) == {
        "js": ("pocl-js", "baseline-js")
    }
    assert evidence_table({"pocl": {}, "baseline": {}}) is None


@pytest.mark.parametrize("name", ["quickstart-evidence", "testbed-evidence"])
def test_evidence_configs_compare_six_runs_that_pair_per_loss(name):
    from pocl_ray.config import load_config
    from pocl_ray.pipeline import compared_runs
    from pocl_ray.report import evidence_pairs

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    runs = compared_runs(cfg)
    assert {label: (r.curriculum.plan, r.kd.loss) for label, r in runs.items()} == {
        f"{plan}-{loss}": (plan, loss) for loss in ("fkl", "rkl", "skl") for plan in ("pocl", "baseline")
    }
    assert evidence_pairs(list(runs)) == {loss: (f"pocl-{loss}", f"baseline-{loss}") for loss in ("fkl", "rkl", "skl")}
    assert cfg.pipeline.sft_teacher is not None and cfg.eval.checkpoint == "best_dev_rougeL"
    assert len(cfg.eval.seeds) == 3


def test_selection_tables_and_dev_curves_of_every_compared_run(tmp_path):
    from pocl_ray.config import parse_config
    from pocl_ray.training.driver import write_selection

    run_dir = tmp_path / "cmp"
    cfg = parse_config({"data": {"train": "t.jsonl"}, "models": {"teacher": "t"}, "training": {"select_every": 4}})

    def candidate(step, stage, rouge, kd_loss):
        return {"step": step, "stage": stage, "samples": 16 * step, "dev_rougeL": rouge, "dev_kd_loss": kd_loss}

    runs = {
        "pocl": [
            candidate(4, 0, 20.0, 1.5),
            candidate(6, 0, 25.5, 1.2),
            candidate(8, 1, 25.5, 1.1),
            candidate(12, 1, 24.0, 1.0),
        ],
        "baseline": [candidate(4, 0, 18.0, 1.6), candidate(8, 0, 22.25, 1.3)],
        "nodev": [],
    }
    for label, candidates in runs.items():
        (run_dir / "runs" / label / "train").mkdir(parents=True)
        write_selection(
            run_dir / "runs" / label / "train" / "selection.json", cfg, candidates, dev_rows=60 if candidates else 0
        )
    path = write_report(run_dir)
    text = _text(path)
    assert "## Checkpoint selection" in text and "every stage end and every 4 steps" in text
    assert "### Selection: pocl" in text and "### Selection: baseline" in text and "### Selection: nodev" not in text
    # pocl: 25.5 at steps 6 and 8, the lower dev KD loss (step 8) wins; the final candidate is step 12.
    assert "| 6 | 0 | 96 | 25.50 | 1.2 | |" in text
    assert "| 8 | 1 | 128 | 25.50 | 1.1 | best |" in text
    assert "| 12 | 1 | 192 | 24.00 | 1 | final |" in text
    assert "| 8 | 0 | 128 | 22.25 | 1.3 | best final |" in text
    assert "nodev: no candidates (trained without a dev set)" in text
    assert "selection.png" in _images(path)
    _check_png(path.parent / "selection.png")


@pytest.mark.parametrize(("module", "loads_ray"), [("pocl_ray.report", False), ("pocl_ray.evaluation", True)])
def test_report_imports_no_ray(module, loads_ray):
    """`pocl-ray report` reads files only: importing it in a fresh interpreter loads no ray module
    (evaluation, which runs on Ray, shows the probe sees ray when it is imported)."""
    probe = f"import json, sys, {module}; print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'ray']))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout)
    assert bool(loaded) is loads_ray, loaded[:10]
