import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.classification import dkd_terms
from kdistill.losses.logits import forward_kl
from kdistill.methods.base import ModelOutput
from kdistill.methods.dkd import DKD


def _hand(s, t, y, T):
    ps = [math.exp(v / T) for v in s]
    pt = [math.exp(v / T) for v in t]
    zs, zt = sum(ps), sum(pt)
    ps, pt = [v / zs for v in ps], [v / zt for v in pt]
    tckd = pt[y] * math.log(pt[y] / ps[y]) + (1 - pt[y]) * math.log((1 - pt[y]) / (1 - ps[y]))
    qs = [v / (1 - ps[y]) for i, v in enumerate(ps) if i != y]
    qt = [v / (1 - pt[y]) for i, v in enumerate(pt) if i != y]
    nckd = sum(a * math.log(a / b) for a, b in zip(qt, qs))
    return tckd, nckd


def test_hand_computed_values():
    s, t, y = [1.0, 0.5, -1.0, 2.0], [3.0, -0.5, 0.2, 1.0], 0
    tckd, nckd = dkd_terms(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), kd_temperature=2.0)
    ht, hn = _hand(s, t, y, 2.0)
    assert tckd.item() == pytest.approx(ht, rel=1e-5)
    assert nckd.item() == pytest.approx(hn, rel=1e-5)


def test_classic_kd_decomposes_into_tckd_and_nckd():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(32, 7, generator=g) * 3, torch.randn(32, 7, generator=g) * 3
    y = torch.randint(0, 7, (32,), generator=g)
    T = 3.0
    tckd, nckd = dkd_terms(s, t, y, kd_temperature=T)
    pt_y = torch.softmax(t / T, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(forward_kl(s, t, kd_temperature=T), tckd + (1 - pt_y) * nckd, rtol=1e-4, atol=1e-6)


def test_zero_at_identical_and_nonnegative():
    z = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    tckd, nckd = dkd_terms(z, z.clone(), y)
    assert tckd.abs().max() < 1e-6 and nckd.abs().max() < 1e-6
    tckd, nckd = dkd_terms(torch.randn(8, 5), z, y)
    assert (tckd >= -1e-7).all() and (nckd >= -1e-7).all()


def test_neg_inf_logit_and_bf16():
    s = torch.tensor([[1.0, float("-inf"), 0.3]])
    t = torch.tensor([[0.5, float("-inf"), 1.0]])
    tckd, nckd = dkd_terms(s, t, torch.tensor([0]))
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all()
    tckd, nckd = dkd_terms(torch.randn(4, 6).bfloat16(), torch.randn(4, 6).bfloat16(), torch.tensor([0, 1, 2, 3]))
    assert tckd.dtype == torch.float32 and nckd.dtype == torch.float32


def test_bad_labels_raise():
    with pytest.raises(KDistillError, match="class ids"):
        dkd_terms(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 3]))


def test_method_weights_temperature_and_warmup():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    batch = {"labels": torch.randint(0, 4, (6,), generator=g)}
    tckd, nckd = dkd_terms(s, t, batch["labels"], kd_temperature=2.0)
    m = DKD(alpha=0.5, beta=3.0, kd_temperature=2.0, ce_weight=0.0, warmup_steps=4).train()
    ramps = []
    for _ in range(6):
        out = m(ModelOutput(s), ModelOutput(t), batch)
        assert "ce" not in out
        ramps.append(out["nckd"].item() / (3.0 * 4.0 * nckd.mean().item()))
        assert out["tckd"].item() == pytest.approx(ramps[-1] * 0.5 * 4.0 * tckd.mean().item(), rel=1e-5, abs=1e-8)
    assert ramps == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-5)
    assert int(m.state_dict()["step"]) == 6  # the warm-up position is checkpointed
    m.eval()
    m(ModelOutput(s), ModelOutput(t), batch)
    assert int(m.step) == 6  # evaluation does not advance the warm-up


def test_bad_kwargs():
    with pytest.raises(KDistillError):
        DKD(beta=-1.0)
    with pytest.raises(KDistillError):
        DKD(kd_temperature=0.0)


def test_gradients_and_three_step_fit(zoo):
    losses, s, t = zoo["one_backward"](DKD())
    zoo["assert_grads"](losses, s, t)
    assert set(losses) == {"tckd", "nckd", "ce"}
    res, t, before = zoo["fit3"](DKD(warmup_steps=2))
    zoo["assert_fit_ok"](res, t, before)


def test_a_minus_100_label_is_an_error_unless_its_row_is_masked():
    """A -100 label used to be clamped to class 0 inside the method; now it is rejected on a row that counts,
    and a masked row's label never reaches the loss."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    labels = torch.tensor([-100, 3, 1])
    m = DKD(ce_weight=0.0)
    with pytest.raises(KDistillError, match=r"-100 marks a row to ignore"):
        m(ModelOutput(s), ModelOutput(t), {"labels": labels})
    mask = torch.tensor([False, True, True])
    out = m(ModelOutput(s), ModelOutput(t), {"labels": labels, "mask": mask})
    ref = m(ModelOutput(s[1:]), ModelOutput(t[1:]), {"labels": labels[1:]})
    for k in ("tckd", "nckd"):
        torch.testing.assert_close(out[k], ref[k])
    with pytest.raises(KDistillError, match=r"\[0, 4\]"):
        m(ModelOutput(s), ModelOutput(t), {"labels": torch.tensor([0, 5, 1])})
