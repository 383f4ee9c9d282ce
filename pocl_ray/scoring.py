"""Difficulty scoring with Ray Data: read -> validate/tokenize -> measurer actor pool -> fuse -> buckets -> write.

Layout written under ``cfg.output.dir``/scores (CONTRACTS.md): ``scores.parquet`` (a directory of
parquet files, one row per scored sample: id, text, tokens, labels, every metric, fused_score, rank,
bucket), ``manifest.json`` and ``rejected.jsonl``.

Passes over the data, all in Ray Data:
1. one streaming execution: read -> ``data.prepare_batch`` (tasks) -> a Ray uid per row -> the
   measurer actor pool (models loaded once per actor, rows scored once; rows the data layer
   rejected pass through unscored) -> materialised once, in input order. Rows keep their original
   record as JSON so any reject, including a duplicate found later, can be written verbatim.
2. the driver collects (uid, id, reject_reason, metrics) in input order (position = input row
   number), marks repeated ids (first occurrence wins: duplicates are only known globally, so they
   were scored and are dropped here) and puts a uid -> row lookup in the object store;
3. rejected rows stream from the object store to ``rejected.jsonl``;
4. fusion and buckets on the driver (``difficulty``); the per-row results go to the object store
   and a map over the scored rows joins them by row number; optionally sorted by rank; written.

Driver memory limit: the driver holds, per input row, its id, reject reason and row number, and per
scored row the metric values, fused score, rank and bucket (about len(id) + 8 * (metrics + 4)
bytes: ~100 MB for a million rows). It never holds prompts, responses or tokens of the dataset;
those stay in the object store (spilled to disk when large) and in the written files.

Reproducibility: with one actor and the same data, batches are formed identically and two runs give
bit-identical metrics. With several actors batch composition (hence padding, hence the last bits of
a float) can differ between runs, so near-equal metric values may swap ranks.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pocl_ray import data as data_mod
from pocl_ray import difficulty
from pocl_ray.config import ConfigError, ModelsConfig, RunConfig
from pocl_ray.losses import cross_entropy, kd_loss

SCORES_FILE = "scores.parquet"
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.jsonl"

TEACHER_METRICS = frozenset({"teacher_ce", "teacher_student_kl"})
STUDENT_METRICS = frozenset({"student_ce", "student_rougeL", "teacher_student_kl"})
_FORWARD_METRICS = frozenset({"student_ce", "teacher_ce", "teacher_student_kl"})

# Columns of the prepared (validated, tokenized) rows; attention_mask is dropped (always all ones).
_PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_prompt_tokens", pa.int32()),
        ("num_response_tokens", pa.int32()),
        ("reject_reason", pa.string()),
        ("record", pa.string()),
    ]
)
_MEASURER_INPUT = ["input_ids", "labels", "num_prompt_tokens", "num_response_tokens", "response"]
_OUTPUT_TEXT_COLUMNS = ["id", "prompt", "response", "input_ids", "labels", "num_prompt_tokens", "num_response_tokens"]


# ---------------------------------------------------------------------------------------------
# Measurers (plain torch; the Ray actor and the benchmark's bare loop both call `measure`)


@dataclass
class MeasurerModels:
    """The models a set of metrics needs, loaded once per actor."""

    tokenizer: Any
    student: torch.nn.Module | None
    teacher: torch.nn.Module | None
    device: torch.device
    rouge: Any


def load_measurer_models(models_cfg: ModelsConfig, metrics: Sequence[str], device: str | torch.device) -> MeasurerModels:
    """Tokenizer, initial student and teacher as the metrics need them, frozen, on ``device``.

    The initial student is ``models.student`` when set, else cut from the teacher
    (``student_layers`` / ``student_keep_every``); the teacher is kept only for teacher metrics.
    dtype "auto" = bf16 on GPU, fp32 on CPU (``models.resolve_dtype``).
    """
    from rouge_score import rouge_scorer

    from pocl_ray.models import check_compatible, load_model, load_tokenizer, student_from_teacher

    device = torch.device(device)
    tokenizer = load_tokenizer(models_cfg.tokenizer or models_cfg.teacher)
    need_teacher = bool(TEACHER_METRICS & set(metrics)) or (
        bool(STUDENT_METRICS & set(metrics)) and models_cfg.student is None
    )
    teacher = load_model(models_cfg.teacher, dtype=models_cfg.dtype, device=device, frozen=True) if need_teacher else None
    student = None
    if STUDENT_METRICS & set(metrics):
        if models_cfg.student is not None:
            student = load_model(models_cfg.student, dtype=models_cfg.dtype, device=device, frozen=True)
        else:
            student = student_from_teacher(
                teacher, keep_layers=models_cfg.student_layers, keep_every=models_cfg.student_keep_every
            )
            student.eval().requires_grad_(False)
    if not TEACHER_METRICS & set(metrics):
        teacher = None
    if teacher is not None and student is not None:
        check_compatible(teacher, student, tokenizer)
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True) if "student_rougeL" in metrics else None
    return MeasurerModels(tokenizer=tokenizer, student=student, teacher=teacher, device=device, rouge=rouge)


def _chunks(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row positions sorted by length and cut into batches of similar lengths (little padding)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _forward_metrics(models: MeasurerModels, rows: Mapping[str, Sequence], metrics: set[str], batch_size: int) -> dict[str, np.ndarray]:
    n = len(rows["input_ids"])
    out = {m: np.full(n, np.nan) for m in metrics & _FORWARD_METRICS}
    lengths = np.array([len(x) for x in rows["input_ids"]])
    pad_id = models.tokenizer.pad_token_id
    for idx in _chunks(lengths, batch_size):
        batch = data_mod.collate(
            {"input_ids": [rows["input_ids"][i] for i in idx], "attention_mask": [np.ones(lengths[i], np.int64) for i in idx],
             "labels": [rows["labels"][i] for i in idx]},
            pad_id,
        )
        batch = {k: v.to(models.device) for k, v in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_logits = models.student(**inputs).logits if metrics & {"student_ce", "teacher_student_kl"} else None
        t_logits = models.teacher(**inputs).logits if metrics & TEACHER_METRICS else None
        for j, i in enumerate(idx):
            length = int(lengths[i])
            labels = batch["labels"][j : j + 1, :length]
            s = s_logits[j : j + 1, :length] if s_logits is not None else None
            t = t_logits[j : j + 1, :length] if t_logits is not None else None
            if "student_ce" in out:
                out["student_ce"][i] = cross_entropy(s, labels).item()
            if "teacher_ce" in out:
                out["teacher_ce"][i] = cross_entropy(t, labels).item()
            if "teacher_student_kl" in out:
                out["teacher_student_kl"][i] = kd_loss("fkl", s, t, labels, temperature=1.0, scale_by_t2=False).item()
    return out


def greedy_responses(models: MeasurerModels, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """The student's greedy continuation of each prompt, decoded without special tokens."""
    tok = models.tokenizer
    texts = [""] * len(prompts)
    for idx in _chunks(np.array([len(p) for p in prompts]), batch_size):
        batch = data_mod.generation_batch([prompts[i] for i in idx], tok.pad_token_id)
        batch = {k: v.to(models.device) for k, v in batch.items()}
        generated = models.student.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for i, text in zip(idx, tok.batch_decode(new_tokens, skip_special_tokens=True)):
            texts[i] = text
    return texts


