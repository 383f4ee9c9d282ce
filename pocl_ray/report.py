"""Run report: DIR/report/report.md with tables and PNG plots, from whatever outputs exist.

Layout read (every part optional; a missing part gets a line saying so instead of its section):

    DIR/scores/manifest.json, DIR/scores/<manifest scores_path>   shared difficulty scores
    <run>/train/metrics.jsonl                                      one JSON object per optimizer step,
                                                                   bucket-probe records (pocl_ray.probes)
                                                                   and resize records (elastic training)
    <run>/train/selection.json                                     checkpoint-selection candidates
    <run>/eval/results.json, <run>/eval/<name>/results.json        pocl_ray.evaluation output
    DIR/eval/<name>/results.json                                   shared evaluations, e.g. the teacher
                                                                   (only when runs are sub-folders)

`runs` maps a label to each compared run's folder (relative to DIR or absolute), e.g.
{"pocl": "runs/pocl", "baseline": "runs/baseline"}. Without it, every sub-folder of DIR/runs/ is a
run named after the folder, and without DIR/runs/ DIR itself is the one run.

An evaluation is named after its run; a run with several evaluations names them "<run>/<name>"
(DIR itself, as the one run, names them "<name>"). metrics.jsonl lines that are not JSON objects
are skipped and counted in the report; a step logged twice (a restart replaying steps after its
last checkpoint) keeps its last record. "step seconds" sums the per-step `seconds`; "wall seconds"
is the span of the per-step `time` stamps (first step's start to last step's end), when the records
carry them.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from pocl_ray import storage
from pocl_ray.config import is_uri
from pocl_ray.eval_results import RESULTS_FILE, load_results
from pocl_ray.preflight import describe
from pocl_ray.probes import is_probe
from pocl_ray.tracked import RESIZE_KIND

SCHEDULE_KEYS = (("pool_rows", "pool size (rows)"), ("temperature", "temperature"), ("kd_weight", "KD weight"))


@dataclass
class Metrics:
    frame: pd.DataFrame  # one row per step, sorted by step
    skipped: int  # lines that were not JSON objects with a step
    probes: pd.DataFrame  # the bucket-probe records, one row per (measurement, bucket), in file order
    resizes: list[dict]  # the changes of worker count, in file order


def read_metrics(path: str | Path) -> Metrics:
    records: list[dict] = []
    probes: list[dict] = []
    resizes: list[dict] = []
    skipped = 0
    for line in storage.read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            kind = record.get("kind")
            (probes if is_probe(record) else resizes if kind == RESIZE_KIND else records).append(record)
        else:
            skipped += 1
    frame = pd.DataFrame.from_records(records)
    if not frame.empty:
        frame = frame.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    probe_frame = pd.DataFrame.from_records(probes)
    if not probe_frame.empty:  # a restart's replayed measurement replaces the first one
        probe_frame = probe_frame.drop_duplicates(["step", "bucket"], keep="last").reset_index(drop=True)
    return Metrics(frame, skipped, probe_frame, resizes)


def _name(path: str) -> str:
    """The last part of a local path or a URI."""
    return path.rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else Path(path).name


def resolve_runs(run_dir: str, runs: Mapping[str, str | Path] | None) -> dict[str, str]:
    """label -> the run's folder (a local path or a URI, in run_dir's form for a relative one)."""
    if runs is not None:
        return {
            label: str(sub) if is_uri(sub) or Path(sub).is_absolute() else storage.join(run_dir, str(sub))
            for label, sub in runs.items()
        }
    found = storage.list_dirs(storage.join(run_dir, "runs"))
    if found:
        return {_name(p): p for p in found}
    return {_name(run_dir) or "run": run_dir}


def _eval_files(eval_root: str) -> dict[str | None, str]:
    """{None: eval/results.json, name: eval/<name>/results.json} for those that exist."""
    out: dict[str | None, str] = {}
    if storage.is_file(storage.join(eval_root, RESULTS_FILE)):
        out[None] = storage.join(eval_root, RESULTS_FILE)
    for sub in storage.list_dirs(eval_root):
        if storage.is_file(storage.join(sub, RESULTS_FILE)):
            out[_name(sub)] = storage.join(sub, RESULTS_FILE)
    return out


def collect_evals(run_dir: str, runs: Mapping[str, str]) -> dict[str, dict]:
    """Evaluation results by display name (see module doc for naming)."""
    out: dict[str, dict] = {}
    single = list(runs.values()) == [run_dir]
    for label, folder in runs.items():
        files = _eval_files(storage.join(folder, "eval"))
        for name, path in files.items():
            results = load_results(path)
            if single:
                display = name or results.get("label") or label
            elif len(files) == 1 or name is None:
                display = label
            else:
                display = f"{label}/{name}"
            out[display] = results
    if not single:
        for name, path in _eval_files(storage.join(run_dir, "eval")).items():
            out[name or "shared"] = load_results(path)
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_schedule(frames: Mapping[str, pd.DataFrame], path: Path) -> Path:
    """Pool size, temperature and KD weight over steps, one line per run."""
    fig, axes = plt.subplots(len(SCHEDULE_KEYS), 1, figsize=(8, 6.5), sharex=True)
    for ax, (key, title) in zip(axes, SCHEDULE_KEYS):
        for label, frame in frames.items():
            if key in frame:
                ax.plot(frame["step"], frame[key], drawstyle="steps-post", label=label, linewidth=1.8)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_title("Curriculum schedule")
    axes[0].legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    return _save(fig, path)


def plot_loss_by_stage(frames: Mapping[str, pd.DataFrame], path: Path) -> Path:
    """Training loss over steps, one panel per run, each stage in its own colour."""
    fig, axes = plt.subplots(len(frames), 1, figsize=(8, 3 * len(frames)), sharex=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (label, frame) in zip(axes[:, 0], frames.items()):
        for k, (stage, part) in enumerate(frame.groupby("stage", sort=True)):
            colour = colours(int(part["stage"].iloc[0]) % 10)  # the key itself: pandas types it as any scalar
            ax.plot(part["step"], part["loss"], color=colour, label=f"stage {stage}", linewidth=1.4)
            if k:
                ax.axvline(part["step"].iloc[0], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"training loss: {label}")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small", ncol=min(4, frame["stage"].nunique()))
    axes[-1, 0].set_xlabel("optimizer step")
    return _save(fig, path)


def plot_selection(selections: Mapping[str, Mapping], path: Path) -> Path:
    """Dev ROUGE-L and dev KD loss (forward KL at T = 1 against the final teacher, comparable across
    plans) of every run's selection candidates against the samples seen, the best one starred."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for ax, (key, title) in zip(
        axes, (("dev_rougeL", "dev ROUGE-L ×100"), ("dev_kd_loss", "dev KD loss (FKL, T = 1)"))
    ):
        for label, selection in selections.items():
            frame = pd.DataFrame(selection["candidates"])
            (line,) = ax.plot(frame["samples"], frame[key], marker="o", markersize=3, linewidth=1.6, label=label)
            best = selection["best"]
            ax.plot(best["samples"], best[key], marker="*", markersize=13, color=line.get_color(), linestyle="none")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_title("Checkpoint-selection candidates on the dev set (★ = best dev ROUGE-L)")
    axes[0].legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("training samples seen")
    return _save(fig, path)


