"""Teacher / student models and tokenizers: checking and loading local folders (or a resolved
`model_source.ModelSource`: a Hub id or an object-storage URI, fetched into this node's cache),
tiny offline builds, and students cut from a teacher's layers."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from pocl_ray.config import ConfigError
from pocl_ray.model_source import ModelSource

EOS_TOKEN = "<|endoftext|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The file from_pretrained reads first in a model folder, and in a tokenizer folder.
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# A model as the loaders take it: a local folder, or a ModelSource the driver resolved (preflight.py).
ModelLocation = str | Path | ModelSource


def _missing_files(folder: Path, need: Iterable[str]) -> list[str]:
    return [name for name in need if not (folder / name).is_file()]


def has_model_files(path: str | Path, need: Iterable[str] = (MODEL_CONFIG,)) -> bool:
    """Whether path is a local folder holding every file of `need` (a probe; check_model_folder raises)."""
    folder = Path(path)
    return folder.is_dir() and not _missing_files(folder, need)


def check_model_folder(path: str | Path, field: str | None = None, need: Iterable[str] = (MODEL_CONFIG,)) -> Path:
    """path, once it is a local folder holding every file of `need`; else an error naming the config `field`.

    Checked before from_pretrained so a typo reads as a missing folder, not as a failed Hugging Face
    hub lookup. A missing folder is a FileNotFoundError, a folder without the files a ConfigError.
    """
    folder = Path(path)
    prefix = "" if field is None else f"{field}: "
    if not folder.is_dir():
        raise FileNotFoundError(f"{prefix}model folder not found: {folder}")
    missing = _missing_files(folder, need)
    if missing:
        raise ConfigError(f"{prefix}{folder} is not a Hugging Face model folder (no {', '.join(missing)})")
    return folder


def local_folder(source: str | Path | ModelSource, weights: bool = True) -> Path:
    """A path as given; a ModelSource (a Hub id or a URI, pinned on the driver) as its folder in this
    node's cache, fetched on first use (model_source.py; weights=False: config and tokenizer only)."""
    return source.local_dir(weights) if isinstance(source, ModelSource) else Path(source)


