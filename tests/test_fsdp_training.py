"""training.strategy: fsdp in the running pipeline: Ray Train, 2 CPU workers (gloo), the tiny Llama pair.

One Ray session and three runs of one 20-step POCL plan (2 stages of 7 and 13 steps, dev set, checkpoint
selection): the same plan under ddp and under fsdp (student and teacher sharded), and an fsdp run killed
after its first checkpoint and re-run from its sharded checkpoint. The step-level algebra (one sharded
step = one unsharded step) is tests/test_sharding.py's, without Ray.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from training_helpers import (
    committed_checkpoints,
    expected_tokens,
    kill_after_a_checkpoint,
    read_metrics,
    run_config,
    write_scores,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# 300 rows in 2 buckets (pools of 150 and 300 rows), 24 rows a step: stages of 7 and 13 steps. Selection
# candidates at both stage ends; checkpoints at steps 7, 10 and 20. 16 new tokens score the dev responses.
SETTINGS = {
    "curriculum.num_buckets": 2,
    "training.global_batch_size": 24,
    "training.micro_batch_size": 4,
    "eval.max_new_tokens": 16,
}


@pytest.fixture(scope="module")
def runs(ray_local, tiny_assets, tmp_path_factory):
    """(scores, {strategy: (cfg, result)}) of the undisturbed ddp and fsdp runs."""
    from pocl_ray.training.driver import train

    root = tmp_path_factory.mktemp("fsdp")
    scores = write_scores(root, tiny_assets, num_buckets=2)
    results = {}
    for strategy in ("ddp", "fsdp"):
        cfg = run_config(tiny_assets, root / strategy, **SETTINGS, **{"training.strategy": strategy})
        results[strategy] = (cfg, train(cfg, scores))
    return scores, results


def test_fsdp_steps_equal_ddp_steps_on_the_same_data(runs):
    scores, results = runs
    (_, ddp), (fsdp_cfg, fsdp) = results["ddp"], results["fsdp"]
    a, b = read_metrics(ddp.metrics_path), read_metrics(fsdp.metrics_path)
    assert [r["step"] for r in b] == list(range(1, 21)) and fsdp.stages_completed == 2
    # The same rows in the same steps: every step's token counts are the plan's, under both strategies.
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a] == expected_tokens(fsdp_cfg, scores)
    assert [r["ce_tokens"] for r in b] == [r["ce_tokens"] for r in a]
    assert [(r["stage"], r["samples"], r["temperature"]) for r in b] == [
        (r["stage"], r["samples"], r["temperature"]) for r in a
    ]
    for x, y in zip(a, b):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x["step"])
    # Checkpoint selection ran in step on both workers: the same candidates, dev losses and ROUGE-L.
    selections = [json.loads(r.selection_path.read_text())["candidates"] for r in (ddp, fsdp)]
    assert [c["step"] for c in selections[1]] == [c["step"] for c in selections[0]] == [7, 20]
    for x, y in zip(*selections):
        assert y["dev_kd_loss"] == pytest.approx(x["dev_kd_loss"], rel=1e-4)
        assert y["dev_rougeL"] == pytest.approx(x["dev_rougeL"], abs=1.0)


def test_fsdp_students_are_exported_as_hugging_face_folders_equal_to_the_sharded_state(runs):
    from transformers import AutoModelForCausalLM

    from pocl_ray import sharded_checkpoint
    from pocl_ray.models import load_model

    _, results = runs
    _, fsdp = results["fsdp"]
    final = fsdp.checkpoint_path
    student = AutoModelForCausalLM.from_pretrained(fsdp.student_dir)
    assert (fsdp.student_dir / "tokenizer_config.json").is_file()
    # The final checkpoint's shards, gathered here into one unsharded model (DCP reads any world size).
    gathered = load_model(fsdp.student_dir, dtype=torch.float32)
    for p in gathered.parameters():
        torch.nn.init.zeros_(p)
    sharded_checkpoint.load(os.path.join(final, "student_shards"), gathered)
    state, reference = student.state_dict(), gathered.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    assert fsdp.best_student_dir is not None
    best = AutoModelForCausalLM.from_pretrained(fsdp.best_student_dir)
    assert type(best) is type(student)
    assert {n: p.shape for n, p in best.named_parameters()} == {n: p.shape for n, p in student.named_parameters()}


def test_killed_fsdp_run_resumes_from_its_sharded_checkpoint(runs, tmp_path):
    from pocl_ray.models import load_model
    from pocl_ray.training.driver import train

    scores, results = runs
    reference_cfg, undisturbed = results["fsdp"]
    cfg = reference_cfg.with_overrides({"output.dir": str(tmp_path / "run")})  # same name, seed and plan
    storage = tmp_path / "run" / "train" / "checkpoints" / cfg.name
    killed_at = kill_after_a_checkpoint(train, cfg, scores, storage)
    # Every worker wrote its shards into the one checkpoint (DCP: a file per rank and rank 0's metadata).
    first = storage / committed_checkpoints(storage)[0] / "student_shards"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in first.iterdir()}

    result = train(cfg, scores)  # same RunConfig name and storage: resumes from the sharded checkpoint
    resumed, reference = read_metrics(result.metrics_path), read_metrics(undisturbed.metrics_path)
    assert [(r["step"], r["stage"], r["tokens"]) for r in resumed] == [
        (r["step"], r["stage"], r["tokens"]) for r in reference
    ]
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), a["step"]
        assert a["lr"] == pytest.approx(b["lr"])
    before = [r["step"] for r in resumed if r["time"] < killed_at]
    assert before and before == list(range(1, len(before) + 1)) and before[-1] in (7, 10)
    assert all(r["time"] > killed_at for r in resumed[len(before) :]) and len(before) < len(resumed)
    # The steps after the checkpoint trained from the restored weights and AdamW state: the same losses
    # (above), and the same student at the end.
    finals = [load_model(r.student_dir, dtype=torch.float32).state_dict() for r in (result, undisturbed)]
    assert finals[0].keys() == finals[1].keys()
    for name, tensor in finals[1].items():
        torch.testing.assert_close(finals[0][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
