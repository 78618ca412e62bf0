"""``ofa``: One-for-All KD for heterogeneous architectures.

Hao et al., 2023, "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation" (NeurIPS).

Intermediate features of unlike architectures (CNN vs MLP vs transformer) live in incomparable spaces,
but every architecture's features can be mapped to the *logit* space, where teachers are comparable.
Each hooked student stage ``k`` gets its own small head ``h_k`` (global average pool over any spatial /
token axes, then Linear-GELU-Linear to C classes), and each head's logits, plus the student's final
logits, are trained with the OFA target-enhanced loss against the teacher's logits:

    L_ofa(z, z_t) = -sum_c [(p_t,c + 1[c = y])^eps - 1[c = y]] log p_c     (the authors' code)
    L = ofa_weight * (L_ofa(z_s, z_t) + sum_k L_ofa(h_k(f_k), z_t)) + ce_weight * (CE(z_s) + sum_k CE(h_k(f_k)))

``eps = 1`` is plain KD cross-entropy; ``eps > 1`` up-weights the target class, more where the teacher is
confident in it (default 1.5 here). The stage heads are method parameters (dropped at export). When to
use: teacher and student of different families (e.g. CNN teacher -> MLP student); T = 1 as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError
from ..losses.classification import ofa_loss
from ..losses.reduce import masked_mean
from ..registry import METHODS
from ._zoo import feature, labels_of, non_negative, positive, row_mask
from .base import Method, ModelOutput, SetupInfo, label_loss, require_teacher


class _StageHead(nn.Module):
    """Pool every axis after the channel axis, then a 2-layer MLP to class logits."""

    def __init__(self, channels: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(2).mean(2)
        return self.net(x.float())


@METHODS.register("ofa")
class OFA(Method):
    """Per-stage logit heads on the student, all trained with the OFA loss against the teacher."""

    cacheable = True  # needs only the teacher's logits

    def __init__(self, student_layers: Sequence[str] = (), ofa_eps: float = 1.5, ofa_weight: float = 1.0,
                 kd_temperature: float = 1.0, ce_weight: float = 1.0, head_hidden: int = 128,
                 token_layout: bool = False) -> None:
        super().__init__()
        student_layers = [student_layers] if isinstance(student_layers, str) else list(student_layers)
        non_negative("ofa", ofa_eps=ofa_eps, ofa_weight=ofa_weight, ce_weight=ce_weight)
        positive("ofa", kd_temperature=kd_temperature, head_hidden=head_hidden)
        self.student_layers = tuple(student_layers)
        self.ofa_eps, self.ofa_weight, self.kd_temperature = float(ofa_eps), float(ofa_weight), float(kd_temperature)
        self.ce_weight, self.head_hidden = float(ce_weight), int(head_hidden)
        self.token_layout = bool(token_layout)  # features (B, T, D) instead of (B, C, *spatial)
        self.heads = nn.ModuleDict()

    def setup(self, info: SetupInfo) -> None:
        num_classes = info.num_classes or (info.teacher_logits[-1] if info.teacher_logits else None)
        if num_classes is None:
            raise KDistillError("ofa setup: got neither num_classes nor teacher_logits; expected one to size the "
                                "stage heads.")
        for name in self.student_layers:
            shape = info.student_features[name]
            channels = shape[-1] if self.token_layout else (shape[1] if len(shape) > 1 else 1)
            self.heads[_key(name)] = _StageHead(int(channels), int(num_classes), self.head_hidden)

    def _stage_logits(self, student: ModelOutput) -> list[Tensor]:
        outs = []
        for name in self.student_layers:
            f = feature(student, name, "student", "ofa")
            if self.token_layout:
                f = f.transpose(1, 2)  # (B, T, D) -> (B, D, T) so the head pools over tokens
            outs.append(self.heads[_key(name)](f))
        return outs

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("ofa", teacher)
        if len(self.heads) != len(self.student_layers):
            raise RuntimeError("ofa: setup() was not called, so the stage heads do not exist yet")
        mask = row_mask(batch)
        labels = labels_of(batch, "ofa", student.logits.shape[-1])
        t_logits = teacher.logits.detach()
        all_logits = [student.logits, *self._stage_logits(student)]
        ofa = torch.zeros((), device=student.logits.device)
        ce = torch.zeros((), device=student.logits.device)
        for z in all_logits:
            ofa = ofa + masked_mean(ofa_loss(z, t_logits, labels, eps=self.ofa_eps,
                                             kd_temperature=self.kd_temperature), mask)
            if self.ce_weight > 0:
                ce = ce + label_loss(z, batch)
        out = {"ofa": self.ofa_weight * ofa}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * ce
        return out


def _key(name: str) -> str:
    return name.replace(".", "__")