def load_tokenizer(source: str | Path | ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer in a local folder or a resolved ModelSource; pad_token falls back to eos_token (Llama 3
    has no pad token): padded positions are masked (attention 0, labels -100), so the pad id never enters a loss."""
    path = local_folder(source, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(str(check_model_folder(path, need=())))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """ "auto" = bfloat16 on CUDA (float16 where the GPU lacks bf16), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype in ("float32", "bfloat16", "float16"):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")


def _quiet_progress_bars() -> None:
    # The pipeline loads and saves models in many Ray workers, whose per-call "Loading weights" and
    # "Writing model shards" bars would flood a job's log. Each worker is its own process, so this runs
    # where the model is loaded or saved (once on the driver would not reach the workers); a worker
    # that loads a model before it checkpoints one (training) is covered for its saves too.
    hf_logging.disable_progress_bar()


def load_model(
    source: str | Path | ModelSource,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    frozen: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local folder or a resolved ModelSource, on `device`; frozen = eval mode
    without gradients.

    Turns off transformers' progress bars for the process (see _quiet_progress_bars).
    """
    folder = check_model_folder(local_folder(source), need=())
    _quiet_progress_bars()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=resolve_dtype(dtype, device))
    # transformers decorates PreTrainedModel.to with @wraps(Module.to), which mypy reads as unbound.
    model.to(device)  # type: ignore[arg-type]
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def split_device_map(
    config, num_devices: int, max_memory: int, dtype: torch.dtype
) -> tuple[dict[str, int], dict[int, int]]:
    """(device_map, max_memory) placing a model of `config` in `dtype` over devices 0..num_devices-1 and
    nowhere else, with at most `max_memory` bytes of weights on each.

    The placement is transformers' own balanced one (what from_pretrained(device_map="balanced") computes,
    from the parameter sizes of the model built on the meta device): whole decoder layers in order, the
    embeddings on the first device, the final norm and LM head after the last layer, tied weights together;
    the forward moves activations between devices. A model that does not fit is a ValueError with its size
    (transformers would put the rest on the host or disk): leave room beyond size / N for the largest layer.
    """
    from transformers.integrations.accelerate import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    caps = dict.fromkeys(range(num_devices), int(max_memory))
    keep_whole = model._no_split_modules
    limits: dict[int | str, int | str] = {device: cap for device, cap in caps.items()}
    balanced = get_balanced_memory(model, max_memory=limits, no_split_module_classes=keep_whole)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=keep_whole)
    left_over = [name for name, device in device_map.items() if device not in caps]
    if left_over:
        size = compute_module_sizes(model)[0][""]
        raise ValueError(
            f"{type(model).__name__} ({size / 2**20:,.1f} MiB of weights in {dtype}) does not fit {num_devices} "
            f"devices of {max_memory / 2**20:,.1f} MiB each ({', '.join(left_over)} left over): raise the per-device "
            "cap or the number of devices"
        )
    return dict(device_map), caps


def load_model_split(
    source: str | Path | ModelSource,
    devices: Sequence[int | str],
    max_memory: int,
    *,
    dtype: str | torch.dtype = "auto",
) -> PreTrainedModel:
    """A frozen causal LM from a local folder or a resolved ModelSource spread over exactly `devices` (e.g.
    the N GPUs a Ray actor was given, as CUDA indices), at most `max_memory` bytes of weights on each
    (`split_device_map`). Inputs go to the first device (where `next(model.parameters())` is); the forward
    hands activations on."""
    folder = check_model_folder(local_folder(source), need=())
    first = f"cuda:{devices[0]}" if isinstance(devices[0], int) else devices[0]
    dtype = resolve_dtype(dtype, first)
    placement, _ = split_device_map(AutoConfig.from_pretrained(str(folder)), len(devices), max_memory, dtype)
    _quiet_progress_bars()
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, device_map={name: devices[i] for name, i in placement.items()}
    )
    model.eval()
    model.requires_grad_(False)
    return model


def actor_devices(num_gpus: float) -> list[int] | None:
    """The CUDA devices an inference actor spreads its model over: all N that Ray gave it (indices
    0..N-1 in its CUDA_VISIBLE_DEVICES) when num_gpus_per_actor is N > 1; None (one device) otherwise."""
    if num_gpus <= 1:
        return None
    n = int(num_gpus)
    if torch.cuda.device_count() < n:
        raise RuntimeError(f"num_gpus_per_actor: {n}, but this actor sees {torch.cuda.device_count()} CUDA devices")
    return list(range(n))


def load_frozen(
    source: str | Path | ModelSource,
    *,
    dtype: str | torch.dtype,
    device: str | torch.device,
    devices: Sequence[int | str] | None = None,
    max_memory: int | None = None,
) -> PreTrainedModel:
    """A frozen causal LM for an inference actor (scoring, evaluation): whole on `device`, or with `devices`
    (`actor_devices`) split over them, at most `max_memory` bytes of weights on each (None: 90% of the
    smallest device's memory, the rest left to activations)."""
    if devices is None:
        return load_model(source, dtype=dtype, device=device, frozen=True)
    if max_memory is None:
        max_memory = int(0.9 * min(torch.cuda.get_device_properties(d).total_memory for d in devices))
    return load_model_split(source, devices, max_memory, dtype=dtype)


def meta_model(source: str | Path | ModelSource) -> PreTrainedModel:
    """The causal LM of a local folder or a ModelSource built on the meta device: its modules and config
    without its weights, for checks that need the structure only (its LM head, say) at no memory cost."""
    from transformers import AutoConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(local_folder(source, weights=False))))


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (offline, seconds) with <|endoftext|> as eos/bos/pad,
    the ChatML tokens and a ChatML chat template. Same texts -> same vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN, *CHATML_TOKENS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(specials)} (bytes + special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_tiny_model(
    arch: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    max_positions: int = 512,
    save_dir: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    tie_embeddings: bool | None = None,
) -> PreTrainedModel:
    """A randomly initialised Llama or GPT-2 causal LM, identical for identical arguments; tie_embeddings None
    keeps the architecture's default (Llama untied, GPT-2 tied)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size ({vocab_size}) is smaller than the tokenizer's {len(tokenizer)} tokens")
    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        # Llama makes pad_token_id the embedding's padding_idx (zero row, never trained): with
        # pad == eos that would freeze EOS, so then the pad id goes to generation_config only.
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            special["pad_token_id"] = tokenizer.pad_token_id
    if tie_embeddings is not None:
        special["tie_word_embeddings"] = tie_embeddings
    config: PretrainedConfig
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            **special,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            **special,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'llama' or 'gpt2'")
    # A private RNG stream: the init depends on `seed` only, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if save_dir is not None:
        _quiet_progress_bars()
        model.save_pretrained(str(save_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(save_dir))
    return model


def _decoder_layers(model: PreTrainedModel) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the decoder layer list: Llama-family model.model.layers,
    GPT-2 transformer.h."""
    base = getattr(model, model.base_model_prefix, model)
    for attr in ("layers", "h"):
        if isinstance(getattr(base, attr, None), nn.ModuleList):
            return base, attr
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected .layers or .h)")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder layers (ValueError naming the model class when there is none)."""
    return getattr(*_decoder_layers(model))


