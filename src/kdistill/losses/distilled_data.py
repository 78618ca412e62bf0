"""Losses and scores of dataset distillation (pure functions; synthetic / student side first, unreduced, fp32).

* :func:`gradient_match_distance`: the layer distance of gradient matching (DC; Zhao, Mopuri & Bilen, "Dataset
  Condensation with Gradient Matching", ICLR 2021), one value per output unit of the layer.
* :func:`trajectory_match_loss`: the normalised parameter distance of trajectory matching (MTT; Cazenavette et
  al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022), one value per trajectory.
* :func:`bn_statistics_distance`: how far a batch's feature statistics are from a BatchNorm layer's running
  statistics (the feature regulariser of SRe2L-style synthesis that INFER's compensators are learned with).
* :func:`el2n`, :func:`prediction_margin`: per-example difficulty scores from a teacher's logits (EL2N: Paul et
  al., "Deep Learning on a Data Diet: Finding Important Examples Early in Training", 2021); the entropy score is
  :func:`kdistill.losses.logits.entropy`.
* :func:`kernel_ridge_predictions`: what kernel ridge regression fitted on one set predicts for another (the inner
  problem of KRR-ST; Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning", ICLR 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KDistillError


def gradient_match_distance(synthetic_grad: Tensor, real_grad: Tensor, *, eps: float = 1e-8) -> Tensor:
    """DC's distance between one layer's gradients: ``1 - cos(g_syn[o], g_real[o])`` for every output unit ``o``.

    A gradient of shape ``(O, ...)`` (a linear weight ``(O, I)``, a convolution ``(O, I, k)`` or ``(O, I, kh, kw)``)
    is read as ``O`` rows of ``prod(...)`` values; the result has shape ``(O,)`` and its sum is the layer's term of
    the DC objective. One-dimensional gradients (biases, normalisation scales) carry no per-unit direction and are
    left out of the objective by DC: they give an empty ``(0,)`` tensor here. Zero at identical non-zero gradients;
    2 when they point in opposite directions; a zero row counts as orthogonal (1)."""
    if synthetic_grad.shape != real_grad.shape:
        raise KDistillError(f"gradient_match_distance: synthetic_grad {tuple(synthetic_grad.shape)} vs real_grad "
                            f"{tuple(real_grad.shape)}; expected the gradients of the same parameter.")
    if synthetic_grad.dim() <= 1:
        return synthetic_grad.new_zeros((0,), dtype=torch.float32)
    s = synthetic_grad.float().flatten(1)
    r = real_grad.float().flatten(1)
    norms = s.norm(dim=1) * r.norm(dim=1)
    return 1.0 - (s * r).sum(1) / norms.clamp_min(eps)


def trajectory_match_loss(student_params: Tensor, target_params: Tensor, start_params: Tensor) -> Tensor:
    """MTT's loss ``||theta_student - theta*_target||^2 / ||theta*_start - theta*_target||^2``.

    ``student_params``: the flat parameters ``(P,)`` (or ``(B, P)``, one row per trajectory) after the unrolled
    steps on the synthetic data; ``target_params`` / ``start_params``: the expert's at the target and the start
    epoch. The denominator makes trajectory segments of different lengths comparable. Returns ``()`` or
    ``(B,)``; 1 when the student did not move from the start, 0 when it reached the target."""
    if not (student_params.shape == target_params.shape == start_params.shape):
        raise KDistillError(f"trajectory_match_loss: shapes {tuple(student_params.shape)}, "
                            f"{tuple(target_params.shape)}, {tuple(start_params.shape)}; expected three flat "
                            "parameter vectors (P,) or (B, P) of one model.")
    target = target_params.float()
    num = (student_params.float() - target).pow(2).sum(-1)
    den = (start_params.float() - target).pow(2).sum(-1)
    if bool((den == 0).any()):
        raise KDistillError("trajectory_match_loss: the expert's start and target parameters are identical, so the "
                            "normaliser is 0; expected an expert that moved. Fix: match over more expert epochs "
                            "(expert_epochs_per_match) or train the experts with a larger expert_lr.")
    return num / den


def bn_statistics_distance(features: Tensor, running_mean: Tensor, running_var: Tensor, *, groups: int = 1) -> Tensor:
    """``||mean_batch - running_mean||_2 + ||var_batch - running_var||_2`` of the input to a BatchNorm layer, per
    group of rows.

    ``features``: ``(B, C)`` or ``(B, C, *spatial)``, read as ``groups`` consecutive batches of ``B / groups`` rows;
    statistics are per channel over a group's rows and spatial positions (the biased variance a BatchNorm layer
    normalises with). Returns ``(groups,)``: one value per group (a batch statistic has no per-example value)."""
    if features.dim() < 2 or features.shape[1] != running_mean.shape[0] or running_mean.shape != running_var.shape:
        raise KDistillError(f"bn_statistics_distance: features {tuple(features.shape)}, running statistics "
                            f"{tuple(running_mean.shape)} / {tuple(running_var.shape)}; expected (B, C, ...) features "
                            "and (C,) statistics of the same BatchNorm layer.")
    if not (isinstance(groups, int) and groups >= 1 and features.shape[0] % groups == 0):
        raise KDistillError(f"bn_statistics_distance groups: got {groups!r} for {features.shape[0]} rows; expected a "
                            "positive divisor of the row count.")
    c = features.shape[1]
    x = features.float().reshape(groups, features.shape[0] // groups, c, -1).transpose(1, 2).reshape(groups, c, -1)
    mean = x.mean(-1)
    var = x.var(-1, unbiased=False)
    return (mean - running_mean.float()).norm(dim=-1) + (var - running_var.float()).norm(dim=-1)


def _check_labels(logits: Tensor, labels: Tensor, name: str) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise KDistillError(f"{name}: logits {tuple(logits.shape)} and labels {tuple(labels.shape)}; expected "
                            "(N, C) logits and (N,) class ids.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise KDistillError(f"{name}: labels range over [{int(labels.min())}, {int(labels.max())}], expected class "
                            f"ids in [0, {logits.shape[1] - 1}].")


def el2n(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N score ``||softmax(z) - onehot(y)||_2`` per example, ``(N,)``: 0 for a confident right prediction,
    up to ``sqrt(2)`` for a confident wrong one (higher = harder)."""
    _check_labels(logits, labels, "el2n")
    p = torch.softmax(logits.float(), -1)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).float()
    return (p - onehot).norm(dim=1)


