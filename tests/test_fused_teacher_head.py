"""The fused teacher head and the blocked analytic gradients (issue 20, memory).

* ``fused_linear_loss`` with the teacher's hidden states and LM head equals the eager loss on full logits (values
  and gradients of hidden, weight and bias, to 1e-5) for every divergence of ``llm_kd``, with final-logit
  soft-capping and ``logit_scale`` on either model, a CE mix against labels, top-k cached targets, and with or
  without the gradient hint (the hint changes when the gradient is formed, never its value);
* each closed-form student gradient equals autograd: ``gradcheck`` in float64 and 1e-5 in float32, with a
  temperature, zero-weight (masked) rows, entries both models exclude and rows where the teacher gives
  probability 0 to most of the vocabulary;
* Hugging Face models whose config soft-caps or scales the logits (Gemma-2, Cohere, Granite) hand that over, and
  a model whose logits are post-processed in an unknown way is refused;
* bad inputs (mismatched vocabularies or shapes) fail with one clear error.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import KDistillError
from kdistill.losses import logits as L
from kdistill.losses.chunked import apply_head_transform, fused_chunk_size, fused_linear_loss
from kdistill.losses.reduce import masked_mean
from kdistill.losses.topk import teacher_topk, topk_loss
from kdistill.methods.llm_kd import LOSSES

C = importlib.import_module("kdistill.losses.chunked")  # the module (kdistill.losses.chunked is also a function)

KW = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.2},
      "taid": {"t": 0.4}, "token_selective": {"entropy_weight": 0.3}}
B, T, H, HT, V = 2, 9, 16, 12, 50
ALPHA = 0.6


def _inputs(seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    d = {"h": torch.randn(B, T, H, generator=g), "W": torch.randn(V, H, generator=g) * 0.5,
         "b": torch.randn(V, generator=g) if bias else None, "th": torch.randn(B, T, HT, generator=g),
         "tW": torch.randn(V, HT, generator=g) * 0.5, "tb": torch.randn(V, generator=g) if bias else None}
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    d["labels"], d["mask"] = labels, labels != -100
    return d


def _leaves(d):
    return (d["h"].clone().requires_grad_(True), d["W"].clone().requires_grad_(True),
            d["b"].clone().requires_grad_(True) if d["b"] is not None else None)


def _grads(*xs):
    return [x.grad for x in xs if x is not None]


def _eager(fn, d, *, head, teacher_head, ce, kw):
    """Full logits of both models, then the loss, the CE term and backward: the reference."""
    h, W, b = _leaves(d)
    zs = apply_head_transform(F.linear(h, W, b), **head)
    zt = apply_head_transform(F.linear(d["th"], d["tW"], d["tb"]), **teacher_head)
    per_token = fn(zs, zt, kd_temperature=2.0, **kw)
    loss = ALPHA * masked_mean(per_token, d["mask"])
    if ce:
        loss = loss + (1 - ALPHA) * masked_mean(L.cross_entropy(zs, d["labels"]), d["mask"])
    loss.backward()
    return [per_token.detach(), *_grads(h, W, b)]


def _fused(fn, d, *, head, teacher_head, ce, kw, hint, chunk):
    h, W, b = _leaves(d)
    grad_hint = None
    if hint:
        grad_hint = (d["mask"] * ALPHA, d["mask"] * (1 - ALPHA)) if ce else d["mask"]
    out = fused_linear_loss(fn, h, W, bias=b, teacher_hidden=d["th"], teacher_weight=d["tW"], teacher_bias=d["tb"],
                            softcap=head.get("softcap"), logit_scale=head.get("logit_scale"),
                            teacher_softcap=teacher_head.get("softcap"),
                            teacher_logit_scale=teacher_head.get("logit_scale"),
                            labels=d["labels"] if ce else None, grad_hint=grad_hint, chunk_size=chunk,
                            kd_temperature=2.0, **kw)
    per_token, ce_values = out if ce else (out, None)
    loss = ALPHA * masked_mean(per_token, d["mask"])
    if ce:
        loss = loss + (1 - ALPHA) * masked_mean(ce_values, d["mask"])
    loss.backward()
    return [per_token.detach(), *_grads(h, W, b)]


def _assert_same(ref, got, atol=1e-5):
    assert len(ref) == len(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert r.shape == g.shape, i
        assert torch.allclose(r, g, atol=atol, rtol=1e-5), (i, float((r - g).abs().max()))
    assert all(float(g.abs().sum()) > 0 for g in got[1:])  # gradients reached hidden, weight, bias


# ------------------------------------------------------------------------------------ fused == eager


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("variant", ["capped_ce_hint", "scaled_ce", "plain_hint"])
def test_fused_teacher_head_equals_eager_for_every_divergence(name, variant):
    fn, kw = LOSSES[name], KW.get(name, {})
    head, teacher_head = {}, {}
    if variant == "capped_ce_hint":   # Gemma-2 style soft-capping on both, the teacher with its own cap
        head, teacher_head = {"softcap": 2.0}, {"softcap": 3.0, "logit_scale": 1.5}
    elif variant == "scaled_ce":      # Cohere style logit_scale
        head, teacher_head = {"logit_scale": 0.7}, {"logit_scale": 1.3}
    ce, hint = variant != "plain_hint", variant != "scaled_ce"
    d = _inputs(bias=variant != "plain_hint")
    ref = _eager(fn, d, head=head, teacher_head=teacher_head, ce=ce, kw=kw)
    got = _fused(fn, d, head=head, teacher_head=teacher_head, ce=ce, kw=kw, hint=hint, chunk=4)  # 18 rows: partial
    _assert_same(ref, got)


def test_softcap_and_logit_scale_change_the_objective():
    """The comparisons above are not vacuous: without the teacher's cap the fused loss is another number."""
    d = _inputs()
    capped = fused_linear_loss(L.forward_kl, d["h"], d["W"], teacher_hidden=d["th"], teacher_weight=d["tW"],
                               teacher_softcap=1.0)
    plain = fused_linear_loss(L.forward_kl, d["h"], d["W"], teacher_hidden=d["th"], teacher_weight=d["tW"])
    scaled = fused_linear_loss(L.forward_kl, d["h"], d["W"], teacher_hidden=d["th"], teacher_weight=d["tW"],
                               logit_scale=2.0)
    assert float((capped - plain).abs().max()) > 1e-2 and float((scaled - plain).abs().max()) > 1e-2
    z = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0])
    assert torch.allclose(apply_head_transform(z, softcap=2.0), 2.0 * torch.tanh(z / 2.0))
    assert float(apply_head_transform(z, softcap=2.0).abs().max()) <= 2.0
    assert torch.equal(apply_head_transform(z, logit_scale=0.5), z * 0.5)


