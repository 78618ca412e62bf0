"""Every loss pinned to reference values.

For each case of ``_reference.CASES`` the stored ``golden.json`` holds seeded float32 inputs and the float64
value and student gradients of the reference formula (``make_golden.py`` writes it from the reference formulas
only). Each case checks, both ways:

* reference formula (float64, now) == golden  (rtol 1e-10): the reference did not drift;
* kdistill (float32 inputs, now) == golden    (rtol 1e-5): the library did not drift. Gradients are those of
  ``sum(w * loss)`` with fixed distinct weights ``w`` (``_reference.weights_for``), so per-row mix-ups show.

Conventions (the library's, which the docstrings below compare with the public reference implementations):
losses are unreduced (per row / per token / per anchor row), in the KL form (not the cross-entropy form that
drops the teacher entropy), and never multiplied by ``T^2`` (methods multiply by
``kdistill.losses.reduce.kd_scale(T, power=TEMPERATURE_POWER[name])``). Reductions (``masked_mean`` over
tokens = the references' "batchmean") are a separate call and are tested at the end of this file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses import classification as C
from kdistill.losses import embeddings as E
from kdistill.losses import logits as L
from kdistill.losses import relations as REL
from kdistill.losses.reduce import masked_mean
from kdistill.losses.topk import teacher_topk, topk_loss

from . import _reference as R

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden.json").read_text())["cases"]


def _decode(d: dict) -> torch.Tensor:
    dtype = {"float": torch.float32, "int64": torch.int64, "bool": torch.bool}[d["dtype"]]
    return torch.tensor(d["data"], dtype=dtype).reshape(d["shape"])


def _decode64(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=torch.float64).reshape(d["shape"])


def _cases(family: str) -> list[str]:
    names = [n for n, c in GOLDEN.items() if c["family"] == family]
    assert names, f"no golden case for {family}"
    return names


# ---------------------------------------------------------------------------------------------- kdistill callables


def _taid(s, t, *, t_interp, **kw):
    return L.taid(s, t, t=t_interp, **kw)


def _topk(s, t, *, k, divergence, kd_temperature=1.0, **kw):
    if "t_interp" in kw:
        kw["t"] = kw.pop("t_interp")
    lp, idx, log_rest = teacher_topk(t, k=k, kd_temperature=kd_temperature)
    return topk_loss(s, lp, idx, log_rest, divergence=divergence, kd_temperature=kd_temperature, **kw)


KDISTILL = {
    "forward_kl": L.forward_kl, "reverse_kl": L.reverse_kl, "generalized_jsd": L.generalized_jsd,
    "skew_kl": L.skew_kl, "skew_reverse_kl": L.skew_reverse_kl, "tvd": L.tvd, "taid": _taid,
    "token_selective": L.token_selective, "uld": L.uld, "soft_cross_entropy": L.soft_cross_entropy,
    "cross_entropy": L.cross_entropy, "entropy": L.entropy,
    "dkd_tckd": lambda s, t, y, **kw: C.dkd_terms(s, t, y, **kw)[0],
    "dkd_nckd": lambda s, t, y, **kw: C.dkd_terms(s, t, y, **kw)[1],
    "dist_inter_class": C.dist_inter_class, "dist_intra_class": C.dist_intra_class,
    "standardized_kl": C.standardized_kl, "alpha_divergence": C.alpha_divergence,
    "alpha_divergence_clipped": C.alpha_divergence, "sinkhorn_distance": C.sinkhorn_distance,
    "ofa_loss": C.ofa_loss, "guided_targets": C.guided_targets, "subclass_kl": C.subclass_kl,
    "head_gradient_alignment": C.head_gradient_alignment,
    "attention_transfer": REL.attention_transfer, "rkd_distance": REL.rkd_distance, "rkd_angle": REL.rkd_angle,
    "pkt": REL.pkt, "similarity_preserving": REL.similarity_preserving, "nd_loss": REL.nd_loss,
    "contrastive_nce": lambda s, t, neg=None, exclude=None, **kw: REL.contrastive_nce(s, t, neg, exclude=exclude, **kw),
    "token_relation": REL.token_relation,
    "embedding_mse": E.embedding_mse, "cosine": E.cosine, "margin_mse": E.margin_mse,
    "listwise_kl": lambda s, t, mask=None, **kw: E.listwise_kl(s, t, candidate_mask=mask, **kw),
    "token_cosine": E.token_cosine,
    "embedding_rkd_distance": lambda s, t, mask=None: E.rkd_distance(s, t, mask=mask),
    "embedding_rkd_angle": E.rkd_angle,
    "topk_loss": _topk,
}


def _check(name: str, *, rtol: float = 1e-5, atol: float = 1e-6, grad_rtol: float = 1e-5, grad_atol: float = 1e-6):
    """Reference == golden (tight) and kdistill == golden (float32 tolerances; ``atol`` / ``grad_atol`` are
    relative to the largest golden magnitude of the tensor compared, floored at 1)."""
    stored, case = GOLDEN[name], R.CASES[name]
    assert stored["kwargs"] == case.kwargs and stored["family"] == case.family
    inputs = [_decode(x) for x in stored["inputs"]]
    value = _decode64(stored["value"])
    grads = {int(i): _decode64(g) for i, g in stored["grads"].items()}
    assert set(grads) == set(case.grad)

    ref_value, ref_grads = R.evaluate_reference(case, inputs)
    torch.testing.assert_close(ref_value, value, rtol=1e-10, atol=1e-13)
    for i in case.grad:
        torch.testing.assert_close(ref_grads[i], grads[i], rtol=1e-10, atol=1e-13)

    xs = [x.clone().requires_grad_(i in case.grad) if x.is_floating_point() else x for i, x in enumerate(inputs)]
    out = KDISTILL[case.family](*xs, **stored["kwargs"])
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(value.shape)
    scale = max(1.0, value.abs().max().item())
    torch.testing.assert_close(out.double(), value, rtol=rtol, atol=atol * scale)
    (out.double() * R.weights_for(tuple(out.shape))).sum().backward()
    for i in case.grad:
        g = xs[i].grad
        assert g is not None and torch.isfinite(g).all()
        gscale = max(1.0, grads[i].abs().max().item())
        torch.testing.assert_close(g.double(), grads[i], rtol=grad_rtol, atol=grad_atol * gscale)


def test_every_case_is_stored_and_tested():
    """The golden file, the reference table and the kdistill mapping list the same cases, and every family has its
    own test function below (with its reference notes)."""
    assert set(GOLDEN) == set(R.CASES), "run tests/conformance/make_golden.py after adding or removing a case"
    families = {c.family for c in R.CASES.values()}
    assert families == set(KDISTILL)
    missing = [f for f in families if f"test_{f}" not in globals()]
    assert not missing, missing
    assert len(GOLDEN) >= 90  # the suite did not silently shrink


# ================================================================================ logits.py


@pytest.mark.parametrize("name", _cases("forward_kl"))
def test_forward_kl(name):
    """KL(p_t || p_s) per row at T = 1 and 4, LM (2, 3, 7) and classifier (5, 6) shapes.

    Checked against mdistiller ``kd_loss`` and torchdistill ``KDLoss``: same KL form and same temperature on both
    logits, but they reduce with batchmean (per-row sum, mean over rows; kdistill: ``masked_mean`` of these rows)
    and multiply by T^2 inside the loss (kdistill: the method, via ``kd_scale``). TRL ``generalized_jsd_loss`` at
    beta = 0 and Liger JSD at beta = 0 give this KL (sum over vocabulary and tokens / number of tokens). DistiLLM's
    and TAID-official's ``forward_kl`` are the cross-entropy form -sum p_t log p_s: same student gradient, value
    larger by the teacher entropy H(p_t).
    """
    _check(name)


@pytest.mark.parametrize("name", _cases("reverse_kl"))
def test_reverse_kl(name):
    """KL(p_s || p_t) per token. Checked against TRL ``generalized_jsd_loss`` at beta = 1 (``F.kl_div(teacher,
    student, log_target=True)``), Liger JSD at beta = 1 and DistiLLM ``reverse_kl`` (which, unlike its forward KL,
    keeps both terms: the full KL). No T^2; reduction by ``masked_mean`` (their token mean)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("generalized_jsd"))
