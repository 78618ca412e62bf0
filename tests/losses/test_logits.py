import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import KDistillError
from kdistill.losses import (
    cross_entropy,
    forward_kl,
    generalized_jsd,
    masked_mean,
    reverse_kl,
    soft_cross_entropy,
)


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_forward_kl_closed_form():
    s = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    t = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    expected = kl([0.7, 0.2, 0.1], [0.5, 0.25, 0.25])
    assert forward_kl(s, t).item() == pytest.approx(expected, abs=1e-6)
    assert reverse_kl(s, t).item() == pytest.approx(kl([0.5, 0.25, 0.25], [0.7, 0.2, 0.1]), abs=1e-6)


def test_direction_differs_and_is_asymmetric():
    s, t = torch.tensor([[3.0, 0.0, -2.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item(), abs=1e-3)
    assert forward_kl(s, t).item() == pytest.approx(reverse_kl(t, s).item(), abs=1e-6)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, lambda s, t, **k: generalized_jsd(s, t, beta=0.3, **k)])
def test_zero_at_identical_and_nonnegative(fn):
    x = torch.randn(4, 7, 11)
    assert fn(x, x).abs().max().item() < 1e-6
    y = torch.randn(4, 7, 11)
    assert (fn(x, y) >= -1e-6).all()
    assert fn(x, y).shape == (4, 7)


