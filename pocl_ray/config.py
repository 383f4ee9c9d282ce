"""Typed run configuration: one pydantic model per section, loaded from YAML.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting,
and every invalid value is reported with its dotted field path and the allowed values.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

KDLossKind = Literal["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]
MetricName = Literal["student_ce", "student_rougeL", "teacher_ce", "teacher_student_kl", "length"]
PlanKind = Literal["pocl", "baseline", "sft", "extraction", "progressive"]
Schedule = Literal["linear", "constant", "cosine"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
# A fixed actor pool size, or "auto": an autoscaling pool (see `data.actor_pool`).
ActorCount = Annotated[int, Field(ge=1)] | Literal["auto"]


def _whole_above_one(n: float) -> float:
    if n > 1 and n != int(n):
        raise ValueError(f"more than 1 GPU per actor must be a whole number (the model is split over them), got {n}")
    return n


# GPUs per inference actor: a fraction shares one GPU; N > 1 (whole) splits the model over N (models.load_frozen).
GPUsPerActor = Annotated[float, Field(ge=0), AfterValidator(_whole_above_one)]


def _cap_needs_a_split(section: Any) -> Any:
    if section.max_memory_per_gpu is not None and section.num_gpus_per_actor <= 1:
        raise ValueError(
            "max_memory_per_gpu caps a model split over several GPUs: it needs num_gpus_per_actor > 1, "
            f"got {section.num_gpus_per_actor}"
        )
    return section


# Bytes of weights per GPU for a model split over several ("40GiB", "70GB" or a number of bytes).
MemoryCap = Annotated[
    ByteSize | None,
    Field(
        description="with num_gpus_per_actor > 1: the most bytes of weights placed on each GPU (e.g. 40GiB); "
        "None: 90% of the smallest GPU's memory"
    ),
]


class ConfigError(ValueError):
    """A config value is invalid; the message names each offending field."""


# scheme://… (s3://, gs://, hf://, file://, …): a URI, not a local path.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The object stores pyarrow serves natively (storage.resolve; Ray Train's storage_path takes the same).
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "file")
# Query parameters of a pyarrow URI that hold secrets.
_SECRET_PARAMS = {"access_key", "secret_key", "session_token", "account_key", "sas_token", "client_secret"}


def is_uri(value: object) -> bool:
    """scheme://… (also file://): a URI, not a local path (a Windows drive letter is no scheme)."""
    return isinstance(value, str) and bool(_URI.match(value))


def check_uri(value: str) -> str:
    """value, once it is a URI of a store pyarrow serves and carries no credential; else ValueError why.

    A credential in a URI would be copied into manifests, logs and Ray's dashboard: credentials come
    from the environment or the instance's role (storage.py lists the variables)."""
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in URI_SCHEMES:
        raise ValueError(
            f"unsupported URI scheme {scheme!r}: use a local path or {', '.join(s + '://' for s in URI_SCHEMES)}"
        )
    # abfs://container@account…: the user part names the container; a password after ':' is a key.
    secret_user = parts.password is not None or (parts.username and scheme not in ("abfs", "abfss"))
    if secret_user or _SECRET_PARAMS & {k.lower() for k, _ in parse_qsl(parts.query)}:
        raise ValueError(
            "the URI carries a credential, which would be copied into manifests, logs and the dashboard; "
            "give it through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS, AZURE_CLIENT_SECRET, ...) or the instance's role"
        )
    if scheme != "file" and not parts.netloc:
        raise ValueError(f"the URI names no bucket: expected {scheme}://BUCKET/PATH")
    return value


def redact_uri(value: str) -> str:
    """value with any credential in it (user:password@, secret query parameters) replaced by ***,
    for messages that show a refused URI."""
    parts = urlsplit(value)
    netloc = parts.netloc
    if parts.password is not None or (parts.username and parts.scheme.lower() not in ("abfs", "abfss")):
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}={'***' if k.lower() in _SECRET_PARAMS else v}" for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return parts._replace(netloc=netloc, query=query).geturl()


