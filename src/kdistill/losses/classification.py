"""Logit-based losses of the classic-KD zoo (pure functions).

Conventions as in :mod:`kdistill.losses.logits`: ``student_logits`` first, ``teacher_logits`` second, class
axis last (``(B, C)``), keyword-only hyper-parameters, fp32 inside, unreduced output, and no ``T^2``
factor (methods apply it). Losses that are defined over a whole batch (DIST's intra-class term, Sinkhorn)
return one value per natural unit (per class, per row of the transport plan) so that a plain ``mean``
gives the paper's scalar; they document which.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError
from .logits import _check_pair, _check_temperature, kl_from_log_probs, log_probs

# ---------------------------------------------------------------------------------------------- helpers


def _check_labels(logits: Tensor, labels: Tensor, name: str) -> None:
    if labels.shape != logits.shape[:-1]:
        raise KDistillError(
            f"{name} labels: got shape {tuple(labels.shape)}, expected {tuple(logits.shape[:-1])} "
            "(logits without the class axis)."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
        raise KDistillError(
            f"{name} labels: got values in [{int(labels.min())}, {int(labels.max())}], expected class ids in "
            f"[0, {logits.shape[-1] - 1}]. Mask padded rows out before calling (labels == -100 is not allowed here)."
        )


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


# ---------------------------------------------------------------------------------------------- DKD


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, kd_temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Target-class (TCKD) and non-target-class (NCKD) KD terms of Decoupled KD, each shape ``(B,)``.

    Zhao et al., 2022, "Decoupled Knowledge Distillation". With ``p = softmax(z / T)`` and target ``y``:

    * ``TCKD = KL([p_t,y, 1 - p_t,y] || [p_s,y, 1 - p_s,y])`` (binary target vs rest),
    * ``NCKD = KL(p̂_t || p̂_s)`` where ``p̂`` is the softmax over the non-target classes only.

    Classic KD decomposes exactly as ``KL = TCKD + (1 - p_t,y) * NCKD``.
    """
    _check_pair(student_logits, teacher_logits, "dkd")
    _check_labels(student_logits, labels, "dkd")
    ls = log_probs(student_logits, kd_temperature)
    lt = log_probs(teacher_logits, kd_temperature)
    gt = F.one_hot(labels.long(), ls.shape[-1]).bool()
    # binary distributions in log space: log p_y and log(1 - p_y) = logsumexp over the other classes
    neg_inf = torch.finfo(ls.dtype).min
    ls_y = ls.masked_fill(~gt, neg_inf).logsumexp(-1)
    lt_y = lt.masked_fill(~gt, neg_inf).logsumexp(-1)
    ls_rest = ls.masked_fill(gt, neg_inf).logsumexp(-1)
    lt_rest = lt.masked_fill(gt, neg_inf).logsumexp(-1)
    tckd = kl_from_log_probs(torch.stack([lt_y, lt_rest], -1), torch.stack([ls_y, ls_rest], -1))
    # non-target distributions: renormalise over classes != y (the target gets probability 0)
    ls_nt = (ls - ls_rest.unsqueeze(-1)).masked_fill(gt, float("-inf"))
    lt_nt = (lt - lt_rest.unsqueeze(-1)).masked_fill(gt, float("-inf"))
    nckd = kl_from_log_probs(lt_nt, ls_nt)
    return tckd, nckd


# ---------------------------------------------------------------------------------------------- DIST


