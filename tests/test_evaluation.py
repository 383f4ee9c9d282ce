"""Evaluation: ROUGE-L / CE core without Ray, then `evaluate` on a local Ray cluster.

The models here use a word-level tokenizer over a small English vocabulary, so every generation is
a sequence of real words and ROUGE-L against references built from the same words is non-trivial.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rouge_score.rouge_scorer import RougeScorer

from pocl_ray.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    EvalSet,
    HFDataset,
    ModelsConfig,
    OutputConfig,
    RunConfig,
)
from pocl_ray.data import build_prompt, prepare_batch, read_table
from pocl_ray.eval_results import load_results, results_markdown, write_results
from pocl_ray.evaluation import (
    average,
    evaluate,
    evaluate_rows,
    greedy_rouge_sum,
    response_ce,
    rouge_l,
    set_data_configs,
    summarize,
)
from pocl_ray.models import build_tiny_model, load_model, load_tokenizer
from pocl_ray.report import compare_table
from pocl_ray.seeds import stream_seed

WORDS = (
    "apple river stone cloud green quick brown fox lazy dog bright moon silver tree small house "
    "north wind cold fire blue sea old road tell me about the a of and write short story"
).split()
EOS = "<|endoftext|>"
MAX_NEW = 6
SCORER = RougeScorer(["rougeL"], use_stemmer=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _word_tokenizer(save_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token="[UNK]")
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("word_model")
    tokenizer = _word_tokenizer(root)
    build_tiny_model(
        "gpt2",
        len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        seed=3,
        max_positions=128,
        save_dir=root,
        tokenizer=tokenizer,
    )
    return root, tokenizer, load_model(root, frozen=True)


def _records(n: int, offset: int) -> list[dict]:
    return [
        {
            "id": f"r{offset + i}",
            "instruction": f"tell me about the {WORDS[(offset + i) % 16]} " * (1 + i % 3),
            "input": WORDS[(offset + 2 * i) % 20] if i % 2 else "",
            "output": " ".join(WORDS[(offset + i + k) % 24] for k in range(5)),
        }
        for i in range(n)
    ]


def _as_rows(columns: dict) -> list[dict]:
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _prepared(tokenizer, records: list[dict], set_name: str = "s") -> list[dict]:
    columns = {k: [r[k] for r in records] for k in records[0]}
    out = prepare_batch(columns, tokenizer, DataConfig(train="unused", max_prompt_length=64, max_length=96))
    return [r | {"set": set_name} for r in _as_rows(out)]


def _greedy(model, tokenizer, record: dict) -> str:
    """The model's greedy response to one prompt, unbatched and unpadded."""
    ids = tokenizer(build_prompt(record["instruction"], record["input"], "dolly"), return_tensors="pt")["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=MAX_NEW,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------
# Pure core


def test_rouge_l_is_rouge_score_f1_times_100():
    pairs = [
        ("the quick brown fox", "the quick brown fox"),
        ("running dogs", "the dog ran"),
        ("apple river", "stone cloud"),
        ("Jumped over THE moon!", "the moon jumps"),
    ]
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == 100 * SCORER.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l("a b c", "a b c") == 100.0
    assert rouge_l("apple river", "stone cloud") == 0.0
    assert 0 < rouge_l("running dogs", "the dog ran") < 100  # stemming: dogs ~ dog


def test_the_rouge_scorer_is_built_without_a_log_line(caplog):
    from pocl_ray.measurers import rouge_l_scorer

    with caplog.at_level(logging.INFO):
        RougeScorer(["rougeL"], use_stemmer=True)
    assert "Using default tokenizer" in caplog.text  # what every worker's log showed
    caplog.clear()
    with caplog.at_level(logging.INFO):
        scorer = rouge_l_scorer()
    assert caplog.text == ""
    assert scorer.score("the dog ran", "running dogs") == SCORER.score("the dog ran", "running dogs")


def test_row_seed_depends_on_seed_set_and_id_only():
    assert stream_seed(10, "dolly", "a") == stream_seed(10, "dolly", "a")
    seeds = {stream_seed(s, n, i) for s in (10, 20) for n in ("dolly", "vicuna") for i in ("a", "b")}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_evaluate_rows_greedy_matches_unbatched_generate(word_model):
    _, tokenizer, model = word_model
    records = _records(6, 0)
    rows = _prepared(tokenizer, records)
    out = evaluate_rows(
        model, tokenizer, rows, EvalConfig(seeds=[1, 2], temperature=0, max_new_tokens=MAX_NEW, batch_size=4)
    )
    for record, row in zip(records, out):
        expected = _greedy(model, tokenizer, record)
        assert row["generations"] == [expected, expected]
        score = 100 * SCORER.score(record["output"], expected)["rougeL"].fmeasure
        assert row["rougeL"] == [score, score]
        assert row["ce"] > 0 and row["reject_reason"] is None


def test_greedy_rouge_sum_is_the_greedy_eval_within_each_rows_response_budget(word_model):
    _, tokenizer, model = word_model
    rows = _prepared(tokenizer, _records(7, 5))
    greedy = evaluate_rows(
        model, tokenizer, rows, EvalConfig(seeds=[1], temperature=0, max_new_tokens=MAX_NEW, batch_size=4)
    )
    # With room for MAX_NEW tokens after every prompt, it is the greedy evaluation's ROUGE-L summed.
    total = greedy_rouge_sum(model, tokenizer, rows, max_new_tokens=MAX_NEW, max_length=96, batch_size=3)
    assert total == pytest.approx(sum(r["rougeL"][0] for r in greedy), abs=1e-9)
    # Against its own MAX_NEW-token responses the model scores 100 on each row, unless data.max_length
    # leaves a row less room after its prompt: then the row gets only that many tokens.
    own = [row | {"response": g["generations"][0]} for row, g in zip(rows, greedy) if g["generations"][0]]
    assert greedy_rouge_sum(
        model, tokenizer, own, max_new_tokens=MAX_NEW, max_length=96, batch_size=3
    ) == pytest.approx(100 * len(own))
    max_length = max(r["num_prompt_tokens"] for r in own) + 2
    expected = 0.0
    for row in own:
        prompt = torch.tensor([row["input_ids"][: row["num_prompt_tokens"]]])
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=min(MAX_NEW, max_length - prompt.shape[1]),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
        expected += 100 * SCORER.score(row["response"], text)["rougeL"].fmeasure
    assert expected < 100 * len(own)
    assert greedy_rouge_sum(
        model, tokenizer, own, max_new_tokens=MAX_NEW, max_length=max_length, batch_size=3
    ) == pytest.approx(expected, abs=1e-9)


def test_greedy_rouge_sum_prints_its_progress_and_decodes_the_same(word_model, capsys, monkeypatch):
    """The dev work of a selection point is no silent minute: with a label it prints the progress line
    of the other stages (rows done, rows/s, ETA), and decodes in the same batches (the same sum)."""
    import pocl_ray.evaluation

    _, tokenizer, model = word_model
    rows = _prepared(tokenizer, _records(7, 5))
    quiet = greedy_rouge_sum(model, tokenizer, rows, max_new_tokens=MAX_NEW, max_length=96, batch_size=3)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(pocl_ray.evaluation, "PROGRESS_SECONDS", 0.0)  # a line after every batch
    told = greedy_rouge_sum(
        model, tokenizer, rows, max_new_tokens=MAX_NEW, max_length=96, batch_size=3, progress="train: dev ROUGE-L"
    )
    assert told == quiet
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" rows")[0] for line in lines] == [
        "[train: dev ROUGE-L] 3/7",
        "[train: dev ROUGE-L] 6/7",
        "[train: dev ROUGE-L] 7/7",
    ]
    assert all(re.search(r"rows \(\d+%\), [\d.]+ rows/s, ETA \S+$", line) for line in lines), lines


