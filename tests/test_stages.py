"""Stage helpers without Ray: resumable stages, progress lines, actor resource arguments.
(`init_ray` against live and stale Ray heads is in test_ray_start.py.)"""

from __future__ import annotations

import json

from pocl_ray.config import parse_config
from pocl_ray.stages import SCORE_KEYS, TRAIN_KEYS, actor_resources, fingerprint, progress_line, run_stage


def test_fingerprint_follows_only_its_sections():
    cfg = parse_config({"data": {"train": "x"}, "models": {"teacher": "t"}})
    lr = cfg.with_overrides({"training.lr": cfg.training.lr * 2})
    assert fingerprint(cfg, SCORE_KEYS) == fingerprint(lr, SCORE_KEYS)
    assert fingerprint(cfg, TRAIN_KEYS) != fingerprint(lr, TRAIN_KEYS)
    assert fingerprint(cfg, SCORE_KEYS, {"a": 1}) != fingerprint(cfg, SCORE_KEYS)


def test_run_stage_skips_resumes_and_redoes(tmp_path, capsys):
    stage = tmp_path / "stage"
    calls = []

    def work() -> None:
        calls.append(sorted(p.name for p in stage.iterdir()))
        (stage / "out.txt").write_text("x")

    assert run_stage("s", stage, "k1", work) is True
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[pipeline] s: starting ({stage})" and out[1].startswith("[pipeline] s: finished in ")
    assert json.loads((stage / ".stage.json").read_text())["done"] is True

    assert run_stage("s", stage, "k1", work) is False
    assert "done already for this config, skipped" in capsys.readouterr().out

    (stage / ".stage.json").write_text(json.dumps({"key": "k1", "done": False}))  # interrupted
    assert run_stage("s", stage, "k1", work) is True
    assert calls[-1] == [".stage.json", "out.txt"]  # its outputs so far are kept
    assert "resuming an unfinished run" in capsys.readouterr().out

    assert run_stage("s", stage, "k2", work) is True
    assert calls[-1] == [".stage.json"]  # stale outputs cleared
    assert "config changed since the last run, redoing" in capsys.readouterr().out
    assert len(calls) == 3


def test_progress_line():
    assert progress_line("score", 250, 1000, 10.0) == "[score] 250/1000 rows (25%), 25.0 rows/s, ETA 0m30s"
    assert progress_line("eval", 0, 10, 0.0) == "[eval] 0/10 rows (0%), 0.0 rows/s, ETA ?"
    assert progress_line("score", 10, 72010, 1.0).endswith("ETA 2h00m")


def test_actor_resources_leave_out_the_cpu_ray_reserves_for_a_gpu_actor():
    assert actor_resources(1.0, 0.0) == {"num_cpus": 1.0}
    assert actor_resources(2.0, 0.0) == {"num_cpus": 2.0}
    assert actor_resources(1.0, 1.0) == {"num_gpus": 1.0}
    assert actor_resources(4.0, 0.5) == {"num_gpus": 0.5, "num_cpus": 4.0}