@pytest.mark.parametrize("chunk", [None, 1, 7, 100])
def test_fused_with_teacher_logits_and_ce_equals_eager_at_any_chunk(chunk):
    """Teacher logits as the target (the student head fused only), CE mix, every chunk size incl. the default."""
    d = _inputs(seed=3)
    zt = F.linear(d["th"], d["tW"], d["tb"])
    h1, W1, b1 = _leaves(d)
    zs = F.linear(h1, W1, b1)
    ref_kd, ref_ce = L.skew_reverse_kl(zs, zt, skew=0.1, kd_temperature=1.5), L.cross_entropy(zs, d["labels"])
    (masked_mean(ref_kd, d["mask"]) + 0.3 * masked_mean(ref_ce, d["mask"])).backward()
    h2, W2, b2 = _leaves(d)
    kd, ce = fused_linear_loss(functools.partial(L.skew_reverse_kl, skew=0.1), h2, W2, zt, bias=b2, chunk_size=chunk,
                               labels=d["labels"], grad_hint=(d["mask"], 0.3 * d["mask"]), kd_temperature=1.5)
    (masked_mean(kd, d["mask"]) + 0.3 * masked_mean(ce, d["mask"])).backward()
    _assert_same([ref_kd.detach(), ref_ce.detach(), h1.grad, W1.grad, b1.grad],
                 [kd.detach(), ce.detach(), h2.grad, W2.grad, b2.grad])
    assert torch.all(ce[~d["mask"]] == 0)  # label -100: no CE, as data.lm.label_mask says


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tvd"])
def test_fused_topk_targets_with_softcap_and_ce_equal_eager(divergence):
    d = _inputs(seed=4)
    lp, idx, lres = teacher_topk(F.linear(d["th"], d["tW"]), k=6, kd_temperature=2.0)
    h1, W1, b1 = _leaves(d)
    zs = apply_head_transform(F.linear(h1, W1, b1), softcap=2.5)
    ref = topk_loss(zs, lp, idx, lres, divergence=divergence, kd_temperature=2.0)
    ref_ce = L.cross_entropy(zs, d["labels"])
    (masked_mean(ref, d["mask"]) + masked_mean(ref_ce, d["mask"])).backward()
    h2, W2, b2 = _leaves(d)
    got, ce = fused_linear_loss(topk_loss, h2, W2, lp, idx, lres, bias=b2, softcap=2.5, labels=d["labels"],
                                grad_hint=(d["mask"], d["mask"]), chunk_size=5, divergence=divergence,
                                kd_temperature=2.0)
    (masked_mean(got, d["mask"]) + masked_mean(ce, d["mask"])).backward()
    _assert_same([ref.detach(), ref_ce.detach(), h1.grad, W1.grad, b1.grad],
                 [got.detach(), ce.detach(), h2.grad, W2.grad, b2.grad])