def test_evaluate_rows_sampling_is_independent_of_batching(word_model):
    _, tokenizer, model = word_model
    rows = _prepared(tokenizer, _records(7, 3))
    cfg = EvalConfig(seeds=[1, 2], temperature=1.0, top_p=0.9, max_new_tokens=MAX_NEW, batch_size=3)
    runs = [evaluate_rows(model, tokenizer, rows, cfg.model_copy(update={"batch_size": b})) for b in (1, 3, 8)]
    runs.append(evaluate_rows(model, tokenizer, rows[::-1], cfg)[::-1])
    for run in runs[1:]:
        assert [r["generations"] for r in run] == [r["generations"] for r in runs[0]]
        assert all(math.isclose(a["ce"], b["ce"], rel_tol=1e-5) for a, b in zip(run, runs[0]))
    for row, r in zip(rows, runs[0]):
        assert r["rougeL"] == [100 * SCORER.score(row["response"], g)["rougeL"].fmeasure for g in r["generations"]]
    # Different seeds draw different samples.
    assert any(r["generations"][0] != r["generations"][1] for r in runs[0])


def test_response_ce_matches_per_row_reference(word_model):
    _, tokenizer, model = word_model
    rows = _prepared(tokenizer, _records(6, 1))
    got = response_ce(model, rows, tokenizer.pad_token_id, len(tokenizer))
    for row, ce in zip(rows, got):
        # The per-row reference: HF's own loss on the unpadded row (mean CE over the response labels).
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels).loss.item()
        assert ce == pytest.approx(expected, rel=1e-5)