def measure(
    models: MeasurerModels, rows: Mapping[str, Sequence], metrics: Sequence[str], *, batch_size: int, max_new_tokens: int
) -> dict[str, np.ndarray]:
    """Every requested metric for each row (float64 arrays aligned with the rows).

    ``rows`` holds input_ids, labels (-100 on the prompt), num_prompt_tokens, num_response_tokens and
    the reference ``response`` text. CE and KL are means over the row's response tokens; KL is
    KL(teacher || student) at temperature 1; student_rougeL is the ROUGE-L F1 (stemmed) of the
    student's greedy response against the reference; length counts response tokens.
    """
    wanted = set(metrics)
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        if wanted & _FORWARD_METRICS:
            out.update(_forward_metrics(models, rows, wanted, batch_size))
        if "student_rougeL" in wanted:
            prompts = [ids[: int(p)] for ids, p in zip(rows["input_ids"], rows["num_prompt_tokens"])]
            generated = greedy_responses(models, prompts, max_new_tokens, batch_size)
            out["student_rougeL"] = np.array(
                [models.rouge.score(ref, gen)["rougeL"].fmeasure for ref, gen in zip(rows["response"], generated)],
                dtype=np.float64,
            )
    if "length" in wanted:
        out["length"] = np.asarray(rows["num_response_tokens"], dtype=np.float64)
    return {m: out[m] for m in metrics}


