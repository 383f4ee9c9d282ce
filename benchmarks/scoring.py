"""Throughput of the Ray Data scoring path against a bare single-process torch loop, in one run.

Both sides score the same rows with the same models, device and thread count, and both run the
same per-batch measurer (`scoring.measure` on length-sorted windows of batch_size * length_window
rows), so the ratio is what Ray Data adds or loses: reading, validation and tokenisation in tasks,
the actor pool, the uid bookkeeping, fusion, the parquet write (and the rank sort when on).

- bare: tokenise with `data.validate_and_tokenize`, load the models, loop `measure` over the rows.
- ray:  `scoring.score_dataset` end to end (read -> ... -> write), timed after `ray.init`, whose
        start-up is reported separately; with the rank sort on (the default) and off.

The three variants run interleaved `--repeats` times and each reports its best time (all times are
listed too): shared CPUs make wall-clock figures swing with other people's load, so the machine's
load average is recorded as well. Prints one JSON object; `ratio_*` = Ray rows/s over bare rows/s
(target >= 0.9).

Priority: Ray starts its workers at nice 15 while this process (the bare loop) runs at nice 0; on a
machine shared with other work that alone cut the workers' CPU share and made the Ray path look
slower for reasons that have nothing to do with Ray Data. The benchmark therefore starts Ray with
RAY_worker_niceness=0 (as Ray's job manager does for job drivers), unless the variable is set.

Threads: one torch thread by default on both sides. On a shared 2-core machine, two threads made
this small model's loop 6x slower (OpenMP synchronisation under contention), which would swamp
what is being compared.

    python benchmarks/scoring.py                       # 1024 rows, Llama hidden 256 x 4 layers, vocab 4096
    python benchmarks/scoring.py --rows 128 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocl_ray.config import parse_config  # noqa: E402
from pocl_ray.data import build_prompt, read_table, validate_and_tokenize  # noqa: E402
from pocl_ray.models import build_tiny_model, build_tiny_tokenizer, load_tokenizer  # noqa: E402
from pocl_ray.scoring import load_measurer_models, measure, score_dataset  # noqa: E402

WORDS = (
    "the a river stone cloud green quick brown fox lazy dog bright moon silver tree small house north "
    "wind cold fire blue sea old road light dark over under between slowly quietly again never always "
    "water city garden window paper music morning evening friend market bridge mountain story question"
).split()


def synthetic_records(n: int, seed: int) -> list[dict]:
    """Instruction rows with Dolly-like spreads of prompt (10-80 words) and response (5-60 words) lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        out.append({"id": f"r{i:05d}", "instruction": words(5, 30), "context": words(0, 50), "response": words(5, 60)})
    return out


def build_assets(root: Path, args) -> tuple[Path, Path]:
    records = synthetic_records(args.rows, seed=0)
    data_path = root / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [build_prompt(r["instruction"], r["context"], "dolly") + r["response"] for r in records]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=args.vocab)
    build_tiny_model("llama", args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     seed=0, save_dir=root / "teacher", tokenizer=tokenizer)
    return data_path, root / "teacher"


def bare_loop(cfg) -> dict:
    """Single process, no Ray: the same tokenisation, models and measurer over the same rows."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.models.teacher)
    good, rejects = validate_and_tokenize(read_table(cfg.data.train).to_pylist(), tokenizer, cfg.data)
    models = load_measurer_models(cfg.models, cfg.scoring.metrics, "cpu")
    window = cfg.scoring.batch_size * cfg.scoring.length_window
    for i in range(0, len(good), window):
        rows = {k: [r[k] for r in good[i : i + window]] for k in ("input_ids", "labels", "num_prompt_tokens", "num_response_tokens", "response")}
        measure(models, rows, cfg.scoring.metrics, batch_size=cfg.scoring.batch_size, max_new_tokens=cfg.scoring.max_new_tokens)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(good), "rejected": len(rejects), "tokens": sum(len(r["input_ids"]) for r in good)}


def rates(seconds: float, rows: int, tokens: int) -> dict:
    return {"seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length-window", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--metrics", default="student_ce,student_rougeL")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (= the actor's CPUs)")
    args = parser.parse_args()

    import ray

    threads = args.threads
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_path, teacher = build_assets(root, args)
        base = {
            "data": {"train": str(data_path), "max_prompt_length": 256, "max_length": 384},
            "models": {"teacher": str(teacher)},
            "scoring": {"metrics": args.metrics.split(","), "batch_size": args.batch_size,
                        "length_window": args.length_window, "max_new_tokens": args.max_new_tokens,
                        "num_actors": 1, "num_cpus_per_actor": threads},
            "output": {"dir": str(root / "run")},
        }
        cfg = parse_config(base)
        load_before = os.getloadavg()
        os.environ.setdefault("RAY_worker_niceness", "0")
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=threads + 1, include_dashboard=False)  # +1 for Data's small tasks
        ray_init_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {"bare": [], "ray_sorted": [], "ray_unsorted": []}
        for _ in range(args.repeats):
            bare = bare_loop(cfg)
            times["bare"].append(bare["seconds"])
            for name, sort in (("ray_sorted", True), ("ray_unsorted", False)):
                t0 = time.perf_counter()
                result = score_dataset(cfg.with_overrides({"scoring.sort_output": sort}))
                times[name].append(time.perf_counter() - t0)
                assert result.manifest["rows_scored"] == bare["rows"], result.manifest
        ray.shutdown()
        load_after = os.getloadavg()

    best = {name: rates(min(t), bare["rows"], bare["tokens"]) for name, t in times.items()}
    print(json.dumps({
        "benchmark": "scoring",
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]),
        "model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "student": "cut from teacher (keep_every 2)"},
        "metrics": args.metrics.split(","),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "length_window": args.length_window,
        "rows": bare["rows"],
        "tokens": bare["tokens"],
        **best,
        "all_seconds": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "ray_init_seconds": round(ray_init_s, 3),
        "ratio_sorted": round(best["ray_sorted"]["rows_per_s"] / best["bare"]["rows_per_s"], 3),
        "ratio_unsorted": round(best["ray_unsorted"]["rows_per_s"] / best["bare"]["rows_per_s"], 3),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
