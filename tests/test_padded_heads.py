"""Padded LM heads (issue 25): a teacher and a student share one 1,000-token tokenizer, their heads have
1,024 and 1,088 rows. Every distribution is over the tokenizer's 1,000 tokens: each KD kind, with an
online teacher and a cached one (top-K and hidden forms), gives the loss, the gradients and the dev
losses of the same two models with their heads sliced to 1,000 rows; so do the measurers' metrics and
teacher cache and evaluation's CE; and no decoding emits a padding id.

The padding rows are made large on purpose (`_loud_padding`): a distribution that kept them would put
most of its mass there and greedy decoding would pick them, so a missed slice cannot pass unnoticed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import synthetic_rows

from pocl_ray import models
from pocl_ray.config import DataConfig, KDConfig
from pocl_ray.curriculum import Stage
from pocl_ray.data import validate_and_tokenize
from pocl_ray.losses import KD_KINDS
from pocl_ray.teacher_cache import CACHE_COLUMNS, HIDDEN_COLUMNS, load_head, save_teacher_head, teacher_caches
from pocl_ray.training.step import accumulate_gradients, build_batch, dev_losses
from pocl_ray.training.teacher import CachedHiddenTeacher, CachedTopKTeacher, HiddenStatesLM, OnlineTeacher

V = 1000  # the tokenizer's tokens
TEACHER_ROWS, STUDENT_ROWS = 1024, 1088
K = 16
CPU = torch.device("cpu")


def _loud_padding(model, seed: int):
    """Padding rows 30x the scale of the trained ones: kept in a softmax, they would dominate it."""
    head = model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head[V:] = 30 * head[:V].std() * torch.randn(head.shape[0] - V, head.shape[1], generator=g)
    return model


def _sliced(model):
    """The same model with its LM head cut to the tokenizer's V rows: the reference every padded
    computation must equal."""
    twin = copy.deepcopy(model)
    head = torch.nn.Linear(models.hidden_size(model), V, bias=False)
    head.weight = torch.nn.Parameter(model.get_output_embeddings().weight[:V].detach().clone())
    twin.set_output_embeddings(head)
    return twin


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(tokenizer, teacher folder, padded teacher, padded student, prepared rows)."""
    root = tmp_path_factory.mktemp("padded")
    tok = models.build_tiny_tokenizer([json.dumps(r) for r in synthetic_rows(300)], vocab_size=V)
    assert len(tok) == V
    arch = {"hidden_size": 32, "num_heads": 4, "tokenizer": tok}
    teacher = models.build_tiny_model("llama", TEACHER_ROWS, num_layers=2, seed=1, **arch)
    _loud_padding(teacher, 1).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = _loud_padding(models.build_tiny_model("llama", STUDENT_ROWS, num_layers=1, seed=2, **arch), 2)
    data_cfg = DataConfig(train="unused.jsonl", max_prompt_length=96, max_length=128)
    rows, _ = validate_and_tokenize(synthetic_rows(4, seed=3), tok, data_cfg)
    assert len(rows) == 4
    rows = [{k: r[k] for k in ("id", "input_ids", "labels", "attention_mask", "num_prompt_tokens")} for r in rows]
    return tok, root / "teacher", teacher.eval().requires_grad_(False), student, rows


def _with_cache(rows, teacher, form, pad_id):
    columns = HIDDEN_COLUMNS if form == "hidden" else CACHE_COLUMNS
    return [{**r, **dict(zip(columns, c))} for r, c in zip(rows, teacher_caches(teacher, rows, pad_id, form, V))]


def _step(student_lm, teacher, rows, kind: str, pad_id: int, vocab: int | None, logits: bool = False):
    """(step values, gradients by parameter name, dev losses) of one step of a copy of `student_lm`."""
    student = HiddenStatesLM(copy.deepcopy(student_lm).train().requires_grad_(True), logits, vocab)
    batches = [build_batch(rows[i : i + 2], pad_id, CPU, teacher) for i in (0, 2)]
    stage = Stage(index=0, buckets=(0,), steps=1, temperature=2.0, kd_weight=0.7, loss=kind)
    values = accumulate_gradients(student, teacher, batches, stage, KDConfig())
    grads = {n: p.grad for n, p in student.lm.named_parameters()}
    return values, grads, dev_losses(student, teacher, teacher, batches, stage, KDConfig())


