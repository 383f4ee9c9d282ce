"""Training speed: the Ray Train path against the same step without Ray and a hand-written loop.

One process, one run, the same models, rows and batches on all three paths:
- `hand`: the plain PyTorch loop a user would write: the teacher in bf16 under `no_grad` (fp32 on
  CPU), the student in fp32 under bf16 autocast on CUDA, full-vocabulary logits from both models, FKL
  and CE at the scored positions, AdamW, grad clipping, a `.item()` read of the loss every step.
- `bare`: the project's step functions (`length_grouped`, `build_batch`, `accumulate_gradients`,
  `optimizer_step`) in a plain loop without Ray, step numbers read back every 20 steps.
- `ray`: `pocl_ray.training.driver.train` with one worker (the GPU when --device cuda), its step times from
  metrics.jsonl; `fixed_seconds` is the fit's wall time outside its step loop (Ray Train start-up,
  model loading, checkpoints, shutdown).
tokens/s counts every non-pad input token (both models read them all). Steady state: steps 2..N.

    python benchmarks/training.py --device cuda            # SmolLM2-135M-shaped 30-layer teacher, 10-layer student
    python benchmarks/training.py --device cpu             # tiny shapes that finish in minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocl_ray.config import parse_config
from pocl_ray.curriculum import lr_at, plan_from_config, stage_specs
from pocl_ray.models import load_model, load_tokenizer, resolve_dtype
from pocl_ray.probes import is_probe
from pocl_ray.seeds import stream_seed
from pocl_ray.shards import ScoresIndex, blocks, worker_shard
from pocl_ray.training.driver import train
from pocl_ray.training.step import accumulate_gradients, adamw, build_batch, length_grouped, optimizer_step
from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher, logits_form

GIB = 2**30
SHAPES = {
    # SmolLM2-135M: hidden 576, 9 heads (3 KV), MLP 1536, vocab 49,152, tied embeddings.
    "cuda": {
        "hidden": 576,
        "heads": 9,
        "kv_heads": 3,
        "mlp": 1536,
        "vocab": 49152,
        "teacher_layers": 30,
        "student_layers": 10,
        "rows": 1024,
        "min_len": 128,
        "max_len": 512,
        "batch": 64,
        "micro": 32,
        "steps": 40,
    },
    "cpu": {
        "hidden": 64,
        "heads": 4,
        "kv_heads": 2,
        "mlp": 176,
        "vocab": 2048,
        "teacher_layers": 4,
        "student_layers": 2,
        "rows": 256,
        "min_len": 32,
        "max_len": 96,
        "batch": 16,
        "micro": 8,
        "steps": 24,
    },
}


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly `vocab` tokens (pad, eos, unk, then "w<id>"): training scores the
    tokenizer's vocabulary, so it must cover every id the random rows hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_assets(root: Path, a) -> tuple[Path, Path, Path, np.ndarray]:
    """Random-init Llama teacher and student, a tokenizer, and `rows` random rows (prompt a quarter
    to a half of each row) as a scores directory; returns the rows' lengths by rank too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(a.vocab)
    paths = []
    for name, layers, seed in (("teacher", a.teacher_layers, 0), ("student", a.student_layers, 1)):
        config = LlamaConfig(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=a.mlp,
            num_hidden_layers=layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            tie_word_embeddings=True,
            max_position_embeddings=a.max_len,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(root / name)
    rng = np.random.default_rng(0)
    lengths = rng.integers(a.min_len, a.max_len + 1, size=a.rows)
    prompts = (lengths * rng.uniform(0.25, 0.5, size=a.rows)).astype(int)
    ids = [rng.integers(3, a.vocab, size=n).tolist() for n in lengths]
    labels = [[-100] * p + x[p:] for p, x in zip(prompts, ids)]
    scores = root / "scores"
    scores.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": [str(i) for i in range(a.rows)],
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "labels": pa.array(labels, pa.list_(pa.int32())),
                "num_prompt_tokens": pa.array(prompts, pa.int32()),
                "num_response_tokens": pa.array(lengths - prompts, pa.int32()),
                "rank": pa.array(np.arange(a.rows), pa.int64()),
            }
        ),
        scores / "rows.parquet",
        row_group_size=256,
    )
    (scores / "manifest.json").write_text(json.dumps({"scores_path": "rows.parquet", "num_buckets": 1}))
    return paths[0], paths[1], scores, lengths


