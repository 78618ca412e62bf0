import math

import pytest
import torch

from kdistill.losses.relations import pkt
from kdistill.methods.base import ModelOutput
from kdistill.methods.pkt import PKT


def test_hand_value_two_points():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos 0 -> kernel 0.5
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cos 1 -> kernel 1
    # rows: student p(.|i) = [1, .5] / 1.5 ; teacher = [.5, .5]
    ps, pt = [2 / 3, 1 / 3], [0.5, 0.5]
    # each row is its KL divided by B = 2 (so the mean over rows is the reference's mean over the B^2 entries)
    expected = sum(b * math.log(b / a) for a, b in zip(ps, pt)) / 2
    v = pkt(s, t)
    assert v[0].item() == pytest.approx(expected, rel=1e-4)
    assert v[1].item() == pytest.approx(expected, rel=1e-4)


def test_zero_for_same_cosine_geometry_any_width():
    t = torch.randn(7, 5)
    q, _ = torch.linalg.qr(torch.randn(5, 5))
    s = torch.cat([(t @ q) * 4.0, torch.zeros(7, 2)], 1)
    assert pkt(s, t).abs().max() < 1e-5
    assert (pkt(torch.randn(7, 3), t) > 0).all()


def test_method_and_fit(zoo):
    fs, ft = torch.randn(4, 3), torch.randn(4, 6)
    out = PKT(pkt_weight=5.0, ce_weight=0.0)(ModelOutput(torch.randn(4, 2), {"embed": fs}),
                                             ModelOutput(torch.randn(4, 2), {"embed": ft}),
                                             {"labels": torch.zeros(4).long()})
    assert out["pkt"].item() == pytest.approx(5.0 * pkt(fs, ft).mean().item(), rel=1e-5)
    losses, s, t = zoo["one_backward"](PKT())
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](PKT())
    zoo["assert_fit_ok"](res, t, before)
