"""Conversation rows (pocl_ray.conversations through data.prepare_batch): rendering with a real Jinja chat
template with and without {% generation %} blocks, labels on the assistant turns, whole-turn truncation,
malformed rows, and what the difficulty measurer generates and scores. No Ray."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pocl_ray import conversations, data
from pocl_ray.config import DataConfig, load_config
from pocl_ray.measurers import MeasurerModels, measure, rouge_l_scorer
from pocl_ray.models import build_tiny_model, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT_DATA = REPO / "data" / "chat_quickstart"

# ChatML as Qwen2.5 writes it (a default system turn when the conversation has none), in two versions:
# with {% generation %} blocks around what an assistant turn owns, and without any (the tokenizer's own
# template from models.build_tiny_tokenizer is a third, plainer ChatML without a default system turn).
_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
)
_TURNS = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{ASSISTANT}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_CHATML = _SYSTEM + _TURNS.replace("{ASSISTANT}", "{{- message['content'] + '<|im_end|>' }}")
QWEN_CHATML_MARKED = _SYSTEM + _TURNS.replace(
    "{ASSISTANT}", "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Good morning, how are you?"},
    {"role": "assistant", "content": "I am doing well, how about you?"},
    {"role": "user", "content": "I'm also good."},
    {"role": "assistant", "content": "That's good to hear."},
    {"role": "user", "content": "What is your favorite book?"},
    {"role": "assistant", "content": "I can't read."},
]


def _chat_texts() -> list[str]:
    rows = [json.loads(line) for line in (CHAT_DATA / "train.jsonl").read_text().splitlines()]
    return [" ".join(m["content"] for m in r["messages"]) for r in rows]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(_chat_texts(), vocab_size=512)


def _with_template(tokenizer, template: str):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"train": "unused", "max_prompt_length": 200, "max_length": 256, **kw})


def _scored_runs(row: dict) -> list[list[int]]:
    """The label-carrying tokens of a prepared row, one list per contiguous run."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(row["input_ids"], row["labels"]):
        scored = label != data.IGNORE_INDEX
        if scored:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = scored
    return runs


def _render(tok, messages, generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("template", ["plain", "qwen", "qwen_marked"])
def test_label_masked_tokens_decode_to_exactly_the_assistant_turns(tokenizer, template):
    tok = (
        tokenizer
        if template == "plain"
        else _with_template(tokenizer, {"qwen": QWEN_CHATML, "qwen_marked": QWEN_CHATML_MARKED}[template])
    )
    assert conversations.marks_assistant_tokens(tok) == (template == "qwen_marked")
    good, rejects = data.validate_and_tokenize([{"messages": CONVERSATION}], tok, _cfg())
    assert not rejects
    row = good[0]
    assistant = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(run) for run in _scored_runs(row)] == assistant
    # The tokens are the rendered conversation's, up to the end of its last assistant turn.
    assert tok.decode(row["input_ids"]) == _render(tok, CONVERSATION).rstrip()
    assert row["num_response_tokens"] == sum(len(run) for run in _scored_runs(row))


def test_templates_with_and_without_generation_blocks_give_the_same_rows(tokenizer):
    rows = [
        data.validate_and_tokenize([{"messages": CONVERSATION}], _with_template(tokenizer, t), _cfg())[0][0]
        for t in (QWEN_CHATML, QWEN_CHATML_MARKED)
    ]
    assert rows[0] == rows[1]


def test_last_assistant_scores_only_the_last_turn(tokenizer):
    all_turns = data.validate_and_tokenize([{"messages": CONVERSATION}], tokenizer, _cfg())[0][0]
    last = data.validate_and_tokenize([{"messages": CONVERSATION}], tokenizer, _cfg(train_on="last_assistant"))[0][0]
    assert last["input_ids"] == all_turns["input_ids"]
    assert [tokenizer.decode(run) for run in _scored_runs(last)] == ["I can't read.<|im_end|>"]
    assert len(_scored_runs(all_turns)) == 3
    assert last["num_prompt_tokens"] == all_turns["num_prompt_tokens"]


def test_measurer_prompt_is_the_conversation_before_the_last_assistant_turn(tokenizer):
    row = data.validate_and_tokenize([{"messages": CONVERSATION}], tokenizer, _cfg())[0][0]
    prompt = row["input_ids"][: row["num_prompt_tokens"]]
    assert tokenizer.decode(prompt) == _render(tokenizer, CONVERSATION[:-1], generation_prompt=True)
    assert row["prompt"] == _render(tokenizer, CONVERSATION[:-1], generation_prompt=True)
    assert row["response"] == "I can't read."


