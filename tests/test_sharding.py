"""FSDP2 sharding (pocl_ray/sharding.py, pocl_ray/sharded_checkpoint.py) on 2 gloo processes on the CPU, no Ray:
one sharded step's gradients against one process's on the same global batch, sharded checkpoints saved on 2
ranks and loaded on 2 and on 1, the exported HF folder, and generation with very different lengths per rank.

The workers live in tests/sharding_workers.py; each spawn fails the test when a rank raises or when the ranks
are not done within its timeout (a rank stuck in a collective is killed)."""

from __future__ import annotations

import pytest
import sharding_workers as workers
import torch

from pocl_ray.config import ConfigError
from pocl_ray.sharding import check_shardable, shard_model

# The step's losses: FKL and JS at T = 2 on the output distribution, a hidden-matching stage, an on-policy
# stage (responses sampled by the sharded student); tied and untied heads; gradient checkpointing and CPU
# offload once each.
GRADIENT_CASES = [
    {"name": "fkl, untied", "kind": "fkl", "temperature": 1.0, "target": "logits", "tied": False},
    {"name": "js T=2, tied, checkpointing", "kind": "js", "temperature": 2.0, "target": "logits", "tied": True,
     "checkpointing": True},
    {"name": "hidden matching, untied", "kind": "fkl", "temperature": 1.0, "target": "hidden", "tied": False},
    {"name": "on-policy fkl, tied", "kind": "fkl", "temperature": 1.0, "target": "logits", "tied": True,
     "on_policy": True},
    {"name": "js T=2, untied, cpu offload", "kind": "js", "temperature": 2.0, "target": "logits", "tied": False,
     "cpu_offload": True},
]  # fmt: skip


@pytest.mark.slow  # spawns gloo processes: minutes on 2 cores, kept out of make test-fast
def test_sharded_step_gradients_equal_single_process(tmp_path):
    workers.spawn(workers.gradient_worker, 2, str(tmp_path), GRADIENT_CASES, timeout=420)
    results = torch.load(tmp_path / "gradients.pt")
    assert sorted(results) == sorted(c["name"] for c in GRADIENT_CASES)
    for case in GRADIENT_CASES:
        result = results[case["name"]]
        assert result["parameters"], case["name"]  # the same parameter names on both sides
        assert result["tied"] == case["tied"], case["name"]  # sharding and loading kept the tie (or none)
        assert result["head_grad_norm"] > 0, case["name"]  # the head is trained through the chunked loss
        assert result["max_relative_error"] <= 1e-5, (case["name"], result)


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_checkpoints")
    workers.spawn(workers.checkpoint_save_worker, 2, str(out), timeout=300)
    return out


@pytest.mark.slow  # spawns gloo processes: minutes on 2 cores, kept out of make test-fast
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_checkpoint_saved_on_two_loads_on_two(saved_on_two, tied):
    saved = torch.load(saved_on_two / ("tied" if tied else "untied") / "saved_on_2.pt")
    assert saved["reference"]["optimizer"]["state"]  # a trained optimizer: its moments are in the check
    assert workers.differences(saved["loaded"], saved["reference"]) == []


@pytest.mark.slow  # spawns gloo processes: minutes on 2 cores, kept out of make test-fast
def test_checkpoint_saved_on_two_loads_on_one(saved_on_two):
    workers.spawn(workers.checkpoint_load_worker, 1, str(saved_on_two), timeout=300)
    for tied in ("untied", "tied"):
        reference = torch.load(saved_on_two / tied / "saved_on_2.pt")["reference"]
        assert workers.differences(torch.load(saved_on_two / tied / "loaded_on_1.pt"), reference) == [], tied


@pytest.mark.slow  # spawns gloo processes: minutes on 2 cores, kept out of make test-fast
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exported_folder_loads_with_from_pretrained(saved_on_two, tied):
    from transformers import AutoModelForCausalLM

    folder = saved_on_two / ("tied" if tied else "untied")
    reference = torch.load(folder / "saved_on_2.pt")["reference"]["model"]
    model = AutoModelForCausalLM.from_pretrained(folder / "export")
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    assert workers.differences(dict(state), reference) == []
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


@pytest.mark.slow  # spawns gloo processes: minutes on 2 cores, kept out of make test-fast
def test_generation_of_very_different_lengths_stays_in_step(tmp_path):
    workers.spawn(workers.generation_worker, 2, str(tmp_path), True, timeout=300)
    for rank, lengths in ((0, [[1]]), (1, [[16, 16]] * 2)):
        result = torch.load(tmp_path / f"tokens_{rank}.pt")
        assert [[len(row) for row in batch] for batch in result["tokens"]] == lengths
        assert result["tokens"] == result["single"]  # the sharded model generates what the whole one does


@pytest.mark.slow  # spawns gloo processes: minutes on 2 cores, kept out of make test-fast
def test_generation_without_lockstep_hangs_and_is_stopped(tmp_path):
    # The control of the test above: the same ranks without in_lockstep wait for each other for ever. Rank 0
    # got through its own batch, rank 1 never through its second: a hang, not a slow start.
    with pytest.raises(workers.Hung):
        workers.spawn(workers.generation_worker, 2, str(tmp_path), False, timeout=90)
    assert (tmp_path / "generated_0").exists() and not (tmp_path / "generated_1").exists()


def test_model_without_decoder_layers_is_an_error_naming_its_class(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    # OPT keeps its layers at model.decoder.layers, where the sharding does not look.
    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32)
    config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"models\.student: .*OPTForCausalLM"):
        check_shardable(tmp_path, "models.student")
    with pytest.raises(ValueError, match="OPTForCausalLM"):
        shard_model(OPTForCausalLM(config), device=torch.device("cpu"), trainable=True)


def test_fsdp_settings_without_the_fsdp_strategy_are_config_errors_naming_the_field():
    from pocl_ray.config import parse_config

    minimal = {"data": {"train": "data/train.jsonl"}, "models": {"teacher": "models/teacher"}}
    with pytest.raises(ConfigError, match=r"training\.fsdp configures training\.strategy: fsdp"):
        parse_config({**minimal, "training": {"fsdp": {"cpu_offload": True}}})
    with pytest.raises(ConfigError, match=r"training\.teacher_sharding: fsdp needs training\.strategy: fsdp"):
        parse_config({**minimal, "training": {"teacher_sharding": "fsdp"}})
    with pytest.raises(ConfigError, match=r"training\.strategy:"):
        parse_config({**minimal, "training": {"strategy": "zero3"}})
    # Until the training worker shards, asking for it is refused rather than silently run as ddp.
    with pytest.raises(ConfigError, match=r"training\.strategy: fsdp is not available yet"):
        parse_config({**minimal, "training": {"strategy": "fsdp", "fsdp": {"cpu_offload": True}}})
