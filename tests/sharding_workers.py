"""Process-group workers for tests/test_sharding.py: each runs in its own process (torch.multiprocessing,
gloo on the CPU, no Ray), one per rank, and writes what the test checks into a result file of its rank.

`spawn` runs one on `world` processes and fails the test when a rank raises or when they are not all done
within `timeout` seconds (a rank waiting for ever in a collective is killed, not waited for).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pocl_ray.data import IGNORE_INDEX, collate
from pocl_ray.extraction import hidden_match_loss, layer_projection
from pocl_ray.losses import linear_kd_and_ce
from pocl_ray.models import build_tiny_model, checkpoint_activations
from pocl_ray.sampling import sample_on_policy
from pocl_ray.sharding import final_hidden_states, in_lockstep, load_sharded, release

VOCAB = 96
PAD = 0
EOS = 1


class Hung(AssertionError):
    pass


def spawn(fn, world: int, *args, timeout: float = 180.0, done_file: Path | None = None, grace: float = 0.0) -> None:
    """fn(rank, world, port, *args) on `world` processes; AssertionError when one fails or they overrun.

    With `done_file` (a file a rank writes once its own work is done), they also overrun when they are not
    all done `grace` seconds after it appears: the time the others need from there, not a slow start-up."""
    from conftest import free_port

    context = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline, limit = time.monotonic() + timeout, f"{timeout:.0f} s"
    while not context.join(timeout=min(max(deadline - time.monotonic(), 0.1), 0.5)):
        if done_file is not None and done_file.exists() and deadline - time.monotonic() > grace:
            deadline, limit = time.monotonic() + grace, f"{grace:.0f} s of {done_file.name}"
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise Hung(f"{fn.__name__} on {world} processes did not finish within {limit}")


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def student_model(tied: bool, seed: int = 1):
    return build_tiny_model("llama", VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=seed, tie_embeddings=tied)


def teacher_model():
    return build_tiny_model("llama", VOCAB, hidden_size=48, num_layers=3, num_heads=4, seed=0)


def rows(n: int, seed: int) -> list[dict]:
    """n rows of very different lengths: a prompt of 2-9 tokens (labels -100), a response of 1-12 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(2, VOCAB, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(2, VOCAB, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist()
        out.append(
            {
                "input_ids": prompt + response,
                "attention_mask": [1] * (len(prompt) + len(response)),
                "labels": [IGNORE_INDEX] * len(prompt) + response,
                "num_prompt_tokens": len(prompt),
            }
        )
    return out


def counts(batch: dict, target: str) -> torch.Tensor:
    """[CE/KD tokens (shifted response positions), hidden-matching tokens (the response positions)]."""
    labels = batch["labels"]
    return torch.stack([(labels[:, 1:] != IGNORE_INDEX).sum(), (labels != IGNORE_INDEX).sum()])


def step_loss(student, teacher, batch: dict, case: dict, n: torch.Tensor) -> torch.Tensor:
    """One micro-batch's loss as the training step computes it: final hidden states and both LM heads into
    `linear_kd_and_ce` (kd_weight 0.7), or for a hidden-matching stage 0.3·CE + 0.7·hidden_match_loss."""
    hidden = case["target"] == "hidden"
    s_final, s_layers = final_hidden_states(student, batch["input_ids"], batch["attention_mask"], hidden)
    with torch.no_grad():
        t_final, t_layers = final_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], hidden)
    s_head = student.get_output_embeddings().weight
    t_head = teacher.get_output_embeddings().weight
    labels = batch["labels"]
    if not hidden:
        loss, _, _ = linear_kd_and_ce(
            case["kind"], s_final, s_head, t_final, t_head, labels, labels, kd_weight=0.7,
            temperature=case["temperature"], num_tokens=n[0], ce_num_tokens=n[0], chunk_positions=8,
        )  # fmt: skip
    else:
        ce, _, _ = linear_kd_and_ce(
            "fkl", s_final, s_head, None, None, labels, labels, kd_weight=0.0, ce_num_tokens=n[0]
        )
        projection = layer_projection(48, 32, 2, seed=5)
        match = hidden_match_loss(s_layers[1], t_layers[2], projection, labels, num_tokens=n[1])
        loss = 0.3 * ce + 0.7 * match
    release(teacher)
    return loss


def on_policy_rows(student, local: list[dict], seed: int, rank: int) -> list[dict]:
    """This rank's rows with their responses replaced by the student's samples: micro-batches of 2 rows on
    rank 0 and of 4 on rank 1, so rank 1 makes fewer generate calls and in_lockstep must add idle ones."""
    size = 2 + 2 * rank
    chunks = [local[i : i + size] for i in range(0, len(local), size)]
    idle = [{"input_ids": [EOS], "num_prompt_tokens": 1}]

    def sample(chunk):
        return sample_on_policy(
            student, chunk, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=16, max_length=64, seed=seed
        )

    sampled = [r for batch in in_lockstep(chunks, sample, idle) for r in batch]
    release(student)
    return sampled