def dist_inter_class(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """DIST inter-class relation: ``1 - pearson(p_s[i, :], p_t[i, :])`` per example, shape ``(B,)``.

    Huang et al., 2022, "Knowledge Distillation from A Stronger Teacher". Invariant to any positive affine
    map of the student's probabilities; 0 when the predictions are perfectly linearly correlated.
    """
    _check_pair(student_logits, teacher_logits, "dist_inter_class")
    ps = log_probs(student_logits, kd_temperature).exp()
    pt = log_probs(teacher_logits, kd_temperature).exp()
    return 1.0 - _pearson(ps, pt, dim=-1)


def dist_intra_class(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """DIST intra-class relation: ``1 - pearson(p_s[:, c], p_t[:, c])`` per class over the batch,
    shape ``(C,)`` (a batch-level loss: needs ``B >= 2``)."""
    _check_pair(student_logits, teacher_logits, "dist_intra_class")
    if student_logits.dim() != 2 or student_logits.shape[0] < 2:
        raise KDistillError(
            f"dist_intra_class: got logits of shape {tuple(student_logits.shape)}, expected (B, C) with B >= 2 "
            "(the correlation runs over the batch). Use a batch size of at least 2."
        )
    ps = log_probs(student_logits, kd_temperature).exp()
    pt = log_probs(teacher_logits, kd_temperature).exp()
    return 1.0 - _pearson(ps, pt, dim=0)


# ---------------------------------------------------------------------------------------------- logit standardisation


def zscore_logits(logits: Tensor, *, eps: float = 1e-7) -> Tensor:
    """``(z - mean(z)) / (std(z) + eps)`` over the class axis (fp32; unbiased std as in the paper's code)."""
    z = logits.float()
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)


def standardized_kl(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 2.0) -> Tensor:
    """KL(softmax(Z(z_t) / T) || softmax(Z(z_s) / T)) with ``Z`` the per-row z-score, shape ``(B,)``.

    Sun et al., 2024, "Logit Standardization in Knowledge Distillation". The student only has to match the
    teacher's logit *relations*, not their scale or shift: the value is invariant to ``z_s -> a z_s + b``
    for any ``a > 0``.
    """
    _check_pair(student_logits, teacher_logits, "standardized_kl")
    _check_temperature(kd_temperature)
    return kl_from_log_probs(
        log_probs(zscore_logits(teacher_logits), kd_temperature),
        log_probs(zscore_logits(student_logits), kd_temperature),
    )


# ---------------------------------------------------------------------------------------------- alpha-divergence


def alpha_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.5,
    kd_temperature: float = 1.0,
    importance_clip: float | None = None,
) -> Tensor:
    """Amari alpha-divergence ``D_alpha(p_t || p_s)``, shape ``logits.shape[:-1]``.

    ``D_alpha(p || q) = (sum_c p_c^alpha q_c^(1 - alpha) - 1) / (alpha (alpha - 1))``, computed in log
    space (``expm1(logsumexp(alpha log p + (1 - alpha) log q))``, in float64 for the cancellation near
    ``alpha in {0, 1}``). ``alpha -> 1`` gives forward KL(p_t || p_s) and ``alpha -> 0`` reverse KL; both end
    points are returned exactly. AlphaNet (Wang et al., 2021, "AlphaNet: Improved Training of Supernets
    with Alpha-Divergence") and TODM (2023) use it for in-place supernet distillation.

    ``importance_clip``: for ``alpha`` outside ``{0, 1}`` the gradient with respect to the student logits is
    ``-(1 / alpha) sum_c p_s,c w_c grad log p_s,c`` with the importance weight ``w = (p_t / p_s)^alpha``. For
    ``alpha < 0`` that weight is ``(p_s / p_t)^|alpha|``, unbounded wherever a confident teacher gives a class
    almost no mass, and a few such rows dominate (or wreck) training. AlphaNet's remedy, used here when
    ``importance_clip`` is set: clip ``w`` at that ceiling in both the value
    (``sum_c p_s,c (min(w_c, clip) - 1) / (alpha (alpha - 1))``, equal to ``D_alpha`` while no weight is clipped)
    and the gradient. The clipped form passes no gradient to the teacher logits (the teacher is frozen).
    """
    _check_pair(student_logits, teacher_logits, "alpha_divergence")
    if not math.isfinite(alpha):
        raise KDistillError(f"alpha_divergence alpha: got {alpha!r}, expected a finite number.")
    if importance_clip is not None and not importance_clip > 0:
        raise KDistillError(
            f"alpha_divergence importance_clip: got {importance_clip!r}, expected a positive number or None "
            "(no clipping)."
        )
    lt = log_probs(teacher_logits, kd_temperature)
    ls = log_probs(student_logits, kd_temperature)
    if alpha == 1.0:
        return kl_from_log_probs(lt, ls)
    if alpha == 0.0:
        return kl_from_log_probs(ls, lt)
    if importance_clip is not None:
        return _clipped_alpha_divergence(ls, lt.detach(), alpha, float(importance_clip))
    # float64 from the logits on: the fp32 rounding of log p (~1e-7) would be divided by alpha (alpha - 1)
    lt64 = F.log_softmax(teacher_logits.double() / kd_temperature, dim=-1)
    ls64 = F.log_softmax(student_logits.double() / kd_temperature, dim=-1)
    # p^a q^(1-a); where either probability is 0 (and the exponent positive) the product is 0.
    mix = alpha * lt64 + (1.0 - alpha) * ls64
    mix = torch.where(torch.isnan(mix), torch.full_like(mix, float("-inf")), mix)
    s = torch.expm1(torch.logsumexp(mix, dim=-1))
    return (s / (alpha * (alpha - 1.0))).float()


