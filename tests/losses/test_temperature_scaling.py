"""The temperature scaling of every LLM divergence keeps its gradient scale independent of kd_temperature.

As T grows, ``p_s - p_t`` shrinks like ``1/T``: KL-type divergences are quadratic in it (gradient ~ 1/T^2,
hence Hinton's T^2), the L1-type ``tvd`` and ``uld`` are linear (gradient ~ 1/T, hence T). A T^2 on an
L1-type loss grows its gradient T-fold: the defect this file pins."""

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses import logits as L
from kdistill.losses.reduce import kd_scale
from kdistill.methods.base import ModelOutput
from kdistill.methods.llm_kd import LLMKD, LOSSES


def _grad_norm(name: str, kd_temperature: float, power: int) -> float:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(64, 50, generator=g) * 2).requires_grad_()
    t = torch.randn(64, 50, generator=g) * 2
    kw = {"t": 0.5} if name == "taid" else {}
    v = LOSSES[name](s, t, kd_temperature=kd_temperature, **kw).mean() * kd_scale(kd_temperature, power=power)
    v.backward()
    return float(s.grad.norm())


def test_every_llm_divergence_has_a_temperature_power():
    assert set(L.TEMPERATURE_POWER) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_scale_is_independent_of_the_temperature(name):
    power = L.TEMPERATURE_POWER[name]
    ratio = _grad_norm(name, 4.0, power) / _grad_norm(name, 16.0, power)
    assert 0.8 < ratio < 1.25, f"{name}: |grad| at T=4 / T=16 = {ratio:.3f} with T^{power}"
    # the other power is off by the factor 4 between T = 4 and T = 16 (T^2 on tvd was the old defect)
    wrong = 1 if power == 2 else 2
    off = _grad_norm(name, 4.0, wrong) / _grad_norm(name, 16.0, wrong)
    assert off > 3.0 or off < 1 / 3.0


def test_llm_kd_applies_the_divergence_power():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    batch = {"mask": torch.ones(2, 3, dtype=torch.bool)}
    for loss, power in (("tvd", 1), ("uld", 1), ("forward_kl", 2), ("reverse_kl", 2)):
        m = LLMKD(loss=loss, kd_temperature=4.0)
        kd = m(ModelOutput(s), ModelOutput(t), batch)["kd"]
        assert torch.allclose(kd, 4.0 ** power * LOSSES[loss](s, t, kd_temperature=4.0).mean())


def test_kd_scale_rejects_bad_input():
    assert kd_scale(3.0) == 9.0 and kd_scale(3.0, power=1) == 3.0
    with pytest.raises(KDistillError, match="positive"):
        kd_scale(0.0)
    with pytest.raises(KDistillError, match="power"):
        kd_scale(2.0, power=3)
