import pytest
import torch

from kdistill.losses.relations import similarity_preserving
from kdistill.methods.base import ModelOutput
from kdistill.methods.similarity_preserving import SimilarityPreserving


def test_hand_value():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G = I, rows already unit
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # G = all ones -> rows [1,1]/sqrt2
    r = 1 / 2 ** 0.5
    per_row = ((1 - r) ** 2 + r ** 2) / 2
    torch.testing.assert_close(similarity_preserving(s, t), torch.tensor([per_row, per_row]))


def test_zero_under_rotation_scale_and_width_change():
    t = torch.randn(6, 2, 3)  # maps are flattened
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    s = torch.cat([t.flatten(1) @ q * 5.0, torch.zeros(6, 4)], 1)
    assert similarity_preserving(s, t).abs().max() < 1e-6
    assert similarity_preserving(torch.randn(6, 10), t).mean() > 1e-4


def test_batch_mean_is_frobenius_over_b_squared():
    s, t = torch.randn(5, 3), torch.randn(5, 4)
    gs = torch.nn.functional.normalize(s @ s.t(), dim=1)
    gt = torch.nn.functional.normalize(t @ t.t(), dim=1)
    assert similarity_preserving(s, t).mean().item() == pytest.approx(((gs - gt) ** 2).sum().item() / 25, rel=1e-5)


def test_method_and_fit(zoo):
    losses, s, t = zoo["one_backward"](SimilarityPreserving())
    zoo["assert_grads"](losses, s, t)
    out = SimilarityPreserving(student_layer="blocks.1", teacher_layer="blocks.2", sp_weight=2.0, ce_weight=0)(
        ModelOutput(torch.randn(3, 2), {"blocks.1": torch.ones(3, 4, 5)}),
        ModelOutput(torch.randn(3, 2), {"blocks.2": torch.ones(3, 8)}), {"labels": torch.zeros(3).long()})
    assert out["sp"].item() == pytest.approx(0.0, abs=1e-6)
    res, t, before = zoo["fit3"](SimilarityPreserving())
    zoo["assert_fit_ok"](res, t, before)
