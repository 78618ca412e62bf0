"""LLM distillation divergences: closed forms, limits, temperature, masking, -inf, dtype, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.logits import (
    TAIDSchedule,
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    taid,
    token_selective,
    tvd,
    uld,
)
from kdistill.losses.reduce import masked_mean

# name -> loss with its hyper-parameters fixed (same vocabulary on both sides)
LOSSES = {
    "forward_kl": lambda s, t, T: forward_kl(s, t, kd_temperature=T),
    "reverse_kl": lambda s, t, T: reverse_kl(s, t, kd_temperature=T),
    "generalized_jsd": lambda s, t, T: generalized_jsd(s, t, beta=0.3, kd_temperature=T),
    "skew_kl": lambda s, t, T: skew_kl(s, t, skew=0.1, kd_temperature=T),
    "skew_reverse_kl": lambda s, t, T: skew_reverse_kl(s, t, skew=0.1, kd_temperature=T),
    "tvd": lambda s, t, T: tvd(s, t, kd_temperature=T),
    "taid": lambda s, t, T: taid(s, t, t=0.6, kd_temperature=T),
    "token_selective": lambda s, t, T: token_selective(s, t, entropy_weight=0.0, kd_temperature=T),
    "uld": lambda s, t, T: uld(s, t, kd_temperature=T),
}
NEW = ["skew_kl", "skew_reverse_kl", "tvd", "taid", "token_selective", "uld"]


def _pair(shape=(2, 3, 11), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


def _p(x):
    e = [math.exp(v) for v in x]
    z = sum(e)
    return [v / z for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ------------------------------------------------------------------------------------------ closed forms

def test_skew_kl_closed_form():
    zs, zt = [0.0, 1.0, -1.0], [2.0, 0.0, 0.5]
    ps, pt = _p(zs), _p(zt)
    a = 0.1
    m = [a * x + (1 - a) * y for x, y in zip(pt, ps)]
    got = skew_kl(torch.tensor([zs]), torch.tensor([zt]), skew=a)
    assert got.item() == pytest.approx(_kl(pt, m), rel=1e-5)
    m_r = [a * y + (1 - a) * x for x, y in zip(pt, ps)]
    got_r = skew_reverse_kl(torch.tensor([zs]), torch.tensor([zt]), skew=a)
    assert got_r.item() == pytest.approx(_kl(ps, m_r), rel=1e-5)


def test_tvd_closed_form_and_bounds():
    # two-class: p_s = (0.5, 0.5), p_t = (e/(1+e), 1/(1+e)) -> TVD = |p_t0 - 0.5|
    got = tvd(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert got.item() == pytest.approx(math.e / (1 + math.e) - 0.5, rel=1e-6)
    # disjoint supports -> 1
    far = tvd(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))
    assert far.item() == pytest.approx(1.0, abs=1e-6)


def test_uld_closed_form_different_vocab_sizes():
    zs = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))              # sorted: .5 .3 .2
    zt = torch.log(torch.tensor([[0.1, 0.6, 0.05, 0.25]]))       # sorted: .6 .25 .1 .05
    expected = abs(0.5 - 0.6) + abs(0.3 - 0.25) + abs(0.2 - 0.1) + abs(0.0 - 0.05)
    assert uld(zs, zt).item() == pytest.approx(expected, abs=1e-6)
    assert uld(zt, zs).item() == pytest.approx(expected, abs=1e-6)  # symmetric


def test_uld_permutation_invariant_and_rejects_misaligned_positions():
    s, t = _pair((2, 5, 9))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(uld(s, t), uld(s[..., perm], t), atol=1e-6)
    assert uld(t[..., perm], t).abs().max() < 1e-6
    with pytest.raises(KDistillError, match="Align"):
        uld(torch.randn(2, 5, 9), torch.randn(2, 4, 12))


def test_taid_closed_form_and_gradient():
    zs = torch.tensor([[0.3, -1.0, 2.0, 0.0]], requires_grad=True)
    zt = torch.tensor([[1.0, 0.5, -0.5, 0.2]])
    t, T = 0.4, 2.0
    target = torch.softmax(((1 - t) * zs.detach() + t * zt) / T, -1)
    ps = torch.softmax(zs.detach() / T, -1)
    expected = _kl(target[0].tolist(), ps[0].tolist())
    loss = taid(zs, zt, t=t, kd_temperature=T)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.sum().backward()
    # d/dz_s KL(q || softmax(z_s / T)) with q fixed (detached student inside the target) = (p_s - q) / T
    assert torch.allclose(zs.grad, (ps - target) / T, atol=1e-6)


def test_forward_kl_gradient_closed_form_with_temperature():
    # reference for the direction convention: d forward_kl / d z_s = (p_s - p_t) / T
    zs = torch.randn(3, 7, requires_grad=True)
    zt = torch.randn(3, 7)
    T = 3.0
    forward_kl(zs, zt, kd_temperature=T).sum().backward()
    want = (torch.softmax(zs.detach() / T, -1) - torch.softmax(zt / T, -1)) / T
    assert torch.allclose(zs.grad, want, atol=1e-6)


def test_token_selective_selects_confident_teacher_tokens():
    # token 0: teacher confident, student flat -> distilled; token 1: student confident -> not distilled
    zs = torch.tensor([[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    zt = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    got = token_selective(zs, zt, entropy_weight=0.0)
    assert got[0, 0].item() == pytest.approx(forward_kl(zs, zt)[0, 0].item(), rel=1e-6)
    assert got[0, 1].item() == 0.0
    w = 0.25
    got_w = token_selective(zs, zt, entropy_weight=w)
    h = entropy(zs)
    assert torch.allclose(got_w, got + w * h, atol=1e-6)
    # entropy of uniform over 3 = log 3
    assert h[0, 0].item() == pytest.approx(math.log(3), rel=1e-6)


def test_token_selective_entropy_gradient_sharpens_student():
    zs = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    token_selective(zs, zs.detach(), entropy_weight=1.0).sum().backward()
    # minimising entropy increases the top logit relative to the others: gradient on it is negative
    assert zs.grad[0, 0] < 0 < zs.grad[0, 2]


# -------------------------------------------------------------------------------------------------- limits

def test_skew_zero_is_plain_kl():
    s, t = _pair()
    assert torch.allclose(skew_kl(s, t, skew=0.0, kd_temperature=2.0), forward_kl(s, t, kd_temperature=2.0), atol=1e-6)
    assert torch.allclose(skew_reverse_kl(s, t, skew=0.0, kd_temperature=2.0),
                          reverse_kl(s, t, kd_temperature=2.0), atol=1e-6)


def test_skew_bounds_and_monotonicity():
    s, t = _pair(scale=6.0)
    values = [skew_kl(s, t, skew=a).mean().item() for a in (0.0, 0.1, 0.5, 0.9)]
    assert all(x > y for x, y in zip(values, values[1:]))   # more skew -> smaller divergence
    # KL(p || a p + (1-a) q) <= -log(a): bounded even where the student puts ~0 mass
    extreme = skew_kl(torch.tensor([[100.0, -100.0]]), torch.tensor([[-100.0, 100.0]]), skew=0.1)
    assert extreme.item() <= -math.log(0.1) + 1e-5
    with pytest.raises(KDistillError, match=r"\[0, 1\)"):
        skew_kl(s, t, skew=1.0)


def test_generalized_jsd_beta_limits():
    s, t = _pair()
    # JSD(beta) / beta -> forward KL as beta -> 0 and JSD(beta) / (1 - beta) -> reverse KL as beta -> 1,
    # with an O(beta) error: it must shrink about tenfold per decade of beta.
    fwd, rev = forward_kl(s, t), reverse_kl(s, t)
    err_f = [(generalized_jsd(s, t, beta=b) / b / fwd - 1).abs().max().item() for b in (1e-2, 1e-3, 1e-4)]
    err_r = [(generalized_jsd(s, t, beta=1 - b) / b / rev - 1).abs().max().item() for b in (1e-2, 1e-3, 1e-4)]
    for err in (err_f, err_r):
        assert err[0] > 3 * err[1] > 9 * err[2]
        assert err[2] < 2e-2
    assert torch.equal(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))


def test_taid_limits():
    s, t = _pair()
    assert torch.allclose(taid(s, t, t=1.0, kd_temperature=1.5), forward_kl(s, t, kd_temperature=1.5), atol=1e-6)
    assert taid(s, t, t=0.0).abs().max() < 1e-6
    # interpolating toward the teacher: the target moves monotonically away from the student
    vals = [taid(s, t, t=x).mean().item() for x in (0.2, 0.5, 0.8, 1.0)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    with pytest.raises(KDistillError, match="TAIDSchedule"):
        taid(s, t, t=1.5)


# ----------------------------------------------------------------------------------- shared properties

@pytest.mark.parametrize("name", list(LOSSES))
def test_zero_at_identical_inputs(name):
    s, _ = _pair()
    out = LOSSES[name](s, s.clone(), 2.0)
    assert out.shape == s.shape[:-1]
    assert out.abs().max().item() < 1e-6


@pytest.mark.parametrize("name", NEW)
def test_positive_on_different_inputs(name):
    s, t = _pair()
    assert (LOSSES[name](s, t, 1.0) >= -1e-7).all()
    assert LOSSES[name](s, t, 1.0).mean() > 1e-3


@pytest.mark.parametrize("name", list(LOSSES))
def test_kd_temperature_really_applies(name):
    s, t = _pair()
    T = 3.0
    with_t = LOSSES[name](s, t, T)
    prescaled = LOSSES[name](s / T, t / T, 1.0)
    assert torch.allclose(with_t, prescaled, atol=1e-6)
    assert not torch.allclose(with_t, LOSSES[name](s, t, 1.0), atol=1e-4)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_in_fp32_out(name):
    s, t = _pair()
    out = LOSSES[name](s.bfloat16(), t.bfloat16(), 2.0)
    assert out.dtype == torch.float32
    ref = LOSSES[name](s.bfloat16().float(), t.bfloat16().float(), 2.0)
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_neg_inf_logits_equal_the_reduced_vocabulary_and_finite_grads(name):
    """Masked vocabulary rows (-inf on both sides, e.g. padded vocabularies) change nothing."""
    s, t = _pair((2, 3, 8))
    pad = torch.full((2, 3, 3), -math.inf)
    s_pad = torch.cat([s, pad], -1).requires_grad_(True)
    t_pad = torch.cat([t, pad], -1)
    out = LOSSES[name](s_pad, t_pad, 2.0)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, LOSSES[name](s, t, 2.0), atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(s_pad.grad).all()
    assert s_pad.grad[..., 8:].abs().max() == 0


@pytest.mark.parametrize("name", NEW)
def test_student_only_neg_inf_gives_finite_loss_where_defined(name):
    # the student rules out a token the teacher also rules out, plus one the teacher allows
    s = torch.tensor([[0.5, -math.inf, 1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.2, -math.inf, 0.3, 0.1]])
    out = LOSSES[name](s, t, 1.0)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_finite_and_reach_student(name):
    s, t = _pair()
    s.requires_grad_(True)
    out = LOSSES[name](s, t, 2.0)
    masked_mean(out, torch.ones(out.shape, dtype=torch.bool)).backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_masking(name):
    s, t = _pair()
    s_bad = s.clone()
    s_bad[0, 1] = 1e4  # a huge difference at a masked token must not matter
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    vals = LOSSES[name](s_bad, t, 1.0)
    keep = LOSSES[name](s, t, 1.0)[mask]
    assert masked_mean(vals, mask).item() == pytest.approx(keep.mean().item(), rel=1e-5)
    assert masked_mean(vals, torch.zeros_like(mask)).item() == 0.0


def test_shape_mismatch_names_uld():
    with pytest.raises(KDistillError, match="uld"):
        skew_kl(torch.randn(2, 5), torch.randn(2, 6))


# ------------------------------------------------------------------------------------------ TAID schedule

def test_taid_schedule_linear_and_adaptive():
    # the authors' update_t: the first call only records the loss; the call at global_step n (0-based) sets
    # t to t_linear(n) = t_start + (t_end - t_start) * n / total_steps, so t never runs a step ahead
    lin = TAIDSchedule(total_steps=10, adaptive=False)
    ts = [lin.t] + [lin.update(1.0) for _ in range(10)]
    assert ts[0] == ts[1] == pytest.approx(0.4)
    for k in range(2, 11):
        assert ts[k] == pytest.approx(0.4 + 0.6 * (k - 1) / 10)
    assert TAIDSchedule(total_steps=10).update(3.0) == 0.4  # adaptive too: no move on the first measurement

    # adaptive: never behind the linear schedule, monotone, capped at t_end; faster while the loss drops
    fast = TAIDSchedule(total_steps=1000, alpha=0.05, beta=0.5)
    slow = TAIDSchedule(total_steps=1000, alpha=0.05, beta=0.5)
    prev = fast.t
    for n in range(1, 50):
        tf = fast.update(10.0 * 0.8 ** n)   # improving quickly
        slow.update(10.0 * 1.05 ** n)       # getting worse
        assert tf >= fast.linear(n - 1) - 1e-12 and tf >= prev and tf <= 1.0
        prev = tf
    assert fast.t > slow.t >= slow.linear(48)


def test_taid_schedule_state_roundtrip_and_errors():
    a = TAIDSchedule(total_steps=100)
    for x in (5.0, 4.0, 3.5):
        a.update(x)
    b = TAIDSchedule(total_steps=100)
    b.load_state_dict(a.state_dict())
    assert a.update(3.0) == b.update(3.0)
    with pytest.raises(KDistillError, match="total_steps"):
        TAIDSchedule(total_steps=0)
    with pytest.raises(KDistillError, match="non-finite"):
        a.update(float("nan"))
