"""The cached teacher (METHODS.md §4) side by side with the online one, in one process, in both
forms (top-K: scoring.teacher_top_k; hidden: scoring.teacher_hidden):

- bytes per scored token at K = 8, 32, 128 and of the hidden form: as stored (uncompressed; the
  teacher's vocabulary and, for reference, 49,152- and 151,936-token ones, or 2,048- and 4,096-wide
  teachers) and on disk (the dev batch's cache columns in a parquet file with pyarrow's default
  compression, as Ray Data writes them);
- the relative error |cached − exact| / exact of every KD kind at T = 1 and 2 and K = 8, 32, 128,
  the cache stored as the scoring pass stores it (float16 log-probs), against the exact online loss,
  on a dev batch; and the teacher's mean top-K mass at each T; the same at K = 128 for students moved
  toward the teacher (logits (1 − a)·initial + a·teacher, a = 0.5 and 0.9), as training moves them;
  the hidden form's error (the teacher's head on its int8-rounded hidden states) for all of them;
- training tokens/s of an online step and of a cached step in each form, each through the trainer's
  own `build_batch`, `model_outputs` and `output_terms` through its teacher interface (backward and
  AdamW in all three), taken in turn,
  median over the timed steps. tokens/s counts non-pad input tokens.

Two teachers (--teacher):
- quickstart: the quickstart's stand-in (`pipeline.prepare_teacher` defaults: Llama, vocabulary ~1,024
  BPE tokens, hidden 128, 4 layers, 300 SFT steps at lr 1e-3) trained here in-process on the synthetic
  rows of tests/conftest.py, so its distributions are peaked as a trained LM's are (a random one is
  nearly flat and top-k would mean nothing); the student is cut from it (every 2nd layer), the
  quickstart's initial student; dev batch: 64 synthetic rows;
- testbed: the testbed's SmolLM2-135M-Instruct (--teacher-path, the teacher
  configs/testbed.yaml names; vocabulary 49,152) and its initial student, the teacher cut to
  every 3rd layer (configs/testbed.yaml); dev batch: the first --dev-rows rows of the testbed dev set,
  chat template, max_length 512. The training-step timing uses the first 256 dev rows; --speed-steps 0
  skips it (on CPU it takes minutes per step at this size).

    python benchmarks/teacher_cache.py                                      # CPU, ~25 s with --threads 2
    python benchmarks/teacher_cache.py --teacher testbed --speed-steps 0    # CPU, ~3 minutes with --threads 2
    python benchmarks/teacher_cache.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import synthetic_rows  # noqa: E402

from pocl_ray.config import DataConfig, KDConfig  # noqa: E402
from pocl_ray.curriculum import Stage  # noqa: E402
from pocl_ray.data import (  # noqa: E402
    build_prompt,
    read_table,
    scored_mask,
    validate_and_tokenize,
)
from pocl_ray.losses import KD_KINDS, cached_kd_loss, kd_loss  # noqa: E402
from pocl_ray.models import build_tiny_model, build_tiny_tokenizer, load_model, load_tokenizer, student_from_teacher  # noqa: E402
from pocl_ray.teacher_cache import (  # noqa: E402
    CACHE_COLUMNS,
    HIDDEN_COLUMNS,
    arrow_columns,
    bytes_per_token,
    collate_teacher_cache,
    dequantize_hidden,
    quantize_hidden,
    row_caches,
    teacher_caches,
)
from pocl_ray.training.step import build_batch, model_outputs, output_terms, token_counts  # noqa: E402
from pocl_ray.training.teacher import (  # noqa: E402
    CachedHiddenTeacher,
    CachedTopKTeacher,
    HiddenStatesLM,
    OnlineTeacher,
)

KS = (8, 32, 128)
TEMPERATURES = (1.0, 2.0)


def train_teacher(rows: list[dict], tokenizer, steps: int, lr: float, device: torch.device):
    model = build_tiny_model(
        "llama",
        len(tokenizer),
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        seed=0,
        max_positions=256,
        tokenizer=tokenizer,
    ).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = build_batch([rows[i] for i in rng.choice(len(rows), 16, replace=False)], tokenizer.pad_token_id, device)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False), float(loss.detach())


def with_cache(rows: list[dict], teacher, form: int | str, pad_id: int) -> list[dict]:
    """Rows as the trainer reads them from cached scores: each with its stored cache columns (top-K
    form for an int ``form``, the hidden form for "hidden")."""
    columns = HIDDEN_COLUMNS if form == "hidden" else CACHE_COLUMNS
    vocab = teacher.config.get_text_config().vocab_size  # the benchmark's heads are the tokenizer's size
    caches = teacher_caches(teacher, rows, pad_id, form, vocab)
    return [{**row, **dict(zip(columns, cache))} for row, cache in zip(rows, caches)]


def loss_errors(
    teacher, student, dev_rows: list[dict], pad_id: int, vocab: int, device: torch.device
) -> tuple[dict, dict, dict, dict]:
    """Relative error of each kind's cached loss, the cache as scoring stores it (`row_caches`, read back
    through `collate_teacher_cache`), against the exact online loss on the same scored positions. Only
    the scored positions' logits are made (a 49,152-token vocabulary over a padded batch would not fit).

    Returns (errors of the initial student at every K, the teacher's top-K mass, errors at K = 128 of
    students moved toward the teacher, errors of the hidden form for the initial and moved students).
    The initial student is the far end of training; a trained one is close to the teacher, where the
    losses are small and a tail rule's bias weighs more: the students with logits
    (1 − a)·initial + a·teacher, a = 0.5 and 0.9, stand in for it. The hidden form's teacher is its
    head applied to the int8-rounded final hidden states, as training computes it."""
    dev = build_batch(dev_rows, pad_id, device)
    scored = scored_mask(dev["labels"]).flatten()
    models = {"teacher": HiddenStatesLM(teacher), "student": HiddenStatesLM(student)}
    with torch.no_grad():
        hidden = {
            name: torch.cat(
                [
                    m(dev["input_ids"][i : i + 8], dev["attention_mask"][i : i + 8])
                    .hidden.float()
                    .flatten(0, 1)[scored.view(dev["labels"].shape)[i : i + 8].flatten()]
                    for i in range(0, len(dev_rows), 8)
                ]
            )
            for name, m in models.items()
        }
        logits = {name: hidden[name] @ models[name].lm.get_output_embeddings().weight.float().T for name in models}
        rounded = (
            dequantize_hidden(*quantize_hidden(hidden["teacher"])) @ teacher.get_output_embeddings().weight.float().T
        )
    # The scored positions as one row: labels[t + 1] scores position t.
    labels = torch.zeros((1, scored.sum() + 1), dtype=torch.long, device=device)
    labels[0, 0] = -100
    t_logits = F.pad(logits["teacher"], (0, 0, 0, 1))[None]

    def student_logits(a: float) -> torch.Tensor:
        return F.pad((1 - a) * logits["student"] + a * logits["teacher"], (0, 0, 0, 1))[None]

    def error(kind: str, s_logits: torch.Tensor, cache, t: float) -> float:
        exact = float(kd_loss(kind, s_logits, t_logits, labels, temperature=t))
        if cache is None:  # the hidden form
            cached = float(kd_loss(kind, s_logits, F.pad(rounded, (0, 0, 0, 1))[None], labels, temperature=t))
        else:
            cached = float(cached_kd_loss(kind, s_logits, cache, labels, temperature=t))
        return float(f"{abs(cached - exact) / exact:.3g}")

    counts = scored_mask(dev["labels"]).sum(1).tolist()
    errors, coverage, toward, hidden_form = {}, {}, {}, {}
    for t in TEMPERATURES:
        for kind in KD_KINDS:
            for a in (0.0, 0.5, 0.9):
                hidden_form.setdefault(kind, {})[f"a={a:g},T={t:g}"] = error(kind, student_logits(a), None, t)
    for k in KS:
        stored, start = [], 0
        for row, n in zip(dev_rows, counts):
            rows_logits = logits["teacher"][start : start + n][None]
            row_labels = torch.zeros((1, n + 1), dtype=torch.long, device=device)
            row_labels[0, 0] = -100
            stored.append(
                {
                    "labels": row_labels[0].cpu().numpy(),
                    **dict(
                        zip(
                            CACHE_COLUMNS,
                            row_caches(row_labels, F.pad(rows_logits, (0, 0, 0, 1)), k, vocab, [row["id"]])[0],
                        )
                    ),
                }
            )
            start += n
        cache = collate_teacher_cache(stored, device)
        for t in TEMPERATURES:
            coverage[f"K={k},T={t:g}"] = round(
                float(torch.softmax(logits["teacher"] / t, -1).topk(k, -1).values.sum(-1).mean()), 5
            )
            for kind in KD_KINDS:
                errors.setdefault(kind, {})[f"K={k},T={t:g}"] = error(kind, student_logits(0.0), cache, t)
                if k == KS[-1]:
                    for a in (0.5, 0.9):
                        toward.setdefault(kind, {})[f"a={a:g},T={t:g}"] = error(kind, student_logits(a), cache, t)
    return errors, coverage, toward, hidden_form


def disk_bytes(rows: list[dict], teacher, form: int | str, pad_id: int) -> float:
    """Parquet bytes per scored token of the rows' cache columns (pyarrow's default compression)."""
    cached = with_cache(rows, teacher, form, pad_id)
    config = teacher.config.get_text_config()
    k, columns = (None, HIDDEN_COLUMNS) if form == "hidden" else (form, CACHE_COLUMNS)
    table = pa.table(
        arrow_columns([tuple(r[c] for c in columns) for r in cached], k, config.vocab_size, config.hidden_size)
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    tokens = sum(int(scored_mask(torch.as_tensor(r["labels"])).sum()) for r in rows)
    return round(buffer.tell() / tokens, 1)


def step_speed(teacher, student, rows: list[dict], k: int, steps: int, device: torch.device, pad_id: int) -> dict:
    """Median tokens/s of an online training step and of the two cached ones (micro-batches of 16
    rows), taken in turn, each through the trainer's own `build_batch`, `model_outputs` and `output_terms`
    with the teacher of its kind (`training.teacher`).
    On a GPU as training runs there: the teacher and the cached head in bf16, the step under bf16 autocast."""
    stage = Stage(index=0, buckets=(0,), temperature=2.0, kd_weight=0.7, loss="fkl", steps=steps)
    kd = KDConfig()
    gpu = device.type == "cuda"
    teacher = copy.deepcopy(teacher).to(torch.bfloat16) if gpu else teacher
    names = ("online", "top_k", "hidden")
    s_model = {name: HiddenStatesLM(copy.deepcopy(student).train().requires_grad_(True)) for name in names}
    optim = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in s_model.items()}
    micro = [rows[i : i + 16] for i in range(0, len(rows) - 15, 16)]
    head = teacher.get_output_embeddings().weight
    teachers = {"online": OnlineTeacher(teacher), "top_k": CachedTopKTeacher(), "hidden": CachedHiddenTeacher(head)}
    stored = {
        "online": micro,
        "top_k": [with_cache(m, teacher, k, pad_id) for m in micro],
        "hidden": [with_cache(m, teacher, "hidden", pad_id) for m in micro],
    }

    def run(name: str, i: int) -> tuple[int, float]:
        model = s_model[name]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        batch = build_batch(stored[name][i % len(micro)], pad_id, device, teachers[name])
        counts = token_counts(batch, stage)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            s_out, t_out = model_outputs(model, teachers[name], batch, stage)
            loss, _, _ = output_terms(s_out, t_out, batch, stage, kd, counts)
        loss.backward()
        optim[name].step()
        optim[name].zero_grad(set_to_none=True)
        sync()
        return int(batch["attention_mask"].sum()), time.perf_counter() - start

    rates: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps + 2):
        for name in names[i % 3 :] + names[: i % 3]:  # each first in turn
            tokens, seconds = run(name, i)
            if i >= 2:  # warm-up
                rates[name].append(tokens / seconds)
    median = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "k": k,
        **{f"{name}_tokens_per_s": round(v) for name, v in median.items()},
        "speedup_top_k": round(median["top_k"] / median["online"], 3),
        "speedup_hidden": round(median["hidden"] / median["online"], 3),
        "timed_steps": steps,
    }


def quickstart_pair(args, device: torch.device):
    train_raw, dev_raw = synthetic_rows(600, seed=0), synthetic_rows(64, seed=1)
    texts = [build_prompt(r["instruction"], r["input"], "dolly") + r["output"] for r in train_raw]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=1024)
    data_cfg = DataConfig(train="unused.jsonl", max_prompt_length=96, max_length=128)
    train_rows, _ = validate_and_tokenize(train_raw, tokenizer, data_cfg)
    dev_rows, _ = validate_and_tokenize(dev_raw, tokenizer, data_cfg)
    teacher, final_ce = train_teacher(train_rows, tokenizer, args.teacher_steps, 1e-3, device)
    student = student_from_teacher(teacher, keep_every=2).to(device).eval().requires_grad_(False)
    about = {
        "teacher": {
            "name": "quickstart stand-in",
            "arch": "llama",
            "vocab": teacher.config.vocab_size,
            "hidden": 128,
            "layers": 4,
            "sft_steps": args.teacher_steps,
            "final_train_ce": round(final_ce, 3),
        },
        "student": "cut from the teacher, layers 1 and 3",
    }
    return teacher, student, tokenizer, dev_rows, train_rows[:256], about


def testbed_pair(args, device: torch.device):
    tokenizer = load_tokenizer(args.teacher_path)
    teacher = load_model(args.teacher_path, dtype="float32", device=device, frozen=True)
    student = student_from_teacher(teacher, keep_every=3).eval().requires_grad_(False)
    data_cfg = DataConfig(train="unused.jsonl", template="chat", max_prompt_length=256, max_length=512)
    rows, _ = validate_and_tokenize(
        read_table(args.testbed_dev, max_rows=max(args.dev_rows, 256)).to_pylist(), tokenizer, data_cfg
    )
    config = teacher.config
    about = {
        "teacher": {
            "name": "testbed SmolLM2-135M-Instruct",
            "path": args.teacher_path,
            "vocab": config.vocab_size,
            "hidden": config.hidden_size,
            "layers": config.num_hidden_layers,
        },
        "student": f"cut from the teacher, every 3rd layer ({len(student.model.layers)} layers), untrained",
    }
    return teacher, student, tokenizer, rows[: args.dev_rows], rows[:256], about


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--teacher", default="quickstart", choices=["quickstart", "testbed"])
    parser.add_argument("--teacher-path", default="/tmp/pocl-assets/smollm2-135m-instruct", help="the testbed teacher")
    parser.add_argument("--testbed-dev", default=str(ROOT.parent / "shared/testbed/data/dev.jsonl.gz"))
    parser.add_argument("--dev-rows", type=int, default=32, help="testbed dev rows for the loss errors")
    parser.add_argument("--teacher-steps", type=int, default=300, help="quickstart teacher SFT steps")
    parser.add_argument("--speed-steps", type=int, default=20, help="timed training steps; 0 skips the timing")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    pair = quickstart_pair if args.teacher == "quickstart" else testbed_pair
    teacher, student, tokenizer, dev_rows, speed_rows, about = pair(args, device)
    vocab, width, pad_id = teacher.config.vocab_size, teacher.config.hidden_size, tokenizer.pad_token_id
    errors, coverage, toward, hidden_form = loss_errors(teacher, student, dev_rows, pad_id, vocab, device)
    result = {
        "device": args.device,
        "threads": args.threads,
        **about,
        "dev_rows": len(dev_rows),
        "dev_scored_tokens": sum(int(scored_mask(torch.as_tensor(r["labels"])).sum()) for r in dev_rows),
        "bytes_per_scored_token": {
            **{
                f"K={k}": {
                    "stored": bytes_per_token(k, vocab),
                    "parquet_on_disk": disk_bytes(dev_rows, teacher, k, pad_id),
                    "stored_vocab_49152": bytes_per_token(k, 49152),
                    "stored_vocab_151936": bytes_per_token(k, 151936),
                }
                for k in KS
            },
            "hidden": {
                "stored": bytes_per_token(None, vocab, width),
                "parquet_on_disk": disk_bytes(dev_rows, teacher, "hidden", pad_id),
                "stored_hidden_2048": bytes_per_token(None, vocab, 2048),
                "stored_hidden_4096": bytes_per_token(None, vocab, 4096),
            },
        },
        "teacher_top_k_mass": coverage,
        "relative_loss_error": errors,
        "max_relative_error": {
            f"T={t:g}": {f"K={k}": max(e[f"K={k},T={t:g}"] for e in errors.values()) for k in KS} for t in TEMPERATURES
        },
        f"relative_loss_error_toward_teacher_K={KS[-1]}": toward,
        "relative_loss_error_hidden_form": hidden_form,
        "max_relative_error_hidden_form": {
            f"a={a:g},T={t:g}": max(e[f"a={a:g},T={t:g}"] for e in hidden_form.values())
            for a in (0.0, 0.5, 0.9)
            for t in TEMPERATURES
        },
    }
    if args.speed_steps:
        result["training_step"] = step_speed(teacher, student, speed_rows, 128, args.speed_steps, device, pad_id)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
