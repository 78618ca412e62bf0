"""Reference formulas for every kdistill loss, written from the papers in plain float64 torch, and the table of
conformance cases (inputs, hyper-parameters) that ``make_golden.py`` evaluates into ``golden.json``.

Nothing here imports kdistill: these are the independent definitions the library is checked against.
Every formula is deliberately straightforward (explicit softmaxes, explicit sums, explicit difference
vectors, no log-sum-exp tricks, no fused kernels); numerical care is limited to keeping ``0 log 0 = 0`` and
autograd free of NaN where a probability is exactly 0. Hyper-parameters have the same keyword names as the
kdistill functions, so a case's ``kwargs`` are passed unchanged to both.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------- building blocks


def softmax(z: Tensor) -> Tensor:
    """exp(z_v) / sum_w exp(z_w) over the last axis (max-shifted; ``-inf`` entries give exactly 0)."""
    m = z.max(-1, keepdim=True).values.detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    return e / e.sum(-1, keepdim=True)


def _safe(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` where ``keep``, 1 elsewhere (so a log of it is finite and back-propagates 0 there)."""
    return torch.where(keep, x, torch.ones_like(x))


def kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v log(p_v / q_v) over the last axis, terms with p_v = 0 are 0."""
    pos = p > 0
    terms = torch.where(pos, p * (torch.log(_safe(p, pos)) - torch.log(_safe(q, pos))), torch.zeros_like(p))
    return terms.sum(-1)


def neg_entropy_terms(p: Tensor) -> Tensor:
    pos = p > 0
    return torch.where(pos, p * torch.log(_safe(p, pos)), torch.zeros_like(p))


def shannon_entropy(p: Tensor) -> Tensor:
    return -neg_entropy_terms(p).sum(-1)


def smooth_l1(a: Tensor, b: Tensor) -> Tensor:
    """Huber with beta = 1 (torch's smooth_l1 default): 0.5 d^2 for |d| < 1, |d| - 0.5 otherwise."""
    d = (a - b).abs()
    return torch.where(d < 1.0, 0.5 * d * d, d - 0.5)


def l2_normalize(x: Tensor) -> Tensor:
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


# ---------------------------------------------------------------------------------------------- logits.py


def forward_kl(s: Tensor, t: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    return kl(softmax(t / kd_temperature), softmax(s / kd_temperature))


def reverse_kl(s: Tensor, t: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    return kl(softmax(s / kd_temperature), softmax(t / kd_temperature))


def generalized_jsd(s: Tensor, t: Tensor, *, beta: float, kd_temperature: float = 1.0) -> Tensor:
    """GKD (Agarwal et al., 2024) eq. 1: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s;
    the end points are the limits JSD/beta -> forward KL (beta -> 0) and JSD/(1 - beta) -> reverse KL."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    if beta == 0.0:
        return kl(pt, ps)
    if beta == 1.0:
        return kl(ps, pt)
    m = beta * pt + (1.0 - beta) * ps
    return beta * kl(pt, m) + (1.0 - beta) * kl(ps, m)


def skew_kl(s: Tensor, t: Tensor, *, skew: float, kd_temperature: float = 1.0) -> Tensor:
    """DistiLLM (Ko et al., 2024): KL(p_t || a p_t + (1 - a) p_s)."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    return kl(pt, skew * pt + (1.0 - skew) * ps)


def skew_kl_distillm_ce_form(s: Tensor, t: Tensor, *, skew: float, kd_temperature: float = 1.0) -> Tensor:
    """What DistiLLM's ``skewed_forward_kl`` computes per token: the cross-entropy -sum p_t log(mix), i.e. the
    skew KL plus the teacher entropy H(p_t) (constant for the student)."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    m = skew * pt + (1.0 - skew) * ps
    pos = pt > 0
    return -torch.where(pos, pt * torch.log(_safe(m, pos)), torch.zeros_like(pt)).sum(-1)


def skew_reverse_kl(s: Tensor, t: Tensor, *, skew: float, kd_temperature: float = 1.0) -> Tensor:
    """DistiLLM: KL(p_s || a p_s + (1 - a) p_t)."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    return kl(ps, skew * ps + (1.0 - skew) * pt)


def tvd(s: Tensor, t: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    return 0.5 * (pt - ps).abs().sum(-1)


def taid(s: Tensor, t: Tensor, *, t_interp: float, kd_temperature: float = 1.0) -> Tensor:
    """TAID (Shing et al., 2025): KL(softmax(((1 - t) sg(z_s) + t z_t) / T) || softmax(z_s / T)), where an
    entry that is -inf for either model is -inf in the target."""
    zs = s.detach()
    finite = torch.isfinite(zs) & torch.isfinite(t)
    if t_interp == 1.0:
        mixed = t
    else:
        mixed = torch.where(finite, (1.0 - t_interp) * torch.where(finite, zs, 0.0)
                            + t_interp * torch.where(finite, t, 0.0), torch.full_like(t, float("-inf")))
    return kl(softmax(mixed / kd_temperature), softmax(s / kd_temperature))


def token_selective(s: Tensor, t: Tensor, *, entropy_weight: float, kd_temperature: float = 1.0) -> Tensor:
    """TSD-KD direct part: 1[max p_t > max p_s] KL(p_t || p_s) + entropy_weight H(p_s) (selection without
    gradient)."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    selected = (pt.max(-1).values > ps.detach().max(-1).values).double()
    return selected * kl(pt, ps) + entropy_weight * shannon_entropy(ps)


def token_selection(s: Tensor, t: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    return pt.max(-1).values > ps.max(-1).values


def uld(s: Tensor, t: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """ULD (Boizard et al., 2024): sum_i |sort(p_s)_i - sort(p_t)_i|, sorted decreasingly, the shorter padded with 0."""
    ps = torch.sort(softmax(s / kd_temperature), dim=-1, descending=True).values
    pt = torch.sort(softmax(t / kd_temperature), dim=-1, descending=True).values
    v = max(ps.shape[-1], pt.shape[-1])
    ps = torch.cat([ps, ps.new_zeros(ps.shape[:-1] + (v - ps.shape[-1],))], -1)
    pt = torch.cat([pt, pt.new_zeros(pt.shape[:-1] + (v - pt.shape[-1],))], -1)
    return (ps - pt).abs().sum(-1)


def soft_cross_entropy(s: Tensor, q: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    ps = softmax(s / kd_temperature)
    pos = q > 0
    return -torch.where(pos, q * torch.log(_safe(ps, pos)), torch.zeros_like(q)).sum(-1)


def cross_entropy(s: Tensor, labels: Tensor) -> Tensor:
    """-log softmax(z)_y per row; rows with a negative label (-100) give 0."""
    ps = softmax(s)
    valid = labels >= 0
    picked = ps.gather(-1, torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, -torch.log(picked), torch.zeros_like(picked))


def entropy(s: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    return shannon_entropy(softmax(s / kd_temperature))


# ---------------------------------------------------------------------------------------------- classification.py


def _onehot(labels: Tensor, c: int) -> Tensor:
    return (labels.unsqueeze(-1) == torch.arange(c)).double()


def dkd_tckd(s: Tensor, t: Tensor, labels: Tensor, *, kd_temperature: float) -> Tensor:
    """DKD (Zhao et al., 2022): KL of the binary (target, rest) distributions."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    y = _onehot(labels, s.shape[-1])
    bs = torch.stack([(ps * y).sum(-1), (ps * (1 - y)).sum(-1)], -1)
    bt = torch.stack([(pt * y).sum(-1), (pt * (1 - y)).sum(-1)], -1)
    return kl(bt, bs)


def dkd_nckd(s: Tensor, t: Tensor, labels: Tensor, *, kd_temperature: float) -> Tensor:
    """DKD: KL between the distributions over the non-target classes only (renormalised)."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    rest = 1 - _onehot(labels, s.shape[-1])
    hs = ps * rest / (ps * rest).sum(-1, keepdim=True)
    ht = pt * rest / (pt * rest).sum(-1, keepdim=True)
    return kl(ht, hs)


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.pow(2).sum(dim).sqrt() * b.pow(2).sum(dim).sqrt() + eps)


def dist_inter_class(s: Tensor, t: Tensor, *, kd_temperature: float) -> Tensor:
    """DIST (Huang et al., 2022): 1 - pearson(p_s[i], p_t[i]) per example."""
    return 1.0 - _pearson(softmax(s / kd_temperature), softmax(t / kd_temperature), dim=-1)


def dist_intra_class(s: Tensor, t: Tensor, *, kd_temperature: float) -> Tensor:
    """DIST: 1 - pearson(p_s[:, c], p_t[:, c]) per class, over the batch."""
    return 1.0 - _pearson(softmax(s / kd_temperature), softmax(t / kd_temperature), dim=0)


def _zscore(z: Tensor, eps: float = 1e-7) -> Tensor:
    c = z.shape[-1]
    mean = z.sum(-1, keepdim=True) / c
    std = ((z - mean).pow(2).sum(-1, keepdim=True) / (c - 1)).sqrt()  # unbiased, as the authors' torch.std
    return (z - mean) / (std + eps)


def standardized_kl(s: Tensor, t: Tensor, *, kd_temperature: float) -> Tensor:
    """Logit standardisation (Sun et al., 2024): KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T))."""
    return kl(softmax(_zscore(t) / kd_temperature), softmax(_zscore(s) / kd_temperature))


def alpha_divergence(s: Tensor, t: Tensor, *, alpha: float, kd_temperature: float = 1.0) -> Tensor:
    """Amari: (sum_c p_t^a p_s^(1-a) - 1) / (a (a - 1)); a = 1 forward KL, a = 0 reverse KL."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    if alpha == 1.0:
        return kl(pt, ps)
    if alpha == 0.0:
        return kl(ps, pt)
    return ((pt ** alpha * ps ** (1.0 - alpha)).sum(-1) - 1.0) / (alpha * (alpha - 1.0))


def alpha_divergence_clipped(s: Tensor, t: Tensor, *, alpha: float, importance_clip: float,
                             kd_temperature: float = 1.0) -> Tensor:
    """AlphaNet's clipped form: value sum_c p_s (min(w_c, clip) - 1) / (a (a - 1)) with w = (p_t / p_s)^a, and the
    gradient -(1 / a) sum_c p_s w_clip grad log p_s (the importance-weighted gradient with the weight clipped)."""
    ps, pt = softmax(s / kd_temperature), softmax(t.detach() / kd_temperature)
    w = torch.clamp((pt / ps) ** alpha, max=importance_clip).detach()
    value = (ps.detach() * (w - 1.0)).sum(-1) / (alpha * (alpha - 1.0))
    surrogate = -((ps.detach() * w) * torch.log(ps)).sum(-1) / alpha
    return value + (surrogate - surrogate.detach())


def alpha_importance_clipped(s: Tensor, t: Tensor, *, alpha: float, importance_clip: float,
                             kd_temperature: float = 1.0) -> Tensor:
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    return (pt / ps) ** alpha > importance_clip


def sinkhorn_distance(s: Tensor, t: Tensor, *, kd_temperature: float, epsilon: float, cost: str,
                      iterations: int = 400) -> Tensor:
    """Entropic OT between the batch of student and teacher predictions (Cui et al., 2024): Sinkhorn scaling
    u = a / (K v), v = b / (K^T u), K = exp(-C / eps), uniform marginals, run to convergence; per student row
    B * sum_j P_ij C_ij."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    diff = ps.unsqueeze(1) - pt.unsqueeze(0)
    c = diff.abs().sum(-1) if cost == "l1" else diff.pow(2).sum(-1)
    n, m = c.shape
    k = torch.exp(-c / epsilon)
    a, b = torch.full((n,), 1.0 / n, dtype=c.dtype), torch.full((m,), 1.0 / m, dtype=c.dtype)
    v = torch.ones(m, dtype=c.dtype)
    for _ in range(iterations):
        u = a / (k @ v)
        v = b / (k.T @ u)
    plan = u.unsqueeze(1) * k * v.unsqueeze(0)
    return (plan * c).sum(1) * n


def ofa_loss(s: Tensor, t: Tensor, labels: Tensor, *, eps: float, kd_temperature: float = 1.0) -> Tensor:
    """OFA (Hao et al., 2023): -sum_c ((p_t,c + 1[c = y])^eps - 1[c = y]) log p_s,c."""
    ps, pt = softmax(s / kd_temperature), softmax(t / kd_temperature)
    y = _onehot(labels, s.shape[-1])
    w = (pt + y) ** eps - y
    return -(w * torch.log(ps)).sum(-1)


def guided_targets(t: Tensor, labels: Tensor, *, label_weight: float, kd_temperature: float = 1.0) -> Tensor:
    """(1 - w) softmax(z_t / T) + w onehot(y)."""
    return (1.0 - label_weight) * softmax(t / kd_temperature) + label_weight * _onehot(labels, t.shape[-1])


def subclass_kl(zs: Tensor, as_: Tensor, zt: Tensor, at: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """KL over C x S pseudo-subclasses with p(c, s) = softmax(z / T)_c softmax(a_c)_s."""
    ps = (softmax(zs / kd_temperature).unsqueeze(-1) * softmax(as_)).flatten(1)
    pt = (softmax(zt / kd_temperature).unsqueeze(-1) * softmax(at)).flatten(1)
    return kl(pt, ps)


def head_gradient_alignment(h_tr: Tensor, g_tr: Tensor, h_va: Tensor, g_va: Tensor) -> Tensor:
    """<grad_[W,b] l_val, grad_[W,b] l_i> for z = W h + b: mean_j (g_j . g_i) ([h_j, 1] . [h_i, 1]),
    per training row."""
    out = []
    for i in range(h_tr.shape[0]):
        terms = [(g_va[j] * g_tr[i]).sum() * ((h_va[j] * h_tr[i]).sum() + 1.0) for j in range(h_va.shape[0])]
        out.append(torch.stack(terms).mean())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- relations.py


def _attention_map(f: Tensor, p: float) -> Tensor:
    return l2_normalize(f.abs().pow(p).mean(1).flatten(1))


def attention_transfer(s: Tensor, t: Tensor, *, p: float = 2.0) -> Tensor:
    """AT (Zagoruyko & Komodakis, 2017): mean_j (Q_s - Q_t)_j^2 of the L2-normalised maps mean_c |f_c|^p; a
    larger student map is average-pooled to the teacher's size first (integer factor here: block means)."""
    if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
        fh, fw = s.shape[2] // t.shape[2], s.shape[3] // t.shape[3]
        s = s.reshape(s.shape[0], s.shape[1], t.shape[2], fh, t.shape[3], fw).mean((3, 5))
    return (_attention_map(s, p) - _attention_map(t, p)).pow(2).mean(1)


def _pdist(x: Tensor, eps: float = 1e-12) -> Tensor:
    """The RKD reference's pdist from explicit difference vectors: sqrt(max(|x_i - x_j|^2, eps)), diagonal 0."""
    sq = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)
    return torch.clamp(sq, min=eps).sqrt() * (1 - torch.eye(len(x), dtype=x.dtype))


def rkd_distance(s: Tensor, t: Tensor) -> Tensor:
    """Row i of the reference's (B, B) Huber matrix (distances over their mean positive entry), summed / B:
    the mean over rows is F.smooth_l1_loss over all B^2 entries (RKD authors' code, mdistiller)."""
    ds, dt = _pdist(s), _pdist(t)
    ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()
    return smooth_l1(ds, dt).sum(1) / s.shape[0]


def triplet_cosines(x: Tensor) -> Tensor:
    """[j, i, k] = <u_ji, u_jk>, u_ji = (x_i - x_j) / |x_i - x_j|, and a zero difference normalised to 0."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # [j, i] = x_i - x_j
    sq = diff.pow(2).sum(-1)
    pos = sq > 0
    unit = torch.where(pos.unsqueeze(-1), diff / _safe(sq, pos).sqrt().unsqueeze(-1), torch.zeros_like(diff))
    return torch.einsum("jid,jkd->jik", unit, unit)


def rkd_angle(s: Tensor, t: Tensor) -> Tensor:
    """Huber over all B^3 triplet cosines (reference: smooth_l1 mean over them); row i sums over j, k, / B^2."""
    return smooth_l1(triplet_cosines(s), triplet_cosines(t)).sum((0, 2)) / s.shape[0] ** 2


def pkt(s: Tensor, t: Tensor, *, eps: float = 1e-7) -> Tensor:
    """PKT (Passalis & Tefas, 2018): row i = sum_j p_t(j|i) log((p_t + eps) / (p_s + eps)) / B, so the mean over
    rows is the reference's torch.mean over the B x B matrix."""

    def cond(x):
        x = l2_normalize(x.flatten(1))
        k = (x @ x.T + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ps, pt = cond(s), cond(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).sum(1) / s.shape[0]


def similarity_preserving(s: Tensor, t: Tensor) -> Tensor:
    """SP (Tung & Mori, 2019): G = row-L2-normalised F F^T; row i = sum_j (G_s - G_t)_ij^2 / B, so the mean over rows
    is ||G_s - G_t||_F^2 / B^2."""
    gs = l2_normalize(s.flatten(1) @ s.flatten(1).T)
    gt = l2_normalize(t.flatten(1) @ t.flatten(1).T)
    return (gs - gt).pow(2).sum(1) / s.shape[0]


def nd_loss(s: Tensor, t: Tensor, class_means: Tensor, labels: Tensor) -> Tensor:
    """ND (Wang et al., 2023): 1 - <e_s, c_y / |c_y|> / max(|e_s|, |e_t|)."""
    c = l2_normalize(class_means[labels])
    norm_s, norm_t = s.pow(2).sum(1).sqrt(), t.pow(2).sum(1).sqrt()
    return 1.0 - (s * c).sum(1) / torch.maximum(norm_s, norm_t)


def contrastive_nce(s: Tensor, t: Tensor, negatives: Tensor | None = None, exclude: Tensor | None = None, *,
                    nce_temperature: float = 0.07) -> Tensor:
    """InfoNCE: -log( exp(<s_i, t_i>/tau) / (sum_j exp(<s_i, t_j>/tau) + sum_k exp(<s_i, n_k>/tau)) ), unit vectors,
    negatives with exclude[i, k] dropped from row i's denominator."""
    s, t = l2_normalize(s), l2_normalize(t)
    out = []
    for i in range(s.shape[0]):
        pos = torch.exp((s[i] * t[i]).sum() / nce_temperature)
        denom = sum(torch.exp((s[i] * t[j]).sum() / nce_temperature) for j in range(t.shape[0]))
        if negatives is not None:
            n = l2_normalize(negatives)
            for k in range(n.shape[0]):
                if exclude is None or not bool(exclude[i, k]):
                    denom = denom + torch.exp((s[i] * n[k]).sum() / nce_temperature)
        out.append(-torch.log(pos / denom))
    return torch.stack(out)


def token_relation(s: Tensor, t: Tensor, *, relation_temperature: float = 0.1) -> Tensor:
    """Token relation graph: mean over anchor tokens of KL(softmax_row(cos_t / tau) || softmax_row(cos_s / tau))."""

    def graph(x):
        x = l2_normalize(x)
        return softmax(x @ x.transpose(1, 2) / relation_temperature)

    return kl(graph(t), graph(s)).mean(-1)


# ---------------------------------------------------------------------------------------------- embeddings.py


def embedding_mse(s: Tensor, t: Tensor) -> Tensor:
    return (s - t).pow(2).mean(1)


def cosine(s: Tensor, t: Tensor) -> Tensor:
    return 1.0 - (s * t).sum(-1) / (s.pow(2).sum(-1).sqrt() * t.pow(2).sum(-1).sqrt())


def margin_mse(s: Tensor, t: Tensor) -> Tensor:
    """Margin-MSE (Hofstätter et al., 2020): mean_k ((s_0 - s_k) - (t_0 - t_k))^2."""
    return ((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])).pow(2).mean(1)


def listwise_kl(s: Tensor, t: Tensor, candidate_mask: Tensor | None = None, *, kd_temperature: float = 1.0) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) per row over the candidates that count (both softmaxes restricted)."""
    out = []
    for i in range(s.shape[0]):
        keep = torch.ones(s.shape[1], dtype=torch.bool) if candidate_mask is None else candidate_mask.expand_as(s)[i]
        if not bool(keep.any()):
            out.append(s.new_zeros(()))
            continue
        out.append(kl(softmax(t[i][keep] / kd_temperature), softmax(s[i][keep] / kd_temperature)))
    return torch.stack(out)


def token_cosine(s: Tensor, t: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens of 1 - cos(s_bt, t_bt); 0 for a row without real tokens."""
    per = 1.0 - (s * t).sum(-1) / (s.pow(2).sum(-1).sqrt() * t.pow(2).sum(-1).sqrt())
    m = attention_mask.bool()
    return torch.where(m, per, torch.zeros_like(per)).sum(1) / m.sum(1).clamp_min(1)


