"""The teacher every distillation step uses, settled before scoring, for the pipeline and the sweep.

- `pipeline.prepare_teacher`: when models.teacher does not exist, a tiny stand-in is built from
  scratch and trained on the references (SFT).
- `pipeline.sft_teacher`: models.teacher (prepared or given) is fine-tuned on data.train, as the
  paper's teacher is, into OUTPUT/teacher_sft/model, which then replaces models.teacher.

With output.dir in object storage both work there too: the stand-in is built in a local temporary folder
and uploaded, the runs write their scores, checkpoints and trained folder to the bucket, and the teacher
(OUTPUT/teacher_prep/model or OUTPUT/teacher_sft/model) replaces models.teacher as a URI, which every node
copies into its own cache (model_source).

Both train with the same scoring and training steps the distillation uses (a length-only scoring
pass, then Ray Train on the `sft` plan: one stage, CE only), each as a resumable pipeline step: skipped when
done for the same settings, resumed from its last checkpoint when interrupted.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pocl_ray import storage
from pocl_ray.config import ConfigError, RunConfig, TeacherPrepConfig, is_uri
from pocl_ray.conversations import parse
from pocl_ray.data import build_prompt, pinned_row_form, read_table, records_of
from pocl_ray.models import build_tiny_model, build_tiny_tokenizer, has_model_files
from pocl_ray.pipeline_steps import fingerprint, run_pipeline_step
from pocl_ray.ray_session import init_ray
from pocl_ray.scoring import score_dataset
from pocl_ray.training.driver import train


def tokenizer_texts(cfg: RunConfig) -> list[str]:
    """The stand-in tokenizer's training texts, one per row of data.train: an instruction row as the dolly
    template renders it; a conversation as its turns' roles and contents, each on its own lines (the text
    the ChatML template writes between its special tokens, which the tokenizer holds whole)."""
    table = read_table(cfg.data.train, cfg.data.format, cfg.data.max_rows)
    records = records_of(table.to_pydict())
    f = cfg.data.fields

    def first(row: dict, names: list[str]) -> str:
        return next((row[n] for n in names if isinstance(row.get(n), str)), "")

    if pinned_row_form(cfg.data.train, cfg.data).row_form == "conversation":  # as scoring reads the rows
        texts = []
        for row in records:
            column = next((c for c in f.messages if row.get(c) is not None), None)
            turns = parse(row[column], column)[0] if column else []  # a malformed row: rejected later
            texts.append("".join(f"{t['role']}\n{t['content']}\n" for t in turns))
        return texts
    return [
        build_prompt(first(row, f.instruction), first(row, f.context), "dolly") + first(row, f.response)
        for row in records
    ]


def build_stand_in(cfg: RunConfig, prep: TeacherPrepConfig, save_dir: Path) -> None:
    """The untrained stand-in teacher (`prep`: cfg.pipeline.prepare_teacher) in save_dir: a tokenizer
    trained on data.train's texts (`tokenizer_texts`) and a randomly initialised model over it."""
    tokenizer = build_tiny_tokenizer(tokenizer_texts(cfg), vocab_size=prep.vocab_size, save_dir=save_dir)
    build_tiny_model(
        prep.arch,
        vocab_size=len(tokenizer),
        hidden_size=prep.hidden_size,
        num_layers=prep.num_layers,
        num_heads=prep.num_heads,
        seed=prep.seed,
        max_positions=cfg.data.max_length,
        save_dir=save_dir,
        tokenizer=tokenizer,
    )


def prepare_teacher(cfg: RunConfig, prep: TeacherPrepConfig, work_dir: str | Path, target: str | Path) -> None:
    """Build a tiny teacher from scratch (`build_stand_in`, in a temporary folder, then copied to
    work_dir/init, where every worker reads it) and train it on the references (SFT) with the same scoring
    and training steps the distillation uses; save it at target."""
    init_dir = storage.join(work_dir, "init")
    with tempfile.TemporaryDirectory(prefix="pocl-teacher-") as tmp:
        build_stand_in(cfg, prep, Path(tmp))
        storage.copy_folder(tmp, init_dir, "output.dir")
    trained = _sft_run(
        cfg,
        init_dir,
        work_dir,
        {
            "models.tokenizer": init_dir,
            "curriculum.steps_per_stage": prep.steps,
            "training.lr": prep.lr,
            "training.min_lr": prep.lr / 100,
        },
    )
    _copy_into_place(trained, target)


def _sft_run(cfg: RunConfig, model: str, work_dir: str | Path, overrides: dict) -> str | Path:
    """Train `model` on the references alone (the sft plan) in work_dir; returns the trained folder.

    The model is both the trained "student" and the run's teacher (only its dev KD loss reads it).
    Scoring measures the length alone (no model) and keeps no teacher cache; one bucket holds all rows.
    """
    sft = cfg.with_overrides(
        {
            "models.teacher": model,
            "models.student": model,
            "models.student_layers": None,
            "scoring.metrics": ["length"],
            "scoring.directions": {},
            "scoring.teacher_top_k": None,
            "scoring.teacher_hidden": False,
            "kd.teacher": "online",
            "kd.on_policy_fraction": 0.0,
            "curriculum.plan": "sft",
            "curriculum.num_buckets": 1,
            "curriculum.data_curriculum": "none",
            "output.dir": str(work_dir),
            **overrides,
        }
    )
    score_dataset(sft)
    return train(sft).student_dir  # under work_dir: a local folder, or a URI when output.dir is one


