"""KD losses against a float64 brute force written from METHODS.md §3, plus identities and edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pocl_ray.logprobs import LOG_FLOOR
from pocl_ray.losses import (
    KD_KINDS,
    KDAndCEOptions,
    _akl_head_weight,
    _fused_losses,
    _kd_rows,
    _options,
    _pointwise,
    count_tokens,
    cross_entropy,
    kd_loss,
    linear_cross_entropy,
    linear_kd_and_ce,
    linear_kd_loss,
)

B, S, V = 3, 7, 11


def reference(
    kind,
    student,
    teacher,
    labels,
    *,
    temperature=1.0,
    scale_by_t2=True,
    skew_alpha=0.1,
    beta=0.5,
    mu=0.5,
    num_tokens=None,
):
    """Full-tensor float64 KD loss: shift, softmax, divergence per position, masked mean."""
    q = torch.softmax(student.double()[:, :-1] / temperature, -1)
    p = torch.softmax(teacher.detach().double()[:, :-1] / temperature, -1)
    scored = labels[:, 1:] != -100

    def kl(a, b):
        return torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a)).sum(-1)

    if kind == "fkl":
        per_pos = kl(p, q)
    elif kind == "rkl":
        per_pos = kl(q, p)
    elif kind == "js":
        m = beta * p + (1 - beta) * q
        per_pos = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif kind == "tvd":
        per_pos = 0.5 * (p - q).abs().sum(-1)
    elif kind == "skl":
        per_pos = kl(p, skew_alpha * p + (1 - skew_alpha) * q)
    elif kind == "srkl":
        per_pos = kl(q, (1 - skew_alpha) * p + skew_alpha * q)
    elif kind == "akl":
        # Cumulative teacher mass from the smallest up to and including each token, without sorting:
        # cum_i = Σ_j p_j [p_j <= p_i].
        cum = (p.unsqueeze(-2) * (p.unsqueeze(-2) <= p.unsqueeze(-1))).sum(-1)
        tail = cum < mu
        gap = (p - q).abs().detach()
        g_head, g_tail = (gap * ~tail).sum(-1), (gap * tail).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total, torch.full_like(total, 0.5))
        per_pos = w_head * kl(p, q) + (1 - w_head) * kl(q, p)
    else:
        raise AssertionError(kind)
    loss = per_pos[scored].sum() * (temperature**2 if scale_by_t2 else 1.0)
    return loss / (scored.sum() if num_tokens is None else num_tokens)


def make_batch(seed, b=B, s=S, v=V, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, s, v, generator=g) * scale).requires_grad_()
    teacher = torch.randn(b, s, v, generator=g) * scale
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[torch.rand(b, s, generator=g) < 0.3] = -100
    labels[0, 1:4] = -100
    return student, teacher, labels


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


SETTINGS = [dict(), dict(skew_alpha=0.3, beta=0.2, mu=0.3)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "skew_alpha.3-beta.2-mu.3"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_matches_float64_reference(kind, temperature, settings):
    student, teacher, labels = make_batch(1)
    got = kd_loss(kind, student, teacher, labels, temperature=temperature, chunk_positions=4, **settings)
    want = reference(kind, student, teacher, labels, temperature=temperature, **settings)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(grad_of(got, student), grad_of(want, student), rtol=1e-4, atol=1e-6)


def test_akl_weights_are_not_trivial():
    # Guards the AKL reference comparison: the head/tail weights must differ from the 0/1 extremes and
    # from an even split, otherwise AKL would collapse to FKL, RKL or their mean and hide bugs.
    student, teacher, labels = make_batch(1)
    values = {k: kd_loss(k, student, teacher, labels).item() for k in ("fkl", "rkl", "akl")}
    assert values["akl"] != pytest.approx(values["fkl"], rel=1e-3)
    assert values["akl"] != pytest.approx(values["rkl"], rel=1e-3)
    assert values["akl"] != pytest.approx((values["fkl"] + values["rkl"]) / 2, rel=1e-3)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_zero_when_student_equals_teacher(kind):
    student, _, labels = make_batch(2)
    loss = kd_loss(kind, student, student.detach().clone(), labels, temperature=1.5)
    assert abs(loss.item()) < 1e-6
    assert grad_of(loss, student).abs().max().item() < 1e-6


@pytest.mark.parametrize("kind", KD_KINDS)
def test_non_negative_per_position(kind):
    student, teacher, _ = make_batch(3, b=4, s=9)
    for b in range(4):
        for t in range(1, 9):
            labels = torch.full((4, 9), -100)
            labels[b, t] = 0
            assert kd_loss(kind, student, teacher, labels).item() >= -1e-7


def test_fkl_is_rkl_with_roles_swapped():
    student, teacher, labels = make_batch(4)
    fkl = kd_loss("fkl", student, teacher, labels, temperature=1.7)
    rkl = kd_loss("rkl", teacher, student.detach(), labels, temperature=1.7)
    assert fkl.item() == pytest.approx(rkl.item(), rel=1e-6)


def test_js_symmetry():
    student, teacher, labels = make_batch(5)
    forward = kd_loss("js", student, teacher, labels, beta=0.5)
    swapped = kd_loss("js", teacher, student.detach(), labels, beta=0.5)
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-6)
    # The generalised JSD is symmetric only under beta -> 1 - beta.
    skewed = kd_loss("js", student, teacher, labels, beta=0.2)
    assert skewed.item() != pytest.approx(kd_loss("js", teacher, student.detach(), labels, beta=0.2).item(), rel=1e-3)
    assert skewed.item() == pytest.approx(kd_loss("js", teacher, student.detach(), labels, beta=0.8).item(), rel=1e-6)


def test_skew_limits():
    student, teacher, labels = make_batch(6)
    for skewed, plain in (("skl", "fkl"), ("srkl", "rkl")):
        at_zero = kd_loss(skewed, student, teacher, labels, skew_alpha=0.0)
        assert at_zero.item() == pytest.approx(kd_loss(plain, student, teacher, labels).item(), rel=1e-6)
        assert abs(kd_loss(skewed, student, teacher, labels, skew_alpha=1.0).item()) < 1e-6
        # A skew mixes in the other distribution, so the divergence shrinks.
        assert kd_loss(skewed, student, teacher, labels, skew_alpha=0.1).item() < at_zero.item()


@pytest.mark.parametrize("kind", KD_KINDS)
def test_t2_scaling_switch(kind):
    student, teacher, labels = make_batch(7)
    scaled = kd_loss(kind, student, teacher, labels, temperature=2.0)
    unscaled = kd_loss(kind, student, teacher, labels, temperature=2.0, scale_by_t2=False)
    assert scaled.item() == pytest.approx(4.0 * unscaled.item(), rel=1e-6)
    assert unscaled.item() != pytest.approx(kd_loss(kind, student, teacher, labels).item(), rel=1e-3)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_unscored_positions_do_not_matter(kind):
    student, teacher, labels = make_batch(8)
    loss = kd_loss(kind, student, teacher, labels)
    unscored = torch.zeros(B, S, dtype=torch.bool)
    unscored[:, :-1] = labels[:, 1:] == -100
    unscored[:, -1] = True  # the last position predicts nothing
    noisy_student = torch.where(unscored.unsqueeze(-1), torch.randn(B, S, V) * 50, student.detach())
    noisy_teacher = torch.where(unscored.unsqueeze(-1), torch.randn(B, S, V) * 50, teacher)
    assert kd_loss(kind, noisy_student, noisy_teacher, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    grad = grad_of(loss, student)
    assert grad[unscored].abs().max().item() == 0.0
    assert grad[~unscored].abs().max().item() > 0.0


@pytest.mark.parametrize("kind", KD_KINDS)
def test_global_num_tokens_makes_halves_add_up(kind):
    student, teacher, labels = make_batch(9, b=4)
    n = count_tokens(labels)
    assert int(n) == int((labels[:, 1:] != -100).sum())
    whole = kd_loss(kind, student, teacher, labels, temperature=1.5)
    halves = sum(
        kd_loss(kind, student[rows], teacher[rows], labels[rows], temperature=1.5, num_tokens=n)
        for rows in (slice(0, 1), slice(1, 4))
    )
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_of(halves, student), grad_of(whole, student))
    # A per-half mean (the default) does not add up when the halves score different counts.
    assert count_tokens(labels[:1]) != count_tokens(labels[1:])
    local = sum(kd_loss(kind, student[r], teacher[r], labels[r], temperature=1.5) for r in (slice(0, 1), slice(1, 4)))
    assert local.item() != pytest.approx(whole.item(), rel=1e-3)
    assert kd_loss(kind, student, teacher, labels, num_tokens=int(n) * 2).item() == pytest.approx(
        kd_loss(kind, student, teacher, labels).item() / 2, rel=1e-6
    )


@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunk_positions_invariance(kind):
    student, teacher, labels = make_batch(10)
    results = []
    for chunk_positions in (1, 3, 10_000):
        loss = kd_loss(kind, student, teacher, labels, temperature=1.3, chunk_positions=chunk_positions)
        results.append((loss, grad_of(loss, student)))
    for loss, grad in results[1:]:
        assert loss.item() == pytest.approx(results[0][0].item(), rel=1e-6)
        torch.testing.assert_close(grad, results[0][1])


@pytest.mark.parametrize("kind", KD_KINDS)
def test_no_grad_path_matches(kind):
    student, teacher, labels = make_batch(11)
    with torch.no_grad():
        plain = kd_loss(kind, student, teacher, labels, chunk_positions=2)
    assert plain.item() == pytest.approx(kd_loss(kind, student, teacher, labels).item(), rel=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_shared_masked_vocabulary(kind):
    # -inf on the same entries on both sides must behave exactly like a smaller vocabulary.
    student, teacher, labels = make_batch(12)
    masked = torch.zeros(V, dtype=torch.bool)
    masked[[2, 5, 9]] = True
    s_inf = student.detach().masked_fill(masked, float("-inf")).requires_grad_()
    t_inf = teacher.masked_fill(masked, float("-inf"))
    loss = kd_loss(kind, s_inf, t_inf, labels, temperature=2.0)
    want = reference(kind, student[..., ~masked], teacher[..., ~masked], labels, temperature=2.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    grad = grad_of(loss, s_inf)
    assert torch.isfinite(grad).all()
    assert grad[..., masked].abs().max().item() == 0.0


@pytest.mark.parametrize("kind", KD_KINDS)
def test_one_hot_rows_from_masking(kind):
    # Everything masked but one entry: both sides are the same one-hot distribution.
    student, teacher, labels = make_batch(13)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[4] = True
    s_inf = student.detach().masked_fill(~keep, float("-inf")).requires_grad_()
    loss = kd_loss(kind, s_inf, teacher.masked_fill(~keep, float("-inf")), labels)
    assert abs(loss.item()) < 1e-7
    assert torch.isfinite(grad_of(loss, s_inf)).all()


@pytest.mark.parametrize("kind", KD_KINDS)
def test_independent_masks_stay_finite(kind):
    # Teacher and student mask different entries; where one side supports a token the other masks the
    # divergence is truly infinite for some kinds, and must still come out finite, not NaN.
    student, teacher, labels = make_batch(14)
    g = torch.Generator().manual_seed(0)
    s_inf = student.detach().masked_fill(torch.rand(B, S, V, generator=g) < 0.3, float("-inf"))
    s_inf[..., 0] = 0.0  # no fully masked row
    s_inf.requires_grad_()
    t_inf = teacher.masked_fill(torch.rand(B, S, V, generator=g) < 0.3, float("-inf"))
    t_inf[..., 1] = 0.0
    loss = kd_loss(kind, s_inf, t_inf, labels, temperature=2.0)
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(grad_of(loss, s_inf)).all()


@pytest.mark.parametrize("kind", ["fkl", "js", "tvd", "skl", "srkl"])
def test_teacher_masked_entries_match_reference(kind):
    # These kinds stay finite when only the teacher masks entries (0·log0 = 0 on the teacher side).
    student, teacher, labels = make_batch(15)
    g = torch.Generator().manual_seed(1)
    t_inf = teacher.masked_fill(torch.rand(B, S, V, generator=g) < 0.4, float("-inf"))
    t_inf[..., 0] = 0.0
    loss = kd_loss(kind, student, t_inf, labels)
    want = reference(kind, student, t_inf, labels)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert torch.isfinite(grad_of(loss, student)).all()


@pytest.mark.parametrize("kind", KD_KINDS)
def test_all_masked_returns_differentiable_zero(kind):
    student, teacher, _ = make_batch(16)
    labels = torch.full((B, S), -100)
    assert int(count_tokens(labels)) == 0
    for num_tokens in (None, 0, torch.tensor(0), 12):
        loss = kd_loss(kind, student, teacher, labels, num_tokens=num_tokens)
        assert loss.item() == 0.0
        grad = grad_of(loss, student)
        assert torch.isfinite(grad).all() and grad.abs().max().item() == 0.0
    ce = cross_entropy(student, labels)
    assert ce.item() == 0.0 and grad_of(ce, student).abs().max().item() == 0.0


@pytest.mark.parametrize("kind", KD_KINDS)
def test_bf16_inputs(kind):
    student, teacher, labels = make_batch(17)
    s16 = student.detach().bfloat16().requires_grad_()
    t16 = teacher.bfloat16()
    loss = kd_loss(kind, s16, t16, labels, temperature=2.0)
    assert loss.dtype == torch.float32
    # The bf16 inputs are upcast before the softmax, so the loss equals the fp32 loss of the same values.
    want = reference(kind, s16.float(), t16.float(), labels, temperature=2.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    grad = grad_of(loss, s16)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


def test_gradient_reaches_student_only():
    student, teacher, labels = make_batch(18)
    teacher.requires_grad_()
    for kind in KD_KINDS:
        student.grad = None
        teacher.grad = None
        kd_loss(kind, student, teacher, labels, temperature=2.0).backward()
        assert teacher.grad is None
        assert student.grad is not None and student.grad.abs().max().item() > 0


def test_cross_entropy_matches_torch_with_hf_shift():
    student, _, labels = make_batch(19)
    want = F.cross_entropy(student[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    want_grad = grad_of(want, student)
    for chunk_positions in (1, 5, 128):
        got = cross_entropy(student, labels, chunk_positions=chunk_positions)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(grad_of(got, student), want_grad)
    n = count_tokens(labels)
    halves = sum(cross_entropy(student[r], labels[r], num_tokens=n) for r in (slice(0, 1), slice(1, 3)))
    assert halves.item() == pytest.approx(want.item(), rel=1e-6)
    s16 = student.detach().bfloat16()
    want16 = F.cross_entropy(s16[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1))
    assert cross_entropy(s16, labels).item() == pytest.approx(want16.item(), rel=1e-6)


def test_bad_inputs_raise_clear_errors():
    student, teacher, labels = make_batch(20)
    with pytest.raises(ValueError, match="fkl, rkl, js, tvd, skl, srkl, akl"):
        kd_loss("kl", student, teacher, labels)
    with pytest.raises(ValueError, match="teacher vocab size 12 != student vocab size 11"):
        kd_loss("fkl", student, torch.randn(B, S, 12), labels)
    with pytest.raises(ValueError, match="labels shape"):
        kd_loss("fkl", student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match="num_tokens"):
        kd_loss("fkl", student, teacher, labels, num_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss("fkl", student, teacher, labels, temperature=0.0)
    with pytest.raises(ValueError, match="skew_alpha"):
        kd_loss("skl", student, teacher, labels, skew_alpha=1.5)
    with pytest.raises(ValueError, match="chunk_positions"):
        cross_entropy(student, labels, chunk_positions=0)


def test_weighted_sum_of_losses_backpropagates_each_weight():
    # The training loss is (1 - a)·CE + a·KD: each term's gradient must arrive scaled by its weight.
    student, teacher, labels = make_batch(21)
    kd, ce = kd_loss("js", student, teacher, labels, temperature=2.0), cross_entropy(student, labels)
    combined = grad_of(0.3 * ce + 0.7 * kd, student)
    kd_alone = grad_of(kd_loss("js", student, teacher, labels, temperature=2.0), student)
    ce_alone = grad_of(cross_entropy(student, labels), student)
    torch.testing.assert_close(combined, 0.3 * ce_alone + 0.7 * kd_alone)


def test_second_backward_through_a_loss_fails_loudly():
    # The stored gradient is scaled in place during backward; reusing it must raise, not mislead.
    student, teacher, labels = make_batch(22)
    loss = kd_loss("fkl", student, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# The hidden-state path: linear_kd_loss, linear_cross_entropy, linear_kd_and_ce against the same
# losses on the product logits hidden @ head.T.

H, VL = 6, 13  # hidden size, vocabulary of the hidden-state tests


def make_linear_batch(seed, dtype=torch.float64, b=4, s=9, h=H, v=VL, teacher_h=5):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, s, h, generator=g) * 1.5).to(dtype).requires_grad_()
    head = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    # The teacher has its own hidden size: only the vocabulary is shared.
    t_hidden = (torch.randn(b, s, teacher_h, generator=g) * 1.5).to(dtype)
    t_head = torch.randn(v, teacher_h, generator=g).to(dtype)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[:, :3] = -100  # a prompt
    labels[torch.rand(b, s, generator=g) < 0.2] = -100
    labels[1] = -100  # a row with nothing scored
    return hidden, head, t_hidden, t_head, labels


def grads_of(loss, *xs):
    return torch.autograd.grad(loss, xs)


def assert_same_loss_and_grads(got, want, inputs, rtol=1e-4):
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for g_got, g_want in zip(grads_of(got, *inputs), grads_of(want, *inputs)):
        assert g_got.dtype == g_want.dtype
        torch.testing.assert_close(g_got, g_want, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_linear_kd_loss_equals_kd_loss_on_product_logits(kind, temperature, dtype):
    hidden, head, t_hidden, t_head, labels = make_linear_batch(30, dtype)
    n = int(count_tokens(labels))
    assert n % 4 and n > 8  # chunks of 4 leave a remainder; several chunks are taken
    for chunk_positions, num_tokens in ((4, None), (1, n + 3), (10_000, torch.tensor(n + 5)), (None, None)):
        opts = dict(temperature=temperature, skew_alpha=0.3, beta=0.3, mu=0.4, num_tokens=num_tokens)
        got = linear_kd_loss(kind, hidden, head, t_hidden, t_head, labels, chunk_positions=chunk_positions, **opts)
        want = kd_loss(kind, hidden @ head.T, t_hidden @ t_head.T, labels, **opts)
        assert got.dtype == torch.float32
        assert_same_loss_and_grads(got, want, (hidden, head))


def test_linear_cross_entropy_equals_cross_entropy_on_product_logits():
    hidden, head, _, _, labels = make_linear_batch(31, torch.float32)
    n = count_tokens(labels)
    for chunk_positions, num_tokens in ((3, None), (1, n), (10_000, int(n) * 2), (None, None)):
        got = linear_cross_entropy(hidden, head, labels, num_tokens=num_tokens, chunk_positions=chunk_positions)
        want = cross_entropy(hidden @ head.T, labels, num_tokens=num_tokens)
        assert_same_loss_and_grads(got, want, (hidden, head))


def test_linear_losses_give_unscored_positions_no_gradient():
    hidden, head, t_hidden, t_head, labels = make_linear_batch(32, torch.float32)
    loss = linear_kd_loss("js", hidden, head, t_hidden, t_head, labels, chunk_positions=5)
    (grad,) = grads_of(loss, hidden)
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    assert grad[~scored].abs().max().item() == 0.0 and grad[1].abs().max().item() == 0.0
    assert grad[scored].abs().amax(-1).min().item() > 0.0


@pytest.mark.parametrize("kind", ["fkl", "akl"])
def test_linear_kd_loss_bf16(kind):
    hidden, head, t_hidden, t_head, labels = make_linear_batch(33, torch.bfloat16)
    loss = linear_kd_loss(kind, hidden, head, t_hidden, t_head, labels, temperature=2.0, chunk_positions=4)
    assert loss.dtype == torch.float32
    want = kd_loss(kind, hidden @ head.T, t_hidden @ t_head.T, labels, temperature=2.0)
    # Logits are made in bf16 on both paths; only the matmul blocking may round differently.
    assert loss.item() == pytest.approx(want.item(), rel=2e-2)
    for got, ref in zip(grads_of(loss, hidden, head), grads_of(want, hidden, head)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref.float(), rtol=5e-2, atol=5e-2)


def test_linear_losses_under_autocast_keep_fp32_gradients():
    # Training runs an fp32 student under bf16 autocast: logits come out of a bf16 matmul, and the
    # gradients must come back in the fp32 dtypes of the hidden states and the head.
    hidden, head, t_hidden, t_head, labels = make_linear_batch(41, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = linear_kd_and_ce(
            "js", hidden, head, t_hidden, t_head, labels, labels, kd_weight=0.5, chunk_positions=4
        )
        logits = hidden @ head.T
        assert logits.dtype == torch.bfloat16
        want = 0.5 * kd_loss("js", logits, t_hidden @ t_head.T, labels) + 0.5 * cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for got, ref in zip(grads_of(loss, hidden, head), grads_of(want, hidden, head)):
        assert got.dtype == torch.float32
        # bf16 logit gradients, summed in another order: within a few bf16 roundings of the largest entry.
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=5e-3)


def test_tied_head_gets_both_gradients():
    # The head is also the input embedding: autograd must add the loss's head gradient to the one
    # that flows back through the hidden states into the embedding rows.
    _, _, t_hidden, t_head, labels = make_linear_batch(34)
    g = torch.Generator().manual_seed(34)
    weight = torch.nn.Parameter(torch.randn(VL, H, generator=g, dtype=torch.float64))
    mix = torch.randn(H, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, VL, labels.shape, generator=g)

    def hidden_of(embedding):
        return torch.tanh(F.embedding(ids, embedding) @ mix)

    got = linear_kd_loss("fkl", hidden_of(weight), weight, t_hidden, t_head, labels, chunk_positions=3)
    want = kd_loss("fkl", hidden_of(weight) @ weight.T, t_hidden @ t_head.T, labels)
    (grad_got,) = grads_of(got, weight)
    (grad_want,) = grads_of(want, weight)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-7)
    head_only = grads_of(linear_kd_loss("fkl", hidden_of(weight).detach(), weight, t_hidden, t_head, labels), weight)[0]
    assert not torch.allclose(grad_got, head_only, rtol=1e-3)


@pytest.mark.parametrize("kd_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_and_ce_in_one_pass_equal_the_separate_losses(kd_weight, temperature):
    hidden, head, t_hidden, t_head, labels = make_linear_batch(35)
    ce_labels = labels.clone()
    ce_labels[2] = -100  # an on-policy row: KD only
    ce_labels[1, 5:] = 7  # scored for CE only, so the pass visits rows that KD must skip
    n_kd, n_ce = count_tokens(labels), int(count_tokens(ce_labels)) + 2
    loss, kd, ce = linear_kd_and_ce(
        "srkl",
        hidden,
        head,
        t_hidden,
        t_head,
        labels,
        ce_labels,
        kd_weight=kd_weight,
        temperature=temperature,
        num_tokens=n_kd,
        ce_num_tokens=n_ce,
        chunk_positions=4,
    )
    kd_want = kd_loss("srkl", hidden @ head.T, t_hidden @ t_head.T, labels, temperature=temperature, num_tokens=n_kd)
    ce_want = cross_entropy(hidden @ head.T, ce_labels, num_tokens=n_ce)
    assert not kd.requires_grad and not ce.requires_grad
    assert kd.item() == pytest.approx(kd_want.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ce_want.item(), rel=1e-5)
    assert_same_loss_and_grads(loss, kd_weight * kd_want + (1 - kd_weight) * ce_want, (hidden, head))


def test_kd_and_ce_without_a_teacher_is_weighted_ce():
    hidden, head, _, _, labels = make_linear_batch(36)
    loss, kd, ce = linear_kd_and_ce("fkl", hidden, head, None, None, labels, labels, kd_weight=0.25, chunk_positions=5)
    assert kd.item() == 0.0
    want = cross_entropy(hidden @ head.T, labels)
    assert ce.item() == pytest.approx(want.item(), rel=1e-6)
    assert_same_loss_and_grads(loss, 0.75 * want, (hidden, head))


class RecordOps(TorchDispatchMode):
    """Every aten op run inside it, autograd's included, with the size of the largest tensor it made."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, max(made, default=0)))
        return out