def embedding_rkd_distance(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """The embedding variant: distances over their mean across the valid pairs (i != j, both unmasked), row i =
    mean over its valid partners of the Huber terms (not the classic reference's B^2 mean)."""
    b = s.shape[0]
    valid = ~torch.eye(b, dtype=torch.bool)
    if mask is not None:
        valid = valid & mask[:, None] & mask[None, :]
    ds, dt = _pdist(s), _pdist(t)
    ds, dt = ds / ds[valid].mean(), dt / dt[valid].mean()
    h = torch.where(valid, smooth_l1(ds, dt), torch.zeros_like(ds))
    return h.sum(1) / valid.sum(1).clamp_min(1)


def embedding_rkd_angle(s: Tensor, t: Tensor) -> Tensor:
    """The embedding variant: row j (the vertex) = mean of the Huber terms over its (B - 1)(B - 2) triplets with
    distinct i, k != j."""
    b = s.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    valid = (~eye)[:, :, None] & (~eye)[:, None, :] & (~eye)[None]
    h = torch.where(valid, smooth_l1(triplet_cosines(s), triplet_cosines(t)), torch.zeros(b, b, b, dtype=s.dtype))
    return h.sum((1, 2)) / valid.sum((1, 2))


# ---------------------------------------------------------------------------------------------- topk.py


def topk_coarse(logits: Tensor, index: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """(k + 1)-category distribution: p at the given ids and the exact remaining mass (sum over the other ids)."""
    p = softmax(logits / kd_temperature)
    picked = p.gather(-1, index)
    rest = (p * (1 - torch.zeros_like(p).scatter(-1, index, 1.0))).sum(-1, keepdim=True)
    return torch.cat([picked, rest], -1)


def teacher_topk_index(t: Tensor, k: int, *, kd_temperature: float = 1.0) -> Tensor:
    return torch.argsort(softmax(t / kd_temperature), dim=-1, descending=True)[..., :k]


TOPK_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "generalized_jsd": generalized_jsd, "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl, "tvd": tvd, "taid": taid, "token_selective": token_selective,
}


def topk_loss(s: Tensor, t: Tensor, *, k: int, divergence: str, kd_temperature: float = 1.0, **kw) -> Tensor:
    """The divergence between the coarsened (top-k of the teacher + rest) distributions; their logs are passed as
    logits at T = 1 (a log-softmax of log-probabilities returns them unchanged)."""
    idx = teacher_topk_index(t, k, kd_temperature=kd_temperature)
    cs = topk_coarse(s, idx, kd_temperature=kd_temperature)
    ct = topk_coarse(t, idx, kd_temperature=kd_temperature)
    return TOPK_DIVERGENCES[divergence](torch.log(cs), torch.log(ct), kd_temperature=1.0, **kw)


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One conformance case: ``family`` (which kdistill function; one test function each), the reference
    formula, a builder of the inputs from a torch.Generator, the keyword arguments (same names for kdistill and
    the reference) and the indices of the inputs that get gradients (the student's)."""

    family: str
    ref: Callable[..., Tensor]
    build: Callable[[torch.Generator], list[Tensor]]
    kwargs: dict = field(default_factory=dict)
    grad: tuple[int, ...] = (0,)


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=g) * scale).float()


