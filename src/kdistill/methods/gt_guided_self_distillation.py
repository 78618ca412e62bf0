"""``gt_guided_self_distillation``: self-distillation with ground-truth-guided targets.

Borup & Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed
by Self-Distillation" (NeurIPS 2021; the issue lists it as 2023).

In self-distillation the teacher is an *earlier copy of the same model* (generation k-1 trains
generation k, "born-again"). Pure self-distillation acts as an increasingly strong regulariser and
collapses after a few generations; mixing the ground truth back into the targets dampens it:

    q = (1 - label_weight) * softmax(z_t / T) + label_weight * onehot(y)
    L = weight * T^2 * CE(q, softmax(z_s / T))

When to use: no bigger teacher exists; train the model once on labels, then run this method with that
model as ``teacher`` (same architecture) for one or more generations. ``label_weight = 0`` is plain
self-distillation and ``1`` plain supervised training. The runner provides the earlier copy as the
teacher; the method never stores a model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import expect
from ..losses.classification import guided_targets
from ..losses.logits import soft_cross_entropy
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from ._zoo import labels_of, non_negative, positive, row_mask
from .base import Method, ModelOutput, require_teacher


@METHODS.register("gt_guided_self_distillation")
class GTGuidedSelfDistillation(Method):
    """Cross-entropy against a convex mix of the earlier model's predictions and the one-hot label."""

    cacheable = True

    def __init__(self, label_weight: float = 0.5, kd_temperature: float = 1.0, weight: float = 1.0) -> None:
        super().__init__()
        expect(0.0 <= label_weight <= 1.0, "gt_guided_self_distillation label_weight", label_weight,
               "a number in [0, 1]")
        positive("gt_guided_self_distillation", kd_temperature=kd_temperature)
        non_negative("gt_guided_self_distillation", weight=weight)
        self.label_weight, self.kd_temperature, self.weight = float(label_weight), float(kd_temperature), float(weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("gt_guided_self_distillation", teacher)
        labels = labels_of(batch, "gt_guided_self_distillation", student.logits.shape[-1])
        t = self.kd_temperature
        q = guided_targets(teacher.logits.detach(), labels, label_weight=self.label_weight, kd_temperature=t)
        ce = soft_cross_entropy(student.logits, q, kd_temperature=t)
        return {"guided": self.weight * kd_scale(t) * masked_mean(ce, row_mask(batch))}
