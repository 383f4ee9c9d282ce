"""A model split over N devices (models.split_device_map, models.load_model_split): the placement for N devices,
and the outputs of a tiny model split over N "devices" that are all the CPU, alone and inside the scoring and
evaluation actors' code (scoring.num_gpus_per_actor / eval.num_gpus_per_actor: N > 1, models.load_frozen).

The CPU "devices": a map whose entries are all "cpu" is one device to transformers (it moves the model whole,
no hooks), so the test names the CPU twice over, as "cpu" and as torch.device("cpu"): two map values, so
transformers dispatches the model with accelerate's per-module hooks, the multi-device path, which hand the
activations from module to module (accelerate takes the modules mapped to the string "cpu" as offloaded to
the host and brings their weights in at each forward). What the CPU cannot show: the per-GPU memory, and
activations copied between two real GPUs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.integrations.accelerate import compute_module_sizes, expand_device_map

from pocl_ray.models import actor_devices, build_tiny_model, load_model, load_model_split, split_device_map

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


# -- the inference actors (scoring.num_gpus_per_actor / eval.num_gpus_per_actor: N > 1) ------------

# Three "devices", all the CPU (module docstring); the first holds its weights (the middle one's are brought in
# at each forward), so the model's device is the CPU, as a split model's is its first GPU, and generate runs.
CPU_DEVICES = [torch.device("cpu"), "cpu", torch.device("cpu")]
METRICS = ["student_ce", "student_rougeL", "teacher_ce", "teacher_student_kl", "length"]


def test_a_scoring_actor_split_over_devices_measures_what_one_device_does(tiny_assets):
    """The measurer actor's models (the teacher, and the student cut from it) split over 3 devices give
    every metric of the whole models, the greedy student_rougeL included."""
    from conftest import synthetic_rows

    from pocl_ray.config import ModelsConfig
    from pocl_ray.data import validate_and_tokenize
    from pocl_ray.measurers import load_measurer_models, measure
    from pocl_ray.models import load_tokenizer

    models_cfg = ModelsConfig(teacher=str(tiny_assets.teacher_dir), dtype="float32")
    cap = headroom_cap(load_model(tiny_assets.teacher_dir), 3)
    whole = load_measurer_models(models_cfg, METRICS, "cpu")
    split = load_measurer_models(models_cfg, METRICS, "cpu", devices=CPU_DEVICES, max_memory=cap)
    assert split.teacher is not None and split.student is not None
    assert all(hasattr(layer, "_hf_hook") for layer in split.teacher.model.layers)  # dispatched per module
    assert all(hasattr(layer, "_hf_hook") for layer in split.student.model.layers)  # the cut keeps the placement
    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    good, _ = validate_and_tokenize(synthetic_rows(8, seed=5), tokenizer, tiny_assets.data_config())
    rows = {k: [r[k] for r in good] for k in good[0]}
    got, want = (measure(m, rows, METRICS, batch_size=3, max_new_tokens=6) for m in (split, whole))
    for metric in METRICS:
        np.testing.assert_allclose(got[metric], want[metric], rtol=1e-5, err_msg=metric)


def test_an_evaluation_actor_split_over_devices_generates_what_one_device_does(tiny_assets):
    from conftest import synthetic_rows

    from pocl_ray.config import DataConfig, EvalConfig
    from pocl_ray.data import prepare_batch
    from pocl_ray.evaluation import evaluate_rows
    from pocl_ray.models import load_frozen, load_tokenizer

    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    records = synthetic_rows(7, seed=6)
    columns = prepare_batch(
        {k: [r[k] for r in records] for k in records[0]},
        tokenizer,
        DataConfig(train="unused", max_prompt_length=64, max_length=96),
    )
    rows = [dict(zip(columns, values)) | {"set": "s"} for values in zip(*columns.values())]
    cfg = EvalConfig(seeds=[1, 2], temperature=1.0, max_new_tokens=8, batch_size=3)
    cap = headroom_cap(load_model(tiny_assets.teacher_dir), 3)
    split = load_frozen(tiny_assets.teacher_dir, dtype="float32", device="cpu", devices=CPU_DEVICES, max_memory=cap)
    whole = load_frozen(tiny_assets.teacher_dir, dtype="float32", device="cpu")
    assert hasattr(split.model.layers[-1], "_hf_hook") and not hasattr(whole.model.layers[-1], "_hf_hook")
    got, want = (evaluate_rows(m, tokenizer, rows, cfg) for m in (split, whole))
    assert [r["generations"] for r in got] == [r["generations"] for r in want]
    assert [r["ce"] for r in got] == pytest.approx([r["ce"] for r in want], rel=1e-5)


def test_an_actor_splits_over_all_its_gpus_and_says_when_it_sees_fewer():
    assert actor_devices(0) is None and actor_devices(0.5) is None and actor_devices(1) is None
    if torch.cuda.device_count() >= 2:
        assert actor_devices(2) == [0, 1]
    else:
        with pytest.raises(
            RuntimeError, match=rf"num_gpus_per_actor: 2, but this actor sees {torch.cuda.device_count()}"
        ):
            actor_devices(2)


def test_split_settings_are_config_errors_naming_the_field():
    from pocl_ray.config import ConfigError, parse_config

    base = {"name": "x", "data": {"train": "t.jsonl"}, "models": {"teacher": "t"}}
    cfg = parse_config({**base, "scoring": {"num_gpus_per_actor": 4, "max_memory_per_gpu": "40GiB"}})
    assert cfg.scoring.max_memory_per_gpu == 40 * 2**30 and cfg.eval.max_memory_per_gpu is None
    with pytest.raises(ConfigError, match=r"scoring.num_gpus_per_actor: more than 1 GPU per actor must be a whole"):
        parse_config({**base, "scoring": {"num_gpus_per_actor": 1.5}})
    with pytest.raises(ConfigError, match=r"eval: max_memory_per_gpu caps a model split .* num_gpus_per_actor > 1"):
        parse_config({**base, "eval": {"num_gpus_per_actor": 1, "max_memory_per_gpu": "4GiB"}})
    with pytest.raises(ConfigError, match=r"eval.max_memory_per_gpu: could not parse"):
        parse_config({**base, "eval": {"num_gpus_per_actor": 2, "max_memory_per_gpu": "lots"}})
