"""Every benchmark in benchmarks/ runs at a smoke size, as the subprocess a user starts, and prints
the JSON it is read for: the keys are there and the values are consistent. The figures mean nothing
at these sizes (benchmarks/README.md holds real runs); this keeps the scripts from rotting between
runs. The benchmarks that start Ray are marked `ray`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TIMEOUT_S = 900  # Ray's start-up alone takes a minute on a busy 2-core machine


def printed_json(stdout: str) -> dict:
    """The JSON object a benchmark prints last (progress or summary lines may come before it)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON object ends the output:\n{stdout[-3000:]}")


def run_benchmark(script: str, *args: str, cwd: Path, exit_codes: tuple[int, ...] = (0,)):
    """(printed JSON, finished process) of `python benchmarks/<script> args...`."""
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a benchmark that starts Ray starts its own
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode in exit_codes, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return printed_json(proc.stdout), proc


def test_every_benchmark_has_a_smoke_test():
    tested = {
        "data_path",
        "generation",
        "loss_memory",
        "parity_claims",
        "scoring",
        "sharded_loading",
        "sharded_loss",
        "sharding",
        "teacher_cache",
        "training",
    }
    assert {p.stem for p in BENCHMARKS.glob("*.py")} == tested


def test_printed_json_skips_the_lines_before_it():
    assert printed_json('[score] 1/2 rows\n  {"not": json\n{\n "a": 1\n}\n') == {"a": 1}
    with pytest.raises(AssertionError, match="no JSON object"):
        printed_json("[score] 1/2 rows\n")


def test_loss_memory(tmp_path):
    out, _ = run_benchmark(
        "loss_memory.py",
        *("--kinds", "fkl,rkl", "--batch", "1", "--seq", "32", "--hidden", "16", "--vocab", "64"),
        *("--repeats", "1", "--threads", "1", "--chunk-positions-sweep", "8,16"),
        cwd=tmp_path,
    )
    assert out["shape"] == {"batch": 1, "seq": 32, "hidden": 16, "vocab": 64}
    assert 11 <= out["memory_method_check_expect_12_mib"] <= 13  # the CPU peak from profiler records
    assert set(out["results"]) == {"fkl", "rkl"}
    for row in out["results"].values():
        for variant in ("naive", "chunked", "linear"):
            assert math.isfinite(row[variant]["loss"]) and row[variant]["loss"] > 0
            assert row[variant]["median_ms"] > 0 and row[variant]["peak_extra_mib"] >= 0
        # Three ways to one loss (fp32).
        assert row["loss_rel_diff_linear_vs_naive"] < 1e-4 and row["loss_rel_diff_linear_vs_chunked"] < 1e-4
    assert set(out["linear_fkl_chunk_positions_sweep"]) == {"8", "16"}


def test_loss_memory_linear_alone(tmp_path):
    # --variants linear: the sizes where the two full-logits variants do not fit; no ratio to them then.
    out, _ = run_benchmark(
        "loss_memory.py",
        *("--variants", "linear", "--kinds", "js", "--batch", "1", "--seq", "32", "--hidden", "16", "--vocab", "64"),
        *("--chunk-positions", "8", "--repeats", "1", "--threads", "1"),
        cwd=tmp_path,
    )
    assert list(out["results"]["js"]) == ["linear"]
    assert math.isfinite(out["results"]["js"]["linear"]["loss"]) and out["results"]["js"]["linear"]["loss"] > 0
    assert out["one_fp32_chunk_mib"] == round(8 * 64 * 4 / 2**20, 1)