def prediction_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``p_y - max_{c != y} p_c`` per example, ``(N,)``: in [-1, 1], high for easy examples (lower = harder)."""
    _check_labels(logits, labels, "prediction_margin")
    p = torch.softmax(logits.float(), -1)
    true = p.gather(1, labels[:, None]).squeeze(1)
    other = p.scatter(1, labels[:, None], float("-inf")).max(1).values
    return true - other


def kernel_ridge_predictions(query_features: Tensor, support_features: Tensor, support_targets: Tensor, *,
                             ridge: float = 1e-3) -> Tensor:
    """``K_qs (K_ss + ridge * I)^-1 Y_s`` with the linear kernel ``K = F F^T``: the targets that kernel ridge
    regression fitted on ``(support_features (M, H), support_targets (M, D))`` predicts for ``query_features
    (Q, H)``; shape ``(Q, D)``. Differentiable in all three inputs (KRR-ST learns the support inputs and targets
    through it). ``ridge`` is scaled by the mean diagonal of ``K_ss`` so it means the same at every feature scale."""
    q, s, t = query_features, support_features, support_targets
    if q.dim() != 2 or s.dim() != 2 or t.dim() != 2 or q.shape[1] != s.shape[1] or t.shape[0] != s.shape[0]:
        raise KDistillError(f"kernel_ridge_predictions: query {tuple(q.shape)}, support {tuple(s.shape)}, targets "
                            f"{tuple(t.shape)}; expected (Q, H), (M, H) and (M, D).")
    if not ridge > 0:
        raise KDistillError(f"kernel_ridge_predictions ridge: got {ridge!r}, expected a positive number.")
    fq, fs = query_features.float(), support_features.float()
    k_ss = fs @ fs.T
    scale = k_ss.diagonal().mean().detach().clamp_min(1e-12)
    eye = torch.eye(len(fs), device=fs.device, dtype=fs.dtype)
    alpha = torch.linalg.solve(k_ss + ridge * scale * eye, support_targets.float())
    return (fq @ fs.T) @ alpha
