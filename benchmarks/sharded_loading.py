"""Host memory of loading a model sharded (pocl_ray.sharding.load_sharded) on `--world` gloo processes: prints
one JSON object with, per rank, the growth of its peak RSS (VmHWM, reset just before the load) over its RSS
just before the load, and its RSS growth once loaded, against one fp32 copy of the model. Rank 0 reads the
whole model (it is the one copy); the others should hold their shards and one tensor in flight. On the CPU the
shards themselves are host memory (1/world of the copy); on GPUs they are not, and only the transient is.

    python benchmarks/sharded_loading.py                  # 2 processes, a Llama of ~100M parameters
    python benchmarks/sharded_loading.py --world 4 --hidden 1024 --layers 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocl_ray.models import build_tiny_model, load_model
from pocl_ray.sharding import load_sharded

MIB = 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def reset_peak_rss() -> None:
    # Linux: "5" resets this process's peak RSS (VmHWM) to its current RSS. ru_maxrss would not do: a spawned
    # process starts with its parent's peak (kept across exec), and it cannot be reset.
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reset_peak_rss()
    before = rss_mib()
    model = load_sharded(lambda: load_model(folder, dtype=torch.float32), device=torch.device("cpu"), trainable=True)
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / MIB
    growth = peak_rss_mib() - before
    result = [None] * world if rank == 0 else None
    after = rss_mib() - before
    dist.gather_object(
        {"rank": rank, "peak_growth_mib": growth, "growth_after_mib": after, "shards_held_mib": held}, result, dst=0
    )
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--port", type=int, default=29544)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(
            "llama", args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=12, save_dir=tmp
        )
        fp32_mib = sum(p.numel() * 4 for p in model.parameters()) / MIB
        del model
        out = str(Path(tmp) / "result.json")
        mp.spawn(worker, args=(args.world, args.port, tmp, out), nprocs=args.world)
        ranks = json.loads(Path(out).read_text())
    others = max(r["peak_growth_mib"] for r in ranks if r["rank"] != 0)
    print(
        json.dumps(
            {
                "config": vars(args),
                "one_fp32_copy_mib": fp32_mib,
                "ranks": ranks,
                "max_other_rank_growth_over_one_fp32_copy": others / fp32_mib,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
