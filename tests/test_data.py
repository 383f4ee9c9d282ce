"""pocl_ray.data: readers (local files and folders, datasets by name), templates, validation/tokenisation,
batching; Ray reader tests."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import synthetic_rows, write_jsonl

from pocl_ray import data
from pocl_ray.config import ConfigError, DataConfig, FieldMap, HFDataset, parse_config
from pocl_ray.models import build_tiny_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return load_tokenizer(tiny_assets.tokenizer_dir)


def _cfg(**kw):
    return DataConfig(**{"train": "unused", "max_prompt_length": 96, "max_length": 128, **kw})


def _user_columns(table: pa.Table) -> list[dict]:
    return table.drop_columns([c for c in data.MARKER_COLUMNS if c in table.column_names]).to_pylist()


# ---------------------------------------------------------------------------------------------
# templates


def test_dolly_template_is_exact():
    assert data.build_prompt("Name a colour.", "", "dolly") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert data.build_prompt("Summarise.", "Some text.", "dolly") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise.\n\n### Input:\nSome text.\n\n### Response:\n"
    )


def test_chat_template_uses_the_tokenizer_template(tokenizer):
    prompt = data.build_prompt("Add the two numbers.", "2 + 3", "chat", tokenizer)
    assert prompt == "<|im_start|>user\nAdd the two numbers.\n\n2 + 3<|im_end|>\n<|im_start|>assistant\n"
    cfg = _cfg(template="chat")
    good, rejects = data.validate_and_tokenize(
        [{"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}], tokenizer, cfg
    )
    assert not rejects
    row = good[0]
    # The template's own special tokens are single ids and nothing is added in front of them.
    assert row["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(row["input_ids"][: row["num_prompt_tokens"]]) == prompt


def test_chat_template_without_one_is_an_error(tokenizer):
    plain = build_tiny_tokenizer(["some text for a tokenizer"], vocab_size=300)
    plain.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        data.build_prompt("x", "", "chat", plain)
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        data.build_prompt("x", "", "alpaca", tokenizer)


# ---------------------------------------------------------------------------------------------
# readers


ROWS = synthetic_rows(12, seed=3)


def test_jsonl_gz_parquet_and_hf_dir_read_the_same_rows(tmp_path):
    import datasets

    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    for name in ("rows.jsonl", "rows.jsonl.gz", "rows.parquet", "hf"):
        assert _user_columns(data.read_table(tmp_path / name)) == ROWS, name
    assert _user_columns(data.read_table(tmp_path / "hf", max_rows=5)) == ROWS[:5]
    assert _user_columns(data.read_table(tmp_path / "rows.parquet", max_rows=5)) == ROWS[:5]


def test_directory_of_files_reads_in_path_order_with_max_rows(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-1.jsonl", ROWS[6:])
    write_jsonl(shards / "part-0.jsonl", ROWS[:6])
    (shards / "README.txt").write_text("not data")
    assert _user_columns(data.read_table(shards)) == ROWS
    assert _user_columns(data.read_table(shards, max_rows=8)) == ROWS[:8]
    pq.write_table(pa.Table.from_pylist(ROWS), shards / "extra.parquet")
    with pytest.raises(ValueError, match="mixes JSONL and parquet"):
        data.read_table(shards)
    assert _user_columns(data.read_table(shards, fmt="parquet")) == ROWS


# A dataset folder as `datasets.load_dataset` reads it: data files, and a README.md whose `configs` declare
# the subsets and their splits (how Hub datasets declare theirs).
DATASET_README = """---
configs:
- config_name: chat
  data_files:
  - split: train
    path: chat/train.jsonl
  - split: validation
    path: chat/validation.jsonl
- config_name: instructions
  data_files:
  - split: train
    path: instructions/train.jsonl
---
"""

CHATS = [
    {
        "id": f"c{i}",
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{2 * i}."},
            {"role": "user", "content": "And times two?"},
            {"role": "assistant", "content": f"{4 * i}."},
        ][: 2 + 2 * (i % 2)],
    }
    for i in range(8)
]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """A datasets cache of the test's own (load_dataset writes its Arrow copy there)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path / "hf_cache"