def test_generalized_jsd(name):
    """GKD's JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, at beta 0.1 /
    0.5 / 0.9 (T = 1 and 4) and the end points 0 (forward KL) and 1 (reverse KL).

    Checked against TRL ``GKDTrainer.generalized_jsd_loss`` (mixture via logsumexp of log(1 - beta) + log p_s and
    log(beta) + log p_t, the same weights) and Liger ``LigerJSD`` (M = beta P + (1 - beta) Q with P the teacher).
    Both reduce as a sum over vocabulary and tokens / number of unmasked tokens (= kdistill's ``masked_mean`` of
    the per-token values); TRL divides both logits by the temperature and never applies T^2 (kdistill: the
    method's ``kd_scale``).
    """
    _check(name)


@pytest.mark.parametrize("name", _cases("skew_kl"))
def test_skew_kl(name):
    """Skew KL = KL(p_t || a p_t + (1 - a) p_s), a = 0.1 (T = 1, 4) and a = 0 (= forward KL).

    Checked against DistiLLM ``skewed_forward_kl`` (lam = a on the teacher): same mixture, but DistiLLM returns
    the cross-entropy form -sum p_t log(mix), larger by H(p_t) (see ``test_skew_kl_is_distillm_minus_teacher_entropy``)
    and reduced over label != -100 tokens (kdistill: ``masked_mean``)."""
    _check(name)


