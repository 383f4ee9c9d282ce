"""Curriculum-extraction core: projections and the hidden-state matching loss (pure torch)."""

import pytest
import torch
import torch.nn.functional as F

from pocl_ray.extraction import hidden_match_loss, layer_projection, projection_matrix


def test_projection_is_a_function_of_seed_and_shape():
    a = projection_matrix(64, 8, seed=3)
    assert a.shape == (64, 8) and a.dtype == torch.float32
    assert torch.equal(a, projection_matrix(64, 8, seed=3))
    assert not torch.equal(a, projection_matrix(64, 8, seed=4))
    assert projection_matrix(64, 8, seed=3, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_projection_does_not_depend_on_global_rng():
    torch.manual_seed(0)
    a = projection_matrix(32, 4, seed=7)
    torch.manual_seed(123)
    torch.randn(10)
    assert torch.equal(a, projection_matrix(32, 4, seed=7))


def test_gaussian_projection_scale():
    d_s = 16
    p = projection_matrix(20_000, d_s, seed=0).double()
    # Every entry is N(0, 1/d_s): per-column variance within a few percent at 20k samples.
    var = p.var(dim=0)
    assert torch.allclose(var, torch.full_like(var, 1 / d_s), rtol=0.05)
    assert p.mean().abs() < 0.01


def test_orthogonal_projection_has_orthonormal_columns():
    p = projection_matrix(100, 12, seed=5, kind="orthogonal")
    assert torch.allclose(p.T @ p, torch.eye(12), atol=1e-5)
    assert torch.equal(p, projection_matrix(100, 12, seed=5, kind="orthogonal"))


def test_projection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="d_teacher >= d_student"):
        projection_matrix(4, 8, seed=0, kind="orthogonal")
    with pytest.raises(ValueError, match="allowed: gaussian, orthogonal"):
        projection_matrix(8, 4, seed=0, kind="sparse")
    with pytest.raises(ValueError, match="positive"):
        projection_matrix(0, 4, seed=0)


def test_layer_projection_is_seeded_by_seed_and_layer():
    p = layer_projection(48, 6, 2, seed=11)
    assert torch.equal(p, layer_projection(48, 6, 2, seed=11))
    others = [
        layer_projection(48, 6, 3, seed=11),
        layer_projection(48, 6, 2, seed=12),
        layer_projection(48, 6, 11, seed=2),
    ]
    assert all(not torch.equal(p, o) for o in others)
    q = layer_projection(48, 6, 1, seed=0, kind="orthogonal")
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_loss_is_zero_when_student_reproduces_projected_teacher(normalize):
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 32)
    p = projection_matrix(32, 8, seed=1)
    labels = torch.tensor([[-100, -100, 4, 5, 6], [-100, 1, 2, -100, -100]])
    student = (teacher @ p).requires_grad_()
    loss = hidden_match_loss(student, teacher, p, labels, normalize=normalize)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    # Perturbing any response position makes it positive.
    bumped = student.detach().clone()
    bumped[0, 3, 0] += 1.0
    assert hidden_match_loss(bumped, teacher, p, labels, normalize=normalize) > 1e-3


def test_normalize_makes_the_loss_scale_invariant_per_position():
    torch.manual_seed(1)
    teacher = torch.randn(6, 16)
    p = projection_matrix(16, 4, seed=2)
    target = teacher @ p
    # Affine per-position rescaling of the target is invisible after layer norm, not without it.
    student = 3.0 * target + 2.0
    assert hidden_match_loss(student, teacher, p, normalize=True).item() == pytest.approx(0.0, abs=1e-8)
    assert hidden_match_loss(student, teacher, p, normalize=False).item() > 1.0


def test_loss_value_matches_a_hand_computation():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 10)
    p = projection_matrix(10, 4, seed=0)
    labels = torch.tensor([[-100, 7, 7], [7, -100, -100]])
    rows = [(0, 1), (0, 2), (1, 0)]
    for normalize in (True, False):
        want = 0.0
        for b, i in rows:
            a, y = s[b, i], t[b, i] @ p
            if normalize:
                a, y = F.layer_norm(a, (4,)), F.layer_norm(y, (4,))
            want += ((a - y) ** 2).mean().item()
        got = hidden_match_loss(s, t, p, labels, normalize=normalize)
        assert got.item() == pytest.approx(want / 3, rel=1e-5)
        # An explicit global count rescales the same sum.
        for count in (12, torch.tensor(6)):
            got = hidden_match_loss(s, t, p, labels, normalize=normalize, num_tokens=count)
            assert got.item() == pytest.approx(want / int(count), rel=1e-5)


def test_prompt_positions_are_masked():
    torch.manual_seed(3)
    s, t = torch.randn(1, 4, 4), torch.randn(1, 4, 12)
    p = projection_matrix(12, 4, seed=0)
    labels = torch.tensor([[-100, -100, 3, 3]])
    base = hidden_match_loss(s, t, p, labels)
    s2, t2 = s.clone(), t.clone()
    s2[0, :2] = 100.0
    t2[0, :2] = -50.0
    assert hidden_match_loss(s2, t2, p, labels).item() == pytest.approx(base.item(), rel=1e-6)
    # Gradient reaches only the scored positions.
    s3 = s.clone().requires_grad_()
    hidden_match_loss(s3, t, p, labels).backward()
    assert s3.grad[0, :2].abs().sum() == 0 and s3.grad[0, 2:].abs().sum() > 0


def test_plain_tensors_score_every_row_and_match_all_ones_labels():
    torch.manual_seed(4)
    s, t = torch.randn(7, 5), torch.randn(7, 9)
    p = projection_matrix(9, 5, seed=1)
    a = hidden_match_loss(s, t, p)
    b = hidden_match_loss(s, t, p, torch.zeros(7, dtype=torch.long))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_teacher_side_is_detached():
    torch.manual_seed(5)
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 6, requires_grad=True)
    p = projection_matrix(6, 4, seed=0).requires_grad_()
    hidden_match_loss(s, t, p).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and p.grad is None


def test_no_scored_positions_gives_a_differentiable_zero():
    s = torch.randn(1, 3, 4, requires_grad=True)
    t = torch.randn(1, 3, 8)
    loss = hidden_match_loss(s, t, projection_matrix(8, 4, seed=0), torch.full((1, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_shape_errors_name_the_mismatch():
    p = projection_matrix(8, 4, seed=0)
    with pytest.raises(ValueError, match="projection must be"):
        hidden_match_loss(torch.randn(2, 4), torch.randn(2, 8), projection_matrix(8, 3, seed=0))
    with pytest.raises(ValueError, match="leading"):
        hidden_match_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 8), p, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="every dimension but the last"):
        hidden_match_loss(torch.randn(2, 4), torch.randn(3, 8), p)


def test_bf16_hidden_states_are_scored_in_fp32():
    torch.manual_seed(6)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 8)
    p = projection_matrix(8, 4, seed=0)
    loss = hidden_match_loss(s.bfloat16(), t.bfloat16(), p)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(hidden_match_loss(s, t, p).item(), rel=0.05)
