"""``hinton_kd``: soft-target distillation.

Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network".

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The ``T^2`` factor keeps the gradient scale of the soft term independent of ``T`` (the gradient of the
softened KL shrinks as ``1/T^2``). Use it whenever the teacher's logits are available; with ``alpha = 1``
it is pure function matching (Beyer et al., 2022), which together with teacher-labelled mixup inputs is
"consistent teaching".
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import expect
from ..losses.logits import forward_kl
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("hinton_kd")
class HintonKD(Method):
    """Forward KL at temperature ``kd_temperature`` scaled by T², mixed with label CE by ``alpha``."""

    cacheable = True

    def __init__(self, kd_temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        expect(kd_temperature > 0, "hinton_kd kd_temperature", kd_temperature, "a positive number")
        expect(0.0 <= alpha <= 1.0, "hinton_kd alpha", alpha, "a number in [0, 1] (weight of the teacher term)")
        self.kd_temperature = float(kd_temperature)
        self.alpha = float(alpha)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("hinton_kd", teacher)
        t = self.kd_temperature
        kl = forward_kl(student.logits, teacher.logits, kd_temperature=t)
        out = {"kd": masked_mean(kl, batch.get("mask")) * (self.alpha * kd_scale(t))}  # one multiply, not two
        if self.alpha < 1.0:
            out["ce"] = (1.0 - self.alpha) * label_loss(student.logits, batch)
        return out