def test_skew_kl_is_distillm_minus_teacher_entropy():
    """The documented CE-vs-KL difference, exactly: kdistill's skew KL + H(p_t) == DistiLLM's per-token value."""
    for name in _cases("skew_kl"):
        c = GOLDEN[name]
        s, t = (_decode(x) for x in c["inputs"])
        kw = c["kwargs"]
        got = L.skew_kl(s, t, **kw).double() + L.entropy(t, kd_temperature=kw.get("kd_temperature", 1.0)).double()
        want = R.skew_kl_distillm_ce_form(s.double(), t.double(), **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", _cases("skew_reverse_kl"))
def test_skew_reverse_kl(name):
    """Skew reverse KL = KL(p_s || a p_s + (1 - a) p_t), a = 0.1 and 0. Checked against DistiLLM
    ``skewed_reverse_kl`` (mixture (1 - lam) p_t + lam p_s; it keeps both terms, so the value is the full KL, same
    as here). Reduction over tokens is ``masked_mean``; no temperature in DistiLLM (T = 1), T = 4 divides both."""
    _check(name)


@pytest.mark.parametrize("name", _cases("tvd"))
def test_tvd(name):
    """TVD = 0.5 sum |p_t - p_s| per token. Checked against DistiLLM ``tv_distance`` and TAID-official ``tvd`` (the
    same 0.5 factor, token mean over the mask). Temperature scaling of the gradient is linear (kd_scale power 1),
    applied by the method."""
    _check(name)


@pytest.mark.parametrize("name", _cases("taid"))
def test_taid(name):
    """TAID(t) = KL(softmax(((1 - t) sg(z_s) + t z_t) / T) || softmax(z_s / T)) at t = 0.3 and 1.0
    (t = 1 is forward KL).

    Checked against the TAID authors' code (SakanaAI ``TAID.compute_loss``: ``(1 - t) * logits.detach() + t *
    teacher_logits``, softmax, then their ``forward_kl``): same interpolation in logit space with the student
    detached, but their forward_kl is the cross-entropy form (value larger by the target's entropy, same
    gradient) and has no temperature (T = 1 there; T = 4 here divides the interpolated logits)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("token_selective"))
def test_token_selective(name):
    """TSD-KD direct part: 1[max p_t > max p_s] KL(p_t || p_s) + 0.1 H(p_s) per token; the inputs contain both
    selected and unselected tokens (checked when the golden file was made). No public implementation in our list;
    formula from the paper as documented in ``logits.token_selective`` (selection without gradient)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("uld"))
def test_uld(name):
    """ULD = sum_i |sort(p_s)_i - sort(p_t)_i| (decreasing, the shorter vocabulary zero-padded), Vs = 7 / Vt = 9,
    9 / 7 and 7 / 7. Checked against the ULD authors' code (Nicolas-BZRD llm-recipes ``distillation_model``: softmax
    of each side at its own temperature, sort decreasingly, pad with 0, abs difference summed over the vocabulary).
    Differences: they average over each sequence's answer tokens (truncated to the shorter answer) and then over
    sequences (a mean of means; kdistill's ``masked_mean`` is one mean over all tokens, equal when the answers
    have equal length), and kdistill uses one temperature for both sides. No T^2 (kd_scale power 1, method)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("soft_cross_entropy"))
def test_soft_cross_entropy(name):
    """-sum_v q_v log softmax(z_s / T)_v against given target probabilities (T divides the student only); per row.
    Matches torch's ``cross_entropy`` with probability targets, ``reduction='none'``."""
    _check(name)


