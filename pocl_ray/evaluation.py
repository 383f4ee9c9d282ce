"""Evaluation: sample responses with a model on the eval sets, score ROUGE-L ×100 and response CE.

Shell: Ray Data reads every set, tokenises prompts with the run's template (`data.prepare_batch`),
and streams the rows through an actor pool in which each actor holds one model replica
(`_Evaluator`). Core: `evaluate_rows` (generation + scores for a list of rows, plain torch) and the
aggregation / formatting functions below, all usable without Ray.

Sampling is seeded per row: row r of set s under seed k draws its tokens with the row seed
`seeds.stream_seed(k, s, id_r)` through `sampling.generate_tokens` (one vectorised draw per token for the
whole batch; see pocl_ray/sampling.py), so a row's generation depends neither on the rows it is
batched with nor on the number of actors (up to float rounding differences between padded and
unpadded forward passes). Every (row, seed) pair is one generation row: the pairs are sorted by
prompt length and cut into batches of eval.batch_size, so batches pad little and are full.

Outputs in DIR/eval/<label>/ (DIR/eval/ when label is None):
  results.json      {"model", "label", "sets": {name: {"rougeL_mean", "rougeL_std", "rougeL_per_seed",
                    "ce_mean", "rows", "rows_rejected", "rows_in", "path"}}, "average": {"rougeL_mean",
                    "ce_mean"}, "config": {sampling settings}, "ray_version", "wall_seconds"}
  results.md        the same as a markdown table
  generations.jsonl one line per (row, seed): {"set", "id", "seed", "generation", "rougeL"}
  rejected.jsonl    one line per rejected row: {"set", "id", "reason"}
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from rouge_score.rouge_scorer import RougeScorer

from pocl_ray import preflight, storage
from pocl_ray.config import ConfigError, DataConfig, EvalConfig, RunConfig, is_uri
from pocl_ray.conversations import check_tokenizer, stop_token_ids
from pocl_ray.data import (
    collate,
    duplicate_reasons,
    pinned_row_form,
    prepare_batch,
    read_ray_dataset,
    resolve_source,
)
from pocl_ray.eval_results import format_number, write_results
from pocl_ray.measurers import greedy_responses, response_budgets, response_means, rouge_l_scorer
from pocl_ray.model_source import ModelSource, resolve_model
from pocl_ray.models import (
    TOKENIZER_CONFIG,
    ModelLocation,
    actor_devices,
    check_model_folder,
    has_model_files,
    load_frozen,
    load_tokenizer,
    local_folder,
)
from pocl_ray.preflight import TEACHER, TOKENIZER, Sources, describe
from pocl_ray.progress import progress_line, row_progress
from pocl_ray.ray_session import actor_pool, actor_resources
from pocl_ray.sampling import generate_tokens
from pocl_ray.seeds import stream_seed
from pocl_ray.sharding import in_lockstep

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 10.0  # at most this long between greedy_rouge_sum's progress lines

# One row of the actor's output; fixed so blocks holding only rejected rows still concatenate.
ROW_SCHEMA = pa.schema(
    [
        ("set", pa.string()),
        ("id", pa.string()),
        ("reject_reason", pa.string()),
        ("ce", pa.float64()),
        ("generations", pa.list_(pa.string())),
        ("rougeL", pa.list_(pa.float64())),
    ]
)


@dataclass(frozen=True)
class EvalResult:
    output_dir: str | Path  # a URI when output.dir is one
    results_path: str | Path
    results: dict


# ---------------------------------------------------------------------------------------------
# Scores


def rouge_l(prediction: str, reference: str, scorer: RougeScorer | None = None) -> float:
    """ROUGE-L F1 ×100 of a generation against its reference (rouge-score, stemming on)."""
    scorer = scorer or rouge_l_scorer()
    return 100.0 * scorer.score(reference, prediction)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, eval_cfg: EvalConfig
) -> list[str]:
    """Decoded responses for token-id prompts (one batch, LEFT-padded). seeds: one per row, or
    None for greedy decoding (eval_cfg.temperature == 0). Each row gets eval_cfg.max_new_tokens,
    capped to what its prompt leaves in the model's position range. Only the tokenizer's ids are
    ever emitted (an LM head padded past them has rows no decoding may pick); a response ends at eos or
    at the chat template's end-of-turn token (`conversations.stop_token_ids`), as the dev ROUGE-L's do."""
    budgets = [eval_cfg.max_new_tokens] * len(prompts)
    tokens = generate_tokens(
        model,
        prompts,
        budgets,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        seeds=seeds,
        temperature=eval_cfg.temperature,
        top_p=eval_cfg.top_p,
        vocab_size=len(tokenizer),
    )
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


@torch.no_grad()
def greedy_rouge_sum(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    max_length: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: str | None = None,
    lockstep: bool = False,
) -> float:
    """Sum over `rows` of ROUGE-L ×100 of the model's greedy responses: the dev ROUGE-L of checkpoint
    selection (METHODS.md §5). Rows hold input_ids, num_prompt_tokens and the reference "response"
    (data.validate_and_tokenize rows); each gets min(max_new_tokens, max_length - its prompt) new
    tokens, i.e. at most the response room it had in training, which keeps a selection point cheap.
    Decoded as the student_rougeL difficulty metric is (`measurers.greedy_responses`), in its batches
    (rows sorted by prompt length), one batch per call so that with `progress` (a label) a line
    `[label] rows done/total, rows/s, ETA` is printed every PROGRESS_SECONDS and at the end.
    lockstep (a model sharded over processes, `sharding.shard_model`): every process makes as many
    generate calls as the process with the most batches (`sharding.in_lockstep`; an idle call decodes
    one token after a one-token prompt), since each is a collective."""
    prompts = [r["input_ids"][: r["num_prompt_tokens"]] for r in rows]
    budgets = response_budgets([r["num_prompt_tokens"] for r in rows], max_new_tokens, max_length)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    batches = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    started = shown = time.perf_counter()
    done = 0

    def decode(batch: tuple[list, list]) -> list[str]:
        nonlocal shown, done
        decoded = greedy_responses(model, tokenizer, *batch, batch_size)
        now, done = time.perf_counter(), min(done + len(decoded), len(order))
        if progress and (now - shown >= PROGRESS_SECONDS or done == len(order)):
            print(progress_line(progress, done, len(order), now - started), flush=True)
            shown = now
        return decoded

    jobs = [([prompts[i] for i in batch], [budgets[i] for i in batch]) for batch in batches]
    with autocast():
        if lockstep:
            decoded = in_lockstep(jobs, decode, ([[tokenizer.pad_token_id]], [1]))
        else:
            decoded = [decode(job) for job in jobs]
    texts = [""] * len(rows)
    for batch, batch_texts in zip(batches, decoded):
        for i, text in zip(batch, batch_texts):
            texts[i] = text
    scorer = rouge_l_scorer()
    return float(sum(rouge_l(text.strip(), row["response"], scorer) for row, text in zip(rows, texts)))


@torch.no_grad()
def response_ce(model, rows: Sequence[Mapping[str, Any]], pad_token_id: int, vocab_size: int) -> list[float]:
    """Per row: mean teacher-forced cross-entropy (nats/token) on the reference response tokens,
    computed for the whole batch at once (one read-back); over the tokenizer's `vocab_size` tokens
    (the rows of a padded LM head past them are no token)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab_size]
    return response_means(batch["labels"], student_logits=logits)["student_ce"].tolist()


