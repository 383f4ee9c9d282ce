"""Generation throughput: the project's row-seeded sampler and greedy decoding against HF `generate`,
on the same model and prompts in one run, plus rows/s of a whole evaluation actor call and of a
difficulty-measurer call.

Token level (same prompts, sorted by length and cut into batches of --batch-size for every side):
- project_sampler: `sampling.generate_tokens` with one row seed per prompt (temperature 1, top-p 1)
- hf_do_sample:    `model.generate(do_sample=True, temperature=1, top_p=1, top_k=0)`
- hf_greedy:       `model.generate(do_sample=False)`
- project_greedy:  `sampling.generate_tokens` without seeds
The model has no EOS (random weights would stop sampled rows early at random), so every row of
every side generates exactly --new-tokens tokens and tokens/s compare like for like; the run checks
it. Ratios: project_sampler / hf_do_sample and project_greedy / hf_greedy (targets: >= 1.0 on CPU;
on an H100/H200 >= 1.5 for the sampler, >= 1.0 for greedy).

Whole calls: `evaluation._Evaluator` (one seed: response CE, sampling, decoding, ROUGE-L) and
`measurers.Measurer` (student_ce and student_rougeL, greedy response capped at --new-tokens) on all
prompts as one Ray Data batch, rows/s. Their tokenizer has no EOS either, so these calls also
generate the full length.

Timing: one warm-up batch per side, then --repeats rounds in alternating order; the best time per
side is used and all times are listed with the load average (shared CPUs swing wall-clock figures).

Defaults: --device cuda = a 10-layer SmolLM2-135M-shaped Llama (hidden 576, 9 heads, 3 KV heads,
intermediate 1536, vocab 49152), random init, bf16, 128 prompts of 64-256 tokens, 128 new tokens,
batch 128; --device cpu = a tiny Llama (hidden 64, 2 layers, vocab 2048), fp32, one thread,
32 prompts of 16-64 tokens, 32 new tokens, batch 16. --static-cache turns on HF's static KV cache
(with which HF compiles the decoding step on CUDA) for all four sides.

    python benchmarks/generation.py --device cpu
    python benchmarks/generation.py --device cuda --out generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pocl_ray.config import EvalConfig, ModelsConfig
from pocl_ray.data import IGNORE_INDEX, generation_batch
from pocl_ray.evaluation import _Evaluator
from pocl_ray.measurers import Measurer
from pocl_ray.models import load_model
from pocl_ray.sampling import generate_tokens
from pocl_ray.seeds import stream_seed

DEFAULTS = {
    "cuda": {
        "layers": 10,
        "hidden": 576,
        "heads": 9,
        "kv_heads": 3,
        "intermediate": 1536,
        "vocab": 49152,
        "prompts": 128,
        "min_prompt": 64,
        "max_prompt": 256,
        "new_tokens": 128,
        "batch_size": 128,
        "dtype": "bfloat16",
    },
    "cpu": {
        "layers": 2,
        "hidden": 64,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 256,
        "vocab": 2048,
        "prompts": 32,
        "min_prompt": 16,
        "max_prompt": 64,
        "new_tokens": 32,
        "batch_size": 16,
        "dtype": "float32",
    },
}


def build_assets(root: Path, args) -> tuple[Path, Path]:
    """A random-init Llama and a word-level tokenizer ("w<id>" per model id), neither with an EOS, so
    nothing stops generation early; the tokenizer has exactly the head's rows, as the project requires."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2 * (args.max_prompt + args.new_tokens),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    vocab = {f"w{i}": i for i in range(args.vocab)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", unk_token="w1")
    tokenizer.save_pretrained(root / "tokenizer")
    return root / "model", root / "tokenizer"


def make_prompts(args) -> list[list[int]]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.prompts)
    return [rng.integers(2, args.vocab, n).tolist() for n in lengths]