def _lm(g, vs=7, vt=7, scale=2.0):
    return [_randn(g, 2, 3, vs, scale=scale), _randn(g, 2, 3, vt, scale=scale)]


def _cls(g, b=5, c=6, scale=2.0):
    return [_randn(g, b, c, scale=scale), _randn(g, b, c, scale=scale)]


def _cls_labels(g, b=5, c=6, scale=2.0):
    return _cls(g, b, c, scale) + [torch.randint(0, c, (b,), generator=g)]


def _feat(g, b=5, ds=4, dt=6):
    return [_randn(g, b, ds), _randn(g, b, dt)]


CASES: dict[str, Case] = {}


def _add(name: str, case: Case) -> None:
    assert name not in CASES, name
    CASES[name] = case


# logits.py ---------------------------------------------------------------------------------------------------------
for T in (1.0, 4.0):
    tag = f"T{int(T)}"
    _add(f"forward_kl/lm_{tag}", Case("forward_kl", forward_kl, _lm, {"kd_temperature": T}))
    _add(f"forward_kl/cls_{tag}", Case("forward_kl", forward_kl, _cls, {"kd_temperature": T}))
    _add(f"reverse_kl/lm_{tag}", Case("reverse_kl", reverse_kl, _lm, {"kd_temperature": T}))
    _add(f"tvd/lm_{tag}", Case("tvd", tvd, _lm, {"kd_temperature": T}))
    _add(f"skew_kl/lm_skew0.1_{tag}", Case("skew_kl", skew_kl, _lm, {"skew": 0.1, "kd_temperature": T}))
    _add(f"skew_reverse_kl/lm_skew0.1_{tag}",
         Case("skew_reverse_kl", skew_reverse_kl, _lm, {"skew": 0.1, "kd_temperature": T}))
    _add(f"token_selective/lm_{tag}",
         Case("token_selective", token_selective, lambda g: _lm(g, scale=3.0),
              {"entropy_weight": 0.1, "kd_temperature": T}))
    _add(f"uld/lm_vs7_vt9_{tag}", Case("uld", uld, lambda g: _lm(g, 7, 9), {"kd_temperature": T}))
    _add(f"soft_cross_entropy/{tag}",
         Case("soft_cross_entropy", soft_cross_entropy,
              lambda g: [_randn(g, 5, 6, scale=2.0), torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64),
                                                                    -1).float()],
              {"kd_temperature": T}))
    _add(f"entropy/{tag}", Case("entropy", entropy, lambda g: [_randn(g, 2, 3, 7, scale=2.0)], {"kd_temperature": T}))
    for beta in (0.1, 0.5, 0.9):
        _add(f"generalized_jsd/lm_beta{beta}_{tag}",
             Case("generalized_jsd", generalized_jsd, _lm, {"beta": beta, "kd_temperature": T}))
    for t_interp in (0.3, 1.0):
        _add(f"taid/lm_t{t_interp}_{tag}", Case("taid", taid, _lm, {"t_interp": t_interp, "kd_temperature": T}))
