"""training.strategy: fsdp in the running pipeline: Ray Train, 2 CPU workers (gloo), the tiny Llama pair.

One Ray session and runs of one 20-step POCL plan (2 stages of 7 and 13 steps, dev set, checkpoint
selection): the plan under ddp (the reference) and, under fsdp (student and teacher sharded), a run
killed after its mid-stage checkpoint (step 10), re-run from its sharded checkpoint on 2 workers and, from
a copy of it, on 1 worker. The killed and re-run fsdp run is the one compared with the ddp run: its steps
1-10 (first attempt) and 11-20 (after the resume) must each be the ddp run's, so it checks fsdp = ddp and
the exact resume at once (an undisturbed fsdp run beside it was one more Ray Train run). The step-level
algebra (one sharded step = one unsharded step) is tests/test_sharding.py's, without Ray.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import (
    expected_tokens,
    kill_after_a_checkpoint,
    planned_steps,
    read_metrics,
    read_resizes,
    rows_per_epoch,
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
def ddp_run(ray_local, tiny_assets, tmp_path_factory):
    """(scores, cfg, result) of the undisturbed ddp run."""
    from pocl_ray.training.driver import train

    root = tmp_path_factory.mktemp("ddp")
    scores = write_scores(root, tiny_assets, num_buckets=2)
    cfg = run_config(tiny_assets, root / "run", **SETTINGS, **{"training.strategy": "ddp"})
    return scores, cfg, train(cfg, scores)


@pytest.fixture(scope="module")
def fsdp_run(ddp_run, killed):
    """(cfg, result) of the fsdp run: the killed run (`killed`) re-run on 2 workers with the same RunConfig
    name and storage, so it resumes from its sharded step-10 checkpoint. The fsdp = ddp claims and the
    exact-resume claims both read it."""
    from pocl_ray.training.driver import train

    scores, _, _ = ddp_run
    cfg, _, _ = killed
    return cfg, train(cfg, scores)


def test_fsdp_steps_equal_ddp_steps_on_the_same_data(ddp_run, fsdp_run):
    scores, _, ddp = ddp_run
    fsdp_cfg, fsdp = fsdp_run
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


def test_fsdp_students_are_exported_as_hugging_face_folders_equal_to_the_sharded_state(fsdp_run):
    from transformers import AutoModelForCausalLM

    from pocl_ray import sharded_checkpoint
    from pocl_ray.models import load_model

    _, fsdp = fsdp_run
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


@pytest.fixture(scope="module")
def killed(ddp_run, tmp_path_factory):
    """(run config, time of the kill, a copy of the run's output as the kill left it): an fsdp run of the
    plan killed once its checkpoint at step 10 is committed. Stage 1 began at step 8 with a fresh AdamW,
    so a resume from there must restore the AdamW shards as well as the student's, mid-epoch."""
    from pocl_ray.training.driver import train

    scores, ddp_cfg, _ = ddp_run
    root = tmp_path_factory.mktemp("killed")
    # Same name, seed and plan as the ddp run.
    cfg = ddp_cfg.with_overrides({"output.dir": str(root / "run"), "training.strategy": "fsdp"})
    storage = root / "run" / "train" / "checkpoints" / cfg.name
    killed_at = kill_after_a_checkpoint(train, cfg, scores, storage, at=CHECKPOINT)
    # Every worker wrote its shards into the one checkpoint (DCP: a file per rank and rank 0's metadata).
    shards = storage / CHECKPOINT / "student_shards"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in shards.iterdir()}
    shutil.copytree(root / "run", root / "copy")  # for the 1-worker resume, before the 2-worker one moves on
    return cfg, killed_at, root / "copy"


CHECKPOINT = "step_00000010"


