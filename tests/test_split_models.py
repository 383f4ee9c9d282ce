"""A model split over N devices (models.split_device_map, models.load_model_split): the placement for N devices,
and the outputs of a tiny model split over N "devices" that are all the CPU.

The CPU "devices": a map whose entries are all "cpu" is one device to transformers (it moves the model whole,
no hooks), so the test names the CPU twice over, as "cpu" and as torch.device("cpu"): two map values, so
transformers dispatches the model with accelerate's per-module hooks, the multi-device path, which hand the
activations from module to module (accelerate takes the modules mapped to the string "cpu" as offloaded to
the host and brings their weights in at each forward). What the CPU cannot show: the per-GPU memory, and
activations copied between two real GPUs.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.accelerate import compute_module_sizes, expand_device_map

from pocl_ray.models import build_tiny_model, load_model, load_model_split, split_device_map

LAYERS = 6


def tiny(tied: bool, save_dir=None):
    return build_tiny_model(
        "llama", 512, hidden_size=64, num_layers=LAYERS, num_heads=4, tie_embeddings=tied, save_dir=save_dir
    )


def headroom_cap(model, n: int) -> int:
    """An even share of the weights plus room for two decoder layers (the slack a balanced split needs)."""
    sizes = compute_module_sizes(model)[0]
    return sizes[""] // n + 2 * sizes["model.layers.0"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_placement_over_n_devices(n, tied):
    model = tiny(tied)
    cap = headroom_cap(model, n)
    device_map, max_memory = split_device_map(model.config, n, cap, torch.float32)
    assert max_memory == dict.fromkeys(range(n), cap)
    params = dict(model.named_parameters(remove_duplicate=False))
    where = expand_device_map(device_map, list(params))
    assert set(where.values()) == set(range(n))  # every parameter on one of the N devices, each device used
    held = dict.fromkeys(range(n), 0)
    for name, param in model.named_parameters():  # a tied weight counted once
        held[where[name]] += param.numel() * param.element_size()
    assert all(bytes_ <= cap for bytes_ in held.values()), held
    layer_devices = []
    for i in range(LAYERS):
        devices = {d for name, d in where.items() if name.startswith(f"model.layers.{i}.")}
        assert len(devices) == 1  # a decoder layer is never split
        layer_devices.append(devices.pop())
    assert layer_devices == sorted(layer_devices)  # layers in order: activations only move forward
    assert where["model.embed_tokens.weight"] == 0  # the inputs' device
    assert where["model.norm.weight"] == layer_devices[-1]
    if tied:
        assert where["lm_head.weight"] == where["model.embed_tokens.weight"]
    else:
        assert where["lm_head.weight"] == layer_devices[-1]


def test_a_model_that_does_not_fit_is_an_error_with_its_size():
    model = tiny(False)
    total = compute_module_sizes(model)[0][""]
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(.* MiB of weights.*\) does not fit 2 devices"):
        split_device_map(model.config, 2, total // 3, torch.float32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_split_model_outputs_equal_the_whole_model(tmp_path, tied):
    model = tiny(tied, save_dir=tmp_path)
    cap = headroom_cap(model, 3)
    devices = ["cpu", torch.device("cpu"), "cpu"]
    split = load_model_split(tmp_path, devices, cap, dtype=torch.float32)
    whole = load_model(tmp_path, dtype=torch.float32, frozen=True)
    placement, _ = split_device_map(model.config, 3, cap, torch.float32)
    assert set(placement.values()) == {0, 1, 2}
    assert split.hf_device_map == {name: devices[i] for name, i in placement.items()}  # dispatched per module
    assert hasattr(split.model.layers[LAYERS - 1], "_hf_hook")  # accelerate's hooks carry the activations
    ids = torch.randint(2, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        torch.testing.assert_close(split(ids, attention_mask=mask).logits, whole(ids, attention_mask=mask).logits)
    assert not any(p.requires_grad for p in split.parameters()) and not split.training
