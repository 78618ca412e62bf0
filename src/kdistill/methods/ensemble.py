"""``ensemble``: multi-teacher distillation from the averaged soft predictions (MEAL V2).

Shen & Savvides, 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without
Tricks".

The targets are the average of K teachers' softened predictions; the student is trained on them alone
(no labels by default, as in the paper), with an optional discriminator term that makes student and
teacher-ensemble *prediction vectors* indistinguishable:

    p_bar = (1 / K) sum_k softmax(z_t,k / T)
    L = kd_weight * T^2 * CE(p_bar, softmax(z_s / T))                 (= KL(p_bar || p_s) + const)
      + discriminator_weight * [BCE(D(p_bar), 1) + BCE(D(GRL(p_s)), 0)] + ce_weight * CE(z_s, y)

``D`` is a small MLP on probability vectors owned by the method. The min-max game is run with a single
optimizer through a gradient-reversal layer (GRL): D minimises its BCE while the student receives the
negated gradient, i.e. learns to fool D (Ganin & Lempitsky, 2015). Teacher logits arrive as ``(B, K, C)``
(several teachers, e.g. from :class:`TeacherEnsemble`; batch first so that batched prediction and
offline caches index it like any logits) or ``(B, C)`` (one teacher).
When to use: several strong teachers are available; the averaged target is better calibrated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDistillError
from ..losses.logits import log_probs, soft_cross_entropy
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from ._zoo import non_negative, positive, row_mask
from .base import Method, ModelOutput, SetupInfo, label_loss, require_teacher


class TeacherEnsemble(nn.Module):
    """Several frozen teachers run on the same input; ``forward`` returns logits stacked as ``(B, K, C)``."""

    def __init__(self, teachers: Sequence[nn.Module]) -> None:
        super().__init__()
        if not teachers:
            raise KDistillError("TeacherEnsemble: got no teachers, expected at least one model.")
        self.teachers = nn.ModuleList(teachers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([t(x) for t in self.teachers], dim=1)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return -grad


def ensemble_probs(teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """Average of the softened predictions over the teacher axis: ``(B, K, C) -> (B, C)``; ``(B, C)`` passes
    through softmax."""
    p = log_probs(teacher_logits, kd_temperature).exp()
    return p.mean(1) if teacher_logits.dim() == 3 else p


@METHODS.register("ensemble")
class Ensemble(Method):
    """Soft cross-entropy to the mean of several teachers' predictions, optional adversarial term."""

    cacheable = True

    def __init__(self, kd_temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 discriminator_weight: float = 0.0, discriminator_hidden: int = 64) -> None:
        super().__init__()
        positive("ensemble", kd_temperature=kd_temperature, discriminator_hidden=discriminator_hidden)
        non_negative("ensemble", kd_weight=kd_weight, ce_weight=ce_weight, discriminator_weight=discriminator_weight)
        self.kd_temperature, self.kd_weight, self.ce_weight = float(kd_temperature), float(kd_weight), float(ce_weight)
        self.discriminator_weight, self.discriminator_hidden = float(discriminator_weight), int(discriminator_hidden)
        self.discriminator: nn.Module | None = None

    def setup(self, info: SetupInfo) -> None:
        if self.discriminator_weight > 0:
            num_classes = info.num_classes or (info.student_logits[-1] if info.student_logits else None)
            if num_classes is None:
                raise KDistillError("ensemble setup: got neither num_classes nor student_logits; expected one to "
                                    "size the discriminator.")
            h = self.discriminator_hidden
            self.discriminator = nn.Sequential(nn.Linear(num_classes, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("ensemble", teacher)
        mask = row_mask(batch)
        t = self.kd_temperature
        target = ensemble_probs(teacher.logits.detach(), kd_temperature=t)
        if target.shape != student.logits.shape:
            raise KDistillError(f"ensemble: teacher logits {tuple(teacher.logits.shape)} vs student "
                                f"{tuple(student.logits.shape)}; expected (B, K, C) or (B, C) with the student's B, C.")
        out = {"kd": self.kd_weight * kd_scale(t) * masked_mean(soft_cross_entropy(student.logits, target,
                                                                             kd_temperature=t), mask)}
        if self.discriminator_weight > 0:
            if self.discriminator is None:
                raise RuntimeError("ensemble: setup() was not called, so the discriminator does not exist yet")
            ps = log_probs(student.logits, t).exp()
            d_teacher = self.discriminator(target).squeeze(-1)
            d_student = self.discriminator(_GradReverse.apply(ps)).squeeze(-1)
            bce = (F.binary_cross_entropy_with_logits(d_teacher, torch.ones_like(d_teacher), reduction="none")
                   + F.binary_cross_entropy_with_logits(d_student, torch.zeros_like(d_student), reduction="none"))
            out["adversarial"] = self.discriminator_weight * masked_mean(bce, mask)
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
