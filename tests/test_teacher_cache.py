"""The cached teacher (METHODS.md §4): the cached loss against the online one, the tail treatment,
storage and collation, and the errors that name the setting to change. No Ray (the scoring pass
that writes the cache is tested in test_scoring.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pocl_ray import losses as L
from pocl_ray import teacher_cache as C
from pocl_ray.config import ConfigError, parse_config
from pocl_ray.shards import _row_dicts
from pocl_ray.teacher_cache import (
    CACHE_COLUMNS,
    HEAD_FILE,
    HIDDEN_COLUMNS,
    HIDDEN_GROUP,
    arrow_columns,
    arrow_types,
    bytes_per_token,
    check_teacher_cache,
    collate_teacher_cache,
    dequantize_hidden,
    hidden_groups,
    manifest_entry,
    quantize_hidden,
    row_caches,
    row_hidden,
    save_head,
)

B, S, H, V = 3, 12, 16, 64
F_DIVERGENCES = ("fkl", "rkl", "js", "tvd", "skl", "srkl")  # AKL is not one: its weights see the split


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = L.IGNORE_INDEX  # a prompt
    labels[2, 9:] = L.IGNORE_INDEX  # padding
    hidden = torch.randn(B, S, H, generator=g)
    head = torch.randn(V, H, generator=g) * 0.5
    # A peaked teacher (scale 4), as a trained LM is: top-k then holds most of the mass.
    t_hidden, t_head = torch.randn(B, S, H, generator=g), torch.randn(V, H, generator=g) * 4 / H**0.5
    return labels, hidden, head, t_hidden, t_head


def _cache(t_hidden, t_head, labels, k):
    scored = L._next_labels(labels) != L.IGNORE_INDEX
    return C.teacher_top_k((t_hidden @ t_head.T).flatten(0, 1)[scored], k)


@pytest.mark.parametrize("kind", L.KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_cache_equals_online_loss_and_gradients(kind, temperature):
    labels, hidden, head, t_hidden, t_head = _problem()
    cache = _cache(t_hidden, t_head, labels, V)
    options = {"kd_weight": 0.8, "temperature": temperature, "chunk_positions": 7}
    h1, w1 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    online = L.linear_kd_and_ce(kind, h1, w1, t_hidden, t_head, labels, labels, **options)
    online[0].backward()
    h2, w2 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    cached = L.cached_kd_and_ce(kind, h2, w2, cache, labels, labels, **options)
    cached[0].backward()
    assert online[1] > 0
    for a, b in zip(online, cached):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-4, rtol=1e-4)
    # The logits path too.
    logits = (hidden @ head.T).requires_grad_()
    ref = L.kd_loss(kind, logits, t_hidden @ t_head.T, labels, temperature=temperature)
    (g_ref,) = torch.autograd.grad(ref, logits)
    got = L.cached_kd_loss(kind, logits, cache, labels, temperature=temperature)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_got, g_ref, atol=1e-4, rtol=1e-4)


def _scored_logits(seed):
    labels, hidden, head, t_hidden, t_head = _problem(seed)
    scored = L._next_labels(labels) != L.IGNORE_INDEX
    return labels, hidden @ head.T, t_hidden @ t_head.T, (t_hidden @ t_head.T).flatten(0, 1)[scored]


def _rest_bucket(kind, s_logits, t_rows, labels, ids, temperature):
    """The divergence on K + 1 outcomes, the top-K tokens and everything else as one bucket."""
    q = torch.softmax(s_logits.flatten(0, 1)[L._next_labels(labels) != L.IGNORE_INDEX] / temperature, -1)
    p = torch.softmax(t_rows / temperature, -1)
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    fold = lambda x: torch.cat([x.gather(-1, ids), (x * rest).sum(-1, keepdim=True)], -1).log()  # noqa: E731
    return float(L._kd_rows(kind, 0.1, 0.5, 0.5)(fold(p), fold(q))[0].mean()) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_draws_estimate_every_f_divergence_but_rkl(temperature):
    """Exact on the top K, importance-weighted draws on the tail, lifted to the rest-bucket divergence
    where they fall below it: over independent draws the cached loss averages to the online one (within
    4 standard errors and the lift's 0.5%), every draw stays above the rest bucket, and with a quarter of
    the vocabulary on top one draw is already within 10%."""
    labels, s_logits, t_logits, t_rows = _scored_logits(1)
    g = torch.Generator().manual_seed(0)
    for k in (4, 16):
        draws = [
            C.teacher_top_k(t_rows, k, torch.rand((len(t_rows), C.TAIL_SAMPLES), generator=g, dtype=torch.float64))
            for _ in range(48)
        ]
        for kind in ("fkl", "js", "tvd", "skl", "srkl"):
            exact = float(L.kd_loss(kind, s_logits, t_logits, labels, temperature=temperature))
            got = torch.tensor(
                [float(L.cached_kd_loss(kind, s_logits, c, labels, temperature=temperature)) for c in draws]
            )
            error = abs(float(got.mean()) - exact)
            assert error < 4 * float(got.std()) / len(draws) ** 0.5 + 0.005 * exact, (kind, k, error, float(got.std()))
            assert (
                float(got.min()) >= _rest_bucket(kind, s_logits, t_rows, labels, draws[0].top_ids, temperature) - 1e-5
            )
            if k == 16:
                assert float((got - exact).abs().max()) < 0.1 * exact, (kind, k)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rkl_takes_the_tail_mean_log_prob_and_akl_mixes_the_cached_fkl_and_rkl(temperature):
    labels, s_logits, t_logits, t_rows = _scored_logits(2)
    cache = C.teacher_top_k(t_rows, 8)
    # The documented tail model written out: every tail token's log p̂ at T is β·(mean tail log p at T = 1) − log Z(β).
    logp = torch.log_softmax(t_rows, -1)
    tail = torch.ones_like(logp, dtype=torch.bool).scatter(-1, cache.top_ids, False)
    mean = logp.where(tail, 0.0).sum(-1, keepdim=True) / tail.sum(-1, keepdim=True)
    log_z = (logp / temperature).logsumexp(-1, keepdim=True)
    model = torch.where(tail, mean / temperature - log_z, logp / temperature - log_z)
    q = L.log_probs_(s_logits.flatten(0, 1)[L._next_labels(labels) != L.IGNORE_INDEX], temperature)
    want = (q.exp() * (q - model)).sum(-1).mean() * temperature**2  # KL(q ‖ model)
    got = L.cached_kd_loss("rkl", s_logits, cache, labels, temperature=temperature)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    f, r, a = (
        float(L.cached_kd_loss(kind, s_logits, cache, labels, temperature=temperature))
        for kind in ("fkl", "rkl", "akl")
    )
    assert min(f, r) - 1e-5 <= a <= max(f, r) + 1e-5


def test_cached_loss_and_gradients_stay_finite_with_a_masked_vocabulary():
    labels, s_logits, t_logits, _ = _scored_logits(3)
    t_logits = t_logits.clone()
    t_logits[..., V - 10 :] = float("-inf")  # padded vocabulary entries: probability exactly 0
    scored = L._next_labels(labels) != L.IGNORE_INDEX
    cache = C.teacher_top_k(t_logits.flatten(0, 1)[scored], 4)
    assert not (cache.sample_ids >= V - 10).any()  # never drawn
    for kind in L.KD_KINDS:
        for temperature in (0.5, 1.0, 2.0, 5.0):
            logits = s_logits.clone().requires_grad_()
            loss = L.cached_kd_loss(kind, logits, cache, labels, temperature=temperature)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (kind, temperature)


def test_tail_between_stored_temperatures_is_an_upper_bound():
    t_logits = torch.randn(50, V) * 3
    cache = C.teacher_top_k(t_logits, 8)
    rest = torch.log_softmax(t_logits, -1).scatter(-1, cache.top_ids, float("-inf"))
    for temperature in (1.0, 1.25, 2.0, 3.0):
        true = (rest / temperature).logsumexp(-1)
        estimate = C._tail_at(cache.tail, temperature)
        if temperature in C.TAIL_TEMPERATURES:
            torch.testing.assert_close(estimate, true)
        else:  # log Σ p^β is convex in β: the chord lies above it
            assert (estimate >= true - 1e-5).all() and not torch.allclose(estimate, true)


def _rows_and_logits(seed=2):
    g = torch.Generator().manual_seed(seed)
    rows, logits = [], []
    for n, prompt in ((9, 3), (14, 5), (6, 2)):
        ids = torch.randint(0, V, (n,), generator=g).numpy()
        labels = ids.copy()
        labels[:prompt] = L.IGNORE_INDEX
        rows.append({"id": f"r{n}", "input_ids": ids, "labels": labels, "attention_mask": np.ones(n, np.int64)})
        logits.append(torch.randn(n, V, generator=g) * 4)
    return rows, logits


def _stored_rows(rows, logits, k):
    """Rows as StepReader returns them: the cache written as arrow columns and read back."""
    caches = [row_caches(torch.as_tensor(r["labels"])[None], x[None], k, V, [r["id"]])[0] for r, x in zip(rows, logits)]
    table = pa.table(arrow_columns([*caches, None], k, V)).slice(0, len(rows))
    return [{**r, **c} for r, c in zip(rows, _row_dicts(table, CACHE_COLUMNS))]


def test_stored_cache_collates_onto_the_batch_scored_positions():
    from pocl_ray.training.step import build_batch

    rows, logits = _rows_and_logits()
    stored = _stored_rows(rows, logits, V)
    assert stored[0]["teacher_top_ids"].dtype == np.uint16 and stored[0]["teacher_top_logprobs"].dtype == np.float16
    batch = build_batch(stored, pad_token_id=0, device=torch.device("cpu"))
    cache = collate_teacher_cache(stored, torch.device("cpu"))
    seq = batch["labels"].shape[1]
    t_logits = torch.stack([torch.cat([x, torch.zeros(seq - len(x), V)]) for x in logits])
    s_logits = torch.randn(len(rows), seq, V, requires_grad=True)
    for kind in L.KD_KINDS:
        online = L.kd_loss(
            kind, s_logits, t_logits, batch["labels"], temperature=2.0, scored_positions=batch["scored_positions"]
        )
        got = L.cached_kd_loss(
            kind, s_logits, cache, batch["labels"], temperature=2.0, scored_positions=batch["scored_positions"]
        )
        # float16 log-probs: the only storage loss at K = vocab.
        torch.testing.assert_close(got, online, rtol=2e-3, atol=1e-4)
    # K = 128 + 16 draws of (id, float16 log-prob), 4 tail sums and the tail mean in float32: within 600 bytes.
    assert bytes_per_token(128, V) == 144 * 4 + 20 == 596 and bytes_per_token(128, 100_000) == 144 * 6 + 20


def test_tail_draws_are_fixed_by_the_row_id_and_come_from_the_tail():
    rows, logits = _rows_and_logits()
    row, x = rows[1], logits[1]
    labels = torch.as_tensor(row["labels"])[None]
    first, again, other = (row_caches(labels, x[None], 8, V, [i])[0] for i in (row["id"], row["id"], "another id"))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    ids, top = first[3].astype(np.int64), first[0].astype(np.int64)
    assert not np.array_equal(ids, other[3])
    assert not (ids[:, :, None] == top[:, None, :]).any()
    scored = torch.nn.functional.pad(labels[0, 1:], (0, 1), value=L.IGNORE_INDEX) != L.IGNORE_INDEX
    want = torch.log_softmax(x[scored], -1).gather(-1, torch.from_numpy(ids))
    np.testing.assert_allclose(first[4].astype(np.float32), want.numpy(), atol=2e-2, rtol=1e-3)


def test_collate_refuses_a_cache_that_does_not_match_the_rows():
    rows, logits = _rows_and_logits()
    stored = _stored_rows(rows, logits, 8)
    short = dict(stored[1], teacher_top_ids=stored[1]["teacher_top_ids"][1:])
    with pytest.raises(ValueError, match=r"row r14: teacher cache shapes .* scoring.teacher_top_k"):
        collate_teacher_cache([stored[0], short], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"kd.teacher: cached: the rows lack \['teacher_tail'\]"):
        collate_teacher_cache(
            [{k: v for k, v in r.items() if k != "teacher_tail"} for r in stored], torch.device("cpu")
        )
    empty = collate_teacher_cache([], torch.device("cpu"))
    assert empty.top_ids.shape[0] == 0


def _cfg(tmp_path, **kd):
    return parse_config(
        {
            "data": {"train": str(tmp_path / "t.jsonl")},
            "models": {"teacher": str(tmp_path / "teacher")},
            "scoring": {"teacher_top_k": 8},
            "kd": {"teacher": "cached", **kd},
        }
    )


def test_config_refuses_cached_teacher_where_it_cannot_serve(tmp_path):
    base = {"data": {"train": "t.jsonl"}, "models": {"teacher": "t"}, "kd": {"teacher": "cached"}}
    with pytest.raises(ConfigError, match=r"kd.teacher: 'cached' reads .* set scoring.teacher_top_k"):
        parse_config(base)
    base["scoring"] = {"teacher_top_k": 8}
    with pytest.raises(ConfigError, match=r"kd.teacher: 'cached' cannot serve curriculum.plan 'extraction'"):
        parse_config({**base, "curriculum": {"plan": "extraction"}})
    with pytest.raises(ConfigError, match=r"kd.teacher: 'cached' cannot serve curriculum.plan 'progressive'"):
        parse_config({**base, "curriculum": {"plan": "progressive", "progressive": {"teacher_checkpoints": ["c"]}}})
    with pytest.raises(ConfigError, match=r"kd.teacher: 'cached' .* kd.on_policy_fraction"):
        parse_config({**base, "kd": {"teacher": "cached", "on_policy_fraction": 0.5}})
    assert parse_config(base).kd.teacher == "cached"


def _write_scores(tmp_path, cfg, columns, entry):
    directory = tmp_path / "scores"
    (directory / "rows").mkdir(parents=True)
    pq.write_table(pa.table({"rank": pa.array([0, 1]), **columns}), directory / "rows" / "0.parquet")
    manifest = {
        "scores_path": "rows",
        "teacher_cache": entry,
        "models": {"teacher": str(Path(cfg.models.teacher).resolve())},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_check_names_the_scores_path_and_the_setting(tmp_path):
    cfg = _cfg(tmp_path)
    rows, logits = _rows_and_logits()
    good = {
        k: v.slice(0, 2)
        for k, v in arrow_columns(
            [row_caches(torch.as_tensor(r["labels"])[None], x[None], 8, V, [r["id"]])[0] for r, x in zip(rows, logits)],
            8,
            V,
        ).items()
    }
    directory = _write_scores(tmp_path, cfg, good, manifest_entry(8, V))
    assert check_teacher_cache(directory / "rows", cfg, V)["top_k"] == 8
    assert check_teacher_cache(directory, cfg.with_overrides({"kd.teacher": "online"}), V) is None

    _write_scores(tmp_path / "none", cfg, {}, None)
    with pytest.raises(
        ConfigError, match=rf"scores at {tmp_path / 'none' / 'scores'} hold no teacher cache.*scoring.teacher_top_k"
    ):
        check_teacher_cache(tmp_path / "none" / "scores", cfg, V)
    missing = {k: v for k, v in good.items() if k != "teacher_tail"}
    _write_scores(tmp_path / "missing", cfg, missing, manifest_entry(8, V))
    with pytest.raises(ConfigError, match=r"rows lack the columns \['teacher_tail'\].*scoring.teacher_top_k"):
        check_teacher_cache(tmp_path / "missing" / "scores", cfg, V)
    bad = dict(
        good, teacher_top_logprobs=pa.array([[[0.0] * 8], [[0.0] * 8]], type=arrow_types(8, V)["teacher_top_ids"])
    )
    _write_scores(tmp_path / "bad", cfg, bad, manifest_entry(8, V))
    with pytest.raises(ConfigError, match=r"malformed columns: teacher_top_logprobs is .*scoring.teacher_top_k"):
        check_teacher_cache(tmp_path / "bad" / "scores", cfg, V)
    with pytest.raises(ConfigError, match=r"scoring.teacher_top_k: 16, but the scores .* cache the top 8"):
        check_teacher_cache(directory, cfg.with_overrides({"scoring.teacher_top_k": 16}), V)
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"models.teacher: .* comes from"):
        check_teacher_cache(directory, cfg.with_overrides({"models.teacher": str(tmp_path / "other")}), V)


# -- the hidden form: the teacher's final hidden state in int8, its head applied in training -------


def test_int8_hidden_states_round_to_within_half_a_step_per_group():
    g = torch.Generator().manual_seed(0)
    width = 100  # not a multiple of HIDDEN_GROUP: the last group is padded
    hidden = torch.randn(5, width, generator=g)
    hidden[:, 3] = 40.0  # an outlier channel, as LMs' final hidden states have: it widens its group only
    hidden[4] = 0.0
    values, scales = quantize_hidden(hidden)
    assert values.dtype == torch.int8 and values.shape == (5, width) and scales.dtype == torch.float16
    assert scales.shape == (5, hidden_groups(width)) == (5, 2)
    back = dequantize_hidden(values, scales)
    step = scales.float().repeat_interleave(HIDDEN_GROUP, 1)[:, :width]
    assert ((back - hidden).abs() <= step / 2 + 1e-6).all()
    assert (back[4] == 0).all() and (values.abs() <= 127).all()
    # The outlier's group keeps its coarse step; the other group keeps a fine one.
    assert (scales[:4, 1].float() < scales[:4, 0].float() / 5).all()
    # Re-quantizing the rounded state changes nothing: what is stored is what training reads.
    again = quantize_hidden(back)
    assert torch.equal(again[0], values) and torch.equal(again[1], scales)


def _stored_hidden_rows(rows, hidden_states):
    """Rows as StepReader returns them with the hidden form's columns, written as arrow and read back."""
    caches = [row_hidden(torch.as_tensor(r["labels"])[None], h[None])[0] for r, h in zip(rows, hidden_states)]
    table = pa.table(arrow_columns([*caches, None], None, V, H)).slice(0, len(rows))
    return [{**r, **c} for r, c in zip(rows, _row_dicts(table, HIDDEN_COLUMNS))]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hidden_cache_gives_the_online_loss_of_the_rounded_teacher_state(temperature):
    from pocl_ray.training.step import build_batch
    from pocl_ray.training.teacher import CachedHiddenTeacher, LMOutputs

    rows, _ = _rows_and_logits()
    g = torch.Generator().manual_seed(5)
    hidden = [torch.randn(len(r["input_ids"]), H, generator=g) for r in rows]
    t_head = torch.randn(V, H, generator=g) * 4 / H**0.5
    stored = _stored_hidden_rows(rows, hidden)
    assert stored[0]["teacher_hidden"].dtype == np.int8 and stored[0]["teacher_hidden_scale"].dtype == np.float16
    batch = build_batch(stored, pad_token_id=0, device=torch.device("cpu"))
    batch["teacher_cache"] = collate_teacher_cache(stored, torch.device("cpu"), hidden=True)
    seq = batch["labels"].shape[1]
    exact = torch.stack([torch.cat([h, torch.zeros(seq - len(h), H)]) for h in hidden])
    scored = (L._next_labels(batch["labels"]) != L.IGNORE_INDEX).view(exact.shape[:2])
    rounded = torch.zeros_like(exact)
    rounded[scored] = dequantize_hidden(*quantize_hidden(exact[scored]))
    t_out = CachedHiddenTeacher(t_head).outputs(batch)
    assert isinstance(t_out, LMOutputs) and t_out.head is t_head
    s_hidden, s_head = torch.randn(len(rows), seq, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    options = {"temperature": temperature, "scored_positions": batch["scored_positions"]}
    for kind in L.KD_KINDS:
        ref = L.linear_kd_loss(kind, s_hidden, s_head, rounded, t_head, batch["labels"], **options)
        got = L.linear_kd_loss(kind, s_hidden, s_head, t_out.hidden, t_out.head, batch["labels"], **options)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        # Against the unrounded teacher, every kind (RKL and AKL too) is off by the rounding alone.
        true = L.linear_kd_loss(kind, s_hidden, s_head, exact, t_head, batch["labels"], **options)
        assert float(abs(got - true) / true) < 1e-2, kind
    # A student whose head is not plain gets the teacher's logits instead.
    logits = CachedHiddenTeacher(t_head, logits=True).outputs(batch)
    assert logits.head is None and torch.allclose(logits.logits, t_out.hidden @ t_head.T)
    # The all-masked stand-in row of a worker with no rows: no cache, a zero teacher.
    empty = build_batch([], 0, torch.device("cpu"))
    empty.update(teacher_cache=collate_teacher_cache([], torch.device("cpu"), hidden=True))
    assert CachedHiddenTeacher(t_head).outputs(empty).hidden.shape == (*empty["labels"].shape, H)


def test_hidden_collate_refuses_rows_that_do_not_match():
    rows, _ = _rows_and_logits()
    stored = _stored_hidden_rows(rows, [torch.randn(len(r["input_ids"]), H) for r in rows])
    short = dict(stored[1], teacher_hidden_scale=stored[1]["teacher_hidden_scale"][1:])
    with pytest.raises(ValueError, match=r"row r14: teacher cache shapes .* \(hidden size 16, 1 scales\)"):
        collate_teacher_cache([stored[0], short], torch.device("cpu"), hidden=True)
    with pytest.raises(ValueError, match=r"the rows lack \['teacher_hidden', 'teacher_hidden_scale'\]"):
        collate_teacher_cache(_stored_rows(rows, _rows_and_logits()[1], 8), torch.device("cpu"), hidden=True)


def test_hidden_form_check_names_the_head_and_the_setting(tmp_path):
    cfg = _cfg(tmp_path).with_overrides({"scoring.teacher_top_k": None, "scoring.teacher_hidden": True})
    rows, _ = _rows_and_logits()
    stored = [row_hidden(torch.as_tensor(r["labels"])[None], torch.randn(1, len(r["input_ids"]), H))[0] for r in rows]
    good = {k: v.slice(0, 2) for k, v in arrow_columns(stored, None, V, H).items()}
    directory = _write_scores(tmp_path, cfg, good, manifest_entry(None, V, H))
    with pytest.raises(
        ConfigError, match=rf"the teacher's LM head {directory / HEAD_FILE} is missing.*scoring.teacher_hidden"
    ):
        check_teacher_cache(directory, cfg, V)
    save_head(torch.randn(V, H + 1), directory)
    with pytest.raises(
        ConfigError, match=rf"the LM head {directory / HEAD_FILE} is \({V}, {H + 1}\), expected \({V}, {H}\)"
    ):
        check_teacher_cache(directory, cfg, V)
    save_head(torch.randn(V, H), directory)
    entry = check_teacher_cache(directory / "rows", cfg, V)
    assert entry["form"] == "hidden" and entry["bytes_per_scored_token"] == bytes_per_token(None, V, H) == H + 2
    with pytest.raises(
        ConfigError,
        match=r"scoring.teacher_top_k: 8, but the scores .* cache the teacher's hidden states.*"
        r"set scoring.teacher_hidden: true",
    ):
        check_teacher_cache(directory, _cfg(tmp_path), V)
    top = _write_scores(tmp_path / "top", cfg, {}, manifest_entry(8, V))
    with pytest.raises(
        ConfigError,
        match=r"scoring.teacher_hidden: true, but the scores .* cache the teacher's top 8.*"
        r"set scoring.teacher_top_k: 8",
    ):
        check_teacher_cache(top, cfg, V)
    bad = dict(good, teacher_hidden=good["teacher_hidden_scale"])
    _write_scores(tmp_path / "bad", cfg, bad, manifest_entry(None, V, H))
    save_head(torch.randn(V, H), tmp_path / "bad" / "scores")
    with pytest.raises(ConfigError, match=r"malformed columns: teacher_hidden is .*scoring.teacher_hidden"):
        check_teacher_cache(tmp_path / "bad" / "scores", cfg, V)
    # A cache over another vocabulary than the run's tokenizer is refused before any Ray work (either form).
    with pytest.raises(
        ConfigError, match=rf"the teacher cached at {directory} covers {V} tokens, the run's tokenizer .* has {V - 8}"
    ):
        check_teacher_cache(directory, cfg, V - 8)
    # The testbed teacher's width (576): 594 bytes per scored token.
    assert bytes_per_token(None, 49152, 576) == 576 + 2 * 9 == 594


def test_config_takes_one_cache_form():
    base = {"data": {"train": "t.jsonl"}, "models": {"teacher": "t"}, "kd": {"teacher": "cached"}}
    assert parse_config({**base, "scoring": {"teacher_hidden": True}}).scoring.teacher_hidden
    with pytest.raises(
        ConfigError, match=r"scoring.teacher_top_k and scoring.teacher_hidden: true are two forms .* set one"
    ):
        parse_config({**base, "scoring": {"teacher_hidden": True, "teacher_top_k": 8}})
