"""Pure curriculum tests: plan builders, schedules, LR, budgets, pools, and the coordinator's logic.

The epoch order and worker shards are tested in test_shards.py."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from pocl_ray import storage
from pocl_ray.config import parse_config
from pocl_ray.coordinator import CurriculumCoordinator
from pocl_ray.curriculum import (
    Plan,
    Stage,
    baseline_plan,
    extraction_plan,
    lr_at,
    plan_from_config,
    pocl_plan,
    pool_ranges,
    progressive_plan,
    schedule,
    sft_plan,
    stage_specs,
    uniform_layer_map,
    with_data_curriculum,
)


def _cfg(**curriculum):
    return parse_config(
        {
            "data": {"train": "x.jsonl"},
            "models": {"teacher": "t"},
            "curriculum": curriculum,
        }
    )


# -- plans and schedules -------------------------------------------------------------------------


def test_pocl_plan_paper_defaults():
    plan = pocl_plan()
    assert [s.buckets for s in plan.stages] == [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert [round(s.temperature, 6) for s in plan.stages] == [1.0, 1.333333, 1.666667, 2.0]
    assert [round(s.kd_weight, 6) for s in plan.stages] == [0.7, 0.8, 0.9, 1.0]
    assert all(s.epochs == 8.0 and s.steps is None and s.restart_optimizer for s in plan.stages)

    # 8 epochs x (1/4 + 2/4 + 3/4 + 1) = 20 full-data epochs, the baseline's budget.
    def rows_seen(p):
        return sum(s.epochs * 25 * len(s.buckets) for s in p.stages)

    assert rows_seen(plan) == 20 * 100 == rows_seen(baseline_plan())


def test_schedule_boundaries():
    assert schedule(1.0, 2.0, 1) == [2.0]
    assert schedule(1.0, 2.0, 2) == [1.0, 2.0]
    assert schedule(0.7, 1.0, 4, "constant") == [0.7] * 4
    cos = schedule(0.0, 1.0, 3, "cosine")
    assert cos[0] == 0.0 and cos[-1] == 1.0 and cos[1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one stage"):
        schedule(1, 2, 0)


def test_lr_at_cosine_endpoints_and_warmup():
    assert lr_at(0, 10, 1e-4, 1e-7) == pytest.approx(1e-4)
    assert lr_at(9, 10, 1e-4, 1e-7) == pytest.approx(1e-7)
    assert lr_at(4.5, 10, 1e-4, 1e-7) == pytest.approx((1e-4 + 1e-7) / 2)
    assert lr_at(0, 10, 1e-4, 0.0, warmup_steps=2) == pytest.approx(5e-5)
    assert lr_at(2, 10, 1e-4, 0.0, warmup_steps=2) == pytest.approx(1e-4)
    values = [lr_at(s, 20, 1e-4, 1e-7) for s in range(20)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(0, 1, 1e-4, 1e-7) == pytest.approx(1e-4)  # a one-step segment trains at the peak LR


@pytest.mark.parametrize(
    ("total", "warmup", "min_lr"), [(20, 0, 1e-7), (20, 5, 0.0), (37, 3, 2e-6), (1, 0, 1e-7), (6, 5, 1e-7)]
)
def test_lr_at_is_the_transformers_cosine_with_min_lr(total, warmup, min_lr):
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    lr = 3e-4
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=total - 1, min_lr=min_lr
    )
    library = []
    for _ in range(total + 1):
        library.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # lr_at's warm-up is the library's one step ahead (no step at lr 0); from the warm-up's end on they agree.
    expected = [library[step + 1] if step < warmup else library[step] for step in range(total)]
    assert [lr_at(step, total, lr, min_lr, warmup) for step in range(total)] == pytest.approx(
        expected, rel=1e-12, abs=1e-18
    )


def test_baseline_and_sft_budgets():
    assert baseline_plan(4, steps_per_stage=10).stages[0].steps == 40
    assert baseline_plan(4, epochs_per_stage=2).stages[0].epochs == 5.0
    assert baseline_plan(steps=7).stages[0].steps == 7
    sft = sft_plan(num_buckets=4, steps_per_stage=5)
    assert sft.name == "sft" and sft.stages[0].kd_weight == 0.0 and sft.stages[0].buckets == (0, 1, 2, 3)


def test_extraction_and_progressive_plans():
    teacher, student = uniform_layer_map(4, 2)
    assert (teacher, student) == ([1, 2, 3, 4], [1, 1, 2, 2])
    plan = extraction_plan(teacher, student, steps_per_layer=3, final_steps=5)
    assert [s.target for s in plan.stages] == ["hidden"] * 4 + ["logits"]
    assert [s.teacher_layer for s in plan.stages[:4]] == [1, 2, 3, 4]
    assert [s.steps for s in plan.stages] == [3, 3, 3, 3, 5]
    prog = progressive_plan(["a", "b"], 4)
    assert [s.teacher for s in prog.stages] == ["a", "b"] and not prog.stages[1].restart_optimizer
    mixed = with_data_curriculum(plan, pocl_plan(2, steps_per_stage=1))
    assert [s.buckets for s in mixed.stages] == [(0,), (0,), (0, 1), (0, 1), (0, 1)]
    assert [(s.target, s.steps) for s in mixed.stages] == [(s.target, s.steps) for s in plan.stages]


@pytest.mark.parametrize("num_target,num_data", [(2, 4), (3, 4), (4, 4), (5, 4), (31, 4), (1, 3)])
def test_data_curriculum_pools_grow_and_end_on_all_data(num_target, num_data):
    # Fewer target stages than buckets included: the last stage must still see the hardest bucket.
    target = progressive_plan([f"ck{i}" for i in range(num_target)], 3)
    pools = [s.buckets for s in with_data_curriculum(target, pocl_plan(num_data)).stages]
    assert pools[-1] == tuple(range(num_data))
    assert all(set(a) <= set(b) for a, b in itertools.pairwise(pools))
    assert all(p == tuple(range(len(p))) for p in pools)  # always the easiest buckets first
    if num_target >= num_data:  # enough stages: every POCL pool is used, from bucket 0 alone
        assert sorted(set(pools)) == [tuple(range(k + 1)) for k in range(num_data)]


def test_plan_from_config():
    plan = plan_from_config(_cfg(num_buckets=3, steps_per_stage=7, advance="plateau", patience=4))
    assert plan.name == "pocl" and len(plan.stages) == 3
    assert all(s.steps == 7 and s.epochs is None and s.until_plateau and s.patience == 4 for s in plan.stages)
    base = plan_from_config(_cfg(plan="baseline", num_buckets=4, epochs_per_stage=2))
    assert base.stages[0].epochs == 5.0 and base.stages[0].kd_weight == 0.7
    ext = plan_from_config(_cfg(plan="extraction", extraction={"steps_per_layer": 2, "final_steps": 3}), 4, 2)
    assert [s.student_layer for s in ext.stages[:4]] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="layer counts"):
        plan_from_config(_cfg(plan="extraction"))
    with pytest.raises(ValueError, match="layer_map has 1 entries"):
        plan_from_config(_cfg(plan="extraction", extraction={"layer_map": [1]}), 4, 2)


def test_output_kd_stages_use_their_own_settings_not_pocls_end_values():
    pocl_end = {"temperature_end": 3.0, "kd_weight_end": 0.9}
    ext = plan_from_config(_cfg(plan="extraction", **pocl_end), 2, 2)
    prog = plan_from_config(_cfg(plan="progressive", progressive={"teacher_checkpoints": ["a"]}, **pocl_end))
    for stage in (ext.stages[-1], *prog.stages):
        assert (stage.target, stage.temperature, stage.kd_weight) == ("logits", 1.0, 1.0)
    own = {"output_kd": {"temperature": 1.5, "kd_weight": 0.6}, **pocl_end}
    ext = plan_from_config(_cfg(plan="extraction", **own), 2, 2)
    assert (ext.stages[-1].temperature, ext.stages[-1].kd_weight) == (1.5, 0.6)
    assert all(s.kd_weight == 1.0 and s.target == "hidden" for s in ext.stages[:-1])  # matching alone
    prog = plan_from_config(_cfg(plan="progressive", progressive={"teacher_checkpoints": ["a"]}, **own))
    assert [(s.temperature, s.kd_weight) for s in prog.stages] == [(1.5, 0.6)] * 2


def test_progressive_plan_from_config_ends_on_the_final_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "t", "./t" and tmp_path/"t" are the same folder
    checkpoints = {"teacher_checkpoints": ["ck/100", "ck/200"], "steps_per_checkpoint": 5}
    plan = plan_from_config(_cfg(plan="progressive", progressive=checkpoints))
    # None is the run's teacher (models.teacher = "t"): the final teacher comes last.
    assert [(s.teacher, s.steps) for s in plan.stages] == [("ck/100", 5), ("ck/200", 5), (None, 5)]
    plan = plan_from_config(_cfg(plan="progressive", progressive={**checkpoints, "final_steps": 40}))
    assert [s.steps for s in plan.stages] == [5, 5, 40]
    for last in ("t", "./t", str(tmp_path / "t")):
        ends = {**checkpoints, "teacher_checkpoints": ["ck/100", last]}
        plan = plan_from_config(_cfg(plan="progressive", progressive=ends))
        assert [s.teacher for s in plan.stages] == ["ck/100", last]


@pytest.mark.parametrize("plan_kind", ["extraction", "progressive"])
def test_data_curriculum_pocl_gives_the_target_stages_pocls_pools(plan_kind):
    curriculum = {
        "plan": plan_kind,
        "num_buckets": 3,
        "data_curriculum": "pocl",
        "progressive": {"teacher_checkpoints": ["a", "b", "c", "d"]},
        "extraction": {"steps_per_layer": 2, "final_steps": 9},
    }
    plan = plan_from_config(_cfg(**curriculum), 4, 2)
    alone = plan_from_config(_cfg(**{**curriculum, "data_curriculum": "none"}), 4, 2)
    assert (plan.num_buckets, alone.num_buckets) == (3, 1)
    assert alone.stages[0].buckets == (0,) and len(plan.stages) == len(alone.stages) == 5
    # Easy -> hard pools, all data at the end; targets, teachers and lengths are the plan's own.
    assert [s.buckets for s in plan.stages] == [(0,), (0, 1), (0, 1), (0, 1, 2), (0, 1, 2)]
    assert [replace(s, buckets=(0,)) for s in plan.stages] == list(alone.stages)


def test_stage_and_plan_validation():
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        Stage(index=0, buckets=(0,))
    with pytest.raises(ValueError, match="outside 0..0"):
        Plan("p", 1, (Stage(index=0, buckets=(1,), steps=1),))
    plan = pocl_plan(3, steps_per_stage=2)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# -- pools, lengths, LR segments -------------------------------------------------------------------


@pytest.mark.parametrize("num_rows,num_buckets", [(10, 4), (300, 4), (7, 7), (101, 3)])
def test_pocl_pools_grow_by_one_bucket(num_rows, num_buckets):
    specs = stage_specs(pocl_plan(num_buckets, epochs_per_stage=1), num_rows, 4)
    for s, spec in enumerate(specs):
        # Stage s holds buckets 0..s: the rank range [0, ceil((s+1) M / N)).
        assert spec.pool_ranges == ((0, -(-(s + 1) * num_rows // num_buckets)),)
        assert spec.pool_rows == math.ceil((s + 1) * num_rows / num_buckets)
        assert spec.steps == spec.steps_per_epoch == math.ceil(spec.pool_rows / 4)
    assert specs[-1].pool_rows == num_rows


def test_pool_ranges_merge_and_split():
    assert pool_ranges((0, 1, 3), 8, 4) == ((0, 4), (6, 8))
    assert pool_ranges((2, 0), 9, 3) == ((0, 3), (6, 9))
    with pytest.raises(ValueError, match="cuts 5 buckets from only 4"):
        stage_specs(pocl_plan(5, steps_per_stage=1), 4, 2)


def test_stage_lengths_and_lr_segments():
    plan = Plan(
        "p",
        2,
        (
            Stage(index=0, buckets=(0,), epochs=2.5),
            Stage(index=1, buckets=(0, 1), steps=3, restart_optimizer=False),
            Stage(index=2, buckets=(0, 1), epochs=1.0),
        ),
    )
    specs = stage_specs(plan, 20, 4)  # pools 10 and 20 rows -> 3 and 5 steps per epoch
    assert [s.steps_per_epoch for s in specs] == [3, 5, 5]
    assert [s.steps for s in specs] == [8, 3, 5]  # ceil(2.5 x 3) = 8
    # Stage 1 keeps stage 0's optimizer, so both share one cosine of 11 steps; stage 2 restarts.
    assert [(s.lr_offset, s.lr_total) for s in specs] == [(0, 11), (8, 11), (0, 5)]


# -- the coordinator's logic, without Ray --------------------------------------------------------------


def _coordinator(tmp_path, plan=None, **kw):
    plan = plan or pocl_plan(4, epochs_per_stage=2, until_plateau=True, patience=2)
    args = {
        "num_rows": 40,
        "global_batch": 4,
        "micro_batch": 2,
        "seed": 5,
        "metrics_path": storage.join(tmp_path, "m.jsonl"),
        "world_size": 2,
        "row_group_bounds": [0, 8, 16, 24, 32, 40],
    }
    return CurriculumCoordinator(plan.to_dict(), **{**args, **kw})


def test_coordinator_shards_are_disjoint_and_cover_each_pool(tmp_path):
    c = _coordinator(tmp_path)
    for stage in range(4):
        spec = c.stage(stage)
        lo, hi = spec.pool_ranges[0]
        for epoch in range(2):
            parts = [c.shard(stage, epoch, r) for r in range(2)]
            ranks = [p.ranks for p in parts]
            assert not set(ranks[0]) & set(ranks[1])
            assert sorted(np.concatenate(ranks)) == list(range(lo, hi))


@pytest.mark.parametrize("store", ["local", "s3"])
def test_coordinator_state_roundtrip_and_metrics_truncation(tmp_path, request, store):
    """metrics.jsonl in a local folder (appended as records come) or in a bucket (an object store cannot
    append: rewritten whole at each checkpoint and at close); either way a restore cuts it back to the
    checkpoint's step."""
    root = tmp_path if store == "local" else request.getfixturevalue("s3").bucket()

    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in storage.read_text(storage.join(root, "m.jsonl")).splitlines()]

    c = _coordinator(root)
    assert c.restore(None)["position"] == {"stage": 0, "stage_step": 0, "step": 0, "samples": 0}
    c.log([{"step": 1, "stage": 0}, {"step": 2, "stage": 0}])
    assert steps() == ([1, 2] if store == "local" else [])
    state = c.checkpoint({"stage": 0, "stage_step": 3, "step": 3}, [{"step": 3, "stage": 0}])
    c.log([{"step": 4, "stage": 0}])
    assert steps() == ([1, 2, 3, 4] if store == "local" else [1, 2, 3])
    assert not c.report_eval(0, 1.0) and not c.report_eval(0, 1.5) and c.report_eval(0, 1.2)
    c.close()
    assert steps() == [1, 2, 3, 4]

    fresh = _coordinator(root)
    restored = fresh.restore(json.loads(json.dumps(state)))
    assert restored["position"] == {"stage": 0, "stage_step": 3, "step": 3}
    assert steps() == [1, 2, 3], "records after the checkpoint are dropped on restore"
    fresh.log([{"step": 4, "stage": 0}])
    fresh.close()
    assert steps() == [1, 2, 3, 4]
    # Plateau tracking restarts from the checkpoint's view: no evaluation had happened by then.
    assert not fresh.report_eval(0, 2.0)