def test_evaluate_rows_passes_rejected_rows_through(word_model):
    _, tokenizer, model = word_model
    records = _records(3, 0)
    records[1]["output"] = "   "
    out = evaluate_rows(model, tokenizer, _prepared(tokenizer, records), EvalConfig(seeds=[1], max_new_tokens=MAX_NEW))
    assert "empty field 'response'" in out[1]["reject_reason"]
    assert out[1]["generations"] == [] and out[1]["ce"] is None
    assert len(out[0]["generations"]) == len(out[2]["generations"]) == 1


def _row(set_name, row_id, rouge, ce, reason=None):
    return {
        "set": set_name,
        "id": row_id,
        "reject_reason": reason,
        "ce": ce,
        "generations": ["x"] * len(rouge),
        "rougeL": rouge,
    }


def test_summarize_means_std_rejects_and_duplicates():
    rows = [
        _row("a", "1", [10.0, 20.0], 2.0),
        _row("a", "2", [30.0, 60.0], 4.0),
        _row("a", "3", [], None, "empty field 'response'"),
        _row("a", "2", [99.0, 99.0], 9.0),  # duplicate id: rejected, not averaged
        _row("b", "1", [50.0, 50.0], 1.0),
        _row("c", "1", [], None, "line 1: invalid JSON"),
    ]
    sets, rejected, scored = summarize(rows, ["a", "b", "c"], [10, 20])
    a = sets["a"]
    assert a["rougeL_per_seed"] == {"10": 20.0, "20": 40.0}
    assert a["rougeL_mean"] == 30.0 and a["rougeL_std"] == 10.0  # population std of (20, 40)
    assert a["ce_mean"] == 3.0
    assert (a["rows"], a["rows_rejected"], a["rows_in"]) == (2, 2, 4)
    assert sets["b"]["rougeL_std"] == 0.0
    assert sets["c"]["rougeL_mean"] is None and sets["c"]["rows_rejected"] == 1
    assert [r["reason"] for r in rejected if r["set"] == "a"] == [
        "empty field 'response'",
        "duplicate id '2' (first seen at row 1)",
    ]
    assert [(r["set"], r["id"]) for r in scored] == [("a", "1"), ("a", "2"), ("b", "1")]
    assert average(sets) == {"rougeL_mean": 40.0, "ce_mean": 2.0}