@pytest.mark.parametrize("name", _cases("cross_entropy"))
def test_cross_entropy(name):
    """-log softmax(z)_y per row; label -100 rows give 0 (torch ``ignore_index=-100`` with ``reduction='none'``
    gives the same 0 values; the mask is applied by ``masked_mean`` in kdistill, by ``mean`` over non-ignored
    tokens in torch / TRL)."""
    _check(name)


def test_cross_entropy_ignored_rows_are_exactly_zero():
    c = GOLDEN["cross_entropy/lm_ignore"]
    z, y = (_decode(x) for x in c["inputs"])
    z.requires_grad_(True)
    out = L.cross_entropy(z, y)
    ignored = y == -100
    assert (out[ignored] == 0).all()
    out.sum().backward()
    assert (z.grad[ignored] == 0).all() and (z.grad[~ignored] != 0).any()


@pytest.mark.parametrize("name", _cases("entropy"))
def test_entropy(name):
    """Shannon entropy of softmax(z / T) in nats, 0 log 0 = 0 (the H(p_s) term of token_selective)."""
    _check(name)


# ================================================================================ classification.py


@pytest.mark.parametrize("name", _cases("dkd_tckd"))
def test_dkd_tckd(name):
    """DKD target-class term: KL([p_t,y, 1 - p_t,y] || [p_s,y, 1 - p_s,y]) per row, T = 1 and 4.

    Checked against mdistiller ``dkd_loss`` (``cat_mask`` binary distributions, ``F.kl_div(size_average=False) *
    T^2 / batch``): same per-row KL; mdistiller sums, divides by B and multiplies by T^2 and alpha inside the loss
    (kdistill: the method)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("dkd_nckd"))
def test_dkd_nckd(name):
    """DKD non-target term: KL over the non-target classes renormalised. mdistiller removes the target by
    subtracting 1000 from its logit before the softmax (so its target keeps ~e^-1000/T mass); kdistill and this
    reference exclude it exactly. Otherwise as ``test_dkd_tckd`` (batch sum / B, T^2, beta in mdistiller)."""
    _check(name)


def test_dkd_decomposes_classic_kd():
    """KL(p_t || p_s) = TCKD + (1 - p_t,y) NCKD (Zhao et al., 2022, eq. 1), on kdistill's outputs."""
    c = GOLDEN["dkd_tckd/T4"]
    s, t, y = (_decode(x) for x in c["inputs"])
    tckd, nckd = C.dkd_terms(s, t, y, kd_temperature=4.0)
    pt_y = torch.softmax(t.double() / 4.0, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close((tckd.double() + (1 - pt_y) * nckd.double()),
                               L.forward_kl(s, t, kd_temperature=4.0).double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", _cases("dist_inter_class"))
def test_dist_inter_class(name):
    """DIST inter-class: 1 - pearson(p_s[i, :], p_t[i, :]) per example, eps 1e-8 added to the product of norms.
    Checked against the DIST authors' code (hunto ``dist_kd.py``: ``inter_class_relation`` = 1 - mean pearson,
    then ``tau^2 *`` and ``beta *`` in the loss; kdistill: per example, the method applies T^2 and the mean) and
    torchdistill ``DISTLoss`` (same code)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("dist_intra_class"))
def test_dist_intra_class(name):
    """DIST intra-class: 1 - pearson over the batch per class, shape (C,): the authors' ``intra_class_relation``
    (transpose, then the inter-class function) before its mean over classes (kdistill: the method's mean)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("standardized_kl"))
def test_standardized_kl(name):
    """KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)), Z = (z - mean) / (unbiased std + 1e-7). Checked against the
    logit-standardization authors' code (sunshangquan ``normalize`` with ``logit.std`` (unbiased) and ``1e-7 +
    stdv``, then mdistiller's kd_loss: batchmean and T^2 inside, kdistill: the method)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("alpha_divergence"))
def test_alpha_divergence(name):
    """Amari D_alpha(p_t || p_s) = (sum p_t^a p_s^(1-a) - 1) / (a (a - 1)) at a = -0.5, 0.5, 2 (T = 1, 4) and the
    exact end points a = 1 (forward KL) and 0 (reverse KL). No implementation in our list; formula from Amari /
    AlphaNet (Wang et al., 2021), per row, no T^2."""
    _check(name)


@pytest.mark.parametrize("name", _cases("alpha_divergence_clipped"))
def test_alpha_divergence_clipped(name):
    """The clipped form documented in ``classification.alpha_divergence`` (AlphaNet's remedy, Wang et al., 2021):
    w = min((p_t / p_s)^a, clip), value sum p_s (w - 1) / (a (a - 1)) and student gradient -(1/a) sum p_s w grad
    log p_s (a surrogate, not the derivative of the value). The clip is active on some classes only (checked when
    the golden file was made). No implementation in our list."""
    _check(name)


@pytest.mark.parametrize("name", _cases("sinkhorn_distance"))
def test_sinkhorn_distance(name):
    """Entropic OT between the batch of student and teacher predictions, per student row B sum_j P_ij C_ij (mean =
    <P, C>), L1 (eps 0.1, T = 1) and squared-L2 (eps 0.05, T = 4) costs. The reference runs plain Sinkhorn scaling
    to convergence in float64; kdistill stops at a row-marginal error of 1e-6 in float32 and differentiates through
    the unrolled iterations, hence the looser gradient tolerance. Formula from Cui et al., 2024 (SinKD); no
    implementation in our list."""
    _check(name, rtol=1e-4, atol=1e-5, grad_rtol=1e-3, grad_atol=1e-4)


@pytest.mark.parametrize("name", _cases("ofa_loss"))
def test_ofa_loss(name):
    """OFA: -sum_c ((p_t,c + 1[c = y])^eps - 1[c = y]) log p_s,c at eps 1.5 and 1 (= CE against p_t). Same as the
    OFA authors' ``ofa_loss`` (Hao840/OFAKD) per row (they take the batch mean; kdistill: the method)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("guided_targets"))
def test_guided_targets(name):
    """(1 - w) softmax(z_t / T) + w onehot(y), w = 0.3: the soft target of ground-truth-guided self-distillation;
    gradient with respect to the (earlier-copy) teacher logits."""
    _check(name)


@pytest.mark.parametrize("name", _cases("subclass_kl"))
def test_subclass_kl(name):
    """KL between pseudo-subclass distributions p(c, s) = softmax(z / T)_c softmax(a_c)_s (Müller et al., 2020,
    "Subclass Distillation"); gradients to the student's class and within-class logits."""
    _check(name)


@pytest.mark.parametrize("name", _cases("head_gradient_alignment"))
def test_head_gradient_alignment(name):
    """mean_j (g_val,j . g_i) ([h_val,j, 1] . [h_i, 1]): the inner product of last-layer parameter gradients (Ren
    et al., 2018, one-step look-ahead), written here as explicit loops over the rows."""
    _check(name)


# ================================================================================ relations.py


@pytest.mark.parametrize("name", _cases("attention_transfer"))
def test_attention_transfer(name):
    """AT per example: mean_j (Q_s - Q_t)_j^2 with Q = normalize(mean_c |f_c|^p); 2-D maps (same size, and a student
    map twice as large, average-pooled to the teacher's), 1-D maps with p = 1.

    Checked against mdistiller ``single_stage_at_loss`` (``feat.pow(p).mean(1)``, normalize, ``(.)^2.mean()`` over
    batch and positions = the mean of these rows): for odd p mdistiller uses f^p without the absolute value (same
    at the usual p = 2); mdistiller pools whichever map is larger, kdistill always pools (or, when smaller,
    adaptively upsamples) the student to the teacher's size; mdistiller sums the stages with beta = 1000 (method)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("rkd_distance"))
def test_rkd_distance(name):
    """RKD distance per anchor row: sum_{j != i} Huber(d_s/mu_s, d_t/mu_t) / B, mu = mean of the positive
    (off-diagonal) distances; the mean over rows equals the RKD authors' / mdistiller's ``F.smooth_l1_loss(d,
    t_d)`` over the full B x B matrix (their ``_pdist`` with eps 1e-12, diagonal 0). Weight 25 in the method."""
    _check(name)


@pytest.mark.parametrize("name", _cases("rkd_angle"))
def test_rkd_angle(name):
    """RKD angle per row: sum_{j, k} Huber(cos_s, cos_t)[j, i, k] / B^2; the mean over rows equals the RKD authors' /
    mdistiller's smooth_l1 mean over all B^3 entries of ``bmm(normalize(e_j - e_i), ...)`` (zero-length
    differences normalised to 0 vectors: cosine 0 on both sides)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("pkt"))
def test_pkt(name):
    """PKT per anchor row: sum_j p_t log((p_t + 1e-7) / (p_s + 1e-7)) / B, so the mean over rows is mdistiller's /
    the PKT authors' ``torch.mean`` over the B x B matrix. They normalise features by ``norm + eps`` (kdistill and
    this reference by the exact norm: a relative difference of ~1e-7 / |x|, below these tolerances)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("similarity_preserving"))
def test_similarity_preserving(name):
    """SP per row: sum_j (G_s - G_t)_ij^2 / B, G = row-normalised F F^T; the mean over rows is mdistiller's
    ``similarity_loss`` (``(G_diff^2).sum() / bsz^2``)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("nd_loss"))
def test_nd_loss(name):
    """ND per example: 1 - <e_s, c_y/|c_y|> / max(|e_s|, |e_t|), as the ND authors' ``DirectNormLoss`` (which
    averages over the batch; kdistill: the method)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("contrastive_nce"))
def test_contrastive_nce(name):
    """InfoNCE of s_i against t_i among the batch's teacher embeddings and a bank of negatives (with excluded
    entries), tau = 0.07 and 0.5. This is the InfoNCE form of CRD's objective; the CRD authors' code uses NCE with a
    momentum memory bank (a different estimator), so it is pinned to the formula, not to that code."""
    _check(name)


@pytest.mark.parametrize("name", _cases("token_relation"))
def test_token_relation(name):
    """Mean over the T anchor tokens of KL(softmax_row(cos_t / tau) || softmax_row(cos_s / tau)), tau = 0.1 and 0.5
    (token-level relationship graph, Zhang et al., 2023; formula as documented, no implementation in our list)."""
    _check(name)


# ================================================================================ embeddings.py


@pytest.mark.parametrize("name", _cases("embedding_mse"))
def test_embedding_mse(name):
    """mean_D (s - t)^2 per example: the mean over rows is sentence-transformers ``MSELoss`` (``nn.MSELoss()``)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("cosine"))
