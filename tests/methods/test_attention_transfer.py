import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.relations import attention_map, attention_transfer
from kdistill.methods.attention_transfer import AttentionTransfer
from kdistill.methods.base import ModelOutput


def test_attention_map_hand_value():
    f = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # (B=1, C=2, L=2)
    a = attention_map(f)  # mean_c f^2 = [5, 2], normalised
    torch.testing.assert_close(a, torch.tensor([[5.0, 2.0]]) / (29 ** 0.5))


def test_zero_at_identical_maps_and_channel_scale_invariance():
    f = torch.randn(3, 4, 10)
    assert attention_transfer(f, f).abs().max() < 1e-7
    # different channel count and a global scale: same normalised map when every channel is the same
    base = torch.randn(3, 1, 10)
    assert attention_transfer(base.repeat(1, 5, 1) * 3.0, base.repeat(1, 2, 1)).abs().max() < 1e-7


def test_hand_value_and_spatial_pooling():
    s = torch.tensor([[[1.0, 0.0]]])
    t = torch.tensor([[[0.0, 1.0]]])
    assert attention_transfer(s, t).item() == pytest.approx((1 + 1) / 2)  # mean of squared diff of [1,0]-[0,1]
    # student with twice the resolution is pooled to the teacher's length
    s2 = torch.randn(2, 3, 20)
    t2 = torch.randn(2, 6, 10)
    assert attention_transfer(s2, t2).shape == (2,)
    assert attention_transfer(torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)).shape == (2,)


def test_flat_features_rejected_with_fix():
    with pytest.raises(KDistillError, match="convolutional"):
        attention_transfer(torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(KDistillError):
        AttentionTransfer(student_layers=["a"], teacher_layers=["b", "c"])


def test_method_sums_pairs():
    fs = {"a": torch.randn(4, 3, 8), "b": torch.randn(4, 3, 4)}
    ft = {"x": torch.randn(4, 5, 8), "y": torch.randn(4, 5, 4)}
    m = AttentionTransfer(["a", "b"], ["x", "y"], at_weight=10.0, ce_weight=0.0)
    out = m(ModelOutput(torch.randn(4, 2), fs), ModelOutput(torch.randn(4, 2), ft), {"labels": torch.zeros(4).long()})
    expected = attention_transfer(fs["a"], ft["x"]).mean() + attention_transfer(fs["b"], ft["y"]).mean()
    assert out["at"].item() == pytest.approx(10.0 * expected.item(), rel=1e-5)


def test_gradients_and_three_step_fit(zoo):
    m = AttentionTransfer(["blocks.1", "blocks.2"], ["blocks.1", "blocks.2"])
    losses, s, t = zoo["one_backward"](m, student="cnn", teacher="cnn")
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](AttentionTransfer(["blocks.2"], ["blocks.2"]), student="cnn")
    zoo["assert_fit_ok"](res, t, before)