def test_coordinator_refuses_a_checkpoint_of_another_run(tmp_path):
    state = _coordinator(tmp_path).restore(None)
    with pytest.raises(ValueError, match="different plan, global_batch"):
        _coordinator(tmp_path, plan=pocl_plan(2, epochs_per_stage=1), global_batch=8).restore(state)
    with pytest.raises(ValueError, match="different scores layout"):
        _coordinator(tmp_path, row_group_bounds=[0, 20, 40]).restore(state)
    # A checkpoint from before elastic training (state version 3) has no dealing history to continue from.
    with pytest.raises(ValueError, match="version 3, written by an older pocl-ray .*reads version 4"):
        _coordinator(tmp_path).restore({**state, "version": 3})


def _rows(shards, steps) -> list[int]:
    return [int(x) for s in shards for k in steps for m in s.step(k) for x in m]


def test_coordinator_continues_an_epoch_on_another_worker_count(tmp_path):
    """2 workers train 2 steps of stage 1's second epoch; a re-run resumes on 1 worker, trains a step,
    then Ray Train grows the group back to 2 after a failure: the epoch's pool is trained once."""
    first = _coordinator(tmp_path)
    first.restore(None, 2)
    spec = first.stage(1)
    per_epoch, pool = spec.steps_per_epoch, list(range(*spec.pool_ranges[0]))
    assert per_epoch >= 4 and len(spec.pool_ranges) == 1
    trained = _rows([first.shard(1, 1, r) for r in range(2)], range(2))
    state = first.checkpoint({"stage": 1, "stage_step": per_epoch + 2, "step": 20, "samples": 80}, [])

    second = _coordinator(tmp_path)  # a re-run: a new coordinator, the checkpoint on 1 worker
    restored = second.restore(json.loads(json.dumps(state)), 1)
    assert restored["resize"] == {
        **restored["resize"],
        **{"kind": "resize", "step": 20, "stage": 1, "workers_before": 2, "workers_after": 1, "cause": "resume"},
    }
    assert restored["dealing"] == {"stage": 1, "epoch": 1, "history": [(0, 2), (2, 1)]}
    trained += _rows([second.shard(1, 1, 0)], [2])
    started = restored["resize"]["since"]
    second.log([{"step": 21, "stage": 1, "time": started + 2.5}])
    resize, step = map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())
    assert resize["kind"] == "resize" and resize["seconds"] == pytest.approx(2.5) and step["step"] == 21
    state = second.checkpoint({"stage": 1, "stage_step": per_epoch + 3, "step": 21, "samples": 84}, [])

    second.failed(started + 10.0)  # the 1-worker group fails; Ray Train restarts it on 2
    regrown = second.restore(state, 2)["resize"]
    assert (regrown["cause"], regrown["since"], regrown["workers_after"]) == ("failure", started + 10.0, 2)
    assert second.state()["dealing"]["history"] == [(0, 2), (2, 1), (3, 2)]
    trained += _rows([second.shard(1, 1, r) for r in range(2)], range(3, per_epoch))
    assert sorted(trained) == pool, "the interrupted epoch's pool, each row once"
    # Once a step ran on 2, a restart on 2 changes nothing; the next epoch is a fresh 2-worker epoch.
    second.log([{"step": 22, "stage": 1, "time": started + 20.0}])
    assert second.restore(second.state(), 2)["resize"] is None
    assert second.state()["dealing"]["history"] == [(0, 2), (2, 1), (3, 2)]
    fresh = _coordinator(tmp_path)
    fresh.restore(None, 2)
    assert all(np.array_equal(second.shard(1, 2, r).ranks, fresh.shard(1, 2, r).ranks) for r in range(2))


def test_a_group_grown_back_before_its_next_checkpoint_is_recorded_and_replays_the_first_dealing(tmp_path):
    c = _coordinator(tmp_path)
    c.restore(None, 2)
    state = c.checkpoint({"stage": 1, "stage_step": 2, "step": 9, "samples": 36}, [])
    assert c.restore(state, 1)["resize"]["workers_after"] == 1  # a failure: 1 worker from the checkpoint on
    c.log([{"step": 10, "stage": 1, "time": 1.0}])
    # Grown back to 2 before a checkpoint on 1: the 2-worker checkpoint again, and its own dealing.
    grown = c.restore(state, 2)
    assert (grown["resize"]["workers_before"], grown["resize"]["workers_after"], grown["resize"]["step"]) == (1, 2, 9)
    assert grown["dealing"] is None
    assert [json.loads(line)["kind"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == ["resize"]


def test_plateau_resets_per_stage(tmp_path):
    c = _coordinator(tmp_path)
    assert [c.report_eval(0, x) for x in (3.0, 2.0, 2.5, 2.1)] == [False, False, False, True]
    assert [c.report_eval(1, x) for x in (5.0, 5.0)] == [False, False]
