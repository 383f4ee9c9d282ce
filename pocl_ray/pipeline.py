"""The distill pipeline: [prepare teacher] -> score -> train -> eval -> report, from one config.

Every stage records a fingerprint of the config it depends on in `<stage dir>/.stage.json`.
A re-run skips a stage whose fingerprint matches and that finished; an unfinished stage with the
same fingerprint is re-entered (training resumes from its last checkpoint); a stage whose
fingerprint changed is cleared and redone, so stale outputs are never mixed with new ones.

With `pipeline.compare`, each label gets its own student under DIR/runs/<label>/{train,eval}
while the scoring pass (DIR/scores) is shared: buckets are re-cut from the stored ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from pocl_ray.config import ConfigError, RunConfig

# Config sections each stage's outputs depend on (the output dir itself is not part of them).
SCORE_KEYS = ("data", "models", "scoring")
TRAIN_KEYS = ("data", "models", "scoring", "curriculum", "kd", "training")
EVAL_KEYS = (*TRAIN_KEYS, "eval")


def fingerprint(cfg: RunConfig, sections: tuple[str, ...], extra: dict | None = None) -> str:
    dumped = cfg.model_dump(mode="json")
    payload = {k: dumped[k] for k in sections} | (extra or {})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_stage(name: str, stage_dir: Path, key: str, fn: Callable[[], Any]) -> bool:
    """Run fn unless stage_dir already finished with this key; returns whether it ran."""
    marker = stage_dir / ".stage.json"
    if marker.is_file():
        state = json.loads(marker.read_text())
        if state.get("key") == key and state.get("done"):
            print(f"[pipeline] {name}: done already for this config, skipped ({stage_dir})", flush=True)
            return False
        if state.get("key") != key:
            print(f"[pipeline] {name}: config changed since the last run, redoing ({stage_dir})", flush=True)
            shutil.rmtree(stage_dir)
        else:
            print(f"[pipeline] {name}: resuming an unfinished run ({stage_dir})", flush=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "done": False}))
    t0 = time.time()
    print(f"[pipeline] {name}: starting", flush=True)
    fn()
    marker.write_text(json.dumps({"key": key, "done": True, "seconds": round(time.time() - t0, 1)}))
    print(f"[pipeline] {name}: finished in {time.time() - t0:.0f}s", flush=True)
    return True


def compared_runs(cfg: RunConfig) -> dict[str, RunConfig]:
    """label -> the run config of that label (its output.dir is its own run directory)."""
    root = Path(cfg.output.dir)
    if not cfg.pipeline.compare:
        return {"": cfg}
    runs = {}
    for label, overrides in cfg.pipeline.compare.items():
        if not label or "/" in label or label.startswith("."):
            raise ConfigError(f"pipeline.compare: {label!r} is not a usable run label")
        bad = [k for k in overrides if k.split(".")[0] in ("data", "models", "scoring", "output", "pipeline")]
        if bad:
            raise ConfigError(
                f"pipeline.compare.{label}: {bad} change the shared scoring pass or layout; "
                "only curriculum, kd, training and eval settings may differ between compared runs"
            )
        try:
            run = cfg.with_overrides({**overrides, "output.dir": str(root / "runs" / label)})
        except ConfigError as err:
            raise ConfigError(f"pipeline.compare.{label}: {err}") from None
        runs[label] = run
    return runs


def _texts_for_tokenizer(cfg: RunConfig) -> list[str]:
    from pocl_ray.data import build_prompt, read_table

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
    from pocl_ray.models import build_tiny_model, build_tiny_tokenizer
    from pocl_ray.scoring import score_dataset
    from pocl_ray.training import train

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


def init_ray(min_cpus: int = 4) -> None:
    """Join the cluster when there is one (RAY_ADDRESS, as inside `ray job submit`), else start Ray locally.

    Locally, Ray Data read tasks, measurer actors, train workers (and Tune trial drivers) must fit
    together even on 2 cores, so at least `min_cpus` logical CPUs are advertised.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(num_cpus=max(min_cpus, os.cpu_count() or 1))


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
              lambda: (init_ray(min_cpus), prepare_teacher(cfg, root / "teacher_prep")))


def run_distill(cfg: RunConfig) -> Path:
    """Run every stage the config asks for; returns the report's path."""
    from pocl_ray.evaluation import evaluate
    from pocl_ray.report import write_report
    from pocl_ray.scoring import score_dataset
    from pocl_ray.training import train

    root = Path(cfg.output.dir)
    runs = compared_runs(cfg)  # validates the compared configs before any work starts
    if cfg.pipeline.prepare_teacher is None and not Path(cfg.models.teacher).is_dir():
        raise FileNotFoundError(
            f"models.teacher: {cfg.models.teacher} does not exist (set pipeline.prepare_teacher to build one)"
        )
    init_ray()
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(cfg.to_yaml())
    ensure_teacher(cfg, root)

    run_stage("score", root / "scores", fingerprint(cfg, SCORE_KEYS), lambda: score_dataset(cfg))

    scores_dir = root / "scores"
    for label, run in runs.items():
        run_dir = Path(run.output.dir)
        tag = f" [{label}]" if label else ""
        run_stage(f"train{tag}", run_dir / "train", fingerprint(run, TRAIN_KEYS),
                  lambda run=run: train(run, scores_dir=scores_dir))
        if run.eval.sets:
            student = run_dir / "train" / "student"
            run_stage(f"eval{tag}", run_dir / "eval", fingerprint(run, EVAL_KEYS),
                      lambda run=run, student=student: evaluate(run, student, label=None))
    report_runs = {label or "student": f"runs/{label}" if label else "." for label in runs}
    if cfg.pipeline.evaluate_teacher and cfg.eval.sets:
        teacher_dir = root / "runs" / "teacher"
        run_stage("eval [teacher]", teacher_dir / "eval", fingerprint(cfg, ("data", "models", "eval")),
                  lambda: evaluate(cfg, cfg.models.teacher, output_dir=teacher_dir, label=None))
        report_runs["teacher"] = "runs/teacher"
    report = write_report(root, report_runs)
    print(f"[pipeline] report written to {report}", flush=True)
    return report