def test_cosine(name):
    """1 - cos(s, t) per example."""
    _check(name)


@pytest.mark.parametrize("name", _cases("margin_mse"))
def test_margin_mse(name):
    """Margin-MSE: mean over the K negatives of ((s_0 - s_k) - (t_0 - t_k))^2 (Hofstätter et al., 2020; the same
    as sentence-transformers ``MarginMSELoss`` for K = 1)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("listwise_kl"))
def test_listwise_kl(name):
    """KL(softmax(t / T) || softmax(s / T)) per query over its candidates, T = 1 and 4, and with a candidate mask
    that restricts both softmaxes (a row without candidates gives 0)."""
    _check(name)


@pytest.mark.parametrize("name", _cases("token_cosine"))
def test_token_cosine(name):
    """Mean over real tokens of 1 - cos(s_bt, t_bt); padding never counts."""
    _check(name)


@pytest.mark.parametrize("name", _cases("embedding_rkd_distance"))
def test_embedding_rkd_distance(name):
    """The embedding variant of the RKD distance (maskable): distances over their mean across valid pairs, row i =
    mean over its valid partners (B - 1 without a mask). Its normalisation differs from the RKD reference's B^2
    mean (that one is ``relations.rkd_distance``): for the same inputs this value is B / (B - 1) times larger."""
    _check(name)


def test_embedding_rkd_distance_is_b_over_b_minus_1_times_the_reference():
    """The normalisation difference stated above, exactly: without a mask the embedding variant's mean over rows is
    B / (B - 1) times ``relations.rkd_distance``'s (the reference's B^2 mean)."""
    s, t = (_decode(x) for x in GOLDEN["embedding_rkd_distance/b5"]["inputs"])
    b = s.shape[0]
    assert E.rkd_distance(s, t).mean().item() == pytest.approx(REL.rkd_distance(s, t).mean().item() * b / (b - 1),
                                                                rel=1e-5)


@pytest.mark.parametrize("name", _cases("embedding_rkd_angle"))
def test_embedding_rkd_angle(name):
    """The embedding variant of the RKD angle: row j (the vertex) = mean of the Huber terms over its (B - 1)(B - 2)
    triplets with distinct i, k != j, not the reference's mean over all B^3 entries (``relations.rkd_angle``)."""
    _check(name)


