"""Cross-tokenizer losses: hand-computed values, zero at identical inputs, direction, gradients, dtype."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.cross_tokenizer import shared_vocab_kl, span_kl


def test_shared_vocab_kl_by_hand():
    # student vocab [a, b, c], teacher vocab [b, a, d, e]; shared: a (0 <-> 1), b (1 <-> 0)
    ps, pt = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.6, 0.2, 0.1])
    got = shared_vocab_kl(ps.log(), pt.log(), student_ids=torch.tensor([0, 1]), teacher_ids=torch.tensor([1, 0]))
    # coarsened: teacher (a 0.6, b 0.1, rest 0.3), student (a 0.5, b 0.3, rest 0.2)
    want = 0.6 * math.log(0.6 / 0.5) + 0.1 * math.log(0.1 / 0.3) + 0.3 * math.log(0.3 / 0.2)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_shared_vocab_kl_zero_at_identical_and_temperature():
    z = torch.randn(3, 5, 11)
    ids = torch.arange(11)
    assert float(shared_vocab_kl(z, z, student_ids=ids, teacher_ids=ids).abs().max()) == 0.0
    sub = torch.tensor([0, 3, 4])
    assert float(shared_vocab_kl(z, z, student_ids=sub, teacher_ids=sub, kd_temperature=2.0).abs().max()) < 1e-6
    # temperature divides the logits of both
    a, b = torch.randn(4, 7), torch.randn(4, 9)
    s_ids, t_ids = torch.tensor([0, 2, 5]), torch.tensor([8, 1, 3])
    torch.testing.assert_close(shared_vocab_kl(a, b, student_ids=s_ids, teacher_ids=t_ids, kd_temperature=3.0),
                               shared_vocab_kl(a / 3, b / 3, student_ids=s_ids, teacher_ids=t_ids))
    with pytest.raises(KDistillError, match="same positions"):
        shared_vocab_kl(torch.zeros(2, 3), torch.zeros(3, 3), student_ids=s_ids, teacher_ids=s_ids)


def test_shared_vocab_kl_gradient_moves_the_student_toward_the_teacher():
    torch.manual_seed(0)
    s = torch.randn(6, 10, requires_grad=True)
    t = torch.randn(6, 12)
    s_ids, t_ids = torch.arange(8), torch.arange(2, 10)
    loss = shared_vocab_kl(s, t, student_ids=s_ids, teacher_ids=t_ids).mean()
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with torch.no_grad():
        after = shared_vocab_kl(s - 0.5 * s.grad, t, student_ids=s_ids, teacher_ids=t_ids).mean()
    assert after < loss
    out = shared_vocab_kl(s.detach().bfloat16(), t.bfloat16(), student_ids=s_ids, teacher_ids=t_ids)
    assert out.dtype == torch.float32


def test_span_kl_is_the_bernoulli_kl_of_chain_probabilities():
    # a student token "cd" against teacher tokens "c", "d": P_t = 0.5 * 0.4 = 0.2, P_s = 0.3
    lt = torch.tensor(math.log(0.5) + math.log(0.4))
    ls = torch.tensor(math.log(0.3))
    want = 0.2 * math.log(0.2 / 0.3) + 0.8 * math.log(0.8 / 0.7)
    assert float(span_kl(ls, lt)) == pytest.approx(want, rel=1e-6)
    assert float(span_kl(lt, lt)) == 0.0
    # direction: the gradient raises the student's span probability when the teacher's is higher
    x = torch.tensor([math.log(0.1)], requires_grad=True)
    span_kl(x, torch.tensor([math.log(0.6)])).sum().backward()
    assert float(x.grad) < 0
    # certain spans (log P = 0) stay finite
    z = torch.zeros(2, requires_grad=True)
    v = span_kl(z, torch.tensor([0.0, -3.0]))
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(z.grad).all()
