"""The sparse-parity sandbox of METHODS.md §2: one-shot KD, progressive distillation and curriculum
extraction from a wide MLP teacher into a narrow MLP student (Panigrahi et al., 2024; Gupta &
Karmalkar, 2025).

Task: x uniform on {-1, +1}^n, label = product of k secret coordinates (class 1 where it is +1).
Every step draws a fresh batch; accuracy is measured on a fixed held-out set against the true labels.

Replicates: each seed is an independent run of the whole experiment — its own secret support,
held-out set, teacher (trained once per seed, in its own Ray task), student initialisation and
student data stream. Within a seed the three methods share the student's initial weights and see the
same input batches, so they differ only in what the student is asked to match.

Step accounting: every optimizer step the student takes counts, including the hidden-state matching
steps of curriculum extraction, so steps_to_target compares methods at equal sample budgets. The
student never sees a true label; only the teacher does, during its own training.

The pure core (data, models, one teacher run, one student run, summary) runs without Ray; `run_parity`
is the Ray shell: one task per teacher, one per (seed, method), results and plot on disk.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from pocl_ray.config import ConfigError, _format_errors
from pocl_ray.curriculum import Plan, baseline_plan, extraction_plan, progressive_plan
from pocl_ray.extraction import hidden_match_loss, layer_projection
from pocl_ray.losses import fkl

Method = Literal["one_shot", "progressive", "extraction"]
METHODS: tuple[str, ...] = ("one_shot", "progressive", "extraction")

# Independent random streams derived from one replicate seed.
_SUPPORT, _HELDOUT, _TEACHER_DATA, _TEACHER_INIT, _STUDENT_DATA, _STUDENT_INIT = range(6)


# ----------------------------------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExtractionSettings(_Strict):
    steps_per_layer: int = Field(100, gt=0, description="hidden-matching steps (the MLP has one hidden layer)")
    projection: Literal["gaussian", "orthogonal"] = "gaussian"
    normalize: bool = Field(False, description="layer-norm both sides before the MSE")
    student_side: Literal["preactivation", "activation"] = Field(
        "preactivation",
        description="student hidden value matched to the projected teacher activations: before or after its ReLU",
    )
    restart_optimizer: bool = Field(True, description="fresh Adam state when output KD starts")


class ProgressiveSettings(_Strict):
    steps_per_checkpoint: int = Field(25, gt=0, description="student steps on each teacher checkpoint")
    restart_optimizer: bool = Field(False, description="fresh Adam state at every checkpoint switch")


class ParityConfig(_Strict):
    """Everything one sandbox run needs; YAML in, field-named errors out."""

    n: int = Field(60, gt=0, description="input bits")
    k: int = Field(5, gt=0, description="size of the secret support")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    methods: list[Method] = Field(default_factory=lambda: list(METHODS))
    teacher_width: int = Field(2000, gt=0)
    student_width: int = Field(100, gt=0)
    batch_size: int = Field(512, gt=0)
    eval_size: int = Field(4096, gt=0, description="held-out examples")
    betas: tuple[float, float] = (0.9, 0.95)
    teacher_lr: float = Field(1e-3, gt=0)
    teacher_max_steps: int = Field(20_000, gt=0)
    teacher_target_accuracy: float = Field(0.99, gt=0, le=1, description="teacher training stops here")
    checkpoint_every: int = Field(100, gt=0, description="teacher steps between checkpoints (and evaluations)")
    student_lr: float = Field(3e-3, gt=0)
    student_steps: int = Field(2000, gt=0, description="student step budget per method, extraction phase included")
    eval_every: int = Field(50, gt=0, description="student steps between held-out evaluations")
    target_accuracy: float = Field(0.95, gt=0, le=1)
    stop_at_target: bool = Field(False, description="end a student run at its first evaluation at or above target")
    temperature: float = Field(1.0, gt=0, description="output-KD temperature (loss scaled by T^2)")
    extraction: ExtractionSettings = ExtractionSettings()
    progressive: ProgressiveSettings = ProgressiveSettings()
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when the task sees a GPU")
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.0, ge=0)
    max_concurrent_tasks: int = Field(2, ge=1, description="Ray tasks in flight at once")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads inside each task")
    num_cpus: int | None = Field(None, gt=0, description="logical CPUs of a local Ray instance (default: all cores)")

    @model_validator(mode="after")
    def _consistent(self) -> ParityConfig:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list without duplicates, got {self.seeds}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be a non-empty list without duplicates, got {self.methods}")
        if "extraction" in self.methods and self.extraction.steps_per_layer >= self.student_steps:
            raise ValueError(
                f"extraction.steps_per_layer ({self.extraction.steps_per_layer}) must be below student_steps "
                f"({self.student_steps}) so output KD gets steps"
            )
        if self.extraction.projection == "orthogonal" and self.teacher_width < self.student_width:
            raise ValueError("extraction.projection 'orthogonal' needs teacher_width >= student_width")
        if not all(0 < b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in (0, 1), got {self.betas}")
        return self


def parse_parity_config(data: dict[str, Any], source: str = "<dict>") -> ParityConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid parity config ({source}): the top level must be a mapping of fields")
    try:
        return ParityConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_parity_config(path: str | Path | None = None) -> ParityConfig:
    """The config in a YAML file; None gives the defaults (the CPU-sized sandbox)."""
    if path is None:
        return ParityConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parity config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"parity config file {path} is not valid YAML: {err}") from None
    return parse_parity_config(data or {}, source=str(path))


# ------------------------------------------------------------------------------------ data, models


def stream_seed(seed: int, stream: int) -> int:
    """A torch seed for one named random stream of a replicate; streams never share a generator."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stream_seed(seed, stream))