def test_the_hint_forms_the_gradient_in_forward_and_a_wrong_hint_only_costs_time(monkeypatch):
    """With a hint that matches the incoming gradient each chunk runs once (the gradient is formed in forward);
    an incoming gradient that is not proportional to the hint recomputes the chunks and is still exact."""
    d = _inputs(seed=5)
    calls = []
    real = C._chunk
    monkeypatch.setattr(C, "_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    for weights, expect_calls in ((d["mask"].float(), 3), (torch.rand(B, T, generator=torch.Generator().manual_seed(0)),
                                                           6)):
        calls.clear()
        h1, W1, b1 = _leaves(d)
        zt = F.linear(d["th"], d["tW"], d["tb"])
        ref = L.generalized_jsd(F.linear(h1, W1, b1), zt, beta=0.5)
        (ref * weights).sum().backward()
        h2, W2, b2 = _leaves(d)
        got = fused_linear_loss(L.generalized_jsd, h2, W2, bias=b2, teacher_hidden=d["th"], teacher_weight=d["tW"],
                                teacher_bias=d["tb"], chunk_size=7, grad_hint=d["mask"], beta=0.5)
        (got * weights).sum().backward()
        assert len(calls) == expect_calls  # 18 rows / 7 = 3 chunks: forward only, or forward + backward
        _assert_same([ref.detach(), h1.grad, W1.grad, b1.grad], [got.detach(), h2.grad, W2.grad, b2.grad])


