"""``attention_transfer``: activation-based attention transfer (AT).

Zagoruyko & Komodakis, 2017, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer" (ICLR).

For each pair of hooked conv stages (``student_layers[k]``, ``teacher_layers[k]``), the spatial attention
map ``Q = mean_c |f_c|^p`` (flattened, L2-normalised) of the student is pulled towards the teacher's:

    L = at_weight * sum_k mean_j (Q_s,k,j - Q_t,k,j)^2  +  ce_weight * CE(z_s, y)

Channel counts may differ (maps are channel-averaged); spatial sizes may differ (the student map is
pooled to the teacher's). When to use: conv teacher and conv student with stages of matching
resolution; no extra parameters. ``at_weight = 1000`` is the authors' code (szagoruyko/attention-transfer):
``beta * sum_k at_loss_k`` with ``beta = 1e3``, where ``at_loss`` is the mean over batch and map positions
of the squared difference of the normalised maps, the same per-element mean as here. Because it is a mean
per position, one mismatch weighs more on smaller maps: the authors' maps have 64-1024 positions, and on maps of
10-200 positions 1000 swamps the label loss (docs/benchmarks.md); the classic recipe uses 1. Needs ``(B, C, L)``
or ``(B, C, H, W)`` features: not applicable to MLPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import expect
from ..losses.reduce import masked_mean
from ..losses.relations import attention_transfer
from ..registry import METHODS
from ._zoo import feature, non_negative, positive, row_mask
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("attention_transfer")
class AttentionTransfer(Method):
    """Match normalised spatial attention maps of paired conv stages."""

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], at_weight: float = 1000.0,
                 p: float = 2.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        student_layers = [student_layers] if isinstance(student_layers, str) else list(student_layers)
        teacher_layers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
        expect(len(student_layers) == len(teacher_layers) and len(student_layers) > 0,
               "attention_transfer layers", (student_layers, teacher_layers),
               "two non-empty lists of the same length (paired stages)")
        non_negative("attention_transfer", at_weight=at_weight, ce_weight=ce_weight)
        positive("attention_transfer", p=p)
        self.student_layers, self.teacher_layers = tuple(student_layers), tuple(teacher_layers)
        self.at_weight, self.p, self.ce_weight = float(at_weight), float(p), float(ce_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("attention_transfer", teacher)
        mask = row_mask(batch)
        total = torch.zeros((), device=student.logits.device)
        for s_name, t_name in zip(self.student_layers, self.teacher_layers):
            s = feature(student, s_name, "student", "attention_transfer")
            t = feature(teacher, t_name, "teacher", "attention_transfer")
            total = total + masked_mean(attention_transfer(s, t, p=self.p), mask)
        out = {"at": self.at_weight * total}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