def _copy_into_place(source: str | Path, target: str | Path) -> None:
    """A model folder copied to target whole or not at all: locally through a folder renamed at the end
    (a crash leaves no half-written teacher); in object storage, which has no rename, the pipeline step's
    marker, written once the copy is done, is what says the teacher is whole."""
    if is_uri(target):
        storage.remove_tree(target, "output.dir")
        storage.copy_folder(source, target, "output.dir")
        return
    tmp = Path(target).with_name(Path(target).name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)  # an earlier teacher there stays until the new one is whole
    tmp.rename(target)


def ensure_teacher(cfg: RunConfig, root: str | Path, min_cpus: int = 4) -> RunConfig:
    """Build the stand-in teacher (pipeline.prepare_teacher) when models.teacher is missing: at
    models.teacher, or with output.dir in object storage at OUTPUT/teacher_prep/model, which then replaces
    models.teacher in the config returned."""
    prep = cfg.pipeline.prepare_teacher
    if has_model_files(cfg.models.teacher) or (prep is None and not Path(cfg.models.teacher).is_absolute()):
        return cfg  # there, or maybe a Hub id or a URI: the preflight resolves it (or says it is missing)
    if prep is None:
        raise FileNotFoundError(
            f"models.teacher: {cfg.models.teacher} does not exist (set pipeline.prepare_teacher to build one)"
        )
    work_dir = storage.join(root, "teacher_prep")
    target = storage.join(work_dir, "model") if is_uri(root) else cfg.models.teacher

    def build() -> None:
        init_ray(min_cpus=min_cpus)
        prepare_teacher(cfg, prep, work_dir, target)

    key = fingerprint(cfg, ("data",), {"prep": prep.model_dump(), "teacher": cfg.models.teacher})
    run_pipeline_step("prepare teacher", work_dir, key, build)
    return cfg.with_overrides({"models.teacher": target})


def sft_overrides(cfg: RunConfig) -> dict:
    """The settings of the teacher fine-tuning (pipeline.sft_teacher) as dotted overrides of cfg,
    checked against the rest of cfg (an error names pipeline.sft_teacher)."""
    sft = cfg.pipeline.sft_teacher
    if sft is None:
        raise ConfigError("pipeline.sft_teacher: not set, so there is no fine-tuning to configure")
    length = (
        {"curriculum.steps_per_stage": sft.steps}
        if sft.steps
        else {"curriculum.epochs_per_stage": sft.epochs, "curriculum.steps_per_stage": None}
    )
    overrides = {
        **length,
        "training.lr": sft.lr,
        "training.min_lr": sft.min_lr,
        "training.warmup_steps": sft.warmup_steps,
        "training.global_batch_size": sft.global_batch_size or cfg.training.global_batch_size,
        "name": f"{cfg.name}-teacher-sft",
    }
    try:
        cfg.with_overrides(overrides)
    except ConfigError as err:
        raise ConfigError(f"pipeline.sft_teacher: {err}") from None
    return overrides


def sft_teacher_config(cfg: RunConfig, root: str | Path) -> RunConfig:
    """cfg with models.teacher replaced by the fine-tuned teacher (pipeline.sft_teacher cleared: that
    teacher is the fine-tuned one). A student cut from the teacher (models.student unset) is cut
    from the fine-tuned one; tokenizer: the given one, else the fine-tuned folder's copy."""
    return cfg.with_overrides(
        {"models.teacher": storage.join(root, "teacher_sft", "model"), "pipeline.sft_teacher": None}
    )


def finetune_teacher(cfg: RunConfig, root: str | Path) -> str:
    """Fine-tune models.teacher on the references of data.train (pipeline.sft_teacher) into
    root/teacher_sft/model (a URI when root is one); returns that folder."""
    work_dir = storage.join(root, "teacher_sft")
    trained = _sft_run(cfg, cfg.models.teacher, work_dir, sft_overrides(cfg))
    target = storage.join(work_dir, "model")
    _copy_into_place(trained, target)
    return target


def resolve_teacher(cfg: RunConfig, root: str | Path, min_cpus: int = 4) -> RunConfig:
    """The config every later step uses: the teacher built when missing (pipeline.prepare_teacher),
    then fine-tuned when pipeline.sft_teacher asks (a resumable pipeline step keyed by the fine-tuning's
    data, teacher and settings, and the stand-in's settings, which change the teacher it starts from)."""
    cfg = ensure_teacher(cfg, root, min_cpus=min_cpus)
    sft = cfg.pipeline.sft_teacher
    if sft is None:
        return cfg
    prep = cfg.pipeline.prepare_teacher
    # Not the student's settings (curriculum, kd, eval, models.student): changing them keeps the teacher.
    key = fingerprint(
        cfg.with_overrides(sft_overrides(cfg)),
        ("data", "training"),
        {
            "sft": sft.model_dump(),
            "teacher": cfg.models.teacher,
            "tokenizer": cfg.models.tokenizer,
            "dtype": cfg.models.dtype,
            "prepare_teacher": prep.model_dump() if prep else None,
        },
    )

    def finetune() -> None:
        init_ray(min_cpus=min_cpus)
        finetune_teacher(cfg, root)

    run_pipeline_step("teacher fine-tuning", storage.join(root, "teacher_sft"), key, finetune)
    return sft_teacher_config(cfg, root)