for beta in (0.0, 1.0):
    _add(f"generalized_jsd/lm_beta{beta}_T1", Case("generalized_jsd", generalized_jsd, _lm, {"beta": beta}))
_add("skew_kl/lm_skew0_T1", Case("skew_kl", skew_kl, _lm, {"skew": 0.0}))
_add("skew_reverse_kl/lm_skew0_T1", Case("skew_reverse_kl", skew_reverse_kl, _lm, {"skew": 0.0}))
_add("uld/lm_vs9_vt7_T1", Case("uld", uld, lambda g: _lm(g, 9, 7)))
_add("uld/lm_vs7_vt7_T1", Case("uld", uld, _lm))
_add("cross_entropy/lm_ignore",
     Case("cross_entropy", cross_entropy,
          lambda g: [_randn(g, 2, 3, 7, scale=2.0), torch.tensor([[1, -100, 4], [0, 6, -100]])]))
_add("cross_entropy/cls", Case("cross_entropy", cross_entropy, lambda g: [_randn(g, 5, 6, scale=2.0),
                                                                         torch.randint(0, 6, (5,), generator=g)]))

# classification.py ---------------------------------------------------------------------------------------------------
for T in (1.0, 4.0):
    tag = f"T{int(T)}"
    _add(f"dkd_tckd/{tag}", Case("dkd_tckd", dkd_tckd, _cls_labels, {"kd_temperature": T}))
    _add(f"dkd_nckd/{tag}", Case("dkd_nckd", dkd_nckd, _cls_labels, {"kd_temperature": T}))
    _add(f"dist_inter_class/{tag}", Case("dist_inter_class", dist_inter_class, _cls, {"kd_temperature": T}))
    _add(f"dist_intra_class/{tag}", Case("dist_intra_class", dist_intra_class, _cls, {"kd_temperature": T}))
    _add(f"standardized_kl/{tag}", Case("standardized_kl", standardized_kl, _cls, {"kd_temperature": T}))
    _add(f"alpha_divergence/alpha0.5_{tag}",
         Case("alpha_divergence", alpha_divergence, _cls, {"alpha": 0.5, "kd_temperature": T}))
    _add(f"ofa_loss/eps1.5_{tag}", Case("ofa_loss", ofa_loss, _cls_labels, {"eps": 1.5, "kd_temperature": T}))
    _add(f"guided_targets/{tag}",
         Case("guided_targets", guided_targets,
              lambda g: [_randn(g, 5, 6, scale=2.0), torch.randint(0, 6, (5,), generator=g)],
              {"label_weight": 0.3, "kd_temperature": T}))
    _add(f"subclass_kl/{tag}",
         Case("subclass_kl", subclass_kl,
              lambda g: [_randn(g, 4, 3, scale=2.0), _randn(g, 4, 3, 2), _randn(g, 4, 3, scale=2.0),
                         _randn(g, 4, 3, 2)],
              {"kd_temperature": T}, grad=(0, 1)))