def _path_or_uri(value: str) -> str:
    return check_uri(value) if _URI.match(value) else value


def _local_for_now(value: str) -> str:
    # Issue 24 moves every path setting onto storage.py / model_source.py; until the stage that reads
    # a setting goes through them, that stage opens it with pathlib and from_pretrained, which would
    # read "s3://b/x" as the relative path "s3:/b/x": the URI is refused here, where the error names
    # the field. A setting moves from LocalPath to PathOrURI when its stage reads URIs.
    if _URI.match(value):
        raise ValueError(
            "a URI is not supported here yet: this setting is still opened as a local file or folder (on a "
            "cluster: a shared filesystem mounted at the same path on every node); copy or mount it locally. "
            "Of the path settings data.*, eval.sets[].path, models.*, output.dir and training.storage_path take URIs"
        )
    return value


# A local path or a URI of an object store (storage.py).
PathOrURI = Annotated[str, AfterValidator(_path_or_uri)]
# A path setting whose stage still opens local paths only (see _local_for_now).
LocalPath = Annotated[str, AfterValidator(_path_or_uri), AfterValidator(_local_for_now)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FieldMap(_Section):
    """Which source column feeds each role; the first present column of each list wins."""

    id: list[str] = ["id"]
    instruction: list[str] = ["instruction", "prompt"]
    context: list[str] = ["context", "input"]
    response: list[str] = ["response", "output"]
    messages: list[str] = Field(
        ["messages", "conversations"],
        description="the conversation column of conversation rows: a list of turns, each {role, content} "
        "(OpenAI / TRL messages) or {from, value} (ShareGPT conversations)",
    )


class HFDataset(_Section):
    """A dataset read by Hugging Face `datasets.load_dataset` (its cache and HF_DATASETS_OFFLINE apply)."""

    dataset: str = Field(
        description="a Hub dataset name (org/name), or a local folder load_dataset reads (data files, and a "
        "README.md whose `configs` declare subsets)"
    )
    split: str = Field(description="the split to read, e.g. train; load_dataset's slices (train[:1000]) work too")
    subset: str | None = Field(None, description="the configuration (load_dataset's `name`) of a dataset with several")
    revision: str | None = Field(None, description="a Hub branch, tag or commit; default the main branch")


# Union tags hold a space, which no field name does: error paths leave them out (`_format_errors`).
_SOURCE_TAGS = ("local path", "dataset by name")


def _source_kind(value: Any) -> str:
    return _SOURCE_TAGS[1] if isinstance(value, (dict, HFDataset)) else _SOURCE_TAGS[0]


# A local file or folder or an object-storage URI (a string), or a dataset by name (a mapping: {dataset,
# split, subset}); the discriminator picks the one branch whose errors are reported, so a bad mapping is
# not also "not a string".
DataSource = Annotated[
    Annotated[PathOrURI, Tag(_SOURCE_TAGS[0])] | Annotated[HFDataset, Tag(_SOURCE_TAGS[1])], Discriminator(_source_kind)
]


class DataConfig(_Section):
    train: DataSource = Field(
        description="training data: .jsonl[.gz], .parquet, a directory of them, a datasets save_to_disk dir, "
        "or {dataset: org/name, split: ..., subset: ...} for datasets.load_dataset"
    )
    dev: DataSource | None = None
    format: Literal["auto", "jsonl", "parquet", "hf"] = Field(
        "auto",
        description="how local files store the rows (hf: a save_to_disk folder); see row_form for what a row holds",
    )
    row_form: Literal["auto", "instruction", "conversation"] = Field(
        "auto",
        description="what a row holds, a separate setting from `format` (which is only the file's storage): "
        "instruction = instruction / context / response columns (fields.*) rendered by `template`; "
        "conversation = a list of turns in a fields.messages column, rendered by the tokenizer's own chat "
        "template; auto = conversation when a fields.messages column is present, else instruction",
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant",
        description="conversation rows: the assistant turns scored (KD and CE); system and user turns never are",
    )
    fields: FieldMap = FieldMap()
    template: Literal["dolly", "chat"] = Field(
        "dolly", description="instruction rows' prompt template; conversation rows always use the chat template"
    )
    max_prompt_length: int = Field(
        256,
        gt=0,
        description="instruction rows: the prompt is cut to its last max_prompt_length tokens; conversation rows: "
        "the conversation before the last assistant turn must fit it (earliest turns dropped)",
    )
    max_length: int = Field(512, gt=1)
    max_rows: int | None = Field(None, gt=0, description="read at most this many training rows")

    @model_validator(mode="after")
    def _lengths(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}) so at least one response token fits"
            )
        return self