class Measurer:
    """Ray Data actor: loads the measurer models once, then adds the metric columns to batches of
    prepared rows (NaN on rows the data layer rejected, which pass through unscored)."""

    def __init__(self, models_cfg: dict, metrics: list[str], batch_size: int, max_new_tokens: int, use_gpu: bool, num_threads: int):
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("scoring.num_gpus_per_actor > 0 but this actor sees no CUDA device")
        if not use_gpu:
            torch.set_num_threads(num_threads)
        self.models = load_measurer_models(ModelsConfig(**models_cfg), metrics, "cuda" if use_gpu else "cpu")
        self.metrics = metrics
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = np.flatnonzero(batch.column("reject_reason").to_numpy(zero_copy_only=False) == "")
        columns = {m: np.full(batch.num_rows, np.nan) for m in self.metrics}
        if len(valid):
            rows = batch.select(_MEASURER_INPUT).take(pa.array(valid))
            scores = measure(
                self.models, {c: rows.column(c).to_numpy(zero_copy_only=False) for c in _MEASURER_INPUT},
                self.metrics, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            )
            for m in self.metrics:
                columns[m][valid] = scores[m]
        for m in self.metrics:
            batch = batch.append_column(m, pa.array(columns[m]))
        return batch


# ---------------------------------------------------------------------------------------------
# Ray Data stages (plain functions over pyarrow batches)


def _record_json(row: dict) -> str:
    """The input record as the user wrote it: its JSON line if unparsable, else its fields."""
    if row.get(data_mod.RAW_COLUMN) is not None:
        record = {"raw_line": row[data_mod.RAW_COLUMN]}
    else:
        encoded = set(row.get(data_mod.JSON_COLUMN) or ())
        record = {
            k: json.loads(v) if k in encoded and v is not None else v
            for k, v in row.items()
            if k not in data_mod.MARKER_COLUMNS
        }
    return json.dumps(record, ensure_ascii=False, default=str)


def _prepare(batch: pa.Table, tokenizer, data_cfg) -> pa.Table:
    out = data_mod.prepare_batch(batch.to_pydict(), tokenizer, data_cfg)
    out["record"] = [_record_json(r) for r in batch.to_pylist()]
    return pa.table({name: out[name] for name in _PREPARED_SCHEMA.names}, schema=_PREPARED_SCHEMA)