def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate_rows(
    model, tokenizer, rows: Sequence[Mapping[str, Any]], eval_cfg: EvalConfig, scorer: RougeScorer | None = None
) -> list[dict]:
    """Generation, ROUGE-L per seed and response CE for prepared rows (data.prepare_batch columns
    plus "set"); one output row per input row in input order (ROW_SCHEMA). Rejected rows pass
    through with their reason and no scores. Batches of eval_cfg.batch_size: rows sorted by length
    for the CE, (row, seed) pairs sorted by prompt length for generation."""
    scorer = scorer or rouge_l_scorer()
    out = [
        {
            "set": r["set"],
            "id": r["id"],
            "reject_reason": r["reject_reason"] or None,
            "ce": None,
            "generations": [],
            "rougeL": [],
        }
        for r in rows
    ]
    good = [i for i, r in enumerate(rows) if not r["reject_reason"]]
    for chunk in _batches(sorted(good, key=lambda i: len(rows[i]["input_ids"])), eval_cfg.batch_size):
        for i, ce in zip(chunk, response_ce(model, [rows[i] for i in chunk], tokenizer.pad_token_id, len(tokenizer))):
            out[i]["ce"] = ce
    # Greedy decoding ignores the seed: decode once and repeat it for every seed.
    greedy = eval_cfg.temperature == 0
    seeds = [None] if greedy else list(eval_cfg.seeds)
    pairs = sorted(((i, k) for i in good for k in range(len(seeds))), key=lambda p: rows[p[0]]["num_prompt_tokens"])
    scores: dict[tuple[int, int], tuple[str, float]] = {}
    for chunk in _batches(pairs, eval_cfg.batch_size):
        prompts = [rows[i]["input_ids"][: rows[i]["num_prompt_tokens"]] for i, _ in chunk]
        row_seeds = None if greedy else [stream_seed(seeds[k], rows[i]["set"], rows[i]["id"]) for i, k in chunk]
        for (i, k), text in zip(chunk, generate(model, tokenizer, prompts, row_seeds, eval_cfg)):
            scores[i, k] = (text, rouge_l(text, rows[i]["response"], scorer))
    for i in good:
        for k in range(len(eval_cfg.seeds)):
            text, score = scores[i, 0 if greedy else k]
            out[i]["generations"].append(text)
            out[i]["rougeL"].append(score)
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation and formatting


