import pytest
import torch

from kdistill.losses.classification import standardized_kl, zscore_logits
from kdistill.losses.logits import forward_kl
from kdistill.methods.base import ModelOutput
from kdistill.methods.logit_standardization import LogitStandardization


def test_zscore_has_zero_mean_unit_std():
    z = zscore_logits(torch.randn(4, 9) * 5 + 3)
    assert z.mean(-1).abs().max() < 1e-5
    assert (z.std(-1) - 1).abs().max() < 1e-4


def test_invariant_to_student_scale_and_shift():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    a = standardized_kl(s, t, kd_temperature=2.0)
    b = standardized_kl(7.0 * s - 3.0, t, kd_temperature=2.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # plain KD is not invariant, which is the point of the method
    assert not torch.allclose(forward_kl(s, t, kd_temperature=2.0), forward_kl(7.0 * s - 3.0, t, kd_temperature=2.0))


def test_equals_kd_on_standardized_logits_and_zero_at_affine_teacher():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(standardized_kl(s, t, kd_temperature=3.0),
                               forward_kl(zscore_logits(s), zscore_logits(t), kd_temperature=3.0))
    assert standardized_kl(2.0 * t + 1.0, t).abs().max() < 1e-5


def test_method_scaling():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    out = LogitStandardization(kd_temperature=2.0, kd_weight=9.0, ce_weight=0.1)(
        ModelOutput(s), ModelOutput(t), {"labels": torch.tensor([0, 1, 2, 0])})
    assert out["kd"].item() == pytest.approx(9.0 * 4.0 * standardized_kl(s, t, kd_temperature=2.0).mean().item(),
                                             rel=1e-5)
    assert "ce" in out


def test_gradients_and_three_step_fit(zoo):
    losses, s, t = zoo["one_backward"](LogitStandardization())
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](LogitStandardization())
    zoo["assert_fit_ok"](res, t, before)