def config(a, teacher: Path, student: Path, out: Path):
    return parse_config(
        {
            "name": "bench",
            "data": {"train": "unused", "max_prompt_length": a.max_len // 2, "max_length": a.max_len},
            "models": {"teacher": str(teacher), "student": str(student)},
            "curriculum": {"plan": "baseline", "num_buckets": 1, "steps_per_stage": a.steps},
            "kd": {"loss": "fkl"},
            "training": {
                "num_workers": 1,
                "use_gpu": a.device == "cuda",
                "cpus_per_worker": a.threads,
                "global_batch_size": a.batch,
                "micro_batch_size": a.micro,
                "lr": 1e-4,
                "checkpoint_every": 10**6,
                "max_failures": 0,
            },
            "output": {"dir": str(out)},
        }
    )


def planned_steps(cfg, scores: Path) -> list[list[np.ndarray]]:
    """The rank micro-batches of every step, as the coordinator deals them to one worker."""
    t = cfg.training
    index = ScoresIndex(scores / "rows.parquet")
    (spec,) = stage_specs(plan_from_config(cfg), index.num_rows, t.global_batch_size)
    pool = blocks(spec.pool_ranges, index.bounds)
    steps = []
    for epoch in range(spec.epoch_of(spec.steps - 1) + 1):
        shard = worker_shard(
            pool,
            seed=t.seed,
            stage=0,
            epoch=epoch,
            world_size=1,
            worker=0,
            global_batch=t.global_batch_size,
            micro_batch=t.micro_batch_size,
        )
        steps += [shard.step(k) for k in range(len(shard))]
    return steps[: spec.steps]


def read_all(scores: Path) -> dict[int, dict]:
    """Every row by rank, read up front (the hand and bare loops time compute, not reads)."""
    table = pq.read_table(scores / "rows.parquet", columns=["rank", "input_ids", "labels", "num_prompt_tokens"])
    return {
        int(r): {
            "input_ids": np.asarray(i),
            "labels": np.asarray(lab),
            "attention_mask": np.ones(len(i), np.int64),
            "num_prompt_tokens": int(p),
        }
        for r, i, lab, p in zip(*(table.column(c).to_pylist() for c in table.column_names))
    }


def _models(cfg, device: torch.device):
    teacher = load_model(cfg.models.teacher, dtype=resolve_dtype("auto", device), device=device, frozen=True)
    student = load_model(cfg.models.student, dtype=torch.float32, device=device)
    student.train()
    return teacher, student


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hand_loop(cfg, rows: dict, steps: list, device: torch.device) -> list[float]:
    """What a user writes by hand: full logits, FKL + CE at the scored positions, AdamW. Returns the
    wall-clock end time of every step."""
    from pocl_ray.data import collate

    teacher, student = _models(cfg, device)
    t = cfg.training
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pad = load_tokenizer(cfg.models.teacher).pad_token_id
    alpha = 0.7
    ends = []
    for k, micro in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(k, len(steps), t.lr, t.min_lr)
        n_tokens = sum(int((np.asarray(rows[int(r)]["labels"][1:]) != -100).sum()) for m in micro for r in m)
        for m in micro:
            batch = {key: v.to(device) for key, v in collate([rows[int(r)] for r in m], pad).items()}
            with autocast:
                s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scored = batch["labels"][:, 1:] != -100
            s_logp = F.log_softmax(s_logits[:, :-1][scored].float(), dim=-1)
            t_logp = F.log_softmax(t_logits[:, :-1][scored].float(), dim=-1)
            fkl = (t_logp.exp() * (t_logp - s_logp)).sum()
            ce = F.nll_loss(s_logp, batch["labels"][:, 1:][scored], reduction="sum")
            loss = ((1 - alpha) * ce + alpha * fkl) / n_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        ends.append(time.perf_counter())
    return ends


def bare_loop(cfg, rows: dict, steps: list, device: torch.device) -> list[float]:
    """The project's step functions in a plain loop, as one Ray worker runs them."""
    from pocl_ray.curriculum import Stage

    teacher_lm, student_lm = _models(cfg, device)
    logits = logits_form(student_lm, [teacher_lm])
    student, teacher = HiddenStatesLM(student_lm, logits), OnlineTeacher(teacher_lm, logits)
    t, kd = cfg.training, cfg.kd
    stage = Stage(index=0, buckets=(0,), steps=len(steps), kd_weight=0.7, loss="fkl")
    optimizer = adamw(student, t.lr, t.weight_decay)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731
    pad = load_tokenizer(cfg.models.teacher).pad_token_id
    ends, pending = [], []
    for k, micro in enumerate(steps):
        torch.manual_seed(stream_seed(t.seed, k, 0))
        batches = [build_batch(m, pad, device) for m in length_grouped([[rows[int(r)] for r in m] for m in micro])]
        values = accumulate_gradients(student, teacher, batches, stage, kd, autocast=autocast)
        grad_norm = optimizer_step(student, optimizer, lr_at(k, len(steps), t.lr, t.min_lr), t.grad_clip)
        pending.append(torch.stack([*values, grad_norm]))
        if len(pending) == 20 or k == len(steps) - 1:
            torch.stack(pending).tolist()
            pending = []
        ends.append(time.perf_counter())
    return ends


def timed(name: str, fn, device: torch.device, tokens_per_step: list[int]) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    started = time.perf_counter()
    ends = fn()
    _sync(device)
    out = {
        "path": name,
        "steps": len(ends),
        "seconds": ends[-1] - started,
        "tokens_per_second": sum(tokens_per_step[1:]) / (ends[-1] - ends[0]),
    }
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def ray_path(cfg, scores: Path, tokens_per_step: list[int]) -> dict:
    started = time.time()
    result = train(cfg, scores)
    fit = time.time() - started
    # Step records only (the bucket probe's records, at stage ends, have no step time).
    records = [r for r in map(json.loads, result.metrics_path.read_text().splitlines()) if not is_probe(r)]
    ends = [r["time"] for r in records]
    loop = ends[-1] - ends[0] + records[0]["seconds"]
    out = {
        "path": "ray",
        "steps": len(records),
        "seconds": fit,
        "tokens_per_second": sum(tokens_per_step[1:]) / (ends[-1] - ends[0]),
        "fit_seconds": fit,
        "fixed_seconds": fit - loop,
        "data_wait_fraction": sum(r.get("data_wait", 0.0) for r in records[1:]) / (ends[-1] - ends[0]),
    }
    if "peak_gpu_gib" in records[-1]:
        out["peak_gib"] = max(r["peak_gpu_gib"] for r in records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path, interleaved; medians reported")
    for key, value in SHAPES["cpu"].items():
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=int, help=f"default {SHAPES['cuda'][key]} on cuda, {value} on cpu"
        )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    parser.add_argument("--output", type=Path)
    a = parser.parse_args()
    for key, value in SHAPES[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)

    import ray

    ray.init(address="local", num_cpus=a.threads + 2, num_gpus=1 if a.device == "cuda" else 0, include_dashboard=False)
    samples: dict[str, list[dict]] = {"hand": [], "bare": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student, scores, lengths = make_assets(root, a)
        rows = read_all(scores)
        for i in range(a.repeats):
            cfg = config(a, teacher, student, root / f"run{i}")
            steps = planned_steps(cfg, scores)
            tokens = [int(sum(lengths[int(r)] for m in s for r in m)) for s in steps]
            samples["hand"].append(timed("hand", partial(hand_loop, cfg, rows, steps, device), device, tokens))
            samples["bare"].append(timed("bare", partial(bare_loop, cfg, rows, steps, device), device, tokens))
            samples["ray"].append(ray_path(cfg, scores, tokens))
    ray.shutdown()

    def median(path: str, key: str) -> float | None:
        values = [s[key] for s in samples[path] if key in s]
        return statistics.median(values) if values else None

    tps = {p: median(p, "tokens_per_second") for p in samples}
    report = {
        "benchmark": "training",
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "threads": a.threads,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "workload": {k: getattr(a, k) for k in SHAPES["cpu"]},
        "tokens_per_second": tps,
        "peak_gib": {p: median(p, "peak_gib") for p in samples},
        "ray_vs_hand": tps["ray"] / tps["hand"],
        "ray_vs_bare": tps["ray"] / tps["bare"],
        "bare_vs_hand": tps["bare"] / tps["hand"],
        "fixed_seconds": median("ray", "fixed_seconds"),
        "fit_seconds": median("ray", "fit_seconds"),
        "data_wait_fraction": median("ray", "data_wait_fraction"),
        "targets": {
            "ray_vs_hand": ">= 1.2 (GPU)",
            "ray_vs_bare": ">= 0.97",
            "peak ray/hand": "<= 0.6 (GPU)",
            "fixed_seconds": "<= 20 (GPU)",
            "data_wait_fraction": "<= 0.01 (GPU)",
        },
        "samples": samples,
    }
    if report["peak_gib"]["ray"] and report["peak_gib"]["hand"]:
        report["peak_ray_vs_hand"] = report["peak_gib"]["ray"] / report["peak_gib"]["hand"]
    text = json.dumps(report, indent=1)
    print(text)
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(text)


if __name__ == "__main__":
    main()
