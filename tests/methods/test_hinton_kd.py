import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses import forward_kl
from kdistill.methods.base import ModelOutput
from kdistill.methods.hinton_kd import HintonKD

from ._tiny import assert_trained, three_step_run


def out(logits):
    return ModelOutput(logits=logits)


def test_value_is_alpha_t2_kl_plus_ce():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    m = HintonKD(kd_temperature=3.0, alpha=0.7)
    terms = m(out(s), out(t), {"labels": y})
    assert terms["kd"].item() == pytest.approx(0.7 * 9 * forward_kl(s, t, kd_temperature=3.0).mean().item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.3 * torch.nn.functional.cross_entropy(s, y).item(), rel=1e-5)
    assert "ce" not in HintonKD(alpha=1.0)(out(s), out(t), {"labels": y})


def test_zero_kd_at_identical_logits():
    s = torch.randn(4, 6)
    assert HintonKD(alpha=1.0)(out(s), out(s.clone()), {"labels": torch.zeros(4, dtype=torch.long)})["kd"].item() < 1e-6


def test_t_squared_keeps_gradient_scale():
    """Without the T^2 factor the soft-term gradient shrinks like 1/T^2 (Hinton et al., 2015)."""
    torch.manual_seed(0)
    s0 = torch.randn(64, 10)
    s0 = s0 - s0.mean(-1, keepdim=True)
    t = torch.randn(64, 10)
    t = t - t.mean(-1, keepdim=True)
    norms = {}
    for T in (10.0, 20.0):
        s = s0.clone().requires_grad_(True)
        HintonKD(kd_temperature=T, alpha=1.0)(out(s), out(t), {})["kd"].backward()
        norms[T] = s.grad.norm().item()
    assert norms[20.0] / norms[10.0] == pytest.approx(1.0, abs=0.1)  # would be ~0.25 without T^2


def test_mask_is_respected():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    v = HintonKD(kd_temperature=1.0, alpha=1.0)(out(s), out(t), {"mask": mask})["kd"]
    assert v.item() == pytest.approx(forward_kl(s, t)[mask].mean().item(), rel=1e-5)


def test_bad_hyperparameters():
    with pytest.raises(KDistillError, match="alpha"):
        HintonKD(alpha=1.5)
    with pytest.raises(KDistillError, match="kd_temperature"):
        HintonKD(kd_temperature=-1)


def test_three_step_cpu_run():
    res, s0, t0, teacher = three_step_run(HintonKD())
    assert_trained(res, s0, t0, teacher)
