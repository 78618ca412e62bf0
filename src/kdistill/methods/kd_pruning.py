"""``kd_pruning``: data pruning by teacher-derived scores, the student trained on the kept examples with the
teacher's soft labels.

Ben-Baruch, Botach, Kviatkovsky, Aggarwal & Medioni, "Distilling the Knowledge in Data Pruning" (arXiv 2024;
ICML 2025).

Every training example is scored by the teacher (``score``): ``el2n`` ``||p_t - onehot(y)||_2`` (Paul et al.,
2021), ``entropy`` of ``p_t``, ``margin`` ``p_t[y] - max_{c != y} p_t[c]`` (read as hardness with its sign flipped),
or ``random``; ``per_class`` examples of every class are kept, the easiest (``keep: easy``) or the hardest
(``keep: hard``). The set stores the teacher's probabilities at ``kd_temperature`` as soft labels, and a student
trains on it with::

    L = alpha * T^2 * CE(p_t^T, softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

(the KD term in cross-entropy form: its gradient is that of ``KL(p_t^T || p_s^T)``). The paper's findings: with
the teacher's soft labels a pruned set loses much less accuracy, random pruning (``score: random``) is then as good
as or better than score-based pruning, and the weight of the KD term should grow as less data is kept (``alpha``).
``keep: easy`` is the default because at the small kept fractions of dataset distillation easy, prototypical
examples train better than hard ones (Sorscher et al., "Beyond neural scaling laws: beating power law scaling via
data pruning", 2022); ``keep: hard`` is the classic choice when most of the data is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.distilled import DistilledSet
from ..data.selection import per_class_random, select_by_score
from ..errors import expect
from ..losses.distilled_data import el2n, prediction_margin
from ..losses.logits import cross_entropy, entropy, soft_cross_entropy
from ..losses.reduce import kd_scale, masked_mean
from ..models.classifiers import predict_logits
from ..registry import METHODS
from ._distill_data import DataDistillMethod, check_budget, require
from .base import ModelOutput

SCORES = ("el2n", "entropy", "margin", "random")


def hardness(score: str, logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example hardness (higher = harder) from a teacher's logits ``(N, C)``."""
    if score == "el2n":
        return el2n(logits, labels)
    if score == "entropy":
        return entropy(logits)
    if score == "margin":
        return -prediction_margin(logits, labels)
    raise ValueError(f"unknown score {score!r}")


@METHODS.register("kd_pruning")
class KDPruning(DataDistillMethod):
    """KD-based data pruning (Distilling the Knowledge in Data Pruning, 2024): keep examples by teacher-derived
    scores, train on them with the teacher's soft labels."""

    def __init__(self, score: str = "el2n", keep: str = "easy", kd_temperature: float = 4.0,
                 alpha: float = 0.9) -> None:
        super().__init__()
        expect(score in SCORES, "kd_pruning score", score, f"one of {', '.join(SCORES)}")
        expect(keep in ("easy", "hard"), "kd_pruning keep", keep, "'easy' (lowest hardness) or 'hard' (highest)")
        expect(kd_temperature > 0, "kd_pruning kd_temperature", kd_temperature, "a positive number")
        expect(0.0 <= alpha <= 1.0, "kd_pruning alpha", alpha, "a number in [0, 1] (weight of the soft labels)")
        self.score, self.keep = score, keep
        self.kd_temperature, self.alpha = float(kd_temperature), float(alpha)

    def distill_data(self, *, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
                     teacher: nn.Module | None, build_model: Callable[[], nn.Module], seed: int,
                     cache_dir: Path | None = None, cache_key: dict[str, Any] | None = None,
                     progress: bool = False) -> DistilledSet:
        check_budget("kd_pruning", per_class, labels, num_classes)
        teacher = require("kd_pruning", "a teacher (its scores and soft labels)", teacher)
        logits = predict_logits(teacher, inputs).float()
        if self.score == "random":
            kept = per_class_random(labels, num_classes, per_class, generator=torch.Generator().manual_seed(seed))
            kept = kept.sort().values
            scores = None
        else:
            scores = hardness(self.score, logits, labels)
            kept = select_by_score(scores, labels, keep=self.keep, per_class=per_class, num_classes=num_classes)
        soft = torch.softmax(logits[kept] / self.kd_temperature, -1)
        meta = {"kd_temperature": self.kd_temperature, "score": self.score, "keep": self.keep,
                "teacher_accuracy_on_kept": float((logits[kept].argmax(1) == labels[kept]).float().mean())}
        if scores is not None:
            meta["mean_hardness_kept"] = float(scores[kept].mean())
            meta["mean_hardness_all"] = float(scores.mean())
        return DistilledSet(inputs=inputs[kept].detach().clone().float(), labels=labels[kept].clone(),
                            soft_labels=soft, tensors={"source_indices": kept}, meta=meta)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        probs = batch.get("target_probs")
        if probs is None:  # a set without soft labels: plain cross-entropy
            return {"ce": masked_mean(cross_entropy(student.logits, batch["labels"]), batch.get("mask"))}
        t = self.kd_temperature
        out = {"kd": self.alpha * kd_scale(t) * masked_mean(
            soft_cross_entropy(student.logits, probs, kd_temperature=t), batch.get("mask"))}
        if self.alpha < 1.0:
            out["ce"] = (1.0 - self.alpha) * masked_mean(cross_entropy(student.logits, batch["labels"]),
                                                         batch.get("mask"))
        return out