def _results(label, sets_values, seeds=(10, 20)):
    rows = [_row(name, str(i), list(v), 1.0 + i) for name, vals in sets_values.items() for i, v in enumerate(vals)]
    sets, _, _ = summarize(rows, list(sets_values), list(seeds))
    return {
        "model": f"/models/{label}",
        "label": label,
        "sets": sets,
        "average": average(sets),
        "config": {"seeds": list(seeds), "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8},
        "wall_seconds": 1.5,
    }


def test_markdown_tables_hold_the_numbers(tmp_path):
    pocl = _results("pocl", {"dolly": [(20.0, 24.0)], "vicuna": [(10.0, 10.0)]})
    base = _results("baseline", {"dolly": [(15.0, 15.0)]})
    md = results_markdown(pocl)
    cells = "\n".join(" ".join(line.split()) for line in md.splitlines())  # to_markdown pads cells
    assert "| dolly | 1 | 0 | 22.00 | 2.00 | 20.00 | 24.00 | 1.000 |" in cells
    assert "| **average** |" in cells and "16.00" in cells
    table = "\n".join(" ".join(line.split()) for line in compare_table({"pocl": pocl, "baseline": base}).splitlines())
    assert "| set | pocl | baseline |" in table
    assert "| dolly | 22.00 ± 2.00 | 15.00 ± 0.00 |" in table
    assert "| vicuna | 10.00 ± 0.00 | – |" in table
    path = write_results(
        pocl, tmp_path / "eval" / "pocl", [{"set": "dolly", "id": "0", "seed": 10, "generation": "x", "rougeL": 20.0}]
    )
    assert load_results(path) == pocl == load_results(path.parent)
    assert (path.parent / "results.md").read_text() == md
    assert json.loads((path.parent / "generations.jsonl").read_text())["rougeL"] == 20.0


# ---------------------------------------------------------------------------------------------
# Input errors (raised before any Ray work)


def _config(model_dir, sets, out_dir, **eval_kwargs) -> RunConfig:
    return RunConfig(
        data=DataConfig(train=str(sets[0].path), max_prompt_length=64, max_length=96),
        models=ModelsConfig(teacher=str(model_dir)),
        eval=EvalConfig(sets=sets, max_new_tokens=MAX_NEW, **eval_kwargs),
        output=OutputConfig(dir=str(out_dir)),
    )


def test_bad_inputs_name_the_field(tmp_path, word_model):
    root, _, _ = word_model
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps(_records(1, 0)[0]) + "\n")
    sets = [EvalSet(name="a", path=str(good)), EvalSet(name="b", path=str(tmp_path / "missing.jsonl"))]
    with pytest.raises(FileNotFoundError, match=r"eval.sets\[1\].path \(set 'b'\)"):
        evaluate(_config(root, sets, tmp_path), root)
    with pytest.raises(FileNotFoundError, match="model_path: model folder not found"):
        evaluate(_config(root, sets[:1], tmp_path), tmp_path / "no_model")
    with pytest.raises(ConfigError, match="eval.sets is empty"):
        evaluate(_config(root, sets[:1], tmp_path).with_overrides({"eval.sets": []}), root)
    with pytest.raises(ConfigError, match="duplicate set names"):
        evaluate(_config(root, [sets[0], sets[0]], tmp_path), root)
    assert not (tmp_path / "eval").exists()


def _write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


DIALOG = [{"role": "user", "content": "the moon"}, {"role": "assistant", "content": "a silver tree"}]


def test_a_conversation_set_without_chat_template_fails_before_ray(tmp_path, word_model):
    """The word tokenizer has no chat template: evaluating a conversation set fails naming the set and the
    tokenizer, before any Ray work (this test is not marked `ray`: starting Ray would fail it)."""
    root, _, _ = word_model
    sets = [
        EvalSet(name="plain", path=str(_write_jsonl(tmp_path / "plain.jsonl", _records(2, 0)))),
        EvalSet(name="talk", path=str(_write_jsonl(tmp_path / "talk.jsonl", [{"id": "t", "messages": DIALOG}]))),
    ]
    expected = (
        r"^eval\.sets\[1\] \(set 'talk'\): conversation rows are rendered by the tokenizer's chat template; "
        rf"tokenizer {re.escape(str(root))} has none$"
    )
    with pytest.raises(ConfigError, match=expected):
        evaluate(_config(root, sets, tmp_path), root)
    assert not (tmp_path / "eval").exists()


