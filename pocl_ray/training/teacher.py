"""The teacher a training step distils from, and both models' outputs as the losses take them.

One interface, `Teacher`: what it reads of each row (`columns`), its part of a batch (`collate`) and
its outputs on a batch (`outputs`). A run picks its implementation once, when a worker sets up
(`worker.setup_worker` through `run_teachers`); the step, the dev losses and checkpoint selection only
call the interface:
- OnlineTeacher: a frozen model on the device, run without autograd on every batch (kd.teacher: online);
- CachedTopKTeacher: the top-K form the scoring pass stored (teacher_cache.py), collated from the rows;
- CachedHiddenTeacher: the hidden form: int8 final hidden states collated from the rows, the teacher's
  LM head (loaded once) applied on the device, so every loss is computed as online.
An online teacher may be sharded over the workers (FSDP2, training.teacher_sharding): the same class.

The losses never build full-vocabulary logits: a model gives them its final hidden states and its LM
head (`LMOutputs.of_hidden`), and they apply the head chunk by chunk at the scored positions only.
When some model's logits are not `hidden @ head.T` (a bias, soft-capping), every model of the run gives
its logits instead (`LMOutputs.of_logits`); `logits_form` decides that once, at set-up, for the student
and every teacher together. The two constructors are where every model output enters the losses, and
the one place a padded vocabulary is cut down to the tokenizer's: given ``vocab`` (len(tokenizer)) they
keep the head's first ``vocab`` rows (a view: the padding rows get no gradient) or the logits' first
``vocab`` entries, so every distribution, on both sides, is over the tokenizer's tokens only (a
Qwen2.5-7B head has 152,064 rows, a Qwen2.5-0.5B head 151,936, their tokenizer 151,665 tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from pocl_ray.model_source import ModelSource
from pocl_ray.models import check_head_rows, linear_head, load_model
from pocl_ray.sharding import final_hidden_states, is_sharded, load_sharded
from pocl_ray.teacher_cache import (
    CACHE_COLUMNS,
    HIDDEN_COLUMNS,
    TeacherCache,
    collate_teacher_cache,
    teacher_hidden_states,
)


class LMOutputs(NamedTuple):
    """A causal LM's outputs as the losses take them: its final hidden states and LM head, or (the
    logits form) its logits; and every layer's hidden states when they were asked for."""

    hidden: torch.Tensor | None  # final normed hidden states (batch, seq, hidden); None in the logits form
    head: torch.Tensor | None  # the LM head weight (vocab, hidden) the losses apply; None in the logits form
    logits: torch.Tensor | None  # (batch, seq, vocab) in the logits form, else None
    layers: tuple[torch.Tensor, ...] | None = None  # every layer's hidden states (embeddings first)

    @classmethod
    def of_hidden(
        cls,
        hidden: torch.Tensor,
        head: torch.Tensor,
        layers: tuple[torch.Tensor, ...] | None = None,
        vocab: int | None = None,
    ) -> LMOutputs:
        return cls(hidden, head if vocab is None else head[:vocab], None, layers)

    @classmethod
    def of_logits(
        cls, logits: torch.Tensor, layers: tuple[torch.Tensor, ...] | None = None, vocab: int | None = None
    ) -> LMOutputs:
        return cls(None, None, logits if vocab is None else logits[..., :vocab], layers)

    @property
    def loss_input(self) -> torch.Tensor:
        """What the losses take: the hidden states (with `head`), or the logits (head None)."""
        x = self.logits if self.head is None else self.hidden
        assert x is not None
        return x


TeacherOutputs = LMOutputs | TeacherCache