def student_from_teacher(
    teacher: PreTrainedModel, *, keep_layers: list[int] | None = None, keep_every: int = 2
) -> PreTrainedModel:
    """A trainable copy of the teacher with a subset of its decoder layers.

    Default layers: every `keep_every`-th counting back from the last one (L=12, k=2 -> 1, 3, ...,
    11): the last layer always stays, because the copied final norm and LM head were trained on
    its output. Embeddings, final norm and LM head are copied; the config's layer count (and
    per-layer lists such as layer_types) and each attention's layer_idx are renumbered so the KV
    cache works.
    """
    parent, attr = _decoder_layers(teacher)
    layers = getattr(parent, attr)
    total = len(layers)
    if keep_layers is None:
        if keep_every < 1:
            raise ValueError(f"keep_every must be >= 1, got {keep_every}")
        keep = list(range(total - 1, -1, -keep_every))[::-1]
    else:
        bad = [i for i in keep_layers if not 0 <= i < total]
        if bad:
            raise ValueError(
                f"student layer indices {bad} out of range: the teacher has {total} layers (0..{total - 1})"
            )
        if len(set(keep_layers)) != len(keep_layers):
            raise ValueError(f"keep_layers has duplicates: {keep_layers}")
        if not keep_layers:
            raise ValueError("keep_layers must name at least one layer")
        keep = sorted(keep_layers)
    # Copy with only the kept layers attached, so the dropped ones are never duplicated.
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, attr, layers)
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None) is not None:
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    for new_index, layer in enumerate(getattr(*_decoder_layers(student))):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.requires_grad_(True)
    student.train()
    return student


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    return set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}


def tokenizer_difference(
    first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase, names: tuple[str, str] = ("first", "second")
) -> str | None:
    """None when two tokenizers are one for distillation: the same token at every id and the same
    special tokens; else the first difference, in words, calling the two `names`. Which special token
    plays eos or pad is not compared: a run uses one tokenizer (models.tokenizer or the teacher's) for
    both models."""
    by_id = [{i: t for t, i in tok.get_vocab().items()} for tok in (first, second)]
    for i in sorted(by_id[0].keys() | by_id[1].keys()):
        if by_id[0].get(i) != by_id[1].get(i):
            a, b = (by_id[k].get(i, "(no token)") for k in (0, 1))
            return f"token id {i} is {a!r} in the {names[0]} and {b!r} in the {names[1]}"
    specials = [_special_tokens(tok) for tok in (first, second)]
    if specials[0] != specials[1]:
        token = sorted(specials[0] ^ specials[1])[0]
        where = names[0] if token in specials[0] else names[1]
        return f"{token!r} is a special token of the {where} only"
    return None


def _config_vocab(folder: str | Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder)).get_text_config().vocab_size


def check_tokenizers(
    models_cfg, extra: Mapping[str, ModelLocation] | None = None, sources: Mapping[str, ModelSource] | None = None
) -> int:
    """Before any Ray work: refuse a teacher and student whose tokenizers differ, naming both and the
    first differing token, or a model whose LM head has fewer rows than the tokenizer has tokens;
    returns the run's vocabulary, len(tokenizer), the one size every KD distribution is taken over.
    ``extra`` names further models by their config field (a progressive plan's stage teachers),
    checked the same way. ``sources`` (setting -> the ModelSource the driver's preflight resolved)
    stand in for models_cfg's values: a Hub id or a URI is read from its node-local copy (config and
    tokenizer files only).

    Head sizes may differ (Qwen2.5-7B has 152,064 rows and Qwen2.5-0.5B 151,936 for one 151,665-token
    tokenizer): the rows past the tokenizer are padding, sliced off by the losses and masked in
    decoding. The run's tokenizer is models.tokenizer or the teacher's; a model folder's own tokenizer
    is compared with it when the folder has one.
    """
    resolved = sources or {}
    run_field = "models.tokenizer" if models_cfg.tokenizer is not None else "models.teacher"
    run = resolved.get(run_field, models_cfg.tokenizer or models_cfg.teacher)
    run_dir = check_model_folder(local_folder(run, weights=False), run_field, need=())
    tokenizer = load_tokenizer(run_dir)
    vocab = len(tokenizer)
    named = {"models.teacher": models_cfg.teacher, "models.student": models_cfg.student}
    models = {field: resolved.get(field, value) for field, value in named.items() if value is not None}
    for field, model in {**models, **(extra or {})}.items():
        folder = check_model_folder(local_folder(model, weights=False), field)
        rows = _config_vocab(folder)
        if rows < vocab:
            raise ConfigError(
                f"{field}: its LM head has {rows} rows, fewer than the {vocab} tokens of the tokenizer ({_shown(run)})"
            )
        if folder == run_dir or not has_model_files(folder, (TOKENIZER_CONFIG,)):
            continue
        names = (f"{run_field} tokenizer ({_shown(run)})", f"{field} tokenizer ({_shown(model)})")
        difference = tokenizer_difference(tokenizer, load_tokenizer(folder), names)
        if difference is not None:
            raise ConfigError(
                f"the {names[0]} and the {names[1]} differ: {difference}; token-level KD compares the two "
                "models' distributions over the tokens of one tokenizer"
            )
    return vocab


