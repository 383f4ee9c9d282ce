"""Checkpoints of a sharded (FSDP2) student and its optimizer with torch.distributed.checkpoint (DCP), and the
export of the whole student as an ordinary Hugging Face folder.

Each rank writes only its own shards: one file per rank in the checkpoint directory, plus rank 0's `.metadata`
(the directory may be a different local one on each rank, as long as the files end up in one place before a
load: Ray Train gathers every rank's reported directory into one checkpoint). `asynchronous` copies the state
to host memory and lets a background thread write it. A checkpoint loads into any number of ranks: each rank
reads its new shards from whichever files hold them, so a run saved on W ranks resumes on W' (DCP reshards).
The export gathers the full state to rank 0's host memory, one tensor at a time, and writes it with
`save_pretrained`, so `from_pretrained` reads it back as any other model folder.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import AutoModelForCausalLM

from pocl_ray.models import _quiet_progress_bars

MODEL, OPTIMIZER = "model", "optimizer"


def _state(model, optimizer, options: StateDictOptions | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {MODEL: get_model_state_dict(model, options=options)}
    if optimizer is not None:
        state[OPTIMIZER] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def save(
    directory: str | Path, model, optimizer=None, *, asynchronous: bool = False, process_group=None
) -> Future | None:
    """Every rank writes its shards of `model` (and `optimizer`) into `directory`; a collective.

    asynchronous: returns once the state is staged in host memory, with a Future that is done when the files
    are written (wait for it before handing the directory over). DCP's background write needs a process group
    with a CPU backend: on GPUs pass a gloo group (`dist.new_group(backend="gloo")`).
    """
    state = _state(model, optimizer)
    if asynchronous:
        written = dcp.async_save(state, checkpoint_id=str(directory), process_group=process_group)
        # DCP's default stager copies to the host before returning, so the answer is the write's Future (an
        # AsyncSaveResponse only comes with a stager of one's own).
        assert isinstance(written, Future)
        return written
    dcp.save(state, checkpoint_id=str(directory), process_group=process_group)
    return None


def load(directory: str | Path, model, optimizer=None) -> None:
    """Restore `model` (and `optimizer`) in place from a checkpoint saved on any number of ranks; a collective."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state[MODEL])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[OPTIMIZER])


def full_state(model, optimizer=None) -> dict:
    """The whole (unsharded) state on rank 0's host ({MODEL: ..., OPTIMIZER: ...}); an empty dict per key on the
    other ranks. A collective: every rank gathers, only rank 0 keeps."""
    return _state(model, optimizer, StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_pretrained(model, folder: str | Path | None) -> Path | None:
    """The sharded model written by rank 0 as a Hugging Face folder (config, generation config, safetensors);
    the folder on rank 0, None elsewhere (where `folder` may be None). A collective."""
    full = full_state(model)[MODEL]
    if dist.get_rank() != 0:
        return None
    if folder is None:
        raise ValueError("export_pretrained: rank 0 needs the folder to write")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(full.values())).dtype)
    # Tied weights come back as two entries of the gathered state: load both, then tie them again as the
    # config says, so save_pretrained writes the one tensor it expects.
    unexpected = plain.load_state_dict(full, assign=True, strict=False).unexpected_keys
    plain.tie_weights()
    missing = {name for name, _ in plain.named_parameters()} - set(full)
    if missing or unexpected:
        raise RuntimeError(
            f"the gathered state does not fit {type(plain).__name__}: lacks {sorted(missing)}, "
            f"has unknown {sorted(unexpected)}"
        )
    plain.generation_config = model.generation_config
    _quiet_progress_bars()
    plain.save_pretrained(str(folder))
    return Path(folder)
