"""Difficulty scoring with Ray Data: read -> validate/tokenize -> measurer actor pool -> fuse -> buckets -> write.

Layout written under ``cfg.output.dir``/scores (`scores.py`; docs/ARCHITECTURE.md): ``rows/`` (a directory of
parquet files, one row per scored sample: id, text, tokens, labels, every metric, fused_score, rank,
bucket; with scoring.teacher_top_k or scoring.teacher_hidden also the teacher cache columns of
``teacher_cache.py``, from the measurers' teacher forward), ``manifest.json`` (its "teacher_cache"
entry: the form, K or the hidden size, bytes per scored token), ``rejected.jsonl``, and for the hidden
form the teacher's LM head, ``teacher_head.safetensors``.

Passes over the data, all in Ray Data:
0. a count of the input rows, the total of the `[score] done/total rows` progress line (parquet
   metadata; JSONL files are read and parsed, without the models);
1. one streaming execution: read -> ``data.prepare_batch`` (tasks) -> a Ray uid per row -> the
   measurer actor pool (models loaded once per actor, rows scored once; rows the data layer
   rejected pass through unscored) -> materialised once, in input order. Rows keep their original
   record as JSON so any reject, including a duplicate found later, can be written verbatim.
2. the driver collects (uid, id, reject_reason, metrics) in input order (position = input row
   number), marks repeated ids (first occurrence wins: duplicates are only known globally, so they
   were scored and are dropped here) and puts a uid -> row lookup in the object store;
3. rejected rows stream from the object store to ``rejected.jsonl``;
4. fusion and buckets on the driver (``difficulty``); the per-row results go to the object store
   and a map over the scored rows joins them by row number; written in rank order (unless
   scoring.sort_output is off) as files of at most `rows_per_file` rows.

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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pocl_ray import data as data_mod
from pocl_ray import difficulty, preflight, storage, teacher_cache
from pocl_ray.config import ConfigError, RunConfig
from pocl_ray.measurers import STUDENT_METRICS, Measurer
from pocl_ray.models import load_tokenizer, local_folder
from pocl_ray.preflight import STUDENT, TEACHER, TOKENIZER, Sources, to_wire
from pocl_ray.progress import row_progress
from pocl_ray.ray_session import actor_pool, actor_resources
from pocl_ray.scores import MANIFEST_FILE, REJECTED_FILE, SCORES_DIR

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
_OUTPUT_TEXT_COLUMNS = ["id", "prompt", "response", "input_ids", "labels", "num_prompt_tokens", "num_response_tokens"]


# ---------------------------------------------------------------------------------------------
# Ray Data stages (plain functions over pyarrow batches)


def _prepare(batch: pa.Table, tokenizer, data_cfg) -> pa.Table:
    out = data_mod.prepare_batch(batch.to_pydict(), tokenizer, data_cfg)
    out["record"] = [json.dumps(r, ensure_ascii=False) for r in data_mod.records_of(batch.to_pydict())]
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


def _attach(batch: pa.Table, lookup_ref, results_ref, metrics: list[str], sort: bool = False) -> pa.Table:
    """Keep the ranked rows and add their fused score, rank and bucket (sorted by rank if asked)."""
    import ray

    results: dict[str, np.ndarray] = ray.get(results_ref)
    rows = _rows_of(batch, ray.get(lookup_ref))
    keep = results["rank"][rows] >= 0
    rows = rows[keep]
    table = batch.filter(pa.array(keep)).select(_OUTPUT_TEXT_COLUMNS + metrics)
    for name, values in results.items():
        table = table.append_column(name, pa.array(values[rows]))
    return table.sort_by("rank") if sort else table


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
    output_dir: str | Path  # DIR/scores (a URI when output.dir is one)
    manifest: dict

    @property
    def scores_path(self) -> str | Path:
        return storage.as_path(storage.join(self.output_dir, self.manifest["scores_path"]))

    @property
    def rejected_path(self) -> str | Path:
        return storage.as_path(storage.join(self.output_dir, REJECTED_FILE))


def check_inputs(cfg: RunConfig, sources: Sources):
    """Fail before any Ray work on unreadable training data, models that do not fit together (tokenizers
    that differ, a head smaller than the tokenizer: `models.check_tokenizers`), or conversation rows with
    a tokenizer that cannot render them (no chat template); return the tokenizer. The models are those
    the preflight resolved (`sources`); only their configs and tokenizers are read, never their weights."""
    from transformers import AutoConfig

    from pocl_ray.conversations import check_tokenizer
    from pocl_ray.models import check_model_folder, check_tokenizers

    try:
        data_mod.resolve_source(cfg.data.train, cfg.data.format)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.train: {err}") from None
    except ValueError as err:
        raise ConfigError(f"data.train: {err}") from None
    metrics = set(cfg.scoring.metrics)
    m = cfg.models
    check_model_folder(local_folder(sources[TEACHER], weights=False), TEACHER)
    tokenizer_field = TOKENIZER if m.tokenizer is not None else TEACHER
    try:
        tokenizer = load_tokenizer(sources[TOKENIZER])
    except (OSError, ValueError) as err:
        raise ConfigError(f"{tokenizer_field}: cannot load a tokenizer: {err}") from None
    if data_mod.pinned_row_form(cfg.data.train, cfg.data).row_form == "conversation":
        try:
            check_tokenizer(tokenizer)
        except ValueError as err:
            raise ConfigError(f"{tokenizer_field}: {err}") from None
    # The student's folder matters only where a student is measured.
    measured = m if STUDENT_METRICS & metrics else m.model_copy(update={"student": None})
    vocab = check_tokenizers(measured, sources=sources)
    if STUDENT_METRICS & metrics and m.student is None and m.student_layers is not None:
        teacher_dir = local_folder(sources[TEACHER], weights=False)
        layers = AutoConfig.from_pretrained(teacher_dir).get_text_config().num_hidden_layers
        bad = [i for i in m.student_layers if not 0 <= i < layers]
        if bad or not m.student_layers:
            raise ConfigError(f"models.student_layers: {bad or '[]'} out of range for a teacher with {layers} layers")
    k = cfg.scoring.teacher_top_k
    if k is not None and k > vocab:
        raise ConfigError(f"scoring.teacher_top_k: {k} exceeds the tokenizer's vocabulary ({vocab} tokens)")
    if cfg.scoring.teacher_hidden:
        teacher_cache.check_hidden_form(sources[TEACHER])
    return tokenizer


def _models_manifest(cfg: RunConfig, sources: Sources) -> dict:
    """The models the pass scored with, as resolved (kind, location, revision: a Hub id's commit)."""
    m = cfg.models
    metrics = set(cfg.scoring.metrics)
    student = None
    if STUDENT_METRICS & metrics:
        student = (
            sources[STUDENT].record()
            if m.student is not None
            else f"cut from teacher (layers {m.student_layers})"
            if m.student_layers is not None
            else f"cut from teacher (keep_every {m.student_keep_every}, counting back from the last layer)"
        )
    return {
        "teacher": sources[TEACHER].record(),
        "student": student,
        "tokenizer": sources[TOKENIZER].record(),
        "dtype": m.dtype,
        "device": "cuda" if cfg.scoring.num_gpus_per_actor > 0 else "cpu",
    }


def _write_rejects(scored, lookup_ref, reasons: np.ndarray, path: str) -> None:
    """Stream the rejected rows' records from Ray's object store into rejected.jsonl, in row order: into a
    local temporary file, then to `path` in one upload (an object store takes a file whole)."""
    with tempfile.TemporaryDirectory(prefix="pocl-rejects-") as tmp:
        local = Path(tmp) / REJECTED_FILE
        with local.open("w") as f:
            _stream_rejects(scored, lookup_ref, reasons, f)
        storage.upload_file(local, path, "output.dir")


def _stream_rejects(scored, lookup_ref, reasons: np.ndarray, f) -> None:
    import ray

    bad = reasons != ""
    if bad.any():
        rejects = scored.map_batches(
            _take_rows, fn_kwargs={"lookup_ref": lookup_ref, "mask_ref": ray.put(bad)}, batch_format="pyarrow"
        )
        for row in rejects.select_columns(["row", "id", "record"]).iter_rows():
            r = int(row["row"])
            f.write(
                json.dumps(
                    {"row": r, "id": row["id"], "reason": str(reasons[r]), "record": json.loads(row["record"])},
                    ensure_ascii=False,
                )
                + "\n"
            )


def rows_per_file(cfg: RunConfig, cache_bytes: int = 0) -> int:
    """Rows per written scores file: scoring.rows_per_file, else about 64 MiB of token ids and
    labels (int32) and ``cache_bytes`` of teacher cache per token, at data.max_length."""
    return cfg.scoring.rows_per_file or max(1024, (64 << 20) // ((8 + cache_bytes) * cfg.data.max_length))


# Bytes of one parquet row group with a teacher cache: a reader (`shards.StepReader`) decodes a whole group
# to take rows from it, and a cached row is ~100x a plain one, so the row groups shrink to keep that read
# (and the writer's buffer) to tens of MiB rather than the ~GiB of pyarrow's row-count cap.
CACHE_ROW_GROUP_BYTES = 32 << 20


def cache_row_group_rows(cfg: RunConfig, cache_bytes: int) -> int:
    """Rows per parquet row group of scores with ``cache_bytes`` of teacher cache per token: about
    CACHE_ROW_GROUP_BYTES of token ids, labels and cache at data.max_length (shorter rows make smaller groups)."""
    return max(1, CACHE_ROW_GROUP_BYTES // ((8 + cache_bytes) * cfg.data.max_length))


class _CountingMeasurer(Measurer):
    """A Measurer that adds the rows of each batch it scored to the driver's progress counter."""

    def __init__(self, counter, **measurer_kwargs):
        super().__init__(**measurer_kwargs)
        self.counter = counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        self.counter.add.remote(out.num_rows)
        return out


def measure_dataset(cfg: RunConfig, tokenizer, sources: Sources):
    """Pass 1, materialised: every input row with its metric columns (NaN where rejected) and a uid.

    Input order is kept, so a row's position in the result is its input row number; the uid
    column (unique, not ordered) carries that number into later passes. A JSONL file is read as
    one block, so the rows are re-cut into blocks of one actor call each (batch_size *
    length_window rows): every actor of the pool gets a share, and an "auto" pool grows.
    """
    from ray.data.expressions import monotonically_increasing_id

    sc = cfg.scoring
    use_gpu = sc.num_gpus_per_actor > 0
    window = sc.batch_size * sc.length_window
    source = data_mod.read_ray_dataset(cfg.data.train, cfg.data.format, cfg.data.max_rows)
    data_cfg = data_mod.pinned_row_form(cfg.data.train, cfg.data)  # one row form for every batch
    source.context.execution_options.preserve_order = True
    # The total for the progress line: parquet metadata, or a read of the JSONL without the models.
    with row_progress("score", source.count()) as counter:
        return (
            source.map_batches(
                _prepare, batch_format="pyarrow", fn_kwargs={"tokenizer": tokenizer, "data_cfg": data_cfg}
            )
            .with_column("uid", monotonically_increasing_id())
            .repartition(target_num_rows_per_block=window)
            .map_batches(
                _CountingMeasurer,
                fn_constructor_kwargs={
                    "counter": counter,
                    "models_cfg": cfg.models.model_dump(mode="json"),
                    "sources": to_wire(sources),
                    "metrics": list(sc.metrics),
                    "batch_size": sc.batch_size,
                    "max_new_tokens": sc.max_new_tokens,
                    "max_length": cfg.data.max_length,
                    "use_gpu": use_gpu,
                    "num_threads": max(1, int(sc.num_cpus_per_actor)),
                    "cache_form": teacher_cache.cache_form(sc),
                    "num_gpus": sc.num_gpus_per_actor,
                    "max_memory": sc.max_memory_per_gpu,
                },
                batch_size=window,
                batch_format="pyarrow",
                compute=actor_pool(sc.num_actors),
                **actor_resources(sc.num_cpus_per_actor, sc.num_gpus_per_actor),
            )
            .materialize()
        )


def score_dataset(cfg: RunConfig, sources: Sources | None = None) -> ScoreResult:
    """Score, rank and bucket ``cfg.data.train`` into ``cfg.output.dir``/scores (see module docstring).
    ``sources``: the models as the command's preflight resolved them; None: checked and resolved here."""
    import ray

    start = time.perf_counter()
    sc = cfg.scoring
    sources = preflight.check_inputs(cfg) if sources is None else sources
    tokenizer = check_inputs(cfg, sources)
    directions = difficulty.metric_directions(sc.metrics, sc.directions)
    out_dir = storage.join(cfg.output.dir, "scores")
    scores_path = storage.join(out_dir, SCORES_DIR)
    storage.remove_tree(scores_path, "output.dir")

    # 1. One streaming pass: read, validate + tokenize (tasks), score (actor pool), materialised once.
    scored = measure_dataset(cfg, tokenizer, sources)

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
    _write_rejects(scored, lookup_ref, reasons, storage.join(out_dir, REJECTED_FILE))
    kept = np.flatnonzero(reasons == "")
    rows_scored = len(kept)
    if rows_scored == 0:
        raise ConfigError(
            f"data.train: none of the {rows_in} rows could be scored; reasons in {storage.join(out_dir, REJECTED_FILE)}"
        )

    # 3. Fuse and cut buckets.
    fusion = difficulty.fuse(
        index["id"][kept], {m: index[m][kept].astype(np.float64) for m in sc.metrics}, directions, sc.rrf_k, sc.tie_seed
    )
    buckets = difficulty.rebucket(fusion.rank, cfg.curriculum.num_buckets)
    results: dict[str, np.ndarray] = {}
    for name, values, fill, dtype in (
        ("fused_score", fusion.fused_score, np.nan, np.float64),
        ("rank", fusion.rank, -1, np.int64),
        ("bucket", buckets, -1, np.int32),
    ):
        results[name] = np.full(rows_in, fill, dtype=dtype)
        results[name][kept] = values

    # 4. Join the results to the rows in Ray Data (looked up by row number) and write files of
    # at most `per_file` rows, in rank order unless sort_output is off. One file: joined and
    # sorted in one task (Ray Data's sort adds a map and a reduce task per block, seconds on a
    # small run). More: a range-partitioning sort whose boundaries, the file edges, are known
    # from the ranks (no sampling pass).
    # The teacher cache, when scored, rides along with the metric columns.
    cache = None
    if sc.teacher_top_k is not None or sc.teacher_hidden:
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(local_folder(sources[TEACHER], weights=False)).get_text_config()
        cache = teacher_cache.manifest_entry(sc.teacher_top_k, len(tokenizer), text.hidden_size)
    if sc.teacher_hidden:
        teacher_cache.save_teacher_head(sources[TEACHER], out_dir, len(tokenizer))
    per_file = rows_per_file(cfg, 0 if cache is None else cache["bytes_per_scored_token"])
    kept_columns = list(sc.metrics) + ([] if cache is None else cache["columns"])
    attach = {"lookup_ref": lookup_ref, "results_ref": ray.put(results), "metrics": kept_columns}
    if sc.sort_output and rows_scored <= per_file:
        final = scored.repartition(1).map_batches(
            _attach, fn_kwargs={**attach, "sort": True}, batch_format="pyarrow", batch_size=None
        )
    else:
        final = scored.map_batches(_attach, fn_kwargs=attach, batch_format="pyarrow")
        if sc.sort_output:
            final = final.sort("rank", boundaries=list(range(per_file, rows_scored, per_file)))
    groups = {} if cache is None else {"row_group_size": cache_row_group_rows(cfg, cache["bytes_per_scored_token"])}
    filesystem, inner = storage.resolve(scores_path)
    final.write_parquet(inner, filesystem=filesystem, min_rows_per_file=None if sc.sort_output else per_file, **groups)

    manifest = {
        "rows_in": int(rows_in),
        "rows_scored": rows_scored,
        "rows_rejected": int(rows_in - rows_scored),
        "metrics": [{"name": m, "direction": directions[m]} for m in sc.metrics],
        "rrf_k": sc.rrf_k,
        "num_buckets": cfg.curriculum.num_buckets,
        "buckets": difficulty.bucket_summary(fusion.fused_score, buckets, cfg.curriculum.num_buckets),
        "models": _models_manifest(cfg, sources),
        "config": cfg.model_dump(mode="json"),
        "ray_version": ray.__version__,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "scores_path": SCORES_DIR,
        "sorted_by_rank": sc.sort_output,
        "rows_per_file": per_file,
        "teacher_cache": cache,
    }
    storage.write_text(storage.join(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n", "output.dir")
    return ScoreResult(output_dir=storage.as_path(out_dir), manifest=manifest)


def format_summary(manifest: dict) -> str:
    """A one-screen summary of a scoring run."""
    metrics = ", ".join(f"{m['name']} ({m['direction']} = easier)" for m in manifest["metrics"])
    models = manifest["models"]
    lines = [
        f"scored {manifest['rows_scored']} of {manifest['rows_in']} rows "
        f"({manifest['rows_rejected']} rejected, see {REJECTED_FILE}) in {manifest['wall_seconds']:.1f} s",
        f"metrics: {metrics}; reciprocal rank fusion k = {manifest['rrf_k']:g}",
        f"student: {preflight.describe(models['student'])}; teacher: {preflight.describe(models['teacher'])}",
        f"{manifest['num_buckets']} buckets, easiest first:",
        "  bucket      rows   fused score range",
    ]
    for b in manifest["buckets"]:
        span = "-" if b["rows"] == 0 else f"{b['fused_min']:.6f} .. {b['fused_max']:.6f}"
        lines.append(f"  {b['id']:>6}  {b['rows']:>8}   {span}")
    cache = manifest.get("teacher_cache")
    if cache:
        form = "hidden states (int8) + LM head" if cache.get("form") == "hidden" else f"top {cache['top_k']} + tail"
        lines.append(f"teacher cache: {form}, {cache['bytes_per_scored_token']} bytes per scored token")
    lines.append(
        f"written: {SCORES_DIR}, {MANIFEST_FILE}, {REJECTED_FILE}"
        + (f", {teacher_cache.HEAD_FILE}" if cache and cache.get("form") == "hidden" else "")
    )
    return "\n".join(lines)
