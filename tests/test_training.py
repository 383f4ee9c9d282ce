"""Training on Ray Train: 2 CPU workers (gloo), tiny Llama teacher/student, scores written here.

Ray runs are few and shared through module fixtures: one undisturbed POCL run (schedule, data,
loss, saved student, checkpoint selection), one run of its plan killed after a mid-epoch checkpoint and
re-run on 2 workers (exact resume, selection candidates kept) and, from a copy, on 1 worker (the epoch
re-dealt), one curriculum-extraction run with on-policy rows. The loss
algebra (3 workers on an uneven split of a global batch of 16 = 1 worker on the combined batch) is
checked with three gloo processes, without Ray.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from training_helpers import (
    expected_tokens,
    kill_after_a_checkpoint,
    read_metrics,
    read_probes,
    read_resizes,
    rows_per_epoch,
    run_config,
    write_scores,
)

from pocl_ray.config import ConfigError
from pocl_ray.curriculum import lr_at, plan_from_config, stage_specs
from pocl_ray.data import read_table, validate_and_tokenize
from pocl_ray.models import load_model, load_tokenizer
from pocl_ray.training.worker import scratch_folder

ray_test = pytest.mark.ray


def dev_fkl(model_dir, assets) -> float:
    """Forward KL(teacher || student) at T = 1 per response token on the dev rows."""
    from pocl_ray.data import collate
    from pocl_ray.losses import kd_loss

    tokenizer = load_tokenizer(assets.tokenizer_dir)
    good, _ = validate_and_tokenize(read_table(assets.dev_path).to_pylist(), tokenizer, assets.data_config())
    batch = collate(good, tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s = load_model(model_dir, frozen=True)(**inputs).logits
        t = load_model(assets.teacher_dir, frozen=True)(**inputs).logits
        return float(kd_loss("fkl", s, t, batch["labels"], scale_by_t2=False))


# -- checks before any Ray work ----------------------------------------------------------------


def test_missing_scores_is_a_clear_error(tiny_assets, tmp_path):
    from pocl_ray.training.driver import train

    with pytest.raises(FileNotFoundError, match=r"run `pocl-ray score` first: no scores at .*scores"):
        train(run_config(tiny_assets, tmp_path))


def test_bad_plans_fail_before_ray(tiny_assets, tmp_path):
    from pocl_ray.training.driver import train

    scores = write_scores(tmp_path, tiny_assets)
    with pytest.raises(ConfigError, match="curriculum.num_buckets: .*cuts 1000 buckets"):
        train(run_config(tiny_assets, tmp_path, **{"curriculum.num_buckets": 1000}), scores)
    with pytest.raises(ConfigError, match="'plateau' needs a dev set"):
        train(run_config(tiny_assets, tmp_path, **{"curriculum.advance": "plateau", "data.dev": None}), scores)
    with pytest.raises(ConfigError, match="student layer 9 .* outside 0..2"):
        train(
            run_config(
                tiny_assets,
                tmp_path,
                **{"curriculum.plan": "extraction", "curriculum.extraction.layer_map": [1, 1, 2, 9]},
            ),
            scores,
        )
    with pytest.raises(FileNotFoundError, match="models.student: model folder not found"):
        train(run_config(tiny_assets, tmp_path, **{"models.student": str(tmp_path / "nope")}), scores)
    assert not (tmp_path / "train").exists(), "nothing may be started or written before the checks pass"


# -- the undisturbed 2-worker POCL run ---------------------------------------------------------


@pytest.fixture(scope="module")
def pocl_run(ray_local, tiny_assets, tmp_path_factory):
    from pocl_ray.training.driver import train

    root = tmp_path_factory.mktemp("pocl")
    scores = write_scores(root, tiny_assets)
    # 4 stages of 5, 10, 15 and 19 steps: selection candidates at steps 5, 15, 20, 30, 40, 49. The
    # dev responses are at most 6 words, so 16 new tokens score them fully and keep selection cheap.
    cfg = run_config(tiny_assets, root / "run", **{"training.select_every": 20, "eval.max_new_tokens": 16})
    result = train(cfg, scores)
    return cfg, scores, result


@ray_test
def test_pocl_schedule_in_metrics(pocl_run):
    cfg, scores, result = pocl_run
    records = read_metrics(result.metrics_path)
    num_rows = pq.read_metadata(scores / "rows.parquet").num_rows
    plan = plan_from_config(cfg)
    specs = stage_specs(plan, num_rows, cfg.training.global_batch_size)
    assert [r["step"] for r in records] == list(range(1, sum(s.steps for s in specs) + 1))
    assert result.steps == len(records) and result.stages_completed == 4
    stages = [r["stage"] for r in records]
    assert stages == sorted(stages) and set(stages) == {0, 1, 2, 3}
    for s, spec in enumerate(specs):
        rows = [r for r in records if r["stage"] == s]
        assert len(rows) == spec.steps
        # Pools are 1/4, 2/4, 3/4 and all of the data (bucket bounds of the rank order).
        assert {r["pool_rows"] for r in rows} == {-(-(s + 1) * num_rows // 4)}
        assert all(r["temperature"] == pytest.approx(plan.stages[s].temperature) for r in rows)
        assert all(r["kd_weight"] == pytest.approx(plan.stages[s].kd_weight) for r in rows)
        assert rows[0]["lr"] == pytest.approx(cfg.training.lr)  # fresh cosine every stage
        assert rows[-1]["lr"] == pytest.approx(cfg.training.min_lr) or spec.steps == 1
        assert rows[-1]["epoch"] == 0
        for r in rows:
            assert r["loss"] == pytest.approx(
                (1 - r["kd_weight"]) * r["ce_loss"] + r["kd_weight"] * r["kd_loss"], rel=1e-5
            )
    assert {"loss", "kd_loss", "ce_loss", "lr", "tokens", "seconds", "cpu_seconds", "epoch"} <= set(records[0])
    # Samples seen: a global batch per step (an epoch's last step its remainder), one epoch per stage.
    samples = [r["samples"] for r in records]
    assert 0 < np.diff([0, *samples]).min() and np.diff([0, *samples]).max() == cfg.training.global_batch_size
    ends = np.cumsum([s.steps for s in specs])
    assert [samples[e - 1] for e in ends] == np.cumsum([s.pool_rows for s in specs]).tolist()


@ray_test
def test_pocl_steps_train_exactly_the_planned_rows(pocl_run):
    cfg, scores, result = pocl_run
    # Each step's global token count equals the planned rows' count: the two workers' shares were
    # disjoint and together the whole step, and every epoch covered its pool.
    assert [r["tokens"] for r in read_metrics(result.metrics_path)] == expected_tokens(cfg, scores)


@ray_test
def test_pocl_student_learns_and_reloads(pocl_run, tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, result = pocl_run
    model = AutoModelForCausalLM.from_pretrained(result.student_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.student_dir)
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == len(load_tokenizer(tiny_assets.tokenizer_dir))
    before, after = dev_fkl(tiny_assets.student_dir, tiny_assets), dev_fkl(result.student_dir, tiny_assets)
    assert after < 0.8 * before, (before, after)
    assert result.metrics["dev_kd_loss"] == pytest.approx(after, rel=1e-3)


# -- checkpoint selection --------------------------------------------------------------------------


@ray_test
def test_selection_candidates_and_the_kept_best_student(pocl_run, tiny_assets):
    from pocl_ray.evaluation import greedy_rouge_sum
    from pocl_ray.training.driver import selected_student

    cfg, scores, result = pocl_run
    specs = stage_specs(plan_from_config(cfg), pq.read_metadata(scores / "rows.parquet").num_rows, 16)
    ends = np.cumsum([s.steps for s in specs]).tolist()
    selection = json.loads(result.selection_path.read_text())
    candidates = selection["candidates"]
    assert (
        [c["step"] for c in candidates]
        == sorted(set(ends) | set(range(20, ends[-1] + 1, 20)))
        == [5, 15, 20, 30, 40, 49]
    )
    assert [c["stage"] for c in candidates] == [0, 1, 2, 2, 3, 3]
    # One epoch per stage: at a stage end every row of every pool so far has been seen once.
    assert [c["samples"] for c in candidates if c["step"] in ends] == np.cumsum([s.pool_rows for s in specs]).tolist()
    assert [c["samples"] for c in candidates if c["step"] == 20] == [75 + 150 + 5 * 16]
    assert all(0 <= c["dev_rougeL"] <= 100 for c in candidates)
    # The step records agree on samples seen; dev_loss (the stage's objective) is the checkpoint's.
    by_step = {r["step"]: r for r in read_metrics(result.metrics_path)}
    assert all(c["samples"] == by_step[c["step"]]["samples"] for c in candidates)
    assert candidates[-1]["dev_loss"] == pytest.approx(result.metrics["dev_loss"], rel=1e-6)
    assert all(c["dev_loss"] > 0 for c in candidates)
    best = max(candidates, key=lambda c: (c["dev_rougeL"], -c["dev_kd_loss"], c["step"]))
    assert selection["best"] == best and selection["final"] == candidates[-1]
    assert selection["protocol"]["decoding"] == "greedy"
    # The kept folders hold those candidates' weights: dev KD loss is FKL at T = 1 against the teacher.
    assert dev_fkl(result.best_student_dir, tiny_assets) == pytest.approx(best["dev_kd_loss"], rel=1e-3)
    assert dev_fkl(result.student_dir, tiny_assets) == pytest.approx(candidates[-1]["dev_kd_loss"], rel=1e-3)
    assert (result.best_student_dir / "tokenizer_config.json").is_file()
    # Dev ROUGE-L is the greedy ROUGE-L over all dev rows, however the workers split them. (This tiny
    # student answers with EOS, so it is 0 at every candidate and the dev KD loss breaks the tie;
    # `test_dev_rouge_is_the_mean_greedy_rouge_over_the_dev_rows` scores non-zero responses.)
    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    rows, _ = validate_and_tokenize(read_table(tiny_assets.dev_path).to_pylist(), tokenizer, cfg.data)
    total = greedy_rouge_sum(
        load_model(result.student_dir, frozen=True),
        tokenizer,
        rows,
        max_new_tokens=cfg.eval.max_new_tokens,
        max_length=cfg.data.max_length,
        batch_size=cfg.eval.batch_size,
    )
    assert total / len(rows) == pytest.approx(candidates[-1]["dev_rougeL"], abs=0.5)
    assert selected_student(result.output_dir, "best_dev_rougeL") == result.best_student_dir
    assert selected_student(result.output_dir, "final") == result.student_dir


def probe_fkl_and_ce(model_dir, assets, scores: Path, ranks: list[int]) -> tuple[float, float]:
    """Forward KL(teacher || student) at T = 1 and the student's CE per response token on the rows of `ranks`."""
    from pocl_ray.data import collate
    from pocl_ray.losses import cross_entropy, kd_loss

    table = pq.read_table(scores / "rows.parquet", columns=["rank", "input_ids", "labels"]).to_pylist()
    by_rank = {r["rank"]: r for r in table}
    rows = [{**by_rank[r], "attention_mask": [1] * len(by_rank[r]["input_ids"])} for r in ranks]
    batch = collate(rows, load_tokenizer(assets.tokenizer_dir).pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s = load_model(model_dir, frozen=True)(**inputs).logits
        t = load_model(assets.teacher_dir, frozen=True)(**inputs).logits
        fkl = kd_loss("fkl", s, t, batch["labels"], scale_by_t2=False)
        return float(fkl), float(cross_entropy(s, batch["labels"]))


@ray_test
def test_bucket_probe_at_every_stage_end_and_candidate_on_the_same_rows(pocl_run, tiny_assets):
    from pocl_ray.probes import probe_ranks

    cfg, scores, result = pocl_run
    num_rows = pq.read_metadata(scores / "rows.parquet").num_rows
    steps = {r["step"]: r for r in read_metrics(result.metrics_path)}
    at = {5: "stage_end", 15: "stage_end", 20: "candidate", 30: "stage_end", 40: "candidate", 49: "stage_end"}
    probes = read_probes(result.metrics_path)
    # One record per bucket at every stage end and candidate, in step order with the step records.
    assert [(p["step"], p["bucket"]) for p in probes] == [(s, b) for s in at for b in range(4)]
    lines = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in lines] == sorted(r["step"] for r in lines)
    for p in probes:
        assert p["at"] == at[p["step"]] and p["stage"] == steps[p["step"]]["stage"]
        assert p["samples"] == steps[p["step"]]["samples"]
        assert p["rows"] == cfg.output.bucket_probe_rows == 32 and p["tokens"] > 0
    # The same rows every time: the fixed, seeded draw from each bucket's ranks, written once.
    ranks = probe_ranks(num_rows, 4, 32)
    probe = json.loads((result.output_dir / "probe.json").read_text())
    assert [b["ranks"] for b in probe["buckets"]] == [r.tolist() for r in ranks]
    id_of = dict(zip(*pq.read_table(scores / "rows.parquet", columns=["rank", "id"]).to_pydict().values()))
    assert [b["ids"] for b in probe["buckets"]] == [[id_of[x] for x in r.tolist()] for r in ranks]
    # The numbers are the student's: at the run's end, FKL at T = 1 against the teacher and response CE
    # over each bucket's probe rows (both workers' shares together) of the final student.
    for p in probes[-4:]:
        fkl, ce = probe_fkl_and_ce(result.student_dir, tiny_assets, scores, ranks[p["bucket"]].tolist())
        assert p["kd_loss"] == pytest.approx(fkl, rel=1e-3) and p["ce_loss"] == pytest.approx(ce, rel=1e-3)
    # And they moved: the easiest bucket's KD fell from stage 0's end to the run's end.
    assert probes[-4]["kd_loss"] < probes[0]["kd_loss"]


