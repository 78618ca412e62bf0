"""``logit_standardization``: KD on z-score-normalised logits.

Sun, Ren, Li, Wang & Cao, 2024, "Logit Standardization in Knowledge Distillation" (CVPR).

Sharing one temperature between teacher and student forces the student to match the teacher's logit
*range*, which a small student may not reach. Standardising each logit vector first,
``Z(z) = (z - mean(z)) / std(z)``, leaves only the relations between classes to match:

    L = kd_weight * T^2 * KL(softmax(Z(z_t) / T) || softmax(Z(z_s) / T)) + ce_weight * CE(z_s, y)

The KD term is invariant to ``z_s -> a z_s + b`` (a > 0). When to use: as a drop-in replacement for
``hinton_kd`` (it is a pre-processing of the logits), especially with large capacity gaps. Defaults are
the paper's CIFAR-100 KD setting: T = 2, kd_weight = 9, ce_weight = 0.1.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..losses.classification import standardized_kl
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from ._zoo import non_negative, positive, row_mask
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("logit_standardization")
class LogitStandardization(Method):
    """Hinton KD on per-row z-scored logits."""

    cacheable = True

    def __init__(self, kd_temperature: float = 2.0, kd_weight: float = 9.0, ce_weight: float = 0.1) -> None:
        super().__init__()
        positive("logit_standardization", kd_temperature=kd_temperature)
        non_negative("logit_standardization", kd_weight=kd_weight, ce_weight=ce_weight)
        self.kd_temperature, self.kd_weight, self.ce_weight = float(kd_temperature), float(kd_weight), float(ce_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("logit_standardization", teacher)
        t = self.kd_temperature
        kl = standardized_kl(student.logits, teacher.logits, kd_temperature=t)
        out = {"kd": self.kd_weight * kd_scale(t) * masked_mean(kl, row_mask(batch))}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