def _clipped_alpha_divergence(ls: Tensor, lt: Tensor, alpha: float, clip: float) -> Tensor:
    """Value and gradient of ``D_alpha`` with the importance weight ``(p_t / p_s)^alpha`` clipped at ``clip``."""
    ls_d = ls.detach()
    log_w = alpha * (lt - ls_d)
    # 0 * inf (a class both distributions exclude) carries no weight
    log_w = torch.where(torch.isnan(log_w), torch.full_like(log_w, float("-inf")), log_w)
    w = log_w.clamp(max=math.log(clip)).exp()
    q = ls_d.exp()
    value = (q * (w - 1.0)).sum(-1) / (alpha * (alpha - 1.0))
    # surrogate whose gradient is -(1/alpha) sum_c q_c w_c grad log q_c (sum_c q_c grad log q_c = 0)
    coef = torch.nan_to_num(q * w, nan=0.0, posinf=0.0)
    surrogate = -(coef * torch.nan_to_num(ls, neginf=0.0)).sum(-1) / alpha
    return value + (surrogate - surrogate.detach())


# ---------------------------------------------------------------------------------------------- Sinkhorn


def sinkhorn_plan(
    cost: Tensor, *, epsilon: float = 0.1, max_iter: int = 100, tol: float = 1e-6
) -> tuple[Tensor, int]:
    """Entropic optimal-transport plan between two uniform point sets, in log space.

    ``cost`` is ``(N, M)``; returns ``(plan, iterations)`` with ``plan`` rows summing to ``1/N`` and columns to
    ``1/M`` (to within ``tol`` in L1 on the row marginal, or after ``max_iter`` iterations). The dual
    potentials ``f, g`` are updated with ``logsumexp`` (never ``exp(-C / eps)``), so small ``epsilon`` does not
    underflow. Iterations are differentiable (unrolled autograd).
    """
    if cost.dim() != 2:
        raise KDistillError(f"sinkhorn_plan cost: got shape {tuple(cost.shape)}, expected (N, M).")
    if not epsilon > 0:
        raise KDistillError(f"sinkhorn epsilon: got {epsilon!r}, expected a positive number.")
    c = cost.float()
    n, m = c.shape
    log_a = torch.full((n,), -math.log(n), device=c.device)
    log_b = torch.full((m,), -math.log(m), device=c.device)
    f = torch.zeros(n, device=c.device)
    g = torch.zeros(m, device=c.device)
    it = 0
    for it in range(1, int(max_iter) + 1):
        f = epsilon * (log_a - torch.logsumexp((g.unsqueeze(0) - c) / epsilon, dim=1))
        g = epsilon * (log_b - torch.logsumexp((f.unsqueeze(1) - c) / epsilon, dim=0))
        # after the g-update the column marginals are exact; check the rows
        log_plan = (f.unsqueeze(1) + g.unsqueeze(0) - c) / epsilon
        err = (log_plan.exp().sum(1) - log_a.exp()).abs().sum()
        if float(err.detach()) < tol:
            break
    plan = ((f.unsqueeze(1) + g.unsqueeze(0) - c) / epsilon).exp()
    return plan, it


def sinkhorn_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kd_temperature: float = 1.0,
    epsilon: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-6,
    cost: str = "l1",
) -> Tensor:
    """Entropic Wasserstein distance between the batch of student predictions and the batch of teacher
    predictions (each a point on the simplex), returned per student row: ``B * sum_j P_ij C_ij``, shape
    ``(B,)`` (its mean is ``<P, C>``).

    Cui et al., 2024, "Sinkhorn Distance Minimization for Knowledge Distillation". ``cost`` between
    probability vectors: ``"l1"`` (total variation x 2) or ``"l2"`` (squared Euclidean). The value is
    invariant to permuting the teacher rows (optimal transport compares sets), which is what lets it
    match distributions where per-example KL fails on disjoint supports.
    """
    _check_pair(student_logits, teacher_logits, "sinkhorn_distance")
    if student_logits.dim() != 2:
        raise KDistillError(
            f"sinkhorn_distance: got logits of shape {tuple(student_logits.shape)}, expected (B, C)."
        )
    ps = log_probs(student_logits, kd_temperature).exp()
    pt = log_probs(teacher_logits, kd_temperature).exp()
    diff = ps.unsqueeze(1) - pt.unsqueeze(0)
    if cost == "l1":
        c = diff.abs().sum(-1)
    elif cost == "l2":
        c = diff.pow(2).sum(-1)
    else:
        raise KDistillError(f"sinkhorn_distance cost: got {cost!r}, expected 'l1' or 'l2'.")
    plan, _ = sinkhorn_plan(c, epsilon=epsilon, max_iter=max_iter, tol=tol)
    return (plan * c).sum(1) * c.shape[0]


# ---------------------------------------------------------------------------------------------- OFA


