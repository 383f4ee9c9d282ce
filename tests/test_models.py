"""pocl_ray.models: tiny builds, save/load round trips, students cut from a teacher, checks."""

from __future__ import annotations

import re

import pytest
import torch

from pocl_ray import models
from pocl_ray.config import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return models.load_tokenizer(tiny_assets.tokenizer_dir)


def _prompt_batch(tokenizer):
    from pocl_ray.data import generation_batch

    prompts = ["Reverse the order of the words.\n\napple river", "Add the two numbers.\n\n2 + 3"]
    return generation_batch([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id)


def test_tiny_tokenizer_specials_chat_template_and_determinism(tmp_path):
    texts = ["apple river stone", "the quick brown fox", "green cloud"] * 10
    tok = models.build_tiny_tokenizer(texts, vocab_size=300, save_dir=tmp_path / "tok")
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("the quick brown fox")["input_ids"]) == "the quick brown fox"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert models.build_tiny_tokenizer(texts, vocab_size=300).get_vocab() == tok.get_vocab()
    loaded = models.load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab() and loaded.chat_template == tok.chat_template
    assert loaded.pad_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        models.build_tiny_tokenizer(texts, vocab_size=100)


def test_load_tokenizer_sets_a_missing_pad_token(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    no_pad = models.load_tokenizer(tmp_path / "tok")
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no_pad")
    reloaded = models.load_tokenizer(tmp_path / "no_pad")
    assert reloaded.pad_token == reloaded.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_save_load_round_trip(arch, tmp_path, tokenizer):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model = models.build_tiny_model(
        arch,
        len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        seed=5,
        save_dir=tmp_path / arch,
        tokenizer=tokenizer,
    )
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert (models.hidden_size(model), model.config.num_hidden_layers) == (32, 2)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # pad == eos here, so no padding_idx: the EOS embedding row is initialised and trainable
    assert model.get_input_embeddings().weight[tokenizer.eos_token_id].abs().sum() > 0
    same = models.build_tiny_model(
        arch, len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=5, tokenizer=tokenizer
    )
    other = models.build_tiny_model(
        arch, len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=6, tokenizer=tokenizer
    )
    state, same_state, other_state = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same_state[k]) for k in state)
    assert not torch.equal(state["lm_head.weight"], other_state["lm_head.weight"])

    loaded = models.load_model(tmp_path / arch, frozen=True)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    batch = _prompt_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)
    assert models.load_tokenizer(tmp_path / arch).get_vocab() == tokenizer.get_vocab()
    assert models.load_model(tmp_path / arch, dtype="bfloat16").dtype == torch.bfloat16


def test_build_tiny_model_argument_errors(tokenizer):
    with pytest.raises(ValueError, match="multiple of num_heads"):
        models.build_tiny_model("llama", 512, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="smaller than the tokenizer's"):
        models.build_tiny_model("llama", 100, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="unknown arch 'bert'"):
        models.build_tiny_model("bert", 512)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*no_such_model"):
        models.load_model(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="model folder not found: .*no_such_tok"):
        models.load_tokenizer(tmp_path / "no_such_tok")


def test_resolve_dtype():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert models.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.resolve_dtype("fp8", "cpu")