class ModelsConfig(_Section):
    # Each model is a local folder, a Hugging Face Hub id (org/name, optionally org/name@revision) or an
    # object-storage URI, resolved and pinned on the driver before any Ray work (model_source.py).
    teacher: PathOrURI = Field(description="a Hugging Face causal LM: a local folder, a Hub id org/name or a URI")
    student: PathOrURI | None = Field(None, description="the student (as teacher); None = cut from the teacher")
    student_layers: list[int] | None = Field(
        None, description="teacher layers kept when the student is cut from the teacher"
    )
    student_keep_every: int = Field(2, ge=1, description="keep every k-th teacher layer when cutting")
    tokenizer: PathOrURI | None = Field(None, description="the tokenizer (as teacher); default: the teacher's")
    revision: str | None = Field(
        None,
        description="branch, tag or commit of models.teacher (and of the default tokenizer, the teacher's) "
        "when it is a Hugging Face Hub id; resolved once on the driver to a commit (model_source.py)",
    )
    dtype: DType = "auto"


class ScoringConfig(_Section):
    metrics: list[MetricName] = ["student_ce", "student_rougeL"]
    directions: dict[str, Literal["lower", "higher"]] = Field(
        default_factory=dict, description="override a metric's easy direction"
    )
    rrf_k: float = Field(60.0, gt=0)
    tie_seed: int = Field(
        0,
        description="seed of the hash of the id that orders rows with exactly equal fused scores "
        "(equal metric values always get equal fused scores; ids never order them lexically)",
    )
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="cap on the student_rougeL greedy response; None = each row's response budget, "
        "data.max_length minus its prompt",
    )
    num_actors: ActorCount = Field(
        1,
        description="measurer actors (one model replica each); auto: Ray Data grows the pool from 1 to "
        "as many as the cluster's free CPUs/GPUs hold (with an autoscaler, as GPU nodes join)",
    )
    num_gpus_per_actor: GPUsPerActor = 0.0
    max_memory_per_gpu: MemoryCap = None
    num_cpus_per_actor: float = Field(1.0, gt=0)
    length_window: int = Field(
        8,
        ge=1,
        description="forward batches per Ray Data batch: rows are sorted by length within "
        "batch_size * length_window rows so each forward pass pads little",
    )
    sort_output: bool = Field(True, description="write scores/rows in rank order (a Ray Data sort); off: input order")
    rows_per_file: int | None = Field(
        None,
        ge=1,
        description="rows per parquet file of scores/rows; default about 64 MiB of tokens at data.max_length",
    )
    teacher_top_k: int | None = Field(
        None,
        ge=1,
        description="also store the teacher's top-k log-probs (and its tail) at every response "
        "position, for kd.teacher: cached (METHODS.md §4); None = no teacher cache",
    )
    teacher_hidden: bool = Field(
        False,
        description="instead of the top-k, store the teacher's final hidden state (int8) at every response "
        "position and its LM head once, for kd.teacher: cached: every KD kind exact up to the int8 rounding, "
        "at hidden_size + hidden_size/32 bytes per token (METHODS.md §4)",
    )

    _split = model_validator(mode="after")(_cap_needs_a_split)

    @model_validator(mode="after")
    def _one_cache_form(self) -> ScoringConfig:
        if self.teacher_hidden and self.teacher_top_k is not None:
            raise ValueError(
                "scoring.teacher_top_k and scoring.teacher_hidden: true are two forms of the teacher cache; set one"
            )
        return self

    @model_validator(mode="after")
    def _metrics(self) -> ScoringConfig:
        if not self.metrics:
            raise ValueError("metrics must name at least one metric")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics has duplicates: {self.metrics}")
        unknown = set(self.directions) - set(self.metrics)
        if unknown:
            raise ValueError(f"directions names metrics not in metrics: {sorted(unknown)}")
        return self


