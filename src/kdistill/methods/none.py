"""``none``: the student trained alone on labels. The baseline every distilled student is compared to."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..registry import METHODS
from .base import Method, ModelOutput, label_loss


@METHODS.register("none")
class NoTeacher(Method):
    """Supervised training without a teacher: ``L = CE(student, labels)`` (or soft cross-entropy on
    mixed targets when an augmentation mixes inputs). No paper: this is the control."""

    cacheable = True
    needs_teacher = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"ce": self.weight * label_loss(student.logits, batch)}