# ================================================================================ topk.py


@pytest.mark.parametrize("name", _cases("topk_loss"))
def test_topk_loss(name):
    """Divergences on the (k + 1)-category distributions (the teacher's top-k ids + the exact remaining mass) at
    small k (1, 2, 3), for every top-k divergence, T = 1 and 4 (both sides at the cache temperature).

    Checked against TRL ``DistillationTrainer.generalized_jsd_loss(top_k=k, add_tail=True)``: at beta = 0 the same
    construction (teacher top-k support + a tail bucket log(1 - sum p), then the divergence per token, token mean).
    Differences: TRL picks the student's top k for beta = 1 and the union of both for 0 < beta < 1, kdistill always
    the teacher's (the support must come from an offline teacher cache); with ``add_tail=False`` TRL renormalises
    over the support and drops the tail mass, which kdistill never does."""
    _check(name)


@pytest.mark.parametrize("divergence,kw", [(d, kw) for d, kw in R._TOPK_KW.items()])
@pytest.mark.parametrize("kd_temperature", [1.0, 4.0])
def test_topk_equals_full_divergence_at_k_equal_v(divergence, kw, kd_temperature):
    """As k -> V the coarsened divergence is the full one: at k = V it equals the float64 reference of the full
    divergence (value and gradient)."""
    c = GOLDEN["forward_kl/lm_T1"]
    s, t = (_decode(x) for x in c["inputs"])
    v = s.shape[-1]
    a = s.clone().requires_grad_(True)
    r = s.double().clone().requires_grad_(True)
    got = _topk(a, t, k=v, divergence=divergence, kd_temperature=kd_temperature, **kw)
    ref_kw = dict(kw)
    want = R.TOPK_DIVERGENCES[divergence](r, t.double(), kd_temperature=kd_temperature, **ref_kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-6)


