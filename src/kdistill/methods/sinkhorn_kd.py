"""``sinkhorn_kd``: Sinkhorn-distance knowledge distillation (SinKD).

Cui et al., 2024, "Sinkhorn Distance Minimization for Knowledge Distillation" (LREC-COLING).

KL, reverse KL and JS each fail in a known way (mode averaging, mode collapse, vanishing gradients on
disjoint supports). SinKD instead compares the *batch* of student predictions with the batch of teacher
predictions as two point clouds on the simplex, through the entropic optimal-transport cost

    W_eps = <P*, C>,   C_ij = cost(p_s,i, p_t,j),   P* = argmin_{P in U(1/B, 1/B)} <P, C> - eps H(P)
    L = sinkhorn_weight * W_eps + kd_weight * T^2 * KL(p_t || p_s) + ce_weight * CE(z_s, y)

``P*`` comes from log-space Sinkhorn iterations (stable for small ``epsilon``) that stop when the row
marginals are within ``tol`` (L1) or after ``max_iter``; gradients flow through the unrolled iterations.
When to use: as a complement to KL when the student cannot match the teacher's per-example
distribution; cost O(B^2 C) per step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import expect
from ..losses.classification import sinkhorn_distance
from ..losses.logits import forward_kl
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from ._zoo import non_negative, positive, row_mask, select_rows, skipped
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("sinkhorn_kd")
class SinkhornKD(Method):
    """Entropic OT distance between the batch of student and teacher predictions (+ optional KL)."""

    cacheable = True

    def __init__(self, sinkhorn_weight: float = 1.0, epsilon: float = 0.1, max_iter: int = 100, tol: float = 1e-6,
                 cost: str = "l1", kd_temperature: float = 1.0, kd_weight: float = 0.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        non_negative("sinkhorn_kd", sinkhorn_weight=sinkhorn_weight, kd_weight=kd_weight, ce_weight=ce_weight)
        positive("sinkhorn_kd", epsilon=epsilon, max_iter=max_iter, tol=tol, kd_temperature=kd_temperature)
        expect(cost in ("l1", "l2"), "sinkhorn_kd cost", cost, "'l1' or 'l2'")
        self.sinkhorn_weight, self.epsilon, self.max_iter, self.tol = (
            float(sinkhorn_weight), float(epsilon), int(max_iter), float(tol))
        self.cost, self.kd_temperature = cost, float(kd_temperature)
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("sinkhorn_kd", teacher)
        mask = row_mask(batch)
        t = self.kd_temperature
        s_rows, t_rows = select_rows(student.logits, mask), select_rows(teacher.logits, mask)
        if len(s_rows) >= 1:
            w = sinkhorn_distance(s_rows, t_rows, kd_temperature=t, epsilon=self.epsilon, max_iter=self.max_iter,
                                  tol=self.tol, cost=self.cost).mean()
        else:
            w = skipped(s_rows)
        out = {"sinkhorn": self.sinkhorn_weight * w}
        if self.kd_weight > 0:
            kl = forward_kl(student.logits, teacher.logits, kd_temperature=t)
            out["kd"] = self.kd_weight * kd_scale(t) * masked_mean(kl, mask)
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
