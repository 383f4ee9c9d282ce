"""Curriculum extraction's claim on the sparse-parity sandbox, checked: exit 1 when it fails.

Claim (Gupta & Karmalkar, 2025; METHODS.md §2), in steps to reach `target_accuracy` held-out accuracy
averaged over the seeds, every optimizer step of the student counted (hidden matching included):

    extraction <= 0.5 x one-shot KD      and      extraction <= 1.5 x progressive distillation

Runs `run_parity` (the `pocl-ray parity` path: one Ray task per teacher and per (seed, method)) on
the given config, default configs/parity.yaml, and compares the censored mean steps of
`summarize`: a run that never reaches the target counts as the whole budget. That only ever makes
the claim harder to pass: a censored extraction run counts more steps than it needed, a censored
one-shot or progressive run fewer. About 10 minutes on 2 idle CPU cores.

    python benchmarks/parity_claims.py [--config configs/parity.yaml] [--output runs/parity-claims]

Prints the parity summary, then one JSON object: wall seconds, per-method steps, the ratios, the
bounds and `passed`. Exit code 0 when both bounds hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pocl_ray.parity.config import load_parity_config
from pocl_ray.parity.runner import run_parity
from pocl_ray.parity.sandbox import CLAIM_BOUNDS, check_claims

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "parity.yaml")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "parity-claims")
    args = parser.parse_args(argv)

    cfg = load_parity_config(args.config)
    missing = sorted(set(CLAIM_BOUNDS) - set(cfg.methods))
    if missing:
        parser.error(f"{args.config}: methods must include {missing} to check the claim")
    results = run_parity(cfg, args.output)
    checks = check_claims(results["summary"])
    report = {
        "benchmark": "parity_claims",
        "config": str(args.config),
        "wall_seconds": results["wall_seconds"],
        "target_accuracy": cfg.target_accuracy,
        "censored_mean_steps": {m: s["censored_mean_steps"] for m, s in results["summary"]["methods"].items()},
        "reached": {m: f"{s['reached']}/{s['runs']}" for m, s in results["summary"]["methods"].items()},
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
    }
    print(json.dumps(report, indent=1))
    if not report["passed"]:
        failed = ", ".join(f"{name} = {c['ratio']:.2f} > {c['bound']}" for name, c in checks.items() if not c["passed"])
        print(f"CLAIM FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
