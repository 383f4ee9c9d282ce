"""Curriculum plans: what the trainer trains on, against which target, at which settings, for how long.

A Plan is a list of Stages and the trainer executes any Plan. POCL, plain KD, SFT, curriculum
extraction and progressive distillation are only different Plan builders: one curriculum
abstraction. Everything here is pure; the Ray actor that serves a plan to the
training workers is `pocl_ray.coordinator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pocl_ray.difficulty import bucket_bounds

if TYPE_CHECKING:
    from pocl_ray.config import RunConfig

Target = Literal["logits", "hidden"]
Shape = Literal["linear", "constant", "cosine"]


@dataclass(frozen=True)
class Stage:
    """One curriculum stage.

    Length is `epochs` over the stage's pool or a fixed number of optimizer `steps` (exactly one
    is set). With `until_plateau` that length is an upper bound: the stage ends early once the dev
    loss has not improved for `patience` evaluations.
    """

    index: int
    buckets: tuple[int, ...]
    temperature: float = 1.0
    kd_weight: float = 1.0
    loss: str = "fkl"
    epochs: float | None = None
    steps: int | None = None
    until_plateau: bool = False
    patience: int = 2
    restart_optimizer: bool = True
    target: Target = "logits"
    teacher_layer: int | None = None
    student_layer: int | None = None
    teacher: str | None = None  # a teacher checkpoint for this stage; None = the run's teacher

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"stage {self.index}: set exactly one of epochs and steps")
        if self.epochs is not None and self.epochs <= 0 or self.steps is not None and self.steps <= 0:
            raise ValueError(f"stage {self.index}: length must be positive")
        if not self.buckets:
            raise ValueError(f"stage {self.index}: empty data pool")
        if self.target == "hidden" and (self.teacher_layer is None or self.student_layer is None):
            raise ValueError(f"stage {self.index}: a hidden-state target needs teacher_layer and student_layer")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"stage {self.index}: kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.temperature <= 0:
            raise ValueError(f"stage {self.index}: temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class Plan:
    name: str
    num_buckets: int
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"plan {self.name!r} has no stages")
        for i, s in enumerate(self.stages):
            if s.index != i:
                raise ValueError(f"plan {self.name!r}: stage {i} has index {s.index}")
            bad = [b for b in s.buckets if not 0 <= b < self.num_buckets]
            if bad:
                raise ValueError(f"plan {self.name!r}: stage {i} names buckets {bad} outside 0..{self.num_buckets - 1}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        stages = tuple(Stage(**{**s, "buckets": tuple(s["buckets"])}) for s in d["stages"])
        return cls(name=d["name"], num_buckets=d["num_buckets"], stages=stages)


def schedule(start: float, end: float, n: int, shape: Shape = "linear") -> list[float]:
    """n per-stage values from start to end; a single stage gets `end` (it trains on all data)."""
    if n < 1:
        raise ValueError(f"a schedule needs at least one stage, got {n}")
    if shape == "constant":
        return [float(start)] * n
    if n == 1:
        return [float(end)]
    out = []
    for s in range(n):
        x = s / (n - 1)
        if shape == "cosine":
            x = (1 - math.cos(math.pi * x)) / 2
        elif shape != "linear":
            raise ValueError(f"unknown schedule shape {shape!r}; allowed: linear, constant, cosine")
        out.append(start + (end - start) * x)
    return out


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int = 0) -> float:
    """Cosine decay from lr to min_lr over total_steps (step 0-based), after an optional linear warm-up.

    transformers' get_cosine_with_min_lr_schedule_with_warmup (num_training_steps = total_steps - 1)
    with one difference: the warm-up runs one step ahead, so the first step trains at lr / warmup_steps
    instead of 0 (tests/test_curriculum.py checks both against the library step by step). Written out
    because training needs the rate of any step of a segment that spans stages and resumes mid-way;
    the library only offers the schedule as a LambdaLR bound to one optimizer's step count.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _length(epochs: float | None, steps: int | None) -> dict:
    if steps is not None:
        return {"steps": int(steps)}
    return {"epochs": float(epochs if epochs is not None else 8.0)}