def _rows_of(batch: pa.Table, lookup: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Input row numbers of a batch's rows, from their uid (see `_row_lookup`)."""
    sorted_uids, rows = lookup
    return rows[np.searchsorted(sorted_uids, batch.column("uid").to_numpy())]


def _take_rows(batch: pa.Table, lookup_ref, mask_ref) -> pa.Table:
    """The rows whose input row number is set in the mask, with a "row" column."""
    import ray

    rows = _rows_of(batch, ray.get(lookup_ref))
    keep = ray.get(mask_ref)[rows]
    return batch.filter(pa.array(keep)).append_column("row", pa.array(rows[keep]))


def _attach(batch: pa.Table, lookup_ref, results_ref, metrics: list[str]) -> pa.Table:
    """Keep the ranked rows and add their fused score, rank and bucket."""
    import ray

    results: dict[str, np.ndarray] = ray.get(results_ref)
    rows = _rows_of(batch, ray.get(lookup_ref))
    keep = results["rank"][rows] >= 0
    rows = rows[keep]
    table = batch.filter(pa.array(keep)).select(_OUTPUT_TEXT_COLUMNS + metrics)
    for name, values in results.items():
        table = table.append_column(name, pa.array(values[rows]))
    return table


def _row_lookup(uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted uids, row number of each): maps Ray's per-task uids back to input row numbers."""
    order = np.argsort(uids, kind="stable")
    sorted_uids = uids[order]
    if len(sorted_uids) > 1 and not (np.diff(sorted_uids) > 0).all():
        raise RuntimeError("Ray Data produced repeated row uids")
    return sorted_uids, order.astype(np.int64)


def _collect(ds, columns: list[str]) -> dict[str, np.ndarray]:
    """Small columns of a dataset on the driver, in the dataset's order."""
    tables = list(ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None))
    if not tables:
        return {c: np.array([]) for c in columns}
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass(frozen=True)
class ScoreResult:
    output_dir: Path  # DIR/scores
    manifest: dict

    @property
    def scores_path(self) -> Path:
        return self.output_dir / self.manifest["scores_path"]

    @property
    def rejected_path(self) -> Path:
        return self.output_dir / REJECTED_FILE


