"""``glnn``: a graph neural network distilled into an MLP on node features alone.

Zhang, Liu, Sun & Shah, 2022, "Graph-less Neural Networks: Teaching Old MLPs New Tricks via Distillation" (ICLR).

    L = (1 - alpha) * mean_{v in V_L} CE(z_v, y_v) + alpha * T^2 * mean_{v in V} KL(p_t(v) || p_s(v))

with ``V_L`` the labelled training nodes and ``V`` every node seen during training (labelled or not): the GNN's
soft labels carry what its neighbourhood aggregation found, also on the nodes that have no label, and the MLP
learns to predict them from the node's own features. At inference the MLP needs no neighbour fetch, which is what
makes it fast to serve (task ``graph`` reports both latencies). Use it when a GNN is accurate but too slow or
too costly to serve; the gain is largest on nodes whose own features are ambiguous and in the transductive
setting (the student trains on the test nodes' features with the teacher's labels).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..data.lm import label_mask
from ..errors import expect
from ..losses.logits import cross_entropy, forward_kl
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from .base import Method, ModelOutput, require_teacher


@METHODS.register("glnn")
class GLNN(Method):
    """Label CE on the labelled nodes plus forward KL to the GNN's soft labels on every node, weighted by
    ``alpha`` (the teacher's share) and scaled by ``kd_scale(kd_temperature)``. The default ``alpha = 1`` (the
    soft labels alone, which are close to the labels on the labelled nodes) is what the validation nodes of the
    WordNet benchmark preferred over 0.8 and 0.5 (``docs/graphs.md``); lower it to weigh the labels in."""

    cacheable = True
    trains_on_unlabelled = True

    def __init__(self, alpha: float = 1.0, kd_temperature: float = 1.0) -> None:
        super().__init__()
        expect(0.0 <= alpha <= 1.0, "glnn alpha", alpha, "a number in [0, 1] (weight of the teacher term)")
        expect(kd_temperature > 0, "glnn kd_temperature", kd_temperature, "a positive number")
        self.alpha, self.kd_temperature = float(alpha), float(kd_temperature)

    @property
    def teacher_divergence_term(self) -> str | None:
        return "kd"

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("glnn", teacher)
        t = self.kd_temperature
        out = {"kd": self.alpha * kd_scale(t) * masked_mean(forward_kl(student.logits, teacher.logits,
                                                                       kd_temperature=t))}
        if self.alpha < 1.0:
            labels = batch["labels"]
            out["ce"] = (1.0 - self.alpha) * masked_mean(cross_entropy(student.logits, labels), label_mask(labels))
        return out