def summarize(
    rows: Sequence[Mapping[str, Any]], set_names: Sequence[str], seeds: Sequence[int]
) -> tuple[dict, list[dict], list[Mapping[str, Any]]]:
    """(per-set summaries, rejected rows, scored rows) from evaluate_rows output in input order.

    A set's ROUGE-L per seed is the mean over its rows; rougeL_mean / rougeL_std are the mean and
    population std of those per-seed means; ce_mean is the mean of the per-row CEs. The second and
    later rows with an already seen id in a set are rejected as duplicates (they would repeat the
    first one's samples).
    """
    sets: dict[str, dict] = {}
    rejected: list[dict] = []
    scored: list[Mapping[str, Any]] = []
    for name in set_names:
        members = [r for r in rows if r["set"] == name]
        dup = duplicate_reasons([r["id"] for r in members], skip=[bool(r["reject_reason"]) for r in members])
        good = []
        for r, dup_reason in zip(members, dup):
            reason = r["reject_reason"] or dup_reason
            if reason:
                rejected.append({"set": name, "id": r["id"], "reason": reason})
            else:
                good.append(r)
        per_seed = {str(s): statistics.fmean(r["rougeL"][k] for r in good) for k, s in enumerate(seeds)} if good else {}
        sets[name] = {
            "rougeL_mean": statistics.fmean(per_seed.values()) if good else None,
            "rougeL_std": statistics.pstdev(per_seed.values()) if good else None,
            "rougeL_per_seed": per_seed,
            "ce_mean": statistics.fmean(r["ce"] for r in good) if good else None,
            "rows": len(good),
            "rows_rejected": len(members) - len(good),
            "rows_in": len(members),
        }
        scored.extend(good)
    return sets, rejected, scored


def average(sets: Mapping[str, Mapping[str, Any]]) -> dict:
    """Unweighted mean over the sets that have scores (the paper's average over eval sets)."""
    out = {}
    for key in ("rougeL_mean", "ce_mean"):
        values = [s[key] for s in sets.values() if s[key] is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def eval_dir(output_dir: str | Path, label: str | None) -> str | Path:
    base = storage.join(output_dir, "eval")
    return storage.as_path(storage.join(base, label) if label else base)


# ---------------------------------------------------------------------------------------------
# Ray shell


def _prepare(batch: dict, tokenizer, data_cfg, set_name: str) -> pa.Table:
    out = prepare_batch(batch, tokenizer, data_cfg)
    out["set"] = [set_name] * len(out["id"])
    return pa.Table.from_pydict(
        out,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("prompt", pa.string()),
                ("response", pa.string()),
                ("input_ids", pa.list_(pa.int64())),
                ("attention_mask", pa.list_(pa.int64())),
                ("labels", pa.list_(pa.int64())),
                ("num_prompt_tokens", pa.int64()),
                ("num_response_tokens", pa.int64()),
                ("reject_reason", pa.string()),
                ("set", pa.string()),
            ]
        ),
    )