def _bucket_colours(buckets: Sequence[int]) -> dict[int, Any]:
    """Bucket 0 (easiest) to the hardest along viridis, as in the difficulty histogram."""
    ids = sorted(int(b) for b in buckets)
    return {b: plt.get_cmap("viridis")(i / max(1, len(ids) - 1)) for i, b in enumerate(ids)}


def plot_bucket_probe(probes: Mapping[str, pd.DataFrame], path: Path) -> Path:
    """Per run, the probe's KD loss and response CE against samples seen, one line per difficulty
    bucket: are the easy buckets learned before the hard ones arrive, does each new one start harder."""
    fig, axes = plt.subplots(len(probes), 2, figsize=(10, 3.2 * len(probes)), squeeze=False)
    for row, (label, frame) in zip(axes, probes.items()):
        colours = _bucket_colours(frame["bucket"].unique().tolist())
        for ax, (key, title) in zip(row, (("kd_loss", "KD loss (FKL, T = 1)"), ("ce_loss", "response CE"))):
            for bucket, part in frame.sort_values("samples").groupby("bucket", sort=True):
                ax.plot(
                    part["samples"],
                    part[key],
                    marker="o",
                    markersize=3,
                    color=colours[int(bucket)],
                    label=f"bucket {bucket}",
                )
            ax.set_title(f"{title}: {label}")
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("training samples seen")
    return _save(fig, path)


