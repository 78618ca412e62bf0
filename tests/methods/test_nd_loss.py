import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.relations import nd_loss
from kdistill.methods.base import ModelOutput, SetupInfo
from kdistill.methods.nd_loss import NDLoss


def test_hand_values_and_direction():
    means = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    y = torch.tensor([0])
    s = torch.tensor([[3.0, 4.0]])
    assert nd_loss(s, torch.tensor([[2.0, 0.0]]), means, y).item() == pytest.approx(1 - 3 / 5)
    assert nd_loss(s, torch.tensor([[10.0, 0.0]]), means, y).item() == pytest.approx(1 - 3 / 10)
    # aligned with the class direction and at least as long as the teacher: zero
    assert nd_loss(torch.tensor([[4.0, 0.0]]), torch.tensor([[1.0, 1.0]]), means, y).abs().item() < 1e-6
    # growing an aligned student towards the teacher's norm lowers the loss
    t = torch.tensor([[8.0, 0.0]])
    vals = [nd_loss(torch.tensor([[n, 0.0]]), t, means, y).item() for n in (1.0, 2.0, 4.0, 8.0)]
    assert vals == sorted(vals, reverse=True) and vals[-1] == pytest.approx(0.0, abs=1e-6)
    assert nd_loss(torch.tensor([[0.0, -3.0]]), t, means, torch.tensor([1])).item() == pytest.approx(1 - 3 / 8)


def test_shape_mismatch_raises():
    with pytest.raises(KDistillError, match="Project"):
        nd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]))


def test_given_means_are_used_and_checked():
    m = NDLoss(kd_weight=0.0, ce_weight=0.0)
    means = torch.randn(3, 4)
    m.setup(SetupInfo({"embed": (2, 4)}, {"embed": (2, 4)}, num_classes=3, teacher_class_means={"embed": means}))
    torch.testing.assert_close(m.class_means(), means)
    s, t, y = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([2, 0])
    m.train()
    out = m(ModelOutput(torch.randn(2, 3), {"embed": s}), ModelOutput(torch.randn(2, 3), {"embed": t}), {"labels": y})
    assert out["nd"].item() == pytest.approx(nd_loss(s, t, means, y).mean().item(), rel=1e-5)
    torch.testing.assert_close(m.class_means(), means)  # fixed means never drift
    bad = NDLoss()
    with pytest.raises(KDistillError, match="teacher_class_means"):
        bad.setup(SetupInfo({"embed": (2, 4)}, {"embed": (2, 4)}, num_classes=3,
                            teacher_class_means={"embed": torch.randn(2, 4)}))


def test_online_means_fallback():
    m = NDLoss(kd_weight=0.0, ce_weight=0.0)
    m.setup(SetupInfo({"embed": (2, 3)}, {"embed": (2, 5)}, num_classes=2))
    assert isinstance(m.projector, torch.nn.Linear)  # widths differ -> learned projector
    t1, t2 = torch.randn(4, 5), torch.randn(2, 5)
    y1, y2 = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0])
    m.train()
    for t, y in ((t1, y1), (t2, y2)):
        m(ModelOutput(torch.randn(len(y), 2), {"embed": torch.randn(len(y), 3)}),
          ModelOutput(torch.randn(len(y), 2), {"embed": t}), {"labels": y})
    expected0 = torch.cat([t1[y1 == 0], t2]).mean(0)
    expected1 = t1[y1 == 1].mean(0)
    torch.testing.assert_close(m.class_means(), torch.stack([expected0, expected1]), rtol=1e-5, atol=1e-6)


def test_exact_means_in_fit_gradients_reach_projector(zoo):
    losses, s, t = zoo["one_backward"](m := NDLoss())
    zoo["assert_grads"](losses, s, t, m)
    res, t, before = zoo["fit3"](NDLoss())
    zoo["assert_fit_ok"](res, t, before)
    # setup() ran the frozen teacher over the whole training set once: exact class means
    from kdistill.capture import capture

    data = zoo["random_data"]()
    with torch.no_grad(), capture(t, ["embed"]) as feats:
        t(data["inputs"])
    emb = feats["embed"]
    expected = torch.stack([emb[data["labels"] == c].mean(0) if (data["labels"] == c).any()
                            else torch.zeros(emb.shape[1]) for c in range(10)])
    torch.testing.assert_close(res.method.class_means(), expected, rtol=1e-4, atol=1e-5)
