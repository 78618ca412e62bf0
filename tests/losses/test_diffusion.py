"""The pure step-distillation losses of :mod:`kdistill.losses.diffusion`: closed forms on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.diffusion import (
    consistency_loss,
    ddim_map,
    progressive_target,
    segment_boundaries,
    truncated_snr_mse,
)
from kdistill.models.diffusion import DiffusionSchedule

SCH = DiffusionSchedule()


def _coef(t, ndim=2):
    return SCH.alpha_sigma(torch.as_tensor(t), ndim)


def test_ddim_map_matches_the_schedule_step_and_its_limits():
    torch.manual_seed(0)
    z, v = torch.randn(4, 3), torch.randn(4, 3)
    t, t_to = torch.tensor([999, 500, 10, 3]), torch.tensor([499, -1, 9, 3])
    (a, s), (a2, s2) = _coef(t), _coef(t_to)
    out = ddim_map(v, z, alpha=a, sigma=s, alpha_to=a2, sigma_to=s2)
    torch.testing.assert_close(out, SCH.ddim_step(v, z, t, t_to))
    torch.testing.assert_close(out[1], SCH.predict_x0(v, z, t)[1])   # to clean data: x_hat
    torch.testing.assert_close(out[3], z[3])                          # to the same timestep: the identity


@pytest.mark.parametrize("t, t_end", [(999, -1), (999, 499), (624, 374), (124, -1)])
def test_progressive_target_makes_one_step_land_on_two_teacher_steps(t, t_end):
    torch.manual_seed(1)
    z, z_end = torch.randn(5, 2), torch.randn(5, 2)   # any two points: the closed form must solve the step exactly
    tb, eb = torch.full((5,), t), torch.full((5,), t_end)
    (a, s), (a2, s2) = _coef(tb), _coef(eb)
    x = progressive_target(z, z_end, alpha=a, sigma=s, alpha_next=a2, sigma_next=s2)
    v = (a * z - x) / s                                # the v whose clean-data prediction is x
    torch.testing.assert_close(SCH.ddim_step(v, z, tb, eb), z_end, atol=1e-4, rtol=1e-4)
    if t_end == -1:
        torch.testing.assert_close(x, z_end)           # a last step to clean data: the target is where it lands


def test_progressive_target_rejects_a_step_towards_noise():
    a, s = _coef(torch.tensor([100]))
    a2, s2 = _coef(torch.tensor([500]))
    with pytest.raises(KDistillError, match="from noise towards data"):
        progressive_target(torch.zeros(1, 2), torch.zeros(1, 2), alpha=a, sigma=s, alpha_next=a2, sigma_next=s2)


def test_truncated_snr_mse_hand_values():
    s = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # mean squared errors 2.5 and 2.0; weights max(0.25, 1) = 1 and max(4, 1) = 4
    out = truncated_snr_mse(s, t, snr=torch.tensor([0.25, 4.0]))
    torch.testing.assert_close(out, torch.tensor([2.5, 8.0]))
    assert truncated_snr_mse(s.bfloat16(), t.bfloat16(), snr=torch.tensor([0.25, 4.0])).dtype == torch.float32
    torch.testing.assert_close(truncated_snr_mse(s, s, snr=torch.tensor([0.25, 4.0])), torch.zeros(2))


def test_segment_boundaries_known_answers():
    b = torch.tensor([-1, 249, 499, 749])
    t = torch.tensor([0, 249, 250, 499, 500, 998, 999])
    # a boundary timestep belongs to the segment above it: its step goes down to the next boundary
    assert segment_boundaries(t, boundaries=b).tolist() == [-1, -1, 249, 249, 499, 749, 749]
    assert segment_boundaries(t, boundaries=torch.tensor([-1])).tolist() == [-1] * 7   # one segment: clean data


@pytest.mark.parametrize("bad", [[0, 249], [-1, 499, 249], []])
def test_segment_boundaries_reject_bad_boundaries(bad):
    with pytest.raises(KDistillError, match="ascending timesteps starting with -1"):
        segment_boundaries(torch.tensor([5]), boundaries=torch.tensor(bad, dtype=torch.long))


def test_segment_boundaries_reject_clean_timesteps():
    with pytest.raises(KDistillError, match=">= 0"):
        segment_boundaries(torch.tensor([-1, 3]), boundaries=torch.tensor([-1, 2]))


def _pair(seed=2, n=4, d=3):
    torch.manual_seed(seed)
    t_hi, t_lo = torch.tensor([999, 524, 49, 24]), torch.tensor([974, 499, 24, -1])
    return (torch.randn(n, d), torch.randn(n, d), torch.randn(n, d), torch.randn(n, d), t_hi, t_lo)


def test_consistency_loss_clean_boundary_is_the_x0_distance():
    sv, tv, sz, tz, t_hi, t_lo = _pair()
    kw = dict(student_z=sz, target_z=tz, student_alpha_sigma=_coef(t_hi), target_alpha_sigma=_coef(t_lo))
    expected = ((SCH.predict_x0(sv, sz, t_hi) - SCH.predict_x0(tv, tz, t_lo)) ** 2).mean(1)
    torch.testing.assert_close(consistency_loss(sv, tv, **kw), expected)
    torch.testing.assert_close(consistency_loss(sv, tv, boundary=_coef(torch.full((4,), -1)), **kw), expected)
    # the boundary condition: a target already at clean data (t_lo = -1) is its own sample, whatever its v
    other = tv.clone()
    other[3] = 1e3
    torch.testing.assert_close(consistency_loss(sv, other, **kw)[3], expected[3])
    torch.testing.assert_close(expected[3], ((SCH.predict_x0(sv, sz, t_hi)[3] - tz[3]) ** 2).mean())


def test_consistency_loss_segment_boundary_maps_to_that_timestep():
    sv, tv, sz, tz, t_hi, t_lo = _pair()
    b = torch.tensor([749, 499, -1, -1])
    out = consistency_loss(sv, tv, student_z=sz, target_z=tz, student_alpha_sigma=_coef(t_hi),
                           target_alpha_sigma=_coef(t_lo), boundary=_coef(b))
    expected = ((SCH.ddim_step(sv, sz, t_hi, b) - SCH.ddim_step(tv, tz, t_lo, b)) ** 2).mean(1)
    torch.testing.assert_close(out, expected)
    # a target at its segment's boundary (t_lo = 499 = b) is the teacher's sample itself
    torch.testing.assert_close(out[1], ((SCH.ddim_step(sv, sz, t_hi, b)[1] - tz[1]) ** 2).mean())


def test_consistency_loss_zero_at_identical_maps_and_pseudo_huber_hand_value():
    sv, _, sz, _, t_hi, _ = _pair()
    kw = dict(student_z=sz, target_z=sz, student_alpha_sigma=_coef(t_hi), target_alpha_sigma=_coef(t_hi))
    assert consistency_loss(sv, sv.clone(), **kw).abs().max() == 0
    assert consistency_loss(sv, sv.clone(), distance="pseudo_huber", **kw).abs().max() < 1e-7
    # differences of x_hat (t = -1: x_hat = z) of (3, 4) and (0, 0): ||d|| = 5 and 0
    z1, z2 = torch.tensor([[3.0, 4.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    clean = _coef(torch.full((2,), -1))
    kw = dict(student_z=z1, target_z=z2, student_alpha_sigma=clean, target_alpha_sigma=clean)
    v = torch.zeros(2, 2)
    c = 0.5
    torch.testing.assert_close(consistency_loss(v, v, distance="pseudo_huber", huber_c=c, **kw),
                               torch.tensor([math.sqrt(25 + c * c) - c, 0.0]))
    torch.testing.assert_close(consistency_loss(v, v, **kw), torch.tensor([12.5, 0.0]))
    default_c = 0.00054 * math.sqrt(2)
    torch.testing.assert_close(consistency_loss(v, v, distance="pseudo_huber", **kw)[0],
                               torch.tensor(math.sqrt(25 + default_c ** 2) - default_c))


def test_consistency_loss_gradient_reaches_only_the_student_and_descends():
    sv, tv, sz, tz, t_hi, t_lo = _pair()
    sv.requires_grad_(True)
    tv.requires_grad_(True)
    kw = dict(student_z=sz, target_z=tz, student_alpha_sigma=_coef(t_hi), target_alpha_sigma=_coef(t_lo),
              boundary=_coef(torch.tensor([499, 499, -1, -1])))
    for distance in ("l2", "pseudo_huber"):
        loss = consistency_loss(sv, tv, distance=distance, **kw).sum()
        g_s, g_t = torch.autograd.grad(loss, [sv, tv], allow_unused=True)
        assert g_t is None and torch.isfinite(g_s).all() and g_s.abs().sum() > 0
        step = consistency_loss(sv - 1e-3 * g_s, tv, distance=distance, **kw).sum()
        assert step < loss


def test_consistency_loss_rejects_an_unknown_distance():
    sv, tv, sz, tz, t_hi, t_lo = _pair()
    with pytest.raises(KDistillError, match="'l2' or 'pseudo_huber'"):
        consistency_loss(sv, tv, student_z=sz, target_z=tz, student_alpha_sigma=_coef(t_hi),
                         target_alpha_sigma=_coef(t_lo), distance="huber")