def test_temperature_scaling():
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    for T in (0.5, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
        assert torch.allclose(forward_kl(s, t, kd_temperature=T), ref, atol=1e-6)
    # higher temperature -> softer distributions -> smaller divergence here
    assert forward_kl(s, t, kd_temperature=8.0).mean() < forward_kl(s, t, kd_temperature=1.0).mean()
    with pytest.raises(KDistillError, match="kd_temperature"):
        forward_kl(s, t, kd_temperature=0.0)


def test_generalized_jsd_limits():
    g = torch.Generator().manual_seed(0)  # fixed inputs: the limits below hold to fp32 rounding, not exactly
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    assert torch.equal(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    eps = 1e-4
    # fp32 cancellation in JSD(eps) / eps reaches ~0.6% relative over random draws (300 seeds measured)
    assert torch.allclose(generalized_jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=1e-2, atol=1e-4)
    assert torch.allclose(generalized_jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=1e-2, atol=1e-4)
    # symmetric at beta = 0.5 (the classic JSD, bounded by log 2)
    j = generalized_jsd(s, t, beta=0.5)
    assert torch.allclose(j, generalized_jsd(t, s, beta=0.5), atol=1e-6)
    assert (j <= math.log(2) + 1e-6).all()
    with pytest.raises(KDistillError, match="beta"):
        generalized_jsd(s, t, beta=1.5)


def test_neg_inf_logits_never_nan():
    t = torch.tensor([[2.0, float("-inf"), 0.0]])
    s = torch.tensor([[1.0, float("-inf"), 0.5]], requires_grad=True)
    for fn in (forward_kl, reverse_kl, lambda a, b: generalized_jsd(a, b, beta=0.5)):
        v = fn(s, t)
        assert torch.isfinite(v).all()
        v.sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None


def test_one_sided_neg_inf_raises_naming_the_position_where_the_kl_is_infinite():
    """Teacher mass on a student -inf entry makes forward KL infinite (student mass on a teacher -inf entry:
    reverse KL). One such token used to give inf with a NaN gradient that poisoned the whole step; now it is
    an error that names the position and the entry, and the bounded divergences stay finite there."""
    from kdistill.errors import KDistillError
    from kdistill.losses.logits import skew_kl, skew_reverse_kl, taid, tvd

    base = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    s_inf, t_inf = base.clone(), base.flip(-1).clone()
    s_inf[1, 2, 3] = float("-inf")
    t_only = base.flip(-1).clone()
    t_only[0, 1, 4] = float("-inf")
    forward_cases = [forward_kl, lambda a, b: skew_kl(a, b, skew=0.0), lambda a, b: generalized_jsd(a, b, beta=0.0)]
    for fn in forward_cases:
        with pytest.raises(KDistillError, match=r"infinite at position \(1, 2\): vocabulary entry 3"):
            fn(s_inf, t_inf)
    reverse_cases = [reverse_kl, lambda a, b: skew_reverse_kl(a, b, skew=0.0),
                     lambda a, b: generalized_jsd(a, b, beta=1.0)]
    for fn in reverse_cases:
        with pytest.raises(KDistillError, match=r"infinite at position \(0, 1\): vocabulary entry 4"):
            fn(base, t_only)
    # the same one-sided entries in the blocked (student-only gradient) forward-KL path
    with pytest.raises(KDistillError, match="position"):
        forward_kl(s_inf.requires_grad_(), t_inf)
    # the mixtures and the L1-type losses are finite there, with finite gradients
    finite = [lambda a, b: generalized_jsd(a, b, beta=0.5), lambda a, b: skew_kl(a, b, skew=0.1),
              lambda a, b: skew_reverse_kl(a, b, skew=0.1), tvd, lambda a, b: taid(a, b, t=0.5)]
    for s, t in ((base, t_only), (s_inf.detach(), t_inf)):
        for fn in finite:
            x = s.clone().requires_grad_()
            v = fn(x, t)
            v.sum().backward()
            assert torch.isfinite(v).all() and torch.isfinite(x.grad).all()


def test_bf16_in_fp32_out():
    s, t = torch.randn(3, 5).bfloat16(), torch.randn(3, 5).bfloat16()
    for fn in (forward_kl, reverse_kl):
        assert fn(s, t).dtype == torch.float32
    assert soft_cross_entropy(s, torch.softmax(t.float(), -1)).dtype == torch.float32


def test_soft_cross_entropy_and_cross_entropy():
    s = torch.randn(4, 6)
    y = torch.tensor([0, 5, 2, -100])
    onehot = F.one_hot(y.clamp_min(0), 6).float()
    ce = cross_entropy(s, y)
    assert ce[3].item() == 0.0
    assert torch.allclose(ce[:3], F.cross_entropy(s[:3], y[:3], reduction="none"), atol=1e-6)
    assert torch.allclose(soft_cross_entropy(s, onehot)[:3], ce[:3], atol=1e-6)
    # soft CE = H(q) + KL(q || p)
    q = torch.softmax(torch.randn(4, 6), -1)
    h = -(q * q.log()).sum(-1)
    assert torch.allclose(soft_cross_entropy(s, q), h + forward_kl(s, q.log()), atol=1e-5)


def test_masked_reduction_of_kl():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per = forward_kl(s, t)
    assert masked_mean(per, mask).item() == pytest.approx(per[mask].mean().item(), abs=1e-6)


def test_gradient_flows_to_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        t_out = t * 1.0
    forward_kl(s, t_out).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_shape_mismatch_error_says_how_to_fix():
    with pytest.raises(KDistillError, match="uld"):
        forward_kl(torch.randn(2, 5), torch.randn(2, 6))


def test_forward_kl_analytic_gradients_match_autograd_for_student_and_teacher():
    """forward_kl is an autograd Function with hand-written gradients: both must equal autograd's on the
    definition, also where the teacher excludes a class (-inf logit)."""
    from kdistill.losses.logits import forward_kl, kl_from_log_probs, log_probs

    torch.manual_seed(0)
    for teacher_excludes in (False, True):
        s = torch.randn(3, 4, 6, requires_grad=True)
        t = torch.randn(3, 4, 6)
        if teacher_excludes:
            t[0, 0, 2] = float("-inf")
        t.requires_grad_(True)
        w = torch.randn(3, 4)
        (forward_kl(s, t, kd_temperature=2.0) * w).sum().backward()
        s2, t2 = s.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
        (kl_from_log_probs(log_probs(t2, 2.0), log_probs(s2, 2.0)) * w).sum().backward()
        torch.testing.assert_close(s.grad, s2.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(t.grad, t2.grad, atol=1e-6, rtol=1e-5)
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_forward_kl_blocked_student_path_matches_definition(monkeypatch, student_dtype):
    """With a frozen teacher, forward_kl runs over row blocks and saves only the student gradient. Blocks
    of 3 rows over 5 x 7 = 35 rows (a partial last block), a -inf teacher logit, a masked (zero-weight)
    row and a bf16 student: values and gradients equal autograd on the definition."""
    import kdistill.losses.logits as Lmod
    from kdistill.losses.logits import forward_kl, kl_from_log_probs, log_probs

    V = 11
    monkeypatch.setattr(Lmod, "_BLOCK_ELEMENTS", 3 * V)
    torch.manual_seed(1)
    s = (torch.randn(5, 7, V) * 3).to(student_dtype).requires_grad_(True)
    t = torch.randn(5, 7, V) * 3
    t[2, 3, 4] = float("-inf")
    w = torch.randn(5, 7)
    w[4, 6] = 0.0
    out = forward_kl(s, t, kd_temperature=1.5)
    (out * w).sum().backward()
    s2 = s.detach().clone().requires_grad_(True)
    ref = kl_from_log_probs(log_probs(t, 1.5), log_probs(s2, 1.5))
    (ref * w).sum().backward()
    assert out.shape == (5, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert s.grad.dtype == student_dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if student_dtype == torch.float32 else {"atol": 2e-3, "rtol": 1e-2}
    torch.testing.assert_close(s.grad.float(), s2.grad.float(), **tol)
    assert torch.all(s.grad[4, 6] == 0)