def _dataset_folder(root):
    folder = root / "chatset"
    (folder / "chat").mkdir(parents=True)
    (folder / "instructions").mkdir()
    (folder / "README.md").write_text(DATASET_README)
    write_jsonl(folder / "chat" / "train.jsonl", CHATS[:5])
    write_jsonl(folder / "chat" / "validation.jsonl", CHATS[5:])
    write_jsonl(folder / "instructions" / "train.jsonl", ROWS)
    return folder


def test_a_dataset_by_name_gives_the_rows_of_the_jsonl_it_was_made_from(tmp_path, datasets_cache, tokenizer):
    folder = _dataset_folder(tmp_path)
    for subset, split, jsonl in (
        ("chat", "validation", "chat/validation.jsonl"),
        ("instructions", "train", "instructions/train.jsonl"),
    ):
        by_name = data.read_table(HFDataset(dataset=str(folder), subset=subset, split=split))
        assert _user_columns(by_name) == _user_columns(data.read_table(folder / jsonl)), subset
    assert datasets_cache.is_dir()
    chat = HFDataset(dataset=str(folder), subset="chat", split="train")
    assert _user_columns(data.read_table(chat, max_rows=2)) == CHATS[:2]
    assert _user_columns(data.read_table(chat.model_copy(update={"split": "train[:3]+validation[:1]"}))) == (
        CHATS[:3] + CHATS[5:6]
    )
    # Prepared as conversations, the same as the JSONL's rows.
    cfg = _cfg()
    by_name = data.validate_and_tokenize(data.read_table(chat).to_pylist(), tokenizer, cfg)
    from_jsonl = data.validate_and_tokenize(
        data.read_table(folder / "chat" / "train.jsonl").to_pylist(), tokenizer, cfg
    )
    assert by_name == from_jsonl and len(by_name[0]) == 5


def test_a_missing_split_or_subset_fails_naming_the_available_ones(tmp_path, datasets_cache):
    folder = _dataset_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"no split 'test'; the dataset has the splits \['train', 'validation'\]"):
        data.resolve_source(HFDataset(dataset=str(folder), subset="chat", split="test"))
    with pytest.raises(ConfigError, match=r"no split 'dev'"):
        data.read_table(HFDataset(dataset=str(folder), subset="chat", split="train+dev[:5]"))
    with pytest.raises(ConfigError, match=r"available configs: \['chat', 'instructions'\]"):
        data.resolve_source(HFDataset(dataset=str(folder), split="train"))
    assert not list(datasets_cache.rglob("*.arrow"))  # refused before any data was read
    cfg = parse_config(
        {"data": {"train": {"dataset": str(folder), "subset": "chat", "split": "train"}}, "models": {"teacher": "t"}}
    )
    assert data.resolve_source(cfg.data.train) == ("dataset", [])


def test_offline_mode_reads_what_it_can_and_names_what_it_cannot(tmp_path):
    """HF_DATASETS_OFFLINE=1 (read by `datasets` at import, hence a fresh interpreter): a local dataset
    folder loads, into the cache HF_HOME names; a Hub dataset that is not cached is refused, saying so."""
    folder = _dataset_folder(tmp_path)
    script = textwrap.dedent(
        f"""
        from pocl_ray import hf_datasets
        from pocl_ray.config import ConfigError, HFDataset
        rows = len(hf_datasets.load(HFDataset(dataset={str(folder)!r}, subset="chat", split="train")))
        try:
            hf_datasets.check_split(HFDataset(dataset="pocl-ray-tests/not-cached", split="train"))
        except ConfigError as err:
            print(rows, err)
        """
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("5 dataset 'pocl-ray-tests/not-cached', split 'train' cannot be found")
    assert "HF_DATASETS_OFFLINE is set" in out.stdout
    assert any((tmp_path / "hf_home" / "datasets").iterdir())


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.read_table(tmp_path / "nope.jsonl")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data format of .*rows.csv"):
        data.read_table(tmp_path / "rows.csv")
    with pytest.raises(ValueError, match="no .jsonl, .jsonl.gz or .parquet data files"):
        data.read_table(tmp_path)
    with pytest.raises(ValueError, match="unknown data format 'xml'"):
        data.read_table(tmp_path / "rows.csv", fmt="xml")


def test_jsonl_bad_lines_become_flagged_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"id": "a", "instruction": "x", "output": "y"}\n'
        "\n"
        '{"id": "b", "instruction": \n'
        '["a list"]\n'
        '{"id": "c", "instruction": 7, "output": "z", "meta": {"k": 1}}\n'
    )
    table = data.read_table(path)
    assert table.num_rows == 4  # the blank line is not a row
    errors = table.column(data.ERROR_COLUMN).to_pylist()
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("line 3: invalid JSON: ")
    assert errors[2] == "line 4: invalid JSON: not a JSON object (got list)"
    assert table.column(data.RAW_COLUMN).to_pylist()[1] == '{"id": "b", "instruction": '
    # "instruction" mixes a string and an int: the int is kept as JSON text and flagged.
    assert table.column(data.JSON_COLUMN).to_pylist()[3] == ["instruction"]
    assert table.column("instruction").to_pylist()[3] == "7"


