"""Peak memory and time of the KD loss three ways, forward + backward, LM head included: prints one JSON object.

- naive: full (batch, seq, vocab) logits ``hidden @ head.T`` for both models, then the divergence on
  the full fp32 log-probs, masked afterwards (the textbook loss);
- chunked: the same full logits, then ``kd_loss`` (scored rows gathered, fp32 chunks, each chunk's
  gradient taken at once);
- linear: ``linear_kd_loss`` on the hidden states and head weights (logits made one chunk of scored
  positions at a time, never for the whole batch).

All three start from the same hidden states and head weights and return gradients to the student's
hidden states and head, so the matmul to logits and its backward are inside every measurement.

Peak memory is measured above what the inputs already hold:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: PyTorch keeps no CPU allocator statistics, so the peak is rebuilt from the profiler's raw
  allocation records (every CPU allocation and free the allocator reports, in time order). Timings
  come from separate runs without the profiler.

``--chunk-positions-sweep 64,128,256`` adds a sweep of the linear loss over chunk lengths (scored positions per
chunk) (first kind only): how the default ``losses.DEFAULT_CHUNK_POSITIONS`` was chosen.

    python benchmarks/loss_memory.py             # GPU: 2 x 8192 tokens, hidden 576, vocab 49152, bf16
    python benchmarks/loss_memory.py --kinds fkl,js --batch 2 --seq 256 --hidden 64 --vocab 4096   # CPU, small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocl_ray import losses
from pocl_ray.data import IGNORE_INDEX

MIB = 2**20


def naive_kd_loss(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The textbook loss: the same divergence on the full (batch, seq-1, vocab) fp32 log-probs, masked
    afterwards, its gradient by autograd through the divergence's terms."""
    logq = torch.log_softmax(student[:, :-1].float() / temperature, dim=-1).flatten(0, 1)
    logp = torch.log_softmax(teacher[:, :-1].detach().float() / temperature, dim=-1).flatten(0, 1)
    if kind == "akl":
        with torch.no_grad():
            p = logp.exp()
            w = losses._akl_head_weight(p, (p - logq.exp()).abs(), mu=0.5)
        fkl, rkl = (losses._pointwise(k, 0.1, 0.5)(logp, logq).sum(-1) for k in ("fkl", "rkl"))
        per_row = w * fkl + (1 - w) * rkl
    else:
        per_row = losses._pointwise(kind, skew_alpha=0.1, beta=0.5)(logp, logq).sum(-1)
    per_pos = per_row.view(labels.shape[0], -1)
    scored = labels[:, 1:] != IGNORE_INDEX
    return (per_pos * scored).sum() * temperature**2 / scored.sum().clamp_min(1)


