"""Curriculum plans: what the trainer trains on, against which target, at which settings, for how long.

A Plan is a list of Stages and the trainer executes any Plan. POCL, plain KD, SFT, curriculum
extraction and progressive distillation are only different Plan builders (DESIGN.md, "one
curriculum abstraction"). Everything here is pure; the Ray actor that serves a plan to the
training workers lives below the builders.
"""

from __future__ import annotations

import json
import math
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

    def sample_budget(self, bucket_rows: list[int]) -> float | None:
        """Rows seen over the whole plan, for epoch-based plans (None if any stage is step-based)."""
        if any(s.epochs is None for s in self.stages):
            return None
        return sum(s.epochs * sum(bucket_rows[b] for b in s.buckets) for s in self.stages)


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
    """Cosine decay from lr to min_lr over total_steps (step 0-based), after an optional linear warm-up."""
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
    """POCL baby-step plan: stage s trains on buckets 0..s while T and alpha rise (METHODS.md §1)."""
    t_start, t_end, t_shape = temperature
    temps = schedule(t_start, t_end, num_buckets, t_shape)
    alphas = schedule(kd_weight[0], kd_weight[1], num_buckets, "linear")
    length = _length(epochs_per_stage, steps_per_stage)
    stages = tuple(
        Stage(
            index=s,
            buckets=tuple(range(s + 1)),
            temperature=temps[s],
            kd_weight=alphas[s],
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
    """Plain KD: one stage on all data at constant T and alpha.

    By default its length matches the sample budget of the POCL plan with the same bucket count and
    interval (8 epochs x 4 buckets -> 20 epochs); pass `epochs` or `steps` to set it directly.
    """
    length = _length(epochs, steps) if (epochs or steps) else _equal_budget(num_buckets, epochs_per_stage, steps_per_stage)
    stage = Stage(index=0, buckets=tuple(range(num_buckets)), temperature=temperature, kd_weight=kd_weight, loss=loss, **length)
    return Plan(name="baseline", num_buckets=num_buckets, stages=(stage,))


def sft_plan(**kwargs) -> Plan:
    """Supervised fine-tuning on the references alone (alpha = 0), same budget rules as baseline_plan."""
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
    teacher_checkpoints: list[str],
    steps_per_checkpoint: int,
    *,
    num_buckets: int = 1,
    loss: str = "fkl",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    restart_optimizer: bool = False,
) -> Plan:
    """Progressive distillation (Panigrahi et al., 2024): output KD from each teacher checkpoint in turn."""
    if not teacher_checkpoints:
        raise ValueError("progressive_plan needs at least one teacher checkpoint")
    pool = tuple(range(num_buckets))
    stages = tuple(
        Stage(
            index=i,
            buckets=pool,
            steps=steps_per_checkpoint,
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

    Stage i of M takes the pool of data stage floor(i * K / M) of K, so the pool grows easy to hard
    across the target stages and the last stage trains on the data plan's final pool.
    """
    m, k = len(target_plan.stages), len(data_plan.stages)
    stages = tuple(replace(s, buckets=data_plan.stages[i * k // m].buckets) for i, s in enumerate(target_plan.stages))
    return Plan(name=f"{target_plan.name}+{data_plan.name}", num_buckets=data_plan.num_buckets, stages=stages)


def uniform_layer_map(num_teacher_layers: int, num_student_layers: int, teacher_layers: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Teacher layer l (1-based, as in hidden_states[l]) maps to student layer round(l * L_S / L_T), at least 1."""
    layers = teacher_layers if teacher_layers is not None else list(range(1, num_teacher_layers + 1))
    bad = [t for t in layers if not 1 <= t <= num_teacher_layers]
    if bad:
        raise ValueError(f"teacher layers {bad} outside 1..{num_teacher_layers}")
    student = [max(1, round(t * num_student_layers / num_teacher_layers)) for t in layers]
    return list(layers), student


def plan_from_config(cfg: RunConfig, num_teacher_layers: int | None = None, num_student_layers: int | None = None) -> Plan:
    """The plan a run config asks for. Extraction needs the two models' layer counts."""
    c, kd = cfg.curriculum, cfg.kd
    interval = {"epochs_per_stage": c.epochs_per_stage if c.steps_per_stage is None else None, "steps_per_stage": c.steps_per_stage}
    if c.plan == "pocl":
        return pocl_plan(
            c.num_buckets,
            temperature=(c.temperature_start, c.temperature_end, c.temperature_shape),
            kd_weight=(c.kd_weight_start, c.kd_weight_end),
            loss=kd.loss,
            restart_optimizer=c.restart_optimizer,
            until_plateau=c.advance == "plateau",
            patience=c.patience,
            **interval,
        )
    if c.plan in ("baseline", "sft"):
        build = baseline_plan if c.plan == "baseline" else sft_plan
        kwargs = dict(num_buckets=c.num_buckets, temperature=c.temperature_start, loss=kd.loss, **interval)
        if c.plan == "baseline":
            kwargs["kd_weight"] = c.kd_weight_start
        return build(**kwargs)
    if c.plan == "extraction":
        if num_teacher_layers is None or num_student_layers is None:
            raise ValueError("the extraction plan needs the teacher's and student's layer counts")
        e = c.extraction
        if e.layer_map is not None:
            teacher_layers = e.teacher_layers or list(range(1, num_teacher_layers + 1))
            if len(e.layer_map) != len(teacher_layers):
                raise ValueError(
                    f"curriculum.extraction.layer_map has {len(e.layer_map)} entries for {len(teacher_layers)} teacher layers"
                )
            student_layers = list(e.layer_map)
        else:
            teacher_layers, student_layers = uniform_layer_map(num_teacher_layers, num_student_layers, e.teacher_layers)
        return extraction_plan(
            teacher_layers, student_layers, e.steps_per_layer, e.final_steps,
            loss=kd.loss, temperature=c.temperature_end, kd_weight=c.kd_weight_end,
        )
    if c.plan == "progressive":
        p = c.progressive
        return progressive_plan(p.teacher_checkpoints, p.steps_per_checkpoint, loss=kd.loss,
                                temperature=c.temperature_end, kd_weight=c.kd_weight_end)
    raise ValueError(f"curriculum.plan: unknown plan {c.plan!r}")


# ---------------------------------------------------------------------------------------------
# Serving a plan to training workers: pools, epochs and shards (pure), then the coordinator actor.
#
# Rows are addressed by their difficulty rank (CONTRACTS.md): a stage's pool is a union of
# contiguous rank ranges, so re-cutting the plan's bucket count never needs re-scoring.
#
# One optimizer step consumes `global_batch` rows of the pool. Each epoch is a permutation of the
# pool seeded by (seed, stage, epoch) and cut into consecutive steps of global_batch rows; the last
# step of an epoch takes the remainder (it is smaller, never padded with repeats and never dropped),
# so every row is trained exactly once per epoch. A step's rows are dealt to the workers in turn
# (row j of the step -> worker j mod world) and each worker splits its share into the same number
# of micro-batches. Which rows make up a step depends on (seed, stage, epoch, step) alone, not on
# the number of workers, so a restart continues with exactly the batches it would have trained.


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


def epoch_order(pool_rows: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    """The order of the pool's positions in one epoch: a permutation seeded by (seed, stage, epoch)."""
    return np.random.default_rng([int(seed), int(stage), int(epoch)]).permutation(pool_rows)


def step_shard(
    step_rows: np.ndarray, world_size: int, rank: int, micro_batch: int
) -> list[np.ndarray]:
    """One worker's micro-batches of one optimizer step's rows.

    Row j of the step goes to worker j mod world_size. Every worker gets the same number of
    micro-batches, ceil(ceil(n / world) / micro_batch), so the DDP collectives line up; shares of a
    short last step are split as evenly as possible, and a micro-batch may be empty only when the
    step has fewer rows than that (the trainer runs an empty one as a zero-token batch).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    n = len(step_rows)
    n_micro = max(1, math.ceil(math.ceil(n / world_size) / micro_batch))
    return [np.asarray(m, dtype=np.int64) for m in np.array_split(step_rows[rank::world_size], n_micro)]


def epoch_shard(
    order: np.ndarray, global_batch: int, world_size: int, rank: int, micro_batch: int
) -> list[list[np.ndarray]]:
    """One worker's epoch: for each optimizer step, its micro-batches of `order`'s values."""
    return [
        step_shard(order[start : start + global_batch], world_size, rank, micro_batch)
        for start in range(0, len(order), global_batch)
    ]


def _plateaued(best: float | None, bad: int, loss: float, patience: int) -> tuple[float, int, bool]:
    """Update (best, evaluations without improvement) with a new dev loss; True once patience runs out."""
    if best is None or loss < best:
        return loss, 0, False
    return best, bad + 1, bad + 1 >= patience


STATE_VERSION = 1


class CurriculumCoordinator:
    """The single source of curriculum truth during a training run (a Ray actor; see `coordinator`).

    It holds the plan, the run's position (next stage, step within it, global step) and the seeds,
    and serves each worker, at every stage and epoch boundary, the stage's settings and that
    worker's rows. Its state goes into every checkpoint (`checkpoint`) and comes back on a restart
    (`restore`).

    Transport (measured, DESIGN.md): the coordinator hands out rank numbers, not rows, and each
    worker reads its own rows straight from the scores parquet with pyarrow, filtered by rank. On
    this machine that cost 2-9 s per stage against 17-40 s for Ray Data `streaming_split` (whose
    iterators also cannot resume mid-epoch, and which deadlocked when split inside an actor on 2
    CPUs); the driver never materialises the data, and the actor stays tiny. The price is that the
    scores directory must be readable from every worker node (shared filesystem or a URI pyarrow
    reads), as Ray Train's storage_path already must be on a multi-node cluster.

    Step records: rank 0 sends its per-step records in batches (`log`, fire-and-forget between
    checkpoints, awaited at each checkpoint) and the coordinator appends them to metrics.jsonl.
    The actor runs on the driver's node, so the file lands in the driver's output directory on any
    cluster; a restart truncates the file back to the checkpoint's step, so every step appears
    exactly once.
    """

    def __init__(
        self,
        plan: dict,
        num_rows: int,
        global_batch: int,
        micro_batch: int,
        seed: int,
        metrics_path: str,
    ):
        self.plan = Plan.from_dict(plan)
        self.num_rows = int(num_rows)
        self.global_batch = int(global_batch)
        self.micro_batch = int(micro_batch)
        self.seed = int(seed)
        self.specs = stage_specs(self.plan, self.num_rows, self.global_batch)
        self.pools = [pool_ranks(s.pool_ranges) for s in self.specs]
        self.metrics_path = metrics_path
        self.position = {"stage": 0, "stage_step": 0, "step": 0}
        self.plateau = {"stage": 0, "best": None, "bad": 0}
        self.last_record: dict | None = None

    # -- position and state ------------------------------------------------------------------

    def state(self) -> dict:
        """Everything a restart needs: plan, data settings, seeds, position, plateau tracking."""
        return {
            "version": STATE_VERSION,
            "plan": self.plan.to_dict(),
            "num_rows": self.num_rows,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "position": dict(self.position),
            "plateau": dict(self.plateau),
        }

    def restore(self, state: dict | None) -> dict:
        """Start from a checkpoint's state (None = from the beginning) and return the state.

        Records in metrics.jsonl past the checkpoint's step are dropped: the steps after it are
        about to be trained again.
        """
        if state is not None:
            self._check_compatible(state)
            self.position = dict(state["position"])
            self.plateau = dict(state["plateau"])
        else:
            self.position = {"stage": 0, "stage_step": 0, "step": 0}
            self.plateau = {"stage": 0, "best": None, "bad": 0}
        self._truncate_metrics(self.position["step"])
        return self.state()

    def _check_compatible(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint coordinator state has version {state.get('version')}, expected {STATE_VERSION}")
        mismatches = [
            name
            for name, saved, now in (
                ("plan", Plan.from_dict(state["plan"]), self.plan),
                ("num_rows", state["num_rows"], self.num_rows),
                ("global_batch", state["global_batch"], self.global_batch),
                ("seed", state["seed"], self.seed),
            )
            if saved != now
        ]
        if mismatches:
            raise ValueError(
                f"the checkpoint being resumed was written with a different {', '.join(mismatches)}; "
                "use another run name (config `name`) or output directory for a different run"
            )

    def checkpoint(self, position: dict, records: list[dict]) -> dict:
        """Append the last records, move to `position` (the next step to train) and return the state."""
        self.log(records)
        self.position = dict(position)
        return self.state()

    # -- serving stages and rows -------------------------------------------------------------

    def stage(self, index: int) -> StageSpec:
        return self.specs[index]

    def shard(self, stage: int, epoch: int, rank: int, world_size: int) -> list[list[np.ndarray]]:
        """Worker `rank`'s micro-batches (as row ranks) for every step of one epoch of a stage."""
        spec = self.specs[stage]
        order = self.pools[stage][epoch_order(spec.pool_rows, self.seed, stage, epoch)]
        return epoch_shard(order, self.global_batch, world_size, rank, self.micro_batch)

    def report_eval(self, stage: int, dev_loss: float) -> bool:
        """Record a dev-loss evaluation of `stage`; True when the stage has stopped improving."""
        if self.plateau["stage"] != stage:
            self.plateau = {"stage": stage, "best": None, "bad": 0}
        best, bad, stop = _plateaued(self.plateau["best"], self.plateau["bad"], float(dev_loss), self.specs[stage].stage.patience)
        self.plateau.update(best=best, bad=bad)
        return stop

    # -- step records ------------------------------------------------------------------------

    def log(self, records: list[dict]) -> None:
        if not records:
            return
        with open(self.metrics_path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        self.last_record = records[-1]

    def progress(self) -> dict | None:
        """The latest step record received (stage, epoch, step, ...), None before the first."""
        return self.last_record

    def _truncate_metrics(self, step: int) -> None:
        path = Path(self.metrics_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def coordinator(name: str, *, plan: Plan, num_rows: int, global_batch: int, micro_batch: int, seed: int, metrics_path: str):
    """Start the named coordinator actor on this (the driver's) node, so its files land here.

    It asks for no CPU: it only answers small calls, and a CPU slot held by it could starve the
    training workers on a small cluster.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(CurriculumCoordinator).options(name=name, num_cpus=0, scheduling_strategy=here, max_restarts=0)
    return actor.remote(plan.to_dict(), num_rows, global_batch, micro_batch, seed, metrics_path)
