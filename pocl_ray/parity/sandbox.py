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

This module is the pure core (data, models, one teacher run, one student run, summary, plot) and runs
without Ray; its config is `pocl_ray.parity.config`, its Ray runner `pocl_ray.parity.runner.run_parity`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocl_ray.curriculum import Plan, baseline_plan, extraction_plan, progressive_plan
from pocl_ray.data import IGNORE_INDEX
from pocl_ray.extraction import hidden_match_loss, layer_projection
from pocl_ray.losses import kd_loss
from pocl_ray.parity.config import METHODS, ParityConfig
from pocl_ray.seeds import stream_seed

# Independent random streams derived from one replicate seed.
_SUPPORT, _HELDOUT, _TEACHER_DATA, _TEACHER_INIT, _STUDENT_DATA, _STUDENT_INIT = range(6)


# ------------------------------------------------------------------------------------ data, models


def generator(seed: int, stream: int) -> torch.Generator:
    """The generator of one named random stream of a replicate; streams never share a generator."""
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


def _as_scored_sequences(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, classes) logits as (batch, 2, classes) one-scored-position sequences, with their labels.

    losses.kd_loss scores position t where labels[t + 1] is set (the causal-LM shift): each example
    becomes its logits followed by an unscored zero position, labelled on the second position only.
    """
    labels = torch.full((len(logits), 2), IGNORE_INDEX, device=logits.device)
    labels[:, 1] = 0
    return F.pad(logits.unsqueeze(1), (0, 0, 0, 1)), labels


def output_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean forward KL(teacher || student) over the batch at temperature T, scaled by T^2: the LLM
    pipeline's own losses.kd_loss, each example a sequence of one scored position."""
    student, labels = _as_scored_sequences(student_logits)
    teacher, _ = _as_scored_sequences(teacher_logits.detach())
    return kd_loss("fkl", student, teacher, labels, temperature=temperature)


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


def _run_setup(cfg: ParityConfig, seed: int, width: int, data_stream: int, init_stream: int):
    """What a teacher or student run of a replicate starts from: (device, secret support, held-out
    (x, y) on the device, its data stream's generator, its freshly initialised MLP on the device)."""
    torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg.device)
    heldout = tuple(t.to(device) for t in heldout_set(cfg, seed))
    model = build_mlp(cfg.n, width, stream_seed(seed, init_stream)).to(device)
    return device, secret_support(cfg.n, cfg.k, seed), heldout, generator(seed, data_stream), model


# ----------------------------------------------------------------------------------- one teacher


def train_teacher(cfg: ParityConfig, seed: int) -> tuple[dict, dict[str, torch.Tensor], list[tuple[int, dict]]]:
    """Train the wide teacher on true labels until teacher_target_accuracy (checked at checkpoints).

    Returns (summary, final state, checkpoints): checkpoints are (step, CPU state) every
    checkpoint_every steps, in order, excluding the final step (the final state is returned apart).
    """
    started = time.perf_counter()
    device, support, (x_eval, y_eval), gen, model = _run_setup(
        cfg, seed, cfg.teacher_width, _TEACHER_DATA, _TEACHER_INIT
    )
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
        return extraction_plan(
            [1],
            [1],
            ex.steps_per_layer,
            cfg.student_steps - ex.steps_per_layer,
            temperature=t,
            restart_optimizer=ex.restart_optimizer,
        )
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def stage_starts(plan: Plan) -> list[int]:
    """1-based student step at which each stage begins (the sandbox's stages are counted in steps)."""
    starts, step = [], 1
    for s in plan.stages:
        if s.steps is None:
            raise ValueError(f"stage {s.index} is counted in epochs; the sandbox counts stages in steps")
        starts.append(step)
        step += s.steps
    return starts


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
    started = time.perf_counter()
    device, support, (x_eval, y_eval), gen, student = _run_setup(
        cfg, seed, cfg.student_width, _STUDENT_DATA, _STUDENT_INIT
    )
    teacher = MLP(cfg.n, cfg.teacher_width).to(device).requires_grad_(False)
    states = {f"step-{s}": state for s, state in checkpoints} | {FINAL: teacher_final}
    ex = cfg.extraction
    projection: torch.Tensor | None = None
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
            assert projection is not None  # made above when the plan has a hidden stage
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
        "stages": [
            {"start": b, "target": s.target, "teacher": s.teacher or FINAL}
            for b, s in starts.items()
            if b <= curve_steps[-1]
        ],
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


# Curriculum extraction's claim (METHODS.md §2): steps to target at most these multiples of the
# other methods' (censored means, so a run that misses the target only makes the claim harder).
CLAIM_BOUNDS: dict[str, float] = {"one_shot": 0.5, "progressive": 1.5}


def check_claims(summary: dict, bounds: dict[str, float] = CLAIM_BOUNDS) -> dict[str, dict]:
    """Per bound, {ratio, bound, passed} for extraction/<method> from a `summarize` result."""
    checks = {}
    for other, bound in bounds.items():
        name = f"extraction/{other}"
        if name not in summary["ratios"]:
            raise ValueError(f"the summary has no {name} ratio: run both extraction and {other}")
        ratio = summary["ratios"][name]["ratio"]
        checks[name] = {"ratio": ratio, "bound": bound, "passed": ratio <= bound}
    return checks


def format_summary(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    lines = [
        f"sparse parity (n={cfg['n']}, k={cfg['k']}): teacher width {cfg['teacher_width']} -> student width "
        f"{cfg['student_width']}, seeds {cfg['seeds']}, target held-out accuracy {results['target_accuracy']}",
    ]
    for t in results["teachers"]:
        flag = "" if t["reached_target"] else "  (below teacher target)"
        lines.append(
            f"  teacher seed {t['seed']}: {t['steps']} steps, held-out accuracy {t['accuracy']:.3f}, "
            f"{len(t['checkpoints'])} checkpoints{flag}"
        )
    lines.append(f"  {'method':<12} {'reached':>7} {'mean steps to target':>21} {'per seed':>24} {'final acc':>9}")
    for method, m in summary["methods"].items():
        per_seed = [
            str(r["steps_to_target"]) if r["steps_to_target"] is not None else "-"
            for r in results["runs"]
            if r["method"] == method
        ]
        mean = f"{m['mean_steps_to_target']:.0f}" if m["mean_steps_to_target"] is not None else "never"
        lines.append(
            f"  {method:<12} {m['reached']:>3}/{m['runs']:<3} {mean:>21} {' '.join(per_seed):>24} "
            f"{m['mean_final_accuracy']:>9.3f}"
        )
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
        padded = [
            r["curve"]["accuracy"] + [r["curve"]["accuracy"][-1]] * (len(longest) - len(r["curve"]["accuracy"]))
            for r in rs
        ]
        ax.plot(longest, np.mean(padded, axis=0), color=colors[method], lw=2, label=method.replace("_", "-"))
    ax.axhline(target, color="gray", ls="--", lw=1, label="target")
    ax.set(
        xlabel="student steps (all phases)",
        ylabel="held-out accuracy",
        ylim=(0.4, 1.02),
        title=f"({cfg['n']}, {cfg['k']})-sparse parity, width {cfg['teacher_width']} -> {cfg['student_width']}",
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
