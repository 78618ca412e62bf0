"""``dist``: DIST, distillation from a stronger teacher by correlation.

Huang, You, Wang, Qian & Xu, 2022, "Knowledge Distillation from A Stronger Teacher" (NeurIPS).

Exact KL matching is too strict when the teacher is much stronger; DIST only asks the student to
preserve the teacher's *relations*, measured by Pearson correlation ``rho`` of the softened predictions
``p = softmax(z / T)``:

    L = T^2 * (beta * mean_i [1 - rho(p_s[i, :], p_t[i, :])]      (inter-class, per example)
             + gamma * mean_c [1 - rho(p_s[:, c], p_t[:, c])])    (intra-class, over the batch)
        + ce_weight * CE(z_s, y)

When to use: large teacher-student capacity gaps, strong teachers, label-smoothing-like teachers.
Defaults (beta = gamma = 1, T = 1) follow the official code. The intra-class term needs B >= 2.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..losses.classification import dist_inter_class, dist_intra_class
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from ._zoo import non_negative, positive, row_mask, select_rows, skipped
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("dist")
class DIST(Method):
    """Inter- and intra-class Pearson-correlation matching of softened predictions."""

    cacheable = True

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, kd_temperature: float = 1.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        non_negative("dist", beta=beta, gamma=gamma, ce_weight=ce_weight)
        positive("dist", kd_temperature=kd_temperature)
        self.beta, self.gamma = float(beta), float(gamma)
        self.kd_temperature, self.ce_weight = float(kd_temperature), float(ce_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("dist", teacher)
        mask = row_mask(batch)
        t, t2 = self.kd_temperature, kd_scale(self.kd_temperature)
        inter = masked_mean(dist_inter_class(student.logits, teacher.logits, kd_temperature=t), mask)
        s_rows, t_rows = select_rows(student.logits, mask), select_rows(teacher.logits, mask)
        intra = dist_intra_class(s_rows, t_rows, kd_temperature=t).mean() if len(s_rows) >= 2 else skipped(s_rows)
        out = {"inter": self.beta * t2 * inter, "intra": self.gamma * t2 * intra}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