for alpha in (-0.5, 0.0, 1.0, 2.0):
    _add(f"alpha_divergence/alpha{alpha}_T1", Case("alpha_divergence", alpha_divergence, _cls, {"alpha": alpha}))
_add("alpha_divergence_clipped/alpha-1_clip1.5_T1",
     Case("alpha_divergence_clipped", alpha_divergence_clipped, _cls, {"alpha": -1.0, "importance_clip": 1.5}))
_add("alpha_divergence_clipped/alpha0.5_clip1.2_T4",
     Case("alpha_divergence_clipped", alpha_divergence_clipped, lambda g: _cls(g, scale=6.0),
          {"alpha": 0.5, "importance_clip": 1.2, "kd_temperature": 4.0}))
_add("ofa_loss/eps1.0_T1", Case("ofa_loss", ofa_loss, _cls_labels, {"eps": 1.0}))
_add("sinkhorn_distance/l1_T1", Case("sinkhorn_distance", sinkhorn_distance, _cls,
                                     {"kd_temperature": 1.0, "epsilon": 0.1, "cost": "l1"}))
_add("sinkhorn_distance/l2_T4", Case("sinkhorn_distance", sinkhorn_distance, lambda g: _cls(g, scale=6.0),
                                     {"kd_temperature": 4.0, "epsilon": 0.05, "cost": "l2"}))
