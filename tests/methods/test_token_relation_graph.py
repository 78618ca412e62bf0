import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.relations import token_relation
from kdistill.methods.base import ModelOutput
from kdistill.methods.token_relation_graph import TokenRelationGraph


def test_hand_value_two_tokens():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # cos: [[1, 0], [0, 1]]
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # cos: all 1 -> uniform rows
    tau = 0.5
    ps = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    expected = sum(0.5 * math.log(0.5 / p) for p in ps)
    assert token_relation(s, t, relation_temperature=tau).item() == pytest.approx(expected, rel=1e-5)


def test_zero_for_same_geometry_any_width_and_shape_check():
    t = torch.randn(2, 5, 6)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    s = torch.cat([t @ q * 2.0, torch.zeros(2, 5, 3)], -1)
    assert token_relation(s, t).abs().max() < 1e-5
    assert (token_relation(torch.randn(2, 5, 4), t) > 0).all()
    with pytest.raises(KDistillError, match="same number of tokens"):
        token_relation(torch.randn(2, 4, 6), t)


def test_method_rejects_flat_features_and_pools_token_counts():
    m = TokenRelationGraph(ce_weight=0.0, kd_weight=0.0)
    with pytest.raises(KDistillError, match="token sequences"):
        m(ModelOutput(torch.randn(2, 3), {"blocks.1": torch.randn(2, 8)}),
          ModelOutput(torch.randn(2, 3), {"blocks.1": torch.randn(2, 5, 8)}), {"labels": torch.zeros(2).long()})
    out = m(ModelOutput(torch.randn(2, 3), {"blocks.1": torch.randn(2, 10, 8)}),
            ModelOutput(torch.randn(2, 3), {"blocks.1": torch.randn(2, 5, 4)}), {"labels": torch.zeros(2).long()})
    assert set(out) == {"local", "global"} and all(torch.isfinite(v) for v in out.values())


def test_gradients_and_fit_with_transformer_pair(zoo):
    m = TokenRelationGraph(student_layer="blocks.1", teacher_layer="blocks.0")
    losses, s, t = zoo["one_backward"](m, student="transformer1d", teacher="transformer1d")
    zoo["assert_grads"](losses, s, t)
    assert set(losses) == {"local", "global", "kd", "ce"}
    res, t, before = zoo["fit3"](TokenRelationGraph(), student="transformer1d", teacher="transformer1d")
    zoo["assert_fit_ok"](res, t, before)