class HiddenStatesLM(torch.nn.Module):
    """A causal LM whose forward stops before its LM head (or, with ``logits``, one that returns its
    logits: the logits form, `logits_form`).

    The student is wrapped in this before DDP, so its forward still runs through the DDP module and
    gradients synchronise. The head comes out of the forward as a view, so DDP sees it as used (its
    unused-parameter search starts from the outputs) although it enters the graph in the loss.
    ``vocab_size`` (len(tokenizer)): the outputs cover those tokens only (`LMOutputs`); None: the whole head.
    """

    def __init__(self, lm: PreTrainedModel, logits: bool = False, vocab_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.logits = logits
        self.vocab_size = vocab_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False
    ) -> LMOutputs:
        # use_cache=False: a training forward has no use for the KV cache HF would otherwise build.
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "output_hidden_states": output_hidden_states,
            "use_cache": False,
        }
        if self.logits:
            out = self.lm(**inputs)
            return LMOutputs.of_logits(out.logits, out.hidden_states, self.vocab_size)
        if is_sharded(self.lm):
            # Through the sharded root, which gathers the head for the loss (sharding.py's module doc).
            hidden, layers = final_hidden_states(self.lm, input_ids, attention_mask, output_hidden_states)
        else:
            out = self.lm.base_model(**inputs)
            hidden, layers = out.last_hidden_state, out.hidden_states
        head = self.lm.get_output_embeddings().weight
        return LMOutputs.of_hidden(hidden, head.view_as(head), layers, self.vocab_size)


def logits_form(student: PreTrainedModel, teachers: Iterable[PreTrainedModel] = ()) -> bool:
    """True when some model's logits are not its final hidden states @ its head (then every model gives
    the losses its full logits), saying in one line why; False when all are (the losses apply the heads).
    The teachers may be meta-device models (`models.meta_model`): only their structure is read."""
    for model in (student, *teachers):
        weight, reason = linear_head(model)
        if weight is None:
            print(f"[pocl-ray] KD on full-vocabulary logits: {reason}", flush=True)
            return True
    return False


class Teacher(Protocol):
    """What a training step distils from (module docstring)."""

    columns: tuple[str, ...]  # the row columns it reads from the scores, beside the tokens

    def collate(self, rows: Sequence[dict], device: torch.device) -> dict[str, Any]:
        """Its part of a micro-batch of ``rows`` (added to the batch by `step.build_batch`)."""
        ...

    def outputs(self, batch: dict[str, Any], layers: bool = False) -> TeacherOutputs:
        """Its outputs on ``batch``, without gradient; with ``layers``, every layer's hidden states too."""
        ...


class OnlineTeacher:
    """A frozen teacher model on the device (kd.teacher: online)."""

    columns: tuple[str, ...] = ()

    def __init__(self, lm: PreTrainedModel, logits: bool = False, vocab_size: int | None = None):
        self.model = HiddenStatesLM(lm, logits, vocab_size)

    @property
    def lm(self) -> PreTrainedModel:
        return self.model.lm

    def collate(self, rows: Sequence[dict], device: torch.device) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def outputs(self, batch: dict[str, Any], layers: bool = False) -> LMOutputs:
        return self.model(batch["input_ids"], batch["attention_mask"], output_hidden_states=layers)


class CachedTopKTeacher:
    """The top-K form of the cached teacher: each batch carries its rows' cache (METHODS.md §4)."""

    columns: tuple[str, ...] = CACHE_COLUMNS

    def collate(self, rows: Sequence[dict], device: torch.device) -> dict[str, Any]:
        return {"teacher_cache": collate_teacher_cache(rows, device)}

    def outputs(self, batch: dict[str, Any], layers: bool = False) -> TeacherCache:
        _no_layers(layers)
        return batch["teacher_cache"]


class CachedHiddenTeacher:
    """The hidden form of the cached teacher: its LM head applied to each batch's int8 final hidden
    states. The hidden states are dequantized when the step reaches the micro-batch (`outputs`), so a
    step holds one micro-batch's at a time."""

    columns: tuple[str, ...] = HIDDEN_COLUMNS

    def __init__(self, head: torch.Tensor, logits: bool = False, vocab_size: int | None = None):
        self.head, self.logits, self.vocab_size = head, logits, vocab_size

    def collate(self, rows: Sequence[dict], device: torch.device) -> dict[str, Any]:
        return {"teacher_cache": collate_teacher_cache(rows, device, hidden=True)}

    def outputs(self, batch: dict[str, Any], layers: bool = False) -> LMOutputs:
        _no_layers(layers)
        shape = tuple(batch["labels"].shape)
        hidden = teacher_hidden_states(batch["teacher_cache"], batch["scored_positions"], shape, self.head)
        if self.logits:
            return LMOutputs.of_logits(F.linear(hidden, self.head), vocab=self.vocab_size)
        return LMOutputs.of_hidden(hidden, self.head, vocab=self.vocab_size)


