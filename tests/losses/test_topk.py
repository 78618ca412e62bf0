"""Top-k teacher targets: exact at k = V, monotone lower bound for KL, residual mass, storage rounding."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.errors import KDistillError, UnknownNameError
from kdistill.losses import logits as L
from kdistill.losses.topk import DIVERGENCES, student_coarse, teacher_coarse, teacher_topk, topk_loss


def _pair(B=2, T=5, V=24, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale, torch.randn(B, T, V, generator=g) * scale


def test_teacher_topk_residual_is_exact():
    _, t = _pair()
    lp, idx, lres = teacher_topk(t, k=5, kd_temperature=2.0)
    p = torch.softmax(t / 2.0, -1)
    assert torch.allclose(lp.exp(), p.gather(-1, idx), atol=1e-7)
    assert torch.allclose(lres.exp(), 1 - p.gather(-1, idx).sum(-1), atol=1e-6)
    assert torch.allclose(teacher_coarse(lp, lres).exp().sum(-1), torch.ones(2, 5), atol=1e-6)
    assert torch.allclose(teacher_coarse(lp).exp(), teacher_coarse(lp, lres).exp(), atol=1e-5)


def test_student_coarse_sums_to_one_with_exact_tail():
    s, t = _pair()
    _, idx, _ = teacher_topk(t, k=7)
    c = student_coarse(s, idx, kd_temperature=1.5)
    assert torch.allclose(c.exp().sum(-1), torch.ones(2, 5), atol=1e-6)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_k_equal_v_is_the_full_divergence(name):
    s, t = _pair()
    kw = {"generalized_jsd": {"beta": 0.3}, "taid": {"t": 0.7}, "skew_kl": {"skew": 0.1},
          "skew_reverse_kl": {"skew": 0.1}, "token_selective": {"entropy_weight": 0.0}}.get(name, {})
    T = 2.0
    lp, idx, lres = teacher_topk(t, k=24, kd_temperature=T)
    sg = s.clone().requires_grad_(True)
    sf = s.clone().requires_grad_(True)
    got = topk_loss(sg, lp, idx, lres, divergence=name, kd_temperature=T, **kw)
    full = DIVERGENCES[name](sf, t, kd_temperature=T, **kw)
    assert torch.allclose(got, full, atol=1e-5)
    got.sum().backward()
    full.sum().backward()
    assert torch.isfinite(sg.grad).all()
    assert torch.allclose(sg.grad, sf.grad, atol=1e-5)


def test_topk_kl_is_monotone_lower_bound_converging_to_full():
    s, t = _pair(V=64, scale=2.0)
    full = L.forward_kl(s, t, kd_temperature=1.5)
    prev = torch.zeros_like(full)
    errs = []
    for k in (1, 2, 4, 8, 16, 32, 64):
        lp, idx, lres = teacher_topk(t, k=k, kd_temperature=1.5)
        approx = topk_loss(s, lp, idx, lres, kd_temperature=1.5)
        assert (approx <= full + 1e-5).all()
        assert (approx >= prev - 1e-5).all()
        prev = approx
        errs.append(((full - approx).sum() / full.sum()).item())
    assert errs[-1] < 1e-5 and errs[0] > errs[3] > errs[5]


def test_fp16_storage_keeps_the_loss_close():
    s, t = _pair(V=200, scale=2.0)
    lp, idx, lres = teacher_topk(t, k=32)
    exact = topk_loss(s, lp, idx, lres)
    stored = topk_loss(s, lp.half(), idx.to(torch.int32), lres)
    assert ((stored - exact).abs() / exact).max() < 5e-3


def test_residual_gradient_reaches_tail_tokens():
    s, t = _pair(V=30)
    lp, idx, lres = teacher_topk(t, k=3)
    s.requires_grad_(True)
    topk_loss(s, lp, idx, lres).sum().backward()
    tail = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)
    assert s.grad[tail].abs().sum() > 0 and torch.isfinite(s.grad).all()


def test_temperature_applies_to_student():
    s, t = _pair()
    lp, idx, lres = teacher_topk(t, k=4, kd_temperature=3.0)
    a = topk_loss(s, lp, idx, lres, kd_temperature=3.0)
    b = topk_loss(s / 3.0, lp, idx, lres, kd_temperature=1.0)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, topk_loss(s, lp, idx, lres, kd_temperature=1.0), atol=1e-4)


def test_neg_inf_teacher_and_student_rows():
    s, t = _pair(V=10)
    s[..., -2:] = -math.inf
    t[..., -2:] = -math.inf
    lp, idx, lres = teacher_topk(t, k=8)   # k equals the number of finite entries: residual is empty
    assert torch.isinf(lres).all()
    s.requires_grad_(True)
    out = topk_loss(s, lp, idx, lres)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_errors():
    s, t = _pair()
    lp, idx, lres = teacher_topk(t, k=4)
    with pytest.raises(UnknownNameError, match="forward_kl"):
        topk_loss(s, lp, idx, lres, divergence="forward_kll")
    with pytest.raises(KDistillError, match="vocabulary"):
        topk_loss(s[..., :10], lp, idx + 20, lres)
    with pytest.raises(KDistillError, match="aligned"):
        topk_loss(s[:, :3], lp, idx, lres)
    with pytest.raises(KDistillError, match=r"\[1, 24\]"):
        teacher_topk(t, k=0)


def _student_coarse_reference(student_logits, idx, kd_temperature):
    """The plain-autograd definition: log-softmax, gather, exact log-sum-exp of the rest."""
    import math

    from kdistill.losses.logits import log_probs
    from kdistill.losses.topk import safe_logsumexp

    ls = log_probs(student_logits, kd_temperature)
    rest = safe_logsumexp(ls.scatter(-1, idx, -math.inf))
    return torch.cat([ls.gather(-1, idx), rest.unsqueeze(-1)], -1)


@pytest.mark.parametrize("block_rows", [0, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_student_coarse_analytic_gradient_matches_autograd(temperature, block_rows, monkeypatch):
    """block_rows = 2: the forward runs over 2-row blocks (8 blocks, the last one partial), with the excluded
    id and the underflowing row in different blocks; 0: one block."""
    import kdistill.losses.logits as Lmod
    from kdistill.losses.topk import student_coarse

    if block_rows:
        monkeypatch.setattr(Lmod, "_BLOCK_ELEMENTS", block_rows * 40)

    torch.manual_seed(0)
    z = torch.randn(3, 5, 40) * 3
    z[0, 0, 7] = float("-inf")  # an excluded id, picked or not
    z[1, 2, :] = -1e4
    z[1, 2, 3] = 5.0  # almost all mass on one id: the rest mass is tiny but exact
    idx = torch.randn(3, 5, 40).topk(6, dim=-1).indices
    idx[0, 0, 0] = 7
    idx[1, 2, 0] = 3
    w = torch.randn(3, 5, 7)
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    got, want = student_coarse(a, idx, kd_temperature=temperature), _student_coarse_reference(b, idx, temperature)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (torch.nan_to_num(got, neginf=0.0) * w).sum().backward()
    (torch.nan_to_num(want, neginf=0.0) * w).sum().backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    # every id picked: no rest mass, log p(rest) = -inf, gradient still finite
    full = torch.arange(40).expand(3, 5, 40)
    c = z.clone().requires_grad_(True)
    out = student_coarse(c, full, kd_temperature=temperature)
    assert torch.isneginf(out[..., -1]).all()
    out[..., :-1].nan_to_num(neginf=0.0).sum().backward()
    assert torch.isfinite(c.grad).all()
