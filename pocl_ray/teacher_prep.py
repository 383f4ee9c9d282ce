"""The stand-in teacher (`pipeline.prepare_teacher`): when models.teacher does not exist, a tiny
model is built from scratch and trained on the references (SFT) with the same scoring and training
stages the distillation uses, as a resumable stage of the pipeline and the sweep.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pocl_ray.config import RunConfig
from pocl_ray.data import build_prompt, read_table
from pocl_ray.models import build_tiny_model, build_tiny_tokenizer
from pocl_ray.scoring import score_dataset
from pocl_ray.stages import fingerprint, init_ray, run_stage
from pocl_ray.training import train


def _texts_for_tokenizer(cfg: RunConfig) -> list[str]:
    table = read_table(cfg.data.train, cfg.data.format, cfg.data.max_rows).to_pylist()
    f = cfg.data.fields

    def first(row: dict, names: list[str]) -> str:
        return next((row[n] for n in names if isinstance(row.get(n), str)), "")

    texts = []
    for row in table:
        instruction, context = first(row, f.instruction), first(row, f.context)
        texts.append(build_prompt(instruction, context, "dolly") + first(row, f.response))
    return texts


def prepare_teacher(cfg: RunConfig, work_dir: Path) -> None:
    """Build a tiny teacher from scratch and train it on the references (SFT) with the same
    scoring and training stages the distillation uses; save it at models.teacher."""
    prep = cfg.pipeline.prepare_teacher
    init_dir = work_dir / "init"
    tokenizer = build_tiny_tokenizer(_texts_for_tokenizer(cfg), vocab_size=prep.vocab_size, save_dir=init_dir)
    build_tiny_model(
        prep.arch, vocab_size=len(tokenizer), hidden_size=prep.hidden_size, num_layers=prep.num_layers,
        num_heads=prep.num_heads, seed=prep.seed, max_positions=cfg.data.max_length,
        save_dir=init_dir, tokenizer=tokenizer,
    )
    sft = cfg.with_overrides({
        "models.teacher": str(init_dir), "models.student": str(init_dir), "models.tokenizer": str(init_dir),
        "scoring.metrics": ["length"], "scoring.directions": {},
        "curriculum.plan": "sft", "curriculum.num_buckets": 1, "curriculum.steps_per_stage": prep.steps,
        "training.lr": prep.lr, "training.min_lr": prep.lr / 100, "output.dir": str(work_dir),
    })
    score_dataset(sft)
    result = train(sft)
    target = Path(cfg.models.teacher)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result.student_dir, tmp)
    tmp.rename(target)


def ensure_teacher(cfg: RunConfig, root: Path, min_cpus: int = 4) -> None:
    """Build the stand-in teacher (pipeline.prepare_teacher) when models.teacher is missing."""
    if (Path(cfg.models.teacher) / "config.json").is_file():
        return
    if cfg.pipeline.prepare_teacher is None:
        raise FileNotFoundError(
            f"models.teacher: {cfg.models.teacher} does not exist (set pipeline.prepare_teacher to build one)"
        )
    key = fingerprint(cfg, ("data",), {"prep": cfg.pipeline.prepare_teacher.model_dump(), "teacher": cfg.models.teacher})
    run_stage("prepare teacher", root / "teacher_prep", key,
              lambda: (init_ray(min_cpus=min_cpus), prepare_teacher(cfg, root / "teacher_prep")))
