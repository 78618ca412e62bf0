"""Feature- and relation-based losses of the classic-KD zoo (pure functions).

Student first, teacher second, keyword-only hyper-parameters, fp32 inside. Per-example losses return
``(B,)``; relation losses (defined over pairs or triplets of a batch) return one value per *anchor row*
of the relation matrix, ``(B,)``, so that ``.mean()`` is the paper's batch loss. Relation losses compare
the student and teacher through batch geometry, so their feature widths may differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError


def _same_batch(s: Tensor, t: Tensor, name: str) -> None:
    if s.shape[0] != t.shape[0]:
        raise KDistillError(
            f"{name}: student batch {s.shape[0]} vs teacher batch {t.shape[0]}; expected the same examples "
            "in the same order."
        )


def _min_batch(x: Tensor, n: int, name: str) -> None:
    if x.shape[0] < n:
        raise KDistillError(f"{name}: got a batch of {x.shape[0]}, expected at least {n} examples (a relation "
                            "loss compares examples with each other). Increase the batch size.")


# ---------------------------------------------------------------------------------------------- attention transfer


def attention_map(features: Tensor, *, p: float = 2.0) -> Tensor:
    """Spatial attention map of AT: ``normalize(mean_c |f_c|^p)`` flattened, shape ``(B, H*W)`` (or
    ``(B, L)`` for 1-D maps). Needs ``(B, C, *spatial)`` features."""
    if features.dim() < 3:
        raise KDistillError(
            f"attention_map: got features of shape {tuple(features.shape)}, expected (B, C, L) or (B, C, H, W). "
            "Hook a convolutional stage (e.g. 'blocks.1' of the `cnn` model), not a flat vector."
        )
    a = features.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def attention_transfer(student_features: Tensor, teacher_features: Tensor, *, p: float = 2.0) -> Tensor:
    """Attention transfer, per example: ``mean_j (Q_s,j - Q_t,j)^2`` of the normalised attention maps,
    shape ``(B,)``.

    Zagoruyko & Komodakis, 2017, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer". Channel counts may differ; when the spatial
    sizes differ the student map is adaptively average-pooled to the teacher's size first.
    """
    _same_batch(student_features, teacher_features, "attention_transfer")
    s, t = student_features, teacher_features
    if s.dim() != t.dim():
        raise KDistillError(f"attention_transfer: student rank {s.dim()} vs teacher rank {t.dim()}; expected both "
                            "(B, C, L) or both (B, C, H, W).")
    if s.dim() >= 3 and tuple(s.shape[2:]) != tuple(t.shape[2:]):
        pool = F.adaptive_avg_pool1d if s.dim() == 3 else F.adaptive_avg_pool2d
        s = pool(s.float(), t.shape[2] if s.dim() == 3 else tuple(t.shape[2:]))
    return (attention_map(s, p=p) - attention_map(t, p=p)).pow(2).mean(1)


# ---------------------------------------------------------------------------------------------- RKD


def _pairwise_dist(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``(B, D) -> (B, B)`` float32 Euclidean distances ``sqrt(max(|x_i - x_j|^2, eps))``, 0 on the diagonal (the
    reference's ``pdist``). The Gram-form subtraction runs in float64 on centred features: in float32 it cancels
    for a near-duplicate pair (relative errors ~1e-3 in that pair's distance at feature norm ~5)."""
    x64 = x.double()
    x64 = x64 - x64.mean(0, keepdim=True)
    sq = x64.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * x64 @ x64.t()).clamp_min(eps)
    d = d2.sqrt().to(x.dtype)
    return d * (1.0 - torch.eye(len(x), device=x.device, dtype=x.dtype))