def make_inputs(
    batch: int, seq: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, prompt_fraction: float
):
    """Student and teacher hidden states and heads (student ones trainable) and labels with prompt masks."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    # Scales that give logits of standard deviation about 2, as in the logits-only version of this benchmark.
    student = (
        randn(batch, seq, hidden, scale=1.0).requires_grad_(),
        randn(vocab, hidden, scale=2 / hidden**0.5).requires_grad_(),
    )
    teacher = (randn(batch, seq, hidden, scale=1.0), randn(vocab, hidden, scale=2 / hidden**0.5))
    labels = torch.randint(0, vocab, (batch, seq), generator=g, device=device)
    # Prompt tokens are not scored, as in instruction distillation; row lengths vary a little.
    jitter = torch.randint(-seq // 16, seq // 16 + 1, (batch,), generator=g, device=device) if prompt_fraction else 0
    prompt = (seq * prompt_fraction + jitter).clamp(0, seq) if prompt_fraction else torch.zeros(batch, device=device)
    labels[torch.arange(seq, device=device) < prompt.unsqueeze(1)] = IGNORE_INDEX
    return student, teacher, labels


def step(fn, trainable: tuple[torch.Tensor, ...]) -> float:
    loss = fn()
    grads = torch.autograd.grad(loss, trainable)
    del grads
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


def median_ms(fn, trainable, device: torch.device, repeats: int) -> float:
    step(fn, trainable)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(fn, trainable)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn, trainable, device: torch.device, repeats: int) -> dict:
    return {
        "loss": step(fn, trainable),
        "peak_extra_mib": round(peak_extra_mib(lambda: step(fn, trainable), device), 1),
        "median_ms": round(median_ms(fn, trainable, device, repeats), 2),
    }


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(losses.KD_KINDS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=8192 if cuda else 512)
    parser.add_argument("--hidden", type=int, default=576 if cuda else 128)
    parser.add_argument("--vocab", type=int, default=49152 if cuda else 8192)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16" if cuda else "float32")
    parser.add_argument("--chunk-positions", type=int, default=losses.DEFAULT_CHUNK_POSITIONS)
    parser.add_argument(
        "--chunk-positions-sweep",
        default="",
        help="comma-separated scored positions per chunk to sweep the linear loss over",
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--prompt-fraction", type=float, default=0.0, help="share of each row masked as prompt")
    parser.add_argument("--repeats", type=int, default=5 if cuda else 3)
    parser.add_argument(
        "--variants",
        default="naive,chunked,linear",
        help="which of naive, chunked, linear to measure (linear alone: the loss's own peak at sizes where the "
        "full logits of the other two do not fit)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads; 1 avoids a wait per op when the cores are oversubscribed"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if cuda else "cpu")
    (s_hidden, s_head), (t_hidden, t_head), labels = make_inputs(
        args.batch, args.seq, args.hidden, args.vocab, getattr(torch, args.dtype), device, args.prompt_fraction
    )
    trainable = (s_hidden, s_head)
    kinds = args.kinds.split(",")
    opts = dict(temperature=args.temperature)

    def teacher_logits():
        with torch.no_grad():
            return t_hidden @ t_head.T

    def naive(kind: str):
        return naive_kd_loss(kind, s_hidden @ s_head.T, teacher_logits(), labels, args.temperature)

    def chunked(kind: str):
        return losses.kd_loss(
            kind, s_hidden @ s_head.T, teacher_logits(), labels, chunk_positions=args.chunk_positions, **opts
        )

    def linear(kind: str, chunk_positions: int = args.chunk_positions):
        return losses.linear_kd_loss(
            kind, s_hidden, s_head, t_hidden, t_head, labels, chunk_positions=chunk_positions, **opts
        )

    results = {}
    for kind in kinds:
        variants = {"naive": naive, "chunked": chunked, "linear": linear}
        chosen = args.variants.split(",")
        row = {
            name: measure(partial(fn, kind), trainable, device, args.repeats)
            for name, fn in variants.items()
            if name in chosen
        }
        for other in [v for v in ("naive", "chunked") if v in row and "linear" in row]:
            # At a smoke size the in-place linear loss may hold nothing beyond its inputs: no ratio then.
            linear_peak = row["linear"]["peak_extra_mib"]
            row[f"memory_ratio_{other}_over_linear"] = (
                round(row[other]["peak_extra_mib"] / linear_peak, 2) if linear_peak > 0 else None
            )
            row[f"time_ratio_linear_over_{other}"] = round(row["linear"]["median_ms"] / row[other]["median_ms"], 2)
            row[f"loss_rel_diff_linear_vs_{other}"] = abs(row["linear"]["loss"] - row[other]["loss"]) / abs(
                row[other]["loss"]
            )
        results[kind] = row

    sweep = {}
    for size in (int(s) for s in args.chunk_positions_sweep.split(",") if s):
        fn = partial(linear, kinds[0], chunk_positions=size)
        sweep[size] = {k: v for k, v in measure(fn, trainable, device, args.repeats).items() if k != "loss"}

    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "memory_method": "torch.cuda.max_memory_allocated" if cuda else "torch.profiler CPU allocation records",
                "memory_method_check_expect_12_mib": round(peak_extra_mib(lambda: known_peak(device), device), 2),
                "shape": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "vocab": args.vocab},
                "dtype": args.dtype,
                "scored_positions": int(losses.count_tokens(labels)),
                "chunk_positions": args.chunk_positions,
                "temperature": args.temperature,
                "one_fp32_logits_tensor_mib": round(args.batch * args.seq * args.vocab * 4 / MIB, 1),
                "one_fp32_chunk_mib": round(args.chunk_positions * args.vocab * 4 / MIB, 1),
                "results": results,
                **({f"linear_{kinds[0]}_chunk_positions_sweep": sweep} if sweep else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