class _Evaluator:
    """Ray Data actor: one model replica, evaluate_rows over each batch it is handed."""

    def __init__(
        self, model_path: ModelLocation, tokenizer_path: ModelLocation, dtype: str, eval_cfg: EvalConfig, counter=None
    ):
        device = "cuda" if eval_cfg.num_gpus_per_actor > 0 else "cpu"
        self.counter = counter  # a progress.RowCounter: rows done, for the driver's progress line
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.model = load_frozen(  # N > 1 GPUs: split over them
            model_path,
            dtype=dtype,
            device=device,
            devices=actor_devices(eval_cfg.num_gpus_per_actor),
            max_memory=eval_cfg.max_memory_per_gpu,
        )
        self.eval_cfg = eval_cfg
        self.scorer = rouge_l_scorer()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = evaluate_rows(self.model, self.tokenizer, batch.to_pylist(), self.eval_cfg, self.scorer)
        if self.counter is not None:
            self.counter.add.remote(batch.num_rows)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _check_inputs(cfg: RunConfig, model: ModelLocation, sources: Sources) -> ModelLocation:
    """Fail before any Ray work on a bad model or eval set; returns where the tokenizer is: the model's
    own, else the run's (models.tokenizer or the teacher's, as `sources` resolved it)."""
    if not cfg.eval.sets:
        raise ConfigError("eval.sets is empty: list at least one {name, path} to evaluate on")
    names = [s.name for s in cfg.eval.sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"eval.sets: duplicate set names {dup}")
    if not cfg.eval.seeds:
        raise ConfigError("eval.seeds is empty: list at least one seed")
    for i, s in enumerate(cfg.eval.sets):
        try:
            resolve_source(s.path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"eval.sets[{i}].path (set {s.name!r}): {err}") from None
        except ValueError as err:
            raise ConfigError(f"eval.sets[{i}].path (set {s.name!r}): {err}") from None
    model_dir = check_model_folder(local_folder(model, weights=False), "model_path")
    if has_model_files(model_dir, (TOKENIZER_CONFIG,)):
        return model
    fallback = sources[TOKENIZER]
    if not has_model_files(local_folder(fallback, weights=False), (TOKENIZER_CONFIG,)):
        field = TOKENIZER if cfg.models.tokenizer else TEACHER
        raise FileNotFoundError(
            f"no tokenizer in model_path {model_dir} nor in {field} ({describe(fallback.record())})"
        )
    return fallback


def set_data_configs(cfg: RunConfig, tokenizer) -> list[DataConfig]:
    """Per eval set, the data settings its rows are prepared with: cfg.data with the set's row form decided
    once for the whole set (`data.pinned_row_form`, so every Ray Data batch of it reads its rows one way)
    and, for a conversation, the CE taken on the last assistant turn, the one generated and scored. A
    conversation set with a tokenizer that cannot render it (no chat template) fails here, before Ray."""
    base = cfg.data.model_copy(update={"train_on": "last_assistant"})
    configs = []
    for i, s in enumerate(cfg.eval.sets):
        data_cfg = pinned_row_form(s.path, base, "auto")
        if data_cfg.row_form == "conversation":
            try:
                check_tokenizer(tokenizer)
            except ValueError as err:
                raise ConfigError(f"eval.sets[{i}] (set {s.name!r}): {err}") from None
        configs.append(data_cfg)
    return configs


