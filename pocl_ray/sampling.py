"""Row-seeded generation shared by evaluation, the difficulty measurers and on-policy KD (pure torch
plus Hugging Face `generate`).

Batch invariance: row r's k-th new token is drawn by inverse-CDF sampling with the uniform
`row_uniforms(seed_r)[k]`, a counter-based hash (splitmix64) of the row's seed and k. Nothing else
enters the draw, so a row's tokens depend on its prompt, seed, temperature and top-p only, not on
batch size, batch composition or the number of actors (up to the float rounding differences
between padded and unpadded forward passes). All rows' uniforms for a generation are hashed once
on the host (numpy, exact uint64 wrap-around, identical on every device) and moved to the device
once; each step is then one vectorised draw for the whole batch (softmax, cumulative sum,
searchsorted), with no per-row generator.

HF `generate` has no per-row random stream, so the draw runs in a logits processor
(`RowSeededSampler`) that leaves 0 on the drawn token and -inf elsewhere, and `generate` runs in
greedy mode, which picks it. Greedy decoding (seeds None) is plain HF greedy.

Each row has its own budget of new tokens; a `StoppingCriteria` marks a row finished once it has
spent it, so the batch stops when every row has hit EOS or its budget. HF keeps finished rows in
the batch (they emit padding) — the generation API has no way to drop them from the KV cache.

Padded vocabularies: an LM head may have more rows than the tokenizer has tokens (Qwen2.5-7B: 152,064
for 151,665 tokens). Given `vocab_size` (len(tokenizer)), every decoding, greedy or sampled, masks
the ids >= vocab_size (`VocabularyMask`), so no model ever emits a padding id.

Static KV cache / torch.compile: `generate_tokens(cache_implementation="static")` turns on HF's
static cache, with which HF compiles the decoding step on CUDA. Off by default: not measured on a
GPU yet (`benchmarks/generation.py --static-cache` measures it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from pocl_ray.data import IGNORE_INDEX, generation_batch
from pocl_ray.seeds import stream_seed

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function (uint64 arithmetic wraps around)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def row_uniforms(seeds: Sequence[int], num_steps: int) -> torch.Tensor:
    """float32 (rows, num_steps) in [0, 1): entry [r, k] is a hash of (seeds[r], k) alone — the
    k-th output of a splitmix64 stream keyed by the (mixed) seed, 24 bits so float32 holds it exactly."""
    keys = _mix64(np.asarray([int(s) & (2**64 - 1) for s in seeds], dtype=np.uint64))
    counters = np.arange(1, num_steps + 1, dtype=np.uint64) * _GAMMA
    bits = _mix64(keys[:, None] + counters[None, :]) >> np.uint64(40)
    return torch.from_numpy(bits.astype(np.float32) * np.float32(2.0**-24))


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of (rows, vocab) logits, by inverse CDF with that row's uniform.

    Token i has probability softmax(logits / temperature)_i; with top_p < 1 only the smallest
    prefix of tokens, most likely first, whose mass reaches top_p is kept (HF's top-p set) and
    renormalised. Ties in probability are ordered by token id (stable sort), so the draw is a
    function of the row alone.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cdf = probs.cumsum(dim=-1)
    if order is None:
        last = torch.full_like(cdf[:, :1], cdf.shape[-1] - 1, dtype=torch.long)
    else:
        # A token is kept while the mass before it is below top_p: a prefix, never empty.
        last = ((cdf - probs) < top_p).sum(dim=-1, keepdim=True) - 1
    total = cdf.gather(-1, last)
    # u < 1, but u * total may round up to total; stay strictly below it so the pick is in range.
    target = torch.minimum(
        uniforms.to(cdf.device, torch.float32)[:, None] * total, total.nextafter(torch.zeros_like(total))
    )
    # right=True: the first token whose CDF exceeds the target, so zero-probability tokens are never picked.
    pick = torch.minimum(torch.searchsorted(cdf, target, right=True), last)
    return (pick if order is None else order.gather(-1, pick)).squeeze(-1)


class RowSeededSampler(LogitsProcessor):
    """Draws every row's next token in one vectorised step (`sample_tokens`) and overwrites the
    scores with 0 at the drawn token and -inf elsewhere, so greedy decoding takes it.

    seeds: one per row; prompt_width: the padded prompt width, so the step index is
    input_ids.shape[1] - prompt_width whatever the processor saw before; num_steps: uniforms are
    hashed for that many steps up front.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, prompt_width: int, num_steps: int):
        if temperature <= 0:
            raise ValueError(f"RowSeededSampler needs temperature > 0, got {temperature}; use greedy decoding for 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        self.uniforms = row_uniforms(seeds, num_steps)
        self.temperature = temperature
        self.top_p = top_p
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.uniforms.shape[0]:
            raise ValueError(
                f"RowSeededSampler has {self.uniforms.shape[0]} seeds for a batch of {scores.shape[0]} rows"
            )
        if self.uniforms.device != scores.device:
            self.uniforms = self.uniforms.to(scores.device)
        step = input_ids.shape[1] - self.prompt_width
        picks = sample_tokens(scores, self.uniforms[:, step], self.temperature, self.top_p)
        # HF hands processors a float32 copy of the logits, so overwriting it in place is safe.
        return scores.fill_(float("-inf")).scatter_(1, picks[:, None], 0.0)


class VocabularyMask(LogitsProcessor):
    """-inf on the ids >= vocab_size: the padding rows of an LM head larger than the tokenizer."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size :] = float("-inf")
        return scores


class RowBudget(StoppingCriteria):
    """Marks row r finished once it has generated budgets[r] new tokens."""

    def __init__(self, budgets: Sequence[int], prompt_width: int):
        self.budgets = torch.as_tensor(list(budgets), dtype=torch.long)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.budgets.device != input_ids.device:
            self.budgets = self.budgets.to(input_ids.device)
        return cast(torch.BoolTensor, self.budgets <= input_ids.shape[1] - self.prompt_width)


def _position_room(model, prompt_width: int) -> int | None:
    """New tokens that fit the model's position range after a prompt of prompt_width (None: no limit)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is None:
        return None
    room = limit - prompt_width
    if room < 1:
        raise ValueError(
            f"a prompt of {prompt_width} tokens leaves no room to generate within the model's "
            f"{limit} positions; lower data.max_prompt_length"
        )
    return room


@torch.no_grad()
def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    seeds: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    cache_implementation: str | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """New token ids per prompt (one LEFT-padded batch): row r keeps at most budgets[r] tokens,
    up to and including its first stop token (eos_token_id: one id, several, e.g. eos and a chat
    template's end-of-turn token, or None: no stop).

    seeds None = greedy; else one seed per row, sampled at temperature / top-p (`RowSeededSampler`).
    vocab_size (the tokenizer's size): ids >= it are never emitted (`VocabularyMask`); None: no mask.
    The batch runs at most as many steps as the longest prompt leaves in the model's position
    range, so a row gets its full budget whatever the batch when its budget fits after the batch's
    longest prompt (always true when max prompt + max new tokens <= max_position_embeddings).
    """
    if len(budgets) != len(prompts) or (seeds is not None and len(seeds) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts need as many budgets ({len(budgets)}) and seeds")
    if min(budgets) < 1:
        raise ValueError(f"every row needs a budget >= 1 new token, got {min(budgets)}")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in generation_batch(prompts, pad_token_id).items()}
    width = batch["input_ids"].shape[1]
    room = _position_room(model, width)
    steps = max(budgets) if room is None else min(max(budgets), room)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=steps,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        cache_implementation=cache_implementation,
    )
    processors = LogitsProcessorList(
        ([] if vocab_size is None else [VocabularyMask(vocab_size)])
        + ([] if seeds is None else [RowSeededSampler(seeds, temperature, top_p, width, steps)])
    )
    stopping = StoppingCriteriaList([RowBudget(budgets, width)] if min(budgets) < steps else [])
    output = model.generate(**batch, generation_config=config, logits_processor=processors, stopping_criteria=stopping)
    stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    rows = []
    for new, budget in zip(output[:, width:].tolist(), budgets):
        new = new[:budget]
        end = next((k for k, token in enumerate(new) if token in stops), None)
        rows.append(new if end is None else new[: end + 1])
    return rows


