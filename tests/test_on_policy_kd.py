"""On-policy KD (GKD, METHODS.md §3) does what the method claims, one training step at a time.

The student samples the responses, the teacher scores those tokens, and the KD term pulls the
student's distribution on its own samples toward the teacher's. Built from the trainer's own step
functions (sample_on_policy -> build_batch -> accumulate_gradients), without Ray.
"""

from __future__ import annotations

import torch

from pocl_ray.config import KDConfig
from pocl_ray.curriculum import Stage
from pocl_ray.data import read_table, validate_and_tokenize
from pocl_ray.models import load_model, load_tokenizer
from pocl_ray.sampling import sample_on_policy
from pocl_ray.training.step import accumulate_gradients, build_batch
from pocl_ray.training.teacher import HiddenStatesLM, OnlineTeacher

STAGE = Stage(index=0, buckets=(0,), steps=1, kd_weight=1.0, loss="fkl")
KD = KDConfig(chunk_positions=16)


def _on_policy_batch(student_lm, assets, tokenizer):
    good, _ = validate_and_tokenize(read_table(assets.train_path).to_pylist()[:6], tokenizer, assets.data_config())
    rows = sample_on_policy(
        student_lm,
        good,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=8,
        max_length=128,
        seed=0,
    )
    sampled = sum(len(r["input_ids"]) - g["num_prompt_tokens"] for r, g in zip(rows, good))
    assert sampled > 0 and all(r["on_policy"] for r in rows)
    return build_batch(rows, tokenizer.pad_token_id, torch.device("cpu")), sampled


def _step_values(student, teacher, batch):
    """[loss, KD, CE, CE tokens, KD tokens] of one step; leaves the gradients on the student."""
    student.zero_grad(set_to_none=True)
    return torch.stack(accumulate_gradients(student, teacher, [batch], STAGE, KD))


def test_on_policy_kd_is_nonzero_against_another_teacher_and_moves_the_student(tiny_assets):
    tokenizer = load_tokenizer(tiny_assets.tokenizer_dir)
    student = HiddenStatesLM(load_model(tiny_assets.student_dir))
    student.eval()  # no dropout: the before/after comparison below must see the same function
    teacher = OnlineTeacher(load_model(tiny_assets.teacher_dir, frozen=True))
    batch, sampled = _on_policy_batch(student.lm, tiny_assets, tokenizer)

    # A teacher with the student's own weights: the KD term vanishes (the control).
    twin = OnlineTeacher(load_model(tiny_assets.student_dir, frozen=True))
    _, twin_kd, _, _, _ = _step_values(student, twin, batch).tolist()
    assert abs(twin_kd) < 1e-6

    loss, kd, ce, n_ce, n_kd = _step_values(student, teacher, batch).tolist()
    # Every sampled token is scored by KD, none by CE: the reference is not the student's sample.
    assert (n_ce, n_kd) == (0, sampled)
    assert ce == 0 and kd > 1e-3 and loss == kd
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0

    before = [p.detach().clone() for p in student.parameters()]
    torch.optim.SGD(student.parameters(), lr=0.5).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    # The step moved the student toward the teacher on the tokens it sampled.
    _, kd_after, _, _, _ = _step_values(student, teacher, batch).tolist()
    assert kd_after < kd