class ExtractionConfig(_Section):
    steps_per_layer: int = Field(100, gt=0)
    final_steps: int = Field(500, gt=0)
    teacher_layers: list[int] | None = Field(None, description="teacher layers to match; default all")
    layer_map: list[int] | None = Field(None, description="student layer for each teacher layer")
    projection: Literal["gaussian", "orthogonal"] = "gaussian"
    normalize: bool = True
    seed: int = 0


class ProgressiveConfig(_Section):
    teacher_checkpoints: list[PathOrURI] = Field(
        default_factory=list,
        description="teacher checkpoints (folders, Hub ids or URIs, as models.teacher), earliest first; "
        "the plan then ends on models.teacher (the final teacher) unless this list already ends on it",
    )
    steps_per_checkpoint: int = Field(100, gt=0)
    final_steps: int | None = Field(
        None, gt=0, description="steps on the final teacher (models.teacher); default steps_per_checkpoint"
    )


class OutputKDConfig(_Section):
    """The output-KD stages of the extraction and progressive plans: their own settings, not the end
    of POCL's temperature and KD-weight schedules (METHODS.md §2)."""

    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(1.0, ge=0, le=1, description="w of (1 - w) CE + w KD (METHODS.md's POCL alpha)")


def _steps_replace_epochs(data: Any, steps: str, epochs: str) -> Any:
    """Raw section data where setting only `steps` drops the `epochs` default, so the validated config
    (and its dump, which to_yaml / with_overrides re-validate) holds exactly one length."""
    if isinstance(data, dict) and data.get(steps) is not None and epochs not in data:
        return {**data, epochs: None}
    return data