def sample_on_policy(
    model,
    rows: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int],
    max_new_tokens: int,
    max_length: int,
    seed: int,
    row_offset: int = 0,
    vocab_size: int | None = None,
) -> list[dict]:
    """On-policy rows: the model samples a response to each row's prompt (temperature 1, the whole
    vocabulary: the first vocab_size ids when given, so never a padding row of the head); the
    response, up to and including its first EOS, becomes the scored tokens.

    Row i draws from the stream `stream_seed(seed, row_offset + i)`: pass the step's seed and the
    row's global rank offset, and a resumed run replays the same responses whatever the batching.
    Row i gets up to min(max_new_tokens, max_length - its prompt) new tokens (at least 1). On CUDA
    the model runs under bf16 autocast.
    """
    if not rows:
        return []
    prompts = [list(map(int, r["input_ids"][: r["num_prompt_tokens"]])) for r in rows]
    budgets = [max(1, min(max_new_tokens, max_length - len(p))) for p in prompts]
    seeds = [stream_seed(seed, row_offset + i) for i in range(len(rows))]
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with autocast:
            responses = generate_tokens(
                model,
                prompts,
                budgets,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                seeds=seeds,
                temperature=1.0,
                top_p=1.0,
                vocab_size=vocab_size,
            )
    finally:
        model.train(was_training)
    return [
        {
            "input_ids": prompt + new,
            "attention_mask": [1] * (len(prompt) + len(new)),
            "labels": [IGNORE_INDEX] * len(prompt) + new,
            "on_policy": True,
        }
        for prompt, new in zip(prompts, responses)
    ]