def _assert_same_step(padded, sliced):
    torch.testing.assert_close(padded[0], sliced[0], rtol=1e-5, atol=1e-6)
    assert padded[0][1] > 0  # a real KD term
    for name, g in sliced[1].items():
        got = padded[1][name]
        if name == "lm_head.weight":  # the padding rows get no gradient
            assert torch.equal(got[V:], torch.zeros_like(got[V:]))
            got = got[:V]
        torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)
    assert padded[2] == pytest.approx(sliced[2], rel=1e-5)


@pytest.mark.parametrize("logits", [False, True], ids=["hidden_states", "logits_form"])
def test_every_kd_kind_with_an_online_teacher_is_the_loss_of_the_sliced_heads(pair, logits):
    tok, _, teacher, student, rows = pair
    padded_teacher = OnlineTeacher(teacher, logits, V)
    sliced_teacher = OnlineTeacher(_sliced(teacher), logits)
    for kind in KD_KINDS:
        padded = _step(student, padded_teacher, rows, kind, tok.pad_token_id, V, logits)
        sliced = _step(_sliced(student), sliced_teacher, rows, kind, tok.pad_token_id, None, logits)
        _assert_same_step(padded, sliced)
    # Unsliced, the two heads' distributions are not over one vocabulary: the losses refuse them.
    with pytest.raises(ValueError, match=f"teacher vocab size {TEACHER_ROWS} != student vocab size {STUDENT_ROWS}"):
        _step(student, OnlineTeacher(teacher, logits), rows, "fkl", tok.pad_token_id, None, logits)


def test_every_kd_kind_with_a_cached_top_k_teacher_is_the_loss_of_the_sliced_heads(pair):
    tok, _, teacher, student, rows = pair
    cached = _with_cache(rows, teacher, K, tok.pad_token_id)
    reference = _with_cache(rows, _sliced(teacher), K, tok.pad_token_id)
    for row, ref in zip(cached, reference):
        assert int(row["teacher_top_ids"].max()) < V  # never a padding id, although those rows are the largest
        for column in CACHE_COLUMNS:
            assert (row[column] == ref[column]).all(), column
    for kind in KD_KINDS:
        padded = _step(student, CachedTopKTeacher(), cached, kind, tok.pad_token_id, V)
        sliced = _step(_sliced(student), CachedTopKTeacher(), reference, kind, tok.pad_token_id, None)
        _assert_same_step(padded, sliced)


def test_every_kd_kind_with_a_cached_hidden_teacher_is_the_loss_of_the_sliced_heads(pair, tmp_path):
    tok, teacher_dir, teacher, student, rows = pair
    cached = _with_cache(rows, teacher, "hidden", tok.pad_token_id)
    # The scoring pass stores the teacher's head cut to the tokenizer (scoring.teacher_hidden).
    save_teacher_head(str(teacher_dir), tmp_path, V)
    head = load_head(tmp_path, torch.float32, CPU)
    assert torch.equal(head, teacher.get_output_embeddings().weight[:V])
    for kind in KD_KINDS:
        padded = _step(student, CachedHiddenTeacher(head, vocab_size=V), cached, kind, tok.pad_token_id, V)
        sliced = _step(_sliced(student), CachedHiddenTeacher(head), cached, kind, tok.pad_token_id, None)
        _assert_same_step(padded, sliced)


def test_measurer_metrics_and_cache_and_evaluation_ce_are_those_of_the_sliced_heads(pair):
    from pocl_ray.evaluation import response_ce
    from pocl_ray.measurers import MeasurerModels, measure

    tok, _, teacher, student, rows = pair
    student = copy.deepcopy(student).eval().requires_grad_(False)
    columns = {c: [r[c] for r in rows] for c in ("id", "input_ids", "labels", "num_prompt_tokens")}
    metrics = ["student_ce", "teacher_ce", "teacher_student_kl"]

    def scores(s, t):
        return measure(
            MeasurerModels(tok, s, t, CPU, None), columns, metrics, batch_size=2, max_new_tokens=None, cache_form=K
        )

    padded, sliced = scores(student, teacher), scores(_sliced(student), _sliced(teacher))
    for m in metrics:
        torch.testing.assert_close(torch.as_tensor(padded[m]), torch.as_tensor(sliced[m]), rtol=1e-5, atol=1e-6)
    for got, want in zip(padded["teacher_cache"], sliced["teacher_cache"]):
        assert int(got[0].max()) < V and all((a == b).all() for a, b in zip(got, want))
    ce = response_ce(student, rows, tok.pad_token_id, V)
    assert ce == pytest.approx(response_ce(_sliced(student), rows, tok.pad_token_id, V), rel=1e-5)
    # Over the whole padded head the loud padding rows take the mass: another, much larger CE.
    assert min(response_ce(student, rows, tok.pad_token_id, STUDENT_ROWS)) > max(ce) + 1


