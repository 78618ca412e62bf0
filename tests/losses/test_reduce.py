import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses import hint_mse, masked_mean, masked_sum


def test_masked_mean_values():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [True, True]])
    assert masked_mean(v, m).item() == pytest.approx(8 / 3)
    assert masked_sum(v, m).item() == pytest.approx(8.0)
    assert masked_mean(v).item() == pytest.approx(2.5)


def test_all_masked_is_zero_with_zero_grad_even_with_nan_inputs():
    v = torch.tensor([float("nan"), float("inf"), 1.0], requires_grad=True)
    m = torch.zeros(3, dtype=torch.bool)
    out = masked_mean(v, m)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(v.grad, torch.zeros(3))


def test_mask_must_be_bool_and_broadcastable():
    with pytest.raises(KDistillError, match="torch.bool"):
        masked_mean(torch.ones(3), torch.ones(3))
    with pytest.raises(KDistillError, match="shape"):
        masked_mean(torch.ones(3), torch.ones(4, dtype=torch.bool))


def test_hint_mse():
    a = torch.zeros(2, 3, 4)
    b = torch.ones(2, 3, 4)
    b[1] = 2.0
    assert torch.allclose(hint_mse(a, b), torch.tensor([1.0, 4.0]))
    assert hint_mse(a, a).abs().max() == 0
    with pytest.raises(KDistillError, match="projector"):
        hint_mse(torch.zeros(2, 3), torch.zeros(2, 4))
