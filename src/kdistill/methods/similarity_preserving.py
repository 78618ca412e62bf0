"""``similarity_preserving``: Similarity-Preserving Knowledge Distillation (SP).

Tung & Mori, 2019, "Similarity-Preserving Knowledge Distillation" (ICCV).

Inputs that produce similar activations in the teacher should produce similar activations in the
student. With ``G = row_normalize(F F^T)`` the ``(B, B)`` batch similarity matrix of flattened features:

    L = sp_weight * ||G_s - G_t||_F^2 / B^2 + ce_weight * CE(z_s, y)

Widths and spatial sizes may differ (only B x B matrices are compared). When to use: any pair of
architectures; a cheap relation term beside CE. ``sp_weight = 3000`` is the paper's gamma for CIFAR; on small
students it dominates the label loss (-2 to -9 points, docs/benchmarks.md), the classic recipe uses 10.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..losses.relations import similarity_preserving
from ..registry import METHODS
from ._zoo import feature, non_negative, row_mask, select_rows, skipped
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("similarity_preserving")
class SimilarityPreserving(Method):
    """Match row-normalised batch Gram matrices of hooked features."""

    def __init__(self, student_layer: str = "embed", teacher_layer: str = "embed", sp_weight: float = 3000.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        non_negative("similarity_preserving", sp_weight=sp_weight, ce_weight=ce_weight)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.sp_weight, self.ce_weight = float(sp_weight), float(ce_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("similarity_preserving", teacher)
        mask = row_mask(batch)
        s = select_rows(feature(student, self.student_layers[0], "student", "similarity_preserving"), mask)
        t = select_rows(feature(teacher, self.teacher_layers[0], "teacher", "similarity_preserving"), mask)
        out = {"sp": self.sp_weight * (similarity_preserving(s, t).mean() if len(s) >= 2 else skipped(s))}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