_add("head_gradient_alignment/basic",
     Case("head_gradient_alignment", head_gradient_alignment,
          lambda g: [_randn(g, 4, 3), _randn(g, 4, 5), _randn(g, 3, 3), _randn(g, 3, 5)], grad=(1,)))

# relations.py --------------------------------------------------------------------------------------------------------
_add("attention_transfer/2d_same_size",
     Case("attention_transfer", attention_transfer, lambda g: [_randn(g, 4, 3, 4, 4), _randn(g, 4, 5, 4, 4)]))
_add("attention_transfer/2d_student_pooled",
     Case("attention_transfer", attention_transfer, lambda g: [_randn(g, 4, 3, 8, 8), _randn(g, 4, 5, 4, 4)]))
_add("attention_transfer/1d_p1",
     Case("attention_transfer", attention_transfer, lambda g: [_randn(g, 4, 3, 6), _randn(g, 4, 2, 6)], {"p": 1.0}))
_add("rkd_distance/b5", Case("rkd_distance", rkd_distance, _feat))
_add("rkd_angle/b5", Case("rkd_angle", rkd_angle, _feat))
_add("pkt/b5", Case("pkt", pkt, _feat))
_add("pkt/b6_4d_features", Case("pkt", pkt, lambda g: [_randn(g, 6, 2, 2, 2), _randn(g, 6, 5)]))
_add("similarity_preserving/b5", Case("similarity_preserving", similarity_preserving, _feat))
_add("nd_loss/b5", Case("nd_loss", nd_loss,
                        lambda g: [_randn(g, 5, 4), _randn(g, 5, 4), _randn(g, 3, 4),
                                   torch.randint(0, 3, (5,), generator=g)]))