def test_dev_rouge_is_the_mean_greedy_rouge_over_the_dev_rows(tiny_assets, tmp_path, capsys):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from pocl_ray.sampling import generate_tokens
    from pocl_ray.training.teacher import HiddenStatesLM
    from pocl_ray.training.worker import dev_rouge

    # The tiny student answers every dev prompt with EOS (dev ROUGE-L 0 in the Ray runs), so this
    # scores the teacher: against its own greedy responses it scores 100, against "zzz" 0.
    cfg = run_config(tiny_assets, tmp_path, **{"eval.max_new_tokens": 8})
    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    rows, _ = validate_and_tokenize(read_table(tiny_assets.dev_path).to_pylist(), tokenizer, cfg.data)
    teacher = load_model(tiny_assets.teacher_dir)
    own = generate_tokens(
        teacher,
        [r["input_ids"][: r["num_prompt_tokens"]] for r in rows[:6]],
        [8] * 6,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(own, skip_special_tokens=True)
    scored = [r | {"response": t.strip()} for r, t in zip(rows, texts) if any(c.isalnum() for c in t)]
    assert len(scored) >= 3
    w = SimpleNamespace(
        student=HiddenStatesLM(teacher),
        tokenizer=tokenizer,
        cfg=cfg,
        autocast=nullcontext,
        device=torch.device("cpu"),
        dev_rows=scored + [r | {"response": "zzz"} for r in scored],
        rank=0,
        world=1,
    )
    teacher.train()
    assert dev_rouge(w) == pytest.approx(50.0)
    assert teacher.training, "dev_rouge leaves the model in the mode it found it in"
    # Rank 0 says how far the decoding is (here once, at its end: it took less than PROGRESS_SECONDS).
    n = len(w.dev_rows)
    assert capsys.readouterr().out.startswith(f"[train: dev ROUGE-L] {n}/{n} rows (100%)")


def test_checkpoints_carry_the_best_student_so_far_to_a_resumed_rank_0(tiny_assets, tmp_path):
    from pocl_ray.training.step import adamw
    from pocl_ray.training.teacher import HiddenStatesLM
    from pocl_ray.training.worker import load_checkpoint, save_checkpoint

    student = HiddenStatesLM(load_model(tiny_assets.student_dir))
    optimizer = adamw(student, 1e-3, 0.0)
    best_dir = tmp_path / "best"
    best_dir.mkdir()
    save_checkpoint(tmp_path / "before_any_best", student, optimizer, {"position": {}}, best_dir)
    assert not (tmp_path / "before_any_best" / "student_best").exists()
    best = load_model(tiny_assets.teacher_dir)  # any other weights stand in for an earlier, better student
    best.save_pretrained(best_dir)
    save_checkpoint(
        tmp_path / "ckpt", student, optimizer, {"position": {}}, best_dir, load_tokenizer(tiny_assets.tokenizer_dir)
    )
    assert (tmp_path / "ckpt" / "student_best" / "tokenizer_config.json").is_file()
    resumed_best = tmp_path / "resumed_best"
    resumed_best.mkdir()
    _, resumed, _ = load_checkpoint(tmp_path / "ckpt", resumed_best)
    assert torch.equal(load_model(resumed_best).lm_head.weight, best.lm_head.weight)
    assert torch.equal(resumed.lm_head.weight, student.lm.lm_head.weight)


def test_best_candidate_ties_and_candidates_after_a_checkpoint_are_dropped_on_restore(tiny_assets, tmp_path):
    from pocl_ray.coordinator import CurriculumCoordinator, best_candidate

    def coordinator():
        return CurriculumCoordinator(
            plan_from_config(run_config(tiny_assets, tmp_path)).to_dict(),
            num_rows=64,
            global_batch=16,
            micro_batch=4,
            seed=0,
            metrics_path=str(tmp_path / "m.jsonl"),
            world_size=2,
            row_group_bounds=[0, 64],
        )

    def candidate(step, rouge, kd_loss):
        return {"step": step, "stage": 0, "samples": 16 * step, "dev_rougeL": rouge, "dev_kd_loss": kd_loss}

    c = coordinator()
    c.restore(None)
    assert c.select(candidate(2, 10.0, 2.0))
    assert c.select(candidate(4, 12.0, 1.9))
    assert not c.select(candidate(6, 11.0, 1.5)), "a lower dev KD loss does not outweigh a lower ROUGE-L"
    state = c.checkpoint({"stage": 0, "stage_step": 6, "step": 6, "samples": 96}, [])
    assert c.select(candidate(8, 12.0, 1.8)), "equal ROUGE-L: the lower dev KD loss wins"
    assert c.select(candidate(10, 12.0, 1.8)), "equal on both: the later step wins"
    assert not c.select(candidate(12, 12.0, 1.85))
    assert best_candidate(c.candidates)["step"] == 10 and best_candidate([]) is None
    restored = coordinator().restore(json.loads(json.dumps(state)))
    assert [x["step"] for x in restored["candidates"]] == [2, 4, 6]
    assert best_candidate(restored["candidates"])["step"] == 4


def test_selected_student_follows_eval_checkpoint(tmp_path, capsys):
    from pocl_ray.training.driver import selected_student

    assert selected_student(tmp_path, "best_dev_rougeL") == tmp_path / "student"
    assert "predates checkpoint selection): evaluating the final student" in capsys.readouterr().out
    assert selected_student(tmp_path, "final") == tmp_path / "student"
    (tmp_path / "selection.json").write_text(json.dumps({"best": {"step": 3}}))
    assert selected_student(tmp_path, "best_dev_rougeL") == tmp_path / "student_best"


def test_cached_rkl_and_akl_runs_get_the_tail_caveat(tiny_assets, tmp_path):
    from pocl_ray.curriculum import plan_from_config
    from pocl_ray.training.driver import cached_tail_warning

    cached = {"kd.teacher": "cached", "scoring.teacher_top_k": 8}
    for loss, warned in (("rkl", True), ("akl", True), ("fkl", False), ("srkl", False)):
        cfg = run_config(tiny_assets, tmp_path, **cached, **{"kd.loss": loss})
        warning = cached_tail_warning(cfg, plan_from_config(cfg))
        assert (warning is not None) == warned, loss
        if warned:
            assert f"kd.teacher: cached with {loss}" in warning and "scoring.teacher_hidden" in warning
    online = run_config(tiny_assets, tmp_path, **{"kd.loss": "rkl"})
    assert cached_tail_warning(online, plan_from_config(online)) is None
    hidden = run_config(
        tiny_assets, tmp_path, **{"kd.teacher": "cached", "scoring.teacher_hidden": True, "kd.loss": "rkl"}
    )
    assert cached_tail_warning(hidden, plan_from_config(hidden)) is None


def test_selection_settings_name_their_field(tiny_assets, tmp_path):
    assert run_config(tiny_assets, tmp_path).eval.checkpoint == "best_dev_rougeL"
    with pytest.raises(ConfigError, match=r"eval.checkpoint: Input should be 'best_dev_rougeL' or 'final'"):
        run_config(tiny_assets, tmp_path, **{"eval.checkpoint": "best"})
    with pytest.raises(ConfigError, match=r"training.select_every: Input should be greater than 0"):
        run_config(tiny_assets, tmp_path, **{"training.select_every": 0})


# -- the step's batches --------------------------------------------------------------------------


def test_length_grouping_keeps_the_rows_and_pads_little():
    from pocl_ray.training.step import build_batch, length_grouped

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=11).tolist()
    rows = [
        {
            "input_ids": list(range(1, n + 1)),
            "attention_mask": [1] * n,
            "labels": [-100] + list(range(2, n + 1)),
            "rank": i,
        }
        for i, n in enumerate(lengths)
    ]
    micro = [rows[0:3], rows[3:6], rows[6:9], rows[9:11]]
    grouped = length_grouped(micro)
    assert [len(m) for m in grouped] == [3, 3, 3, 2]  # as many micro-batches, sizes as even as before
    assert sorted(r["rank"] for m in grouped for r in m) == list(range(11))  # every row once
    flat = [len(r["input_ids"]) for m in grouped for r in m]
    assert flat == sorted(flat)
    assert length_grouped(micro) == grouped  # deterministic: a restart regroups identically
    padded = sum(build_batch(m, 0, torch.device("cpu"))["input_ids"].numel() for m in grouped)
    ungrouped = sum(build_batch(m, 0, torch.device("cpu"))["input_ids"].numel() for m in micro)
    assert padded < ungrouped
    for m in grouped:
        batch = build_batch(m, 0, torch.device("cpu"))
        assert (
            batch["input_ids"].shape[1] % 8 == 0
            and batch["input_ids"].shape[1] - max(len(r["input_ids"]) for r in m) < 8
        )
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_gradient_checkpointing_gives_the_same_step(tiny_assets):
    """training.gradient_checkpointing trades compute for memory and must not change the gradient."""
    from pocl_ray.config import KDConfig
    from pocl_ray.curriculum import Stage
    from pocl_ray.models import checkpoint_activations
    from pocl_ray.training.step import accumulate_gradients, build_batch
    from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher

    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    good, _ = validate_and_tokenize(
        read_table(tiny_assets.train_path).to_pylist()[:6], tokenizer, tiny_assets.data_config()
    )
    batches = [build_batch(good[i : i + 3], tokenizer.pad_token_id, torch.device("cpu")) for i in (0, 3)]
    teacher = OnlineTeacher(load_model(tiny_assets.teacher_dir, frozen=True))
    stage = Stage(index=0, buckets=(0,), steps=1, temperature=2.0, kd_weight=0.7, loss="fkl")
    results = []
    for checkpointing in (False, True):
        lm = load_model(tiny_assets.cut_student_dir)
        if checkpointing:
            checkpoint_activations(lm)
        lm.train()
        # The layers really recompute: HF marks each one that checkpoints.
        assert any(getattr(m, "gradient_checkpointing", False) for m in lm.modules()) == checkpointing
        student = HiddenStatesLM(lm)
        out = accumulate_gradients(student, teacher, batches, stage, KDConfig())
        results.append((out, {n: p.grad for n, p in lm.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_dev_losses_report_their_rows_and_rank_0_prints_progress_only_when_slow(tiny_assets, capsys):
    """No silent minutes: dev_losses tells its hook each batch's rows (the same losses with or without
    it); the printer says nothing for quick work, and for slow work a line every interval and at the end."""
    from pocl_ray.config import KDConfig
    from pocl_ray.curriculum import Stage
    from pocl_ray.training.step import build_batch, dev_losses
    from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher
    from pocl_ray.training.worker import row_progress_printer

    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    good, _ = validate_and_tokenize(read_table(tiny_assets.dev_path).to_pylist(), tokenizer, tiny_assets.data_config())
    batches = [
        build_batch(good[i : i + 4], tokenizer.pad_token_id, torch.device("cpu")) for i in range(0, len(good), 4)
    ]
    teacher = OnlineTeacher(load_model(tiny_assets.teacher_dir, frozen=True))
    student = HiddenStatesLM(load_model(tiny_assets.student_dir))
    stage = Stage(index=0, buckets=(0,), steps=1, temperature=2.0, kd_weight=0.7, loss="fkl")
    seen: list[int] = []
    with_hook = dev_losses(student, teacher, teacher, batches, stage, KDConfig(), on_batch=seen.append)
    assert seen == [len(good[i : i + 4]) for i in range(0, len(good), 4)] and len(seen) > 1
    assert with_hook == dev_losses(student, teacher, teacher, batches, stage, KDConfig())

    quick = row_progress_printer("train: dev losses", len(good), every_s=3600)
    for rows in seen:
        quick(rows)
    assert capsys.readouterr().out == ""
    slow = row_progress_printer("train: dev losses", len(good), every_s=0)
    for rows in seen:
        slow(rows)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(seen) and lines[-1].startswith(f"[train: dev losses] {len(good)}/{len(good)} rows (100%)")


def _cached_and_online_steps(tiny_assets, tmp_path, cache_setting: dict, kind: str):
    """(online, cached) of one training step and the dev losses on the same rows and student: the
    loss terms, the gradients, the dev losses (the dev rows' cache made on the driver, as `train` does)."""
    from pocl_ray.config import KDConfig
    from pocl_ray.curriculum import Stage
    from pocl_ray.teacher_cache import cache_rows, load_head, save_head
    from pocl_ray.training.step import accumulate_gradients, build_batch, dev_losses
    from pocl_ray.training.teacher import CachedHiddenTeacher, CachedTopKTeacher, HiddenStatesLM, OnlineTeacher

    cfg = run_config(tiny_assets, tmp_path, **{"kd.teacher": "cached", **cache_setting})
    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    good, _ = validate_and_tokenize(
        read_table(tiny_assets.dev_path).to_pylist()[:6], tokenizer, tiny_assets.data_config()
    )
    rows = [{k: r[k] for k in ("id", "input_ids", "labels", "attention_mask", "num_prompt_tokens")} for r in good]
    cache_rows(cfg, rows, tiny_assets.teacher_dir, tiny_assets.tokenizer_dir)
    online = OnlineTeacher(load_model(tiny_assets.teacher_dir, frozen=True))
    if cfg.scoring.teacher_hidden:
        save_head(online.lm.get_output_embeddings().weight, tmp_path)
        cached_teacher = CachedHiddenTeacher(load_head(tmp_path, torch.float32, torch.device("cpu")))
    else:
        cached_teacher = CachedTopKTeacher()
    stage = Stage(index=0, buckets=(0,), steps=1, temperature=2.0, kd_weight=0.7, loss=kind)
    results = {}
    for cached in (False, True):
        t = cached_teacher if cached else online
        batches = [build_batch(rows[i : i + 3], tokenizer.pad_token_id, torch.device("cpu"), t) for i in (0, 3)]
        student = HiddenStatesLM(load_model(tiny_assets.student_dir))
        student.eval()
        out = accumulate_gradients(student, t, batches, stage, KDConfig())
        grads = {n: p.grad for n, p in student.named_parameters()}
        results[cached] = (out, grads, dev_losses(student, t, t, batches, stage, KDConfig()))
    return results[False], results[True]


def test_cached_teacher_at_full_vocabulary_gives_the_online_step_and_dev_losses(tiny_assets, tmp_path):
    """kd.teacher: cached with K = vocabulary size: the training step and both dev losses equal the
    online teacher's."""
    online, cached = _cached_and_online_steps(
        tiny_assets, tmp_path, {"scoring.teacher_top_k": tiny_assets.vocab_size}, "js"
    )
    results = {False: online, True: cached}
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, g in results[False][1].items():
        # The stored log-probs are float16 (teacher_cache.py): gradients agree to ~1e-4 of their scale.
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-3, atol=1e-4 * float(g.abs().max()), msg=name)
    assert results[True][2] == pytest.approx(results[False][2], rel=1e-4)
    assert results[True][0][1] > 0  # a real KD term, not two zeros


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_cached_hidden_teacher_gives_the_online_step_within_its_int8_rounding(tiny_assets, tmp_path, kind):
    """scoring.teacher_hidden: the teacher's head applied to its int8 hidden states on the device. The
    step and dev losses match the online teacher's to the rounding (exact equality with the rounded
    state is tested in test_teacher_cache.py); RKL too, which the top-K form only estimates."""
    online, cached = _cached_and_online_steps(tiny_assets, tmp_path, {"scoring.teacher_hidden": True}, kind)
    assert cached[0][1] > 0 and not torch.equal(
        torch.stack(cached[0]), torch.stack(online[0])
    )  # a real KD term, really rounded
    torch.testing.assert_close(cached[0], online[0], rtol=2e-3, atol=1e-5)
    for name, g in online[1].items():
        torch.testing.assert_close(cached[1][name], g, rtol=2e-2, atol=2e-3 * float(g.abs().max()), msg=name)
    assert cached[2] == pytest.approx(online[2], rel=2e-3)


# -- loss algebra: 3 DDP workers on an uneven split give the gradient of 1 worker on the combined batch


def _stages():
    from pocl_ray.curriculum import Stage

    return [
        Stage(index=0, buckets=(0,), steps=1, temperature=2.0, kd_weight=0.8, loss="js"),
        Stage(index=1, buckets=(0,), steps=1, target="hidden", teacher_layer=3, student_layer=1, loss="mse"),
        Stage(index=2, buckets=(0,), steps=1, kd_weight=0.5, loss="fkl"),
    ]


def _gradients(student, teacher, micro_rows, stage, pad_id, projection):
    """[loss, KD, CE, tokens] and the student's gradients of one step on the hidden-state path
    (student and teacher wrapped in HiddenStatesLM, the student possibly inside DDP)."""
    from pocl_ray.config import KDConfig
    from pocl_ray.training.step import accumulate_gradients, build_batch, unwrap

    batches = [build_batch(rows, pad_id, torch.device("cpu")) for rows in micro_rows]
    out = accumulate_gradients(student, teacher, batches, stage, KDConfig(chunk_positions=16), projection=projection)
    grads = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in unwrap(student).named_parameters()
    }
    unwrap(student).zero_grad(set_to_none=True)
    return out, grads


def _ddp_worker(rank: int, world: int, init: str, assets, micro_rows: list, result_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pocl_ray.extraction import layer_projection
    from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    teacher = OnlineTeacher(load_model(assets.teacher_dir, frozen=True))
    pad_id = load_tokenizer(assets.tokenizer_dir).pad_token_id
    results = []
    for stage in _stages():
        torch.manual_seed(0)
        student = DistributedDataParallel(
            HiddenStatesLM(load_model(assets.student_dir)), find_unused_parameters=stage.target == "hidden"
        )
        student.eval()  # no dropout: both sides must compute the same function
        projection = layer_projection(64, 32, 3, seed=0) if stage.target == "hidden" else None
        results.append(_gradients(student, teacher, micro_rows[rank], stage, pad_id, projection))
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()
    # Exit without tearing the process group down: torch's gloo group destructor can deadlock with its
    # own worker thread at interpreter exit (seen here: main thread in ~ProcessGroupGloo holding the GIL,
    # the gloo thread waiting for the GIL to free a finished all-reduce's tensors). The results are saved.
    os._exit(0)


def test_three_workers_on_an_uneven_split_match_one_worker_on_the_combined_batch(tiny_assets, tmp_path):
    import torch.multiprocessing as mp

    from pocl_ray.extraction import layer_projection
    from pocl_ray.shards import blocks, worker_shard
    from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher

    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    good, _ = validate_and_tokenize(
        read_table(tiny_assets.train_path).to_pylist()[:16], tokenizer, tiny_assets.data_config()
    )
    rows = [{k: r[k] for k in ("input_ids", "labels", "attention_mask")} for r in good]
    # Rows of very different lengths, so a per-worker mean would weigh tokens differently.
    assert len(rows) == 16 and len({len(r["input_ids"]) for r in rows}) > 3
    # A global batch of 16 dealt to 3 workers as training deals it: 6, 5 and 5 rows, 3 micro-batches each.
    shards = [
        worker_shard(
            blocks([(0, 16)], [0, 16]), seed=0, stage=0, epoch=0, world_size=3, worker=r, global_batch=16, micro_batch=2
        )
        for r in range(3)
    ]
    micro_rows = [[[rows[i] for i in m] for m in s.step(0)] for s in shards]
    assert [[len(m) for m in w] for w in micro_rows] == [[2, 2, 2], [2, 2, 1], [2, 2, 1]]
    result_path = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(3, f"file://{tmp_path / 'pg'}", tiny_assets, micro_rows, str(result_path)), nprocs=3)
    ddp = torch.load(result_path, weights_only=False)

    teacher = OnlineTeacher(load_model(tiny_assets.teacher_dir, frozen=True))
    for stage, (ddp_out, ddp_grads) in zip(_stages(), ddp):
        torch.manual_seed(0)
        student = HiddenStatesLM(load_model(tiny_assets.student_dir))
        student.eval()
        projection = layer_projection(64, 32, 3, seed=0) if stage.target == "hidden" else None
        # One worker, the same 16 rows as 8 micro-batches of 2 (gradient accumulation).
        micro = [rows[i : i + 2] for i in range(0, 16, 2)]
        out, grads = _gradients(student, teacher, micro, stage, tokenizer.pad_token_id, projection)
        torch.testing.assert_close(ddp_out, out, rtol=1e-5, atol=1e-6)
        # The full-vocabulary logits path (heads that are not plain) computes the same step.
        logits_student, logits_teacher = HiddenStatesLM(student.lm, logits=True), OnlineTeacher(teacher.lm, logits=True)
        logits_out, logits_grads = _gradients(
            logits_student, logits_teacher, micro, stage, tokenizer.pad_token_id, projection
        )
        torch.testing.assert_close(logits_out, out, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(
                logits_grads[name], g, rtol=1e-4, atol=1e-7, msg=f"logits path, stage {stage.index} {name}"
            )
        assert out[3] == out[4] == sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0
        for name, g in grads.items():
            torch.testing.assert_close(ddp_grads[name], g, rtol=1e-4, atol=1e-7, msg=f"stage {stage.index} {name}")


# -- exact resume: a run killed after a checkpoint, re-run with the same name --------------------

CHECKPOINT = "step_00000010"  # stage 1 (steps 6-15) is one epoch: its 5th step is mid-epoch


@pytest.fixture(scope="module")
def killed(pocl_run, tmp_path_factory):
    """(run config, time of the kill, a copy of the run's output as the kill left it): the undisturbed run's
    plan, name and seed killed once its checkpoint at step 10 (mid-epoch) is committed. The run resumes on
    2 workers, its copy on 1 (one killed first attempt for both)."""
    from pocl_ray.training.driver import train

    undisturbed_cfg, scores, _ = pocl_run
    root = tmp_path_factory.mktemp("killed")
    cfg = undisturbed_cfg.with_overrides({"output.dir": str(root / "run")})  # same name, seed and plan
    storage = root / "run" / "train" / "checkpoints" / cfg.name
    killed_at = kill_after_a_checkpoint(train, cfg, scores, storage, at=CHECKPOINT)
    shutil.copytree(root / "run", root / "copy")  # for the 1-worker resume, before the 2-worker one moves on
    # What a SIGKILLed worker leaves behind, whatever this kill did: the resume must clear it (below).
    for rank in (0, 1):
        left = scratch_folder(str((root / "run" / "train").resolve()), cfg.name, rank) / "step_00000012-x"
        left.mkdir(parents=True, exist_ok=True)
        (left / "model.safetensors").write_bytes(b"left by a killed worker")
    return cfg, killed_at, root / "copy"


@ray_test
@pytest.mark.slow
def test_killed_run_resumes_at_the_same_step_with_the_same_data(pocl_run, killed):
    from pocl_ray.training.driver import train

    _, scores, undisturbed = pocl_run
    cfg, killed_at, _ = killed
    result = train(cfg, scores)  # same RunConfig name and storage: resumes from the last checkpoint
    resumed, reference = read_metrics(result.metrics_path), read_metrics(undisturbed.metrics_path)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    assert [r["stage"] for r in resumed] == [r["stage"] for r in reference]
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in reference]
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), a["step"]
        assert a["lr"] == pytest.approx(b["lr"])
    # Steps up to the checkpoint were kept from the first attempt, the rest trained after the kill.
    before = [r["step"] for r in resumed if r["time"] < killed_at]
    assert before == list(range(1, 11)), "resumed from the checkpoint at step 10"
    num_rows = pq.read_metadata(scores / "rows.parquet").num_rows
    stage_ends = np.cumsum([s.steps for s in stage_specs(plan_from_config(cfg), num_rows, 16)]).tolist()
    assert before[-1] % cfg.training.checkpoint_every == 0 and before[-1] not in stage_ends
    assert all(r["time"] > killed_at for r in resumed[len(before) :])
    assert len(before) < len(resumed)
    assert result.steps == undisturbed.steps and result.stages_completed == 4
    # Selection candidates up to the checkpoint (stage 0's end at least) came back with the
    # coordinator's state, as those steps were not trained again; the rest were evaluated anew.
    selection, reference = (json.loads(r.selection_path.read_text())["candidates"] for r in (result, undisturbed))
    assert [(c["step"], c["stage"], c["samples"]) for c in selection] == [
        (c["step"], c["stage"], c["samples"]) for c in reference
    ]
    assert selection[0]["step"] <= before[-1]
    for a, b in zip(selection, reference):
        assert a["dev_kd_loss"] == pytest.approx(b["dev_kd_loss"], rel=1e-3), a["step"]
        assert a["dev_rougeL"] == pytest.approx(b["dev_rougeL"], abs=1.0), a["step"]
    assert result.best_student_dir is not None and (result.best_student_dir / "config.json").is_file()
    # The resumed workers emptied what the killed ones left on the node, and removed their own best copy at the end.
    train_dir = str(Path(cfg.output.dir).resolve() / "train")
    assert [list(scratch_folder(train_dir, cfg.name, rank).rglob("*")) for rank in (0, 1)] == [[], []]


