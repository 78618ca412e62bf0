"""``nd_loss``: KD++ = Hinton KD + the feature Norm-and-Direction (ND) loss.

Wang et al., 2023, "Improving Knowledge Distillation via Regularizing Feature
Norm and Direction" (arXiv 2305.17007).

The student's penultimate embedding ``e_s`` (projected to the teacher's width when the widths differ)
is pushed along the teacher's class-mean direction ``c_y`` of its label and towards a large norm:

    L_nd = 1 - <e_s, c_y / ||c_y||> / max(||e_s||, ||e_t||)
    L = nd_weight * mean L_nd + kd_weight * T^2 * KL(p_t || p_s) + ce_weight * CE(z_s, y)

Class means ``(C, D)``, in order of preference: ``SetupInfo.teacher_class_means[teacher_layer]`` when the
runner provides it; else (``exact_means=True``) one pass of the frozen teacher over the training loader
during ``setup`` (the loop passes ``train_loader`` and ``teacher_targets_fn`` in ``SetupInfo.extra``, and
``device`` when not on CPU); else the running mean of every teacher embedding seen per label during
training (exact for a frozen deterministic teacher once every class has been seen). Means live in
buffers, so checkpoints and resume carry them.
When to use: on top of any logit KD (the paper's KD++ / DKD++), for classifiers with a linear head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError
from ..losses.reduce import masked_mean
from ..losses.relations import nd_loss
from ..registry import METHODS
from ._zoo import feature, flat_size, kd_and_ce_terms, labels_of, non_negative, positive, row_mask, teacher_pass
from .base import Method, ModelOutput, SetupInfo, require_teacher


@METHODS.register("nd_loss")
class NDLoss(Method):
    """KD plus alignment of the student embedding with the teacher's class-mean direction and norm."""

    def __init__(self, student_layer: str = "embed", teacher_layer: str = "embed", nd_weight: float = 1.0,
                 kd_weight: float = 1.0, kd_temperature: float = 4.0, ce_weight: float = 1.0,
                 exact_means: bool = True) -> None:
        super().__init__()
        self.exact_means = bool(exact_means)
        non_negative("nd_loss", nd_weight=nd_weight, kd_weight=kd_weight, ce_weight=ce_weight)
        positive("nd_loss", kd_temperature=kd_temperature)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.nd_weight, self.kd_weight = float(nd_weight), float(kd_weight)
        self.kd_temperature, self.ce_weight = float(kd_temperature), float(ce_weight)
        self.projector: nn.Module | None = None
        self.fixed_means = False

    def setup(self, info: SetupInfo) -> None:
        s_shape = info.student_features[self.student_layers[0]]
        t_shape = info.teacher_features[self.teacher_layers[0]]
        s_dim, t_dim = flat_size(s_shape), flat_size(t_shape)
        num_classes = info.num_classes or (info.teacher_logits[-1] if info.teacher_logits else None)
        if num_classes is None:
            raise KDistillError("nd_loss setup: got neither num_classes nor teacher_logits; expected one of them "
                                "to size the class-mean table.")
        self.projector = nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim)
        self.register_buffer("class_sum", torch.zeros(num_classes, t_dim, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(num_classes, dtype=torch.float64))
        given = info.teacher_class_means.get(self.teacher_layers[0])
        if given is not None:
            if tuple(given.shape) != (num_classes, t_dim):
                raise KDistillError(f"nd_loss teacher_class_means: got shape {tuple(given.shape)}, expected "
                                    f"({num_classes}, {t_dim}) (classes x teacher width).")
            self.class_sum.copy_(given.double())
            self.class_count.fill_(1.0)
            self.fixed_means = True
        elif self.exact_means and "train_loader" in info.extra and "teacher_targets_fn" in info.extra:
            self._exact_means(info.extra)

    @torch.no_grad()
    def _exact_means(self, extra: dict[str, Any]) -> None:
        """One pass of the frozen teacher over the training set: the exact per-class mean embedding."""
        for t, labels, _ in teacher_pass(extra, self.teacher_layers[0], "nd_loss"):
            self.class_sum.index_add_(0, labels, t)
            self.class_count.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        self.fixed_means = True

    def class_means(self) -> Tensor:
        return (self.class_sum / self.class_count.clamp_min(1.0).unsqueeze(1)).float()

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("nd_loss", teacher)
        if self.projector is None:
            raise RuntimeError("nd_loss: setup() was not called, so the projector does not exist yet")
        mask = row_mask(batch)
        labels = labels_of(batch, "nd_loss", student.logits.shape[-1])
        s = self.projector(feature(student, self.student_layers[0], "student", "nd_loss").flatten(1))
        t = feature(teacher, self.teacher_layers[0], "teacher", "nd_loss").flatten(1).detach()
        if self.training and not self.fixed_means:
            keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask
            self.class_sum.index_add_(0, labels[keep], t[keep].double())
            self.class_count.index_add_(0, labels[keep], torch.ones_like(labels[keep], dtype=torch.float64))
        nd = nd_loss(s, t, self.class_means().to(s.device), labels)
        out = {"nd": self.nd_weight * masked_mean(nd, mask)}
        out.update(kd_and_ce_terms(student, teacher, batch, kd_weight=self.kd_weight,
                                   kd_temperature=self.kd_temperature, ce_weight=self.ce_weight, mask=mask))
        return out