_add("contrastive_nce/in_batch_tau0.07",
     Case("contrastive_nce", contrastive_nce, lambda g: [_randn(g, 5, 4), _randn(g, 5, 4)], {"nce_temperature": 0.07}))
_add("contrastive_nce/negatives_exclude_tau0.5",
     Case("contrastive_nce", contrastive_nce,
          lambda g: [_randn(g, 5, 4), _randn(g, 5, 4), _randn(g, 4, 4),
                     torch.tensor([[True, False, False, False], [False, False, False, False],
                                   [False, False, True, True], [False, False, False, False],
                                   [False, True, False, False]])],
          {"nce_temperature": 0.5}))
for tau in (0.1, 0.5):
    _add(f"token_relation/tau{tau}", Case("token_relation", token_relation,
                                          lambda g: [_randn(g, 2, 4, 5), _randn(g, 2, 4, 7)],
                                          {"relation_temperature": tau}))

# embeddings.py -------------------------------------------------------------------------------------------------------
_add("embedding_mse/b5", Case("embedding_mse", embedding_mse, lambda g: [_randn(g, 5, 6), _randn(g, 5, 6)]))
_add("cosine/b5", Case("cosine", cosine, lambda g: [_randn(g, 5, 6), _randn(g, 5, 6)]))
_add("margin_mse/b4_k3", Case("margin_mse", margin_mse,
                              lambda g: [_randn(g, 4, 4, scale=3.0), _randn(g, 4, 4, scale=3.0)]))
