"""Self-attention relation losses of MiniLM / MiniLMv2 (losses/relations.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import KDistillError
from kdistill.losses.relations import (
    attention_relation,
    expand_kv_heads,
    relation_log_probs,
    self_relation,
)


def _reference(sl, sr, tl, tr, heads, mask=None, causal=False, tau=1.0):
    """Loops over examples, heads and real queries; keys restricted before the softmax."""
    b, t, _ = sl.shape
    out = []
    for i in range(b):
        real = list(range(t)) if mask is None else [j for j in range(t) if mask[i, j]]
        total, n = 0.0, 0
        for q in real:
            keys = [k for k in real if not causal or k <= q]
            for h in range(heads):
                def dist(left, right):
                    d = left.shape[-1] // heads
                    lh, rh = left[i, :, h * d:(h + 1) * d], right[i, :, h * d:(h + 1) * d]
                    return F.softmax(torch.stack([lh[q] @ rh[k] for k in keys]) / (math.sqrt(d) * tau), 0)
                p, r = dist(tl, tr), dist(sl, sr)
                total += float((p * (p.log() - r.log())).sum())
            n += 1
        out.append(total / heads / n if n else 0.0)
    return torch.tensor(out)


def test_closed_form_two_tokens():
    # teacher: query 0 scores keys [ln 3, 0] -> [3/4, 1/4]; query 1 scores [0, 0] -> uniform; student all uniform
    tq, tk = torch.tensor([[[math.log(3.0)], [0.0]]]), torch.tensor([[[1.0], [0.0]]])
    s = torch.zeros(1, 2, 1)
    row0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    got = attention_relation(s, s, tq, tk, num_heads=1)
    assert got.shape == (1,) and got.item() == pytest.approx(row0 / 2, rel=1e-6)
    # causal: query 0 sees only key 0 (KL 0), query 1 sees both keys, both uniform (KL 0)
    assert attention_relation(s, s, tq, tk, num_heads=1, causal=True).item() == pytest.approx(0.0, abs=1e-7)


def test_zero_at_identical_inputs_and_positive_otherwise():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    for causal in (False, True):
        assert attention_relation(q, k, q, k, num_heads=2, mask=mask, causal=causal).abs().max() < 1e-6
        assert self_relation(v, v, num_heads=4, mask=mask, causal=causal).abs().max() < 1e-6
    assert (attention_relation(q, k, k, q, num_heads=2) > 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_matches_a_loop_reference_with_padding_and_causal_masks(causal):
    torch.manual_seed(1)
    sq, sk, tq, tk = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    got = attention_relation(sq, sk, tq, tk, num_heads=2, mask=mask, causal=causal, relation_temperature=0.7)
    want = _reference(sq, sk, tq, tk, 2, mask, causal, 0.7)
    assert torch.allclose(got, want, atol=1e-5)


def test_padding_contributes_nothing():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]).bool()
    pad_s, pad_t = torch.cat([s, 50 * torch.randn(2, 2, 8)], 1), torch.cat([t, 50 * torch.randn(2, 2, 8)], 1)
    short = self_relation(s, t, num_heads=2)
    assert torch.allclose(self_relation(pad_s, pad_t, num_heads=2, mask=mask), short, atol=1e-6)
    other = torch.cat([s, torch.randn(2, 2, 8)], 1)
    assert torch.allclose(self_relation(other, pad_t, num_heads=2, mask=mask), short, atol=1e-6)
    # without the mask the padding does count
    assert not torch.allclose(self_relation(pad_s, pad_t, num_heads=2), short, atol=1e-3)
    # a row without any real token gives 0, never NaN, with finite gradients
    s2 = pad_s.clone().requires_grad_(True)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    val = self_relation(s2, pad_t, num_heads=2, mask=empty, causal=True)
    val.sum().backward()
    assert torch.equal(val, torch.zeros(2)) and torch.isfinite(s2.grad).all()


def test_relation_heads_work_across_head_counts_and_widths():
    torch.manual_seed(3)
    t = torch.randn(2, 6, 48)   # e.g. 12 teacher heads of 4
    s = torch.randn(2, 6, 24)   # e.g. 3 student heads of 8
    for r in (1, 2, 4, 8):
        v = self_relation(s, t, num_heads=r)
        assert v.shape == (2,) and torch.isfinite(v).all() and (v > 0).all()
    with pytest.raises(KDistillError, match="does not split the left width 24"):
        self_relation(s, t, num_heads=5)
    # the same relation from a widened student: zero-padding each relation head keeps its dot products
    wide = torch.cat([t.view(2, 6, 4, 12), torch.zeros(2, 6, 4, 12)], -1).view(2, 6, 96)
    # scale: the student's head width doubled, so its scores carry 1/sqrt(24) instead of 1/sqrt(12)
    ratio = math.sqrt(24 / 12)
    assert self_relation(wide * math.sqrt(ratio), t, num_heads=4).abs().max() < 1e-5


def test_temperature_equals_scaling_the_inputs():
    torch.manual_seed(4)
    sq, sk, tq, tk = (torch.randn(2, 5, 8) for _ in range(4))
    base = attention_relation(sq * 0.5, sk, tq * 0.5, tk, num_heads=2)
    assert torch.allclose(attention_relation(sq, sk, tq, tk, num_heads=2, relation_temperature=2.0), base, atol=1e-6)
    lp = relation_log_probs(sq, sk, num_heads=2, relation_temperature=1e3)
    assert torch.allclose(lp.exp(), torch.full_like(lp, 1 / 5), atol=1e-3)  # high temperature -> uniform
    with pytest.raises(KDistillError, match="relation_temperature"):
        attention_relation(sq, sk, tq, tk, num_heads=2, relation_temperature=0.0)


def test_gradients_reach_the_student_only_and_are_fp32_and_finite():
    torch.manual_seed(5)
    sq, sk, sv = (torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    tq, tk, tv = (torch.randn(2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    att = attention_relation(sq, sk, tq, tk, num_heads=2, mask=mask, causal=True)
    val = self_relation(sv, tv, num_heads=2, mask=mask)
    assert att.dtype == torch.float32 and val.dtype == torch.float32
    (att.sum() + val.sum()).backward()
    for g in (sq.grad, sk.grad, sv.grad):
        assert g is not None and torch.isfinite(g.float()).all() and g.float().abs().sum() > 0
    assert tq.grad is None and tk.grad is None and tv.grad is None
    # the padded position's student vectors get no gradient
    assert sv.grad[0, 3].float().abs().sum() == 0


def test_grouped_query_heads_are_repeated_like_repeat_kv():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # 2 kv heads of width 2
    y = expand_kv_heads(x, num_kv_heads=2, num_heads=4)
    heads = y.view(2, 3, 4, 2)
    assert torch.equal(heads[:, :, 0], x[..., :2]) and torch.equal(heads[:, :, 1], x[..., :2])
    assert torch.equal(heads[:, :, 2], x[..., 2:]) and torch.equal(heads[:, :, 3], x[..., 2:])
    assert expand_kv_heads(x, num_kv_heads=2, num_heads=2) is x
    with pytest.raises(KDistillError, match="num_kv_heads"):
        expand_kv_heads(x, num_kv_heads=3, num_heads=4)


def test_shape_errors_say_what_to_fix():
    with pytest.raises(KDistillError, match="same tokens"):
        self_relation(torch.randn(2, 4, 8), torch.randn(2, 5, 8), num_heads=2)
    with pytest.raises(KDistillError, match="expected"):
        self_relation(torch.randn(2, 4, 8), torch.randn(2, 4, 8), num_heads=2, mask=torch.ones(2, 3).bool())
    with pytest.raises(KDistillError, match="expand_kv_heads"):
        attention_relation(torch.randn(2, 4, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 8), torch.randn(2, 4, 8),
                           num_heads=2)
