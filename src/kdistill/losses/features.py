"""Losses on intermediate features (pure functions; student first, unreduced per example)."""

from __future__ import annotations

from torch import Tensor

from ..errors import KDistillError


def hint_mse(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error per example between (already projected) features, shape ``(B,)``.

    FitNets (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets"). Features of any shape
    ``(B, ...)``; the mean runs over every axis but the first.
    """
    if student_features.shape != teacher_features.shape:
        raise KDistillError(
            f"hint_mse: student_features {tuple(student_features.shape)} vs teacher_features "
            f"{tuple(teacher_features.shape)}; expected identical shapes. Project the student "
            "features first (e.g. the `fitnet` method's projector)."
        )
    diff = student_features.float() - teacher_features.float()
    return diff.pow(2).flatten(1).mean(1)
