"""The quickstart's conversational twin, configs/quickstart-chat.yaml on data/chat_quickstart, end to end.

`run_distill` of the shipped config, in process and in one Ray session for the module, trimmed to the
smallest sizes that still run scoring (the student measurers), buckets, POCL training (dev-row checkpoint
selection included), evaluation on the ShareGPT set and the report on conversation rows. The assertions are
what a user checks: only assistant tokens are scored, every row is bucketed or rejected with a reason, the
curriculum ran, the report holds the run. The stand-in teacher is the one pipeline.prepare_teacher builds
(`teacher_prep.build_stand_in`: its tokenizer trained on the conversations), left untrained: its SFT is a
further scoring pass and Ray Train run, the steps the instruction quickstart's run already covers
(tests/test_e2e.py, as users submit it with `ray job submit`; this module adds no submission).
"""

from __future__ import annotations

import io
import json
import re
import time
from contextlib import redirect_stdout
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pocl_ray.config import load_config
from pocl_ray.data import IGNORE_INDEX, read_table
from pocl_ray.models import load_tokenizer
from pocl_ray.probes import is_probe
from pocl_ray.teacher_prep import build_stand_in, tokenizer_texts

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "chat_quickstart"
TRAIN_ROWS = 48

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def twin_config(out: Path):
    """configs/quickstart-chat.yaml as shipped, trimmed for the test: sizes, one compared run (POCL), no
    teacher evaluation (the compared runs and the teacher's evaluation are the instruction e2e's business)."""
    return load_config(REPO / "configs" / "quickstart-chat.yaml").with_overrides(
        {
            "data.train": str(DATA / "train.jsonl"),
            "data.dev": str(DATA / "dev.jsonl"),
            "data.max_rows": TRAIN_ROWS,
            "models.teacher": str(out / "teacher"),
            "scoring.max_new_tokens": 8,
            "curriculum.num_buckets": 2,
            "curriculum.steps_per_stage": 1,
            "training.num_workers": 1,
            "training.global_batch_size": 16,
            "training.micro_batch_size": 16,
            "eval.sets": [{"name": "chatterbot", "path": str(DATA / "test_chatterbot.jsonl"), "max_rows": 8}],
            "eval.seeds": [10],
            "eval.max_new_tokens": 8,
            "eval.batch_size": 8,
            "pipeline.prepare_teacher.vocab_size": 512,
            "pipeline.prepare_teacher.hidden_size": 32,
            "pipeline.prepare_teacher.num_layers": 2,
            "pipeline.prepare_teacher.num_heads": 2,
            "pipeline.prepare_teacher.steps": 4,
            "pipeline.compare": {"pocl": {"curriculum.plan": "pocl"}},
            "pipeline.evaluate_teacher": False,
            "output.dir": str(out),
        }
    )


def _turns(record: dict) -> list[dict]:
    """A record's turns as {role, content}, from either form."""
    if "messages" in record:
        return record["messages"]
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]]


def _scored_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The label-carrying tokens of a prepared row, one list per contiguous run."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


def test_the_stand_in_teachers_tokenizer_learns_the_conversations():
    """pipeline.prepare_teacher's tokenizer is trained on each conversation's roles and contents (before, it
    saw only the dolly template around empty instruction fields for every conversation row)."""
    cfg = twin_config(Path("unused"))
    texts = tokenizer_texts(cfg)
    records = read_table(cfg.data.train, max_rows=TRAIN_ROWS).to_pylist()
    assert len(texts) == len(records) == TRAIN_ROWS
    for text, record in zip(texts, records):
        assert text == "".join(f"{t['role']}\n{t['content']}\n" for t in record["messages"])


@pytest.fixture(scope="module")
def twin(ray_local, tmp_path_factory):
    """The trimmed twin run: (config, output folder, printed log, wall seconds)."""
    from pocl_ray.pipeline import run_distill

    out = tmp_path_factory.mktemp("quickstart_chat")
    cfg = twin_config(out)
    build_stand_in(cfg, cfg.pipeline.prepare_teacher, Path(cfg.models.teacher))
    log = io.StringIO()
    started = time.perf_counter()
    with redirect_stdout(log):
        run_distill(cfg)
    return cfg, out, log.getvalue(), time.perf_counter() - started