def _shown(model: ModelLocation) -> str:
    """A model as its setting gave it (a Hub id, a URI, a folder), not as its cached copy's path."""
    return model.location if isinstance(model, ModelSource) else str(model)


def check_head_rows(model: PreTrainedModel, vocab_size: int, name: str) -> None:
    """Raise ValueError unless `name`'s LM head has a row for each of the tokenizer's `vocab_size`
    tokens (what `check_tokenizers` checked on the driver, checked again where a model is loaded). Rows
    past them are padding, excluded from every distribution (`training.teacher.LMOutputs`)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ValueError(f"the {name}'s LM head has {rows} rows, fewer than the tokenizer's {vocab_size} tokens")


def hidden_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


# Config fields that make a model's logits something other than hidden @ lm_head.weight.T, with the
# value at which they leave the logits as they are (None: only an unset field does). The transformers
# models that read them: Gemma 2/3 (final_logit_softcapping), xLSTM (output_logit_soft_cap), Cohere
# (logit_scale), Granite, MiniCPM3, HyperCLOVA X (logits_scaling), Falcon-H1 (lm_head_multiplier).
_LOGIT_TRANSFORMS = (
    ("final_logit_softcapping", None),
    ("output_logit_soft_cap", None),
    ("softcap", None),
    ("logit_scale", 1),
    ("logits_scaling", 1),
    ("lm_head_multiplier", 1),
    ("output_mult", 1),
)


def linear_head(model: PreTrainedModel) -> tuple[torch.Tensor | None, str]:
    """(LM-head weight, reason) when the model's logits are exactly ``final hidden states @ weight.T``,
    so the KD loss can start from hidden states (``losses.linear_kd_and_ce``); else (None, one line saying
    why it must use the logits instead)."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None, f"{name}'s output embedding is {type(head).__name__}, not an nn.Linear"
    if head.bias is not None:
        return None, f"{name}'s LM head has a bias"
    config = model.config.get_text_config()
    for field, neutral in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value is not None and value != neutral:
            return None, f"{name}'s logits are transformed after the LM head (config.{field} = {value})"
    return head.weight, f"{name}'s logits are hidden states @ lm_head.weight.T"


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Each tensor name of the folder's safetensors checkpoint and the file that holds it ({} without one)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def output_embedding_rows(source: str | Path | ModelSource, rows: int) -> torch.Tensor:
    """The first `rows` rows of the model's LM-head weight in float32, read from its safetensors files
    alone: a 70B teacher's head is ~2 GB, the whole model in float32 ~280 GB. A tied head is stored under
    the input embedding's name, so every name the head's parameter goes by is looked up. A checkpoint
    without safetensors, or whose keys transformers renames on load, is loaded whole."""
    from safetensors import safe_open

    model = meta_model(source)
    head = model.get_output_embeddings().weight
    files = _safetensors_files(local_folder(source))
    stored = [name for name, p in model.named_parameters(remove_duplicate=False) if p is head and name in files]
    if not stored:
        return load_model(source, dtype="float32").get_output_embeddings().weight[:rows].detach()
    with safe_open(str(files[stored[0]]), framework="pt") as f:
        return f.get_slice(stored[0])[:rows].to(torch.float32)


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Recompute the decoder layers' activations in backward (non-reentrant torch checkpointing).

    transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable and
    deprecated the old name; both are supported by the versions this package allows.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