def test_killed_fsdp_run_resumes_from_its_sharded_checkpoint(ddp_run, killed, fsdp_run):
    from pocl_ray.models import load_model

    _, _, undisturbed = ddp_run
    _, killed_at, _ = killed
    _, result = fsdp_run
    resumed, reference = read_metrics(result.metrics_path), read_metrics(undisturbed.metrics_path)
    assert [(r["step"], r["stage"], r["tokens"]) for r in resumed] == [
        (r["step"], r["stage"], r["tokens"]) for r in reference
    ]
    before = [r["step"] for r in resumed if r["time"] < killed_at]
    assert before == list(range(1, 11)), "resumed from the checkpoint at step 10"
    assert all(r["time"] > killed_at for r in resumed[10:])
    # Steps 11-20 trained from the restored student and AdamW shards: the same losses, gradient norms and
    # learning rates as the undisturbed (ddp) run, and the same student at the end.
    for a, b in zip(resumed, reference):
        for key in ("loss", "kd_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])
        assert a["lr"] == pytest.approx(b["lr"])
    finals = [load_model(r.student_dir, dtype=torch.float32).state_dict() for r in (result, undisturbed)]
    assert finals[0].keys() == finals[1].keys()
    for name, tensor in finals[1].items():
        torch.testing.assert_close(finals[0][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_two_worker_fsdp_checkpoint_resumes_on_one_worker_and_completes_its_epoch(ddp_run, killed, tiny_assets):
    """The killed run's copy re-run with training.num_workers: 1: DCP re-shards the 2 workers' shards to
    one; its first step's loss is the one the checkpoint's weights give on that step's rows (computed here,
    unsharded); the rest of stage 1's only epoch is re-dealt to 1 worker, each row once; the plan goes on."""
    import pyarrow.parquet as pq

    from pocl_ray.curriculum import plan_from_config, stage_specs
    from pocl_ray.training.driver import train

    scores, _, _ = ddp_run
    cfg, killed_at, copy = killed
    num_rows = pq.read_metadata(scores / "rows.parquet").num_rows
    specs = stage_specs(plan_from_config(cfg), num_rows, cfg.training.global_batch_size)
    expected_loss = _step_11_loss(cfg, scores, copy, specs[1].stage, tiny_assets)
    result = train(cfg.with_overrides({"output.dir": str(copy), "training.num_workers": 1}), scores)
    records, [resize] = read_metrics(result.metrics_path), read_resizes(result.metrics_path)
    assert (resize["workers_before"], resize["workers_after"], resize["step"], resize["stage"]) == (2, 1, 10, 1)
    assert resize["cause"] == "resume"
    assert [r["step"] for r in records] == list(range(1, 21)) and result.stages_completed == 2
    assert all(r["time"] < killed_at for r in records[:10]) and all(r["time"] > killed_at for r in records[10:])
    assert [r["tokens"] for r in records] == expected_tokens(cfg, scores, resizes=[resize])
    assert all(math.isfinite(r["loss"]) for r in records)
    # Stage 1's only epoch as the run dealt it: 3 of its steps on 2 workers, the rest on 1; its pool, once.
    dealing = json.loads((Path(result.checkpoint_path) / "coordinator.json").read_text())["dealing"]
    assert dealing == {"stage": 1, "epoch": 0, "history": [[0, 2], [3, 1]]}
    for (stage, _), ranks in rows_per_epoch(cfg, scores, [resize]).items():
        assert ranks == list(range(*specs[stage].pool_ranges[0])), stage
    # The weights after the load are the checkpoint's: its shards, gathered here, give step 11's loss.
    assert records[10]["loss"] == pytest.approx(expected_loss, rel=1e-4)


def _step_11_loss(cfg, scores: Path, copy: Path, stage, assets) -> float:
    """Step 11's loss (the first after the resize to 1 worker), one process, unsharded: the student as the
    step-10 checkpoint's shards hold it (DCP reads them at any world size), on the rows the 1-worker
    dealing gives that step, as one batch (the loss is normalised by the step's token count)."""
    from pocl_ray import sharded_checkpoint
    from pocl_ray.models import load_model, load_tokenizer
    from pocl_ray.shards import ROW_COLUMNS, ScoresIndex, read_rows
    from pocl_ray.training.step import accumulate_gradients, build_batch
    from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher

    tokenizer = load_tokenizer(assets.tokenizer_dir)
    lm = load_model(assets.student_dir, dtype=torch.float32)
    for p in lm.parameters():
        torch.nn.init.zeros_(p)
    sharded_checkpoint.load(str(copy / "train" / "checkpoints" / cfg.name / CHECKPOINT / "student_shards"), lm)
    lm.train()
    teacher = OnlineTeacher(load_model(assets.teacher_dir, frozen=True), vocab_size=len(tokenizer))
    _, _, ranks = planned_steps(cfg, scores, resizes=[{"step": 10, "workers_after": 1}])[10]
    rows = read_rows(ScoresIndex(scores / "rows.parquet"), ranks, ROW_COLUMNS)
    batch = build_batch(rows, tokenizer.pad_token_id, torch.device("cpu"))
    values = accumulate_gradients(HiddenStatesLM(lm, vocab_size=len(tokenizer)), teacher, [batch], stage, cfg.kd)
    return float(values.loss)
