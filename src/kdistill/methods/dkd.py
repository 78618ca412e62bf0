"""``dkd``: Decoupled Knowledge Distillation.

Zhao, Cui, Song, Qiu & Liang, 2022, "Decoupled Knowledge Distillation" (CVPR).

Classic KD splits exactly into a target-class term and a non-target-class term,
``KL = TCKD + (1 - p_t,y) * NCKD``; the factor ``(1 - p_t,y)`` suppresses NCKD exactly when the teacher is
confident, which is when its "dark knowledge" is most reliable. DKD decouples and re-weights them:

    L = warmup(step) * T^2 * (alpha * TCKD + beta * NCKD) + ce_weight * CE(z_s, y)

with ``TCKD = KL(b_t || b_s)`` on the binary ``[p_y, 1 - p_y]`` and ``NCKD = KL(p̂_t || p̂_s)`` on the softmax
over non-target classes, both at temperature ``T``. ``warmup(step)`` ramps linearly from 0 to 1 over
``warmup_steps`` optimizer-side calls in training mode (the paper warms up over 20 epochs; pass
``20 * steps_per_epoch``). When to use: any classifier with labels; beta in 1-8 (larger for more
confident teachers). Paper defaults (CIFAR-100): alpha 1, beta 8, T 4; ImageNet: alpha 0.5, beta 0.5. With
10-class teachers and small students beta 8 lost 0.9-13.5 points (docs/benchmarks.md); the classic recipe uses 0.5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..losses.classification import dkd_terms
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from ._zoo import labels_of, non_negative, positive, row_mask
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("dkd")
class DKD(Method):
    """Decoupled KD: ``T^2 (alpha TCKD + beta NCKD) + ce_weight CE``, with an optional linear warm-up."""

    cacheable = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, kd_temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup_steps: int = 0) -> None:
        super().__init__()
        non_negative("dkd", alpha=alpha, beta=beta, ce_weight=ce_weight, warmup_steps=warmup_steps)
        positive("dkd", kd_temperature=kd_temperature)
        self.alpha, self.beta, self.kd_temperature = float(alpha), float(beta), float(kd_temperature)
        self.ce_weight, self.warmup_steps = float(ce_weight), int(warmup_steps)
        # counts training-mode calls so the warm-up survives checkpoint / resume (buffers are saved)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("dkd", teacher)
        mask = row_mask(batch)
        labels = labels_of(batch, "dkd", student.logits.shape[-1])
        tckd, nckd = dkd_terms(student.logits, teacher.logits, labels, kd_temperature=self.kd_temperature)
        t2 = kd_scale(self.kd_temperature)
        ramp = 1.0
        if self.warmup_steps > 0:
            ramp = min(float(self.step) / self.warmup_steps, 1.0)
        if self.training:
            self.step += 1
        tckd_m, nckd_m = masked_mean(tckd, mask), masked_mean(nckd, mask)
        self.log("tckd", tckd_m)
        self.log("nckd", nckd_m)
        out = {"tckd": ramp * self.alpha * t2 * tckd_m, "nckd": ramp * self.beta * t2 * nckd_m}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