def test_linear_kd_loss_never_holds_full_logits():
    # No op may make a tensor the size of the (scored positions, vocab) logits: only chunk- and input-sized ones.
    b, s, v, chunk = 2, 64, 97, 8
    hidden, head, t_hidden, t_head, labels = make_linear_batch(37, torch.float32, b=b, s=s, v=v)
    with RecordOps() as record:
        loss = linear_kd_loss("js", hidden, head, t_hidden, t_head, labels, chunk_positions=chunk)
        loss.backward()
    assert head.grad is not None and hidden.grad is not None
    bound = max(chunk * v, hidden.numel(), head.numel(), t_hidden.numel())
    assert max(numel for _, numel in record.ops) <= bound < int(count_tokens(labels)) * v


def test_linear_losses_under_no_grad_match_and_skip_gradient_work():
    hidden, head, t_hidden, t_head, labels = make_linear_batch(38, torch.float32)
    with torch.no_grad(), RecordOps() as record:
        plain = linear_kd_loss("tvd", hidden, head, t_hidden, t_head, labels, chunk_positions=3)
    assert not plain.requires_grad
    assert plain.item() == pytest.approx(linear_kd_loss("tvd", hidden, head, t_hidden, t_head, labels).item(), rel=1e-6)
    # Evaluation makes each chunk's student and teacher logits and nothing of the gradients.
    chunks = -(-int(count_tokens(labels)) // 3)
    assert sum(name in ("mm", "addmm", "addmm_") for name, _ in record.ops) == 2 * chunks
    assert not any(name == "index_copy_" for name, _ in record.ops)


def test_linear_losses_second_backward_fails_loudly():
    hidden, head, t_hidden, t_head, labels = make_linear_batch(39, torch.float32)
    loss = linear_kd_loss("fkl", hidden, head, t_hidden, t_head, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_linear_losses_bad_inputs_raise_clear_errors():
    hidden, head, t_hidden, t_head, labels = make_linear_batch(40, torch.float32)
    with pytest.raises(
        ValueError, match="student_head must be \\(vocab, hidden\\) with hidden = student_hidden's last dimension 6"
    ):
        linear_kd_loss("fkl", hidden, head[:, :5], t_hidden, t_head, labels)
    with pytest.raises(ValueError, match="teacher_hidden must be \\(batch, seq, hidden\\)"):
        linear_kd_loss("fkl", hidden, head, t_hidden[0], t_head, labels)
    with pytest.raises(ValueError, match="teacher vocab size 12 != student vocab size 13"):
        linear_kd_loss("fkl", hidden, head, t_hidden, t_head[:12], labels)
    with pytest.raises(ValueError, match="labels shape"):
        linear_cross_entropy(hidden, head, labels[:, 1:])
    with pytest.raises(ValueError, match="ce_labels shape"):
        linear_kd_and_ce("fkl", hidden, head, t_hidden, t_head, labels, labels[:2], kd_weight=0.5)
    with pytest.raises(ValueError, match="kd_weight"):
        linear_kd_and_ce("fkl", hidden, head, t_hidden, t_head, labels, labels, kd_weight=1.5)
    with pytest.raises(ValueError, match="both be given, or both be None"):
        linear_kd_and_ce("fkl", hidden, head, t_hidden, None, labels, labels, kd_weight=0.5)
    with pytest.raises(ValueError, match="allowed kinds"):
        linear_kd_loss("kl", hidden, head, t_hidden, t_head, labels)
    with pytest.raises(ValueError, match="chunk_positions"):
        linear_cross_entropy(hidden, head, labels, chunk_positions=0)


def test_default_chunk_positions_is_the_config_default():
    from pocl_ray.config import KDConfig
    from pocl_ray.losses import DEFAULT_CHUNK_POSITIONS

    assert KDConfig().chunk_positions == DEFAULT_CHUNK_POSITIONS


def test_given_scored_positions_equal_found_ones_and_a_superset_adds_nothing():
    """A training step finds the scored positions on the host and passes them (no GPU sync);
    any superset of them must give the same values and gradients."""
    from pocl_ray.losses import linear_kd_and_ce

    torch.manual_seed(0)
    hidden, vocab = 6, V
    s_hidden = torch.randn(B, S, hidden, dtype=torch.float64, requires_grad=True)
    head = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    t_hidden, t_head = torch.randn(B, S, hidden, dtype=torch.float64), torch.randn(vocab, hidden, dtype=torch.float64)
    labels = torch.randint(0, vocab, (B, S))
    labels[:, :3] = -100
    labels[1] = -100
    ce_labels = labels.clone()
    ce_labels[2] = -100
    scored = (F.pad(labels[:, 1:], (0, 1), value=-100).flatten() != -100).nonzero().squeeze(1)
    results = []
    for positions in (None, scored, torch.arange(B * S)):
        loss, kd, ce = linear_kd_and_ce(
            "js",
            s_hidden,
            head,
            t_hidden,
            t_head,
            labels,
            ce_labels,
            kd_weight=0.6,
            temperature=2.0,
            num_tokens=torch.tensor(9),
            ce_num_tokens=torch.tensor(5),
            chunk_positions=4,
            scored_positions=positions,
        )
        grads = torch.autograd.grad(loss, (s_hidden, head))
        results.append((loss.detach(), kd, ce, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)
    assert results[0][1] > 0 and results[0][2] > 0


# ---------------------------------------------------------------------------------------------
# The closed-form gradients (issue 22, item 7) against the autograd path they replaced: autograd through
# each kind's per-outcome terms, in fp32, on the same floored log-probs.


def autograd_kd_and_ce(kind, logits, t_logits, labels, ce_labels, *, kd_weight, temperature, **settings):
    """(kd_weight·KD + (1 − kd_weight)·CE, KD, CE) as the chunked loss took them before, by autograd, on
    full fp32 (batch, seq, vocab) logits."""
    options = dict(skew_alpha=0.1, beta=0.5, mu=0.5) | settings
    kd_on, ce_on = labels[:, 1:] != -100, ce_labels[:, 1:] != -100
    logq = torch.log_softmax(logits[:, :-1][kd_on] / temperature, -1).clamp_min(LOG_FLOOR)
    logp = torch.log_softmax(t_logits[:, :-1][kd_on] / temperature, -1).clamp_min(LOG_FLOOR)
    if kind == "akl":
        with torch.no_grad():
            p = logp.exp()
            w = _akl_head_weight(p, (p - logq.exp()).abs(), options["mu"])
        fkl, rkl = (_pointwise(k, options["skew_alpha"], options["beta"])(logp, logq).sum(-1) for k in ("fkl", "rkl"))
        per_row = w * fkl + (1 - w) * rkl
    else:
        per_row = _pointwise(kind, options["skew_alpha"], options["beta"])(logp, logq).sum(-1)
    kd = per_row.sum() * temperature**2 / kd_on.sum()
    ce = F.nll_loss(torch.log_softmax(logits[:, :-1][ce_on], -1), ce_labels[:, 1:][ce_on], reduction="sum")
    ce = ce / ce_on.sum()
    return kd_weight * kd + (1 - kd_weight) * ce, kd, ce


def assert_equal_to_1e6(got, want, inputs):
    """Values to 1e-6 relative; gradients to 1e-6 of their largest entry (entries near 0 differ in rounding)."""
    for g_val, w_val in zip(got, want):
        assert g_val.item() == pytest.approx(w_val.item(), rel=1e-6, abs=1e-7)
    grads = grads_of(got[0], *inputs)
    for g_got, g_want in zip(grads, grads_of(want[0], *inputs)):
        assert g_got.dtype == g_want.dtype == torch.float32 and torch.isfinite(g_got).all()
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-6 * g_want.abs().max().item())
    return grads


CLOSED_FORM_SETTINGS = [dict(), dict(skew_alpha=0.3, beta=0.2, mu=0.3)]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_closed_form_kd_and_ce_equals_autograd_on_hidden_states(kind, temperature):
    hidden, head, t_hidden, t_head, labels = make_linear_batch(50, torch.float32, v=37)
    ce_labels = labels.clone()
    ce_labels[2] = -100  # KD only
    ce_labels[1, 5:] = 7  # CE only: rows the pass visits and KD must skip
    for settings in CLOSED_FORM_SETTINGS:
        got = linear_kd_and_ce(
            kind, hidden, head, t_hidden, t_head, labels, ce_labels, kd_weight=0.6, temperature=temperature,
            chunk_positions=4, **settings,
        )  # fmt: skip
        want = autograd_kd_and_ce(
            kind, hidden @ head.T, t_hidden @ t_head.T, labels, ce_labels, kd_weight=0.6, temperature=temperature,
            **settings,
        )  # fmt: skip
        assert_equal_to_1e6(got, want, (hidden, head))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_closed_form_equals_autograd_with_minus_inf_vocabulary_entries(kind, temperature):
    # A shared padded tail of the vocabulary, plus entries each side masks on its own (the truly infinite
    # divergences the floor keeps finite), on logits: the same engine with no head.
    student, teacher, labels = make_batch(51, v=29)
    g = torch.Generator().manual_seed(51)
    s_inf = student.detach().masked_fill(torch.rand(student.shape, generator=g) < 0.2, float("-inf"))
    t_inf = teacher.masked_fill(torch.rand(teacher.shape, generator=g) < 0.2, float("-inf"))
    s_inf[..., -3:], t_inf[..., -3:] = float("-inf"), float("-inf")
    s_inf[..., 0], t_inf[..., 1] = 0.0, 0.0  # no fully masked row
    s_inf.requires_grad_()
    ce_labels = labels.where(labels < 26, 0)  # labels in the padded tail cost inf
    ce_labels[0, 4:] = 3  # rows KD skips
    for settings in CLOSED_FORM_SETTINGS:
        o = _options("test", dict(temperature=temperature, chunk_positions=5, **settings), KDAndCEOptions)
        divergence = _kd_rows(kind, o.skew_alpha, o.beta, o.mu)
        got = _fused_losses(
            s_inf, None, t_inf, None, labels, ce_labels, divergence=divergence, kd_weight=0.7, options=o
        )
        want = autograd_kd_and_ce(
            kind, s_inf, t_inf, labels, ce_labels, kd_weight=0.7, temperature=temperature, **settings
        )
        (grad,) = assert_equal_to_1e6(got, want, (s_inf,))
        assert grad[..., -3:].abs().max().item() == 0.0