def test_gradients_reach_a_teacher_that_requires_them():
    """Teacher head or teacher logits that require a gradient get autograd's (the fused path falls back)."""
    d = _inputs(seed=6)
    th1, tW1 = d["th"].clone().requires_grad_(True), d["tW"].clone().requires_grad_(True)
    h1, W1, _ = _leaves(d)
    L.reverse_kl(F.linear(h1, W1), apply_head_transform(F.linear(th1, tW1), softcap=2.0)).sum().backward()
    th2, tW2 = d["th"].clone().requires_grad_(True), d["tW"].clone().requires_grad_(True)
    h2, W2, _ = _leaves(d)
    fused_linear_loss(L.reverse_kl, h2, W2, teacher_hidden=th2, teacher_weight=tW2, teacher_softcap=2.0,
                      chunk_size=4).sum().backward()
    _assert_same([h1.grad, W1.grad, th1.grad, tW1.grad], [h2.grad, W2.grad, th2.grad, tW2.grad])
    zt1 = F.linear(d["th"], d["tW"]).requires_grad_(True)
    zt2 = zt1.detach().clone().requires_grad_(True)
    L.tvd(F.linear(d["h"], d["W"]), zt1).sum().backward()
    fused_linear_loss(L.tvd, d["h"], d["W"], zt2, chunk_size=5).sum().backward()
    assert torch.allclose(zt1.grad, zt2.grad, atol=1e-6) and float(zt2.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------ analytic gradients

ANALYTIC = ["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd", "taid",
            "token_selective"]


def _logits(dtype, seed=0, rows=(3, 4), v=9):
    """Student / teacher logits with: an entry both exclude (-inf), rows where the teacher gives probability 0
    to some entries, and one row where it gives all its mass to a single entry."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*rows, v, generator=g) * 2).to(dtype)
    t = (torch.randn(*rows, v, generator=g) * 2).to(dtype)
    s[0, 0, 2] = t[0, 0, 2] = float("-inf")
    t[1, 1, :3] = float("-inf")
    t[2, 3, 1:] = float("-inf")  # the teacher is one-hot here
    return s, t


def _safe_for(name, s, t):
    """reverse KL (and skew 0) is infinite where only the teacher excludes an entry: exclude it in both."""
    if name == "reverse_kl":
        s = torch.where(torch.isinf(t), t, s)
    return s, t


@pytest.mark.parametrize("name", ANALYTIC)
def test_analytic_gradient_passes_gradcheck_in_float64(name):
    fn, kw = LOSSES[name], KW.get(name, {})
    s, t = _safe_for(name, *_logits(torch.float64))
    w = torch.randn(s.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w[0, 1] = 0.0  # a masked row
    if name == "taid":  # TAID's target is the student's *detached* logits: compare with KL to that fixed target
        target = L._taid_target(s, t, kw["t"])
        check = lambda x: (L.taid(x, t, t=kw["t"], kd_temperature=1.7) * w,  # noqa: E731
                           L.forward_kl(x, target, kd_temperature=1.7) * w)
        x = s.clone().requires_grad_(True)
        got, ref = check(x)
        (g1,) = torch.autograd.grad(got.sum(), x)
        (g2,) = torch.autograd.grad(ref.sum(), x)
        assert torch.allclose(g1, g2, atol=1e-12)
        assert torch.autograd.gradcheck(lambda x: L.forward_kl(x, target, kd_temperature=1.7) * w, (x,))
        return
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, kd_temperature=1.7, **kw) * w, (x,))


@pytest.mark.parametrize("name", ANALYTIC)
def test_analytic_gradient_equals_autograd_in_float32(name):
    """The closed form (frozen teacher) against the autograd composition (the same call with a teacher that
    requires a gradient), with temperature, masked rows and zero teacher probabilities."""
    fn, kw = LOSSES[name], KW.get(name, {})
    s, t = _safe_for(name, *_logits(torch.float32, seed=2, rows=(4, 5), v=23))
    w = (torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(3)) > 0.3).float()
    s1 = s.clone().requires_grad_(True)
    got = fn(s1, t, kd_temperature=2.5, **kw)
    (got * w).sum().backward()
    s2, t2 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ref = fn(s2, t2, kd_temperature=2.5, **kw)
    (ref * w).sum().backward()
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and torch.isfinite(s1.grad).all()
    assert torch.allclose(got, ref.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-5, rtol=1e-5)
    assert torch.all(s1.grad[w == 0] == 0) and float(s1.grad.abs().sum()) > 0
    assert torch.all(s1.grad[0, 0, 2] == 0)  # an entry both models exclude


def test_analytic_gradient_closed_forms_at_known_points():
    """Spot values of the closed forms: forward KL's p_s - p_t, TVD's sign rule, reverse KL's p (log p/q - KL)."""
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.0]])
    p, q = torch.softmax(s.detach(), -1), torch.softmax(t, -1)
    L.forward_kl(s, t).sum().backward()
    assert torch.allclose(s.grad, p - q, atol=1e-7)
    s.grad = None
    L.reverse_kl(s, t).sum().backward()
    kl = (p * (p.log() - q.log())).sum()
    assert torch.allclose(s.grad, p * (p.log() - q.log() - kl), atol=1e-7)
    s.grad = None
    L.tvd(s, t).sum().backward()
    g = 0.5 * torch.sign(p - q) * p
    assert torch.allclose(s.grad, g - p * g.sum(), atol=1e-7)