def test_each_sets_row_form_is_decided_once_for_the_whole_set(tmp_path, word_model):
    """A folder whose first file holds conversations and whose second lacks the messages column is read as
    conversations throughout, so a batch holding only the second file's row rejects it rather than read
    it as an instruction; an instruction set beside it stays one. Every set's CE is on its last turn."""
    _, tokenizer, _ = word_model
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = WORD_CHAT_TEMPLATE
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_jsonl(mixed / "a.jsonl", [{"id": "a", "messages": DIALOG + DIALOG}])
    lone = _write_jsonl(mixed / "b.jsonl", _records(1, 0))
    plain = _write_jsonl(tmp_path / "plain.jsonl", _records(2, 0))
    sets = [EvalSet(name="mixed", path=str(mixed)), EvalSet(name="plain", path=str(plain))]
    cfg = _config(tmp_path / "model", sets, tmp_path)
    mixed_cfg, plain_cfg = set_data_configs(cfg, chat_tokenizer)
    assert (mixed_cfg.row_form, plain_cfg.row_form) == ("conversation", "instruction")
    assert mixed_cfg.train_on == plain_cfg.train_on == "last_assistant"
    out = prepare_batch(read_table(lone).to_pydict(), chat_tokenizer, mixed_cfg)
    assert out["reject_reason"][0].startswith("missing field 'messages'")
    assert not prepare_batch(read_table(lone).to_pydict(), chat_tokenizer, cfg.data)["reject_reason"][0]
    talk = _write_jsonl(tmp_path / "talk.jsonl", [{"id": "t", "messages": DIALOG + DIALOG}])
    last = set_data_configs(cfg.with_overrides({"eval.sets": [EvalSet(name="t", path=str(talk))]}), chat_tokenizer)
    row = prepare_batch(read_table(talk).to_pydict(), chat_tokenizer, last[0])
    scored = [t for t, label in zip(row["input_ids"][0], row["labels"][0]) if label != -100]
    assert chat_tokenizer.decode(scored).split() == ["a", "silver", "tree", EOS]  # the last turn only
    forced = set_data_configs(cfg.with_overrides({"data.row_form": "instruction"}), chat_tokenizer)
    assert [c.row_form for c in forced] == ["instruction", "instruction"]


# ---------------------------------------------------------------------------------------------
# Ray pipeline


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory, word_model):
    """Set "chat" (JSONL with 3 bad lines) and set "facts" (parquet); references are built from the
    model's own greedy output so ROUGE-L lands strictly between 0 and 100."""
    root = tmp_path_factory.mktemp("eval_sets")
    _, tokenizer, model = word_model
    sets = {}
    for name, n, offset in (("chat", 5, 0), ("facts", 4, 7)):
        records = _records(n, offset)
        for i, r in enumerate(records):
            words = _greedy(model, tokenizer, r).split()
            r["output"] = " ".join(words[: 1 + i % 3] + ["silver", "moon", "road"][: 1 + i % 2])
        sets[name] = records
    chat = root / "chat.jsonl"
    bad = [
        '{"id": "bad-1", "instruction": "tell me", "output": ""}',
        "this is not json",
        json.dumps(sets["chat"][0]),
    ]  # the third one repeats an id: rejected as a duplicate
    chat.write_text("".join(json.dumps(r) + "\n" for r in sets["chat"]) + "\n".join(bad) + "\n")
    facts = root / "facts.parquet"
    pq.write_table(pa.Table.from_pylist(sets["facts"]), facts)
    return sets, [EvalSet(name="chat", path=str(chat)), EvalSet(name="facts", path=str(facts))]


