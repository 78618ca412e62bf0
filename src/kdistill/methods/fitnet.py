"""``fitnet``: hint-based feature distillation.

Romero et al., 2015, "FitNets: Hints for Thin Deep Nets".

    L = hint_weight * || r(f_s) - f_t ||^2  +  alpha * T^2 * KL(p_t^T || p_s^T)  +  (1 - alpha) * CE

``f_s`` is the output of ``student_layer``, ``f_t`` of ``teacher_layer`` (hooked), and ``r`` a learned
projector (Linear for vectors, 1x1 conv + BN for maps) owned by the method and optimised with the
student. Use it when the student is much thinner than the teacher and intermediate supervision helps.
The paper trains the hint first and then KD; here both terms run jointly (as torchdistill and
mdistiller do), with ``alpha = 0`` by default (hint + label CE).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import expect
from ..losses.features import hint_mse
from ..losses.logits import forward_kl
from ..losses.reduce import kd_scale, masked_mean
from ..modules.projectors import FeatureProjector
from ..registry import METHODS
from .base import Method, ModelOutput, SetupInfo, label_loss, require_teacher


@METHODS.register("fitnet")
class FitNet(Method):
    """Hint MSE through a learned projector on hooked intermediate features."""

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        hint_weight: float = 1.0,
        alpha: float = 0.0,
        kd_temperature: float = 4.0,
    ) -> None:
        super().__init__()
        expect(hint_weight >= 0, "fitnet hint_weight", hint_weight, "a non-negative number")
        expect(0.0 <= alpha <= 1.0, "fitnet alpha", alpha, "a number in [0, 1]")
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.hint_weight, self.alpha, self.kd_temperature = float(hint_weight), float(alpha), float(kd_temperature)
        self.projector: FeatureProjector | None = None

    def setup(self, info: SetupInfo) -> None:
        self.projector = FeatureProjector(
            info.student_features[self.student_layer], info.teacher_features[self.teacher_layer]
        )

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("fitnet", teacher)
        if self.projector is None:
            raise RuntimeError("fitnet: setup() was not called, so the projector does not exist yet")
        s_feat = self.projector(student.features[self.student_layer])
        t_feat = teacher.features[self.teacher_layer]
        out = {"hint": self.hint_weight * hint_mse(s_feat, t_feat).mean()}
        if self.alpha > 0:
            t = self.kd_temperature
            kl = forward_kl(student.logits, teacher.logits, kd_temperature=t)
            out["kd"] = self.alpha * kd_scale(t) * masked_mean(kl, batch.get("mask"))
        if self.alpha < 1:
            out["ce"] = (1.0 - self.alpha) * label_loss(student.logits, batch)
        return out
