"""The quickstart's conversational twin, configs/quickstart-chat.yaml on data/chat_quickstart: the stand-in
teacher pipeline.prepare_teacher builds for it learns its tokenizer from the conversations."""

from __future__ import annotations

from pathlib import Path

from pocl_ray.config import load_config
from pocl_ray.data import read_table
from pocl_ray.teacher_prep import tokenizer_texts

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "chat_quickstart"
TRAIN_ROWS = 48


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


def test_the_stand_in_teachers_tokenizer_learns_the_conversations():
    """pipeline.prepare_teacher's tokenizer is trained on each conversation's roles and contents (before, it
    saw only the dolly template around empty instruction fields for every conversation row)."""
    cfg = twin_config(Path("unused"))
    texts = tokenizer_texts(cfg)
    records = read_table(cfg.data.train, max_rows=TRAIN_ROWS).to_pylist()
    assert len(texts) == len(records) == TRAIN_ROWS
    for text, record in zip(texts, records):
        assert text == "".join(f"{t['role']}\n{t['content']}\n" for t in record["messages"])
