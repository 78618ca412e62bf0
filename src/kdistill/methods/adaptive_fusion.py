"""``adaptive_fusion``: sample-wise learned fusion of the teacher term and the label term (TGeo-KD).

Hu et al., 2023, "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation"
(TGeo-KD; ICLR 2024).

A fixed ``alpha`` between KD and CE is wrong for many examples (the teacher is sometimes wrong, sometimes
over-confident). TGeo-KD learns a per-example ratio from the *trilateral geometry* of the student
prediction ``s``, the teacher prediction ``t`` and the one-hot label ``y``:

    alpha_i = sigmoid(g_phi(r_i))     r_i = [|s-t|, |s-y|, |t-y|, the three cosines of the triangle's
                                             angles, s_y, t_y, |t - t_bar_y|]   (detached)
    L_student = mean_i [alpha_i T^2 KL(p_t^T || p_s^T) + (1 - alpha_i) CE(s_i, y_i)]   (alpha detached)

``t_bar_y`` is the mean teacher prediction of the example's class in the batch (the inter-sample part of
the geometry). ``g_phi`` is a small MLP owned by the method.

**The bilevel problem and its approximation.** The paper chooses ``phi`` to minimise the student's loss on
held-out data after training on the fused loss (bilevel). Here it is approximated by alternating steps
inside the single optimizer of the loop, first order with a one-step lookahead (Ren et al., 2018):

1. each step, a random ``holdout_fraction`` of the micro-batch is held out: those rows train ``phi``
   and not the student; the other rows train the student with ``alpha`` detached (so the student's loss
   never pulls ``phi`` towards whatever makes the training loss small);
2. the hypergradient ``dL_val / d alpha_i`` of a virtual SGD step ``theta' = theta - eta grad L_student`` is
   taken *restricted to the student's final linear layer*, where per-example gradients are closed-form:
   ``dL_val/d alpha_i = -eta mean_j <g_j^val, d_i> <h~_j, h~_i>`` with ``d_i = dl_i^KD/dz - dl_i^CE/dz``,
   ``g^val = p_s - y`` and ``h~ = [h, 1]`` the head's input (the hooked ``student_layer``, which must feed
   the final linear head, as ``embed`` does in kdistill's models);
3. ``phi`` receives exactly that gradient through the surrogate term
   ``fusion_weight * sum_i alpha_i(phi) * stopgrad(dL_val/d alpha_i)``, which is zero for the student.

So the student and ``phi`` advance in alternation, each step on disjoint rows. Omitted relative to the
paper: the full-network hypergradient (only the head's), and a separate validation split (rows of
the training batch rotate into the held-out role instead).
When to use: noisy labels or imperfect teachers, where the right KD/CE balance differs per example.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import expect
from ..losses.classification import head_gradient_alignment
from ..losses.logits import cross_entropy, forward_kl, log_probs
from ..losses.reduce import kd_scale
from ..registry import METHODS
from ._zoo import feature, labels_of, non_negative, positive, row_mask, skipped
from .base import Method, ModelOutput, require_teacher

NUM_RELATION_FEATURES = 10


def trilateral_features(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """The relation vector ``r_i`` (``(B, 10)``, detached) of the triangle (student, teacher, label)."""
    s = torch.softmax(student_logits.detach().float(), -1)
    t = torch.softmax(teacher_logits.detach().float(), -1)
    y = F.one_hot(labels.long(), s.shape[-1]).float()
    st, sy, ty = s - t, s - y, t - y
    eps = 1e-8

    def cos(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)

    # cosines of the interior angles at s (between s->t and s->y), at t and at y
    ang_s, ang_t, ang_y = cos(-st, -sy), cos(st, -ty), cos(sy, ty)
    s_y = (s * y).sum(-1)
    t_y = (t * y).sum(-1)
    counts = y.sum(0).clamp_min(1.0)
    class_mean_t = (y.t() @ t) / counts.unsqueeze(1)  # (C, C) mean teacher prediction per class in the batch
    inter = (t - class_mean_t[labels.long()]).norm(dim=-1)
    return torch.stack([st.norm(dim=-1), sy.norm(dim=-1), ty.norm(dim=-1), ang_s, ang_t, ang_y, s_y, t_y, inter,
                        torch.ones_like(s_y)], -1)


@METHODS.register("adaptive_fusion")
class AdaptiveFusion(Method):
    """Per-example KD/CE ratio learned from trilateral geometry (bilevel, alternating-step approximation).

    The ratio network is trained by a first-order, head-restricted hypergradient on held-out rows; see
    the module docstring for the approximation."""

    cacheable = True  # reads the teacher's logits only

    def __init__(self, student_layer: str = "embed", kd_temperature: float = 4.0, hidden: int = 32,
                 holdout_fraction: float = 0.25, lookahead_lr: float = 1.0, fusion_weight: float = 1.0) -> None:
        super().__init__()
        positive("adaptive_fusion", kd_temperature=kd_temperature, hidden=hidden, lookahead_lr=lookahead_lr)
        non_negative("adaptive_fusion", fusion_weight=fusion_weight)
        expect(0.0 < holdout_fraction < 1.0, "adaptive_fusion holdout_fraction", holdout_fraction, "a number in (0, 1)")
        self.student_layers = (student_layer,)
        self.kd_temperature, self.holdout_fraction = float(kd_temperature), float(holdout_fraction)
        self.lookahead_lr, self.fusion_weight = float(lookahead_lr), float(fusion_weight)
        self.fusion = nn.Sequential(nn.Linear(NUM_RELATION_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.fusion[2].weight)
        nn.init.zeros_(self.fusion[2].bias)  # alpha = 0.5 everywhere at the start

    def ratio(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        """Per-example fusion ratio ``alpha`` in (0, 1), shape ``(B,)`` (differentiable in phi only)."""
        return torch.sigmoid(self.fusion(trilateral_features(student_logits, teacher_logits, labels)).squeeze(-1))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("adaptive_fusion", teacher)
        mask = row_mask(batch)
        labels = labels_of(batch, "adaptive_fusion", student.logits.shape[-1])
        zs, zt = student.logits, teacher.logits.detach()
        n = zs.shape[0]
        valid = torch.ones(n, dtype=torch.bool, device=zs.device) if mask is None else mask.bool()
        held = torch.zeros_like(valid)
        if self.training:
            # held-out rows rotate randomly (torch RNG: checkpointed by the loop, so resume is exact)
            held = (torch.rand(n, device=zs.device) < self.holdout_fraction) & valid
            if int(held.sum()) == 0 or int((valid & ~held).sum()) == 0:
                held = torch.zeros_like(valid)
        train_rows = valid & ~held
        T = self.kd_temperature
        alpha = self.ratio(zs, zt, labels)
        kd = kd_scale(T) * forward_kl(zs, zt, kd_temperature=T)
        ce = cross_entropy(zs, labels)
        fused = alpha.detach() * kd + (1.0 - alpha.detach()) * ce
        n_train = train_rows.sum().clamp_min(1)
        out = {"fused": torch.where(train_rows, fused, torch.zeros_like(fused)).sum() / n_train}
        self.log("alpha_mean", alpha[valid].mean() if bool(valid.any()) else alpha.new_zeros(()))
        if bool(held.any()) and self.fusion_weight > 0:
            h = feature(student, self.student_layers[0], "student", "adaptive_fusion").flatten(1).detach()
            with torch.no_grad():
                p_s = log_probs(zs).exp()
                p_s_T, p_t_T = log_probs(zs, T).exp(), log_probs(zt, T).exp()
                y = F.one_hot(labels.long(), zs.shape[-1]).float()
                d = T * (p_s_T - p_t_T) - (p_s - y)  # dl_KD/dz - dl_CE/dz per row
                align = head_gradient_alignment(h[train_rows], d[train_rows], h[held], (p_s - y)[held])
                hyper = -self.lookahead_lr * align / n_train  # dL_val / d alpha_i
            out["fusion"] = self.fusion_weight * (alpha[train_rows] * hyper).sum()
        else:
            out["fusion"] = skipped(alpha)
        return out
