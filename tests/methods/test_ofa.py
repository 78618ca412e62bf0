import pytest
import torch

from kdistill.losses.classification import ofa_loss
from kdistill.losses.logits import soft_cross_entropy
from kdistill.methods.base import ModelOutput
from kdistill.methods.ofa import OFA


def test_eps_one_is_cross_entropy_to_teacher():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    torch.testing.assert_close(ofa_loss(s, t, y, eps=1.0), soft_cross_entropy(s, torch.softmax(t, -1)))


def test_hand_value_eps_two_and_target_enhancement():
    s, t, y = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    ls, pt = torch.log_softmax(s, -1)[0], torch.softmax(t, -1)[0]
    expected = -((1 + pt[0]) ** 2 - 1) * ls[0] - pt[1] ** 2 * ls[1]
    assert ofa_loss(s, t, y, eps=2.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # larger eps puts more weight on the target: its gradient pushes the target logit up harder
    grads = []
    for eps in (1.0, 1.5, 2.0):
        z = s.clone().requires_grad_(True)
        ofa_loss(z, t, y, eps=eps).sum().backward()
        grads.append(z.grad[0, 0].item())
    assert grads[0] > grads[1] > grads[2]


def test_gradients_reach_stage_heads_and_fit(zoo):
    m = OFA(student_layers=["blocks.0", "blocks.1"])
    losses, s, t = zoo["one_backward"](m)
    zoo["assert_grads"](losses, s, t, m)
    for head in m.heads.values():
        assert head.net[0].weight.grad.abs().sum() > 0
    m2 = OFA(student_layers=["blocks.1", "blocks.2"])  # conv maps (B, C, L) are pooled
    losses, s, t = zoo["one_backward"](m2, student="cnn")
    zoo["assert_grads"](losses, s, t, m2)
    res, t, before = zoo["fit3"](OFA(student_layers=["blocks.0"]))
    zoo["assert_fit_ok"](res, t, before)


def test_final_logits_only_without_stages():
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    out = OFA(ce_weight=0.0)(ModelOutput(s), ModelOutput(t), {"labels": y})
    assert out["ofa"].item() == pytest.approx(ofa_loss(s, t, y).mean().item(), rel=1e-6)