@ray_test
@pytest.mark.slow
def test_a_two_worker_checkpoint_resumes_on_one_worker_and_completes_its_epoch(pocl_run, killed):
    """The 2-worker run killed after its mid-epoch checkpoint (its copy), re-run with training.num_workers: 1:
    the plan's steps and schedule go on, the interrupted epoch's other rows are trained once on 1 worker (each
    step's tokens are those of the re-dealt rows), later epochs are 1-worker epochs, and the resize is recorded."""
    from pocl_ray.training.driver import train

    _, scores, _ = pocl_run
    cfg, killed_at, copy = killed
    # Same name: resumes on 1 worker.
    result = train(cfg.with_overrides({"output.dir": str(copy), "training.num_workers": 1}), scores)
    records, [resize] = read_metrics(result.metrics_path), read_resizes(result.metrics_path)
    assert resize["kind"] == "resize" and (resize["workers_before"], resize["workers_after"]) == (2, 1)
    assert resize["cause"] == "resume" and 0 < resize["seconds"] < 300
    num_rows = pq.read_metadata(scores / "rows.parquet").num_rows
    specs = stage_specs(plan_from_config(cfg), num_rows, cfg.training.global_batch_size)
    assert (resize["stage"], resize["step"]) == (1, 10), "resumed inside stage 1's only epoch"
    assert [r["step"] for r in records] == list(range(1, sum(s.steps for s in specs) + 1))
    assert [r["stage"] for r in records] == [i for i, s in enumerate(specs) for _ in range(s.steps)]
    assert all(r["time"] < killed_at for r in records[: resize["step"]])
    assert all(r["time"] > killed_at for r in records[resize["step"] :])
    assert [r["tokens"] for r in records] == expected_tokens(cfg, scores, resizes=[resize])
    assert all(math.isfinite(r["loss"]) for r in records)
    # The schedule is the plan's, whatever the worker count: samples, LR, temperature.
    samples = np.cumsum([min(16, s.pool_rows - (k % s.steps_per_epoch) * 16) for s in specs for k in range(s.steps)])
    assert [r["samples"] for r in records] == samples.tolist()
    lrs = [lr_at(s.lr_offset + k, s.lr_total, 1e-3, 1e-4, 0) for s in specs for k in range(s.steps)]
    assert [r["lr"] for r in records] == pytest.approx(lrs)
    assert [r["temperature"] for r in records] == [s.stage.temperature for s in specs for _ in range(s.steps)]
    # The interrupted epoch as the run dealt it (the final checkpoint's coordinator state): its pool, once.
    # Stage 1 began at step 6: 5 of its steps on 2 workers, the rest on 1.
    dealing = json.loads((Path(result.checkpoint_path) / "coordinator.json").read_text())["dealing"]
    assert dealing == {"stage": 1, "epoch": 0, "history": [[0, 2], [resize["step"] - specs[0].steps, 1]]}
    for (stage, _), ranks in rows_per_epoch(cfg, scores, [resize]).items():
        assert ranks == list(range(*specs[stage].pool_ranges[0])), stage


