"""`pocl-ray score | train | eval | tune | run | report | parity` — thin wrappers over the Python APIs.

User errors (bad config, missing files) print one clear message and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

from pocl_ray import storage
from pocl_ray.config import ConfigError, RunConfig, load_config
from pocl_ray.preflight import check_inputs


def _config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config)
    if getattr(args, "output", None):
        cfg = cfg.with_overrides({"output.dir": args.output})
    return cfg


def _score(args: argparse.Namespace) -> None:
    from pocl_ray.ray_session import init_ray
    from pocl_ray.scoring import format_summary, score_dataset

    cfg = _config(args)
    sources = check_inputs(cfg)
    init_ray()
    result = score_dataset(cfg, sources)
    print(format_summary(result.manifest))


def _train(args: argparse.Namespace) -> None:
    from pocl_ray.ray_session import init_ray
    from pocl_ray.training.driver import train

    cfg = _config(args)
    sources = check_inputs(cfg, args.scores, training=True)
    init_ray()
    result = train(cfg, scores_dir=args.scores, sources=sources)
    print(f"student saved to {result.student_dir}")


def _eval(args: argparse.Namespace) -> None:
    from pocl_ray.evaluation import evaluate
    from pocl_ray.ray_session import init_ray
    from pocl_ray.training.driver import selected_student

    cfg = _config(args)
    sources = check_inputs(cfg)
    init_ray()
    model = args.model or str(selected_student(storage.join(cfg.output.dir, "train"), cfg.eval.checkpoint))
    result = evaluate(cfg, model, label=args.label, sources=sources)
    print(f"results written to {result.results_path}")


def _tune(args: argparse.Namespace) -> None:
    from pocl_ray.tuning import tune

    result = tune(_config(args))
    print(f"results: {result.results_csv}\nbest config: {result.best_config_path}")


def _run(args: argparse.Namespace) -> None:
    from pocl_ray.pipeline import run_distill

    report = run_distill(_config(args))
    print(f"report: {report}")


def _report(args: argparse.Namespace) -> None:
    from pocl_ray.report import write_report

    print(f"report: {write_report(args.output)}")


def _parity(args: argparse.Namespace) -> None:
    from pocl_ray.parity.config import load_parity_config
    from pocl_ray.parity.runner import run_parity

    run_parity(load_parity_config(args.config), args.output)  # a folder or a URI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocl-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, fn, help_: str, *, config_required: bool = True, ray_data: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=config_required, help="run config YAML")
        p.add_argument("--output", help="output directory (overrides output.dir)")
        if ray_data:
            p.add_argument("--verbose", action="store_true", help="Ray Data's own progress display too")
        p.set_defaults(fn=fn)
        return p

    add("score", _score, "score difficulty, rank easy->hard, cut buckets")
    p = add("train", _train, "distil the student along the curriculum plan", ray_data=False)
    p.add_argument("--scores", help="scores directory (default: OUTPUT/scores)")
    p = add("eval", _eval, "generate on the eval sets and compute ROUGE-L")
    p.add_argument(
        "--model",
        help="model folder (default: the student eval.checkpoint selects, "
        "OUTPUT/train/student_best or OUTPUT/train/student)",
    )
    p.add_argument("--label", default=None, help="sub-folder of OUTPUT/eval for this model's results")
    add("tune", _tune, "sweep curriculum settings with Ray Tune")
    add("run", _run, "score -> train -> eval -> report")
    p = sub.add_parser("report", help="write OUTPUT/report/report.md with plots")
    p.add_argument("--output", required=True, help="run directory")
    p.set_defaults(fn=_report)
    p = add("parity", _parity, "the sparse-parity curriculum-extraction sandbox", config_required=False, ray_data=False)
    p.set_defaults(output="runs/parity")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "verbose" in args:  # the commands that run Ray Data
        from pocl_ray.ray_session import quiet_ray_data

        quiet_ray_data(args.verbose)
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"pocl-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pocl-ray {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except RuntimeError as err:
        from pocl_ray.tuning import SweepInterrupted

        if not isinstance(err, SweepInterrupted):
            raise
        print(f"pocl-ray {args.command}: {err}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
