import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.classification import subclass_kl, subclass_log_probs
from kdistill.losses.logits import forward_kl, kl_from_log_probs
from kdistill.methods.base import SetupInfo
from kdistill.methods.lelp import LELP, class_directions


def test_class_marginal_is_the_softened_prediction():
    z, a = torch.randn(4, 3), torch.randn(4, 3, 6)
    lp = subclass_log_probs(z, a, kd_temperature=2.0)
    torch.testing.assert_close(lp.exp().sum(-1), torch.softmax(z / 2.0, -1))
    torch.testing.assert_close(lp.exp().sum((1, 2)), torch.ones(4))
    with pytest.raises(KDistillError):
        subclass_log_probs(z, torch.randn(4, 2, 6))


def test_kl_decomposes_into_class_and_within_class_terms():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ws, wt = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    T = 2.0
    pt = torch.softmax(zt / T, -1)
    within = kl_from_log_probs(torch.log_softmax(wt, -1), torch.log_softmax(ws, -1))  # (B, C)
    expected = forward_kl(zs, zt, kd_temperature=T) + (pt * within).sum(-1)
    torch.testing.assert_close(subclass_kl(zs, ws, zt, wt, kd_temperature=T), expected, rtol=1e-5, atol=1e-6)
    assert subclass_kl(zt, wt, zt, wt).abs().max() < 1e-6


def test_class_directions_find_the_spread_axis():
    g = torch.Generator().manual_seed(0)
    e0 = torch.randn(200, 3, generator=g) * torch.tensor([5.0, 0.1, 0.1]) + torch.tensor([1.0, 2.0, 3.0])
    e1 = torch.randn(200, 3, generator=g) * torch.tensor([0.1, 0.1, 3.0])
    e = torch.cat([e0, e1])
    y = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    means, dirs, stds = class_directions(e, y, num_classes=3, k=1)
    assert abs(dirs[0, 0, 0]) > 0.99 and abs(dirs[1, 0, 2]) > 0.99
    assert stds[0, 0].item() == pytest.approx(5.0, rel=0.15) and stds[1, 0].item() == pytest.approx(3.0, rel=0.15)
    torch.testing.assert_close(means[0].float(), e0.mean(0), rtol=1e-5, atol=1e-5)
    assert dirs[2].abs().sum() == 0  # an empty class gets no directions


def test_teacher_within_scores():
    m = LELP(num_directions=1, subclass_scale=1.0)
    m.register_buffer("class_means", torch.zeros(2, 2))
    m.register_buffer("directions", torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    m.register_buffer("direction_std", torch.tensor([[2.0], [1.0]]))
    a = m.teacher_within(torch.tensor([[4.0, -1.0]]))
    torch.testing.assert_close(a, torch.tensor([[[2.0, -2.0], [-1.0, 1.0]]]))


def test_setup_needs_the_training_loader():
    with pytest.raises(KDistillError, match="train_loader"):
        LELP().setup(SetupInfo({"embed": (2, 4)}, {"embed": (2, 4)}, num_classes=2))


def test_gradients_reach_subclass_head_and_fit(zoo):
    m = LELP()
    losses, s, t = zoo["one_backward"](m)
    zoo["assert_grads"](losses, s, t, m)
    assert m.within_head.weight.grad.abs().sum() > 0
    res, t, before = zoo["fit3"](LELP(num_directions=3))
    zoo["assert_fit_ok"](res, t, before)
    assert res.method.directions.shape == (10, 3, 16)  # (classes, directions, teacher width)