def test_measurer_generates_the_last_turn_and_scores_the_assistant_tokens(tokenizer):
    """measurers.measure (unchanged) on conversation rows: ROUGE-L of the greedy continuation of the
    conversation before the last assistant turn against that turn, CE over every scored assistant token."""
    model = build_tiny_model("llama", len(tokenizer), hidden_size=32, num_layers=2, seed=3, tokenizer=tokenizer)
    model.eval()
    second = CONVERSATION[:3] + [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "No."},
    ]
    good, _ = data.validate_and_tokenize([{"messages": CONVERSATION}, {"messages": second}], tokenizer, _cfg())
    rows = {k: [r[k] for r in good] for k in good[0]}
    models = MeasurerModels(tokenizer, model, None, torch.device("cpu"), rouge_l_scorer())
    scores = measure(models, rows, ["student_ce", "student_rougeL"], batch_size=2, max_new_tokens=6)
    scorer = rouge_l_scorer()
    for k, (conversation, row) in enumerate(zip([CONVERSATION, second], good)):
        text = _render(tokenizer, conversation[:-1], generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        expected = scorer.score(conversation[-1]["content"], generated)["rougeL"].fmeasure
        assert scores["student_rougeL"][k] == pytest.approx(expected)
        with torch.no_grad():
            logits = model(torch.tensor([row["input_ids"]])).logits[0]
        labels = torch.tensor(row["labels"])
        scored = (labels[1:] != data.IGNORE_INDEX).nonzero().squeeze(-1)
        ce = torch.nn.functional.cross_entropy(logits[scored], labels[1:][scored])
        assert len(scored) == row["num_response_tokens"] > len(row["input_ids"]) - row["num_prompt_tokens"]
        assert scores["student_ce"][k] == pytest.approx(ce.item(), rel=1e-5)


def test_truncation_keeps_whole_final_turns(tokenizer):
    long = [CONVERSATION[0]] + [
        {"role": role, "content": f"{text} number {k}."}
        for k in range(8)
        for role, text in (("user", "Tell me something"), ("assistant", "Here is a fact"))
    ]
    full = data.validate_and_tokenize([{"messages": long}], tokenizer, _cfg(max_length=1024, max_prompt_length=1000))
    limit = len(full[0][0]["input_ids"]) // 2
    good, rejects = data.validate_and_tokenize(
        [{"messages": long}], tokenizer, _cfg(max_length=limit, max_prompt_length=limit - 1)
    )
    assert not rejects
    row = good[0]
    kept = next(
        k
        for k in range(1, len(long), 2)
        if tokenizer.decode(row["input_ids"]) == _render(tokenizer, long[:1] + long[k:]).rstrip()
    )
    assert 1 < kept < len(long) - 2  # the system turn and some whole exchanges at the end
    assert len(row["input_ids"]) <= limit
    # As many turns as fit: one more exchange does not.
    more = tokenizer(_render(tokenizer, long[:1] + long[kept - 2 :]).rstrip(), add_special_tokens=False)["input_ids"]
    assert len(more) > limit
    assert [tokenizer.decode(r) for r in _scored_runs(row)] == [
        m["content"] + "<|im_end|>" for m in long[kept:] if m["role"] == "assistant"
    ]


def test_prompt_limit_drops_turns_and_a_conversation_that_cannot_fit_is_rejected(tokenizer):
    good, _ = data.validate_and_tokenize([{"messages": CONVERSATION}], tokenizer, _cfg())
    whole = good[0]
    short_prompt = data.validate_and_tokenize(
        [{"messages": CONVERSATION}], tokenizer, _cfg(max_prompt_length=whole["num_prompt_tokens"] - 1)
    )[0][0]
    assert short_prompt["num_prompt_tokens"] < whole["num_prompt_tokens"]
    assert short_prompt["response"] == whole["response"]
    good, rejects = data.validate_and_tokenize(
        [{"id": "big", "messages": CONVERSATION}], tokenizer, _cfg(max_length=12, max_prompt_length=8)
    )
    assert not good
    assert rejects[0]["id"] == "big"
    assert rejects[0]["reason"].startswith("conversation too long: even its last exchange takes")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "turn 1: unknown role 'tool'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
            "turn 1 (assistant): empty 'content'",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": "there"}], "has no assistant turn"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}],
            "'content' must be a string, got int",
        ),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}], "'value' must be a string, got NoneType"),
        ([{"content": "hi"}], "turn 0 has no role"),
        (["hi", "there"], "turn 0 must be an object"),
        ("hi there", "must be a list of turns, got str"),
        ([], "has no assistant turn"),
    ],
)
def test_malformed_conversations_are_rejected_naming_the_row_and_turn(tokenizer, value, reason):
    good, rejects = data.validate_and_tokenize(
        [{"id": "fine", "messages": CONVERSATION}, {"id": "bad", "messages": value}], tokenizer, _cfg()
    )
    assert [r["id"] for r in good] == ["fine"]
    assert [(r["row"], r["id"]) for r in rejects] == [(1, "bad")]
    assert reason in rejects[0]["reason"]
    assert "column 'messages'" in rejects[0]["reason"]