def test_evaluate_sampling_does_not_depend_on_batching_actors_or_ray(ray_local, tmp_path, word_model, eval_sets):
    """Two actors with one row per batch give exactly what one process gives with batches of 4."""
    root, tokenizer, model = word_model
    _, sets = eval_sets
    cfg = _config(root, sets, tmp_path, seeds=[1, 2, 3], batch_size=1, num_actors=2)
    result = evaluate(cfg, root, label=None)
    assert result.results_path == tmp_path / "eval" / "results.json"
    res = load_results(result.results_path)

    rows = []
    for s in sets:
        table = read_table(s.path)
        rows += [r | {"set": s.name} for r in _as_rows(prepare_batch(table.to_pydict(), tokenizer, cfg.data))]
    local = evaluate_rows(model, tokenizer, rows, cfg.eval.model_copy(update={"batch_size": 4}))
    expected, _, scored = summarize(local, ["chat", "facts"], cfg.eval.seeds)
    for name in ("chat", "facts"):
        assert res["sets"][name]["rougeL_per_seed"] == expected[name]["rougeL_per_seed"]
        assert math.isclose(res["sets"][name]["ce_mean"], expected[name]["ce_mean"], rel_tol=1e-5)
        assert all(0 <= v <= 100 for v in res["sets"][name]["rougeL_per_seed"].values())
        assert 0 <= res["sets"][name]["rougeL_std"] <= 100
    generations = [json.loads(line) for line in (result.output_dir / "generations.jsonl").read_text().splitlines()]
    assert [g["generation"] for g in generations] == [t for r in scored for t in r["generations"]]
    assert len(set(res["sets"]["chat"]["rougeL_per_seed"].values())) > 1 and res["sets"]["chat"]["rougeL_std"] > 0


# A chat template over the word vocabulary: "tell me <user turn> write <assistant turn> <|endoftext|>".
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'tell me ' + m['content'] + ' ' }}"
    "{% else %}{{ 'write ' + m['content'] + ' <|endoftext|> ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'write ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def conversation_sets(tmp_path_factory):
    """Set "sharegpt" (ShareGPT JSONL) and set "by_name" (a `messages` folder read by datasets.load_dataset),
    3 dialogs each, and the dialogs (the last assistant turn is the one generated and scored)."""
    root = tmp_path_factory.mktemp("conversation_sets")
    dialogs = [
        [{"role": "user", "content": f"the {WORDS[i]}"}, {"role": "assistant", "content": f"a {WORDS[i + 1]} tree"}]
        + [{"role": "user", "content": "and the sea"}, {"role": "assistant", "content": f"old {WORDS[i + 2]} road"}][
            : 2 * (i % 2)
        ]
        for i in range(6)
    ]
    sharegpt = root / "sharegpt.jsonl"
    role = {"user": "human", "assistant": "gpt"}
    sharegpt.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "conversations": [{"from": role[m["role"]], "value": m["content"]} for m in d]})
            + "\n"
            for i, d in enumerate(dialogs[:3])
        )
    )
    folder = root / "dialogs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "test.jsonl").write_text(
        "".join(json.dumps({"id": f"m{i}", "messages": d}) + "\n" for i, d in enumerate(dialogs[3:]))
    )
    sets = [
        EvalSet(name="sharegpt", path=str(sharegpt)),
        EvalSet(name="by_name", path=HFDataset(dataset=str(folder), split="test")),
    ]
    return dialogs, sets