def test_analytic_paths_keep_the_infinite_divergence_errors():
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    t[1, 2, 4] = float("-inf")  # teacher-only -inf: reverse KL infinite at (1, 2)
    with pytest.raises(KDistillError, match=r"reverse_kl: the divergence is infinite at position \(1, 2\)"):
        L.reverse_kl(s, t)
    with pytest.raises(KDistillError, match="skew_reverse_kl: the divergence is infinite"):
        L.skew_reverse_kl(s, t, skew=0.0)
    assert torch.isfinite(L.skew_reverse_kl(s, t, skew=0.1)).all()
    h, W = torch.randn(2, 3, 4), torch.randn(6, 4)
    with pytest.raises(KDistillError, match=r"reverse_kl: the divergence is infinite at position \(1, 2\)"):
        fused_linear_loss(L.reverse_kl, h, W, t, chunk_size=2)
    with pytest.raises(KDistillError, match=r"reverse_kl: the divergence is infinite at position \(1, 2\)"):
        # the gradient formed in forward overwrites the chunk's logits: the row is reported before that
        fused_linear_loss(L.reverse_kl, h.requires_grad_(True), W, t, chunk_size=2, grad_hint=torch.ones(2, 3))


# ------------------------------------------------------------------------------------ chunk rule, models, errors