def test_decoding_never_emits_a_padding_id_and_stops_at_the_end_of_turn(pair):
    from pocl_ray.conversations import stop_token_ids
    from pocl_ray.measurers import greedy_responses
    from pocl_ray.sampling import generate_tokens
    from pocl_ray.training.worker import with_on_policy

    tok, _, _, student, rows = pair
    lm = copy.deepcopy(student).eval()
    prompts = [r["input_ids"][: r["num_prompt_tokens"]] for r in rows]
    budgets = [6] * len(prompts)
    unmasked = generate_tokens(lm, prompts, budgets, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert any(t >= V for seq in unmasked for t in seq)  # unmasked, the loud padding rows win
    kd = KDConfig(on_policy_fraction=1.0, on_policy_max_new_tokens=6)
    sampled = with_on_policy(lm, rows, kd, tok, max_length=128, seed=0, row_offset=0)
    assert all(r["on_policy"] and max(r["input_ids"]) < V for r in sampled)
    masked = generate_tokens(
        lm, prompts, budgets, pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok), vocab_size=V
    )
    assert all(t < V for seq in masked for t in seq)
    assert greedy_responses(lm, tok, prompts, budgets, batch_size=2) == tok.batch_decode(
        masked, skip_special_tokens=True
    )

    # A model that ends every turn at once: ChatML's <|im_end|> ends it, not only the eos <|endoftext|>.
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == [tok.eos_token_id, end_of_turn]
    head = lm.get_output_embeddings()
    eager = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        eager.weight.copy_(head.weight)
        eager.bias.zero_()
        eager.bias[end_of_turn] = 100.0
    lm.set_output_embeddings(eager)
    for row, prompt in zip(with_on_policy(lm, rows, kd, tok, max_length=128, seed=0, row_offset=0), prompts):
        assert row["input_ids"] == [*prompt, end_of_turn]


def test_scoring_and_training_check_the_tokenizer_pair_before_any_ray_work(pair, tmp_path):
    """A padded pair passes scoring's input check (K up to the tokenizer's 1,000 tokens); a student whose
    tokenizer differs is refused by scoring and by training, naming both tokenizers."""
    from pocl_ray import preflight, scoring
    from pocl_ray.config import ConfigError, parse_config
    from pocl_ray.training.driver import train

    tok, teacher_dir, _, student, _ = pair
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    other = models.build_tiny_tokenizer([json.dumps(r) for r in synthetic_rows(300, seed=1)], vocab_size=V)
    models.build_tiny_model("llama", STUDENT_ROWS, 32, 1, 4, tokenizer=other, save_dir=tmp_path / "other")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(4)))

    def config(student_dir, **scoring):
        models_cfg = {"teacher": str(teacher_dir), "student": str(student_dir)}
        run = {"data": {"train": str(data)}, "models": models_cfg, "output": {"dir": str(tmp_path / "run")}}
        return parse_config({**run, "scoring": scoring})

    def check_inputs(cfg):
        return scoring.check_inputs(cfg, preflight.check_inputs(cfg))

    assert len(check_inputs(config(tmp_path / "student", teacher_top_k=V))) == V
    with pytest.raises(ConfigError, match=rf"scoring.teacher_top_k: {V + 1} exceeds the tokenizer's .*\({V} tokens\)"):
        check_inputs(config(tmp_path / "student", teacher_top_k=V + 1))
    refused = rf"models.teacher tokenizer \({teacher_dir}\) and the models.student tokenizer \({tmp_path / 'other'}\)"
    with pytest.raises(ConfigError, match=refused):
        check_inputs(config(tmp_path / "other"))
    scores = tmp_path / "run" / "scores"
    (scores / "rows").mkdir(parents=True)
    (scores / "manifest.json").write_text(json.dumps({"scores_path": "rows"}))
    with pytest.raises(ConfigError, match=refused):
        train(config(tmp_path / "other"), scores)
    assert not (tmp_path / "run" / "train").exists()