def plot_difficulty(fused: np.ndarray, buckets: np.ndarray, path: Path) -> Path:
    """Histogram of the fused difficulty score, stacked by bucket (bucket 0 = easiest)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ids = sorted(int(b) for b in np.unique(buckets))
    ax.hist(
        [fused[buckets == b] for b in ids],
        bins=40,
        stacked=True,
        label=[f"bucket {b}" for b in ids],
        color=[plt.get_cmap("viridis")(i / max(1, len(ids) - 1)) for i in range(len(ids))],
    )
    ax.set_xlabel("fused score (reciprocal rank fusion; higher = easier)")
    ax.set_ylabel("rows")
    ax.set_title("Difficulty of the training rows by bucket")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rouge(evals: Mapping[str, Mapping], path: Path) -> Path:
    """Grouped bars: ROUGE-L per eval set (and the average), one bar per evaluation, ± std over seeds."""
    names: list[str] = []
    for res in evals.values():
        names.extend(n for n in res["sets"] if n not in names)
    groups = [*names, "average"]
    labels = list(evals)
    width = 0.8 / len(labels)
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(labels) / 2)), 4.5))
    for i, label in enumerate(labels):
        res = evals[label]
        means = [res["sets"].get(n, {}).get("rougeL_mean") for n in names] + [res["average"]["rougeL_mean"]]
        stds = [res["sets"].get(n, {}).get("rougeL_std") for n in names] + [None]
        heights = [np.nan if m is None else m for m in means]
        bars = ax.bar(
            x + (i - (len(labels) - 1) / 2) * width,
            heights,
            width,
            yerr=[np.nan if s is None else s for s in stds],
            capsize=3,
            label=label,
        )
        ax.bar_label(bars, labels=["" if m is None else f"{m:.1f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, groups)
    ax.set_ylabel("ROUGE-L ×100")
    ax.set_title("ROUGE-L per eval set (mean ± std over seeds)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Tables and sections


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written as their str(), never re-parsed as numbers."""
    cells = [[str(c) for c in row] for row in rows]
    return pd.DataFrame(cells, columns=[str(h) for h in headers]).to_markdown(index=False, disable_numparse=True)