def secret_support(n: int, k: int, seed: int) -> list[int]:
    """The k coordinates (sorted) whose product is the label."""
    return sorted(torch.randperm(n, generator=generator(seed, _SUPPORT))[:k].tolist())


def parity_batch(gen: torch.Generator, size: int, n: int, support: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """size examples: x in {-1, +1}^n (float32) and labels (int64, 1 where prod x[support] = +1).

    Drawn on the CPU so the same seed gives the same data on every device.
    """
    x = torch.randint(0, 2, (size, n), generator=gen).float().mul_(2).sub_(1)
    y = (x[:, list(support)].prod(dim=1) > 0).long()
    return x, y


def heldout_set(cfg: ParityConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return parity_batch(generator(seed, _HELDOUT), cfg.eval_size, cfg.n, secret_support(cfg.n, cfg.k, seed))


class MLP(nn.Module):
    """One hidden ReLU layer and a two-class head, as in the sandbox of Panigrahi et al."""

    def __init__(self, n: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build_mlp(n: int, width: int, seed: int) -> MLP:
    """Initialised from its own generator, so the same seed gives the same weights in every task."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(n, width)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=-1) == y).float().mean().item()


def output_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean forward KL(teacher || student) over the batch at temperature T, scaled by T^2."""
    logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return fkl(logp, logq).mean() * temperature**2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but this task sees no GPU (set gpus_per_task > 0)")
    return torch.device(name)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _adam(model: nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas)


# ----------------------------------------------------------------------------------- one teacher


def train_teacher(cfg: ParityConfig, seed: int) -> tuple[dict, dict[str, torch.Tensor], list[tuple[int, dict]]]:
    """Train the wide teacher on true labels until teacher_target_accuracy (checked at checkpoints).

    Returns (summary, final state, checkpoints): checkpoints are (step, CPU state) every
    checkpoint_every steps, in order, excluding the final step (the final state is returned apart).
    """
    torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    support = secret_support(cfg.n, cfg.k, seed)
    x_eval, y_eval = (t.to(device) for t in heldout_set(cfg, seed))
    gen = generator(seed, _TEACHER_DATA)
    model = build_mlp(cfg.n, cfg.teacher_width, stream_seed(seed, _TEACHER_INIT)).to(device)
    opt = _adam(model, cfg.teacher_lr, cfg.betas)
    checkpoints: list[tuple[int, dict]] = []
    curve_steps, curve_acc = [0], [accuracy(model, x_eval, y_eval)]
    step = 0
    while step < cfg.teacher_max_steps:
        step += 1
        x, y = (t.to(device) for t in parity_batch(gen, cfg.batch_size, cfg.n, support))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.checkpoint_every == 0 or step == cfg.teacher_max_steps:
            acc = accuracy(model, x_eval, y_eval)
            curve_steps.append(step)
            curve_acc.append(acc)
            if acc >= cfg.teacher_target_accuracy or step == cfg.teacher_max_steps:
                break
            checkpoints.append((step, _cpu_state(model)))
    summary = {
        "seed": seed,
        "support": support,
        "steps": step,
        "accuracy": curve_acc[-1],
        "reached_target": curve_acc[-1] >= cfg.teacher_target_accuracy,
        "checkpoints": [s for s, _ in checkpoints],
        "curve": {"step": curve_steps, "accuracy": curve_acc},
        "seconds": time.perf_counter() - started,
        "device": str(device),
    }
    return summary, _cpu_state(model), checkpoints


# ----------------------------------------------------------------------------------- one student


FINAL = "final"


def student_plan(method: str, cfg: ParityConfig, checkpoint_steps: Sequence[int] = ()) -> Plan:
    """The curriculum Plan a method follows (the same builders the LLM trainer executes).

    one_shot: one output-KD stage on the final teacher. progressive: one stage per teacher
    checkpoint ("step-<teacher step>"), steps_per_checkpoint each, then the final teacher.
    extraction: match the projected teacher hidden layer (layer 1 -> student layer 1) for
    steps_per_layer steps, then output KD on the final teacher. Every method spends exactly
    cfg.student_steps steps: the last stage reached runs to the end of the budget, and stages
    beyond it (a long checkpoint list) are never reached.
    """
    t = cfg.temperature
    if method == "one_shot":
        plan = baseline_plan(num_buckets=1, steps=cfg.student_steps, temperature=t, kd_weight=1.0)
        return replace(plan, name="one_shot")
    if method == "progressive":
        names = [f"step-{s}" for s in checkpoint_steps] + [FINAL]
        p = cfg.progressive
        return progressive_plan(names, p.steps_per_checkpoint, temperature=t, restart_optimizer=p.restart_optimizer)
    if method == "extraction":
        ex = cfg.extraction
        return extraction_plan([1], [1], ex.steps_per_layer, cfg.student_steps - ex.steps_per_layer,
                               temperature=t, restart_optimizer=ex.restart_optimizer)
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def stage_starts(plan: Plan) -> list[int]:
    """1-based student step at which each stage begins."""
    return [1 + sum(s.steps for s in plan.stages[:i]) for i in range(len(plan.stages))]


def steps_to_target(steps: Sequence[int], accs: Sequence[float], target: float) -> int | None:
    """The first logged step whose held-out accuracy is at least target, or None."""
    return next((s for s, a in zip(steps, accs) if a >= target), None)


def distill_student(
    cfg: ParityConfig,
    seed: int,
    method: str,
    teacher_final: dict[str, torch.Tensor],
    checkpoints: Sequence[tuple[int, dict]] = (),
) -> dict:
    """Train one student by `method` for cfg.student_steps steps; return its held-out accuracy curve."""
    plan = student_plan(method, cfg, [s for s, _ in checkpoints])
    torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    support = secret_support(cfg.n, cfg.k, seed)
    x_eval, y_eval = (t.to(device) for t in heldout_set(cfg, seed))
    gen = generator(seed, _STUDENT_DATA)
    student = build_mlp(cfg.n, cfg.student_width, stream_seed(seed, _STUDENT_INIT)).to(device)
    teacher = MLP(cfg.n, cfg.teacher_width).to(device).requires_grad_(False)
    states = {f"step-{s}": state for s, state in checkpoints} | {FINAL: teacher_final}
    ex = cfg.extraction
    projection = None
    if any(s.target == "hidden" for s in plan.stages):
        projection = layer_projection(cfg.teacher_width, cfg.student_width, 1, seed=seed, kind=ex.projection).to(device)
    starts = dict(zip(stage_starts(plan), plan.stages))
    opt = _adam(student, cfg.student_lr, cfg.betas)
    curve_steps, curve_acc = [0], [accuracy(student, x_eval, y_eval)]
    stage = plan.stages[0]
    for step in range(1, cfg.student_steps + 1):
        if step in starts:
            stage = starts[step]
            teacher.load_state_dict(states[stage.teacher or FINAL])
            if stage.restart_optimizer and step > 1:
                opt = _adam(student, cfg.student_lr, cfg.betas)
        x, _ = parity_batch(gen, cfg.batch_size, cfg.n, support)
        x = x.to(device)
        if stage.target == "hidden":
            with torch.no_grad():
                t_hidden = torch.relu(teacher.fc1(x))
            s_hidden = student.fc1(x)
            if ex.student_side == "activation":
                s_hidden = torch.relu(s_hidden)
            loss = hidden_match_loss(s_hidden, t_hidden, projection, normalize=ex.normalize)
        else:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = output_kd_loss(student(x), t_logits, stage.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.student_steps:
            curve_steps.append(step)
            curve_acc.append(accuracy(student, x_eval, y_eval))
            if cfg.stop_at_target and curve_acc[-1] >= cfg.target_accuracy:
                break
    return {
        "method": method,
        "seed": seed,
        "steps_to_target": steps_to_target(curve_steps, curve_acc, cfg.target_accuracy),
        "final_accuracy": curve_acc[-1],
        "steps": curve_steps[-1],
        "curve": {"step": curve_steps, "accuracy": curve_acc},
        "stages": [{"start": b, "target": s.target, "teacher": s.teacher or FINAL}
                   for b, s in starts.items() if b <= curve_steps[-1]],
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------- summary


def summarize(runs: Sequence[dict], target: float, budget: int) -> dict:
    """Per-method means and the extraction ratios.

    A run that never reaches the target counts as `budget` steps in the censored means (a lower
    bound on its true cost); `mean_steps_to_target` averages the runs that reached it.
    """
    by_method: dict[str, dict] = {}
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        hit = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
        by_method[method] = {
            "runs": len(rs),
            "reached": len(hit),
            "mean_steps_to_target": float(np.mean(hit)) if hit else None,
            "censored_mean_steps": float(np.mean([r["steps_to_target"] or budget for r in rs])),
            "mean_final_accuracy": float(np.mean([r["final_accuracy"] for r in rs])),
        }
    ratios = {}
    ext = by_method.get("extraction")
    for other in ("one_shot", "progressive"):
        if ext and other in by_method:
            ratios[f"extraction/{other}"] = {
                "ratio": ext["censored_mean_steps"] / by_method[other]["censored_mean_steps"],
                "censored": ext["reached"] < ext["runs"] or by_method[other]["reached"] < by_method[other]["runs"],
            }
    return {"target_accuracy": target, "methods": by_method, "ratios": ratios}


def format_summary(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    lines = [
        f"sparse parity (n={cfg['n']}, k={cfg['k']}): teacher width {cfg['teacher_width']} -> student width "
        f"{cfg['student_width']}, seeds {cfg['seeds']}, target held-out accuracy {results['target_accuracy']}",
    ]
    for t in results["teachers"]:
        flag = "" if t["reached_target"] else "  (below teacher target)"
        lines.append(f"  teacher seed {t['seed']}: {t['steps']} steps, held-out accuracy {t['accuracy']:.3f}, "
                     f"{len(t['checkpoints'])} checkpoints{flag}")
    lines.append(f"  {'method':<12} {'reached':>7} {'mean steps to target':>21} {'per seed':>24} {'final acc':>9}")
    for method, m in summary["methods"].items():
        per_seed = [str(r["steps_to_target"]) if r["steps_to_target"] is not None else "-"
                    for r in results["runs"] if r["method"] == method]
        mean = f"{m['mean_steps_to_target']:.0f}" if m["mean_steps_to_target"] is not None else "never"
        lines.append(f"  {method:<12} {m['reached']:>3}/{m['runs']:<3} {mean:>21} {' '.join(per_seed):>24} "
                     f"{m['mean_final_accuracy']:>9.3f}")
    for name, r in summary["ratios"].items():
        note = "  (a run missed the target: its budget counted, a lower bound)" if r["censored"] else ""
        lines.append(f"  {name:<24} {r['ratio']:.2f}{note}")
    lines.append(f"  wall time {results['wall_seconds']:.0f} s")
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict], target: float, cfg: dict, path: Path) -> Path:
    """Held-out accuracy against student steps: thin lines per seed, thick mean per method.

    `runs` are distill_student results (with their curves); `cfg` the run config as a dict.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"one_shot": "tab:red", "progressive": "tab:blue", "extraction": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        for r in rs:
            ax.plot(r["curve"]["step"], r["curve"]["accuracy"], color=colors[method], alpha=0.3, lw=0.8)
        longest = max(rs, key=lambda r: len(r["curve"]["step"]))["curve"]["step"]
        # Runs stopped at target keep their last accuracy, so the mean is defined at every step.
        padded = [r["curve"]["accuracy"] + [r["curve"]["accuracy"][-1]] * (len(longest) - len(r["curve"]["accuracy"]))
                  for r in rs]
        ax.plot(longest, np.mean(padded, axis=0), color=colors[method], lw=2, label=method.replace("_", "-"))
    ax.axhline(target, color="gray", ls="--", lw=1, label="target")
    ax.set(xlabel="student steps (all phases)", ylabel="held-out accuracy", ylim=(0.4, 1.02),
           title=f"({cfg['n']}, {cfg['k']})-sparse parity, width {cfg['teacher_width']} -> {cfg['student_width']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------- Ray shell


def _bounded(thunks: Sequence[Callable[[], Any]], limit: int) -> list[Any]:
    """Submit Ray tasks in order with at most `limit` in flight; returns each thunk's ref(s).

    A thunk returns one ObjectRef or a tuple of them (the first is waited on). Later thunks may take
    earlier refs as arguments; submission order keeps their producers ahead of them.
    """
    import ray

    out: list[Any] = []
    in_flight: list[Any] = []
    for thunk in thunks:
        if len(in_flight) >= limit:
            _, in_flight = ray.wait(in_flight, num_returns=1)
        refs = thunk()
        out.append(refs)
        in_flight.append(refs[0] if isinstance(refs, tuple) else refs)
    return out


def _init_ray(cfg: ParityConfig) -> bool:
    """Connect to the job's cluster, or start a private local instance; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit`, or pointed at a cluster
    else:
        # address="local": never attach to another Ray instance running on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count() or 1, include_dashboard=False)
    return True


def run_parity(cfg: ParityConfig, output_dir: str | Path) -> dict:
    """Teachers, then every (seed, method) student, as Ray tasks; writes DIR/parity/{results.json, curves.png}."""
    import ray

    out = Path(output_dir) / "parity"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    we_started = _init_ray(cfg)
    try:
        resources = {"num_cpus": cfg.cpus_per_task, "num_gpus": cfg.gpus_per_task}
        teacher_task = ray.remote(train_teacher).options(num_returns=3, **resources)
        student_task = ray.remote(distill_student).options(**resources)
        teacher_refs: dict[int, tuple] = {}

        def teacher_thunk(seed: int) -> Callable[[], tuple]:
            def submit() -> tuple:
                teacher_refs[seed] = tuple(teacher_task.remote(cfg, seed))
                return teacher_refs[seed]
            return submit

        def student_thunk(seed: int, method: str) -> Callable[[], Any]:
            def submit() -> Any:
                _, final, ckpts = teacher_refs[seed]
                # Only progressive needs the checkpoints; the others never fetch them.
                return student_task.remote(cfg, seed, method, final, *([ckpts] if method == "progressive" else []))
            return submit

        thunks = [teacher_thunk(s) for s in cfg.seeds]
        thunks += [student_thunk(s, m) for s in cfg.seeds for m in cfg.methods]
        refs = _bounded(thunks, cfg.max_concurrent_tasks)
        student_refs = refs[len(cfg.seeds):]
        teachers = ray.get([teacher_refs[s][0] for s in cfg.seeds])
        runs = ray.get(student_refs)
        ray_version = ray.__version__
    finally:
        if we_started:
            ray.shutdown()

    results = {
        "target_accuracy": cfg.target_accuracy,
        "runs": [{k: r[k] for k in ("method", "seed", "steps_to_target", "final_accuracy")} for r in runs],
        "summary": summarize(runs, cfg.target_accuracy, cfg.student_steps),
        "teachers": teachers,
        "curves": [{k: r[k] for k in ("method", "seed", "curve", "stages", "steps", "seconds")} for r in runs],
        "config": cfg.model_dump(mode="json"),
        "wall_seconds": time.perf_counter() - started,
        "ray_version": ray_version,
        "torch_version": torch.__version__,
        "host": platform.node(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_curves(runs, cfg.target_accuracy, results["config"], out / "curves.png")
    print(format_summary(results))
    print(f"results: {out / 'results.json'}\nplot:    {out / 'curves.png'}")
    return results
