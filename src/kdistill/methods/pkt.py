"""``pkt``: Probabilistic Knowledge Transfer.

Passalis & Tefas, 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV).

Model each embedding space by the conditional probabilities of neighbours under a cosine kernel,
``p(j | i) = K(x_i, x_j) / sum_k K(x_i, x_k)`` with ``K = (cos + 1) / 2``, and match them:

    L = pkt_weight * (1 / B^2) sum_{i, j} p_t(j | i) log(p_t(j | i) / p_s(j | i)) + ce_weight * CE(z_s, y)

i.e. ``pkt_weight * mean_i KL(p_t(. | i) || p_s(. | i)) / B``: the mean over all ``B^2`` entries of the
``B x B`` matrix, as in the PKT authors' code and mdistiller (``eps = 1e-7`` inside the logs), so the
weight means the same at any batch size. No projector: widths may differ. When to use: transferring the
neighbourhood structure of an embedding (retrieval, cross-modal), or as a cheap feature term beside CE.
``pkt_weight = 30000`` follows mdistiller's CIFAR setting, with the same normalisation (the entries of
near-uniform kernels are small). On small students it dominates the label loss (-5.4 points on Fashion-MNIST,
docs/benchmarks.md); the classic recipe uses 300, chosen on validation accuracy.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..losses.relations import pkt
from ..registry import METHODS
from ._zoo import feature, non_negative, row_mask, select_rows, skipped
from .base import Method, ModelOutput, label_loss, require_teacher


@METHODS.register("pkt")
class PKT(Method):
    """KL between cosine-kernel neighbour distributions of student and teacher embeddings."""

    def __init__(self, student_layer: str = "embed", teacher_layer: str = "embed", pkt_weight: float = 30000.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        non_negative("pkt", pkt_weight=pkt_weight, ce_weight=ce_weight)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.pkt_weight, self.ce_weight = float(pkt_weight), float(ce_weight)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("pkt", teacher)
        mask = row_mask(batch)
        s = select_rows(feature(student, self.student_layers[0], "student", "pkt"), mask)
        t = select_rows(feature(teacher, self.teacher_layers[0], "teacher", "pkt"), mask)
        out = {"pkt": self.pkt_weight * (pkt(s, t).mean() if len(s) >= 2 else skipped(s))}
        if self.ce_weight > 0:
            out["ce"] = self.ce_weight * label_loss(student.logits, batch)
        return out