def test_sharded_loss_keeps_or_regathers_the_heads(tmp_path):
    from conftest import free_port

    vocab, hidden, world = 256, 32, 2
    out, _ = run_benchmark(
        "sharded_loss.py",
        *("--world", str(world), "--vocab", str(vocab), "--hidden", str(hidden), "--layers", "1"),
        *("--batch", "1", "--seq", "16", "--warmup", "0", "--repeats", "1", "--port", str(free_port())),
        cwd=tmp_path,
    )
    # Llama's root: the untied head and the final norm, whole during the loss and 1/world of it sharded.
    for name, width in (("student", hidden), ("teacher", 2 * hidden)):
        whole = (vocab * width + width) * 4 / 2**20
        assert out["root_whole_mib"][name] == pytest.approx(whole)
        assert out["root_shard_mib"][name] == pytest.approx(whole / world)
    for measure in ("median_s", "median_cpu_s"):
        assert out["kept"][measure] > 0 and out["regathered"][measure] > 0
        ratio = out["regathered"][measure] / out["kept"][measure]
        assert out[f"ratio_regathered_over_kept_{measure}"] == pytest.approx(ratio)


def test_sharding_compares_ddp_and_fsdp_per_rank(tmp_path):
    from conftest import free_port

    world = 2
    out, _ = run_benchmark(
        "sharding.py",
        *("--worlds", str(world), "--vocab", "256", "--hidden", "32", "--layers", "1", "--seq", "16"),
        *("--micro-batch", "1", "--micro-batches", "1", "--steps", "1", "--port", str(free_port())),
        cwd=tmp_path,
    )
    ddp, fsdp = out["runs"][f"ddp@{world}"], out["runs"][f"fsdp@{world}"]
    assert [r["rank"] for r in ddp] == [r["rank"] for r in fsdp] == list(range(world))
    # DDP: the whole student on every rank; FSDP: half of it on each (every dim 0 here splits evenly), and
    # as much again in gradients, twice as much in AdamW moments (plus the step counts).
    for r in ddp:
        assert r["params_mib"] == pytest.approx(out["student_fp32_mib"])
    for r in fsdp:
        assert r["params_mib"] == pytest.approx(out["student_fp32_mib"] / world)
        assert r["grads_mib"] == pytest.approx(r["params_mib"])
        assert r["optimizer_mib"] == pytest.approx(2 * r["params_mib"], rel=0.01)
    for r in ddp + fsdp:
        assert r["tokens_per_second"] > 0 and r["loading_peak_growth_mib"] >= 0
    ratios = out["ratios"][str(world)]
    largest = [max(r["params_grads_optimizer_mib"] for r in runs) for runs in (fsdp, ddp)]
    assert ratios["params_grads_optimizer_fsdp_over_ddp"] == pytest.approx(largest[0] / largest[1])
    assert ratios["params_grads_optimizer_fsdp_over_ddp"] == pytest.approx(1 / world, rel=0.01)
    speed = fsdp[0]["tokens_per_second"] / ddp[0]["tokens_per_second"]
    assert ratios["tokens_per_second_fsdp_over_ddp"] == pytest.approx(speed)