def ofa_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, eps: float = 1.5, kd_temperature: float = 1.0
) -> Tensor:
    """One-for-All target-enhanced KD loss, shape ``(B,)``.

    Hao et al., 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
    Distillation", in the form of the authors' code: with ``w_c = (p_t,c + 1[c = y])^eps - 1[c = y]``,
    ``L = -sum_c w_c log p_s,c``. ``eps = 1`` is exactly cross-entropy against the teacher's distribution
    (plain KD); ``eps > 1`` adds weight to the target class, more where the teacher is confident in it,
    and shrinks the non-target weights ``p_t,c^eps``.
    """
    _check_pair(student_logits, teacher_logits, "ofa_loss")
    _check_labels(student_logits, labels, "ofa_loss")
    ls = log_probs(student_logits, kd_temperature)
    pt = log_probs(teacher_logits, kd_temperature).exp()
    gt = F.one_hot(labels.long(), ls.shape[-1]).bool()
    onehot = gt.float()
    weight = (pt + onehot).pow(eps) - onehot
    return -(weight * torch.where(weight > 0, ls, torch.zeros_like(ls))).sum(-1)


# ---------------------------------------------------------------------------------------------- targets


def guided_targets(teacher_logits: Tensor, labels: Tensor, *, label_weight: float = 0.5,
                   kd_temperature: float = 1.0) -> Tensor:
    """Ground-truth-guided soft targets ``(1 - w) softmax(z_t / T) + w onehot(y)``, shape ``(B, C)``.

    Used by self-distillation where the teacher is an earlier copy of the model ("Even your Teacher
    Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation", 2023).
    """
    if not 0.0 <= label_weight <= 1.0:
        raise KDistillError(f"guided_targets label_weight: got {label_weight!r}, expected a number in [0, 1].")
    _check_labels(teacher_logits, labels, "guided_targets")
    pt = log_probs(teacher_logits, kd_temperature).exp()
    onehot = F.one_hot(labels.long(), pt.shape[-1]).float()
    return (1.0 - label_weight) * pt + label_weight * onehot


# ---------------------------------------------------------------------------------------------- sub-classes


def subclass_log_probs(class_logits: Tensor, within_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """Log-probabilities over ``C x S`` pseudo-subclasses, shape ``(B, C, S)``:
    ``log softmax(z / T)_c + log softmax(a_c)_s``.

    The class marginal (sum over ``s``) is exactly ``softmax(z / T)``; ``within_logits`` ``(B, C, S)`` only
    decide how each class's mass splits among its subclasses (not divided by ``T``).
    """
    if within_logits.dim() != 3 or within_logits.shape[:2] != class_logits.shape:
        raise KDistillError(
            f"subclass_log_probs: class_logits {tuple(class_logits.shape)} and within_logits "
            f"{tuple(within_logits.shape)}; expected (B, C) and (B, C, S)."
        )
    return log_probs(class_logits, kd_temperature).unsqueeze(-1) + F.log_softmax(within_logits.float(), dim=-1)


def subclass_kl(student_class_logits: Tensor, student_within: Tensor, teacher_class_logits: Tensor,
                teacher_within: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """KL between teacher and student pseudo-subclass distributions, shape ``(B,)``. Decomposes exactly as
    ``KL(p_t || p_s) + sum_c p_t,c KL(w_t,c || w_s,c)`` (class term + within-class term)."""
    lt = subclass_log_probs(teacher_class_logits, teacher_within, kd_temperature=kd_temperature).flatten(1)
    ls = subclass_log_probs(student_class_logits, student_within, kd_temperature=kd_temperature).flatten(1)
    return kl_from_log_probs(lt, ls)


# ---------------------------------------------------------------------------------------------- bilevel helpers


def head_gradient_alignment(train_features: Tensor, train_logit_grads: Tensor, val_features: Tensor,
                            val_logit_grads: Tensor) -> Tensor:
    """``<grad_W l_val, grad_W l_i>`` for a final linear layer ``z = W h + b``, per training row, shape ``(N,)``.

    The parameter gradient of a per-example loss w.r.t. ``[W, b]`` is ``g h~^T`` (``g = dl/dz``,
    ``h~ = [h, 1]``), so the inner product with the mean validation gradient is
    ``mean_j (g_j . g_i) (h~_j . h~_i)`` — no per-example backward passes needed. Used as the first-order
    one-step-lookahead hypergradient of a bilevel problem (Ren et al., 2018, "Learning to Reweight
    Examples for Robust Deep Learning") restricted to the classifier head.
    """
    ones_tr = train_features.new_ones(len(train_features), 1)
    ones_va = val_features.new_ones(len(val_features), 1)
    h_tr = torch.cat([train_features.float().flatten(1), ones_tr.float()], 1)
    h_va = torch.cat([val_features.float().flatten(1), ones_va.float()], 1)
    return ((val_logit_grads.float() @ train_logit_grads.float().t()) * (h_va @ h_tr.t())).mean(0)
