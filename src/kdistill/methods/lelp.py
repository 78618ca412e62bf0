"""``lelp``: Learning Embedding Linear Projections — pseudo-subclass distillation for few-class problems.

"Linear Projections of Teacher Embeddings for Few-Class Distillation" (LELP, 2024).

With 2-5 classes the teacher's softmax carries almost no "dark knowledge" (one number for a binary
problem). LELP recovers it from the teacher's *penultimate embedding*: informative linear directions of
that space split each class into pseudo-subclasses, and the student learns the subclass distribution.

Our implementation (a reading of the paper's idea; the exact construction here is ours):

* ``setup``: one pass of the frozen teacher over the training set; for every class ``c`` the top
  ``num_directions`` principal directions ``v_c,j`` of that class's centred teacher embeddings, with their
  standard deviations ``sigma_c,j``. Each direction gives two subclasses (its two sides): ``S = 2 k``.
* teacher subclass scores ``a_c,(j,+/-) = +/- subclass_scale * <e_t - mu_c, v_c,j> / sigma_c,j`` and the
  subclass distribution ``q_c,s = softmax(z_t / T)_c * softmax_s(a_c)_s`` (its class marginal is exactly
  the teacher's softened prediction);
* the student predicts the within-class split with a linear head on its own embedding (a method
  parameter, dropped at export) and uses its own class logits for the class part, so

      L = lelp_weight * T^2 * KL(q_t || q_s) + ce_weight * CE(z_s, y)
        = lelp_weight * T^2 * [KL(p_t || p_s) + sum_c p_t,c KL(w_t,c || w_s,c)] + ce_weight * CE

  i.e. Hinton KD plus a within-class term that transfers the embedding geometry. The deployed student
  keeps its ordinary C-way head.

When to use: binary and few-class tasks (e.g. breast_cancer, wine) with a neural teacher whose
penultimate layer is hookable. Needs the training loader in ``SetupInfo.extra`` (the loop provides it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError
from ..losses.classification import subclass_kl
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from ._zoo import feature, non_negative, positive, row_mask, teacher_pass
from .base import Method, ModelOutput, SetupInfo, label_loss, require_teacher


def class_directions(embeddings: Tensor, labels: Tensor, num_classes: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class mean ``(C, D)``, top-``k`` principal directions ``(C, k, D)`` and their std ``(C, k)``.
    Classes with fewer than 2 examples get zero directions (their subclasses stay uniform)."""
    d = embeddings.shape[1]
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    dirs = torch.zeros(num_classes, k, d, dtype=torch.float64)
    stds = torch.ones(num_classes, k, dtype=torch.float64)
    for c in range(num_classes):
        e = embeddings[labels == c].double()
        if len(e) == 0:
            continue
        means[c] = e.mean(0)
        if len(e) < 2:
            continue
        centred = e - means[c]
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        n = min(k, vh.shape[0])
        dirs[c, :n] = vh[:n]
        stds[c, :n] = (s[:n] / (len(e) - 1) ** 0.5).clamp_min(1e-8)
    return means, dirs, stds


@METHODS.register("lelp")
class LELP(Method):
    """KD on teacher-embedding pseudo-subclasses (class KD + within-class split along principal directions)."""

    def __init__(self, student_layer: str = "embed", teacher_layer: str = "embed", num_directions: int = 2,
                 subclass_scale: float = 1.0, kd_temperature: float = 2.0, lelp_weight: float = 1.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        positive("lelp", num_directions=num_directions, subclass_scale=subclass_scale, kd_temperature=kd_temperature)
        non_negative("lelp", lelp_weight=lelp_weight, ce_weight=ce_weight)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.k, self.subclass_scale = int(num_directions), float(subclass_scale)
        self.kd_temperature, self.lelp_weight, self.ce_weight = (float(kd_temperature), float(lelp_weight),
                                                                 float(ce_weight))
        self.within_head: nn.Linear | None = None

    def setup(self, info: SetupInfo) -> None:
        num_classes = info.num_classes or (info.teacher_logits[-1] if info.teacher_logits else None)
        if num_classes is None:
            raise KDistillError("lelp setup: got neither num_classes nor teacher_logits; expected one of them.")
        s_dim = 1
        for d in info.student_features[self.student_layers[0]][1:]:
            s_dim *= int(d)
        embs, labels = [], []
        for t, y, _ in teacher_pass(info.extra, self.teacher_layers[0], "lelp"):
            embs.append(t)
            labels.append(y)
        if not embs:
            raise KDistillError("lelp setup: the training loader yielded no labelled examples.")
        means, dirs, stds = class_directions(torch.cat(embs), torch.cat(labels), int(num_classes), self.k)
        self.register_buffer("class_means", means.float())
        self.register_buffer("directions", dirs.float())
        self.register_buffer("direction_std", stds.float())
        self.num_classes = int(num_classes)
        self.within_head = nn.Linear(s_dim, self.num_classes * 2 * self.k)

    def teacher_within(self, embeddings: Tensor) -> Tensor:
        """Teacher subclass scores ``(B, C, 2k)`` from teacher embeddings ``(B, D)``."""
        centred = embeddings.float().unsqueeze(1) - self.class_means.unsqueeze(0)  # (B, C, D)
        proj = torch.einsum("bcd,ckd->bck", centred, self.directions) / self.direction_std  # (B, C, k)
        proj = self.subclass_scale * proj
        return torch.cat([proj, -proj], dim=-1)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("lelp", teacher)
        if self.within_head is None:
            raise RuntimeError("lelp: setup() was not called, so the subclass head does not exist yet")
        mask = row_mask(batch)
        s = feature(student, self.student_layers[0], "student", "lelp").flatten(1)
        t = feature(teacher, self.teacher_layers[0], "teacher", "lelp").flatten(1).detach()
        s_within = self.within_head(s.float()).view(len(s), self.num_classes, 2 * self.k)
        t_within = self.teacher_within(t)
        tt = self.kd_temperature
        kl = subclass_kl(student.logits, s_within, teacher.logits.detach(), t_within, kd_temperature=tt)
        out = {"lelp": self.lelp_weight * kd_scale(tt) * masked_mean(kl, mask)}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
