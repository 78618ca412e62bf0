import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.classification import head_gradient_alignment
from kdistill.losses.logits import cross_entropy, forward_kl
from kdistill.methods.adaptive_fusion import AdaptiveFusion, trilateral_features
from kdistill.methods.base import ModelOutput


def test_alignment_equals_autograd_inner_product():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(4, 3)
    h_tr, h_va = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    d_tr, g_va = torch.randn(5, 3, generator=g), torch.randn(3, 3, generator=g)

    def flat_grad(loss):
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        return torch.cat([gw.flatten(), gb])

    val = flat_grad((head(h_va) * g_va).sum(1).mean())
    expected = torch.stack([val @ flat_grad((head(h_tr[i]) * d_tr[i]).sum()) for i in range(5)])
    torch.testing.assert_close(head_gradient_alignment(h_tr, d_tr, h_va, g_va), expected, rtol=1e-5, atol=1e-6)


def test_hypergradient_matches_finite_difference_of_a_lookahead_step():
    """dL_val(theta - eta grad L_train(alpha)) / d alpha_k, measured by finite differences on a linear
    head, equals the closed form the method uses (first order in eta)."""
    torch.manual_seed(0)
    C, D, n, T, eta = 3, 4, 6, 2.0, 1e-3
    W0, b0 = torch.randn(C, D, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    h, hv = torch.randn(n, D, dtype=torch.float64), torch.randn(4, D, dtype=torch.float64)
    zt = torch.randn(n, C, dtype=torch.float64)
    y, yv = torch.randint(0, C, (n,)), torch.randint(0, C, (4,))

    def val_after_step(alpha):
        W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        z = h @ W.t() + b
        kd = T * T * forward_kl(z, zt, kd_temperature=T).double()
        ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
        gW, gb = torch.autograd.grad((alpha * kd + (1 - alpha) * ce).mean(), [W, b])
        zv = hv @ (W0 - eta * gW).t() + (b0 - eta * gb)
        return torch.nn.functional.cross_entropy(zv, yv).item()

    alpha = torch.full((n,), 0.5, dtype=torch.float64)
    fd = []
    for k in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[k] = 1e-3
        fd.append((val_after_step(alpha + e) - val_after_step(alpha - e)) / 2e-3)
    z, zv = h @ W0.t() + b0, hv @ W0.t() + b0
    ps, psT, ptT = torch.softmax(z, -1), torch.softmax(z / T, -1), torch.softmax(zt / T, -1)
    oh = torch.nn.functional.one_hot(y, C).double()
    d = T * (psT - ptT) - (ps - oh)
    gv = torch.softmax(zv, -1) - torch.nn.functional.one_hot(yv, C).double()
    closed = -eta * head_gradient_alignment(h, d, hv, gv).double() / n
    torch.testing.assert_close(closed, torch.tensor(fd, dtype=torch.float64), rtol=2e-2, atol=1e-9)


def test_trilateral_features():
    labels = torch.tensor([0, 1])
    big = torch.tensor([[50.0, 0.0], [0.0, 50.0]])  # s = t = y
    r = trilateral_features(big, big, labels)
    assert r.shape == (2, 10)
    assert r[:, :3].abs().max() < 1e-6 and r[:, 8].abs().max() < 1e-6  # degenerate triangle, no spread
    r2 = trilateral_features(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), big.flip(1), labels)
    assert torch.isfinite(r2).all() and (r2[:, 2] > 1.0).all()  # the teacher is far from the label


def test_starts_at_half_and_matches_fixed_mix_in_eval():
    m = AdaptiveFusion(kd_temperature=2.0).eval()
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    out = m(ModelOutput(s, {"embed": torch.randn(4, 5)}), ModelOutput(t), {"labels": y})
    expected = 0.5 * 4.0 * forward_kl(s, t, kd_temperature=2.0) + 0.5 * cross_entropy(s, y)
    assert out["fused"].item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert out["fusion"].item() == 0.0
    with pytest.raises(KDistillError):
        AdaptiveFusion(holdout_fraction=1.0)


def test_gradients_reach_student_and_fusion_net_and_fit(zoo):
    torch.manual_seed(3)
    m = AdaptiveFusion(holdout_fraction=0.5)
    losses, s, t = zoo["one_backward"](m)
    zoo["assert_grads"](losses, s, t, m)
    assert m.fusion[0].weight.grad is not None
    res, t, before = zoo["fit3"](AdaptiveFusion())
    zoo["assert_fit_ok"](res, t, before)