class CurriculumConfig(_Section):
    plan: PlanKind = "pocl"
    num_buckets: int = Field(4, ge=1)
    epochs_per_stage: float | None = Field(8.0, gt=0)
    steps_per_stage: int | None = Field(None, gt=0, description="when set, overrides epochs_per_stage")
    temperature_start: float = Field(1.0, gt=0)
    temperature_end: float = Field(2.0, gt=0)
    temperature_shape: Schedule = "linear"
    kd_weight_start: float = Field(0.7, ge=0, le=1)
    kd_weight_end: float = Field(1.0, ge=0, le=1)
    restart_optimizer: bool = True
    advance: Literal["interval", "plateau"] = "interval"
    patience: int = Field(2, ge=1, description="dev evaluations without improvement before moving on")
    extraction: ExtractionConfig = ExtractionConfig()
    progressive: ProgressiveConfig = ProgressiveConfig()
    output_kd: OutputKDConfig = OutputKDConfig()
    data_curriculum: Literal["none", "pocl"] = Field(
        "none",
        description="pocl: the extraction/progressive stages train on POCL's growing easy->hard "
        "pools (num_buckets buckets of the scored data) instead of all data",
    )

    @field_validator("data_curriculum")
    @classmethod
    def _data_curriculum_needs_a_target_plan(cls, value: str, info: ValidationInfo) -> str:
        plan = info.data.get("plan")  # absent when plan itself is invalid (reported on its own)
        if value != "none" and plan not in (None, "extraction", "progressive"):
            raise ValueError(
                f"{value!r} applies to the extraction and progressive plans only; plan {plan!r} has its own pools"
            )
        return value

    @model_validator(mode="after")
    def _progressive_needs_checkpoints(self) -> CurriculumConfig:
        if self.plan == "progressive" and not self.progressive.teacher_checkpoints:
            raise ValueError(
                "progressive.teacher_checkpoints is empty: the progressive plan distils from each listed "
                "checkpoint in turn before the final teacher (without any, use plan 'baseline')"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _steps_replace_epochs(cls, data: Any) -> Any:
        return _steps_replace_epochs(data, "steps_per_stage", "epochs_per_stage")


class KDConfig(_Section):
    loss: KDLossKind = "fkl"
    scale_by_t2: bool = True
    skew_alpha: float = Field(0.1, ge=0, le=1, description="alpha of SKL/SRKL")
    js_beta: float = Field(0.5, gt=0, lt=1, description="beta of the generalised JSD")
    akl_mu: float = Field(0.5, gt=0, lt=1)
    on_policy_fraction: float = Field(
        0.0, ge=0, le=1, description="GKD lambda: share of the batch the student generates"
    )
    on_policy_max_new_tokens: int = Field(128, gt=0)
    # = losses.DEFAULT_CHUNK_POSITIONS (chosen there; a test keeps the two equal).
    chunk_positions: int = Field(256, gt=0, description="scored positions per loss chunk")
    teacher: Literal["online", "cached"] = Field(
        "online",
        description="online: run the teacher in every training step; cached: read it from the "
        "scores (scoring.teacher_top_k or scoring.teacher_hidden), no teacher on the training workers",
    )


class FSDPConfig(_Section):
    """FSDP2 options (training.strategy: fsdp; pocl_ray/sharding.py)."""

    reshard_after_forward: bool = Field(
        True,
        description="free each decoder layer's gathered weights after its forward and gather them again for "
        "backward: less memory for one more all-gather per layer",
    )
    cpu_offload: bool = Field(
        False, description="sharded weights, gradients and optimizer state on the host, copied to the GPU per layer"
    )
    mixed_precision: bool = Field(
        True, description="on CUDA: bf16 compute on fp32 sharded weights, gradients reduced in fp32"
    )


class TrainingConfig(_Section):
    num_workers: Annotated[int, Field(ge=1)] | tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = Field(
        2,
        description="training workers: a count, or [min, max] for elastic training (Ray Train starts with what "
        "the cluster holds, at least min, grows to max as nodes join, continues on fewer after a failure)",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    global_batch_size: int = Field(
        64, gt=0, description="rows per optimizer step, dealt over the workers (unevenly where they do not divide it)"
    )
    micro_batch_size: int = Field(8, gt=0, description="rows per worker per forward pass")
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-7, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints (also at every stage end)")
    eval_every: int = Field(50, gt=0, description="steps between dev-loss evaluations (plateau advance)")
    select_every: int | None = Field(
        None,
        gt=0,
        description="steps between checkpoint-selection candidates (dev ROUGE-L, METHODS.md §5); "
        "every stage end is one anyway; None = stage ends only",
    )
    max_failures: int = Field(
        3, ge=-1, description="worker-group failures (a lost node or worker) Ray Train recovers from; -1: no limit"
    )
    resize_check_s: float = Field(
        60.0,
        gt=0,
        description="with num_workers: [min, max], seconds between Ray Train's checks for room to grow the "
        "worker group (growing restarts it from the latest checkpoint)",
    )
    seed: int = 0
    storage_path: PathOrURI | None = Field(
        None,
        description="Ray Train checkpoint storage: a local/shared folder or a URI Ray Train's pyarrow "
        "filesystems read (s3://, gs://, ...; multi-node); default OUTPUT/train/checkpoints",
    )
    keep_checkpoints: int = Field(2, ge=1, description="latest checkpoints kept in storage")
    gradient_checkpointing: bool = Field(
        False, description="recompute the student's layer activations in backward: less memory, ~30% more compute"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole student, its gradients and optimizer state; fsdp: the "
        "student is sharded over the workers (FSDP2), for students bigger than one GPU",
    )
    fsdp: FSDPConfig | None = Field(None, description="FSDP options, with strategy: fsdp only (unset: the defaults)")
    teacher_sharding: Literal["replicate", "fsdp"] | None = Field(
        None,
        description="the online teacher on the workers: whole on each (replicate) or sharded over them (fsdp, "
        "forward only); unset: fsdp under strategy: fsdp, replicate under ddp",
    )

    @model_validator(mode="after")
    def _sharding(self) -> TrainingConfig:
        if self.strategy != "fsdp" and self.fsdp is not None:
            raise ValueError("training.fsdp configures training.strategy: fsdp, but the strategy is ddp")
        if self.strategy != "fsdp" and self.teacher_sharding == "fsdp":
            raise ValueError("training.teacher_sharding: fsdp needs training.strategy: fsdp")
        return self

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"[min, max] needs min <= max, got {list(value)}")
        return value

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def sharded_teacher(self) -> bool:
        """Whether the online teacher is sharded over the workers (teacher_sharding, resolved by the strategy)."""
        return (self.teacher_sharding or ("fsdp" if self.strategy == "fsdp" else "replicate")) == "fsdp"


class EvalSet(_Section):
    name: str
    path: DataSource = Field(description="as data.train: a local file or folder, a URI, or {dataset, split, subset}")
    max_rows: int | None = Field(None, gt=0)


class EvalConfig(_Section):
    sets: list[EvalSet] = Field(default_factory=list)
    seeds: list[int] = [10, 20, 30, 40, 50]
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(512, gt=0)
    batch_size: int = Field(16, gt=0)
    checkpoint: Literal["best_dev_rougeL", "final"] = Field(
        "best_dev_rougeL",
        description="the student evaluated: the training candidate with the best dev ROUGE-L "
        "(train/student_best; without data.dev the final one, with a message), or the final one (train/student)",
    )
    length_sort_batches: int = Field(
        8, ge=1, description="generation batches per actor call; rows are sorted by prompt length within it"
    )
    num_actors: ActorCount = Field(1, description="generation actors; auto as scoring.num_actors")
    num_gpus_per_actor: GPUsPerActor = 0.0
    max_memory_per_gpu: MemoryCap = None
    num_cpus_per_actor: float = Field(1.0, gt=0)

    _split = model_validator(mode="after")(_cap_needs_a_split)


class ParamSpec(_Section):
    type: Literal["grid", "choice", "uniform", "loguniform"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> ParamSpec:
        if self.type in ("grid", "choice"):
            if not self.values:
                raise ValueError(f"type {self.type!r} needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"type {self.type!r} needs low < high")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("type 'loguniform' needs low > 0")
        return self


class TuneConfig(_Section):
    search_space: dict[str, ParamSpec] = Field(
        default_factory=dict, description="dotted config path (e.g. curriculum.num_buckets) -> spec"
    )
    num_samples: int = Field(
        1, ge=1, description="samples drawn (random/optuna/hyperopt); with grid specs, repeats of the whole grid"
    )
    objective: Literal["dev_rougeL", "dev_kd_loss"] = Field(
        "dev_kd_loss",
        description="dev_kd_loss: forward KL at T=1 on data.dev after training (cheap); dev_rougeL: "
        "ROUGE-L of the student's generations on data.dev (eval settings), after training",
    )
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo", description="asha: stop trials whose dev KD loss lags at equal samples seen (for either objective)"
    )
    grace_samples: int | None = Field(
        None,
        ge=1,
        description="ASHA: training samples (optimizer steps x training.global_batch_size) every trial "
        "gets before its first comparison; rungs at grace_samples x reduction_factor^k must fall on the trials' "
        "report points (every training.checkpoint_every steps); None = the smallest such interval",
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: a rung keeps the best 1/reduction_factor")
    search_alg: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    max_concurrent_trials: int = Field(1, ge=1)
    cpus_per_trial: float = Field(
        0.1, gt=0, description="CPU of the trial's driver function; its Train workers ask for their own"
    )
    seed: int = Field(0, description="seed of the search algorithm's sampling")


TrackerName = Literal["mlflow", "tensorboard", "wandb"]


class MLflowConfig(_Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http(s)://server, sqlite:///file.db, databricks, ...); default "
        "$MLFLOW_TRACKING_URI, else sqlite:///OUTPUT/mlflow.db. Credentials go in MLflow's own environment "
        "variables (MLFLOW_TRACKING_TOKEN, ...), never here",
    )
    experiment: str | None = Field(None, description="experiment name; default $MLFLOW_EXPERIMENT_NAME, else `name`")


class TensorBoardConfig(_Section):
    log_dir: LocalPath | None = Field(
        None, description="event files go under LOG_DIR/<run>/; default OUTPUT/tensorboard"
    )


class WandbConfig(_Section):
    project: str | None = Field(None, description="default $WANDB_PROJECT, else pocl-ray")
    entity: str | None = Field(None, description="default $WANDB_ENTITY, else the account's default entity")
    mode: Literal["online", "offline", "disabled"] | None = Field(None, description="default $WANDB_MODE, else online")
    dir: LocalPath | None = Field(
        None, description="where W&B keeps its local run files; default $WANDB_DIR, else OUTPUT"
    )


class OutputConfig(_Section):
    dir: PathOrURI = Field(
        "runs/default",
        description="every output of the run: a local folder (shared by the nodes on a cluster) or an "
        "object-storage URI (s3://, gs://, abfs://); the trackers' default stores (output.mlflow.tracking_uri, "
        "output.tensorboard.log_dir, output.wandb.dir) need a local folder, so with a URI they must be set",
    )
    trackers: list[TrackerName] = Field(
        default_factory=list,
        description="experiment trackers the run also logs to (pocl_ray/tracking.py); each needs its extra, "
        "e.g. pip install 'pocl-ray[mlflow]'. metrics.jsonl and the report are written either way",
    )
    mlflow: MLflowConfig = MLflowConfig()
    tensorboard: TensorBoardConfig = TensorBoardConfig()
    wandb: WandbConfig = WandbConfig()
    bucket_probe_rows: int = Field(
        32,
        ge=0,
        description="rows per difficulty bucket in the fixed probe sample whose KD loss and response CE are "
        "measured at every stage end and selection candidate (pocl_ray/probes.py); 0 = no probe",
    )

    @field_validator("trackers")
    @classmethod
    def _distinct_trackers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"trackers has duplicates: {value}")
        return value


class TeacherPrepConfig(_Section):
    """Build a small teacher from scratch and train it on the training data (SFT) when
    models.teacher does not exist yet: the quickstart's offline stand-in for a pretrained teacher."""

    arch: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = Field(1024, ge=64)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    steps: int = Field(300, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class TeacherSFTConfig(_Section):
    """Fine-tune models.teacher on the training split (SFT on the references: CE only) before scoring,
    as the paper's teacher is; the rest of the pipeline then uses the fine-tuned teacher."""

    epochs: float | None = Field(1.0, gt=0, description="passes over the training split")
    steps: int | None = Field(None, gt=0, description="when set, overrides epochs")
    lr: float = Field(2e-5, gt=0)
    min_lr: float = Field(0.0, ge=0, description="end of the cosine schedule")
    warmup_steps: int = Field(0, ge=0)
    global_batch_size: int | None = Field(None, gt=0, description="default training.global_batch_size")

    @model_validator(mode="before")
    @classmethod
    def _steps_replace_epochs(cls, data: Any) -> Any:
        return _steps_replace_epochs(data, "steps", "epochs")

    @model_validator(mode="after")
    def _length(self) -> TeacherSFTConfig:
        if self.epochs is None and self.steps is None:
            raise ValueError("set epochs or steps: the fine-tuning needs a length")
        return self


class PipelineConfig(_Section):
    prepare_teacher: TeacherPrepConfig | None = None
    sft_teacher: TeacherSFTConfig | None = Field(
        None,
        description="fine-tune the teacher (after prepare_teacher, if any) on data.train before distilling; "
        "its output, OUTPUT/teacher_sft/model, is the teacher of every later stage",
    )
    compare: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="run label -> dotted config overrides; each label trains and evaluates its own student",
    )
    evaluate_teacher: bool = False


# Sections every run compared in one pipeline and every trial of a sweep shares: they define the one
# scoring pass and the output layout (pipeline.compare and tune.search_space refuse them).
SHARED_SECTIONS = ("data", "models", "scoring", "output", "pipeline")


class RunConfig(_Section):
    name: str = "run"
    data: DataConfig
    models: ModelsConfig
    scoring: ScoringConfig = ScoringConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    kd: KDConfig = KDConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    output: OutputConfig = OutputConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _check_kd_teacher(self) -> RunConfig:
        if self.kd.teacher != "cached":
            return self
        if self.curriculum.plan in ("extraction", "progressive"):
            need = (
                "the teacher's hidden states" if self.curriculum.plan == "extraction" else "one teacher per checkpoint"
            )
            raise ValueError(
                f"kd.teacher: 'cached' cannot serve curriculum.plan {self.curriculum.plan!r}, which needs {need}; "
                "use kd.teacher: online"
            )
        if self.kd.on_policy_fraction > 0:
            raise ValueError(
                "kd.teacher: 'cached' holds the teacher on the reference responses only; kd.on_policy_fraction > 0 "
                "needs it on the student's samples (use kd.teacher: online)"
            )
        if self.scoring.teacher_top_k is None and not self.scoring.teacher_hidden:
            raise ValueError(
                "kd.teacher: 'cached' reads the teacher from the scores; set scoring.teacher_top_k (e.g. 128) "
                "or scoring.teacher_hidden: true"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A validated copy with dotted-path overrides applied, e.g. {"kd.loss": "rkl"}."""
        data = self.model_dump(mode="json", exclude_unset=True)
        for dotted, value in overrides.items():
            model: type[BaseModel] | None = type(self)
            node = data
            *parents, leaf = dotted.split(".")
            for key in [*parents, leaf]:
                field = model.model_fields.get(key) if model else None
                if field is None:
                    raise ConfigError(f"{dotted}: no such config field")
                model = _section_type(field.annotation)
                if key != leaf:
                    node = node.setdefault(key, {})
            node[leaf] = value
        return parse_config(data)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model behind a field (also an optional one), None for plain values and lists."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)


# Keys an earlier release accepted: a config written for it gets the way forward, not just "unknown key".
RETIRED_KEYS = {
    "tune.grace_stages": "replaced by tune.grace_samples (ASHA now compares trials at equal samples seen)",
    "kd.chunk_size": "renamed kd.chunk_positions (it counts scored positions, not rows or bytes)",
}


def _format_errors(err: ValidationError, source: str, what: str) -> str:
    lines = [f"invalid {what} ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in _SOURCE_TAGS) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = RETIRED_KEYS.get(loc, "unknown key (not a field of this section)")
        got = e.get("input")
        if is_uri(got):
            got = redact_uri(got)
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


Model = TypeVar("Model", bound=BaseModel)


def validate_mapping(model: type[Model], data: Any, source: str = "<dict>", what: str = "config") -> Model:
    """`data` validated as `model`; every problem raised as one ConfigError naming `source` and each field.

    The one parser of the project's YAML configs (the run config here, parity.config's sandbox config);
    `what` names the kind of config in the messages.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid {what} ({source}): the top level must be a mapping of fields, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, what)) from None


def load_yaml(model: type[Model], path: str | Path, what: str = "config") -> Model:
    """The YAML file at `path` validated as `model`, with validate_mapping's errors (an empty file = all defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} file {path} is not valid YAML: {err}") from None
    return validate_mapping(model, data or {}, source=str(path), what=what)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    return validate_mapping(RunConfig, data, source)


def load_config(path: str | Path) -> RunConfig:
    return load_yaml(RunConfig, path)