def rkd_distance(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """RKD distance-wise loss per anchor row, shape ``(B,)``: Huber (smooth L1, ``beta = 1``) between the
    pairwise Euclidean distances of student and of teacher embeddings, each divided by its mean
    off-diagonal distance (so the scale of either space does not matter).

    Normalisation (the reference's): row ``i`` is ``sum_{j != i} Huber(d_s,ij / mu_s, d_t,ij / mu_t) / B``, so
    ``.mean()`` over rows is the mean over all ``B^2`` entries of the ``B x B`` matrix (diagonal 0 on both
    sides), exactly ``F.smooth_l1_loss(d_s, d_t)`` of the RKD authors' code and of mdistiller, for which
    the usual weight 25 was tuned. ``mu`` is the mean of the ``B (B - 1)`` off-diagonal distances (the
    reference's mean of the positive entries; its ``eps = 1e-12`` clamp on squared distances is kept).

    Park et al., 2019, "Relational Knowledge Distillation".
    """
    _same_batch(student_features, teacher_features, "rkd_distance")
    _min_batch(student_features, 2, "rkd_distance")
    s = student_features.float().flatten(1)
    t = teacher_features.float().flatten(1)
    n = len(s)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    ds, dt = _pairwise_dist(s), _pairwise_dist(t)
    ds = ds / ds[off].mean().clamp_min(1e-12)
    dt = dt / dt[off].mean().clamp_min(1e-12)
    huber = F.smooth_l1_loss(ds, dt, reduction="none")
    return (huber * off).sum(1) / n


def triplet_cosines(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B, B)`` float32: ``[j, i, k]`` = cos of the angle at ``x_j`` between ``x_i - x_j`` and
    ``x_k - x_j`` (0 where a difference vector is zero).

    By the law of cosines from squared pairwise distances: ``(B, B, B)`` work instead of materialising the
    ``(B, B, D)`` difference vectors (``D`` is often thousands for flattened feature maps). Everything up to
    the cosines is float64: the centred Gram matrix, the squared distances, the law-of-cosines subtraction
    ``(|a|^2 + |b|^2 - |a - b|^2) / 2`` (which cancels catastrophically for a near-duplicate pair, where
    ``|x_i - x_j|`` is tiny next to the other two distances) and the products with the inverse norms; only the
    finished cosines are cast to float32. With the subtraction in float32, a near-duplicate pair at
    embedding scale 100 gave cosines off by ~3e-3 and gradients off by ~1%.
    """
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    g = x @ x.T
    diag = g.diagonal()
    sq = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * g).clamp_min(0.0)  # |x_i - x_j|^2
    # 1 / |x_i - x_j|, 0 on the diagonal (a zero vector has no direction; no NaN gradient through sqrt(0))
    inv = torch.where(sq > 1e-24, sq.clamp_min(1e-24).rsqrt(), torch.zeros_like(sq))
    dots = 0.5 * (sq.unsqueeze(2) + sq.unsqueeze(1) - sq.unsqueeze(0))  # [j, i, k] = <x_i - x_j, x_k - x_j>
    return (dots * inv.unsqueeze(2) * inv.unsqueeze(1)).float()


def rkd_angle(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """RKD angle-wise loss per anchor row, shape ``(B,)``: Huber (smooth L1, ``beta = 1``) between the cosines
    of the angles ``<(e_i - e_j), (e_k - e_j)>`` (unit vectors) formed by every triplet, in student vs teacher
    space. Invariant to translation, rotation and scale of either embedding. Park et al., 2019.

    Normalisation (the reference's): with ``h[j, i, k]`` the Huber term of the angle at vertex ``j``, row ``i``
    is ``sum_{j, k} h[j, i, k] / B^2``, so ``.mean()`` over rows is the mean over all ``B^3`` triplet entries,
    exactly ``F.smooth_l1_loss(s_angle, t_angle)`` of the RKD authors' code and of mdistiller (weight 50).
    As there, degenerate triplets are included in the count: a zero difference vector (``i = j`` or
    ``k = j``, or duplicated examples) has cosine 0 on both sides and ``i = k`` has cosine 1 on both sides,
    so they add 0 to the sum.
    """
    _same_batch(student_features, teacher_features, "rkd_angle")
    _min_batch(student_features, 3, "rkd_angle")
    s = student_features.float().flatten(1)
    t = teacher_features.float().flatten(1)

    huber = F.smooth_l1_loss(triplet_cosines(s), triplet_cosines(t), reduction="none")  # (B, B, B), indexed [j, i, k]
    return huber.mean((0, 2))  # row i


# ---------------------------------------------------------------------------------------------- PKT


def pkt(student_features: Tensor, teacher_features: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer per anchor row, shape ``(B,)``.

    Passalis & Tefas, 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".
    Cosine similarities ``K_ij`` of L2-normalised features are mapped to ``[0, 1]`` by ``(K + 1) / 2`` and
    row-normalised into conditional distributions ``p(j | i)``. Row ``i`` is

        sum_j p_t(j | i) (log(p_t(j | i) + eps) - log(p_s(j | i) + eps)) / B

    i.e. ``KL(p_t(. | i) || p_s(. | i)) / B`` (with the reference's ``eps`` inside the logs), so ``.mean()``
    over rows is the sum over all ``B^2`` entries divided by ``B^2``: the ``torch.mean`` over the ``B x B``
    matrix of the PKT authors' code and of mdistiller, for which their weight (30000 on CIFAR) was tuned,
    whatever the batch size. Zero when student and teacher embeddings have the same cosine geometry (any
    widths).
    """
    _same_batch(student_features, teacher_features, "pkt")
    _min_batch(student_features, 2, "pkt")

    def cond(x: Tensor) -> Tensor:
        x = F.normalize(x.float().flatten(1), dim=1)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ps, pt = cond(student_features), cond(teacher_features)
    n = ps.shape[0]
    return (pt * ((pt + eps).log() - (ps + eps).log())).sum(1) / n


# ---------------------------------------------------------------------------------------------- similarity preserving


def similarity_gram(x: Tensor) -> Tensor:
    """``(N, ...) -> (N, N)`` float32: ``row_normalize(X X^T)`` of the rows flattened (each row of the Gram matrix
    scaled to unit L2 norm; an all-zero row stays zero). The relation matrix of similarity-preserving KD, and of
    DisWOT's training-free student ranking (``kdistill.eval.diswot``)."""
    x = x.float().flatten(1)
    return F.normalize(x @ x.t(), dim=1)


def similarity_preserving(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Similarity-preserving KD per anchor row, shape ``(B,)``: ``sum_j (G_s - G_t)_ij^2 / B`` with
    ``G = row_normalize(F F^T)`` (:func:`similarity_gram`), so the mean over rows is ``||G_s - G_t||_F^2 / B^2``.

    Tung & Mori, 2019, "Similarity-Preserving Knowledge Distillation".
    """
    _same_batch(student_features, teacher_features, "similarity_preserving")
    _min_batch(student_features, 2, "similarity_preserving")
    n = student_features.shape[0]
    return (similarity_gram(student_features) - similarity_gram(teacher_features)).pow(2).sum(1) / n


# ---------------------------------------------------------------------------------------------- ND


def nd_loss(student_features: Tensor, teacher_features: Tensor, class_means: Tensor, labels: Tensor) -> Tensor:
    """Norm-and-direction loss per example, shape ``(B,)``.

    Wang et al., 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction":
    ``L = 1 - <e_s, c_y / ||c_y||> / max(||e_s||, ||e_t||)`` where ``c_y`` is the teacher's class-mean
    embedding of the example's class. The projection onto the class direction rewards alignment with
    the teacher's class centre, and dividing by the larger of the two norms rewards a student norm at
    least as large as the teacher's. ``student_features`` must already have the teacher's width.
    """
    _same_batch(student_features, teacher_features, "nd_loss")
    s = student_features.float().flatten(1)
    t = teacher_features.float().flatten(1)
    if s.shape != t.shape or class_means.shape[-1] != s.shape[1]:
        raise KDistillError(
            f"nd_loss: student {tuple(s.shape)}, teacher {tuple(t.shape)}, class_means "
            f"{tuple(class_means.shape)}; expected (B, D), (B, D) and (C, D). Project the student first."
        )
    c = F.normalize(class_means.float()[labels.long()], dim=1)
    max_norm = torch.maximum(s.norm(dim=1), t.norm(dim=1)).clamp_min(1e-12)
    return 1.0 - (s * c).sum(1) / max_norm


# ---------------------------------------------------------------------------------------------- CRD


def contrastive_nce(
    student_embed: Tensor, teacher_embed: Tensor, negatives: Tensor | None = None, *, nce_temperature: float = 0.07,
    exclude: Tensor | None = None,
) -> Tensor:
    """InfoNCE of each student embedding against its own teacher embedding (positive), the other teacher
    embeddings of the batch and ``negatives`` ``(K, D)`` (e.g. a memory bank), shape ``(B,)``.

    Tian et al., 2020, "Contrastive Representation Distillation" (the InfoNCE form of its objective).
    Inputs are L2-normalised here. ``exclude`` ``(B, K)`` (True = drop) removes bank entries that are the
    anchor's own example from its negatives.
    """
    _same_batch(student_embed, teacher_embed, "contrastive_nce")
    s = F.normalize(student_embed.float(), dim=1)
    t = F.normalize(teacher_embed.float(), dim=1)
    keys = t if negatives is None or negatives.numel() == 0 else torch.cat([t, F.normalize(negatives.float(), dim=1)])
    logits = s @ keys.t() / nce_temperature
    if exclude is not None and negatives is not None and negatives.numel():
        if exclude.shape != (len(s), len(negatives)):
            raise KDistillError(f"contrastive_nce exclude: got shape {tuple(exclude.shape)}, expected "
                                f"{(len(s), len(negatives))} (anchors x negatives).")
        drop = torch.cat([torch.zeros(len(s), len(t), dtype=torch.bool, device=s.device), exclude.bool()], 1)
        logits = logits.masked_fill(drop, float("-inf"))
    target = torch.arange(len(s), device=s.device)
    return F.cross_entropy(logits, target, reduction="none")


# ---------------------------------------------------------------------------------------------- token relation graph


def token_relation(student_tokens: Tensor, teacher_tokens: Tensor, *, relation_temperature: float = 0.1) -> Tensor:
    """Token-relation-graph loss per example, shape ``(B,)``: KL between the teacher's and the student's
    row-softmaxed token-to-token cosine-similarity graphs, averaged over the ``T`` anchor tokens.

    Token-level relationship graph distillation (Zhang et al., 2023, "Knowledge Distillation via
    Token-level Relationship Graph"). Token sequences ``(B, T, D)``; widths may differ, lengths must match.
    """
    _same_batch(student_tokens, teacher_tokens, "token_relation")
    if student_tokens.dim() != 3 or teacher_tokens.dim() != 3 or student_tokens.shape[1] != teacher_tokens.shape[1]:
        raise KDistillError(
            f"token_relation: student {tuple(student_tokens.shape)} vs teacher {tuple(teacher_tokens.shape)}; "
            "expected (B, T, Ds) and (B, T, Dt) with the same number of tokens T."
        )

    def graph(x: Tensor) -> Tensor:
        x = F.normalize(x.float(), dim=-1)
        return F.log_softmax(x @ x.transpose(1, 2) / relation_temperature, dim=-1)

    ls, lt = graph(student_tokens), graph(teacher_tokens)
    return (lt.exp() * (lt - ls)).sum(-1).mean(-1)


# ------------------------------------------------------------------------------------------ self-attention relations


def _check_tokens(x: Tensor, name: str, who: str) -> None:
    if x.dim() != 3:
        raise KDistillError(f"{name}: {who} has shape {tuple(x.shape)}; expected (B, T, W) token vectors (the output "
                            "of an attention q/k/v projection, heads concatenated).")


def _split_heads(x: Tensor, num_heads: int, name: str, who: str) -> Tensor:
    """``(B, T, W) -> (B, H, T, W / H)`` in fp32."""
    _check_tokens(x, name, who)
    b, t, w = x.shape
    if not (isinstance(num_heads, int) and num_heads >= 1) or w % num_heads:
        raise KDistillError(f"{name}: num_heads={num_heads!r} does not split the {who} width {w}; expected a positive "
                            f"divisor of {w}. Fix: choose a head count that divides both models' q/k/v widths.")
    return x.float().reshape(b, t, num_heads, w // num_heads).transpose(1, 2)


def expand_kv_heads(x: Tensor, *, num_kv_heads: int, num_heads: int) -> Tensor:
    """Grouped-query attention: key or value vectors ``(B, T, Hkv * d) -> (B, T, H * d)``, every key/value head
    repeated for the ``H / Hkv`` query heads that share it (head ``j`` serves query heads ``j g ... j g + g - 1``,
    ``g = H / Hkv``, the order of the models' own ``repeat_kv``). Identity when ``Hkv == H``."""
    _check_tokens(x, "expand_kv_heads", "x")
    b, t, w = x.shape
    if num_kv_heads < 1 or num_heads % num_kv_heads or w % num_kv_heads:
        raise KDistillError(f"expand_kv_heads: num_kv_heads={num_kv_heads}, num_heads={num_heads}, width {w}; "
                            "expected num_kv_heads to divide both num_heads and the width (grouped-query attention).")
    if num_kv_heads == num_heads:
        return x
    g = num_heads // num_kv_heads
    return x.reshape(b, t, num_kv_heads, w // num_kv_heads).repeat_interleave(g, dim=2).reshape(b, t, w * g)


def _valid_keys(mask: Tensor | None, b: int, t: int, causal: bool, device: torch.device) -> Tensor | None:
    """``(B, 1, T, T)`` bool: may query ``i`` look at key ``j`` (a real key, and ``j <= i`` when causal)."""
    if mask is None and not causal:
        return None
    valid = torch.ones(b, 1, t, t, dtype=torch.bool, device=device)
    if mask is not None:
        valid = valid & mask.bool().view(b, 1, 1, t)
    if causal:
        valid = valid & torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return valid


def relation_log_probs(left: Tensor, right: Tensor, *, num_heads: int, mask: Tensor | None = None,
                       causal: bool = False, relation_temperature: float = 1.0) -> Tensor:
    """Per-head relation distributions in log space, shape ``(B, H, T, T)``, fp32:
    ``log softmax_j(l_h,i . r_h,j / (sqrt(d_h) tau))`` over the keys ``j``, where ``left`` / ``right`` ``(B, T, W)``
    are split into ``num_heads`` heads of width ``d_h = W / num_heads``. With ``left = Q, right = K`` this is a
    self-attention distribution; with ``left = right = V`` the value relation of MiniLM. Keys that are padding
    (``mask`` ``(B, T)`` False) or in the future (``causal``) get probability 0; a query without any valid key gets
    a uniform row (the losses leave it out)."""
    name = "relation_log_probs"
    if not relation_temperature > 0:
        raise KDistillError(f"{name}: relation_temperature={relation_temperature!r}; expected a positive number.")
    if left.shape != right.shape:
        raise KDistillError(f"{name}: left {tuple(left.shape)} vs right {tuple(right.shape)}; expected the same "
                            "(B, T, W). For grouped-query attention expand the keys first (expand_kv_heads).")
    lh, rh = _split_heads(left, num_heads, name, "left"), _split_heads(right, num_heads, name, "right")
    b, _, t, d = lh.shape
    if mask is not None and tuple(mask.shape) != (b, t):
        raise KDistillError(f"{name}: mask has shape {tuple(mask.shape)}; expected {(b, t)} (B, T), True = a real "
                            "token.")
    scores = lh @ rh.transpose(-1, -2) / (math.sqrt(d) * relation_temperature)
    valid = _valid_keys(mask, b, t, causal, scores.device)
    if valid is not None:  # a finite fill: a row with no valid key stays finite (uniform), never NaN
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def attention_relation(student_left: Tensor, student_right: Tensor, teacher_left: Tensor, teacher_right: Tensor, *,
                       num_heads: int, mask: Tensor | None = None, causal: bool = False,
                       relation_temperature: float = 1.0) -> Tensor:
    """Self-attention relation distillation per example, shape ``(B,)``: ``KL(R_t || R_s)`` of every query row of
    the :func:`relation_log_probs` distributions, averaged over the ``num_heads`` heads and the real query positions.

    MiniLM (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers"): ``left, right = Q, K`` gives its attention-distribution transfer, ``V, V`` its
    value relation (both per attention head). MiniLMv2 (Wang et al., 2021, "MiniLMv2: Multi-Head Self-Attention
    Relation Distillation for Compressing Pretrained Transformers"): Q-Q, K-K and V-V relations after the heads are
    concatenated and re-split into ``num_heads`` *relation* heads, so each side is split by its own width
    (``d_h = W / num_heads`` differs between teacher and student) and only the head count and the tokens must match.

    Inputs ``(B, T, W)``: both models' widths may differ; batch and length must match. ``mask`` ``(B, T)`` (True =
    real token) removes padding from the keys (outside the softmax) and from the queries (outside the mean); a row
    with no real token gives 0. ``causal`` restricts every query to the keys at or before it (decoder LMs). The
    teacher side is a fixed target (detached). 0 when the student's relations equal the teacher's.
    """
    name = "attention_relation"
    _same_batch(student_left, teacher_left, name)
    for x, who in ((student_left, "student_left"), (teacher_left, "teacher_left")):
        _check_tokens(x, name, who)
    if student_left.shape[1] != teacher_left.shape[1]:
        raise KDistillError(f"{name}: student length {student_left.shape[1]} vs teacher length "
                            f"{teacher_left.shape[1]}; expected the same tokens on both sides (same tokenizer and "
                            "padding).")
    kw = {"num_heads": num_heads, "mask": mask, "causal": causal, "relation_temperature": relation_temperature}
    ls = relation_log_probs(student_left, student_right, **kw)
    lt = relation_log_probs(teacher_left.detach(), teacher_right.detach(), **kw)
    b, h, t, _ = ls.shape
    valid = _valid_keys(mask, b, t, causal, ls.device)
    diff = lt - ls
    if valid is not None:
        diff = torch.where(valid, diff, diff.new_zeros(()))
    per_query = (lt.exp() * diff).sum(-1).mean(1)  # (B, T): KL summed over keys, mean over heads
    if mask is None:
        return per_query.mean(-1)
    m = mask.bool()
    return torch.where(m, per_query, per_query.new_zeros(())).sum(-1) / m.sum(-1).clamp_min(1)


def self_relation(student_x: Tensor, teacher_x: Tensor, *, num_heads: int, mask: Tensor | None = None,
                  causal: bool = False, relation_temperature: float = 1.0) -> Tensor:
    """``attention_relation(s, s, t, t)``: the Q-Q, K-K or V-V relation of MiniLMv2 (and MiniLM's value relation),
    per example ``(B,)``."""
    return attention_relation(student_x, student_x, teacher_x, teacher_x, num_heads=num_heads, mask=mask,
                              causal=causal, relation_temperature=relation_temperature)
