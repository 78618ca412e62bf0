import pytest
import torch

from kdistill.losses.logits import forward_kl
from kdistill.methods.base import ModelOutput
from kdistill.methods.ensemble import Ensemble, TeacherEnsemble, _GradReverse, ensemble_probs


def test_average_of_teacher_probabilities():
    t = torch.tensor([[[0.0, 0.0], [0.0, 100.0]]])  # (B=1, K=2, C=2): [.5,.5] and ~[0,1]
    torch.testing.assert_close(ensemble_probs(t), torch.tensor([[0.25, 0.75]]), atol=1e-6, rtol=0)
    single = torch.randn(3, 4)
    torch.testing.assert_close(ensemble_probs(single), torch.softmax(single, -1))


def test_kd_term_is_kl_plus_target_entropy():
    s, t = torch.randn(4, 3), torch.randn(4, 2, 3)
    out = Ensemble()(ModelOutput(s), ModelOutput(t), {"labels": torch.zeros(4).long()})
    p = ensemble_probs(t)
    entropy = -(p * p.log()).sum(-1)
    expected = (forward_kl(s, p.log()) + entropy).mean()
    assert out["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    # one teacher given K times is the same as that teacher alone
    one = Ensemble()(ModelOutput(s), ModelOutput(t[:, 0]), {"labels": torch.zeros(4).long()})["kd"]
    same = Ensemble()(ModelOutput(s), ModelOutput(t[:, :1].repeat(1, 3, 1)), {"labels": torch.zeros(4).long()})["kd"]
    assert one.item() == pytest.approx(same.item(), rel=1e-6)


def test_gradient_reversal():
    x = torch.randn(3, requires_grad=True)
    (_GradReverse.apply(x) * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -2.0))


def test_discriminator_and_teacher_ensemble_fit(zoo):
    teachers = TeacherEnsemble([zoo["tiny_model"]("cnn", 2), zoo["tiny_model"]("mlp", 3)])
    assert teachers(torch.randn(5, 40)).shape == (5, 2, 10)
    from kdistill.models.classifiers import predict_logits

    x = torch.randn(7, 40)  # batched prediction (offline caches) keeps examples aligned
    torch.testing.assert_close(predict_logits(teachers, x, batch_size=3), teachers.eval()(x))
    m = Ensemble(discriminator_weight=0.5)
    losses, s, t = zoo["one_backward"](m, teacher_model=teachers)
    assert set(losses) == {"kd", "adversarial"}
    zoo["assert_grads"](losses, s, t, m)
    res, t, before = zoo["fit3"](Ensemble(discriminator_weight=0.5, ce_weight=0.5),
                                 teacher_model=TeacherEnsemble([zoo["tiny_model"]("cnn", 2),
                                                                zoo["tiny_model"]("cnn", 4)]))
    zoo["assert_fit_ok"](res, t, before)