def _no_layers(layers: bool) -> None:
    if layers:
        raise ValueError(
            "a cached teacher holds its final hidden state only; hidden-state stages need kd.teacher: online"
        )


class Teachers(Protocol):
    """A run's teachers: the teacher of a stage (by its checkpoint path; None: the run's teacher, which
    also measures every stage's dev_kd_loss), and the row columns they read."""

    columns: tuple[str, ...]

    def get(self, path: str | None = None) -> Teacher: ...


class CachedTeachers:
    """The one cached teacher of a kd.teacher: cached run (its plans have no stage teachers)."""

    def __init__(self, teacher: CachedTopKTeacher | CachedHiddenTeacher):
        self.teacher = teacher
        self.columns = teacher.columns

    def get(self, path: str | None = None) -> Teacher:
        return self.teacher


class OnlineTeachers:
    """The frozen online teachers on the device: the run's teacher (dev_kd_loss is always measured
    against it) and the current stage's checkpoint teacher when that differs; each checked, when it
    is loaded, to have a head row for every token of the run's tokenizer (`models.check_head_rows`). Stages
    name their teacher by its config value; `stage_sources` maps each to the model the driver resolved
    (preflight.stage_sources). With ``shard`` (training.teacher_sharding: fsdp; `sharding.shard_model`'s
    options) each is sharded over the workers, read by rank 0 only: loading one is then a collective
    every worker makes."""

    columns: tuple[str, ...] = ()

    def __init__(
        self,
        teacher: ModelSource,
        stage_sources: Mapping[str, ModelSource],
        dtype: torch.dtype,
        device: torch.device,
        tokenizer,
        logits: bool,
        shard: dict | None = None,
    ):
        self.teacher, self.stage_sources, self.dtype, self.device = teacher, stage_sources, dtype, device
        self.tokenizer, self.logits, self.shard = tokenizer, logits, shard
        self.loaded: dict[ModelSource, OnlineTeacher] = {}

    def adopt(self, lm: PreTrainedModel | None) -> None:
        """The run's teacher, already read from disk (the one a student was cut from), made frozen and
        moved; sharded, only rank 0 holds it (None elsewhere)."""
        if self.shard is not None:

            def cast_on_rank_0() -> PreTrainedModel:
                assert lm is not None
                cast(torch.nn.Module, lm).to(dtype=self.dtype)
                return lm

            self._add(self.teacher, self._sharded(cast_on_rank_0))
            return
        assert lm is not None
        cast(torch.nn.Module, lm).to(self.device, dtype=self.dtype)
        lm.eval()
        lm.requires_grad_(False)
        self._add(self.teacher, lm)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def get(self, path: str | None = None) -> OnlineTeacher:
        source = self.stage_sources[path] if path else self.teacher
        if source not in self.loaded:
            self.loaded = {s: m for s, m in self.loaded.items() if s == self.teacher}
            if self.shard is not None:
                self._add(source, self._sharded(lambda: load_model(source, dtype=self.dtype)))
            else:
                self._add(source, load_model(source, dtype=self.dtype, device=self.device, frozen=True))
        return self.loaded[source]

    def _sharded(self, build) -> PreTrainedModel:
        return load_sharded(build, device=self.device, trainable=False, **(self.shard or {}))

    def _add(self, source: ModelSource, lm: PreTrainedModel) -> None:
        check_head_rows(lm, self.vocab_size, f"teacher {source.location}")
        self.loaded[source] = OnlineTeacher(lm, self.logits, self.vocab_size)
