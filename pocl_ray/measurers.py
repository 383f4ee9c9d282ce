"""Difficulty measurers: plain torch over batches of tokenized rows, and the Ray Data actor that
runs them (`Measurer`, models loaded once per actor). The benchmark's bare loop and the tests call
`measure` directly, without Ray.

Metrics (METHODS.md §1): student_ce, teacher_ce (mean response cross-entropy), teacher_student_kl
(KL(teacher || student) at T = 1 on the reference response), student_rougeL (ROUGE-L F1, stemmed,
of the initial student's greedy response) and length (response tokens). Rows are batched by
similar length to avoid padding waste; each batch's per-row metrics are computed together on the
device and read back once (`response_means`). With a teacher cache (scoring.teacher_top_k or
scoring.teacher_hidden) the same teacher forward also gives each row's cache (`teacher_cache.py`,
METHODS.md §4). ``cache_form`` below is that setting: K for the top-K form, "hidden" for the hidden one.

The greedy response of a row gets up to its response budget, data.max_length minus its prompt,
so difficulty does not mostly measure the truncation of long references; scoring.max_new_tokens,
when set, caps it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedModel

from pocl_ray import data as data_mod
from pocl_ray import teacher_cache
from pocl_ray.config import ModelsConfig
from pocl_ray.conversations import stop_token_ids
from pocl_ray.model_source import ModelSource
from pocl_ray.preflight import STUDENT, TEACHER, TOKENIZER, from_wire
from pocl_ray.sampling import generate_tokens

TEACHER_METRICS = frozenset({"teacher_ce", "teacher_student_kl"})
STUDENT_METRICS = frozenset({"student_ce", "student_rougeL", "teacher_student_kl"})
_FORWARD_METRICS = frozenset({"student_ce", "teacher_ce", "teacher_student_kl"})

# Columns of the prepared (validated, tokenized) rows; attention_mask is dropped (always all ones).
MEASURER_INPUT = ["id", "input_ids", "labels", "num_prompt_tokens", "num_response_tokens", "response"]


@dataclass
class MeasurerModels:
    """The models a set of metrics needs, loaded once per actor."""

    tokenizer: Any  # len(tokenizer): the tokens every distribution and decoding covers (a head may be padded)
    student: PreTrainedModel | None
    teacher: PreTrainedModel | None
    device: torch.device
    rouge: Any


def rouge_l_scorer():
    """rouge-score's ROUGE-L scorer with its default tokenizer, stemming on: the one ROUGE-L of the
    project (difficulty, checkpoint selection, evaluation). The tokenizer is passed in because, left
    to RougeScorer, it logs "Using default tokenizer." at every construction, in every worker."""
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import DefaultTokenizer

    return RougeScorer(["rougeL"], tokenizer=DefaultTokenizer(use_stemmer=True))


def load_measurer_models(
    models_cfg: ModelsConfig,
    metrics: Sequence[str],
    device: str | torch.device,
    cache_form: int | str | None = None,
    sources: Mapping[str, ModelSource] | None = None,
    devices: Sequence[int | str] | None = None,
    max_memory: int | None = None,
) -> MeasurerModels:
    """Tokenizer, initial student and teacher as the metrics need them, frozen, on ``device`` (or, with
    ``devices``, each split over them, at most ``max_memory`` bytes of weights on each: `models.load_frozen`).

    The initial student is ``models.student`` when set, else cut from the teacher
    (``student_layers`` / ``student_keep_every``); the teacher is kept only for teacher metrics or
    a teacher cache (``cache_form``).
    dtype "auto" = bf16 on GPU, fp32 on CPU (``models.resolve_dtype``). ``sources``: the models as the
    driver resolved them (preflight.py); None: models_cfg's values are local folders.
    """
    from pocl_ray.models import check_head_rows, load_frozen, load_tokenizer, student_from_teacher

    local = {TEACHER: models_cfg.teacher, STUDENT: models_cfg.student, TOKENIZER: models_cfg.tokenizer}
    where = dict(sources) if sources is not None else {k: v or models_cfg.teacher for k, v in local.items()}
    device = torch.device(device)
    tokenizer = load_tokenizer(where[TOKENIZER])
    need_teacher = (
        bool(TEACHER_METRICS & set(metrics))
        or cache_form is not None
        or (bool(STUDENT_METRICS & set(metrics)) and models_cfg.student is None)
    )
    load = partial(load_frozen, dtype=models_cfg.dtype, device=device, devices=devices, max_memory=max_memory)
    teacher = load(where[TEACHER]) if need_teacher else None
    student = None
    if STUDENT_METRICS & set(metrics):
        if models_cfg.student is not None:
            student = load(where[STUDENT])
        else:  # a split teacher's cut keeps each of its layers on the teacher's device for it
            assert teacher is not None  # need_teacher: student metrics without models.student
            student = student_from_teacher(
                teacher, keep_layers=models_cfg.student_layers, keep_every=models_cfg.student_keep_every
            )
            student.eval().requires_grad_(False)
    if not TEACHER_METRICS & set(metrics) and cache_form is None:
        teacher = None
    for name, model in (("teacher", teacher), ("student", student)):
        if model is not None:
            check_head_rows(model, len(tokenizer), name)
    rouge = rouge_l_scorer() if "student_rougeL" in metrics else None
    return MeasurerModels(tokenizer=tokenizer, student=student, teacher=teacher, device=device, rouge=rouge)


def _chunks(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row positions sorted by length and cut into batches of similar lengths (little padding)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def response_means(
    labels: torch.Tensor,
    *,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    chunk_positions: int = 2048,
) -> dict[str, torch.Tensor]:
    """Per-row means over each row's scored positions (`data.predicted_labels`),
    float32 on the logits' device: "student_ce" / "teacher_ce" for the logits given, and
    "teacher_student_kl" = KL(teacher || student) at T = 1 when both are.

    Only the scored positions are gathered and cast to fp32, `chunk_positions` at a time, so the
    memory stays that of a chunk, not of the (rows, seq, vocab) logits in fp32.
    """
    targets = data_mod.predicted_labels(labels)
    rows, cols = (targets != data_mod.IGNORE_INDEX).nonzero(as_tuple=True)
    device = labels.device
    names = ([] if student_logits is None else ["student_ce"]) + ([] if teacher_logits is None else ["teacher_ce"])
    if student_logits is not None and teacher_logits is not None:
        names.append("teacher_student_kl")
    sums = {n: torch.zeros(labels.shape[0], dtype=torch.float32, device=device) for n in names}
    for start in range(0, rows.numel(), chunk_positions):
        r, c = rows[start : start + chunk_positions], cols[start : start + chunk_positions]
        target = targets[r, c][:, None]
        logq = None if student_logits is None else torch.log_softmax(student_logits[r, c].float(), dim=-1)
        logp = None if teacher_logits is None else torch.log_softmax(teacher_logits[r, c].float(), dim=-1)
        if logq is not None:
            sums["student_ce"].index_add_(0, r, -logq.gather(-1, target).squeeze(-1))
        if logp is not None:
            sums["teacher_ce"].index_add_(0, r, -logp.gather(-1, target).squeeze(-1))
        if logq is not None and logp is not None:
            sums["teacher_student_kl"].index_add_(0, r, (logp.exp() * (logp - logq)).sum(-1))
    counts = torch.bincount(rows, minlength=labels.shape[0]).float()
    return {n: v / counts for n, v in sums.items()}


def _forward_metrics(
    models: MeasurerModels,
    rows: Mapping[str, Sequence],
    metrics: set[str],
    batch_size: int,
    cache_form: int | str | None = None,
) -> tuple[dict[str, np.ndarray], list | None]:
    """The forward metrics of each row and, with ``cache_form``, each row's teacher cache from the
    same teacher forward. Every distribution is over the tokenizer's tokens (a padded head's extra
    rows cut off, on both sides)."""
    n = len(rows["input_ids"])
    vocab = len(models.tokenizer)
    wanted = sorted(metrics & _FORWARD_METRICS)
    out = {m: np.full(n, np.nan) for m in wanted}
    caches: list | None = None if cache_form is None else [None] * n
    lengths = np.array([len(x) for x in rows["input_ids"]])
    pad_id = models.tokenizer.pad_token_id
    for idx in _chunks(lengths, batch_size):
        batch = data_mod.collate(
            {
                "input_ids": [rows["input_ids"][i] for i in idx],
                "attention_mask": [np.ones(lengths[i], np.int64) for i in idx],
                "labels": [rows["labels"][i] for i in idx],
            },
            pad_id,
        )
        batch = {k: v.to(models.device) for k, v in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_logits = None
        if metrics & {"student_ce", "teacher_student_kl"}:
            assert models.student is not None  # load_measurer_models: student metrics load the student
            s_logits = models.student(**inputs).logits[..., :vocab]
        t_logits, t_hidden = (
            (None, None)
            if models.teacher is None
            else teacher_cache.teacher_forward(
                models.teacher,
                inputs,
                cache_form,
                bool(metrics & TEACHER_METRICS) or isinstance(cache_form, int),
                vocab,
            )
        )
        if wanted:
            means = response_means(batch["labels"], student_logits=s_logits, teacher_logits=t_logits)
            values = torch.stack([means[m] for m in wanted]).cpu().numpy()
            for m, v in zip(wanted, values):
                out[m][idx] = v
        if caches is not None:
            assert models.teacher is not None and cache_form is not None  # a cache form keeps the teacher
            ids = [rows["id"][i] for i in idx]
            for i, cache in zip(
                idx, teacher_cache.batch_caches(batch["labels"], t_logits, t_hidden, cache_form, vocab, ids)
            ):
                caches[i] = cache
    return out, caches


def response_budgets(num_prompt_tokens: Sequence[int], max_new_tokens: int | None, max_length: int | None) -> list[int]:
    """New tokens per row for the greedy response: max_length minus the prompt (at least 1),
    capped by max_new_tokens when set; max_new_tokens alone when max_length is None."""
    if max_length is None:
        if max_new_tokens is None:
            raise ValueError("the greedy response length needs scoring.max_new_tokens or data.max_length")
        return [max_new_tokens] * len(num_prompt_tokens)
    rooms = [max(1, max_length - int(p)) for p in num_prompt_tokens]
    return rooms if max_new_tokens is None else [min(room, max_new_tokens) for room in rooms]


def greedy_responses(
    model, tok, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], batch_size: int
) -> list[str]:
    """`model`'s greedy continuation of each prompt (at most max_new_tokens[i] tokens for prompt i),
    decoded by `tok` without special tokens; batches of similar prompt length. The student_rougeL
    metric and training's checkpoint selection (`evaluation.greedy_rouge_sum`) both decode with it:
    never a padding id of the head (ids >= len(tok)), and a turn ends at eos or at the chat template's
    end-of-turn token (`conversations.stop_token_ids`)."""
    texts = [""] * len(prompts)
    for idx in _chunks(np.array([len(p) for p in prompts]), batch_size):
        tokens = generate_tokens(
            model,
            [prompts[i] for i in idx],
            [int(max_new_tokens[i]) for i in idx],
            pad_token_id=tok.pad_token_id,
            eos_token_id=stop_token_ids(tok),
            vocab_size=len(tok),
        )
        for i, text in zip(idx, tok.batch_decode(tokens, skip_special_tokens=True)):
            texts[i] = text
    return texts


def measure(
    models: MeasurerModels,
    rows: Mapping[str, Sequence],
    metrics: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int | None,
    max_length: int | None = None,
    cache_form: int | str | None = None,
) -> dict[str, np.ndarray | list]:
    """Every requested metric for each row (float64 arrays aligned with the rows).

    ``rows`` holds input_ids, labels (-100 on the prompt), num_prompt_tokens, num_response_tokens and
    the reference ``response`` text. CE and KL are means over the row's response tokens; KL is
    KL(teacher || student) at temperature 1; student_rougeL is the ROUGE-L F1 (stemmed) of the
    student's greedy response against the reference, the response given
    `response_budgets(num_prompt_tokens, max_new_tokens, max_length)` new tokens; length counts
    response tokens. With ``cache_form`` (``rows`` then also holds the row ``id``, which fixes the tail
    draws) the result also holds "teacher_cache": per row, the arrays of `teacher_cache.batch_caches`,
    from the teacher forward that gives teacher_ce.
    """
    wanted = set(metrics)
    out: dict[str, np.ndarray] = {}
    caches = None
    with torch.inference_mode():
        if wanted & _FORWARD_METRICS or cache_form is not None:
            values, caches = _forward_metrics(models, rows, wanted, batch_size, cache_form)
            out.update(values)
        if "student_rougeL" in wanted:
            prompts = [ids[: int(p)] for ids, p in zip(rows["input_ids"], rows["num_prompt_tokens"])]
            budgets = response_budgets(rows["num_prompt_tokens"], max_new_tokens, max_length)
            generated = greedy_responses(models.student, models.tokenizer, prompts, budgets, batch_size)
            out["student_rougeL"] = np.array(
                [models.rouge.score(ref, gen)["rougeL"].fmeasure for ref, gen in zip(rows["response"], generated)],
                dtype=np.float64,
            )
    if "length" in wanted:
        out["length"] = np.asarray(rows["num_response_tokens"], dtype=np.float64)
    return {m: out[m] for m in metrics} | ({} if caches is None else {"teacher_cache": caches})


class Measurer:
    """Ray Data actor: loads the measurer models once, then adds the metric columns to batches of
    prepared rows (NaN on rows the data layer rejected, which pass through unscored)."""

    def __init__(
        self,
        models_cfg: dict,
        metrics: list[str],
        batch_size: int,
        max_new_tokens: int | None,
        use_gpu: bool,
        num_threads: int,
        max_length: int | None = None,
        cache_form: int | str | None = None,
        sources: dict[str, dict] | None = None,
        num_gpus: float = 0.0,
        max_memory: int | None = None,
    ):
        from pocl_ray.models import actor_devices

        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("scoring.num_gpus_per_actor > 0 but this actor sees no CUDA device")
        if "student_rougeL" in metrics:
            response_budgets([0], max_new_tokens, max_length)  # fail before loading models, not on the first batch
        if not use_gpu:
            torch.set_num_threads(num_threads)
        self.models = load_measurer_models(
            ModelsConfig(**models_cfg),
            metrics,
            "cuda" if use_gpu else "cpu",
            cache_form,
            None if sources is None else from_wire(sources),
            devices=actor_devices(num_gpus),  # N > 1 GPUs: each model split over them
            max_memory=max_memory,
        )
        self.cache_form = cache_form
        self.metrics = metrics
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = np.flatnonzero(batch.column("reject_reason").to_numpy(zero_copy_only=False) == "")
        columns = {m: np.full(batch.num_rows, np.nan) for m in self.metrics}
        caches: list = [None] * batch.num_rows
        if len(valid):
            rows = batch.select(MEASURER_INPUT).take(pa.array(valid))
            scores = measure(
                self.models,
                {c: rows.column(c).to_numpy(zero_copy_only=False) for c in MEASURER_INPUT},
                self.metrics,
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,
                max_length=self.max_length,
                cache_form=self.cache_form,
            )
            for m in self.metrics:
                columns[m][valid] = scores[m]
            for i, cache in zip(valid, scores.get("teacher_cache", ())):
                caches[i] = cache
        for m in self.metrics:
            batch = batch.append_column(m, pa.array(columns[m]))
        if self.cache_form is not None:
            assert self.models.teacher is not None  # load_measurer_models keeps it for a cache form
            config = self.models.teacher.config.get_text_config()
            k = None if self.cache_form == "hidden" else int(self.cache_form)
            vocab = len(self.models.tokenizer)
            for name, column in teacher_cache.arrow_columns(caches, k, vocab, config.hidden_size).items():
                batch = batch.append_column(name, column)
        return batch