def _model_folder(path: str, field: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{field}: model folder not found: {folder}")
    if field != "models.tokenizer" and not (folder / "config.json").is_file():
        raise ConfigError(f"{field}: {folder} is not a Hugging Face model folder (no config.json)")


def check_inputs(cfg: RunConfig):
    """Fail before any Ray work on a missing data file or model folder, or models that do not fit
    together; return the tokenizer."""
    from transformers import AutoConfig

    from pocl_ray.models import load_tokenizer

    try:
        data_mod.resolve_source(cfg.data.train, cfg.data.format)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.train: {err}") from None
    except ValueError as err:
        raise ConfigError(f"data.train: {err}") from None
    metrics = set(cfg.scoring.metrics)
    m = cfg.models
    _model_folder(m.teacher, "models.teacher")
    tokenizer_field = "models.tokenizer" if m.tokenizer is not None else "models.teacher"
    if m.tokenizer is not None:
        _model_folder(m.tokenizer, "models.tokenizer")
    try:
        tokenizer = load_tokenizer(m.tokenizer or m.teacher)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{tokenizer_field}: cannot load a tokenizer: {err}") from None

    vocab = {"models.teacher": AutoConfig.from_pretrained(m.teacher).get_text_config()}
    if STUDENT_METRICS & metrics and m.student is not None:
        _model_folder(m.student, "models.student")
        vocab["models.student"] = AutoConfig.from_pretrained(m.student).get_text_config()
    elif STUDENT_METRICS & metrics and m.student_layers is not None:
        layers = vocab["models.teacher"].num_hidden_layers
        bad = [i for i in m.student_layers if not 0 <= i < layers]
        if bad or not m.student_layers:
            raise ConfigError(f"models.student_layers: {bad or '[]'} out of range for a teacher with {layers} layers")
    for field, model_cfg in vocab.items():
        if model_cfg.vocab_size < len(tokenizer):
            raise ConfigError(f"{field}: vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    if TEACHER_METRICS & metrics and len({c.vocab_size for c in vocab.values()}) > 1:
        raise ConfigError(
            f"models.student: vocab_size {vocab['models.student'].vocab_size} differs from the teacher's "
            f"{vocab['models.teacher'].vocab_size}; teacher metrics need one shared vocabulary"
        )
    return tokenizer


def _models_manifest(cfg: RunConfig) -> dict:
    m = cfg.models
    metrics = set(cfg.scoring.metrics)
    student = None
    if STUDENT_METRICS & metrics:
        student = (
            str(Path(m.student).resolve())
            if m.student is not None
            else f"cut from teacher (layers {m.student_layers})" if m.student_layers is not None
            else f"cut from teacher (keep_every {m.student_keep_every}, counting back from the last layer)"
        )
    return {
        "teacher": str(Path(m.teacher).resolve()),
        "student": student,
        "tokenizer": str(Path(m.tokenizer or m.teacher).resolve()),
        "dtype": m.dtype,
        "device": "cuda" if cfg.scoring.num_gpus_per_actor > 0 else "cpu",
    }


def _write_rejects(scored, lookup_ref, reasons: np.ndarray, path: Path) -> None:
    """Stream the rejected rows' records from the object store into rejected.jsonl, in row order."""
    import ray

    bad = reasons != ""
    with path.open("w") as f:
        if not bad.any():
            return
        rejects = scored.map_batches(
            _take_rows, fn_kwargs={"lookup_ref": lookup_ref, "mask_ref": ray.put(bad)}, batch_format="pyarrow"
        )
        for row in rejects.select_columns(["row", "id", "record"]).iter_rows():
            r = int(row["row"])
            f.write(json.dumps({"row": r, "id": row["id"], "reason": str(reasons[r]), "record": json.loads(row["record"])},
                               ensure_ascii=False) + "\n")


def score_dataset(cfg: RunConfig) -> ScoreResult:
    """Score, rank and bucket ``cfg.data.train`` into ``cfg.output.dir``/scores (see module docstring)."""
    import ray
    import ray.data
    from ray.data.expressions import monotonically_increasing_id

    start = time.perf_counter()
    sc = cfg.scoring
    tokenizer = check_inputs(cfg)
    directions = difficulty.metric_directions(sc.metrics, sc.directions)
    out_dir = Path(cfg.output.dir) / "scores"
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path = out_dir / SCORES_FILE
    if scores_path.is_dir():
        shutil.rmtree(scores_path)
    elif scores_path.exists():
        scores_path.unlink()

    # 1. One streaming pass: read, validate + tokenize (tasks), score (actor pool), materialised once.
    # Input order is kept, so a row's position in the result is its input row number; the uid
    # column (unique, not ordered) carries that number into later passes.
    use_gpu = sc.num_gpus_per_actor > 0
    source = data_mod.read_ray_dataset(cfg.data.train, cfg.data.format, cfg.data.max_rows)
    source.context.execution_options.preserve_order = True
    scored = (
        source.map_batches(_prepare, batch_format="pyarrow", fn_kwargs={"tokenizer": tokenizer, "data_cfg": cfg.data})
        .with_column("uid", monotonically_increasing_id())
        .map_batches(
            Measurer,
            fn_constructor_kwargs={
                "models_cfg": cfg.models.model_dump(mode="json"),
                "metrics": list(sc.metrics),
                "batch_size": sc.batch_size,
                "max_new_tokens": sc.max_new_tokens,
                "use_gpu": use_gpu,
                "num_threads": max(1, int(sc.num_cpus_per_actor)),
            },
            batch_size=sc.batch_size * sc.length_window,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
            num_gpus=sc.num_gpus_per_actor if use_gpu else None,
            num_cpus=sc.num_cpus_per_actor,
        )
        .materialize()
    )

    # 2. On the driver: a few values per row. Rejects = the data layer's, every repeat of an id
    # (scored above, as duplicates are only known globally, and dropped here), and rows whose
    # metrics are not finite (e.g. a float16 overflow), which no rank can place.
    index = _collect(scored, ["uid", "id", "reject_reason", *sc.metrics])
    rows_in = len(index["uid"])
    if rows_in == 0:
        raise ConfigError(f"data.train: {cfg.data.train} holds no rows")
    lookup_ref = ray.put(_row_lookup(index["uid"].astype(np.int64)))
    reasons = index["reject_reason"].astype(object)
    invalid = reasons != ""
    duplicates = np.array(data_mod.duplicate_reasons(index["id"].tolist(), skip=invalid.tolist()), dtype=object)
    reasons = np.where(invalid, reasons, duplicates)
    for m in sc.metrics:
        broken = (reasons == "") & ~np.isfinite(index[m].astype(np.float64))
        reasons[broken] = f"metric {m} is not finite"
    reasons = reasons.astype(str)
    _write_rejects(scored, lookup_ref, reasons, out_dir / REJECTED_FILE)
    kept = np.flatnonzero(reasons == "")
    rows_scored = len(kept)
    if rows_scored == 0:
        raise ConfigError(f"data.train: none of the {rows_in} rows could be scored; reasons in {out_dir / REJECTED_FILE}")

    # 3. Fuse and cut buckets.
    fusion = difficulty.fuse(index["id"][kept], {m: index[m][kept].astype(np.float64) for m in sc.metrics}, directions, sc.rrf_k)
    buckets = difficulty.rebucket(fusion.rank, cfg.curriculum.num_buckets)
    results: dict[str, np.ndarray] = {}
    for name, values, fill, dtype in (
        ("fused_score", fusion.fused_score, np.nan, np.float64),
        ("rank", fusion.rank, -1, np.int64),
        ("bucket", buckets, -1, np.int32),
    ):
        results[name] = np.full(rows_in, fill, dtype=dtype)
        results[name][kept] = values

    # 4. Join the results to the rows in Ray Data (looked up by row number) and write.
    final = scored.map_batches(
        _attach,
        fn_kwargs={"lookup_ref": lookup_ref, "results_ref": ray.put(results), "metrics": list(sc.metrics)},
        batch_format="pyarrow",
    )
    if sc.sort_output:
        final = final.sort("rank")
    final.write_parquet(str(scores_path))

    manifest = {
        "rows_in": int(rows_in),
        "rows_scored": rows_scored,
        "rows_rejected": int(rows_in - rows_scored),
        "metrics": [{"name": m, "direction": directions[m]} for m in sc.metrics],
        "rrf_k": sc.rrf_k,
        "num_buckets": cfg.curriculum.num_buckets,
        "buckets": difficulty.bucket_summary(fusion.fused_score, buckets, cfg.curriculum.num_buckets),
        "models": _models_manifest(cfg),
        "config": cfg.model_dump(mode="json"),
        "ray_version": ray.__version__,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "scores_path": SCORES_FILE,
        "sorted_by_rank": sc.sort_output,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return ScoreResult(output_dir=out_dir, manifest=manifest)


def load_manifest(scores_dir: str | Path) -> dict:
    path = Path(scores_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scoring manifest at {path}; run `pocl-ray score` first")
    return json.loads(path.read_text())


def format_summary(manifest: dict) -> str:
    """A one-screen summary of a scoring run."""
    metrics = ", ".join(f"{m['name']} ({m['direction']} = easier)" for m in manifest["metrics"])
    lines = [
        f"scored {manifest['rows_scored']} of {manifest['rows_in']} rows "
        f"({manifest['rows_rejected']} rejected, see {REJECTED_FILE}) in {manifest['wall_seconds']:.1f} s",
        f"metrics: {metrics}; reciprocal rank fusion k = {manifest['rrf_k']:g}",
        f"student: {manifest['models']['student']}; teacher: {manifest['models']['teacher']}",
        f"{manifest['num_buckets']} buckets, easiest first:",
        "  bucket      rows   fused score range",
    ]
    for b in manifest["buckets"]:
        span = "-" if b["rows"] == 0 else f"{b['fused_min']:.6f} .. {b['fused_max']:.6f}"
        lines.append(f"  {b['id']:>6}  {b['rows']:>8}   {span}")
    lines.append(f"written: {SCORES_FILE}, {MANIFEST_FILE}, {REJECTED_FILE}")
    return "\n".join(lines)