def test_sharegpt_and_messages_forms_give_the_same_rows(tokenizer):
    sharegpt = [
        {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
        for m in CONVERSATION
    ]
    good, rejects = data.validate_and_tokenize(
        [{"messages": CONVERSATION}, {"conversations": sharegpt}], tokenizer, _cfg()
    )
    assert len(good) == 1  # the same conversation twice: one content id, the second is a duplicate
    assert rejects[0]["reason"].startswith("duplicate id")
    alone = data.validate_and_tokenize([{"conversations": sharegpt}], tokenizer, _cfg())[0][0]
    assert {k: v for k, v in alone.items() if k != "row"} == {k: v for k, v in good[0].items() if k != "row"}


def test_trailing_user_turns_are_dropped(tokenizer):
    tail = CONVERSATION + [{"role": "user", "content": "Anything else?"}]
    assert (
        data.validate_and_tokenize([{"messages": tail}], tokenizer, _cfg())[0][0]["input_ids"]
        == (data.validate_and_tokenize([{"messages": CONVERSATION}], tokenizer, _cfg())[0][0]["input_ids"])
    )


def test_row_form_is_detected_per_dataset_or_set(tokenizer):
    cfg = _cfg()
    assert data.row_form(["id", "messages"], cfg) == "conversation"
    assert data.row_form(["conversations"], cfg) == "conversation"
    assert data.row_form(["instruction", "output"], cfg) == "instruction"
    assert data.row_form(["messages"], _cfg(row_form="instruction")) == "instruction"
    rows = [{"instruction": "Say hi.", "output": "hi", "messages": CONVERSATION}]
    forced = data.validate_and_tokenize(rows, tokenizer, _cfg(row_form="instruction"))[0][0]
    assert forced["response"] == "hi"
    good, rejects = data.validate_and_tokenize(
        [{"instruction": "Say hi.", "output": "hi"}], tokenizer, _cfg(row_form="conversation")
    )
    assert not good and rejects[0]["reason"].startswith("missing field 'messages'")


def test_the_row_form_is_pinned_once_per_dataset(tmp_path):
    """A dataset whose first file holds conversations and whose second lacks the messages column is read
    as conversations throughout (the rows of the second are then rejected, not read as instructions)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": "a", "messages": CONVERSATION}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"id": "b", "instruction": "Say hi.", "output": "hi"}) + "\n")
    assert data.pinned_row_form(str(folder), _cfg()).row_form == "conversation"
    assert data.row_form(data.read_table(str(folder / "b.jsonl")).column_names, _cfg()) == "instruction"
    forced = _cfg(row_form="instruction")
    assert data.pinned_row_form(str(folder), forced) is forced


def test_templates_that_rewrite_earlier_turns_are_rejected_not_misread(tokenizer):
    counting = _with_template(tokenizer, "{{ messages | length }} turns\n" + QWEN_CHATML)
    good, rejects = data.validate_and_tokenize([{"messages": CONVERSATION}], counting, _cfg())
    assert not good
    assert "give it {% generation %} blocks" in rejects[0]["reason"]


def test_a_tokenizer_without_chat_template_is_an_error(tokenizer):
    plain = _with_template(tokenizer, QWEN_CHATML)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has none"):
        data.validate_and_tokenize([{"messages": CONVERSATION}], plain, _cfg())


def test_stop_tokens_include_the_templates_end_of_turn(tokenizer):
    ids = conversations.stop_token_ids(tokenizer)
    assert ids == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_the_shipped_conversational_data_prepares(tokenizer):
    """data/chat_quickstart with configs/quickstart-chat.yaml's lengths: every row parses; the only
    rejects are conversations whose last exchange alone is too long; the 36-exchange one is cut."""
    cfg = load_config(REPO / "configs" / "quickstart-chat.yaml")
    for name in ("train.jsonl", "dev.jsonl", "test_chatterbot.jsonl"):
        records = data.read_table(CHAT_DATA / name).to_pylist()
        assert data.row_form(records[0], cfg.data) == "conversation"
        good, rejects = data.validate_and_tokenize(records, tokenizer, cfg.data)
        assert all(r["reason"].startswith("conversation too long") for r in rejects), rejects[:3]
        assert len(good) >= 0.95 * len(records)
        assert all(len(r["input_ids"]) <= cfg.data.max_length for r in good)
    longest = max(
        (json.loads(line) for line in (CHAT_DATA / "train.jsonl").read_text().splitlines()),
        key=lambda r: len(r["messages"]),
    )
    row = data.validate_and_tokenize([longest], tokenizer, cfg.data)[0][0]
    assert len(_scored_runs(row)) < len(longest["messages"]) // 2