for T in (1.0, 4.0):
    _add(f"listwise_kl/T{int(T)}", Case("listwise_kl", listwise_kl, lambda g: [_randn(g, 4, 5, scale=2.0),
                                                                               _randn(g, 4, 5, scale=2.0)],
                                        {"kd_temperature": T}))
_add("listwise_kl/candidate_mask_T1",
     Case("listwise_kl", listwise_kl,
          lambda g: [_randn(g, 4, 5, scale=2.0), _randn(g, 4, 5, scale=2.0),
                     torch.tensor([[True, True, False, True, True], [True, False, False, True, True],
                                   [False, False, False, False, False], [True, True, True, True, True]])]))
_add("token_cosine/masked",
     Case("token_cosine", token_cosine,
          lambda g: [_randn(g, 2, 4, 5), _randn(g, 2, 4, 5),
                     torch.tensor([[True, True, True, False], [True, False, False, False]])]))
_add("embedding_rkd_distance/b5", Case("embedding_rkd_distance", embedding_rkd_distance, _feat))
_add("embedding_rkd_distance/b6_mask",
     Case("embedding_rkd_distance", embedding_rkd_distance,
          lambda g: _feat(g, b=6) + [torch.tensor([True, True, False, True, True, True])]))
_add("embedding_rkd_angle/b5", Case("embedding_rkd_angle", embedding_rkd_angle, _feat))

# topk.py -------------------------------------------------------------------------------------------------------------
_TOPK_KW = {"forward_kl": {}, "reverse_kl": {}, "generalized_jsd": {"beta": 0.5}, "skew_kl": {"skew": 0.1},
            "skew_reverse_kl": {"skew": 0.1}, "tvd": {}, "taid": {"t_interp": 0.3},
            "token_selective": {"entropy_weight": 0.1}}
for div, kw in _TOPK_KW.items():
    _add(f"topk_loss/{div}_k2_T1", Case("topk_loss", topk_loss, _lm, {"k": 2, "divergence": div, **kw}))
_add("topk_loss/forward_kl_k3_T4", Case("topk_loss", topk_loss, _lm, {"k": 3, "divergence": "forward_kl",
                                                                      "kd_temperature": 4.0}))
_add("topk_loss/reverse_kl_k1_T4", Case("topk_loss", topk_loss, _lm, {"k": 1, "divergence": "reverse_kl",
                                                                      "kd_temperature": 4.0}))


# ---------------------------------------------------------------------------------------------- evaluation


def weights_for(shape: tuple[int, ...]) -> Tensor:
    """The fixed, distinct weights w of the scalar sum(w * loss) whose gradient is pinned (distinct weights make a
    gradient that mixes up rows or positions visible)."""
    n = 1
    for d in shape:
        n *= d
    return (0.5 + torch.arange(n, dtype=torch.float64) / max(n, 1)).reshape(shape)


def as_reference_inputs(inputs: list[Tensor], grad: tuple[int, ...]) -> list[Tensor]:
    """float inputs -> float64 (exactly the stored float32 values), leaf tensors with requires_grad at ``grad``."""
    out = []
    for i, x in enumerate(inputs):
        if x.is_floating_point():
            x = x.double().clone().requires_grad_(i in grad)
        out.append(x)
    return out


def evaluate_reference(case: Case, inputs: list[Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    """The reference value (float64) and the gradients of sum(weights_for(value.shape) * value) at ``case.grad``."""
    xs = as_reference_inputs(inputs, case.grad)
    value = case.ref(*xs, **case.kwargs)
    (value * weights_for(tuple(value.shape))).sum().backward()
    return value.detach(), {i: xs[i].grad.detach() for i in case.grad}
