"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the student and the frozen teacher: a Hugging Face causal LM
sharded over every rank, loaded without a full copy per rank, run so the chunked loss sees both LM heads whole,
and generation kept in step across ranks.

Plain torch.distributed, no Ray: a training worker calls these once Ray Train has set up the process group.

Units. Each decoder layer is one FSDP unit: all-gathered for its forward (and again for its backward) and freed
after it when `reshard_after_forward`. An untied input embedding is one more such unit. The root unit is the
causal LM itself: its final norm and LM head, and with tied embeddings the one embedding/head parameter, which
therefore stays one parameter in one unit (tied). Buffers (rotary tables) are not sharded.

The LM heads in the loss. `losses.linear_kd_and_ce` applies both heads chunk by chunk, so it needs them whole
after the forwards. The root is never resharded after forward (the head is used again at once by the loss and
by backward), and the forward runs through the root module itself (`final_hidden_states`: the root's hooks
all-gather its parameters; the base model alone would run on the shards). So the head read after the forward
(`lm.get_output_embeddings().weight`) is the whole, gathered parameter: the student's until its backward ends
(FSDP2 then reduce-scatters the head gradient the loss left in it and frees it), the frozen teacher's and a
no-grad student's until `release`. No all-gather beyond the forward's own; the price is the roots held whole
from forward to the end of the loss (`benchmarks/sharded_loss.py` measures it against resharding after forward
and gathering again around the loss). A root resharded after forward would free the storage under that view.

Generation. Under FSDP every forward is a collective, so every rank must run as many forwards as every other.
Within one `generate` call transformers keeps ranks in step (synced_gpus, which it turns on for a model marked
`_is_fsdp_managed_module`, as `shard_model` marks it); across calls `in_lockstep` runs idle calls on ranks with
fewer batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pocl_ray.config import ConfigError
from pocl_ray.models import checkpoint_activations, decoder_layers

T = TypeVar("T")
R = TypeVar("R")


def mesh(device: torch.device) -> DeviceMesh:
    """One flat mesh over every rank of the default process group, on `device`'s type."""
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def shard_model(
    lm: PreTrainedModel,
    *,
    device: torch.device,
    trainable: bool,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    mixed_precision: bool = False,
) -> PreTrainedModel:
    """`lm` sharded in place over every rank (per decoder layer, the untied input embedding, the root).

    trainable False: a frozen model (eval mode, no gradients): no optimizer state or gradients exist for it,
    and its parameters stay in the dtype it was built in (load the teacher in bf16: no fp32 copy anywhere).
    cpu_offload: sharded parameters (and so gradients and optimizer state) live on the host, copied to the
    device unit by unit. mixed_precision: compute in bf16 on fp32 sharded parameters, gradients reduced in fp32.
    Gradient checkpointing (`models.checkpoint_activations`) composes with it: enable it before sharding, on
    every rank.
    A model without a decoder-layer list is a ValueError naming its class.
    """
    layers = decoder_layers(lm)
    if not trainable:
        lm.eval()
        lm.requires_grad_(False)
    ranks = mesh(device)
    # Pinned host memory (faster copies to the GPU) needs an accelerator.
    offload = CPUOffloadPolicy(pin_memory=torch.device(device).type == "cuda") if cpu_offload else OffloadPolicy()
    precision = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )

    def shard(module: nn.Module, reshard: bool) -> None:
        fully_shard(module, mesh=ranks, reshard_after_forward=reshard, mp_policy=precision, offload_policy=offload)

    for layer in layers:
        shard(layer, reshard_after_forward)
    embedding = lm.get_input_embeddings()
    if embedding.weight is not lm.get_output_embeddings().weight:
        shard(embedding, reshard_after_forward)
    shard(lm, False)
    # transformers' generate keeps every rank's forwards in step (synced_gpus) for a model marked so.
    # (torch types Module.__setattr__ for tensors and modules only; a plain attribute is what transformers reads.)
    lm._is_fsdp_managed_module = True  # type: ignore[assignment]
    return lm


def load_sharded(
    build: Callable[[], PreTrainedModel],
    *,
    device: torch.device,
    trainable: bool,
    gradient_checkpointing: bool = False,
    **shard_options,
) -> PreTrainedModel:
    """A sharded model whose weights only rank 0 reads.

    Rank 0 calls `build` (e.g. `models.load_model`, or the student cut from the teacher it read) and holds the
    one full copy; the other ranks build the same architecture from its config on the meta device, so they never
    hold more than their shards. After sharding, rank 0's tensors are broadcast one by one and each rank keeps
    its shards (set_model_state_dict, broadcast_from_rank0); the buffers (rotary tables, not in the state dict)
    are rank 0's too. gradient_checkpointing is turned on on every rank (each must recompute alike: a
    recomputed forward may gather weights, a collective). `shard_options` go to `shard_model`.
    """
    rank = dist.get_rank()
    spec: list[Any] = [None]
    if rank == 0:
        model = build()
        spec = [(model.config, model.generation_config, model.dtype)]
    dist.broadcast_object_list(spec, src=0)
    if rank != 0:
        config, generation_config, dtype = spec[0]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config = generation_config
    if trainable:
        model.train()
    if gradient_checkpointing:
        checkpoint_activations(model)
    full = model.state_dict() if rank == 0 else {}
    shard_model(model, device=device, trainable=trainable, **shard_options)
    if rank != 0:
        # CPU offload keeps the shards on the host; the buffers go to the compute device either way.
        model.to_empty(device="cpu" if shard_options.get("cpu_offload") else device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            buffer = buffer.to(device)
            dist.broadcast(buffer, src=0)
            setattr(module, name, buffer)
    return model


def check_shardable(path: str | Path, field: str) -> None:
    """ConfigError naming `field` unless the model at `path` has a decoder-layer list for FSDP to shard.
    Reads the config only (the model is built on the meta device), so the driver can check before any Ray work."""
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        decoder_layers(model)
    except ValueError as err:
        raise ConfigError(f"{field}: training.strategy fsdp shards a model per decoder layer, but {err}") from None


def final_hidden_states(
    lm: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(final normed hidden states, every layer's hidden states when asked for) of a forward through `lm`
    itself with no logits computed (`logits_to_keep` keeps no position). Through `lm` and not its base model:
    on a sharded root that is what gathers the root's parameters (module doc); the base model's output is
    read with a forward hook."""
    captured = []
    handle = lm.base_model.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        out = lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
        )
    finally:
        handle.remove()
    return captured[-1].last_hidden_state, out.hidden_states


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (`shard_model`)."""
    return isinstance(model, FSDPModule)


def release(model: nn.Module) -> None:
    """Free the root parameters a no-grad forward left gathered (a frozen teacher after the loss, the student
    after evaluation or sampling); nothing to do for an unsharded model."""
    if isinstance(model, FSDPModule):
        model.reshard()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def in_lockstep(batches: Sequence[T], run: Callable[[T], R], idle: T) -> list[R]:
    """[run(b) for b in batches] on this rank, then run(idle) (its result dropped) until this rank has run as
    many calls as the rank with the most batches: each call of a sharded model's forward or generate is a
    collective, so a rank that stopped early would leave the others waiting for ever."""
    most = torch.tensor([len(batches)], device=_collective_device())
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    results = [run(batch) for batch in batches]
    for _ in range(int(most) - len(batches)):
        run(idle)
    return results