def test_chunk_rule_one_chunk_when_small_and_equal_bounded_chunks_beyond():
    # one chunk while the (tokens, V) fp32 logits fit 512 MiB: the eager computation itself
    assert fused_chunk_size(512, 49_152) == 512 and fused_chunk_size(2048, 49_152) == 2048
    assert fused_chunk_size(512, 262_144) == 512 and fused_chunk_size(0, 10) == 1
    # beyond: equal chunks of at most 256 MiB / (4 tensors * 4 bytes * V) rows
    assert fused_chunk_size(8192, 262_144) == 64 and fused_chunk_size(2048, 131_072) == 128
    assert fused_chunk_size(8192, 49_152) == 328  # 25 chunks of <= 341 rows, balanced
    for tokens, vocab in ((8192, 49_152), (5000, 131_072), (3000, 262_144), (10**6, 32_000)):
        c = fused_chunk_size(tokens, vocab)
        chunks = -(-tokens // c)
        assert c * vocab * 16 <= C.CHUNK_BUDGET_BYTES and chunks * c - tokens < chunks  # bounded, balanced
    assert fused_chunk_size(8192, 10**9) == 8  # at least 8 rows



def test_chunk_rule_on_cuda_takes_larger_chunks():
    # 4 GiB / (16 V) rows per chunk, one chunk when the batch has no more rows (no CUDA device needed: a rule)
    assert fused_chunk_size(8192, 262_144, device="cuda") == 1024
    assert fused_chunk_size(8192, 131_072, device=torch.device("cuda", 0)) == 2048
    assert fused_chunk_size(2048, 131_072, device="cuda") == 2048
    assert fused_chunk_size(512, 262_144, device="cuda") == 512
    assert fused_chunk_size(8192, 49_152, device="cuda") == 4096  # 2 balanced chunks of <= 5,461 rows
    assert fused_chunk_size(0, 10, device="cuda") == 1
    assert fused_chunk_size(8192, 262_144, device="cpu") == fused_chunk_size(8192, 262_144) == 64
    for tokens, vocab in ((8192, 49_152), (5000, 131_072), (30_000, 262_144)):
        c = fused_chunk_size(tokens, vocab, device="cuda")
        chunks = -(-tokens // c)
        assert c * vocab * 16 <= C.CUDA_CHUNK_BUDGET_BYTES and chunks * c - tokens < chunks


def _tiny(kind):
    import transformers as tr

    common = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    torch.manual_seed(0)
    if kind == "gemma2":
        return tr.Gemma2ForCausalLM(tr.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5))
    if kind == "cohere":
        return tr.CohereForCausalLM(tr.CohereConfig(**common, logit_scale=3.0))
    return tr.GraniteForCausalLM(tr.GraniteConfig(**common, logits_scaling=0.25))


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_models_that_cap_or_scale_their_logits_hand_it_over(kind):
    """The fused path of a model with final_logit_softcapping / logit_scale / logits_scaling equals the loss on the
    model's own logits, and those differ from the bare head output (so the transform matters)."""
    from kdistill.teachers.lm import fused_head_output

    student, teacher = _tiny(kind), _tiny(kind)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        zt = teacher(**batch).logits
        t_out = fused_head_output(teacher, batch)
    s_full = student(**batch).logits
    ref = L.forward_kl(s_full, zt, kd_temperature=2.0)
    ref.sum().backward()
    g_ref = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    s_out = fused_head_output(student, batch)
    ex, tex = s_out.extra, t_out.extra
    assert (ex["softcap"], ex["logit_scale"]) == {"gemma2": (0.5, None), "cohere": (None, 3.0),
                                                  "granite": (None, 4.0)}[kind]
    bare = F.linear(ex["hidden"], ex["lm_head_weight"]).detach()
    assert float((bare - s_full.detach()).abs().max()) > 1e-3
    got = fused_linear_loss(L.forward_kl, ex["hidden"], ex["lm_head_weight"], bias=ex["lm_head_bias"],
                            softcap=ex["softcap"], logit_scale=ex["logit_scale"], teacher_hidden=tex["hidden"],
                            teacher_weight=tex["lm_head_weight"], teacher_softcap=tex["softcap"],
                            teacher_logit_scale=tex["logit_scale"], chunk_size=5, kd_temperature=2.0)
    assert torch.allclose(got, ref.detach(), atol=1e-5)
    got.sum().backward()
    for n, p in student.named_parameters():
        if n in g_ref:
            assert torch.allclose(p.grad, g_ref[n], atol=1e-5, rtol=1e-4), n


def test_a_model_with_an_unknown_logit_transform_is_refused():
    from kdistill.teachers.lm import fused_head_output

    model = _tiny("gemma2")
    model.config.final_logit_softcapping = None  # config says "no cap", the forward below still transforms
    inner_forward = model.forward

    def forward(*a, **k):
        out = inner_forward(*a, **k)
        out.logits = out.logits * 2.0 + 1.0
        return out

    model.forward = forward
    ids = torch.randint(0, 40, (1, 5))
    with pytest.raises(KDistillError, match="not its LM head's output.*fused: false"):
        fused_head_output(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_bad_inputs_get_one_clear_error():
    d = _inputs()
    h, W = d["h"], d["W"]
    with pytest.raises(KDistillError, match="teacher's LM head has 49 rows and the student's 50"):
        fused_linear_loss(L.forward_kl, h, W, teacher_hidden=d["th"], teacher_weight=d["tW"][:49])
    with pytest.raises(KDistillError, match="teacher_hidden has shape"):
        fused_linear_loss(L.forward_kl, h, W, teacher_hidden=d["th"][:, :5], teacher_weight=d["tW"])
    with pytest.raises(KDistillError, match="teacher_weight has shape"):
        fused_linear_loss(L.forward_kl, h, W, teacher_hidden=d["th"], teacher_weight=d["tW"][:, :5])
    with pytest.raises(KDistillError, match="only one of teacher_hidden / teacher_weight"):
        fused_linear_loss(L.forward_kl, h, W, teacher_hidden=d["th"])
    with pytest.raises(KDistillError, match="one teacher side"):
        fused_linear_loss(L.forward_kl, h, W, torch.randn(B, T, V), teacher_hidden=d["th"], teacher_weight=d["tW"])
    with pytest.raises(KDistillError, match="no teacher side"):
        fused_linear_loss(L.forward_kl, h, W)
    with pytest.raises(KDistillError, match=r"teacher logits has shape \(2, 9, 49\)"):
        fused_linear_loss(L.forward_kl, h, W, torch.randn(B, T, V - 1))
    bad = d["labels"].clone()
    bad[1, 1] = V
    with pytest.raises(KDistillError, match=r"labels hold 50; expected token ids in \[0, 49\] or -100"):
        fused_linear_loss(L.forward_kl, h, W, torch.randn(B, T, V), labels=bad)
    with pytest.raises(KDistillError, match="grad_hint has 1 part"):
        fused_linear_loss(L.forward_kl, h, W, torch.randn(B, T, V), labels=d["labels"], grad_hint=d["mask"])
    with pytest.raises(KDistillError, match="grad_hint part of shape"):
        fused_linear_loss(L.forward_kl, h, W, torch.randn(B, T, V), grad_hint=d["mask"][:, :3])
    with pytest.raises(KDistillError, match="softcap"):
        fused_linear_loss(L.forward_kl, h, W, torch.randn(B, T, V), softcap=-1.0)
    with pytest.raises(KDistillError, match="keyword of skew_kl"):
        fused_linear_loss(L.skew_kl, h, W, torch.randn(B, T, V), skwe=0.1)
