"""What a run shows in the experiment trackers: metric names and values from the run's own records.

The names, one family per source (every value is the record's own, never recomputed):
  train/<key>                 a metrics.jsonl step record's numbers (STEP_KEYS), at its step, plus
                              train/tokens_per_s = tokens / seconds of that step
  probe/bucket_<b>/<key>      a bucket-probe record (`pocl_ray.probes`): kd_loss, ce_loss, at its step
  resize/workers, resize/seconds  a change of worker count (RESIZE_KIND records): the new count and the
                              seconds from the failure (or the new group's start) to its first step
  dev/rougeL, dev/kd_loss     a checkpoint-selection candidate, at its step
  selected/<key>              the best candidate (step, dev_rougeL, dev_kd_loss), at its step
  eval/<set>/<key>            eval results: rougeL (mean over seeds), rougeL_std, rougeL_seed_<seed>, ce
  scoring/...                 the scoring pass: rows, rejects by reason, each metric's distribution,
                              the buckets' sizes and fused-score bounds
Parameters: the resolved config, flattened to dotted keys, credentials left out (`loggable_params`),
and the plan (`plan_params`).

The pure functions map records to (step, {name: value}); the `log_*` functions read a pipeline step's
output files and hand them to a `tracking.Run`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pocl_ray import storage
from pocl_ray.probes import PROBE_KIND

# metrics.jsonl keys of a step record that are numbers worth a series.
STEP_KEYS = (
    "loss",
    "kd_loss",
    "ce_loss",
    "temperature",
    "kd_weight",
    "lr",
    "grad_norm",
    "tokens",
    "ce_tokens",
    "seconds",
    "data_wait",
    "samples",
    "stage",
    "epoch",
    "pool_rows",
    "peak_gpu_gib",
)
PROBE_KEYS = ("kd_loss", "ce_loss", "rows", "tokens")
RESIZE_KIND = "resize"  # a metrics.jsonl record of a change of worker count (`coordinator`)
QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}
# Name parts of config keys whose values are never logged (a credential set in a config by mistake).
SECRET_PARTS = {"token", "secret", "password", "passwd", "credential", "credentials", "apikey", "auth", "key"}
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


# ---------------------------------------------------------------------------------------------
# Parameters


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def _secret(key: str) -> bool:
    return any(part in SECRET_PARTS for part in re.split(r"[._\-\s]+", key.lower()))


def loggable_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A config dump as dotted key -> text, without credentials: keys named like one (token, secret,
    password, ..._key) are left out, and user:password@ in a URI is masked."""
    params = {}
    for key, value in _flatten(config):
        if _secret(key):
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        params[key] = _USERINFO.sub("***@", text)
    return params


