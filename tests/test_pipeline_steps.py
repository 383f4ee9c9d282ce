"""Resumable pipeline steps keyed by a config fingerprint (no Ray)."""

from __future__ import annotations

import json

from pocl_ray.config import parse_config
from pocl_ray.pipeline_steps import SCORE_KEYS, TRAIN_KEYS, fingerprint, run_pipeline_step


def test_fingerprint_follows_only_its_sections():
    cfg = parse_config({"data": {"train": "x"}, "models": {"teacher": "t"}})
    lr = cfg.with_overrides({"training.lr": cfg.training.lr * 2})
    assert fingerprint(cfg, SCORE_KEYS) == fingerprint(lr, SCORE_KEYS)
    assert fingerprint(cfg, TRAIN_KEYS) != fingerprint(lr, TRAIN_KEYS)
    assert fingerprint(cfg, SCORE_KEYS, {"a": 1}) != fingerprint(cfg, SCORE_KEYS)


def test_run_pipeline_step_skips_resumes_and_redoes(tmp_path, capsys):
    stage = tmp_path / "stage"
    calls = []

    def work() -> None:
        calls.append(sorted(p.name for p in stage.iterdir()))
        (stage / "out.txt").write_text("x")

    assert run_pipeline_step("s", stage, "k1", work) is True
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[pipeline] s: starting ({stage})" and out[1].startswith("[pipeline] s: finished in ")
    assert json.loads((stage / ".stage.json").read_text())["done"] is True

    assert run_pipeline_step("s", stage, "k1", work) is False
    assert "done already for this config, skipped" in capsys.readouterr().out

    (stage / ".stage.json").write_text(json.dumps({"key": "k1", "done": False}))  # interrupted
    assert run_pipeline_step("s", stage, "k1", work) is True
    assert calls[-1] == [".stage.json", "out.txt"]  # its outputs so far are kept
    assert "resuming an unfinished run" in capsys.readouterr().out

    assert run_pipeline_step("s", stage, "k2", work) is True
    assert calls[-1] == [".stage.json"]  # stale outputs cleared
    assert "config changed since the last run, redoing" in capsys.readouterr().out
    assert len(calls) == 3
