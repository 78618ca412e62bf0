import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.classification import dist_inter_class, dist_intra_class
from kdistill.methods.base import ModelOutput
from kdistill.methods.dist import DIST


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_hand_computed_inter_and_intra():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.4, 0.1], [-0.5, 0.9, 0.3]])
    t = torch.tensor([[0.5, 1.0, 0.0], [2.0, -1.0, 0.3], [0.1, 0.2, 1.5]])
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    inter = dist_inter_class(s, t)
    for i in range(3):
        assert inter[i].item() == pytest.approx(1 - _pearson(ps[i], pt[i]), abs=1e-5)
    intra = dist_intra_class(s, t)
    assert intra.shape == (3,)
    for c in range(3):
        assert intra[c].item() == pytest.approx(1 - _pearson(ps[:, c], pt[:, c]), abs=1e-5)


def test_zero_at_identical_and_range():
    z = torch.randn(8, 6)
    assert dist_inter_class(z, z).abs().max() < 1e-5
    assert dist_intra_class(z, z).abs().max() < 1e-5
    v = dist_inter_class(torch.randn(8, 6), z)
    assert ((v >= -1e-6) & (v <= 2 + 1e-6)).all()


def test_anticorrelated_gives_two():
    # two classes: p_s = 1 - p_t per row, perfectly anti-correlated
    s = torch.tensor([[1.0, -1.0], [0.3, -0.3]])
    t = -s
    assert dist_inter_class(s, t) == pytest.approx(torch.tensor([2.0, 2.0]), abs=1e-5)


def test_intra_needs_two_rows():
    with pytest.raises(KDistillError, match="B >= 2"):
        dist_intra_class(torch.randn(1, 3), torch.randn(1, 3))


def test_method_temperature_scaling_and_mask():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    m = DIST(beta=2.0, gamma=3.0, kd_temperature=2.0, ce_weight=0.0)
    mask = torch.tensor([True, True, False, True, True])
    out = m(ModelOutput(s), ModelOutput(t), {"labels": torch.zeros(5, dtype=torch.long), "mask": mask})
    inter = dist_inter_class(s[mask], t[mask], kd_temperature=2.0).mean()
    intra = dist_intra_class(s[mask], t[mask], kd_temperature=2.0).mean()
    assert out["inter"].item() == pytest.approx(2.0 * 4.0 * inter.item(), rel=1e-5)
    assert out["intra"].item() == pytest.approx(3.0 * 4.0 * intra.item(), rel=1e-5)


def test_gradients_and_three_step_fit(zoo):
    losses, s, t = zoo["one_backward"](DIST())
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](DIST())
    zoo["assert_fit_ok"](res, t, before)