# ================================================================================ -inf logits and masks

_NEG_INF = float("-inf")

#: every vocabulary divergence with its kdistill call and reference (name -> (kdistill, reference, kwargs))
_VOCAB_LOSSES = {
    "forward_kl": (L.forward_kl, R.forward_kl, {}),
    "reverse_kl": (L.reverse_kl, R.reverse_kl, {}),
    "generalized_jsd_0": (L.generalized_jsd, R.generalized_jsd, {"beta": 0.0}),
    "generalized_jsd_0.1": (L.generalized_jsd, R.generalized_jsd, {"beta": 0.1}),
    "generalized_jsd_0.5": (L.generalized_jsd, R.generalized_jsd, {"beta": 0.5}),
    "generalized_jsd_0.9": (L.generalized_jsd, R.generalized_jsd, {"beta": 0.9}),
    "generalized_jsd_1": (L.generalized_jsd, R.generalized_jsd, {"beta": 1.0}),
    "skew_kl_0": (L.skew_kl, R.skew_kl, {"skew": 0.0}),
    "skew_kl_0.1": (L.skew_kl, R.skew_kl, {"skew": 0.1}),
    "skew_reverse_kl_0": (L.skew_reverse_kl, R.skew_reverse_kl, {"skew": 0.0}),
    "skew_reverse_kl_0.1": (L.skew_reverse_kl, R.skew_reverse_kl, {"skew": 0.1}),
    "tvd": (L.tvd, R.tvd, {}),
    "taid_0.3": (_taid, R.taid, {"t_interp": 0.3}),
    "taid_1": (_taid, R.taid, {"t_interp": 1.0}),
    "token_selective": (L.token_selective, R.token_selective, {"entropy_weight": 0.1}),
    "uld": (L.uld, R.uld, {}),
}


def _lm_pair():
    c = GOLDEN["forward_kl/lm_T1"]
    return tuple(_decode(x) for x in c["inputs"])


