import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.classification import guided_targets
from kdistill.losses.logits import cross_entropy, soft_cross_entropy
from kdistill.methods.base import ModelOutput
from kdistill.methods.gt_guided_self_distillation import GTGuidedSelfDistillation


def test_targets_hand_value_and_end_points():
    t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    torch.testing.assert_close(guided_targets(t, y, label_weight=0.5), torch.tensor([[0.25, 0.75]]))
    z = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 0])
    torch.testing.assert_close(guided_targets(z, y, label_weight=0.0), torch.softmax(z, -1))
    torch.testing.assert_close(guided_targets(z, y, label_weight=1.0), torch.nn.functional.one_hot(y, 3).float())
    assert torch.allclose(guided_targets(z, y, label_weight=0.3).sum(-1), torch.ones(4))
    with pytest.raises(KDistillError):
        guided_targets(z, y, label_weight=1.5)


def test_method_end_points():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    full = GTGuidedSelfDistillation(label_weight=1.0)(ModelOutput(s), ModelOutput(t), {"labels": y})
    assert full["guided"].item() == pytest.approx(cross_entropy(s, y).mean().item(), rel=1e-5)
    none = GTGuidedSelfDistillation(label_weight=0.0, kd_temperature=2.0)(ModelOutput(s), ModelOutput(t), {"labels": y})
    expected = 4.0 * soft_cross_entropy(s, torch.softmax(t / 2, -1), kd_temperature=2.0).mean()
    assert none["guided"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_self_distillation_fit_with_same_architecture(zoo):
    teacher = zoo["tiny_model"]("mlp", 7)  # an earlier copy of the student's architecture
    losses, s, t = zoo["one_backward"](GTGuidedSelfDistillation(), teacher_model=teacher)
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](GTGuidedSelfDistillation(), teacher_model=zoo["tiny_model"]("mlp", 7))
    zoo["assert_fit_ok"](res, t, before)