def pocl_plan(
    num_buckets: int = 4,
    epochs_per_stage: float | None = 8.0,
    steps_per_stage: int | None = None,
    temperature: tuple[float, float, Shape] = (1.0, 2.0, "linear"),
    kd_weight: tuple[float, float] = (0.7, 1.0),
    loss: str = "fkl",
    restart_optimizer: bool = True,
    until_plateau: bool = False,
    patience: int = 2,
) -> Plan:
    """POCL baby-step plan: stage s trains on buckets 0..s while T and the KD weight rise (METHODS.md §1)."""
    t_start, t_end, t_shape = temperature
    temps = schedule(t_start, t_end, num_buckets, t_shape)
    kd_weights = schedule(kd_weight[0], kd_weight[1], num_buckets, "linear")
    length = _length(epochs_per_stage, steps_per_stage)
    stages = tuple(
        Stage(
            index=s,
            buckets=tuple(range(s + 1)),
            temperature=temps[s],
            kd_weight=kd_weights[s],
            loss=loss,
            until_plateau=until_plateau,
            patience=patience,
            restart_optimizer=restart_optimizer,
            **length,
        )
        for s in range(num_buckets)
    )
    return Plan(name="pocl", num_buckets=num_buckets, stages=stages)


def _equal_budget(num_buckets: int, epochs_per_stage: float | None, steps_per_stage: int | None) -> dict:
    """The one-stage length that sees as many samples as the POCL plan with the same interval."""
    if steps_per_stage is not None:
        return {"steps": steps_per_stage * num_buckets}
    e = epochs_per_stage if epochs_per_stage is not None else 8.0
    return {"epochs": e * (num_buckets + 1) / 2}


def baseline_plan(
    num_buckets: int = 4,
    epochs_per_stage: float | None = 8.0,
    steps_per_stage: int | None = None,
    temperature: float = 1.0,
    kd_weight: float = 0.7,
    loss: str = "fkl",
    epochs: float | None = None,
    steps: int | None = None,
) -> Plan:
    """Plain KD: one stage on all data at constant T and KD weight.

    By default its length matches the sample budget of the POCL plan with the same bucket count and
    interval (8 epochs x 4 buckets -> 20 epochs); pass `epochs` or `steps` to set it directly.
    """
    length = (
        _length(epochs, steps) if (epochs or steps) else _equal_budget(num_buckets, epochs_per_stage, steps_per_stage)
    )
    stage = Stage(
        index=0, buckets=tuple(range(num_buckets)), temperature=temperature, kd_weight=kd_weight, loss=loss, **length
    )
    return Plan(name="baseline", num_buckets=num_buckets, stages=(stage,))


def sft_plan(**kwargs) -> Plan:
    """Supervised fine-tuning on the references alone (KD weight 0), same budget rules as baseline_plan."""
    plan = baseline_plan(**{**kwargs, "kd_weight": 0.0})
    return replace(plan, name="sft")


def extraction_plan(
    teacher_layers: list[int],
    student_layers: list[int],
    steps_per_layer: int,
    final_steps: int,
    *,
    num_buckets: int = 1,
    loss: str = "fkl",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    restart_optimizer: bool = True,
) -> Plan:
    """Curriculum extraction (METHODS.md §2): match projected teacher layers in order, then output KD.

    Hidden-state stages use the matching loss alone (kd_weight 1, loss "mse"); the final stage is
    ordinary output KD with `loss`, `temperature` and `kd_weight`.
    """
    if len(teacher_layers) != len(student_layers):
        raise ValueError(
            f"teacher_layers ({len(teacher_layers)}) and student_layers ({len(student_layers)}) must pair up"
        )
    pool = tuple(range(num_buckets))
    stages = [
        Stage(
            index=i,
            buckets=pool,
            steps=steps_per_layer,
            target="hidden",
            teacher_layer=t,
            student_layer=s,
            loss="mse",
            kd_weight=1.0,
            restart_optimizer=restart_optimizer,
        )
        for i, (t, s) in enumerate(zip(teacher_layers, student_layers))
    ]
    stages.append(
        Stage(
            index=len(stages),
            buckets=pool,
            steps=final_steps,
            loss=loss,
            temperature=temperature,
            kd_weight=kd_weight,
            restart_optimizer=restart_optimizer,
        )
    )
    return Plan(name="extraction", num_buckets=num_buckets, stages=tuple(stages))


