import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.classification import alpha_divergence
from kdistill.losses.logits import forward_kl, reverse_kl
from kdistill.methods.alpha_divergence import AlphaDivergenceKD
from kdistill.methods.base import ModelOutput


def test_hand_computed_value():
    s, t = [0.0, 1.0], [1.0, 0.0]
    ps = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
    pt = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
    a = 0.5
    expected = (sum(p ** a * q ** (1 - a) for p, q in zip(pt, ps)) - 1) / (a * (a - 1))
    got = alpha_divergence(torch.tensor([s]), torch.tensor([t]), alpha=a)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_to_one_recovers_forward_kl_and_to_zero_reverse_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 8, generator=g) * 2, torch.randn(16, 8, generator=g) * 2
    fkl, rkl = forward_kl(s, t, kd_temperature=2.0), reverse_kl(s, t, kd_temperature=2.0)
    # the gap closes linearly in eps (no cancellation blow-up near the end points)
    for eps in (1e-2, 1e-4, 1e-6):
        near_one = alpha_divergence(s, t, alpha=1.0 - eps, kd_temperature=2.0)
        torch.testing.assert_close(near_one, fkl, rtol=2 * eps + 1e-6, atol=1e-7)
        near_zero = alpha_divergence(s, t, alpha=eps, kd_temperature=2.0)
        torch.testing.assert_close(near_zero, rkl, rtol=2 * eps + 1e-6, atol=1e-7)
    torch.testing.assert_close(alpha_divergence(s, t, alpha=1.0, kd_temperature=2.0), fkl)
    torch.testing.assert_close(alpha_divergence(s, t, alpha=0.0, kd_temperature=2.0), rkl)


def test_zero_at_identical_nonnegative_and_symmetric_at_half():
    z = torch.randn(5, 6)
    for a in (-1.0, 0.5, 2.0):
        assert alpha_divergence(z, z, alpha=a).abs().max() < 1e-6
    s = torch.randn(5, 6)
    for a in (-1.0, 0.3, 2.0):
        assert (alpha_divergence(s, z, alpha=a) >= -1e-7).all()
    # D_{1/2}(p||q) is symmetric (4 x squared Hellinger)
    torch.testing.assert_close(alpha_divergence(s, z, alpha=0.5), alpha_divergence(z, s, alpha=0.5))


def test_neg_inf_logits_stay_finite_for_alpha_in_0_1():
    s = torch.tensor([[0.0, float("-inf"), 1.0]])
    t = torch.tensor([[0.5, float("-inf"), 0.0]])
    assert torch.isfinite(alpha_divergence(s, t, alpha=0.5)).all()
    assert alpha_divergence(s.bfloat16(), t.bfloat16(), alpha=0.5).dtype == torch.float32


def test_method_adaptive_max_and_validation():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    m = AlphaDivergenceKD(alpha=1.0, alpha_negative=-1.0, ce_weight=0.0, importance_clip=None)
    out = m(ModelOutput(s), ModelOutput(t), {"labels": torch.zeros(4, dtype=torch.long)})
    expected = torch.maximum(alpha_divergence(s, t, alpha=1.0), alpha_divergence(s, t, alpha=-1.0)).mean()
    assert out["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(KDistillError, match="alpha_negative"):
        AlphaDivergenceKD(alpha=0.5, alpha_negative=0.7)


def test_gradients_and_three_step_fit(zoo):
    losses, s, t = zoo["one_backward"](AlphaDivergenceKD(alpha=0.5))
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](AlphaDivergenceKD(alpha=1.0, alpha_negative=-1.0))
    zoo["assert_fit_ok"](res, t, before)


def test_importance_clip_inactive_matches_exact_value_and_gradient():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for a in (-1.0, 0.5, 2.0):
        s1 = s.clone().requires_grad_(True)
        exact = alpha_divergence(s1, t, alpha=a, kd_temperature=2.0)
        exact.sum().backward()
        s2 = s.clone().requires_grad_(True)
        clipped = alpha_divergence(s2, t, alpha=a, kd_temperature=2.0, importance_clip=1e12)
        clipped.sum().backward()
        torch.testing.assert_close(clipped, exact, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2.grad.double(), s1.grad.double(), rtol=1e-4, atol=1e-6)


def test_importance_clip_bounds_the_gradient_of_negative_alpha():
    # a confident teacher that gives class 2 almost no mass; the student puts mass there
    t = torch.tensor([[12.0, 0.0, -12.0]])
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    alpha_divergence(s, t, alpha=-1.0).sum().backward()
    wild = s.grad.abs().max().item()
    s.grad = None
    alpha_divergence(s, t, alpha=-1.0, importance_clip=5.0).sum().backward()
    tame = s.grad.abs().max().item()
    assert wild > 1e8 and tame < 5.0
    # the clipped gradient still points the student away from the class the teacher rules out
    assert s.grad[0, 2] > 0
    # clipped value: sum_c q_c (min(w_c, 5) - 1) / (a (a - 1)) with w = q / p_t for alpha = -1
    q = torch.full((3,), 1 / 3.0)
    p = torch.softmax(t[0], -1)
    expected = (q * ((q / p).clamp(max=5.0) - 1)).sum() / 2.0
    got = alpha_divergence(s.detach(), t, alpha=-1.0, importance_clip=5.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_importance_clip_validation():
    with pytest.raises(KDistillError, match="importance_clip"):
        alpha_divergence(torch.randn(2, 3), torch.randn(2, 3), alpha=-1.0, importance_clip=0.0)
    with pytest.raises(KDistillError, match="importance_clip"):
        AlphaDivergenceKD(importance_clip=-1.0)
