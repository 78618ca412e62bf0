"""The losses on a CUDA device: the same values and gradients as on the CPU (the blocked vocabulary paths take
other branches there), bf16 in / fp32 out, and the infinite-divergence error. Skipped without CUDA."""

import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.chunked import chunked, fused_linear_loss
from kdistill.losses.logits import forward_kl, reverse_kl
from kdistill.losses.topk import teacher_topk, topk_loss
from kdistill.methods.llm_kd import LOSSES

pytestmark = pytest.mark.gpu


def _pair(shape=(4, 64, 4096), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3


def _value_and_grad(fn, student_logits, teacher_logits, **kw):
    x = student_logits.clone().requires_grad_(True)
    v = fn(x, teacher_logits, **kw)
    w = torch.linspace(0.5, 1.5, v.numel(), device=v.device).reshape(v.shape)  # distinct weights per row
    (v * w).sum().backward()
    return v.detach().cpu(), x.grad.cpu()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_divergence_matches_the_cpu(name):
    s, t = _pair()
    kw = {"kd_temperature": 2.0, **({"t": 0.6} if name == "taid" else {})}
    v_cpu, g_cpu = _value_and_grad(LOSSES[name], s, t, **kw)
    v_gpu, g_gpu = _value_and_grad(LOSSES[name], s.cuda(), t.cuda(), **kw)
    torch.testing.assert_close(v_gpu, v_cpu, rtol=2e-4, atol=2e-5)
    if name == "uld":
        # ULD's gradient pairs the i-th largest student probability with the i-th largest teacher one: two
        # student probabilities within rounding of each other may sort in another order on the GPU, which moves
        # their gradient entries. Compare the gradient as a whole.
        assert float((g_gpu - g_cpu).norm() / g_cpu.norm()) < 5e-2
    else:
        torch.testing.assert_close(g_gpu, g_cpu, rtol=2e-3, atol=1e-6)


def test_bf16_in_fp32_out_and_chunked_equals_whole():
    s, t = (x.cuda() for x in _pair())
    for fn in (forward_kl, reverse_kl):
        assert fn(s.bfloat16(), t.bfloat16()).dtype == torch.float32
        torch.testing.assert_close(chunked(fn, 64)(s, t), fn(s, t), rtol=1e-5, atol=1e-6)


def test_topk_and_fused_losses_match_on_cuda():
    s, t = (x.cuda() for x in _pair((2, 32, 2048)))
    lp, idx, res = teacher_topk(t, k=2048)  # k = V: the top-k loss is the full forward KL
    torch.testing.assert_close(topk_loss(s, lp, idx, res), forward_kl(s, t), rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 32, 64, generator=g).cuda().requires_grad_(True)
    weight = (torch.randn(2048, 64, generator=g) * 0.1).cuda().requires_grad_(True)
    fused = fused_linear_loss(forward_kl, hidden, weight, t, chunk_size=16, kd_temperature=2.0)
    fused.sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    eager = forward_kl(hidden @ weight.T, t, kd_temperature=2.0)
    eager.sum().backward()
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-3, atol=1e-5)


def test_infinite_divergence_is_an_error_on_cuda():
    s, t = (x.cuda() for x in _pair((2, 3, 7)))
    s[1, 2, 4] = -math.inf
    with pytest.raises(KDistillError, match=r"position \(1, 2\): vocabulary entry 4"):
        forward_kl(s.requires_grad_(), t)


def _head_inputs(dtype, B=2, T=24, H=48, V=1536, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).cuda().to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).cuda().to(dtype)
    t_hidden = torch.randn(B, T, H, generator=g).cuda().to(dtype)
    t_weight = (torch.randn(V, H, generator=g) * 0.4).cuda().to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g).cuda()
    labels[0, :3] = -100
    return hidden, weight, t_hidden, t_weight, labels