def progressive_plan(
    teacher_checkpoints: Sequence[str | None],
    steps_per_checkpoint: int,
    *,
    final_steps: int | None = None,
    num_buckets: int = 1,
    loss: str = "fkl",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    restart_optimizer: bool = False,
) -> Plan:
    """Progressive distillation (Panigrahi et al., 2024): output KD from each teacher checkpoint in turn.

    A checkpoint None is the run's own (final) teacher. The last stage runs `final_steps` steps
    (default `steps_per_checkpoint`).
    """
    if not teacher_checkpoints:
        raise ValueError("progressive_plan needs at least one teacher checkpoint")
    pool = tuple(range(num_buckets))
    last = len(teacher_checkpoints) - 1
    stages = tuple(
        Stage(
            index=i,
            buckets=pool,
            steps=final_steps if i == last and final_steps is not None else steps_per_checkpoint,
            teacher=ckpt,
            loss=loss,
            temperature=temperature,
            kd_weight=kd_weight,
            restart_optimizer=restart_optimizer,
        )
        for i, ckpt in enumerate(teacher_checkpoints)
    )
    return Plan(name="progressive", num_buckets=num_buckets, stages=stages)


def with_data_curriculum(target_plan: Plan, data_plan: Plan) -> Plan:
    """Give each stage of a target plan (extraction/progressive) the pool of a data plan (POCL).

    Stage i of M takes the pool of data stage ceil((i + 1) * K / M) - 1 of K: the data plan's pool
    at the point where target stage i ends. The pool grows easy to hard across the target stages and
    the last stage always trains on the data plan's final pool (all data for POCL), also when there
    are fewer target stages than data stages (floor(i * K / M) left the hardest buckets out then).
    """
    m, k = len(target_plan.stages), len(data_plan.stages)
    stages = tuple(
        replace(s, buckets=data_plan.stages[-(-(i + 1) * k // m) - 1].buckets) for i, s in enumerate(target_plan.stages)
    )
    return Plan(name=f"{target_plan.name}+{data_plan.name}", num_buckets=data_plan.num_buckets, stages=stages)


def uniform_layer_map(
    num_teacher_layers: int, num_student_layers: int, teacher_layers: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Teacher layer l (1-based, as in hidden_states[l]) maps to student layer round(l * L_S / L_T), at least 1."""
    layers = teacher_layers if teacher_layers is not None else list(range(1, num_teacher_layers + 1))
    bad = [t for t in layers if not 1 <= t <= num_teacher_layers]
    if bad:
        raise ValueError(f"teacher layers {bad} outside 1..{num_teacher_layers}")
    student = [max(1, round(t * num_student_layers / num_teacher_layers)) for t in layers]
    return list(layers), student


def plan_from_config(
    cfg: RunConfig, num_teacher_layers: int | None = None, num_student_layers: int | None = None
) -> Plan:
    """The plan a run config asks for. Extraction needs the two models' layer counts."""
    c, kd = cfg.curriculum, cfg.kd
    epochs_per_stage = c.epochs_per_stage if c.steps_per_stage is None else None
    if c.plan == "pocl":
        return pocl_plan(
            c.num_buckets,
            epochs_per_stage,
            c.steps_per_stage,
            temperature=(c.temperature_start, c.temperature_end, c.temperature_shape),
            kd_weight=(c.kd_weight_start, c.kd_weight_end),
            loss=kd.loss,
            restart_optimizer=c.restart_optimizer,
            until_plateau=c.advance == "plateau",
            patience=c.patience,
        )
    if c.plan == "baseline":
        return baseline_plan(
            num_buckets=c.num_buckets,
            epochs_per_stage=epochs_per_stage,
            steps_per_stage=c.steps_per_stage,
            temperature=c.temperature_start,
            kd_weight=c.kd_weight_start,
            loss=kd.loss,
        )
    if c.plan == "sft":
        return sft_plan(
            num_buckets=c.num_buckets,
            epochs_per_stage=epochs_per_stage,
            steps_per_stage=c.steps_per_stage,
            temperature=c.temperature_start,
            loss=kd.loss,
        )
    if c.plan == "extraction":
        if num_teacher_layers is None or num_student_layers is None:
            raise ValueError("the extraction plan needs the teacher's and student's layer counts")
        e = c.extraction
        if e.layer_map is not None:
            teacher_layers = e.teacher_layers or list(range(1, num_teacher_layers + 1))
            if len(e.layer_map) != len(teacher_layers):
                raise ValueError(
                    f"curriculum.extraction.layer_map has {len(e.layer_map)} entries "
                    f"for {len(teacher_layers)} teacher layers"
                )
            student_layers = list(e.layer_map)
        else:
            teacher_layers, student_layers = uniform_layer_map(num_teacher_layers, num_student_layers, e.teacher_layers)
        target = extraction_plan(
            teacher_layers,
            student_layers,
            e.steps_per_layer,
            e.final_steps,
            loss=kd.loss,
            temperature=c.output_kd.temperature,
            kd_weight=c.output_kd.kd_weight,
        )
    elif c.plan == "progressive":
        p = c.progressive
        teachers: list[str | None] = list(p.teacher_checkpoints)
        # The method ends on the final teacher: None (the run's teacher, models.teacher) is appended
        # unless the list already ends on that folder.
        if Path(p.teacher_checkpoints[-1]).resolve() != Path(cfg.models.teacher).resolve():
            teachers.append(None)
        target = progressive_plan(
            teachers,
            p.steps_per_checkpoint,
            final_steps=p.final_steps,
            loss=kd.loss,
            temperature=c.output_kd.temperature,
            kd_weight=c.output_kd.kd_weight,
        )
    else:
        raise ValueError(f"curriculum.plan: unknown plan {c.plan!r}")
    # Only the pools come from the POCL plan; each stage keeps its own target, settings and length.
    return target if c.data_curriculum == "none" else with_data_curriculum(target, pocl_plan(c.num_buckets))


# ---------------------------------------------------------------------------------------------
# A plan as the trainer runs it: each stage's pool and length in optimizer steps (pure).
#
# Rows are addressed by their difficulty rank (the scores' `rank` column, `pocl_ray.difficulty`): a
# stage's pool is a union of contiguous rank ranges, so re-cutting the plan's bucket count never needs
# re-scoring.
# One optimizer step consumes `global_batch` rows of the pool and an epoch ceil(pool /
# global_batch) steps, the last one the remainder; which rows each worker trains on in each step is
# `pocl_ray.shards`, and the actor that serves them is `pocl_ray.coordinator`.


@dataclass(frozen=True)
class StageSpec:
    """A stage as the trainer runs it: its pool in ranks, its length in optimizer steps, and where it
    sits in its learning-rate cosine (a cosine spans consecutive stages sharing one optimizer)."""

    stage: Stage
    pool_ranges: tuple[tuple[int, int], ...]
    pool_rows: int
    steps_per_epoch: int
    steps: int
    lr_offset: int
    lr_total: int

    def epoch_of(self, stage_step: int) -> int:
        return stage_step // self.steps_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)


def pool_ranges(buckets: tuple[int, ...], num_rows: int, num_buckets: int) -> tuple[tuple[int, int], ...]:
    """The half-open rank ranges [start, stop) of a pool of buckets, merged where they touch."""
    merged: list[list[int]] = []
    for start, stop in sorted(bucket_bounds(b, num_rows, num_buckets) for b in set(buckets)):
        if start == stop:
            continue
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return tuple((a, b) for a, b in merged)


def pool_ranks(ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Every rank of a pool, ascending (position i of the pool -> its rank)."""
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def stage_length(stage: Stage, steps_per_epoch: int) -> int:
    """Optimizer steps of a stage: its `steps`, or ceil(epochs x steps per epoch)."""
    if stage.steps is not None:
        return stage.steps
    assert stage.epochs is not None  # Stage.__post_init__: exactly one of steps and epochs
    # Rounded first so 3 x (1/3 epoch) style floats do not tip ceil over by one step.
    return max(1, math.ceil(round(stage.epochs * steps_per_epoch, 9)))


def stage_specs(plan: Plan, num_rows: int, global_batch: int) -> tuple[StageSpec, ...]:
    """Pool, length and LR position of every stage of `plan` over `num_rows` ranked rows."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if plan.num_buckets > num_rows:
        raise ValueError(
            f"plan {plan.name!r} cuts {plan.num_buckets} buckets from only {num_rows} scored rows; "
            "use fewer buckets or score more rows"
        )
    pools = []
    for s in plan.stages:
        ranges = pool_ranges(s.buckets, num_rows, plan.num_buckets)
        rows = sum(b - a for a, b in ranges)
        per_epoch = math.ceil(rows / global_batch)
        pools.append((ranges, rows, per_epoch, stage_length(s, per_epoch)))
    # A stage that restarts the optimizer (or the first stage) opens an LR segment; the cosine of a
    # segment runs over the planned steps of all its stages (upper bounds for plateau stages).
    segment_start = [0] * len(plan.stages)
    for i, s in enumerate(plan.stages):
        segment_start[i] = i if i == 0 or s.restart_optimizer else segment_start[i - 1]
    specs = []
    for i, s in enumerate(plan.stages):
        ranges, rows, per_epoch, steps = pools[i]
        members = [j for j in range(len(plan.stages)) if segment_start[j] == segment_start[i]]
        offset = sum(pools[j][3] for j in members if j < i)
        total = sum(pools[j][3] for j in members)
        specs.append(StageSpec(s, ranges, rows, per_epoch, steps, offset, total))
    return tuple(specs)
