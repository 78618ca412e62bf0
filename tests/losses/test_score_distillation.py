"""The pure losses of the one-step generator methods: closed forms, gradients, and agreement with the schedule."""

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.score_distillation import (
    boot_signal_target,
    dmd_gradient,
    sample_mse,
    surrogate_loss,
    vsd_gradient,
)
from kdistill.models.diffusion import DiffusionSchedule


def test_sample_mse_hand_value_per_example_fp32():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.bfloat16)
    target = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    out = sample_mse(pred, target)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert out.tolist() == pytest.approx([2.5, 5.0])
    images = torch.randn(3, 1, 4, 4)
    assert sample_mse(images, images).abs().max() == 0
    with pytest.raises(KDistillError, match="expected equal shapes"):
        sample_mse(torch.zeros(2, 3), torch.zeros(2, 4))


def test_surrogate_value_and_gradient_is_grad_over_elements():
    x = torch.randn(3, 2, 5, requires_grad=True)
    grad = torch.randn(3, 2, 5, requires_grad=True)
    out = surrogate_loss(x, grad)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.allclose(out, 0.5 * grad.pow(2).flatten(1).mean(1))
    out.sum().backward()
    assert torch.allclose(x.grad, grad.detach() / 10, atol=1e-7)
    assert grad.grad is None  # the direction is a target, never trained


def test_dmd_gradient_hand_value_and_direction():
    x = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    real = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # mean |x - real| per example: 1.0 and 0.5
    fake = torch.tensor([[2.0, 1.0], [0.0, 2.0]])
    grad = dmd_gradient(x, fake, real)
    assert torch.allclose(grad, torch.tensor([[2.0, 1.0], [-2.0, 0.0]]))
    assert not grad.requires_grad
    # a small step against the direction moves the samples towards the real prediction, away from the fake one
    moved = x - 0.1 * grad
    assert ((moved - real).norm(dim=1) < (x - real).norm(dim=1)).all()
    assert dmd_gradient(x, real, real).abs().max() == 0
    same = dmd_gradient(real, fake, real)  # zero normaliser: finite (clamped), not NaN
    assert torch.isfinite(same).all()


def test_vsd_gradient_is_weighted_noise_prediction_difference():
    """``vsd_gradient`` on clean-data predictions equals ``sigma_t**2 * (eps_real - eps_fake)`` computed from the same
    v-predictions with the schedule's own conversions."""
    sched = DiffusionSchedule()
    torch.manual_seed(0)
    t = torch.tensor([0, 100, 500, 900, 999])
    z, v_real, v_fake = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    alpha, sigma = sched.alpha_sigma(t, 2)
    expected = sigma ** 2 * (sched.predict_eps(v_real, z, t) - sched.predict_eps(v_fake, z, t))
    got = vsd_gradient(sched.predict_x0(v_fake, z, t), sched.predict_x0(v_real, z, t), alpha=alpha, sigma=sigma)
    assert torch.allclose(got, expected, atol=1e-5)
    assert vsd_gradient(z, z, alpha=alpha, sigma=sigma).abs().max() == 0


def test_boot_target_equals_the_signal_after_one_ddim_step():
    """The division-free target equals ``(x_s - sigma_s eps) / alpha_s`` after the schedule's own DDIM step, in
    float64 where the direct formula is exact enough."""
    sched = DiffusionSchedule()
    torch.manual_seed(1)
    t = torch.tensor([30, 400, 800, 999, 999])
    s = torch.tensor([0, 350, 750, 949, 998])
    eps, signal_t, v = (torch.randn(5, 4, dtype=torch.float64) for _ in range(3))
    a_t, s_t = (u.double() for u in sched.alpha_sigma(t, 2))
    a_s, s_s = (u.double() for u in sched.alpha_sigma(s, 2))
    x_t = a_t * signal_t + s_t * eps
    x0 = a_t * x_t - s_t * v
    x_s = a_s * x0 + s_s * (s_t * x_t + a_t * v)  # DDIM: alpha_s x0 + sigma_s eps_hat
    expected = (x_s - s_s * eps) / a_s
    got = boot_signal_target(signal_t.float(), x0.float(), alpha_t=a_t, sigma_t=s_t, alpha_s=a_s, sigma_s=s_s)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-4)
    # the step is a contraction towards the teacher's prediction: the target lies between it and the old signal
    ratio = (got.double() - x0) / (signal_t - x0)
    assert ((ratio > 0) & (ratio <= 1 + 1e-6)).all()


def test_boot_target_is_the_teacher_prediction_when_the_signal_agrees():
    a = torch.full((2, 1), 0.01)
    x0 = torch.randn(2, 3)
    out = boot_signal_target(x0, x0, alpha_t=a, sigma_t=torch.ones(2, 1), alpha_s=2 * a, sigma_s=torch.ones(2, 1))
    assert torch.allclose(out, x0)
