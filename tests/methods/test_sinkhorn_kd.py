import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.classification import sinkhorn_distance, sinkhorn_plan
from kdistill.methods.base import ModelOutput
from kdistill.methods.sinkhorn_kd import SinkhornKD


def test_plan_has_uniform_marginals_within_tolerance():
    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    plan, iters = sinkhorn_plan(cost, epsilon=0.05, max_iter=500, tol=1e-6)
    assert iters < 500  # converged by tolerance, not by the iteration cap
    assert (plan.sum(1) - 1 / 6).abs().sum() < 1e-6
    assert (plan.sum(0) - 1 / 6).abs().sum() < 1e-5


def test_small_epsilon_recovers_assignment_without_underflow():
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    plan, _ = sinkhorn_plan(cost, epsilon=1e-3, max_iter=50)  # exp(-1000) would underflow outside log space
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan, torch.eye(2) / 2, atol=1e-6, rtol=0)


def test_single_example_equals_the_cost():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.5]])
    d = sinkhorn_distance(s, t, cost="l1")
    l1 = (torch.softmax(s, -1) - torch.softmax(t, -1)).abs().sum()
    assert d.item() == pytest.approx(l1.item(), rel=1e-6)
    d2 = sinkhorn_distance(s, t, cost="l2")
    assert d2.item() == pytest.approx((torch.softmax(s, -1) - torch.softmax(t, -1)).pow(2).sum().item(), rel=1e-6)


def test_permutation_invariance_and_near_zero_at_identical():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 5, generator=g) * 4
    perm = torch.randperm(8, generator=g)
    a = sinkhorn_distance(z, z, epsilon=0.01, max_iter=500).mean()
    b = sinkhorn_distance(z, z[perm], epsilon=0.01, max_iter=500).mean()
    assert a.item() == pytest.approx(b.item(), abs=1e-4)
    assert a.item() < 0.05
    far = sinkhorn_distance(z, -z, epsilon=0.01, max_iter=500).mean()
    assert far.item() > 5 * a.item()


def test_gradient_is_finite_and_bad_cost_raises():
    s = torch.randn(4, 3, requires_grad=True)
    sinkhorn_distance(s, torch.randn(4, 3), epsilon=0.01).mean().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(KDistillError, match="cost"):
        sinkhorn_distance(s, s, cost="cosine")
    with pytest.raises(KDistillError):
        SinkhornKD(epsilon=0.0)


def test_method_terms():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    out = SinkhornKD(sinkhorn_weight=2.0, kd_weight=1.0, ce_weight=0.0)(
        ModelOutput(s), ModelOutput(t), {"labels": torch.zeros(5, dtype=torch.long)})
    assert set(out) == {"sinkhorn", "kd"}
    assert out["sinkhorn"].item() == pytest.approx(2.0 * sinkhorn_distance(s, t).mean().item(), rel=1e-5)


def test_gradients_and_three_step_fit(zoo):
    losses, s, t = zoo["one_backward"](SinkhornKD())
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](SinkhornKD(kd_weight=0.5))
    zoo["assert_fit_ok"](res, t, before)
