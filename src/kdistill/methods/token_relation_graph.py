"""``token_relation_graph``: token-level relationship-graph distillation (TRG).

Zhang, Liu & He, 2023, "Knowledge Distillation via Token-level Relationship Graph" (arXiv 2306.12442).

For models that produce token sequences (a 1-D transformer on MNIST-1D, a small ViT), the teacher's
knowledge is carried by how its tokens relate, not by the token vectors themselves (whose widths differ).
With ``G(X) = softmax_row(cos(X_i, X_j) / tau)`` a row-stochastic similarity graph:

    L_local  = mean_b mean_i KL(G(T_b)_i || G(S_b)_i)        (token graph inside each example)
    L_global = mean_i KL(G(t_bar)_i || G(s_bar)_i)           (graph over the batch of mean-pooled tokens)
    L = local_weight * L_local + global_weight * L_global + kd_weight * T^2 * KL(p_t || p_s) + ce_weight * CE

This implements the paper's two relational ideas (intra-instance token graph and inter-instance
contextual graph) in their simplest form: no learned graph embedding, no token sampling. When the
student has a different number of tokens than the teacher, its tokens are average-pooled to the
teacher's count. Layers must output ``(B, T, D)``, e.g. ``blocks.<i>`` of the ``transformer1d`` model.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError
from ..losses.logits import forward_kl
from ..losses.reduce import masked_mean
from ..losses.relations import token_relation
from ..registry import METHODS
from ._zoo import feature, non_negative, positive, row_mask, select_rows, skipped
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("token_relation_graph")
class TokenRelationGraph(Method):
    """KL between token-similarity graphs (per example and across the batch) of student and teacher."""

    def __init__(self, student_layer: str = "blocks.1", teacher_layer: str = "blocks.1", local_weight: float = 1.0,
                 global_weight: float = 1.0, relation_temperature: float = 0.1, kd_weight: float = 1.0,
                 kd_temperature: float = 4.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        non_negative("token_relation_graph", local_weight=local_weight, global_weight=global_weight,
                     kd_weight=kd_weight, ce_weight=ce_weight)
        positive("token_relation_graph", relation_temperature=relation_temperature, kd_temperature=kd_temperature)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.local_weight, self.global_weight = float(local_weight), float(global_weight)
        self.relation_temperature, self.kd_weight = float(relation_temperature), float(kd_weight)
        self.kd_temperature, self.ce_weight = float(kd_temperature), float(ce_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("token_relation_graph", teacher)
        mask = row_mask(batch)
        s = feature(student, self.student_layers[0], "student", "token_relation_graph")
        t = feature(teacher, self.teacher_layers[0], "teacher", "token_relation_graph")
        if s.dim() != 3 or t.dim() != 3:
            raise KDistillError(
                f"token_relation_graph: got student {tuple(s.shape)} and teacher {tuple(t.shape)} features; expected "
                "token sequences (B, T, D). Hook transformer blocks (e.g. 'blocks.1' of `transformer1d`).")
        if s.shape[1] != t.shape[1]:
            s = F.adaptive_avg_pool1d(s.float().transpose(1, 2), t.shape[1]).transpose(1, 2)
        out: dict[str, Tensor] = {}
        tau = self.relation_temperature
        if self.local_weight > 0:
            out["local"] = self.local_weight * masked_mean(token_relation(s, t, relation_temperature=tau), mask)
        if self.global_weight > 0:
            sp, tp = select_rows(s.float().mean(1), mask), select_rows(t.float().mean(1), mask)
            g = token_relation(sp.unsqueeze(0), tp.unsqueeze(0), relation_temperature=tau).mean() if len(sp) >= 2 \
                else skipped(sp)
            out["global"] = self.global_weight * g
        if self.kd_weight > 0:
            kt = self.kd_temperature
            out["kd"] = self.kd_weight * kt * kt * masked_mean(
                forward_kl(student.logits, teacher.logits, kd_temperature=kt), mask)
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
