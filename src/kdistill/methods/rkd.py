"""``rkd``: Relational Knowledge Distillation (distance-wise + angle-wise).

Park, Kim, Lu & Cho, 2019, "Relational Knowledge Distillation" (CVPR).

Instead of matching individual outputs, the student matches the *structure* of the teacher's
embedding space over the batch (Huber = smooth L1):

    L_D = (1 / B^2) sum_{i != j} Huber(d_s(i, j) / mu_s, d_t(i, j) / mu_t)   (pairwise distances)
    L_A = (1 / B^3) sum_{i, j, k} Huber(cos angle_s(i, j, k), cos angle_t(i, j, k))   (triplet angles)
    L = distance_weight * L_D + angle_weight * L_A + ce_weight * CE(z_s, y)

``mu`` is the mean of the ``B (B - 1)`` off-diagonal pairwise distances, so embedding widths and scales
may differ and no projector is needed. Both terms are means over the full ``B x B`` / ``B x B x B``
tensors (the diagonal distances are 0 on both sides; a zero difference vector has cosine 0), exactly
``F.smooth_l1_loss`` over those tensors in the RKD authors' code and mdistiller. When to use: metric
learning and heterogeneous architectures; cost O(B^3) for the angle term. Weights 25 / 50 follow the
common CIFAR setting (mdistiller, torchdistill), with the same normalisation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..losses.relations import rkd_angle, rkd_distance
from ..registry import METHODS
from ._zoo import feature, non_negative, row_mask, select_rows, skipped
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("rkd")
class RKD(Method):
    """Distance- and angle-wise relation matching of penultimate embeddings."""

    def __init__(self, student_layer: str = "embed", teacher_layer: str = "embed", distance_weight: float = 25.0,
                 angle_weight: float = 50.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        non_negative("rkd", distance_weight=distance_weight, angle_weight=angle_weight, ce_weight=ce_weight)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.distance_weight, self.angle_weight, self.ce_weight = (
            float(distance_weight), float(angle_weight), float(ce_weight))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("rkd", teacher)
        mask = row_mask(batch)
        s = select_rows(feature(student, self.student_layers[0], "student", "rkd"), mask)
        t = select_rows(feature(teacher, self.teacher_layers[0], "teacher", "rkd"), mask)
        out: dict[str, Tensor] = {}
        # batches too small for a relation (a last batch of 1-2 examples) contribute 0
        if self.distance_weight > 0:
            d = rkd_distance(s, t).mean() if len(s) >= 2 else skipped(s)
            out["rkd_distance"] = self.distance_weight * d
        if self.angle_weight > 0:
            a = rkd_angle(s, t).mean() if len(s) >= 3 else skipped(s)
            out["rkd_angle"] = self.angle_weight * a
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