@pytest.mark.parametrize("loss", list(_VOCAB_LOSSES))
@pytest.mark.parametrize("kd_temperature", [1.0, 4.0])
def test_entry_neg_inf_for_both_models_contributes_exactly_zero(loss, kd_temperature):
    """A vocabulary entry that is -inf for BOTH models (e.g. padding of the vocabulary) contributes exactly 0: the
    value equals the loss on the vocabulary without that entry (kdistill and the float64 reference), and the
    gradient is finite, 0 at that entry and unchanged elsewhere."""
    fn, ref, kw = _VOCAB_LOSSES[loss]
    s, t = _lm_pair()
    drop = 3
    keep = [v for v in range(s.shape[-1]) if v != drop]
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., drop] = _NEG_INF
    t_inf[..., drop] = _NEG_INF
    a = s_inf.clone().requires_grad_(True)
    b = s[..., keep].clone().requires_grad_(True)
    got = fn(a, t_inf, kd_temperature=kd_temperature, **kw)
    reduced = fn(b, t[..., keep], kd_temperature=kd_temperature, **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reduced, rtol=1e-6, atol=1e-7)
    want = ref(s[..., keep].double(), t[..., keep].double(), kd_temperature=kd_temperature, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    w = R.weights_for(tuple(got.shape)).float()
    (got * w).sum().backward()
    (reduced * w).sum().backward()
    assert torch.isfinite(a.grad).all()
    assert (a.grad[..., drop] == 0).all()
    torch.testing.assert_close(a.grad[..., keep], b.grad, rtol=1e-5, atol=1e-7)


def _one_sided_inf(side: str):
    """LM logits where at position (1, 2) entry 4 is -inf for one model only (the other gives it mass)."""
    s, t = _lm_pair()
    s, t = s.clone(), t.clone()
    (s if side == "student" else t)[1, 2, 4] = _NEG_INF
    return s, t


@pytest.mark.parametrize("loss", ["forward_kl", "skew_kl_0", "generalized_jsd_0"])
def test_student_only_neg_inf_under_teacher_mass_raises(loss):
    """forward KL (and skew KL at skew 0, JSD at beta 0) is infinite where the teacher gives mass to an entry the
    student sets to -inf: kdistill raises KDistillError naming the position (DistiLLM / TAID-official mask such
    entries out with ``inf_mask`` and silently drop that mass; TRL returns inf)."""
    fn, _, kw = _VOCAB_LOSSES[loss]
    s, t = _one_sided_inf("student")
    with pytest.raises(KDistillError, match=re.escape("(1, 2)")):
        fn(s.requires_grad_(True), t, **kw)


@pytest.mark.parametrize("loss", ["reverse_kl", "generalized_jsd_1", "skew_reverse_kl_0"])
def test_teacher_only_neg_inf_under_student_mass_raises(loss):
    """reverse KL (JSD at beta 1, skew reverse KL at skew 0) is infinite where the student gives mass to an entry
    the teacher sets to -inf: KDistillError naming the position."""
    fn, _, kw = _VOCAB_LOSSES[loss]
    s, t = _one_sided_inf("teacher")
    with pytest.raises(KDistillError, match=re.escape("(1, 2)")):
        fn(s.requires_grad_(True), t, **kw)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("loss", ["generalized_jsd_0.5", "skew_kl_0.1", "skew_reverse_kl_0.1", "tvd", "taid_0.3"])
def test_bounded_divergences_stay_finite_on_one_sided_neg_inf(loss, side):
    """The mixtures (JSD with 0 < beta < 1, skew > 0), TVD and TAID (whose target is -inf wherever either model is)
    are finite when only one model gives -inf: value equal to the float64 reference, finite gradients."""
    fn, ref, kw = _VOCAB_LOSSES[loss]
    s, t = _one_sided_inf(side)
    a = s.clone().requires_grad_(True)
    got = fn(a, t, **kw)
    want = ref(s.double(), t.double(), **kw)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_masked_mean_ignores_masked_positions_exactly():
    """masked_mean(per_token, mask): masked positions do not count, whatever they hold (even inf / NaN), and get a
    zero gradient; the result is the plain mean over the unmasked ones (the references' sum / number of label !=
    -100 tokens)."""
    s, t = _lm_pair()
    a = s.clone().requires_grad_(True)
    per_token = L.forward_kl(a, t)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    got = masked_mean(per_token, mask)
    want = R.forward_kl(s.double(), t.double())[mask].mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    garbage = per_token.detach().clone()
    garbage[~mask] = torch.tensor([float("inf"), float("nan")])
    assert masked_mean(garbage, mask).item() == pytest.approx(got.item(), rel=0, abs=0)
    got.backward()
    assert (a.grad[~mask] == 0).all() and (a.grad[mask] != 0).any()

    v = torch.tensor([1.0, float("inf"), 3.0], requires_grad=True)
    out = masked_mean(v, torch.tensor([True, False, True]))
    out.backward()
    assert out.item() == 2.0 and v.grad.tolist() == [0.5, 0.0, 0.5]


def test_masked_mean_all_masked_is_zero_not_nan():
    v = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    out = masked_mean(v, torch.zeros(2, 2, dtype=torch.bool))
    assert out.item() == 0.0 and not math.isnan(out.item())
    out.backward()
    assert (v.grad == 0).all()