@pytest.mark.ray
def test_every_row_is_scored_on_its_assistant_turns_or_rejected_with_a_reason(twin):
    cfg, out, _, _ = twin
    manifest = json.loads((out / "scores" / "manifest.json").read_text())
    assert manifest["rows_in"] == TRAIN_ROWS == manifest["rows_scored"] + manifest["rows_rejected"]
    rejected = [json.loads(line) for line in (out / "scores" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == manifest["rows_rejected"]
    assert all(r["reason"].startswith("conversation too long") for r in rejected), rejected
    assert [m["name"] for m in manifest["metrics"]] == ["student_ce", "student_rougeL"]
    buckets = [b["rows"] for b in manifest["buckets"]]
    assert len(buckets) == 2 and min(buckets) > 0 and sum(buckets) == manifest["rows_scored"]

    tokenizer = load_tokenizer(out / "teacher")
    records = {r["id"]: r for r in read_table(cfg.data.train, max_rows=TRAIN_ROWS).to_pylist()}
    rows = pads.dataset(str(out / "scores" / manifest["scores_path"]), format="parquet").to_table().to_pylist()
    assert len(rows) == manifest["rows_scored"] and {r["bucket"] for r in rows} == {0, 1}
    for row in rows:
        answers = [t["content"] + "<|im_end|>" for t in _turns(records[row["id"]]) if t["role"] == "assistant"]
        runs = [tokenizer.decode(run) for run in _scored_runs(row["input_ids"], row["labels"])]
        assert runs and runs == answers[-len(runs) :], row["id"]  # every kept assistant turn, nothing else
        assert row["num_response_tokens"] == sum(label != IGNORE_INDEX for label in row["labels"])
        assert row["response"] == answers[-1].removesuffix("<|im_end|>")
        prompt = tokenizer.decode(row["input_ids"][: row["num_prompt_tokens"]])
        assert prompt.endswith("<|im_start|>assistant\n") and answers[-1] not in prompt
    assert sum(len(_scored_runs(r["input_ids"], r["labels"])) > 1 for r in rows) > 0  # multi-turn rows among them


@pytest.mark.ray
def test_the_curriculum_trains_the_student_and_the_evaluation_scores_the_last_turn(twin):
    cfg, out, log, _ = twin
    run = out / "runs" / "pocl"
    steps = [r for r in map(json.loads, (run / "train" / "metrics.jsonl").read_text().splitlines()) if not is_probe(r)]
    assert [r["stage"] for r in steps] == [0, 1] and [r["temperature"] for r in steps] == [1.0, 2.0]
    assert all(r["kd_loss"] > 0 for r in steps)
    selection = json.loads((run / "train" / "selection.json").read_text())
    assert selection["protocol"]["dev_rows"] > 0.9 * len(read_table(cfg.data.dev))  # the conversational dev rows
    assert selection["candidates"] and (run / "train" / "student" / "config.json").is_file()

    results = json.loads((run / "eval" / "results.json").read_text())
    chatterbot = results["sets"]["chatterbot"]
    assert chatterbot["rows_in"] == 8 == chatterbot["rows"] + chatterbot["rows_rejected"]
    assert chatterbot["rows"] > 0 and 0.0 <= chatterbot["rougeL_mean"] <= 100.0 and chatterbot["ce_mean"] > 0
    generations = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == chatterbot["rows"]

    report = (out / "report" / "report.md").read_text()
    scored = json.loads((out / "scores" / "manifest.json").read_text())["rows_scored"]
    assert re.search(rf"^\| rows scored +\| {scored} +\|$", report, re.M)
    assert re.search(rf"^\| chatterbot +\| {chatterbot['rougeL_mean']:.2f} ± 0\.00 +\|$", report, re.M)
    assert re.search(r"^\| pocl +\| 2 +\| 2 +\|", report, re.M)  # its training: 2 steps in 2 stages
    assert "report written to" in log and "prepare teacher" not in log  # the stand-in was there already