def _generate_and_score(
    ds, window: int, ecfg: EvalConfig, cfg: RunConfig, model: ModelLocation, tokenizer: ModelLocation, counter
) -> list[pa.Table]:
    """The evaluation actors over the prepared rows, in input order."""
    # A JSONL set is read as one block: blocks of one actor call each give every actor a share.
    ds = ds.repartition(target_num_rows_per_block=window).map_batches(
        _Evaluator,
        batch_size=window,
        batch_format="pyarrow",
        compute=actor_pool(ecfg.num_actors),
        **actor_resources(ecfg.num_cpus_per_actor, ecfg.num_gpus_per_actor),
        fn_constructor_kwargs={
            "model_path": model,
            "tokenizer_path": tokenizer,
            "dtype": cfg.models.dtype,
            "eval_cfg": ecfg,
            "counter": counter,
        },
    )
    # Input order in, input order out: duplicate-id detection keeps the first occurrence.
    ds.context.execution_options.preserve_order = True
    return list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def evaluate(
    cfg: RunConfig,
    model_path: ModelLocation,
    output_dir: str | Path | None = None,
    label: str | None = "student",
    sources: Sources | None = None,
) -> EvalResult:
    """Evaluate the model in `model_path` (a local folder, an object-storage URI, or a ModelSource the
    driver resolved: the teacher) on cfg.eval.sets; write DIR/eval/<label>/ (see module doc). `sources`:
    the run's models as the command's preflight resolved them (the tokenizer fallback); None: resolved here.

    DIR is `output_dir`, default cfg.output.dir. Each set's format is detected from its path
    (data.format is for the training data), and its row form (instruction or conversation) from its
    columns, once per set, unless data.row_form fixes it (`set_data_configs`). Prompts use the run's
    template and lengths (cfg.data); a conversation is scored on its last assistant turn, the one
    generated (CE included). Rows the data layer rejects (and duplicate ids) are counted per set in
    results.json and listed in rejected.jsonl.
    """
    import ray
    import ray.data

    started = time.time()
    # A student in object storage (an output.dir URI's train/student) is pinned here, copied to each actor's node.
    model = (
        model_path
        if isinstance(model_path, ModelSource)
        else resolve_model(str(model_path), "model_path")
        if is_uri(model_path)
        else Path(model_path)
    )
    sources = preflight.model_sources(cfg) if sources is None else sources
    tokenizer_path = _check_inputs(cfg, model, sources)
    directory = eval_dir(output_dir or cfg.output.dir, label)
    tokenizer = load_tokenizer(tokenizer_path)
    ecfg = cfg.eval
    set_cfgs = set_data_configs(cfg, tokenizer)

    parts = []
    for s, data_cfg in zip(ecfg.sets, set_cfgs):
        ds = read_ray_dataset(s.path, "auto", s.max_rows)
        parts.append(
            ds.map_batches(
                _prepare,
                batch_format="numpy",
                fn_kwargs={"tokenizer": tokenizer, "data_cfg": data_cfg, "set_name": s.name},
            )
        )
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Input order in, input order out: duplicate-id detection keeps the first occurrence.
    ds.context.execution_options.preserve_order = True
    # Read and prepared once: the progress line's total is then the materialised count, not a second pass.
    ds = ds.materialize()
    window = ecfg.batch_size * ecfg.length_sort_batches
    with row_progress("eval", ds.count()) as counter:
        tables = _generate_and_score(ds, window, ecfg, cfg, model, tokenizer_path, counter)
    rows = pa.concat_tables(tables).to_pylist() if tables else []

    sets, rejected, scored = summarize(rows, [s.name for s in ecfg.sets], ecfg.seeds)
    for s in ecfg.sets:
        sets[s.name]["path"] = s.path if isinstance(s.path, str) else s.path.model_dump()
    results = {
        "model": model.record() if isinstance(model, ModelSource) else str(model),
        "label": label,
        "sets": sets,
        "average": average(sets),
        "config": {
            "seeds": list(ecfg.seeds),
            "temperature": ecfg.temperature,
            "top_p": ecfg.top_p,
            "max_new_tokens": ecfg.max_new_tokens,
            "batch_size": ecfg.batch_size,
            "num_actors": ecfg.num_actors,
            "template": cfg.data.template,
            "max_prompt_length": cfg.data.max_prompt_length,
            "max_length": cfg.data.max_length,
            "dtype": cfg.models.dtype,
        },
        "ray_version": ray.__version__,
        "wall_seconds": time.time() - started,
    }
    generations = [
        {"set": r["set"], "id": r["id"], "seed": seed, "generation": text, "rougeL": score}
        for r in scored
        for seed, text, score in zip(ecfg.seeds, r["generations"], r["rougeL"])
    ]
    path = write_results(results, directory, generations, rejected)
    for name, s in sets.items():
        log.info(
            "eval %s: ROUGE-L %s ± %s, CE %s, %d rows, %d rejected",
            name,
            format_number(s["rougeL_mean"]),
            format_number(s["rougeL_std"]),
            format_number(s["ce_mean"], 3),
            s["rows"],
            s["rows_rejected"],
        )
    return EvalResult(output_dir=directory, results_path=path, results=results)
