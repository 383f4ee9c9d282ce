"""Row-seeded sampling (pocl_ray.sampling): the draw's distribution, top-p, batch invariance,
greedy = HF greedy, on-policy rows, padded heads and several stop ids. Tiny random Llama models, CPU, no Ray."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TopPLogitsWarper

from pocl_ray.data import IGNORE_INDEX, generation_batch
from pocl_ray.models import build_tiny_model
from pocl_ray.sampling import (
    RowSeededSampler,
    generate_tokens,
    row_uniforms,
    sample_on_policy,
    sample_tokens,
)
from pocl_ray.seeds import stream_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 48
EOS = 2
# Chi-square critical value, 5 degrees of freedom, p = 0.001.
CHI2_CRIT_DF5 = 20.515
LOGITS = torch.tensor([2.0, 1.2, 0.7, 0.0, -0.5, -1.5])


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=5, max_positions=64).eval()


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [
        torch.randint(3, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((observed - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------------------------------------
# The draw


def test_row_uniforms_depend_on_seed_and_step_only():
    u = row_uniforms([5, 2**62 + 7, 9], 16)
    assert u.dtype == torch.float32 and u.shape == (3, 16)
    assert bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(row_uniforms([2**62 + 7], 16)[0], u[1])  # independent of the other rows
    assert torch.equal(row_uniforms([9], 4)[0], u[2, :4])  # independent of the number of steps
    assert len(set(u.flatten().tolist())) == u.numel()
    assert stream_seed(3, 1) == stream_seed(3, 1) != stream_seed(3, 2) != stream_seed(4, 1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draws_follow_the_tempered_distribution(temperature):
    probs = torch.softmax(LOGITS / temperature, -1)
    # Across 6000 row seeds at one step, and across 6000 steps of one row seed.
    across_rows = sample_tokens(LOGITS.repeat(6000, 1), row_uniforms(range(6000), 1)[:, 0], temperature, 1.0)
    across_steps = sample_tokens(LOGITS.repeat(6000, 1), row_uniforms([123], 6000)[0], temperature, 1.0)
    for tokens in (across_rows, across_steps):
        assert _chi_square(tokens, probs) < CHI2_CRIT_DF5
        # The test has power: the same draws are far from the other temperature's distribution.
        assert _chi_square(tokens, torch.softmax(LOGITS / (1.5 - temperature), -1)) > 10 * CHI2_CRIT_DF5


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.8, 0.95])
def test_top_p_keeps_hf_top_p_set_renormalised(top_p):
    n = 4000
    tokens = sample_tokens(LOGITS.repeat(n, 1), row_uniforms(range(n), 1)[:, 0], 1.0, top_p)
    hf = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), LOGITS[None].clone())[0]
    kept = torch.isfinite(hf)
    assert set(tokens.unique().tolist()) == set(kept.nonzero().flatten().tolist())
    if kept.sum() > 1:
        probs = torch.softmax(LOGITS[kept], -1)
        remap = torch.cumsum(kept.long(), 0) - 1
        observed = remap[tokens]
        critical = {2: 10.828, 3: 13.816, 4: 16.266, 5: CHI2_CRIT_DF5}[int(kept.sum())]  # p = 0.001
        assert _chi_square(observed, probs) < critical


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")])
    u = torch.tensor([0.0, 0.4999, 0.5, 1 - 2**-24])
    assert sample_tokens(logits.repeat(4, 1), u, 1.0, 1.0).tolist() == [1, 1, 3, 3]


def test_sampler_processor_is_one_hot_at_its_step():
    seeds = [4, 8, 15]
    sampler = RowSeededSampler(seeds, 1.0, 1.0, prompt_width=5, num_steps=3)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    scores = sampler(torch.zeros(3, 7, dtype=torch.long), logits.clone())  # step 2
    assert torch.equal((scores == 0).sum(-1), torch.ones(3, dtype=torch.long))
    assert torch.isinf(scores).sum() == 3 * (VOCAB - 1)
    assert torch.equal(scores.argmax(-1), sample_tokens(logits, row_uniforms(seeds, 3)[:, 2], 1.0, 1.0))
    with pytest.raises(ValueError, match="temperature > 0"):
        RowSeededSampler([1], 0.0, 1.0, 1, 1)
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        sampler(torch.zeros(2, 7, dtype=torch.long), logits[:2])


# ---------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_generation_is_independent_of_batch_size_and_composition(model, top_p):
    prompts = _prompts(8)
    seeds = [stream_seed(1, i) for i in range(8)]
    budgets = [4 + i % 5 for i in range(8)]

    def run(order, size):
        out = {}
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            rows = generate_tokens(
                model,
                [prompts[i] for i in idx],
                [budgets[i] for i in idx],
                pad_token_id=0,
                eos_token_id=EOS,
                seeds=[seeds[i] for i in idx],
                temperature=0.8,
                top_p=top_p,
            )
            out.update(zip(idx, rows))
        return [out[i] for i in range(8)]

    by_one = run(list(range(8)), 1)
    assert run(list(range(8)), 8) == run([5, 0, 7, 2, 1, 6, 3, 4], 3) == by_one
    for row, budget in zip(by_one, budgets):
        assert len(row) == budget or row[-1] == EOS
        assert EOS not in row[:-1]
    other = generate_tokens(
        model,
        prompts,
        budgets,
        pad_token_id=0,
        eos_token_id=EOS,
        seeds=[stream_seed(2, i) for i in range(8)],
        temperature=0.8,
        top_p=top_p,
    )
    assert other != by_one


def test_greedy_equals_hf_greedy(model):
    prompts = _prompts(6)
    ours = generate_tokens(model, prompts, [10] * 6, pad_token_id=0, eos_token_id=None)
    batch = generation_batch(prompts, 0)
    hf = model.generate(**batch, do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert ours == hf[:, batch["input_ids"].shape[1] :].tolist()
    # Per-row budgets only truncate: a row's greedy tokens are the prefix of its longer run.
    short = generate_tokens(model, prompts, [3, 10, 1, 7, 10, 5], pad_token_id=0, eos_token_id=None)
    assert short == [row[:b] for row, b in zip(ours, [3, 10, 1, 7, 10, 5])]


def test_position_range_caps_generation(model):
    with pytest.raises(ValueError, match="no room to generate"):
        generate_tokens(model, [[3] * 64], [4], pad_token_id=0, eos_token_id=None)
    rows = generate_tokens(model, [[3] * 60, [4] * 2], [10, 10], pad_token_id=0, eos_token_id=None)
    assert [len(r) for r in rows] == [4, 4]


def test_on_policy_rows_are_seeded_per_row_and_fit_max_length(model):
    prompts = _prompts(6)
    rows = [{"input_ids": p + [7, 8, EOS], "num_prompt_tokens": len(p)} for p in prompts]
    kwargs = {"pad_token_id": 0, "eos_token_id": EOS, "max_new_tokens": 12, "max_length": 16}
    model.train()
    full = sample_on_policy(model, rows, seed=42, **kwargs)
    assert model.training
    model.eval()
    assert sample_on_policy(model, rows[2:], seed=42, row_offset=2, **kwargs) == full[2:]
    assert sample_on_policy(model, rows, seed=43, **kwargs) != full
    for prompt, row in zip(prompts, full):
        new = row["input_ids"][len(prompt) :]
        assert row["input_ids"][: len(prompt)] == prompt and row["on_policy"] is True
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + new
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert 1 <= len(new) <= min(12, 16 - len(prompt))
        assert EOS not in new[:-1]
    assert sample_on_policy(model, [], seed=1, **kwargs) == []


def test_no_decoding_emits_an_id_past_the_tokenizer_with_a_padded_head():
    """A 1,088-row head over a 1,000-token tokenizer whose padding rows are made to dominate: unmasked
    decoding picks them, while greedy, sampled and on-policy decoding given vocab_size never do."""
    padded = build_tiny_model("llama", 1088, hidden_size=32, num_layers=1, num_heads=4, seed=8, max_positions=64).eval()
    with torch.no_grad():
        padded.lm_head.weight[1000:] *= 40
    prompts = [[(7 * k + j) % 1000 for j in range(3 + k % 5)] for k in range(8)]
    unmasked = generate_tokens(padded, prompts, [8] * 8, pad_token_id=0, eos_token_id=None)
    assert max(max(row) for row in unmasked) >= 1000  # the check below can fail
    common = {"pad_token_id": 0, "eos_token_id": None, "vocab_size": 1000}
    greedy = generate_tokens(padded, prompts, [8] * 8, **common)
    sampled = generate_tokens(padded, prompts, [8] * 8, seeds=range(8), temperature=1.0, top_p=0.9, **common)
    hot = generate_tokens(padded, prompts, [8] * 8, seeds=range(8), temperature=3.0, **common)
    for rows in (greedy, sampled, hot):
        assert all(len(row) == 8 for row in rows) and max(max(row) for row in rows) < 1000
    on_policy = sample_on_policy(
        padded,
        [{"input_ids": p, "num_prompt_tokens": len(p)} for p in prompts],
        pad_token_id=0,
        eos_token_id=1,
        max_new_tokens=8,
        max_length=24,
        seed=3,
        vocab_size=1000,
    )
    assert max(max(r["input_ids"]) for r in on_policy) < 1000


def test_generation_stops_at_any_of_several_stop_ids(model):
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = None  # else HF stops at the config's eos when given None
    prompts = _prompts(6)
    free = generate_tokens(model, prompts, [10] * 6, pad_token_id=0, eos_token_id=None)
    stops = {free[0][1], free[4][3]}
    stopped = generate_tokens(model, prompts, [10] * 6, pad_token_id=0, eos_token_id=sorted(stops))
    for row, full in zip(stopped, free):
        end = next((k for k, t in enumerate(full) if t in stops), None)
        assert row == (full if end is None else full[: end + 1])
    assert len(stopped[0]) == 2 and len(stopped[4]) <= 4