def _fixed(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def compare_table(results_by_label: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown with the runs side by side: ROUGE-L (mean ± std over seeds) and response CE per set."""
    labels = list(results_by_label)
    set_names: list[str] = []
    for res in results_by_label.values():
        set_names.extend(n for n in res["sets"] if n not in set_names)

    def cell(res: Mapping[str, Any], name: str, key: str) -> str:
        s = res["sets"].get(name)
        if s is None or s[key] is None:
            return "–"
        if key == "ce_mean":
            return _fixed(s[key], 3)
        return f"{_fixed(s[key])} ± {_fixed(s['rougeL_std'])}"

    rouge = [[n, *[cell(results_by_label[lb], n, "rougeL_mean") for lb in labels]] for n in set_names]
    rouge.append(["**average**", *[_fixed(results_by_label[lb]["average"]["rougeL_mean"]) for lb in labels]])
    ce = [[n, *[cell(results_by_label[lb], n, "ce_mean") for lb in labels]] for n in set_names]
    ce.append(["**average**", *[_fixed(results_by_label[lb]["average"]["ce_mean"], 3) for lb in labels]])
    return (
        "ROUGE-L ×100 (mean ± std over seeds)\n\n"
        + markdown_table(["set", *labels], rouge)
        + "\n\nResponse cross-entropy (nats/token, lower is better)\n\n"
        + markdown_table(["set", *labels], ce)
        + "\n"
    )


# Compared runs labelled "<plan>-<loss>" (pocl-fkl, baseline-fkl, ...) form the evidence table.
EVIDENCE_PLANS = ("pocl", "baseline")


def evidence_pairs(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """loss -> (POCL label, baseline label), for each loss that has both runs, in label order."""
    found: dict[str, dict[str, str]] = {}
    for label in labels:
        plan, _, loss = label.partition("-")
        if plan in EVIDENCE_PLANS and loss:
            found.setdefault(loss, {})[plan] = label
    return {loss: (runs["pocl"], runs["baseline"]) for loss, runs in found.items() if len(runs) == len(EVIDENCE_PLANS)}


def seed_average(res: Mapping[str, Any], set_names: Sequence[str]) -> tuple[float, float] | None:
    """Mean ± std over seeds of the per-seed average over set_names (None when a set or seed lacks
    a score): the std of the average itself, not a mean of the sets' stds."""
    per_seed = [res["sets"].get(n, {}).get("rougeL_per_seed") or {} for n in set_names]
    seeds = [str(k) for k in res.get("config", {}).get("seeds", [])]
    if not seeds or any(k not in p for p in per_seed for k in seeds):
        return None
    averages = [float(np.mean([p[k] for p in per_seed])) for k in seeds]
    return float(np.mean(averages)), float(np.std(averages))


def evidence_table(evals: Mapping[str, Mapping[str, Any]]) -> str | None:
    """POCL against the baseline per KD loss: ROUGE-L mean ± std over seeds per eval set and for the
    average over the sets, with POCL − baseline; None unless some loss has both runs."""
    pairs = evidence_pairs(list(evals))
    if not pairs:
        return None
    set_names: list[str] = []
    for pocl, base in pairs.values():
        set_names.extend(n for n in [*evals[base]["sets"], *evals[pocl]["sets"]] if n not in set_names)

    def cell(res: Mapping[str, Any], name: str) -> tuple[str, float | None]:
        s = res["sets"].get(name) or {}
        mean = s.get("rougeL_mean")
        return ("–", None) if mean is None else (f"{mean:.2f} ± {s['rougeL_std']:.2f}", mean)

    def average(res: Mapping[str, Any]) -> tuple[str, float | None]:
        avg = seed_average(res, set_names)
        return ("–", None) if avg is None else (f"{avg[0]:.2f} ± {avg[1]:.2f}", avg[0])

    def columns(pocl: str, base: str, pick) -> list[str]:
        (b_text, b), (p_text, p) = pick(evals[base]), pick(evals[pocl])
        return [b_text, p_text, "–" if b is None or p is None else f"{p - b:+.2f}"]

    headers = ["set"] + [f"{loss.upper()} {what}" for loss in pairs for what in ("baseline", "POCL", "POCL − baseline")]
    rows = [
        [n, *[c for pocl, base in pairs.values() for c in columns(pocl, base, lambda r, n=n: cell(r, n))]]
        for n in set_names
    ]
    rows.append(["**average**", *[c for pocl, base in pairs.values() for c in columns(pocl, base, average)]])
    seeds = ", ".join(str(k) for k in evals[next(iter(pairs.values()))[0]].get("config", {}).get("seeds", []))
    return (
        f"ROUGE-L ×100, mean ± std over seeds ({seeds}); the average is over the {len(set_names)} sets per seed, "
        "then mean ± std over seeds\n\n" + markdown_table(headers, rows) + "\n"
    )


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}"
    return str(value)


def _scores_section(scores_dir: str, out_dir: Path) -> list[str]:
    lines = ["## Difficulty scores", ""]
    manifest_path = storage.join(scores_dir, "manifest.json")
    if not storage.is_file(manifest_path):
        return lines + [f"No scores yet (no {manifest_path}).", ""]
    manifest = storage.read_json(manifest_path)
    metrics = ", ".join(f"{m['name']} ({m['direction']} = easier)" for m in manifest.get("metrics", []))
    summary = [
        ["rows in", manifest.get("rows_in")],
        ["rows scored", manifest.get("rows_scored")],
        ["rows rejected", manifest.get("rows_rejected")],
        ["metrics", metrics or "–"],
        ["RRF k", manifest.get("rrf_k")],
        ["buckets", manifest.get("num_buckets")],
        ["wall seconds", _fmt(manifest.get("wall_seconds"))],
    ]
    # The models as scoring resolved them: a Hub id with the commit it was pinned to, a URI with its version.
    models = manifest.get("models", {})
    summary += [[name, describe(models[name])] for name in ("teacher", "student", "tokenizer") if models.get(name)]
    lines += [markdown_table(["", "value"], [[k, _fmt(v)] for k, v in summary]), ""]
    buckets = manifest.get("buckets", [])
    if buckets:
        lines += [
            markdown_table(
                ["bucket", "rows", "fused min", "fused max"],
                [[b["id"], b["rows"], _fmt(b["fused_min"], 6), _fmt(b["fused_max"], 6)] for b in buckets],
            ),
            "",
        ]
    scores_path = storage.join(scores_dir, manifest["scores_path"])
    if not storage.exists(scores_path):
        return lines + [f"No per-row scores to plot ({scores_path} is missing).", ""]
    filesystem, inner = storage.resolve(scores_path)
    dataset = pads.dataset(inner, filesystem=filesystem, format="parquet")
    table = dataset.to_table(columns=["fused_score", "bucket"])
    plot_difficulty(table["fused_score"].to_numpy(), table["bucket"].to_numpy(), out_dir / "difficulty.png")
    return lines + ["![fused difficulty per bucket](difficulty.png)", ""]


def _stage_rows(frame: pd.DataFrame) -> list[list[Any]]:
    rows = []
    for stage, part in frame.groupby("stage", sort=True):
        first, last = part.iloc[0], part.iloc[-1]
        rows.append(
            [
                stage,
                len(part),
                _fmt(first.get("pool_rows")),
                _fmt(first.get("temperature")),
                _fmt(first.get("kd_weight")),
                f"{_fmt(first['loss'])} → {_fmt(last['loss'])}",
            ]
        )
    return rows


def _evaluation_only(folder: str) -> bool:
    """A run that only evaluates a model (the pipeline's runs/teacher): no training to report on."""
    return storage.is_dir(storage.join(folder, "eval")) and not storage.exists(storage.join(folder, "train"))


def _training_section(runs: Mapping[str, str], out_dir: Path) -> list[str]:
    lines = ["## Training", ""]
    frames: dict[str, pd.DataFrame] = {}
    resizes = []
    notes = []
    for label, folder in runs.items():
        path = storage.join(folder, "train", "metrics.jsonl")
        if not storage.is_file(path):
            notes.append(f"{label}: no training metrics yet (no {path}).")
            continue
        metrics = read_metrics(path)
        if metrics.skipped:
            notes.append(f"{label}: skipped {metrics.skipped} malformed line(s) of {path}.")
        if metrics.frame.empty:
            notes.append(f"{label}: {path} holds no steps.")
            continue
        frames[label] = metrics.frame
        resizes += [
            [label, r["step"], f"{r['workers_before']} → {r['workers_after']}", r["cause"], _fmt(r["seconds"])]
            for r in metrics.resizes
        ]
    if not frames:
        return lines + (notes or ["No training runs found."]) + [""]
    summary = []
    for label, f in frames.items():
        step_seconds = float(f["seconds"].sum()) if "seconds" in f else None
        # `time` stamps the end of each step: the span also counts checkpoints and stage switches.
        wall = (
            float(f["time"].iloc[-1] - f["time"].iloc[0] + f["seconds"].iloc[0])
            if {"time", "seconds"} <= set(f)
            else None
        )
        summary.append(
            [
                label,
                len(f),
                f["stage"].nunique(),
                _fmt(f["loss"].iloc[-1]),
                _fmt(step_seconds),
                _fmt(wall),
                _fmt(int(f["tokens"].sum()) if "tokens" in f else None),
            ]
        )
    lines += [
        markdown_table(
            ["run", "steps", "stages", "final loss", "step seconds (sum)", "wall seconds", "tokens"], summary
        ),
        "",
    ]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    if resizes:
        header = ["run", "after step", "workers", "cause", "seconds to the first step on them"]
        lines += ["### Worker count changes (elastic training)", "", markdown_table(header, resizes), ""]
    plot_schedule(frames, out_dir / "schedule.png")
    plot_loss_by_stage(frames, out_dir / "loss.png")
    lines += ["![curriculum schedule](schedule.png)", "", "![training loss by stage](loss.png)", ""]
    for label, f in frames.items():
        lines += [
            f"### Stages: {label}",
            "",
            markdown_table(
                ["stage", "steps", "pool rows", "temperature", "KD weight", "loss first → last"], _stage_rows(f)
            ),
            "",
        ]
    return lines


def _probe_section(runs: Mapping[str, str], out_dir: Path) -> list[str]:
    """The per-bucket probe plot of every run whose metrics.jsonl holds probe records; empty when none does."""
    probes = {}
    for label, folder in runs.items():
        path = storage.join(folder, "train", "metrics.jsonl")
        frame = read_metrics(path).probes if storage.is_file(path) else pd.DataFrame()
        if not frame.empty:
            probes[label] = frame
    if not probes:
        return []
    rows = probes[next(iter(probes))].groupby("bucket")["rows"].first()
    plot_bucket_probe(probes, out_dir / "bucket_probe.png")
    return [
        "## Curriculum: the difficulty buckets",
        "",
        f"KD loss (forward KL at T = 1 against the final teacher) and response CE of the student on a fixed "
        f"sample of each difficulty bucket ({', '.join(f'{b}: {n} rows' for b, n in rows.items())}), at every "
        "stage end and selection candidate; bucket 0 is the easiest.",
        "",
        "![per-bucket probe against samples seen](bucket_probe.png)",
        "",
    ]


def _selection_section(runs: Mapping[str, str], out_dir: Path) -> list[str]:
    """Per run, its selection candidates (train/selection.json) with the best marked, and one plot of
    every run's dev curves against the samples seen; runs without candidates get a line saying so."""
    lines = ["## Checkpoint selection", ""]
    selections, notes = {}, []
    for label, folder in runs.items():
        path = storage.join(folder, "train", "selection.json")
        if not storage.is_file(path):
            notes.append(f"{label}: no selection yet (no {path}).")
            continue
        selection = storage.read_json(path)
        if selection["candidates"]:
            selections[label] = selection
        else:
            notes.append(f"{label}: no candidates (trained without a dev set); its final student is the only one.")
    if not selections:
        return lines + notes + [""]
    protocol = next(iter(selections.values()))["protocol"]
    lines += [
        f"Candidates: {protocol['candidates_at']}; dev ROUGE-L of {protocol['decoding']} responses on "
        f"{protocol['dev_rows']} dev rows with {protocol['max_new_tokens']} new tokens; best = highest dev "
        f"ROUGE-L, ties to {protocol['tie_break']}. Dev KD loss: forward KL at T = 1 against the final teacher. "
        "The evaluation's model (below) shows which student eval.checkpoint picked "
        "(train/student_best = best, train/student = final).",
        "",
    ]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    for label, selection in selections.items():
        best, final = selection["best"]["step"], selection["final"]["step"]
        rows = [
            [
                c["step"],
                c["stage"],
                c["samples"],
                _fixed(c["dev_rougeL"]),
                _fmt(c["dev_kd_loss"]),
                " ".join(mark for mark, step in (("best", best), ("final", final)) if step == c["step"]),
            ]
            for c in selection["candidates"]
        ]
        lines += [
            f"### Selection: {label}",
            "",
            markdown_table(["step", "stage", "samples seen", "dev ROUGE-L", "dev KD loss", "kept as"], rows),
            "",
        ]
    plot_selection(selections, out_dir / "selection.png")
    return lines + ["![dev ROUGE-L and dev KD loss against samples seen](selection.png)", ""]


def _eval_section(evals: Mapping[str, Mapping], out_dir: Path) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evals:
        return lines + ["No evaluation results yet (no eval/results.json or eval/<name>/results.json).", ""]
    plot_rouge(evals, out_dir / "rouge.png")
    settings = []
    for label, res in evals.items():
        cfg = res.get("config", {})
        rejected = sum(s.get("rows_rejected", 0) for s in res["sets"].values())
        settings.append(
            [
                label,
                f"`{res.get('model')}`",
                cfg.get("temperature"),
                cfg.get("top_p"),
                cfg.get("max_new_tokens"),
                ", ".join(map(str, cfg.get("seeds", []))),
                rejected,
                _fmt(res.get("wall_seconds")),
            ]
        )
    evidence = evidence_table(evals)
    if evidence:
        lines += ["### POCL against the baseline per KD loss", "", evidence]
    return lines + [
        compare_table(evals),
        "![ROUGE-L per eval set](rouge.png)",
        "",
        markdown_table(
            ["evaluation", "model", "temperature", "top-p", "max new tokens", "seeds", "rows rejected", "wall seconds"],
            settings,
        ),
        "",
    ]


def _sweep_section(tune_dir: str, out_dir: Path) -> list[str]:
    """The sweep's trials table, its objective plot (copied into out_dir) and where best.yaml is;
    empty when there was no sweep (no tune_dir/results.csv, written by `pocl_ray.tuning`)."""
    csv = storage.join(tune_dir, "results.csv")
    if not storage.is_file(csv):
        return []
    frame = pd.read_csv(io.BytesIO(storage.read_bytes(csv)), dtype={"trial_id": str})
    best = storage.join(tune_dir, "best.yaml")
    lines = ["## Sweep", "", f"{len(frame)} trials (`{csv}`); best config: `{best}`.", ""]
    shown = [c for c in frame.columns if c not in ("error", "output_dir")]
    rows = [[f"{v:.4g}" if isinstance(v, float) else v for v in row] for row in frame[shown].itertuples(index=False)]
    lines += [markdown_table(shown, rows), ""]
    plot = storage.join(tune_dir, "objective.png")
    if storage.is_file(plot):
        (out_dir / "tune_objective.png").write_bytes(storage.read_bytes(plot))
        lines += ["![objective vs searched parameters](tune_objective.png)", ""]
    return lines


def write_report(run_dir: str | Path, runs: Mapping[str, str | Path] | None = None) -> str | Path:
    """Write run_dir/report/report.md and its PNGs from the parts that exist; returns report.md's path.
    run_dir may be a URI: the report is then drawn in a local temporary folder and uploaded."""
    run_dir = str(run_dir)
    if not storage.is_dir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    resolved = resolve_runs(run_dir, runs)
    missing = [f"{label} ({path})" for label, path in resolved.items() if not storage.is_dir(path)]
    if missing:
        raise FileNotFoundError(f"runs: folders not found: {', '.join(missing)}")
    report_dir = storage.join(run_dir, "report")
    if not is_uri(run_dir):
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        return _write(run_dir, resolved, Path(report_dir))
    with tempfile.TemporaryDirectory(prefix="pocl-report-") as tmp:
        _write(run_dir, resolved, Path(tmp))
        storage.copy_folder(tmp, report_dir, "output.dir")
    return storage.join(report_dir, "report.md")


def _write(run_dir: str, resolved: Mapping[str, str], out_dir: Path) -> Path:
    """report.md and its PNGs into the local folder out_dir."""
    lines = [
        f"# Report: {_name(run_dir)}",
        "",
        f"Run directory: `{run_dir}`; compared runs: "
        + ", ".join(f"{label} (`{path}`)" for label, path in resolved.items()),
        "",
    ]
    lines += _scores_section(storage.join(run_dir, "scores"), out_dir)
    trained = {label: folder for label, folder in resolved.items() if not _evaluation_only(folder)}
    lines += _training_section(trained, out_dir)
    lines += _probe_section(trained, out_dir)
    lines += _selection_section(trained, out_dir)
    lines += _eval_section(collect_evals(run_dir, resolved), out_dir)
    lines += _sweep_section(storage.join(run_dir, "tune"), out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
