"""Difficulty measurers: plain torch over batches of tokenized rows, and the Ray Data actor that
runs them (`Measurer`, models loaded once per actor). The benchmark's bare loop and the tests call
`measure` directly, without Ray.

Metrics (METHODS.md §1): student_ce, teacher_ce (mean response cross-entropy), teacher_student_kl
(KL(teacher || student) at T = 1 on the reference response), student_rougeL (ROUGE-L F1, stemmed,
of the initial student's greedy response) and length (response tokens). Rows are batched by
similar length to avoid padding waste.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pocl_ray import data as data_mod
from pocl_ray.config import ModelsConfig
from pocl_ray.losses import cross_entropy, kd_loss

TEACHER_METRICS = frozenset({"teacher_ce", "teacher_student_kl"})
STUDENT_METRICS = frozenset({"student_ce", "student_rougeL", "teacher_student_kl"})
_FORWARD_METRICS = frozenset({"student_ce", "teacher_ce", "teacher_student_kl"})

# Columns of the prepared (validated, tokenized) rows; attention_mask is dropped (always all ones).
MEASURER_INPUT = ["input_ids", "labels", "num_prompt_tokens", "num_response_tokens", "response"]


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
            rows = batch.select(MEASURER_INPUT).take(pa.array(valid))
            scores = measure(
                self.models, {c: rows.column(c).to_numpy(zero_copy_only=False) for c in MEASURER_INPUT},
                self.metrics, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            )
            for m in self.metrics:
                columns[m][valid] = scores[m]
        for m in self.metrics:
            batch = batch.append_column(m, pa.array(columns[m]))
        return batch
