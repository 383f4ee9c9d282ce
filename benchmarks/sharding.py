"""DDP against FSDP (training.strategy) on the same student, teacher and batches, at each of `--worlds` gloo
process counts on the CPU. Each process runs the project's step functions (`training.step`: the same calls as a
Ray Train worker, without Ray) and prints, per rank: the bytes of the student's parameters, gradients and AdamW
state it holds (local shards under FSDP), the growth of its peak RSS while the student and the online teacher
load (VmHWM, reset just before), and the run's tokens/s; then FSDP/DDP ratios per world size. One JSON object.

Under DDP every rank reads both models whole; under FSDP rank 0 reads them and the others receive their
shards (`sharding.load_sharded`), the teacher sharded too (training.teacher_sharding: fsdp).

    python benchmarks/sharding.py                           # W = 2 and 4, a Llama student of ~40M parameters
    python benchmarks/sharding.py --worlds 2 --hidden 512 --layers 8 --steps 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharded_loading import peak_rss_mib, reset_peak_rss, rss_mib  # this folder: the script's own

from pocl_ray.config import KDConfig
from pocl_ray.curriculum import Stage
from pocl_ray.data import IGNORE_INDEX
from pocl_ray.models import build_tiny_model, load_model
from pocl_ray.sharding import load_sharded
from pocl_ray.training.step import accumulate_gradients, adamw, build_batch, optimizer_step
from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher

MIB = 2**20
PAD = 0


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
    return total


def rank_batches(rank: int, args) -> list[dict]:
    """This rank's micro-batches of one step: random tokens, the second half of each row scored."""
    g = torch.Generator().manual_seed(1000 + rank)
    rows = []
    for _ in range(args.micro_batches * args.micro_batch):
        ids = torch.randint(1, args.vocab, (args.seq,), generator=g).tolist()
        half = args.seq // 2
        rows.append({"input_ids": ids, "attention_mask": [1] * args.seq, "labels": [IGNORE_INDEX] * half + ids[half:]})
    micro = args.micro_batch
    return [build_batch(rows[i : i + micro], PAD, torch.device("cpu")) for i in range(0, len(rows), micro)]


def load(strategy: str, folders: dict[str, str]) -> tuple[torch.nn.Module, OnlineTeacher]:
    cpu = torch.device("cpu")
    if strategy == "fsdp":
        student = load_sharded(lambda: load_model(folders["student"], dtype=torch.float32), device=cpu, trainable=True)
        teacher = load_sharded(lambda: load_model(folders["teacher"], dtype=torch.float32), device=cpu, trainable=False)
        return HiddenStatesLM(student), OnlineTeacher(teacher)
    student = load_model(folders["student"], dtype=torch.float32)
    student.train()
    teacher = load_model(folders["teacher"], dtype=torch.float32, frozen=True)
    return torch.nn.parallel.DistributedDataParallel(HiddenStatesLM(student)), OnlineTeacher(teacher)


def worker(rank: int, world: int, port: int, strategy: str, folders: dict[str, str], args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reset_peak_rss()
    before = rss_mib()
    student, teacher = load(strategy, folders)
    loading_peak = peak_rss_mib() - before
    optimizer = adamw(student, 1e-4, 0.01)
    stage = Stage(index=0, buckets=(0,), steps=args.steps, kd_weight=0.5, loss="fkl")
    kd, batches = KDConfig(), rank_batches(rank, args)
    params = [p for p in student.parameters()]
    held: dict[str, int] = {}
    tokens, started = 0, 0.0
    for step in range(args.steps + 1):  # step 0 warms up (and creates the AdamW state) untimed
        if step == 1:
            dist.barrier()
            started = time.perf_counter()
        values = accumulate_gradients(student, teacher, batches, stage, kd)
        held["grads"] = local_bytes(p.grad for p in params)
        optimizer_step(student, optimizer, 1e-4, 1.0)
        tokens += int(values.kd_tokens) if step else 0
    dist.barrier()
    seconds = time.perf_counter() - started
    held["params"] = local_bytes(params)
    held["optimizer"] = local_bytes(v for state in optimizer.state.values() for v in state.values())
    # DDP's reducer holds the process group: dropped here, with no collective in flight. Freed at the function's
    # end instead, it joined gloo's threads while holding the GIL that one of them waited for (a hang, seen).
    del student, teacher, optimizer, params
    gc.collect()
    result = {
        "rank": rank,
        "params_grads_optimizer_mib": sum(held.values()) / MIB,
        **{f"{k}_mib": v / MIB for k, v in held.items()},
        "loading_peak_growth_mib": loading_peak,
        "tokens_per_second": tokens / seconds,
    }
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(result, gathered, dst=0)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def run(strategy: str, world: int, folders: dict[str, str], args, tmp: str) -> list[dict]:
    out = str(Path(tmp) / f"{strategy}-{world}.json")
    port = args.port + 10 * world + (strategy == "fsdp")
    mp.spawn(worker, args=(world, port, strategy, folders, args, out), nprocs=world)
    return sorted(json.loads(Path(out).read_text()), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512, help="the student's; the teacher is twice as wide")
    parser.add_argument("--layers", type=int, default=8, help="both models'")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--port", type=int, default=29600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"student": str(Path(tmp) / "student"), "teacher": str(Path(tmp) / "teacher")}
        sizes = {}
        for name, hidden in (("student", args.hidden), ("teacher", 2 * args.hidden)):
            model = build_tiny_model(
                "llama", args.vocab, hidden_size=hidden, num_layers=args.layers, num_heads=8, save_dir=folders[name]
            )
            sizes[f"{name}_fp32_mib"] = sum(p.numel() * 4 for p in model.parameters()) / MIB
            del model
        results = {f"{s}@{w}": run(s, w, folders, args, tmp) for w in args.worlds for s in ("ddp", "fsdp")}
    ratios = {}
    for w in args.worlds:
        ddp, fsdp = results[f"ddp@{w}"], results[f"fsdp@{w}"]
        ratios[str(w)] = {
            "params_grads_optimizer_fsdp_over_ddp": max(r["params_grads_optimizer_mib"] for r in fsdp)
            / max(r["params_grads_optimizer_mib"] for r in ddp),
            "target_at_most": 1 / w + 0.1,
            "loading_peak_other_ranks_fsdp_over_ddp": max(r["loading_peak_growth_mib"] for r in fsdp[1:])
            / max(r["loading_peak_growth_mib"] for r in ddp[1:]),
            "loading_peak_other_ranks_over_teacher_fp32": max(r["loading_peak_growth_mib"] for r in fsdp[1:])
            / sizes["teacher_fp32_mib"],
            "tokens_per_second_fsdp_over_ddp": fsdp[0]["tokens_per_second"] / ddp[0]["tokens_per_second"],
        }
    print(json.dumps({"config": vars(args), **sizes, "runs": results, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