def gradient_worker(rank: int, world: int, port: int, out: str, cases: list[dict]) -> None:
    """Per case: one FSDP step's gradients (full tensors) against the single-process gradients of the same
    global batch; writes {case name: max over parameters of |g - g_ref| / |g_ref|, ...} from rank 0."""
    init(rank, world, port)
    results = {}
    for case in cases:
        global_rows = rows(8, seed=3)
        teacher = load_sharded(teacher_model, device=torch.device("cpu"), trainable=False)

        def build(case=case):
            return student_model(case["tied"])

        student = load_sharded(
            build,
            device=torch.device("cpu"),
            trainable=True,
            gradient_checkpointing=case.get("checkpointing", False),
            cpu_offload=case.get("cpu_offload", False),
        )
        assert student.is_gradient_checkpointing == case.get("checkpointing", False)
        local = global_rows[rank::world]
        if case.get("on_policy"):
            local = on_policy_rows(student, local, seed=11, rank=rank)
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
            global_rows = [gathered[i % world][i // world] for i in range(len(global_rows))]
        batch = collate(local, PAD)
        n = counts(batch, case["target"])
        dist.all_reduce(n)
        (step_loss(student, teacher, batch, case, n) * world).backward()
        grads = {name: p.grad.full_tensor() for name, p in student.named_parameters()}
        tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
        if rank == 0:
            reference = build()
            if case.get("checkpointing"):
                checkpoint_activations(reference)
            plain_teacher = teacher_model().eval().requires_grad_(False)
            full = collate(global_rows, PAD)
            step_loss(reference, plain_teacher, full, case, counts(full, case["target"])).backward()
            errors = {
                name: float((grads[name] - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
                for name, p in reference.named_parameters()
            }
            results[case["name"]] = {
                "max_relative_error": max(errors.values()),
                "worst": max(errors, key=errors.get),
                "parameters": sorted(errors) == sorted(grads),
                "tied": tied,
                "head_grad_norm": float(reference.get_output_embeddings().weight.grad.norm()),
            }
    if rank == 0:
        torch.save(results, Path(out) / "gradients.pt")
    dist.destroy_process_group()


def _trained_student(rank: int, world: int, tied: bool, seed: int):
    """A sharded student and its AdamW after one step on this rank's rows (so the optimizer has state)."""
    student = load_sharded(lambda: student_model(tied, seed), device=torch.device("cpu"), trainable=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    batch = collate(rows(8, seed=3)[rank::world], PAD)
    final, _ = final_hidden_states(student, batch["input_ids"], batch["attention_mask"])
    loss, _, _ = linear_kd_and_ce(
        "fkl", final, student.get_output_embeddings().weight, None, None, batch["labels"], batch["labels"],
        kd_weight=0.0,
    )  # fmt: skip
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return student, optimizer


def checkpoint_save_worker(rank: int, world: int, port: int, out: str) -> None:
    """For an untied and a tied student (OUT/untied, OUT/tied): save a trained student asynchronously on
    `world` ranks, keep its full state as the reference, load the checkpoint into a student of other weights on
    the same ranks, and export an HF folder."""
    from pocl_ray import sharded_checkpoint as ckpt

    init(rank, world, port)
    for tied in (False, True):
        out_dir = Path(out) / ("tied" if tied else "untied")
        student, optimizer = _trained_student(rank, world, tied, seed=1)
        ckpt.save(out_dir / "checkpoint", student, optimizer, asynchronous=True).result()
        reference = ckpt.full_state(student, optimizer)
        ckpt.export_pretrained(student, out_dir / "export")
        other, other_optimizer = _trained_student(rank, world, tied, seed=2)
        ckpt.load(out_dir / "checkpoint", other, other_optimizer)
        loaded = ckpt.full_state(other, other_optimizer)
        if rank == 0:
            torch.save({"reference": reference, "loaded": loaded}, out_dir / f"saved_on_{world}.pt")
    dist.destroy_process_group()


def checkpoint_load_worker(rank: int, world: int, port: int, out: str) -> None:
    """Load each checkpoint of checkpoint_save_worker into a student of other weights on `world` ranks; rank 0
    writes the full state."""
    from pocl_ray import sharded_checkpoint as ckpt

    init(rank, world, port)
    for tied in (False, True):
        out_dir = Path(out) / ("tied" if tied else "untied")
        student, optimizer = _trained_student(rank, world, tied, seed=2)
        ckpt.load(out_dir / "checkpoint", student, optimizer)
        loaded = ckpt.full_state(student, optimizer)
        if rank == 0:
            torch.save(loaded, out_dir / f"loaded_on_{world}.pt")
    dist.destroy_process_group()


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested states (dicts, lists, tensors, scalars) differ, bit for bit; [] when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())} in one only"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [f"{path}: tensors differ"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def generation_worker(rank: int, world: int, port: int, out: str, lockstep: bool) -> None:
    """Greedy generation with a sharded student, rank 0 with one short batch (1 new token), the others with
    two long ones (16 new tokens, no EOS stop); writes each rank's tokens and a single-process model's.
    lockstep False runs the batches without in_lockstep (the control: it must fail)."""
    from pocl_ray.sampling import generate_tokens

    init(rank, world, port)
    student = load_sharded(lambda: student_model(False), device=torch.device("cpu"), trainable=True)
    student.eval()
    if rank == 0:
        batches = [([[5, 6, 7]], [1])]
    else:
        batches = [([[8 + i + k for k in range(9)], [3, 4]], [16, 16]) for i in range(2)]

    def generate(batch, model=student):
        prompts, budgets = batch
        return generate_tokens(model, prompts, budgets, pad_token_id=PAD, eos_token_id=None)

    if lockstep:
        tokens = in_lockstep(batches, generate, ([[EOS]], [1]))
    else:
        tokens = [generate(b) for b in batches]
    release(student)
    (Path(out) / f"generated_{rank}").touch()  # this rank's own batches are done
    dist.barrier()
    plain = student_model(False).eval()
    torch.save({"tokens": tokens, "single": [generate(b, plain) for b in batches]}, Path(out) / f"tokens_{rank}.pt")
    dist.destroy_process_group()