# -- kd.teacher: cached: training reads the teacher's top-k from the scores --------------------


@ray_test
@pytest.mark.parametrize(
    "setting", [{"scoring.teacher_top_k": 32}, {"scoring.teacher_hidden": True}], ids=["top_k", "hidden"]
)
def test_cached_teacher_run_loads_no_teacher_and_follows_the_plan(ray_local, tiny_assets, tmp_path, capsys, setting):
    from pocl_ray.training.driver import selected_student, train

    scores = write_scores(tmp_path, tiny_assets, cache_form=setting.get("scoring.teacher_top_k", "hidden"))
    # The run's teacher folder has its config and tokenizer but no weights: loading it anywhere fails.
    teacher = tmp_path / "teacher_without_weights"
    shutil.copytree(tiny_assets.teacher_dir, teacher, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    manifest = json.loads((scores / "manifest.json").read_text())
    manifest["models"]["teacher"] = str(teacher.resolve())
    (scores / "manifest.json").write_text(json.dumps(manifest))
    cfg = run_config(
        tiny_assets,
        tmp_path / "run",
        **{
            "models.teacher": str(teacher),
            "data.dev": None,
            "kd.teacher": "cached",
            **setting,
            "curriculum.num_buckets": 2,
            "training.checkpoint_every": 100,
        },
    )
    with pytest.raises(OSError):
        load_model(teacher)
    result = train(cfg, scores)
    records = read_metrics(result.metrics_path)
    assert [r["tokens"] for r in records] == expected_tokens(cfg, scores)
    assert [r["stage"] for r in records] == sorted(r["stage"] for r in records) and records[-1]["stage"] == 1
    assert all(r["kd_loss"] > 0 and math.isfinite(r["loss"]) for r in records)
    assert result.stages_completed == 2 and (result.student_dir / "config.json").exists()
    # No dev set: no selection candidates, and eval.checkpoint's default falls back to the final student.
    selection = json.loads(result.selection_path.read_text())
    assert selection["candidates"] == [] and selection["best"] is None and result.best_student_dir is None
    capsys.readouterr()
    assert selected_student(result.output_dir, "best_dev_rougeL") == result.student_dir
    assert "no data.dev in training): evaluating the final student" in capsys.readouterr().out


# -- curriculum extraction, then output KD from another teacher until the dev loss plateaus ----


@ray_test
def test_extraction_stages_then_plateau_kd_with_on_policy_rows(ray_local, tiny_assets, tmp_path):
    from dataclasses import replace

    from pocl_ray.curriculum import Plan, extraction_plan, uniform_layer_map
    from pocl_ray.training.driver import train

    scores = write_scores(tmp_path, tiny_assets)
    # Teacher layers 1..4 -> student layers 1, 1, 2, 2; then output KD for at most 50 steps, from a
    # stage-specific teacher (as progressive distillation's per-stage checkpoints: here a copy of
    # the initial student, so its KD is exactly 0), keeping the last hidden stage's optimizer and
    # LR cosine.
    extraction = extraction_plan(*uniform_layer_map(4, 2), steps_per_layer=2, final_steps=50)
    final = replace(
        extraction.stages[-1],
        until_plateau=True,
        patience=2,
        restart_optimizer=False,
        teacher=str(tiny_assets.student_dir),
    )
    plan = Plan("extraction", 1, extraction.stages[:-1] + (final,))
    # An LR of 1e-30 leaves the weights unchanged, so the dev loss never improves after the final
    # stage's first evaluation: it must stop at its third one (patience 2), stage step 6 of 50. Its 5
    # stage ends are selection candidates: the untrained student's dev responses run to max_length
    # unless eval.max_new_tokens stops them, and no claim here reads their ROUGE-L.
    cfg = run_config(
        tiny_assets,
        tmp_path / "run",
        **{
            "kd.on_policy_fraction": 0.5,
            "kd.on_policy_max_new_tokens": 8,
            "eval.max_new_tokens": 8,
            "training.eval_every": 2,
            "training.lr": 1e-30,
            "training.min_lr": 0.0,
            "training.checkpoint_every": 100,
        },
    )
    result = train(cfg, scores, plan=plan)
    records = read_metrics(result.metrics_path)
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4]
    assert [r["step"] for r in records] == list(range(1, 15))
    assert [r["target"] for r in records] == ["hidden"] * 8 + ["logits"] * 6
    assert [r.get("teacher_layer") for r in records[:8:2]] == [1, 2, 3, 4]
    assert [r.get("student_layer") for r in records[:8:2]] == [1, 1, 2, 2]
    assert all(r["kd_weight"] == 1.0 and r["loss"] == pytest.approx(r["kd_loss"]) for r in records)
    # The hidden stages matched the run's teacher; the final stage distilled from its own teacher,
    # a copy of the student (the weights do not move at LR 1e-30), so every KD value there is 0.
    assert all(r["kd_loss"] > 1e-3 for r in records[:8])
    assert all(abs(r["kd_loss"]) < 1e-6 for r in records[8:])
    # dev_loss is the stage's own objective (against its copy-of-the-student teacher: 0); dev_kd_loss is
    # always measured against the run's final teacher, so it equals the unchanged student's FKL to it.
    assert abs(result.metrics["dev_loss"]) < 1e-6
    assert result.metrics["dev_kd_loss"] == pytest.approx(dev_fkl(tiny_assets.student_dir, tiny_assets), rel=1e-4)
    assert result.metrics["dev_kd_loss"] > 1e-3
    # Stages 3 and 4 share one cosine over their 2 + 50 planned steps.
    assert [r["lr"] for r in records[6:]] == pytest.approx([lr_at(k, 52, 1e-30, 0.0) for k in range(8)], rel=1e-9)
    plan_tokens = expected_tokens(cfg, scores, plan)
    # Hidden stages train on the reference rows; the final stage replaced half of every micro-batch
    # by the student's own samples, and CE counts only the remaining reference rows.
    assert [r["tokens"] for r in records[:8]] == plan_tokens[:8]
    assert all(0 < r["ce_tokens"] < plan_tokens[8 + i] for i, r in enumerate(records[8:]))
    assert result.stages_completed == 5
    assert (result.student_dir / "config.json").exists()


def test_a_restarted_worker_empties_what_its_killed_predecessor_left_on_the_node(tmp_path, monkeypatch):
    """A SIGKILLed worker leaves its best-student copy and half-uploaded checkpoints behind; its replacement
    (same run, same rank, same node) starts from an empty folder, and other ranks' folders are untouched."""
    import tempfile

    from pocl_ray.training.worker import worker_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = worker_scratch("/runs/a/train", "run", 0)
    other = worker_scratch("/runs/a/train", "run", 1)
    (first / "best").mkdir()
    (first / "best" / "model.safetensors").write_bytes(b"x" * 1024)
    (first / "step_00000010-abc").mkdir()
    (other / "step_00000010-def").mkdir()
    again = worker_scratch("/runs/a/train", "run", 0)
    assert again == first and again.is_dir() and list(again.iterdir()) == []
    assert [p.name for p in other.iterdir()] == ["step_00000010-def"]
    assert first.parent.parent == tmp_path / "pocl-ray"
    assert worker_scratch("/runs/b/train", "run", 0).parent != first.parent  # another output: another run
    assert worker_scratch("/runs/a/train", "other", 0).parent != first.parent  # another name there: too