def _layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_student_from_teacher_keeps_the_chosen_layers(arch, tokenizer):
    teacher = models.build_tiny_model(
        arch, len(tokenizer), hidden_size=32, num_layers=4, num_heads=4, seed=0, tokenizer=tokenizer
    )
    teacher.requires_grad_(False)
    student = models.student_from_teacher(teacher, keep_layers=[0, 2])
    assert student.config.num_hidden_layers == 2 and len(_layers(student)) == 2
    assert len(_layers(teacher)) == 4 and teacher.config.num_hidden_layers == 4
    for new, old in enumerate([0, 2]):
        s_state, t_state = _layers(student)[new].state_dict(), _layers(teacher)[old].state_dict()
        assert s_state.keys() == t_state.keys()
        assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
        assert all(m.layer_idx == new for m in _layers(student)[new].modules() if hasattr(m, "layer_idx"))
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    assert all(p.requires_grad for p in student.parameters()) and student.training
    # an independent copy: training the student leaves the teacher alone
    with torch.no_grad():
        student.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)

    student.eval()
    batch = _prompt_batch(tokenizer)
    assert student(**batch).logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    cached = student.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    uncached = student.generate(
        **batch, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=tokenizer.pad_token_id
    )
    assert cached.shape == (2, batch["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)  # the renumbered KV cache gives the same tokens


def test_default_layers_count_back_from_the_last(tokenizer):
    teacher = models.build_tiny_model("llama", len(tokenizer), hidden_size=32, num_layers=5, num_heads=4)
    student = models.student_from_teacher(teacher, keep_every=2)
    expected = [0, 2, 4]
    for new, old in enumerate(expected):
        assert torch.equal(_layers(student)[new].self_attn.q_proj.weight, _layers(teacher)[old].self_attn.q_proj.weight)
    assert models.student_from_teacher(teacher, keep_every=3).config.num_hidden_layers == 2  # layers 1, 4


def test_student_layer_errors(tokenizer):
    teacher = models.build_tiny_model("llama", len(tokenizer), hidden_size=32, num_layers=4, num_heads=4)
    with pytest.raises(ValueError, match=r"indices \[4\] out of range: the teacher has 4 layers"):
        models.student_from_teacher(teacher, keep_layers=[1, 4])
    with pytest.raises(ValueError, match="duplicates"):
        models.student_from_teacher(teacher, keep_layers=[1, 1])
    with pytest.raises(ValueError, match="keep_every must be >= 1"):
        models.student_from_teacher(teacher, keep_every=0)


def test_check_head_rows(tokenizer, tiny_assets):
    """A loaded model needs a head row per token of the tokenizer; more rows (padding) are fine."""
    teacher = models.load_model(tiny_assets.teacher_dir, frozen=True)
    models.check_head_rows(teacher, len(tokenizer), "teacher")
    assert (
        models.hidden_size(models.load_model(tiny_assets.student_dir)) == 32
        and models.load_model(tiny_assets.cut_student_dir).config.num_hidden_layers == 2
    )
    models.check_head_rows(models.build_tiny_model("gpt2", 640, hidden_size=32, num_layers=1, num_heads=4), 512, "s")
    small = models.build_tiny_model("llama", 300, hidden_size=32, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="the student's LM head has 300 rows, fewer than the tokenizer's 512 tokens"):
        models.check_head_rows(small, len(tokenizer), "student")


def _thousand_token_tokenizer(texts_seed: int, save_dir=None):
    """A 1,000-token tokenizer trained on JSON lines of synthetic rows (another seed: another vocabulary)."""
    import json

    from conftest import synthetic_rows

    texts = [json.dumps(r) for r in synthetic_rows(300, seed=texts_seed)]
    tok = models.build_tiny_tokenizer(texts, vocab_size=1000, save_dir=save_dir)
    assert len(tok) == 1000
    return tok


def _model_folder(path, rows: int, tokenizer=None):
    models.build_tiny_model(
        "llama", rows, hidden_size=16, num_layers=1, num_heads=2, save_dir=path, tokenizer=tokenizer
    )
    return str(path)


def test_one_tokenizer_with_padded_heads_is_a_pair_and_other_tokenizers_are_refused(tmp_path):
    """Heads of 1,024 and 1,088 rows over one 1,000-token tokenizer pass (the vocabulary is 1,000); a
    student whose tokenizer differs is refused naming both tokenizers and the first differing token."""
    from pocl_ray.config import ModelsConfig

    tok = _thousand_token_tokenizer(0)
    teacher = _model_folder(tmp_path / "teacher", 1024, tok)
    student = _model_folder(tmp_path / "student", 1088, tok)
    assert models.check_tokenizers(ModelsConfig(teacher=teacher, student=student)) == 1000
    bare = _model_folder(tmp_path / "bare_student", 1024)  # no tokenizer files: only its head is checked
    assert models.check_tokenizers(ModelsConfig(teacher=teacher, student=bare)) == 1000

    other = _model_folder(tmp_path / "other", 1088, _thousand_token_tokenizer(1))
    with pytest.raises(ConfigError) as refused:
        models.check_tokenizers(ModelsConfig(teacher=teacher, student=other))
    message = str(refused.value)
    assert f"models.teacher tokenizer ({teacher})" in message and f"models.student tokenizer ({other})" in message
    first = next(
        i for i in range(1000) if tok.convert_ids_to_tokens(i) != models.load_tokenizer(other).convert_ids_to_tokens(i)
    )
    assert f"token id {first} is {tok.convert_ids_to_tokens(first)!r} in the models.teacher tokenizer" in message

    with pytest.raises(ConfigError, match=r"models.student: its LM head has 900 rows, fewer than the 1000 tokens"):
        models.check_tokenizers(ModelsConfig(teacher=teacher, student=_model_folder(tmp_path / "small", 900)))
    with pytest.raises(ConfigError, match=r"the models.tokenizer tokenizer \(.*\) and the models.teacher tokenizer"):
        models.check_tokenizers(ModelsConfig(teacher=teacher, tokenizer=str(tmp_path / "other")))
    # A progressive plan's stage teachers are checked the same way, named by their field.
    stage = "curriculum.progressive.teacher_checkpoints[1]"
    assert models.check_tokenizers(ModelsConfig(teacher=teacher), {stage: student}) == 1000
    with pytest.raises(ConfigError, match=rf"and the {re.escape(stage)} tokenizer \({other}\) differ: token id"):
        models.check_tokenizers(ModelsConfig(teacher=teacher), {stage: other})
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(stage)}: model folder not found"):
        models.check_tokenizers(ModelsConfig(teacher=teacher), {stage: str(tmp_path / "nope")})


def test_a_token_special_in_one_tokenizer_only_is_a_difference(tmp_path):
    tok = _thousand_token_tokenizer(0)
    marked = _thousand_token_tokenizer(0)
    word = marked.convert_ids_to_tokens(500)
    marked.add_special_tokens({"additional_special_tokens": [word]})
    assert marked.get_vocab() == tok.get_vocab()
    assert (
        models.tokenizer_difference(tok, marked, ("teacher", "student"))
        == f"{word!r} is a special token of the student only"
    )
    assert models.tokenizer_difference(tok, _thousand_token_tokenizer(0)) is None


def test_a_tokenizer_without_pad_token_works_for_collate_and_generation(tmp_path, tokenizer):
    """Llama 3 style: no pad token. load_tokenizer pads with eos; padded positions stay out of the labels,
    and left padding with the eos id changes no row's greedy tokens."""
    from pocl_ray.data import IGNORE_INDEX, collate
    from pocl_ray.sampling import generate_tokens

    tokenizer.save_pretrained(tmp_path / "tok")
    no_pad = models.load_tokenizer(tmp_path / "tok")
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no_pad")
    loaded = models.load_tokenizer(tmp_path / "no_pad")
    assert loaded.pad_token_id == loaded.eos_token_id
    rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}]
    rows.append({"input_ids": [9, 10], "attention_mask": [1, 1], "labels": [IGNORE_INDEX, 10]})
    batch = collate(rows, loaded.pad_token_id)
    assert batch["input_ids"][1].tolist() == [9, 10, loaded.eos_token_id, loaded.eos_token_id]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]
    model = models.build_tiny_model("llama", len(loaded), hidden_size=32, num_layers=1, num_heads=4, seed=2).eval()
    prompts = [loaded("Add the two numbers.\n\n2 + 3")["input_ids"], loaded("apple")["input_ids"]]
    kwargs = {"pad_token_id": loaded.pad_token_id, "eos_token_id": loaded.eos_token_id, "vocab_size": len(loaded)}
    together = generate_tokens(model, prompts, [6, 6], **kwargs)
    assert together == [generate_tokens(model, [p], [6], **kwargs)[0] for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linear_head_of_plain_models_reproduces_the_logits(arch):
    model = models.build_tiny_model(arch, 97, hidden_size=16, num_layers=1, num_heads=2).eval()
    weight, reason = models.linear_head(model)
    assert weight is model.get_output_embeddings().weight, reason
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1] @ weight.T, out.logits)


