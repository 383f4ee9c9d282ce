"""What gathering the LM heads for the chunked loss costs under FSDP2: prints one JSON object.

Two ways to have both heads whole for `losses.linear_kd_and_ce`, on `--world` gloo processes (CPU; the same
script runs with NCCL on GPUs):
- kept (pocl_ray.sharding): the roots (final norm and LM head, plus a tied embedding) are not resharded after
  forward, so the loss reads the heads the forward gathered; the teacher's is released after the loss.
- regathered: the roots are resharded after forward and gathered again around the loss (unshard / reshard),
  one more all-gather of each root per micro-batch.
Rank 0's figures: the bytes a root holds whole while the loss runs (the same either way: the loss needs
them) and sharded; the median wall and process CPU seconds (the gloo threads included; robust to other
processes on a shared machine) of one micro-batch (teacher forward, student forward, loss, backward) each way.

    python benchmarks/sharded_loss.py                       # 2 processes, vocab 32768, hidden 256
    python benchmarks/sharded_loss.py --world 4 --vocab 65536
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocl_ray.losses import linear_kd_and_ce
from pocl_ray.models import build_tiny_model
from pocl_ray.sharding import final_hidden_states, load_sharded, release

MIB = 2**20


def root_bytes(lm) -> int:
    """Bytes of the root's own parameters when whole (the final norm, the head, a tied embedding)."""
    head, embedding = lm.get_output_embeddings().weight, lm.get_input_embeddings().weight
    tensors = {id(t): t for t in (head, lm.base_model.norm.weight)}
    if embedding is head:
        tensors[id(embedding)] = embedding
    return sum(t.numel() * t.element_size() for t in tensors.values())


def micro_batch(student, teacher, batch, regather: bool) -> None:
    with torch.no_grad():
        t_final, _ = final_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
    s_final, _ = final_hidden_states(student, batch["input_ids"], batch["attention_mask"])
    if regather:  # the roots were freed after their forwards: gather them again for the loss
        teacher.unshard()
        student.unshard()
    labels = batch["labels"]
    loss, _, _ = linear_kd_and_ce(
        "js",
        s_final,
        student.get_output_embeddings().weight,
        t_final,
        teacher.get_output_embeddings().weight,
        labels,
        labels,
        kd_weight=0.5,
        temperature=2.0,
    )
    release(teacher)
    loss.backward()


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device("cpu")

    def build(hidden: int, seed: int):
        return lambda: build_tiny_model(
            "llama", args.vocab, hidden_size=hidden, num_layers=args.layers, num_heads=4, seed=seed
        )

    teacher = load_sharded(build(args.hidden * 2, 0), device=device, trainable=False)
    student = load_sharded(build(args.hidden, 1), device=device, trainable=True)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    result = {
        "root_whole_mib": {"student": root_bytes(student) / MIB, "teacher": root_bytes(teacher) / MIB},
        "root_shard_mib": {"student": root_bytes(student) / MIB / world, "teacher": root_bytes(teacher) / MIB / world},
    }
    for regather in (False, True):
        for model in (student, teacher):
            model.set_reshard_after_forward(regather, recurse=False)
        wall, cpu = [], []
        for _ in range(args.warmup + args.repeats):
            dist.barrier()
            start = (time.perf_counter(), time.process_time())
            micro_batch(student, teacher, batch, regather)
            student.zero_grad(set_to_none=True)
            wall.append(time.perf_counter() - start[0])
            cpu.append(time.process_time() - start[1])
        result["regathered" if regather else "kept"] = {
            "median_s": statistics.median(wall[args.warmup :]),
            "median_cpu_s": statistics.median(cpu[args.warmup :]),
        }
    for measure in ("median_s", "median_cpu_s"):
        result[f"ratio_regathered_over_kept_{measure}"] = result["regathered"][measure] / result["kept"][measure]
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256, help="the student's; the teacher's is twice it")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(worker, args=(args.world, args.port, args, out), nprocs=args.world)
        result = json.loads(Path(out).read_text())
    print(json.dumps({"config": vars(args), **result}, indent=1))


if __name__ == "__main__":
    main()
