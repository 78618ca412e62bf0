"""chunked(fn) and fused_linear_loss equal the unchunked loss in values and gradients."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import KDistillError
from kdistill.losses import logits as L
from kdistill.losses.chunked import chunked, fused_linear_loss
from kdistill.losses.reduce import masked_mean
from kdistill.losses.topk import teacher_topk, topk_loss

FNS = {
    "forward_kl": functools.partial(L.forward_kl, kd_temperature=2.0),
    "reverse_kl": functools.partial(L.reverse_kl, kd_temperature=2.0),
    "generalized_jsd": functools.partial(L.generalized_jsd, beta=0.5, kd_temperature=2.0),
    "skew_kl": functools.partial(L.skew_kl, skew=0.1, kd_temperature=2.0),
    "skew_reverse_kl": functools.partial(L.skew_reverse_kl, skew=0.1, kd_temperature=2.0),
    "tvd": functools.partial(L.tvd, kd_temperature=2.0),
    "taid": functools.partial(L.taid, t=0.5, kd_temperature=2.0),
    "token_selective": functools.partial(L.token_selective, entropy_weight=0.1, kd_temperature=2.0),
}


def _data(B=2, T=7, V=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    return s, t, mask


@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("chunk", [1, 4, 5, 100])
def test_chunked_equals_unchunked(name, chunk):
    fn = FNS[name]
    s, t, mask = _data()
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    ref = fn(s1, t)
    got = chunked(fn, chunk)(s2, t)
    assert got.shape == ref.shape == (2, 7)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    masked_mean(ref, mask).backward()
    masked_mean(got, mask).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7, rtol=0)
    assert s2.grad.abs().sum() > 0


def test_chunked_passes_keywords_and_gradients_to_teacher():
    s, t, _ = _data()
    t1 = t.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    L.reverse_kl(s, t1, kd_temperature=3.0).sum().backward()
    chunked(L.reverse_kl, 3)(s, t2, kd_temperature=3.0).sum().backward()
    assert torch.allclose(t1.grad, t2.grad, atol=1e-7)


def test_chunked_bf16_input_grad_dtype():
    s, t, _ = _data()
    sb = s.bfloat16().requires_grad_(True)
    out = chunked(L.forward_kl, 4)(sb, t.bfloat16())
    assert out.dtype == torch.float32
    out.sum().backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()


def test_chunked_topk_loss_with_mixed_shapes():
    s, t, mask = _data(V=40)
    lp, idx, lres = teacher_topk(t, k=6, kd_temperature=2.0)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    fn = functools.partial(topk_loss, divergence="forward_kl", kd_temperature=2.0)
    ref = fn(s1, lp, idx, lres)
    got = chunked(fn, 3)(s2, lp, idx, lres)
    assert torch.allclose(ref, got, atol=1e-6)
    masked_mean(ref, mask).backward()
    masked_mean(got, mask).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_equals_unfused(name, with_bias):
    fn = FNS[name]
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 9, 16, 50
    h = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) if with_bias else None
    t = torch.randn(B, T, V, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    b1 = b.clone().requires_grad_(True) if with_bias else None
    b2 = b.clone().requires_grad_(True) if with_bias else None
    ref = fn(F.linear(h1, W1, b1), t)
    got = fused_linear_loss(fn, h2, W2, t, bias=b2, chunk_size=4)
    assert torch.allclose(ref, got, atol=1e-5)
    masked_mean(ref, mask).backward()
    masked_mean(got, mask).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)
    assert torch.allclose(W1.grad, W2.grad, atol=1e-6)
    if with_bias:
        assert torch.allclose(b1.grad, b2.grad, atol=1e-6)


def test_fused_linear_with_topk_targets():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 5, 8, generator=g)
    W = torch.randn(30, 8, generator=g)
    lp, idx, lres = teacher_topk(torch.randn(3, 5, 30, generator=g), k=4)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    ref = topk_loss(F.linear(h1, W), lp, idx, lres)
    got = fused_linear_loss(topk_loss, h2, W, lp, idx, lres, chunk_size=2)
    assert torch.allclose(ref, got, atol=1e-5)
    ref.sum().backward()
    got.sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)


def test_bad_inputs():
    s, t, _ = _data()
    with pytest.raises(KDistillError, match="chunk_size"):
        chunked(L.forward_kl, 0)
    with pytest.raises(KDistillError, match="start with"):
        chunked(L.forward_kl, 4)(s, t[:, :3])
    with pytest.raises(KDistillError, match="keywords"):
        chunked(L.generalized_jsd, 4)(s, t, 0.5)
    with pytest.raises(KDistillError, match="same H"):
        fused_linear_loss(L.forward_kl, torch.randn(2, 3, 4), torch.randn(10, 5), torch.randn(2, 3, 10))
    with pytest.raises(KDistillError, match=r"teacher logits has shape \(2, 3, 9\)"):
        fused_linear_loss(L.forward_kl, torch.randn(2, 3, 4), torch.randn(10, 4), torch.randn(2, 3, 9))


@pytest.mark.parametrize("name", list(FNS))
def test_fused_closed_form_equals_per_chunk_autograd(name):
    """The fused loss takes each divergence's closed-form gradient; wrapped in a lambda (no closed form known)
    the same divergence runs through per-chunk autograd: both give the same values and gradients."""
    fn = FNS[name]
    g = torch.Generator().manual_seed(3)
    h, W, t = torch.randn(3, 5, 8, generator=g), torch.randn(30, 8, generator=g), torch.randn(3, 5, 30, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    a = fused_linear_loss(fn, h1, W1, t, chunk_size=4, grad_hint=mask)
    b = fused_linear_loss(lambda s, t: fn(s, t), h2, W2, t, chunk_size=4, grad_hint=mask)
    assert torch.allclose(a, b, atol=1e-6)
    masked_mean(a, mask).backward()
    masked_mean(b, mask).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6) and torch.allclose(W1.grad, W2.grad, atol=1e-6)


def test_addmm_fp32_runs_in_the_operands_precision():
    """fp32 operands: an fp32 GEMM; bf16 operands: the bf16 product (a bf16 GEMM) added into the fp32
    accumulator, not an fp32 GEMM of the upcast operands (~10x slower on a GPU)."""
    from kdistill.losses.chunked import addmm_fp32_, gemm_dtype

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 24, generator=g), torch.randn(24, 16, generator=g)
    acc = torch.ones(40, 16)
    assert addmm_fp32_(acc, a, b) is acc
    torch.testing.assert_close(acc, 1 + a @ b)
    lo = torch.ones(40, 16)
    addmm_fp32_(lo, a.bfloat16(), b.bfloat16())
    assert lo.dtype == torch.float32
    torch.testing.assert_close(lo, 1 + (a.bfloat16() @ b.bfloat16()).float())  # the bf16 product, exactly
    assert float((lo - (1 + a @ b)).abs().max()) > 0  # ... which differs from the fp32 one
    assert gemm_dtype(a, b) == torch.float32 and gemm_dtype(a.bfloat16(), b) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_dtype(a, b) == torch.bfloat16