def test_linear_head_rejects_soft_capping_and_bias():
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        vocab_size=97,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=0.05,
    )  # below the random init's logit scale, so it bites
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gemma = AutoModelForCausalLM.from_config(config).eval()
    weight, reason = models.linear_head(gemma)
    assert weight is None and reason == (
        "Gemma2ForCausalLM's logits are transformed after the LM head (config.final_logit_softcapping = 0.05)"
    )
    # The capping is real: the plain product would be the wrong logits for this model.
    ids = torch.arange(10).view(2, 5)
    with torch.no_grad():
        out = gemma(input_ids=ids, output_hidden_states=True)
    product = out.hidden_states[-1] @ gemma.get_output_embeddings().weight.T
    assert not torch.allclose(product, out.logits, atol=1e-3)
    gemma.config.final_logit_softcapping = None
    assert models.linear_head(gemma)[0] is gemma.get_output_embeddings().weight

    llama = models.build_tiny_model("llama", 97, hidden_size=16, num_layers=1, num_heads=2)
    llama.set_output_embeddings(torch.nn.Linear(16, 97, bias=True))
    assert models.linear_head(llama) == (None, "LlamaForCausalLM's LM head has a bias")
    llama.set_output_embeddings(torch.nn.Identity())
    assert models.linear_head(llama) == (None, "LlamaForCausalLM's output embedding is Identity, not an nn.Linear")
    granite = models.build_tiny_model("llama", 97, hidden_size=16, num_layers=1, num_heads=2)
    granite.config.logits_scaling = 8.0
    assert models.linear_head(granite)[0] is None
    granite.config.logits_scaling = 1.0
    assert models.linear_head(granite)[0] is not None


