"""Peak memory and time of ``kd_loss`` (gather scored rows, fp32 chunks, checkpointed) against a naive
full-tensor KD loss, forward + backward, on one realistic batch. Prints one JSON object.

Peak memory is measured above what the inputs already hold:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: PyTorch keeps no CPU allocator statistics, so the peak is rebuilt from the profiler's raw
  allocation records (every CPU allocation and free the allocator reports, in time order). Timings
  come from separate runs without the profiler.

    python benchmarks/loss_memory.py                       # GPU: 8 x 512 x 49152 bf16; CPU: 4 x 256 x 16384
    python benchmarks/loss_memory.py --kinds fkl,akl --batch 2 --seq 128 --vocab 8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocl_ray import losses  # noqa: E402

MIB = 2**20


def naive_kd_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook loss: the same divergence on the full (batch, seq-1, vocab) fp32 log-probs, masked afterwards."""
    divergence = losses._divergence(kind, alpha=0.1, beta=0.5, mu=0.5)
    logq = torch.log_softmax(student[:, :-1].float() / temperature, dim=-1)
    logp = torch.log_softmax(teacher[:, :-1].detach().float() / temperature, dim=-1)
    per_pos = divergence(logp.flatten(0, 1), logq.flatten(0, 1)).view(labels.shape[0], -1)
    scored = labels[:, 1:] != losses.IGNORE_INDEX
    return (per_pos * scored).sum() * temperature**2 / scored.sum().clamp_min(1)


def make_inputs(batch: int, seq: int, vocab: int, dtype: torch.dtype, device: torch.device, prompt_fraction: float):
    g = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(batch, seq, vocab, generator=g, device=device) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(batch, seq, vocab, generator=g, device=device) * 2).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g, device=device)
    # Prompt tokens are not scored, as in instruction distillation; row lengths vary a little.
    prompt = (seq * prompt_fraction + torch.randint(-seq // 16, seq // 16 + 1, (batch,), generator=g, device=device)).clamp(0, seq)
    labels[torch.arange(seq, device=device) < prompt.unsqueeze(1)] = losses.IGNORE_INDEX
    return student, teacher, labels


def step(fn, student: torch.Tensor) -> float:
    loss = fn()
    (grad,) = torch.autograd.grad(loss, student)
    del grad
    return loss.item()


def peak_extra_mib(run, device: torch.device) -> float:
    """Peak memory allocated while run() executes, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak / MIB


def known_peak(device: torch.device) -> float:
    """A step with a known 12 MiB peak (4 + 8 MiB live, 4 freed, 4 allocated): checks the method."""
    a = torch.ones(MIB, device=device)
    b = torch.ones(2 * MIB, device=device)
    del a
    c = torch.ones(MIB, device=device)
    return (b.sum() + c.sum()).item()


def median_ms(fn, student: torch.Tensor, device: torch.device, repeats: int) -> float:
    step(fn, student)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(fn, student)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(losses.KD_KINDS))
    parser.add_argument("--batch", type=int, default=8 if cuda else 4)
    parser.add_argument("--seq", type=int, default=512 if cuda else 256)
    parser.add_argument("--vocab", type=int, default=49152 if cuda else 16384)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--prompt-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5 if cuda else 3)
    parser.add_argument("--threads", type=int, help="CPU threads; 1 avoids a wait per op when the cores are oversubscribed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if cuda else "cpu")
    student, teacher, labels = make_inputs(
        args.batch, args.seq, args.vocab, getattr(torch, args.dtype), device, args.prompt_fraction
    )
    results = {}
    for kind in args.kinds.split(","):
        variants = {
            "chunked": lambda: losses.kd_loss(kind, student, teacher, labels, temperature=args.temperature, chunk_size=args.chunk_size),
            "naive": lambda: naive_kd_loss(kind, student, teacher, labels, args.temperature),
        }
        row = {}
        for name, fn in variants.items():
            row[name] = {
                "loss": step(fn, student),
                "peak_extra_mib": round(peak_extra_mib(lambda: step(fn, student), device), 1),
                "median_ms": round(median_ms(fn, student, device, args.repeats), 2),
            }
        row["memory_ratio_naive_over_chunked"] = round(row["naive"]["peak_extra_mib"] / row["chunked"]["peak_extra_mib"], 2)
        row["time_ratio_chunked_over_naive"] = round(row["chunked"]["median_ms"] / row["naive"]["median_ms"], 2)
        row["loss_rel_diff"] = abs(row["chunked"]["loss"] - row["naive"]["loss"]) / abs(row["naive"]["loss"])
        results[kind] = row

    fp32_tensor_mib = args.batch * args.seq * args.vocab * 4 / MIB
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "memory_method": "torch.cuda.max_memory_allocated" if cuda else "torch.profiler CPU allocation records",
        "memory_method_check_expect_12_mib": round(peak_extra_mib(lambda: known_peak(device), device), 2),
        "shape": [args.batch, args.seq, args.vocab],
        "dtype": args.dtype,
        "scored_positions": int(losses.count_tokens(labels)),
        "chunk_size": args.chunk_size,
        "temperature": args.temperature,
        "one_fp32_logits_tensor_mib": round(fp32_tensor_mib, 1),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