def test_sharded_loading_leaves_each_rank_its_shards(tmp_path):
    from conftest import free_port

    world = 2
    out, _ = run_benchmark(
        "sharded_loading.py",
        *("--world", str(world), "--vocab", "256", "--hidden", "48", "--layers", "1", "--port", str(free_port())),
        cwd=tmp_path,
    )
    ranks = sorted(out["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(world))
    # Every parameter is held once over all ranks, half of it on each (every dim 0 here splits evenly).
    assert sum(r["shards_held_mib"] for r in ranks) == pytest.approx(out["one_fp32_copy_mib"])
    assert all(r["shards_held_mib"] == pytest.approx(out["one_fp32_copy_mib"] / world) for r in ranks)
    assert all(r["peak_growth_mib"] >= 0 for r in ranks)
    others = max(r["peak_growth_mib"] for r in ranks[1:])
    assert out["max_other_rank_growth_over_one_fp32_copy"] == pytest.approx(others / out["one_fp32_copy_mib"])


@pytest.mark.parametrize("store", ["local", "s3"])
def test_data_path_reads_each_workers_share(tmp_path, store):
    out, _ = run_benchmark(
        "data_path.py",
        *("--rows", "400", "--workers", "2", "--global-batch", "16", "--micro-batch", "4"),
        *("--teacher-top-k", "4", "--step-ms", "1", "--old", "--dir", str(tmp_path), "--store", store),
        cwd=tmp_path,
    )
    assert (out["rows"], out["workers"], out["teacher_top_k"], out["row_groups"]) == (400, 2, 4, 1)
    assert out["store"] == store
    for path in ("new", "old"):
        result = out[path]
        # One row group of 400 rows, half of it each worker's: each reads it whole.
        assert result["read_amplification"] == pytest.approx(2.0, abs=0.05)
        # The bytes counted through the filesystem (local or S3) are those row groups plus the
        # footers the reader re-reads; the index's footer reads come on top.
        fs = result["fs_amplification"]
        assert result["read_amplification"] <= fs <= 1.1 * result["read_amplification"]
        assert result["fs_amplification_with_index"] > fs
        if store == "local":
            assert result["syscall_amplification"] == pytest.approx(fs, rel=0.05)
        else:  # /proc/self/io does not see an S3 client's socket reads
            assert result["syscall_amplification"] is None
        assert result["rows_per_s_per_worker"] > 0
        assert result["peak_rss_mb"] >= result["rss_before_reading_mb"] > 0
    assert 0 <= out["new"]["data_wait"]["after_first_step_fraction"] <= 1
    assert list(tmp_path.glob("pocl-data-path-*")) == []  # its synthetic scores are deleted


def test_data_path_order_sweep(tmp_path):
    out, _ = run_benchmark("data_path.py", "--order-sweep", "--rows", "200000", "--workers", "2", cwd=tmp_path)
    orders = out["orders"]
    assert orders[0]["order"] == "full permutation" and orders[0]["read_amplification"] == 2
    assert len(orders) == 6
    for row in orders[1:]:
        assert row["read_amplification"] >= 1 and row["step_spread"] > 0 and -1 <= row["lag1"] <= 1


def test_generation_runs_the_measurer_on_rows_with_ids(tmp_path):
    out, _ = run_benchmark(
        "generation.py",
        *("--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1"),
        *("--intermediate", "64", "--vocab", "256", "--prompts", "4", "--min-prompt", "4", "--max-prompt", "8"),
        *("--new-tokens", "4", "--batch-size", "2", "--repeats", "1"),
        cwd=tmp_path,
    )
    sides = ("project_sampler", "hf_do_sample", "hf_greedy", "project_greedy")
    assert out["tokens_per_side"] == dict.fromkeys(sides, 4 * 4)  # every row generates all its new tokens
    assert all(out["tokens_per_s"][s] > 0 for s in sides)
    assert out["ratios"]["project_sampler_over_hf_do_sample"] == pytest.approx(
        out["tokens_per_s"]["project_sampler"] / out["tokens_per_s"]["hf_do_sample"], rel=0.01
    )
    for call in ("evaluation_actor_call", "measurer_call"):
        assert out[call]["rows"] == 4 and out[call]["rows_per_s"] > 0


def test_teacher_cache(tmp_path):
    out, _ = run_benchmark("teacher_cache.py", "--teacher-steps", "5", "--speed-steps", "2", cwd=tmp_path)
    stored = {k: v["stored"] for k, v in out["bytes_per_scored_token"].items()}
    assert stored["K=8"] < stored["K=32"] < stored["K=128"]
    hidden = out["teacher"]["hidden"]
    assert stored["hidden"] == hidden + 2 * -(-hidden // 64)  # int8 per channel, a float16 scale per 64
    for t in (1, 2):
        mass = [out["teacher_top_k_mass"][f"K={k},T={t}"] for k in (8, 32, 128)]
        assert 0 < mass[0] < mass[1] < mass[2] <= 1
    assert set(out["relative_loss_error"]) == {"fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"}
    # The hidden form is the online loss up to int8 rounding.
    assert out["max_relative_error_hidden_form"]["a=0,T=1"] < 0.01
    step = out["training_step"]
    assert step["timed_steps"] == 2
    assert min(step[f"{form}_tokens_per_s"] for form in ("online", "top_k", "hidden")) > 0


@pytest.mark.ray
def test_scoring(tmp_path):
    out, proc = run_benchmark(
        "scoring.py",
        *("--sizes", "16,32", "--vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2"),
        *("--batch-size", "4", "--max-new-tokens", "4", "--repeats", "1"),
        cwd=tmp_path,
    )
    assert out["sizes"] == [16, 32] and out["metrics"] == ["student_ce", "student_rougeL"]
    for path in ("bare", "ray"):
        for size in (16, 32):
            run = out[path][f"{size}_rows"]
            # Both are printed to 2 decimals: rows_per_s is size over the seconds within those roundings
            # (which exceed 2 % on a slow machine's 0.16 rows/s, or on a fast bare loop's 0.1 s).
            assert run["seconds"] > 0
            slowest, fastest = size / (run["seconds"] + 0.005), size / (run["seconds"] - 0.005)
            assert slowest - 0.005 <= run["rows_per_s"] <= fastest + 0.005, (size, run)
        assert "fixed_seconds" in out[path] and "rows_per_s_marginal" in out[path]  # None when the fit fails
    assert set(out["ratio_end_to_end"]) == {"16", "32"} and min(out["ratio_end_to_end"].values()) > 0
    assert "[score] 32/32 rows (100%)" in proc.stdout


@pytest.mark.ray
def test_training(tmp_path):
    out, _ = run_benchmark(
        "training.py",
        *("--device", "cpu", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--mlp", "64", "--vocab", "320"),
        *("--teacher-layers", "2", "--student-layers", "1", "--rows", "32", "--min-len", "16", "--max-len", "32"),
        *("--batch", "8", "--micro", "4", "--steps", "4", "--threads", "1"),
        cwd=tmp_path,
    )
    tps = out["tokens_per_second"]
    assert min(tps.values()) > 0
    assert out["ray_vs_hand"] == pytest.approx(tps["ray"] / tps["hand"])
    assert out["ray_vs_bare"] == pytest.approx(tps["ray"] / tps["bare"])
    for path in ("hand", "bare", "ray"):
        assert [s["steps"] for s in out["samples"][path]] == [4]
    assert out["fit_seconds"] >= out["fixed_seconds"] >= 0
    assert 0 <= out["data_wait_fraction"] <= 1


@pytest.mark.ray
def test_parity_claims_checks_its_bounds(tmp_path):
    config = tmp_path / "parity.yaml"
    config.write_text(
        "n: 8\nk: 2\nseeds: [0]\nteacher_width: 32\nstudent_width: 8\nbatch_size: 64\neval_size: 128\n"
        "teacher_max_steps: 200\ncheckpoint_every: 20\nstudent_steps: 40\neval_every: 10\n"
        "extraction: {steps_per_layer: 10}\nprogressive: {steps_per_checkpoint: 5}\nnum_cpus: 4\n"
    )
    out, proc = run_benchmark(
        "parity_claims.py", "--config", str(config), "--output", str(tmp_path / "out"), cwd=tmp_path, exit_codes=(0, 1)
    )
    steps = out["censored_mean_steps"]
    assert set(steps) == {"one_shot", "progressive", "extraction"} and all(0 < s <= 40 for s in steps.values())
    checks = out["checks"]
    assert checks["extraction/one_shot"]["ratio"] == pytest.approx(steps["extraction"] / steps["one_shot"], abs=0.01)
    assert all(c["passed"] == (c["ratio"] <= c["bound"]) for c in checks.values())
    assert out["passed"] == all(c["passed"] for c in checks.values())
    assert proc.returncode == (0 if out["passed"] else 1)
    assert ("CLAIM FAILED" in proc.stderr) is not out["passed"]
    assert (tmp_path / "out" / "parity" / "results.json").is_file()