def test_check_model_folder_names_the_field(tmp_path):
    folder = tmp_path / "m"
    with pytest.raises(FileNotFoundError, match=r"^models\.teacher: model folder not found: .*m$"):
        models.check_model_folder(folder, "models.teacher")
    assert not models.has_model_files(folder, need=())
    folder.mkdir()
    assert models.check_model_folder(folder, "models.tokenizer", need=()) == folder
    with pytest.raises(
        ConfigError, match=r"^models\.student: .*m is not a Hugging Face model folder \(no config\.json\)$"
    ):
        models.check_model_folder(folder, "models.student")
    assert not models.has_model_files(folder)
    (folder / models.MODEL_CONFIG).write_text("{}")
    assert models.check_model_folder(folder, "models.student") == folder
    assert models.has_model_files(folder)
    assert not models.has_model_files(folder, need=(models.MODEL_CONFIG, models.TOKENIZER_CONFIG))
    with pytest.raises(ConfigError, match=r"\(no tokenizer_config\.json\)"):
        models.check_model_folder(folder, "model_path", need=(models.MODEL_CONFIG, models.TOKENIZER_CONFIG))


def test_loading_and_saving_turn_the_progress_bars_off(tmp_path):
    # Each Ray worker is its own process: the bars must go off in the call that loads or saves a model.
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        models.build_tiny_model("llama", 64, hidden_size=8, num_layers=1, num_heads=2, save_dir=tmp_path / "m")
        assert not hf_logging.is_progress_bar_enabled()
        hf_logging.enable_progress_bar()
        models.load_model(tmp_path / "m")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_is_read_from_its_own_safetensors_file_alone(tied, tmp_path, tokenizer):
    """The hidden form's head (teacher_cache.save_teacher_head) from a sharded checkpoint whose other
    shards are gone: loading the model whole would fail, so the rows come from the head's file only."""
    import json

    model = models.build_tiny_model("llama", vocab_size=len(tokenizer) + 8, tie_embeddings=tied)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    head_file = index["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert len(set(index.values())) > 2  # the test means something only when most weights are elsewhere
    for file in set(index.values()) - {head_file}:
        (tmp_path / "sharded" / file).unlink()
    rows = models.output_embedding_rows(tmp_path / "sharded", len(tokenizer))
    assert rows.dtype == torch.float32
    assert torch.equal(rows, model.get_output_embeddings().weight[: len(tokenizer)])
    with pytest.raises(FileNotFoundError):
        models.load_model(tmp_path / "sharded")

    model.save_pretrained(tmp_path / "single")
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    assert torch.equal(models.output_embedding_rows(tmp_path / "single", 5), model.get_output_embeddings().weight[:5])

    # Without safetensors (a pickled state dict) the model is loaded whole, and the rows are the same.
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    assert torch.equal(models.output_embedding_rows(tmp_path / "pickled", 5), model.get_output_embeddings().weight[:5])