@pytest.mark.parametrize("name", sorted(n for n in LOSSES if n != "uld"))
def test_fused_teacher_head_matches_eager_on_cuda(name):
    """Neither model's logits built (teacher hidden states + head), soft-capping on both sides and the CE mix: the
    same values and gradients as the eager loss on full logits, on the GPU, for every divergence."""
    import torch.nn.functional as F

    from kdistill.losses.chunked import apply_head_transform

    hidden, weight, t_hidden, t_weight, labels = _head_inputs(torch.float32)
    kw = {"kd_temperature": 2.0, **({"t": 0.6} if name == "taid" else {})}
    fn = LOSSES[name]

    def run(fused: bool):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            kd, ce = fused_linear_loss(fn, h, w, teacher_hidden=t_hidden, teacher_weight=t_weight, softcap=30.0,
                                       teacher_softcap=30.0, labels=labels, chunk_size=7, **kw)
        else:
            s = apply_head_transform(h @ w.T, softcap=30.0)
            t = apply_head_transform(t_hidden @ t_weight.T, softcap=30.0)
            kd = fn(s, t, **kw)
            ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none",
                                 ignore_index=-100).view_as(kd)
        (0.7 * kd.sum() + 0.3 * ce.sum()).backward()
        return kd.detach(), ce.detach(), h.grad, w.grad

    got, want = run(True), run(False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_fused_sampled_targets_match_eager_on_cuda():
    from kdistill.losses.topk import sample_weights, sampled_loss, teacher_sample

    hidden, weight, t_hidden, t_weight, _ = _head_inputs(torch.float32)
    teacher = t_hidden @ t_weight.T
    gen = torch.Generator(device="cuda").manual_seed(0)
    idx, counts, log_ratio, entropy = teacher_sample(teacher, samples=32, kd_temperature=2.0, generator=gen)
    w_ = sample_weights(counts, log_ratio)

    def run(fused: bool):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            v = fused_linear_loss(sampled_loss, h, w, idx, w_, entropy, chunk_size=5, kd_temperature=2.0)
        else:
            v = sampled_loss(h @ w.T, idx, w_, entropy, kd_temperature=2.0)
        v.sum().backward()
        return v.detach(), h.grad, w.grad

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_fused_teacher_head_in_bf16_is_close_to_fp32_on_cuda():
    """bf16 hidden states and heads (what a bf16 run feeds the fused loss): fp32 results within bf16 rounding of
    the fp32 computation."""
    ref = _head_inputs(torch.float32)
    low = tuple(x.bfloat16() if x.is_floating_point() else x for x in ref)

    def loss(h, w, th, tw):
        h = h.clone().requires_grad_(True)
        v = fused_linear_loss(forward_kl, h, w, teacher_hidden=th, teacher_weight=tw, chunk_size=16,
                              kd_temperature=2.0)
        v.sum().backward()
        return v.detach(), h.grad.float()

    v32, g32 = loss(*ref[:4])
    v16, g16 = loss(*low[:4])
    assert v16.dtype == torch.float32
    assert float((v16 - v32).abs().max() / v32.abs().max()) < 3e-2
    assert float((g16 - g32).norm() / g32.norm()) < 5e-2


def test_addmm_fp32_in_bf16_on_cuda():
    """The fused head's weight-gradient GEMM in a bf16 run: a bf16 GEMM into the fp32 accumulator (through
    addmm's out_dtype where this torch has it), equal to the bf16 product added in fp32."""
    from kdistill.losses.chunked import addmm_fp32_

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(256, 512, generator=g).cuda().bfloat16(), torch.randn(512, 128, generator=g).cuda().bfloat16())
    acc = torch.full((256, 128), 0.5, device="cuda")
    addmm_fp32_(acc, a, b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, 0.5 + a.float() @ b.float(), rtol=1e-2, atol=1e-2)


def test_the_topk_student_distribution_waits_for_the_host_once_per_call():
    """The cached-target path on a GPU: the ids' range check and the underflow test are read together, one host
    sync per call (there were three); a bad id still gets the clear error, and an underflowing row its exact rest."""
    import warnings

    from kdistill.losses.topk import student_coarse

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(2, 64, 4096, generator=g) * 3).cuda().requires_grad_(True)
    idx = torch.randint(0, 4096, (2, 64, 32), generator=g).cuda()
    student_coarse(z, idx)  # warm-up: allocator and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            student_coarse(z, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    with pytest.raises(KDistillError, match="different vocabulary"):
        student_coarse(z, torch.where(idx == idx[0, 0, 0], 4096, idx))
    y = z.detach().clone()
    y[0, 0] = -1e4
    y[0, 0, idx[0, 0, 0]] = 50.0  # the rest's mass underflows in linear space
    out = student_coarse(y, idx)
    assert torch.isfinite(out[0, 0, -1]) and out[0, 0, -1] < -1e3