def sides(model, args):
    """name -> fn(prompts, row indices) -> new-token lists, each generating exactly args.new_tokens."""
    cache = "static" if args.static_cache else None

    def hf(prompts, idx, do_sample):
        batch = {k: v.to(args.device) for k, v in generation_batch(prompts, 0).items()}
        sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else {}
        config = GenerationConfig(
            do_sample=do_sample,
            max_new_tokens=args.new_tokens,
            pad_token_id=0,
            eos_token_id=None,
            cache_implementation=cache,
            **sampling,
        )
        return model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :].tolist()

    def project(prompts, idx, sample):
        seeds = [stream_seed(0, i) for i in idx] if sample else None
        return generate_tokens(
            model,
            prompts,
            [args.new_tokens] * len(prompts),
            pad_token_id=0,
            eos_token_id=None,
            seeds=seeds,
            temperature=1.0,
            top_p=1.0,
            cache_implementation=cache,
        )

    return {
        "project_sampler": lambda p, i: project(p, i, True),
        "hf_do_sample": lambda p, i: hf(p, i, True),
        "hf_greedy": lambda p, i: hf(p, i, False),
        "project_greedy": lambda p, i: project(p, i, False),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_side(fn, prompts, args) -> tuple[float, int]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    sync(args.device)
    start = time.perf_counter()
    tokens = 0
    for b in range(0, len(order), args.batch_size):
        idx = order[b : b + args.batch_size]
        rows = fn([prompts[i] for i in idx], idx)
        if any(len(r) != args.new_tokens for r in rows):
            raise RuntimeError(
                f"a row generated {min(map(len, rows))}..{max(map(len, rows))} tokens, not {args.new_tokens}"
            )
        tokens += sum(map(len, rows))
    sync(args.device)
    return time.perf_counter() - start, tokens


def prepared_rows(prompts, args) -> pa.Table:
    """Prepared eval / measurer rows: each prompt with a random reference response of new_tokens // 2 tokens."""
    rng = np.random.default_rng(1)
    rows = []
    for i, p in enumerate(prompts):
        response = rng.integers(2, args.vocab, max(1, args.new_tokens // 2)).tolist()
        rows.append(
            {
                "set": "bench",
                "id": f"r{i}",
                "reject_reason": "",
                "input_ids": p + response,
                "attention_mask": [1] * (len(p) + len(response)),
                "labels": [IGNORE_INDEX] * len(p) + response,
                "num_prompt_tokens": len(p),
                "num_response_tokens": len(response),
                "response": " ".join(f"w{t}" for t in response),
            }
        )
    return pa.Table.from_pylist(rows)


def timed_call(actor, table: pa.Table, repeats: int) -> dict:
    actor(table.slice(0, min(4, table.num_rows)))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        actor(table)
        times.append(time.perf_counter() - start)
    return {
        "rows": table.num_rows,
        "seconds": [round(t, 3) for t in times],
        "rows_per_s": round(table.num_rows / min(times), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    for name in (
        "layers",
        "hidden",
        "heads",
        "kv_heads",
        "intermediate",
        "vocab",
        "prompts",
        "min_prompt",
        "max_prompt",
        "new_tokens",
        "batch_size",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--static-cache", action="store_true", help="HF static KV cache (compiled on CUDA)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tokenizer_dir = build_assets(Path(tmp), args)
        model = load_model(model_dir, dtype=args.dtype, device=args.device, frozen=True)
        prompts = make_prompts(args)
        fns = sides(model, args)
        warm = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[: args.batch_size]
        for fn in fns.values():
            fn([prompts[i] for i in warm], warm)
        times: dict[str, list[float]] = {name: [] for name in fns}
        tokens = {}
        for r in range(args.repeats):
            for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                seconds, tokens[name] = run_side(fns[name], prompts, args)
                times[name].append(seconds)
        tps = {name: tokens[name] / min(t) for name, t in times.items()}

        table = prepared_rows(prompts, args)
        use_gpu = args.device == "cuda"
        eval_cfg = EvalConfig(
            seeds=[10],
            temperature=1.0,
            max_new_tokens=args.new_tokens,
            batch_size=args.batch_size,
            num_gpus_per_actor=1.0 if use_gpu else 0.0,
        )
        evaluator = _Evaluator(str(model_dir), str(tokenizer_dir), args.dtype, eval_cfg)
        evaluation_call = timed_call(evaluator, table, args.repeats)
        del evaluator
        models_cfg = ModelsConfig(
            teacher=str(model_dir), student=str(model_dir), tokenizer=str(tokenizer_dir), dtype=args.dtype
        ).model_dump(mode="json")
        measurer = Measurer(
            models_cfg,
            ["student_ce", "student_rougeL"],
            batch_size=args.batch_size,
            max_new_tokens=args.new_tokens,
            use_gpu=use_gpu,
            num_threads=args.threads,
            max_length=args.max_prompt + args.new_tokens,
        )
        measurer_call = timed_call(measurer, table.drop_columns(["set", "attention_mask"]), args.repeats)

    result = {
        "device": torch.cuda.get_device_name() if use_gpu else f"cpu ({args.threads} thread(s))",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "tokens_per_s": {name: round(v, 1) for name, v in tps.items()},
        "ratios": {
            "project_sampler_over_hf_do_sample": round(tps["project_sampler"] / tps["hf_do_sample"], 3),
            "project_greedy_over_hf_greedy": round(tps["project_greedy"] / tps["hf_greedy"], 3),
            "project_sampler_over_hf_greedy": round(tps["project_sampler"] / tps["hf_greedy"], 3),
        },
        "tokens_per_side": tokens,
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "evaluation_actor_call": evaluation_call,
        "measurer_call": measurer_call,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
