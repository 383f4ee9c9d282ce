"""Difficulty scoring: the torch measurers (no Ray) and the Ray Data pipeline end to end (local Ray)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import synthetic_rows

from pocl_ray import preflight
from pocl_ray.config import ConfigError, ModelsConfig, parse_config
from pocl_ray.data import validate_and_tokenize
from pocl_ray.measurers import Measurer, greedy_responses, load_measurer_models, measure
from pocl_ray.models import load_model, load_tokenizer
from pocl_ray.scores import load_manifest
from pocl_ray.scoring import check_inputs, format_summary, measure_dataset, score_dataset

ALL_METRICS = ["student_ce", "student_rougeL", "teacher_ce", "teacher_student_kl", "length"]
VENV_BIN = Path(sys.executable).parent


def _rows(tiny_assets, n=12, seed=3):
    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    good, rejects = validate_and_tokenize(synthetic_rows(n, seed=seed), tokenizer, tiny_assets.data_config())
    assert not rejects
    return {k: [r[k] for r in good] for k in good[0]}


@pytest.fixture(scope="module")
def models(tiny_assets):
    return load_measurer_models(ModelsConfig(teacher=str(tiny_assets.teacher_dir)), ALL_METRICS, "cpu")


# ---------------------------------------------------------------------------------------------
# Measurers, without Ray


def test_cut_student_is_the_initial_student(tiny_assets, models):
    saved = load_model(tiny_assets.cut_student_dir, frozen=True)  # teacher layers [1, 3] = keep_every 2
    for a, b in zip(models.student.state_dict().values(), saved.state_dict().values()):
        assert torch.equal(a, b)
    assert models.teacher is not None and models.rouge is not None


def test_measure_matches_per_row_reference(tiny_assets, models):
    rows = _rows(tiny_assets, n=6)
    got = measure(models, rows, ALL_METRICS, batch_size=4, max_new_tokens=4)
    for i, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
        x = torch.tensor([ids])
        y = torch.tensor([labels])
        with torch.no_grad():
            s = models.student(input_ids=x, labels=y)
            t = models.teacher(input_ids=x, labels=y)
        assert got["student_ce"][i] == pytest.approx(s.loss.item(), abs=1e-5)
        assert got["teacher_ce"][i] == pytest.approx(t.loss.item(), abs=1e-5)
        scored = y[0, 1:] != -100
        logp = torch.log_softmax(t.logits[0, :-1][scored], -1)
        logq = torch.log_softmax(s.logits[0, :-1][scored], -1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
        assert got["teacher_student_kl"][i] == pytest.approx(kl, abs=1e-5)
    assert got["length"].tolist() == [float(n) for n in rows["num_response_tokens"]]
    assert ((got["student_rougeL"] >= 0) & (got["student_rougeL"] <= 1)).all()
    assert list(got) == ALL_METRICS


def test_measure_does_not_depend_on_batching(tiny_assets, models):
    rows = _rows(tiny_assets, n=6, seed=4)
    one = measure(models, rows, ALL_METRICS, batch_size=1, max_new_tokens=4)
    many = measure(models, rows, ALL_METRICS, batch_size=6, max_new_tokens=4)
    for m in ALL_METRICS:
        np.testing.assert_allclose(one[m], many[m], atol=1e-4, err_msg=m)


def test_rouge_scores_the_greedy_generation(tiny_assets, models):
    rows = _rows(tiny_assets, n=6, seed=5)
    prompts = [ids[:p] for ids, p in zip(rows["input_ids"], rows["num_prompt_tokens"])]
    generated = greedy_responses(
        models.student, models.tokenizer, prompts, max_new_tokens=[6] * len(prompts), batch_size=1
    )
    # A reference equal to the student's own greedy text scores 1; the real references score less.
    own = dict(rows, response=generated)
    has_words = np.array([any(c.isalnum() for c in g) for g in generated])
    assert has_words.any()
    np.testing.assert_array_equal(
        measure(models, own, ["student_rougeL"], batch_size=4, max_new_tokens=6)["student_rougeL"],
        np.where(has_words, 1.0, 0.0),
    )
    real = measure(models, rows, ["student_rougeL"], batch_size=4, max_new_tokens=6)["student_rougeL"]
    expected = [models.rouge.score(r, g)["rougeL"].fmeasure for r, g in zip(rows["response"], generated)]
    np.testing.assert_allclose(real, expected)


def test_rouge_response_gets_the_row_budget_by_default(tiny_assets, models):
    """With no scoring.max_new_tokens, each row's greedy response may use data.max_length minus its
    prompt; the per-row reference generates each prompt alone with exactly that budget."""
    rows = _rows(tiny_assets, n=4, seed=6)
    # Small budgets (12 tokens after the longest prompt, more after shorter ones) keep the test fast.
    max_length = int(max(rows["num_prompt_tokens"])) + 12
    got = measure(models, rows, ["student_rougeL"], batch_size=4, max_new_tokens=None, max_length=max_length)
    tok = models.tokenizer
    expected, lengths = [], []
    for ids, p, ref in zip(rows["input_ids"], rows["num_prompt_tokens"], rows["response"]):
        prompt = torch.tensor([ids[:p]])
        with torch.no_grad():
            out = models.student.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=max_length - p,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = out[0, p:]
        lengths.append(len(new))
        expected.append(models.rouge.score(ref, tok.decode(new, skip_special_tokens=True))["rougeL"].fmeasure)
    np.testing.assert_array_equal(got["student_rougeL"], expected)
    # The untrained student rarely stops: its responses run past the old fixed 8-token cap.
    assert max(lengths) > 8
    capped = measure(models, rows, ["student_rougeL"], batch_size=4, max_new_tokens=8, max_length=max_length)
    assert not np.array_equal(capped["student_rougeL"], got["student_rougeL"])


def test_measurer_needs_a_response_length(tiny_assets):
    models_cfg = ModelsConfig(teacher=str(tiny_assets.teacher_dir)).model_dump(mode="json")
    with pytest.raises(ValueError, match="scoring.max_new_tokens or data.max_length"):
        Measurer(models_cfg, ["student_rougeL"], batch_size=4, max_new_tokens=None, use_gpu=False, num_threads=1)


# ---------------------------------------------------------------------------------------------
# Input errors surface before any Ray work


def _config(tiny_assets, tmp_path, data_path, **sections):
    base = {
        "data": {"train": str(data_path), "max_prompt_length": 96, "max_length": 128},
        "models": {"teacher": str(tiny_assets.teacher_dir)},
        "scoring": {"max_new_tokens": 8, "batch_size": 8, "num_actors": 1},
        "curriculum": {"num_buckets": 4},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return parse_config(base)


def test_missing_inputs_name_the_field(tiny_assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train: not found"):
        score_dataset(_config(tiny_assets, tmp_path, tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="models.teacher: model folder not found"):
        score_dataset(_config(tiny_assets, tmp_path, tiny_assets.train_path, models={"teacher": str(tmp_path / "no")}))
    with pytest.raises(ConfigError, match=r"models.student_layers: \[7\] out of range"):
        score_dataset(_config(tiny_assets, tmp_path, tiny_assets.train_path, models={"student_layers": [1, 7]}))
    assert not (tmp_path / "run").exists()


def test_conversations_with_a_tokenizer_without_chat_template_fail_before_ray(tiny_assets, tmp_path):
    from pocl_ray.models import load_tokenizer

    plain = load_tokenizer(tiny_assets.tokenizer_dir)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")
    data = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    data.write_text(json.dumps({"id": "c", "messages": turns}) + "\n")
    cfg = _config(tiny_assets, tmp_path, data, models={"tokenizer": str(tmp_path / "plain")})
    with pytest.raises(ConfigError, match=r"^models.tokenizer: conversation rows are rendered by .* has none"):
        score_dataset(cfg)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The Ray Data pipeline


BAD_LINES = [
    json.dumps({"id": "bad-no-response", "instruction": "Say hi."}),
    json.dumps({"id": "bad-empty-instruction", "instruction": "  ", "output": "x"}),
    json.dumps({"id": "bad-type", "instruction": "Add the two numbers.", "output": 12}),
    "{this is not json",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """JSONL with good rows, bad rows, a repeated id and two identical id-less rows."""
    root = tmp_path_factory.mktemp("scoring_data")
    good = synthetic_rows(80, seed=7)
    repeat = dict(good[5], output="a different answer")  # same id, other content
    no_id = {"instruction": "Reverse the order of the words.", "input": "sea fox", "output": "fox sea"}
    lines = [json.dumps(r) for r in good[:40]] + BAD_LINES[:2] + [json.dumps(repeat), ""]
    lines += [json.dumps(r) for r in good[40:]] + BAD_LINES[2:] + [json.dumps(no_id), json.dumps(no_id)]
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return {"path": path, "good_ids": [r["id"] for r in good], "rows_in": sum(bool(line) for line in lines)}


def _scores(result):
    table = pds.dataset(str(result.scores_path), format="parquet").to_table()
    return table.to_pandas()


def _python_rrf(frame, metrics, directions, k=60.0, tie_seed=0):
    """RRF written out: tied values share their average rank; equal fused scores go by the seeded id hash."""
    from pocl_ray.difficulty import tie_keys

    ids = frame["id"].tolist()
    fused = dict.fromkeys(ids, 0.0)
    for m in metrics:
        sign = 1.0 if directions[m] == "lower" else -1.0
        keys = [sign * v for v in frame[m]]
        for i, v in zip(ids, keys):
            fused[i] += 1.0 / (k + 1 + sum(o < v for o in keys) + (sum(o == v for o in keys) - 1) / 2)
    tie = dict(zip(ids, tie_keys(ids, tie_seed).tolist()))
    return sorted(ids, key=lambda i: (-fused[i], tie[i])), fused


@pytest.fixture(scope="module")
def scored(ray_local, tiny_assets, dataset, tmp_path_factory):
    cfg = _config(tiny_assets, tmp_path_factory.mktemp("score_a"), dataset["path"])
    return cfg, score_dataset(cfg)


def test_every_row_is_bucketed_or_rejected(scored, dataset):
    cfg, result = scored
    m = result.manifest
    frame = _scores(result)
    rejected = [json.loads(line) for line in result.rejected_path.read_text().splitlines()]
    assert m["rows_in"] == dataset["rows_in"] == m["rows_scored"] + m["rows_rejected"]
    assert len(frame) == m["rows_scored"] and frame["id"].is_unique
    assert len(rejected) == m["rows_rejected"] == 6
    assert sorted(r["row"] for r in rejected) == sorted({r["row"] for r in rejected})
    assert set(dataset["good_ids"]) <= set(frame["id"])
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert "missing field 'response'" in reasons["bad-no-response"]
    assert "must be a string" in reasons["bad-type"]
    assert rejected[[r["id"] for r in rejected].index("bad-type")]["record"]["output"] == 12
    assert any("invalid JSON" in r["reason"] and r["record"] == {"raw_line": "{this is not json"} for r in rejected)
    # The repeated id keeps its first occurrence; the second identical id-less row is rejected.
    dup = [r for r in rejected if r["reason"].startswith("duplicate id")]
    assert len(dup) == 2 and dup[0]["record"]["output"] == "a different answer"
    assert frame.loc[frame["id"] == dup[0]["id"], "response"].item() != "a different answer"
    assert (frame["bucket"] >= 0).all() and (frame["bucket"] < 4).all()


def test_buckets_are_equal_contiguous_and_easy_first(scored):
    _, result = scored
    m = result.manifest
    frame = _scores(result)
    n = m["rows_scored"]
    assert sorted(frame["rank"]) == list(range(n))
    assert (frame["bucket"] == frame["rank"] * 4 // n).all()
    sizes = frame["bucket"].value_counts().sort_index().tolist()
    assert sizes == [b["rows"] for b in m["buckets"]] and sum(sizes) == n and max(sizes) - min(sizes) <= 1
    for easier, harder in zip(m["buckets"], m["buckets"][1:]):
        assert easier["fused_min"] >= harder["fused_max"]
    assert frame["rank"].tolist() == list(range(n))  # sort_output: written in rank order
    assert len(list(result.scores_path.glob("*.parquet"))) == 1  # fits one file (rows_per_file)


def test_rank_order_matches_python_rrf(scored):
    cfg, result = scored
    frame = _scores(result)
    directions = {"student_ce": "lower", "student_rougeL": "higher"}
    assert [d["name"] for d in result.manifest["metrics"]] == list(directions)
    expected, fused = _python_rrf(frame, list(directions), directions)
    assert frame.sort_values("rank")["id"].tolist() == expected
    np.testing.assert_allclose(frame["fused_score"], [fused[i] for i in frame["id"]], rtol=1e-12)
    assert frame["student_rougeL"].between(0, 1).all() and (frame["student_ce"] > 0).all()


def test_manifest_layout(scored):
    cfg, result = scored
    m = load_manifest(result.output_dir)
    assert m == json.loads(json.dumps(result.manifest))
    assert m["rrf_k"] == 60 and m["num_buckets"] == 4 and m["scores_path"] == "rows"
    assert m["config"]["data"]["train"] == cfg.data.train and m["ray_version"]
    teacher = {"kind": "local", "location": str(Path(cfg.models.teacher).resolve()), "revision": None}
    assert m["models"]["teacher"] == m["models"]["tokenizer"] == teacher
    assert "cut from teacher" in m["models"]["student"]
    summary = format_summary(m)
    assert f"scored {m['rows_scored']} of {m['rows_in']} rows" in summary and len(summary.splitlines()) < 25


@pytest.fixture(scope="module")
def rescored(ray_local, scored, tiny_assets, dataset, tmp_path_factory):
    """The same input scored again, unsorted and by an actor pool that grows from one ("auto")."""
    cfg = _config(
        tiny_assets,
        tmp_path_factory.mktemp("score_b"),
        dataset["path"],
        scoring={"sort_output": False, "num_actors": "auto"},
    )
    return score_dataset(cfg)


def test_two_runs_give_identical_buckets(scored, rescored):
    _, first = scored
    a = _scores(first).set_index("id").sort_index()
    b = _scores(rescored).set_index("id").sort_index()
    assert a[["rank", "bucket"]].equals(b[["rank", "bucket"]])
    assert a[["student_ce", "student_rougeL", "fused_score"]].equals(b[["student_ce", "student_rougeL", "fused_score"]])
    assert rescored.manifest["buckets"] == first.manifest["buckets"]


def test_rows_reach_the_actors_in_blocks_of_one_call(ray_local, tiny_assets, dataset, tmp_path):
    # The JSONL file is read as one block; without re-cutting, one actor would score every row.
    cfg = _config(
        tiny_assets, tmp_path, dataset["path"], scoring={"metrics": ["length"], "batch_size": 4, "length_window": 2}
    )
    sources = preflight.check_inputs(cfg)
    measured = measure_dataset(cfg, check_inputs(cfg, sources), sources)
    sizes = [len(b["uid"]) for b in measured.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(sizes) == dataset["rows_in"] and max(sizes) <= 8 and len(sizes) >= dataset["rows_in"] // 8


def test_auto_actor_pool_grows_from_one_and_scores_the_same(scored, rescored):
    from pocl_ray.ray_session import actor_pool

    auto, fixed = actor_pool("auto"), actor_pool(3)
    assert (auto.min_size, auto.max_size) == (1, float("inf")) and (fixed.min_size, fixed.max_size) == (3, 3)
    cfg, first = scored
    assert cfg.scoring.num_actors == 1 and rescored.manifest["config"]["scoring"]["num_actors"] == "auto"
    a = _scores(first).set_index("id").sort_index()
    b = _scores(rescored).set_index("id").sort_index()
    assert a[["rank", "bucket", "student_ce", "student_rougeL"]].equals(
        b[["rank", "bucket", "student_ce", "student_rougeL"]]
    )


def test_large_outputs_are_split_into_rank_ordered_files(ray_local, tiny_assets, dataset, tmp_path):
    cfg = _config(tiny_assets, tmp_path, dataset["path"], scoring={"metrics": ["length"], "rows_per_file": 16})
    result = score_dataset(cfg)
    n = result.manifest["rows_scored"]
    files = sorted(result.scores_path.glob("*.parquet"))
    ranks = [pq.read_table(f, columns=["rank"]).column("rank").to_pylist() for f in files]
    assert len(files) == -(-n // 16) and all(0 < len(r) <= 16 for r in ranks)
    assert [x for r in ranks for x in r] == list(range(n)), "files are not in rank order"
    assert _scores(result)["rank"].tolist() == list(range(n))


def test_flipping_a_direction_flips_the_order(ray_local, tiny_assets, dataset, tmp_path):
    # "length" needs no model, so this run is cheap; its default direction is lower = easier.
    def order(direction):
        cfg = _config(
            tiny_assets,
            tmp_path / direction,
            dataset["path"],
            scoring={"metrics": ["length"], "directions": {"length": direction}, "sort_output": False},
        )
        frame = _scores(score_dataset(cfg)).set_index("id")
        assert (frame["length"] == frame["num_response_tokens"]).all()
        return frame.sort_values("rank").index.tolist(), frame["length"]

    from pocl_ray.difficulty import tie_keys

    higher, length = order("higher")
    # Longest first; rows of equal length tie exactly and go by the seeded id hash (scoring.tie_seed 0).
    tie = dict(zip(length.index, tie_keys(list(length.index), 0).tolist()))
    assert higher == sorted(length.index, key=lambda i: (-length[i], tie[i]))
    assert length[higher[0]] == length.max() and length[higher[-1]] == length.min()


def test_cli_and_function_agree(scored, dataset, tmp_path):
    cfg, result = scored
    config_path = tmp_path / "config.yaml"
    config_path.write_text(cfg.to_yaml())
    out = tmp_path / "cli_run"
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh local Ray, never another cluster here
    proc = subprocess.run(
        [str(VENV_BIN / "pocl-ray"), "score", "--config", str(config_path), "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_manifest = load_manifest(out / "scores")
    assert f"scored {cli_manifest['rows_scored']} of {cli_manifest['rows_in']} rows" in proc.stdout
    # One-line progress of our own; Ray Data's multi-line dump is off without --verbose.
    rows_in = cli_manifest["rows_in"]
    assert f"[score] {rows_in}/{rows_in} rows (100%)" in proc.stdout
    assert "[ray] started a local Ray instance" in proc.stdout
    assert "Total Progress" not in proc.stdout + proc.stderr
    for key in ("rows_in", "rows_scored", "rows_rejected", "metrics", "buckets", "num_buckets"):
        assert cli_manifest[key] == result.manifest[key], key
    cli_frame = pds.dataset(str(out / "scores" / "rows"), format="parquet").to_table().to_pandas()
    a = _scores(result).set_index("id").sort_index()
    b = cli_frame.set_index("id").sort_index()
    assert a[["rank", "bucket", "fused_score"]].equals(b[["rank", "bucket", "fused_score"]])
    assert (out / "scores" / "rejected.jsonl").read_text() == result.rejected_path.read_text()


def test_teacher_top_k_writes_the_cache_from_the_scoring_forward(
    ray_local, tiny_assets, dataset, tmp_path, monkeypatch
):
    from pocl_ray import scoring
    from pocl_ray.teacher_cache import (
        CACHE_COLUMNS,
        TAIL_SAMPLES,
        arrow_types,
        check_teacher_cache,
        tail_uniforms,
        teacher_top_k,
    )

    cfg = _config(
        tiny_assets,
        tmp_path,
        dataset["path"],
        scoring={"metrics": ["teacher_ce", "length"], "teacher_top_k": 16},
        kd={"teacher": "cached"},
        data={"max_rows": 40},
    )
    per_token = (16 + TAIL_SAMPLES) * (2 + 2) + 4 * 5
    # Row groups of 8 rows at data.max_length (the real target, tens of MiB, exceeds this run's 40 rows).
    monkeypatch.setattr(scoring, "CACHE_ROW_GROUP_BYTES", 8 * (8 + per_token) * cfg.data.max_length)
    result = score_dataset(cfg)
    entry = result.manifest["teacher_cache"]
    assert entry["top_k"] == 16 and entry["bytes_per_scored_token"] == per_token
    assert check_teacher_cache(result.output_dir, cfg, tiny_assets.vocab_size) == entry
    assert f"teacher cache: top 16 + tail, {per_token} bytes per scored token" in format_summary(result.manifest)
    files = sorted(result.scores_path.glob("*.parquet"))
    groups = [
        m.row_group(i).num_rows for m in (pq.ParquetFile(f).metadata for f in files) for i in range(m.num_row_groups)
    ]
    assert sum(groups) == result.manifest["rows_scored"] and max(groups) == 8, groups
    table = pds.dataset(str(result.scores_path), format="parquet").to_table()
    for name, kind in arrow_types(16, tiny_assets.vocab_size).items():
        assert table.schema.field(name).type == kind
    teacher = load_model(tiny_assets.teacher_dir, frozen=True)
    frame = table.select(["id", "labels", "input_ids", "teacher_ce", *CACHE_COLUMNS]).to_pylist()
    for row in frame[:3] + frame[-3:]:
        labels = torch.tensor(row["labels"])
        scored = torch.nn.functional.pad(labels[1:], (0, 1), value=-100) != -100
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0, scored]
        want = teacher_top_k(logits, 16, tail_uniforms(row["id"], int(scored.sum())))
        assert len(row["teacher_top_ids"]) == int(scored.sum())
        np.testing.assert_array_equal(np.array(row["teacher_top_ids"])[:, 0], want.top_ids[:, 0].numpy())
        np.testing.assert_allclose(
            np.array(row["teacher_top_logprobs"]), want.top_logprobs.numpy(), atol=5e-3, rtol=2e-3
        )
        np.testing.assert_allclose(np.array(row["teacher_tail"]), want.tail.numpy(), rtol=1e-4, atol=1e-4)
        # The tail draws are the row id's: the same tokens as drawn here from a single-row forward (a draw
        # may only differ where the batched forward's rounding moves a cdf step past its uniform).
        drawn = np.array(row["teacher_sample_ids"])
        assert (drawn == want.sample_ids.numpy()).mean() > 0.95
        assert not (drawn[:, :, None] == np.array(row["teacher_top_ids"])[:, None, :]).any()  # drawn from the tail only
        # teacher_ce comes from the same forward.
        target_logp = torch.log_softmax(logits, -1).gather(-1, labels[1:][labels[1:] != -100][:, None])
        assert row["teacher_ce"] == pytest.approx(-target_logp.mean().item(), abs=1e-4)


def test_teacher_hidden_writes_int8_hidden_states_and_the_head(ray_local, tiny_assets, dataset, tmp_path):
    from pocl_ray.teacher_cache import HEAD_FILE, HIDDEN_COLUMNS, arrow_types, check_teacher_cache, dequantize_hidden

    cfg = _config(
        tiny_assets,
        tmp_path,
        dataset["path"],
        scoring={"metrics": ["teacher_ce", "length"], "teacher_hidden": True},
        kd={"teacher": "cached"},
        data={"max_rows": 24},
    )
    result = score_dataset(cfg)
    entry = result.manifest["teacher_cache"]
    teacher = load_model(tiny_assets.teacher_dir, frozen=True)
    hidden_size = teacher.config.hidden_size
    assert (
        entry["form"] == "hidden" and entry["hidden_size"] == hidden_size and entry["columns"] == list(HIDDEN_COLUMNS)
    )
    assert entry["bytes_per_scored_token"] == hidden_size + 2 * -(-hidden_size // 64)
    assert check_teacher_cache(result.output_dir, cfg, tiny_assets.vocab_size) == entry
    summary = format_summary(result.manifest)
    assert f"teacher cache: hidden states (int8) + LM head, {entry['bytes_per_scored_token']} bytes" in summary
    assert HEAD_FILE in summary.splitlines()[-1]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(result.output_dir / HEAD_FILE))["weight"], teacher.lm_head.weight)
    table = pds.dataset(str(result.scores_path), format="parquet").to_table()
    for name, kind in arrow_types(None, tiny_assets.vocab_size, hidden_size).items():
        assert table.schema.field(name).type == kind
    for row in table.select(["labels", "input_ids", "teacher_ce", *HIDDEN_COLUMNS]).to_pylist()[:4]:
        labels = torch.tensor(row["labels"])
        scored = torch.nn.functional.pad(labels[1:], (0, 1), value=-100) != -100
        with torch.no_grad():
            want = teacher.model(input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0, scored]
        got = dequantize_hidden(
            torch.tensor(row["teacher_hidden"], dtype=torch.int8), torch.tensor(row["teacher_hidden_scale"]).half()
        )
        # Half an int8 step of each 64-channel group at most (batched and single-row forwards differ by ~1e-6).
        step = torch.tensor(row["teacher_hidden_scale"]).float().repeat_interleave(64, 1)[:, :hidden_size]
        assert got.shape == want.shape and ((got - want).abs() <= step / 2 + 1e-5).all()
        # teacher_ce comes from the same forward, through the head.
        logp = torch.log_softmax(want @ teacher.lm_head.weight.T, -1)
        target = labels[1:][labels[1:] != -100][:, None]
        assert row["teacher_ce"] == pytest.approx(-logp.gather(-1, target).mean().item(), abs=1e-4)


def test_teacher_hidden_refuses_a_teacher_whose_logits_are_not_its_head(tiny_assets, dataset, tmp_path):
    teacher = tmp_path / "capped"
    shutil.copytree(tiny_assets.teacher_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    cfg = _config(
        tiny_assets,
        tmp_path,
        dataset["path"],
        models={"teacher": str(teacher)},
        scoring={"metrics": ["length"], "teacher_hidden": True},
    )
    with pytest.raises(
        ConfigError, match=r"scoring.teacher_hidden: .*final_logit_softcapping = 30.0.*use scoring.teacher_top_k"
    ):
        score_dataset(cfg)
    assert not (tmp_path / "run" / "scores").exists()