@pytest.fixture(scope="module")
def greedy_eval(ray_local, tmp_path_factory, word_model, eval_sets, conversation_sets):
    """(output dir, model folder, result) of one greedy `evaluate` of the word model, saved with
    WORD_CHAT_TEMPLATE, on the instruction sets (`eval_sets`) and the conversation sets together: instruction
    rows use the run's template (dolly), so the chat template changes only the conversation sets' prompts."""
    import datasets

    root = tmp_path_factory.mktemp("greedy_eval")
    _, tokenizer, model = word_model
    chat_root = root / "chat_model"
    model.save_pretrained(chat_root)
    tokenizer.chat_template = WORD_CHAT_TEMPLATE
    try:
        tokenizer.save_pretrained(chat_root)
    finally:
        tokenizer.chat_template = None
    sets = eval_sets[1] + conversation_sets[1]
    cfg = _config(chat_root, sets[:1], root, seeds=[10, 20], temperature=0.0, batch_size=2, length_sort_batches=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_cache")
        result = evaluate(cfg.with_overrides({"eval.sets": sets}), chat_root, label="student")
    return root, chat_root, result


def test_evaluate_greedy_matches_rouge_score(greedy_eval, word_model, eval_sets):
    _, tokenizer, model = word_model
    out, chat_root, result = greedy_eval
    records, _ = eval_sets
    assert result.results_path == out / "eval" / "student" / "results.json"
    res = load_results(result.results_path)
    assert res["label"] == "student" and res["model"] == str(chat_root)
    for name, rows in records.items():
        expected = [100 * SCORER.score(r["output"], _greedy(model, tokenizer, r))["rougeL"].fmeasure for r in rows]
        s = res["sets"][name]
        assert 0 < statistics.fmean(expected) < 100
        assert s["rougeL_per_seed"] == {"10": statistics.fmean(expected), "20": statistics.fmean(expected)}
        assert s["rougeL_mean"] == statistics.fmean(expected) and s["rougeL_std"] == 0.0
        assert s["rows"] == len(rows) and s["ce_mean"] > 0
    assert [s["rows_rejected"] for s in res["sets"].values()] == [3, 0, 0, 0]
    assert list(res["sets"]) == ["chat", "facts", "sharegpt", "by_name"]
    assert res["average"]["rougeL_mean"] == statistics.fmean([s["rougeL_mean"] for s in res["sets"].values()])
    generations = [json.loads(line) for line in (result.output_dir / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 * (5 + 4 + 3 + 3)
    by_id = {(g["set"], g["id"], g["seed"]): g for g in generations}
    for r in records["chat"]:
        g = by_id[("chat", r["id"], 20)]
        assert g["generation"] == _greedy(model, tokenizer, r)
        assert g["rougeL"] == 100 * SCORER.score(r["output"], g["generation"])["rougeL"].fmeasure
    rejected = [json.loads(line) for line in (result.output_dir / "rejected.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"].split(" ")[0] + " " + r["reason"].split(" ")[1] for r in rejected)
    assert len(rejected) == 3 and {r["set"] for r in rejected} == {"chat"}
    assert reasons == ["duplicate id", "empty field", "line 7:"]
    assert f"{res['sets']['chat']['rougeL_mean']:.2f}" in (result.output_dir / "results.md").read_text()


def test_evaluate_reads_conversation_sets_and_datasets_by_name(greedy_eval, word_model, conversation_sets):
    """A ShareGPT JSONL set and a `messages` set read by datasets.load_dataset: each row's last assistant
    turn is generated from the conversation before it and scored against it."""
    _, _, model = word_model
    _, chat_root, result = greedy_eval
    dialogs, _ = conversation_sets
    chat_tokenizer = load_tokenizer(chat_root)
    res = load_results(result.results_path)
    folder = str(conversation_sets[1][1].path.dataset)
    assert res["sets"]["by_name"]["path"] == {"dataset": folder, "split": "test", "subset": None, "revision": None}
    generations = {
        g["id"]: g
        for g in map(json.loads, (result.output_dir / "generations.jsonl").read_text().splitlines())
        if g["set"] in ("sharegpt", "by_name") and g["seed"] == 10
    }
    assert sorted(generations) == ["d0", "d1", "d2", "m0", "m1", "m2"]
    for i, dialog in enumerate(dialogs):
        prompt = chat_tokenizer.apply_chat_template(dialog[:-1], tokenize=False, add_generation_prompt=True)
        ids = chat_tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0, eos_token_id=0)
        expected = chat_tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True).strip()
        g = generations[f"{'d' if i < 3 else 'm'}{i % 3}"]
        assert g["generation"] == expected
        assert g["rougeL"] == 100 * SCORER.score(dialog[-1]["content"], expected)["rougeL"].fmeasure
    conversations = [res["sets"][name] for name in ("sharegpt", "by_name")]
    assert all(s["rows"] == 3 and s["rows_rejected"] == 0 and s["ce_mean"] > 0 for s in conversations)