# ---------------------------------------------------------------------------------------------
# validation and tokenisation


def test_every_bad_row_is_rejected_with_its_reason(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"id": "ok-1", "instruction": "Say yes.", "input": "", "output": "yes"}),
        json.dumps({"id": "no-response", "instruction": "Say yes."}),
        json.dumps({"id": "blank", "instruction": "Say yes.", "output": "  \n "}),
        json.dumps({"id": "number", "instruction": 12, "output": "twelve"}),
        '{"id": "broken", ',
        json.dumps({"id": "ok-1", "instruction": "Say no.", "output": "no"}),
        json.dumps({"id": "ctx", "instruction": "Say it.", "input": ["a"], "output": "a"}),
        json.dumps({"id": "ok-2", "prompt": "Echo.", "context": "hi", "response": "hi"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    good, rejects = data.validate_and_tokenize(data.read_table(path).to_pylist(), tokenizer, _cfg())
    assert [g["id"] for g in good] == ["ok-1", "ok-2"]
    assert [g["row"] for g in good] == [0, 7]
    by_row = {r["row"]: r for r in rejects}
    assert sorted(by_row) == [1, 2, 3, 4, 5, 6]
    assert by_row[1]["reason"] == "missing field 'response' (no value in any of the columns ['response', 'output'])"
    assert by_row[2]["reason"] == "empty field 'response' (column 'output' is blank)"
    assert by_row[3]["reason"] == "field 'instruction' (column 'instruction') must be a string, got int: 12"
    assert by_row[3]["record"] == {
        "id": "number",
        "instruction": 12,
        "output": "twelve",
        "input": None,
        "prompt": None,
        "context": None,
        "response": None,
    }
    assert by_row[4]["reason"].startswith("line 5: invalid JSON: ")
    assert by_row[4]["record"] == {"raw_line": '{"id": "broken", '}
    assert by_row[4]["id"].startswith("h:")
    assert by_row[5]["reason"] == "duplicate id 'ok-1' (first seen at row 0)"
    assert by_row[6]["reason"] == "field 'context' (column 'input') must be a string, got list: ['a']"
    json.dumps(rejects)  # reports are written as JSON


def test_response_truncated_away_is_rejected(tokenizer):
    # DataConfig itself forbids max_prompt_length >= max_length; an unvalidated config (as built by
    # model_construct) must still not yield a row without response tokens.
    cfg = DataConfig.model_construct(
        train="unused", fields=FieldMap(), template="dolly", max_prompt_length=64, max_length=64
    )
    good, rejects = data.validate_and_tokenize(
        [{"id": "long", "instruction": "word " * 80, "output": "a response"}], tokenizer, cfg
    )
    assert not good
    assert (
        rejects[0]["reason"] == "no response token left after truncation: the prompt takes 64 of max_length 64 tokens"
    )


def test_labels_mask_exactly_the_prompt(tokenizer):
    record = {"id": "r", "instruction": "Add the two numbers.", "input": "40 + 2", "output": "42"}
    good, _ = data.validate_and_tokenize([record], tokenizer, _cfg())
    row = good[0]
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    response_ids = tokenizer("42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row["prompt"] == data.build_prompt("Add the two numbers.", "40 + 2", "dolly")
    assert row["input_ids"] == prompt_ids + response_ids
    assert row["labels"] == [-100] * len(prompt_ids) + response_ids
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert (row["num_prompt_tokens"], row["num_response_tokens"]) == (len(prompt_ids), len(response_ids))


def test_long_prompt_keeps_its_end_and_long_response_is_cut_without_eos(tokenizer):
    cfg = _cfg(max_prompt_length=20, max_length=30)
    record = {
        "id": "long",
        "instruction": "Reverse the order of the words.",
        "input": "apple " * 50,
        "output": "river " * 50,
    }
    row = data.validate_and_tokenize([record], tokenizer, cfg)[0][0]
    full_prompt = tokenizer(row["prompt"])["input_ids"]
    assert row["num_prompt_tokens"] == 20
    assert row["input_ids"][:20] == full_prompt[-20:]
    assert tokenizer.decode(row["input_ids"][:20]).endswith("### Response:\n")
    assert len(row["input_ids"]) == 30 and row["num_response_tokens"] == 10
    assert tokenizer.eos_token_id not in row["labels"][20:]


def test_bos_is_kept_when_the_prompt_is_cut():
    assert data._truncate_prompt([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert data._truncate_prompt([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert data._truncate_prompt([1, 5], 3, bos_id=1) == [1, 5]


def test_ids_without_an_id_column_are_content_hashes(tokenizer):
    rows = [
        {"instruction": "Say yes.", "output": "yes"},
        {"instruction": "Say no.", "output": "no"},
        {"instruction": "Say yes.", "output": "yes"},
    ]
    good, rejects = data.validate_and_tokenize(rows, tokenizer, _cfg())
    expected = data.content_id("Say yes.", "", "yes")
    assert expected.startswith("h:") and len(expected) == 18
    assert good[0]["id"] == expected
    assert good[1]["id"] == data.content_id("Say no.", "", "no")
    assert rejects == [
        {"row": 2, "id": expected, "reason": f"duplicate id '{expected}' (first seen at row 0)", "record": rows[2]}
    ]


def test_custom_field_map_and_numeric_ids(tokenizer):
    cfg = _cfg(fields=FieldMap(id=["uid"], instruction=["question"], context=[], response=["answer"]))
    good, rejects = data.validate_and_tokenize(
        [{"uid": 7, "question": "Q?", "answer": "A.", "input": "ignored"}], tokenizer, cfg
    )
    assert not rejects
    assert good[0]["id"] == "7"
    assert good[0]["prompt"] == data.build_prompt("Q?", "", "dolly")


def test_prepare_batch_accepts_numpy_and_pandas_batches(tokenizer):
    rows = synthetic_rows(6, seed=4) + [{"id": "bad", "source": "x", "instruction": None, "input": "", "output": "y"}]
    as_lists = {k: [r[k] for r in rows] for k in rows[0]}
    expected = data.prepare_batch(as_lists, tokenizer, _cfg())
    as_numpy = {k: np.array(v, dtype=object) for k, v in as_lists.items()}
    as_pandas = pd.DataFrame(rows)
    for batch in (as_numpy, as_pandas):
        assert data.prepare_batch(batch, tokenizer, _cfg()) == expected
    assert list(expected) == list(data.OUTPUT_COLUMNS)
    assert expected["reject_reason"][:6] == [""] * 6
    assert expected["reject_reason"][6].startswith("missing field 'instruction'")
    assert expected["input_ids"][6] == [] and expected["num_prompt_tokens"][6] == 0


def test_duplicate_reasons_skip_rejected_rows():
    assert data.duplicate_reasons(["a", "b", "a", "a"], skip=[True, False, False, False]) == [
        "",
        "",
        "",
        "duplicate id 'a' (first seen at row 2)",
    ]


# ---------------------------------------------------------------------------------------------
# batching


def test_collate_right_pads_and_masks():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = data.collate(rows, pad_token_id=0)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    columns = {k: [np.array(r[k]) for r in rows] for k in rows[0]}
    padded = data.collate(columns, pad_token_id=9, pad_to_multiple_of=4)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
    assert padded["labels"][:, 3].tolist() == [-100, -100]
    with pytest.raises(ValueError, match="no tokens"):
        data.collate([{"input_ids": [], "attention_mask": [], "labels": []}], pad_token_id=0)


def test_generation_batch_left_pads():
    batch = data.generation_batch([[5, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batches_are_the_transformers_collators(tokenizer):
    # collate and generation_batch build what DataCollatorForSeq2Seq and tokenizer.pad(padding_side="left")
    # build, at a fraction of their host time (see data.collate); this keeps them the same.
    from transformers import DataCollatorForSeq2Seq

    rng = np.random.default_rng(3)
    rows = []
    for _ in range(9):
        prompt, response = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        ids = rng.integers(0, len(tokenizer), prompt + response).tolist()
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [data.IGNORE_INDEX] * prompt + ids[prompt:]}
        )
    collator = DataCollatorForSeq2Seq(
        tokenizer, pad_to_multiple_of=8, label_pad_token_id=data.IGNORE_INDEX, return_tensors="pt"
    )
    expected = collator([dict(r) for r in rows])
    ours = data.collate(rows, tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)
    prompts = [r["input_ids"][: int(rng.integers(1, 20))] for r in rows]
    expected = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    ours = data.generation_batch(prompts, tokenizer.pad_token_id)
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)


# ---------------------------------------------------------------------------------------------
# Ray reader


@pytest.mark.ray
def test_ray_reader_gives_the_same_rows_and_rejects_as_the_local_path(ray_local, tmp_path, tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = synthetic_rows(20, seed=5)
    write_jsonl(shards / "a.jsonl", rows[:10])
    text = (
        "".join(json.dumps(r) + "\n" for r in rows[10:15])
        + "{not json\n"
        + json.dumps({"id": rows[16]["id"], "instruction": 3, "output": "x"})
        + "\n"
    )
    with gzip.open(shards / "b.jsonl.gz", "wt") as f:
        f.write(text)
    cfg = _cfg()
    local = data.prepare_batch(data.read_table(shards).to_pydict(), tokenizer, cfg)
    ds = data.read_ray_dataset(shards).map_batches(
        data.prepare_batch, fn_kwargs={"tokenizer": tokenizer, "data_cfg": cfg}, batch_format="numpy", batch_size=4
    )
    remote = sorted(ds.take_all(), key=lambda r: r["id"])
    assert len(remote) == 17
    expected = sorted(({k: local[k][i] for k in data.OUTPUT_COLUMNS} for i in range(17)), key=lambda r: r["id"])
    for got, want in zip(remote, expected):
        assert got["id"] == want["id"] and got["reject_reason"] == want["reject_reason"]
        assert list(got["input_ids"]) == want["input_ids"] and list(got["labels"]) == want["labels"]
    reasons = [r["reject_reason"] for r in expected if r["reject_reason"]]
    assert len(reasons) == 2
    assert any(r.startswith("b.jsonl.gz: line 6: invalid JSON") for r in reasons)
    # max_rows keeps file and line order, like read_table
    first = data.read_ray_dataset(shards, max_rows=12).take_all()
    assert [r["id"] for r in first] == [r["id"] for r in rows[:12]]

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    assert sorted(r["id"] for r in data.read_ray_dataset(tmp_path / "rows.parquet").take_all()) == sorted(
        r["id"] for r in rows
    )


@pytest.mark.ray
def test_ray_reader_prepares_conversations_by_name_and_from_parquet_as_locally(
    ray_local, tmp_path, datasets_cache, tokenizer
):
    """Conversations reach prepare_batch through Ray's numpy batches (arrays of arrays of dicts) and give the
    rows they give locally: from a dataset by name (read by `datasets` on the driver) and from parquet."""
    folder = _dataset_folder(tmp_path)
    chats = CHATS + [{"id": "bad", "messages": [{"role": "robot", "content": "beep"}]}]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chats.parquet")
    write_jsonl(folder / "chat" / "train.jsonl", chats)
    cfg = _cfg()
    for source in (HFDataset(dataset=str(folder), subset="chat", split="train"), tmp_path / "chats.parquet"):
        local = data.prepare_batch(data.read_table(source).to_pydict(), tokenizer, cfg)
        ds = data.read_ray_dataset(source).map_batches(
            data.prepare_batch, fn_kwargs={"tokenizer": tokenizer, "data_cfg": cfg}, batch_format="numpy", batch_size=3
        )
        remote = {r["id"]: r for r in ds.take_all()}
        assert sorted(remote) == sorted(local["id"]) and len(remote) == 9
        for i, row_id in enumerate(local["id"]):
            got = remote[row_id]
            assert got["reject_reason"] == local["reject_reason"][i] and got["response"] == local["response"][i]
            assert list(got["input_ids"]) == local["input_ids"][i] and list(got["labels"]) == local["labels"][i]
            assert got["num_prompt_tokens"] == local["num_prompt_tokens"][i]
        assert "unknown role 'robot'" in remote["bad"]["reject_reason"]