def plan_params(plan: Mapping[str, Any], specs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The plan as parameters: its kind, stage count, total steps and one line per stage (buckets,
    pool rows, steps, temperature, KD weight, loss), from train/plan.json's `plan` and `stages`."""
    params = {
        "plan.name": str(plan["name"]),
        "plan.num_buckets": str(plan["num_buckets"]),
        "plan.num_stages": str(len(plan["stages"])),
        "plan.total_steps": str(sum(s["steps"] for s in specs)),
    }
    for stage, spec in zip(plan["stages"], specs):
        target = (
            f"hidden layer {stage['teacher_layer']} -> {stage['student_layer']}"
            if stage["target"] == "hidden"
            else stage["loss"]
        )
        params[f"plan.stage_{stage['index']}"] = (
            f"buckets {list(stage['buckets'])}, {spec['pool_rows']} rows, {spec['steps']} steps, "
            f"T {stage['temperature']:g}, KD weight {stage['kd_weight']:g}, {target}"
            + (", until plateau" if stage["until_plateau"] else "")
        )
    return params


# ---------------------------------------------------------------------------------------------
# Series


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record (a step, bucket-probe or resize record) as tracker metrics."""
    if record.get("kind") == PROBE_KIND:
        b = record["bucket"]
        return {f"probe/bucket_{b}/{k}": float(record[k]) for k in PROBE_KEYS if _number(record.get(k))}
    if record.get("kind") == RESIZE_KIND:
        return {"resize/workers": float(record["workers_after"]), "resize/seconds": float(record["seconds"])}
    metrics = {f"train/{k}": float(record[k]) for k in STEP_KEYS if _number(record.get(k))}
    if _number(record.get("tokens")) and _number(record.get("seconds")) and record["seconds"] > 0:
        metrics["train/tokens_per_s"] = record["tokens"] / record["seconds"]
    return metrics


def candidate_metrics(candidate: Mapping[str, Any]) -> dict[str, float]:
    return {
        f"dev/{k.removeprefix('dev_')}": float(candidate[k])
        for k in ("dev_rougeL", "dev_kd_loss", "dev_loss")
        if _number(candidate.get(k))
    }


def selected_metrics(best: Mapping[str, Any] | None) -> dict[str, float]:
    if best is None:
        return {}
    return {"selected/step": float(best["step"])} | {
        f"selected/{k}": float(best[k]) for k in ("dev_rougeL", "dev_kd_loss") if _number(best.get(k))
    }


def series(records: Iterable[Mapping[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) in step order, the records of one step merged (a tracker that only moves
    forward, like W&B's own step, then loses nothing)."""
    by_step: dict[int, dict[str, float]] = {}
    for record in records:
        if _number(record.get("step")):
            by_step.setdefault(int(record["step"]), {}).update(record_metrics(record))
    return sorted((step, metrics) for step, metrics in by_step.items() if metrics)


def eval_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's results.json: per set the ROUGE-L mean, std, each seed's and the response CE;
    the average over sets."""
    metrics: dict[str, float] = {}
    for set_name, s in results["sets"].items():
        name = re.sub(r"[^\w\-. ]", "_", set_name)  # a set name as a metric-name part every tracker takes
        for key, value in (
            ("rougeL", s.get("rougeL_mean")),
            ("rougeL_std", s.get("rougeL_std")),
            ("ce", s.get("ce_mean")),
        ):
            if _number(value):
                metrics[f"eval/{name}/{key}"] = float(value)
        for seed, value in (s.get("rougeL_per_seed") or {}).items():
            metrics[f"eval/{name}/rougeL_seed_{seed}"] = float(value)
        metrics[f"eval/{name}/rows_rejected"] = float(s.get("rows_rejected", 0))
    for key, value in (("rougeL", results["average"].get("rougeL_mean")), ("ce", results["average"].get("ce_mean"))):
        if _number(value):
            metrics[f"eval/average/{key}"] = float(value)
    return metrics


def reason_kind(reason: str) -> str:
    """A reject reason without its row's details (quoted values, numbers, parentheses), as a metric
    name: "duplicate id 'a-1' (first seen at row 3)" -> "duplicate_id"."""
    text = re.sub(r"\([^)]*\)|'[^']*'|\"[^\"]*\"", " ", reason).split(":")[0]
    return re.sub(r"[^a-z]+", "_", text.lower()).strip("_") or "other"


def scoring_metrics(
    manifest: Mapping[str, Any], rejects: Iterable[str], values: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """The scoring pass: rows in / scored / rejected, rejects by reason kind, each metric's (and the
    fused score's) distribution, and each bucket's rows and fused-score bounds."""
    metrics = {f"scoring/{k}": float(manifest[k]) for k in ("rows_in", "rows_scored", "rows_rejected")}
    for reason in rejects:
        key = f"scoring/rejected/{reason_kind(reason)}"
        metrics[key] = metrics.get(key, 0.0) + 1
    for name, column in values.items():
        finite = np.asarray(column, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if len(finite):
            metrics[f"scoring/{name}/mean"] = float(finite.mean())
            metrics |= {f"scoring/{name}/{q}": float(np.quantile(finite, p)) for q, p in QUANTILES.items()}
    for b in manifest["buckets"]:
        metrics[f"scoring/bucket_{b['id']}/rows"] = float(b["rows"])
        for key in ("fused_min", "fused_max"):
            if _number(b.get(key)):
                metrics[f"scoring/bucket_{b['id']}/{key}"] = float(b[key])
    return metrics


# ---------------------------------------------------------------------------------------------
# From a pipeline step's files to a run


def read_records(path: str | Path) -> list[dict]:
    """metrics.jsonl's records (a line that is not a JSON object is skipped, as the report skips it)."""
    records = []
    for line in storage.read_text(path).splitlines() if storage.is_file(path) else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def log_training(run, train_dir: str | Path, live: bool = False) -> None:
    """A finished training step: its plan (parameters and plan.json), every metrics.jsonl record,
    the selection candidates and the selected one (selection.json). With `live` the records,
    candidates and selected one were logged as they came (by the coordinator), so only the plan and
    the files are."""
    plan_path = storage.join(train_dir, "plan.json")
    if storage.is_file(plan_path):
        plan = storage.read_json(plan_path)
        run.params(plan_params(plan["plan"], plan["stages"]))
        run.artifacts(plan_path, "train")
    for step, metrics in [] if live else series(read_records(storage.join(train_dir, "metrics.jsonl"))):
        run.metrics(metrics, step)
    selection_path = storage.join(train_dir, "selection.json")
    if storage.is_file(selection_path):
        selection = storage.read_json(selection_path)
        for candidate in [] if live else selection["candidates"]:
            run.metrics(candidate_metrics(candidate), candidate["step"])
        if selection["best"] is not None and not live:
            run.metrics(selected_metrics(selection["best"]), selection["best"]["step"])
        run.artifacts(selection_path, "train")


def log_scoring(run, scores_dir: str | Path) -> None:
    """A finished scoring pass: scoring_metrics from manifest.json, rejected.jsonl and the scores'
    metric columns; the manifest as an artifact."""
    import pyarrow.dataset as pads

    manifest = storage.read_json(storage.join(scores_dir, "manifest.json"))
    rejected = read_records(storage.join(scores_dir, "rejected.jsonl"))
    columns = [m["name"] for m in manifest["metrics"]] + ["fused_score"]
    filesystem, inner = storage.resolve(storage.join(scores_dir, manifest["scores_path"]))
    table = pads.dataset(inner, filesystem=filesystem, format="parquet").to_table(columns=columns)
    values = {name: table[name].to_numpy() for name in columns}
    run.metrics(scoring_metrics(manifest, [r.get("reason", "") for r in rejected], values), 0)
    run.artifacts(storage.join(scores_dir, "manifest.json"), "scores")


def log_eval(run, results_path: str | Path) -> None:
    if storage.is_file(results_path):
        run.metrics(eval_metrics(storage.read_json(results_path)), 0)
        run.artifacts(storage.join(str(results_path).rsplit("/", 1)[0], "results.md"), "eval")
