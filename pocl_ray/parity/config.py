"""The sparse-parity sandbox's config (`pocl-ray parity --config`): YAML in, field-named errors out.

The sandbox itself is `pocl_ray.parity.sandbox` (pure torch), its Ray runner `pocl_ray.parity.runner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pocl_ray.config import load_yaml, validate_mapping

Method = Literal["one_shot", "progressive", "extraction"]
METHODS: tuple[Method, ...] = ("one_shot", "progressive", "extraction")


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
    return validate_mapping(ParityConfig, data, source, what="parity config")


def load_parity_config(path: str | Path | None = None) -> ParityConfig:
    """The config in a YAML file; None gives the defaults (the CPU-sized sandbox)."""
    return ParityConfig() if path is None else load_yaml(ParityConfig, path, what="parity config")
