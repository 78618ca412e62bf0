"""The method contract.

A method is a small ``nn.Module`` that holds only its own extra parameters (projectors, memory banks).
It never stores the student or the teacher. The loop calls::

    losses = method(student_out, teacher_out, batch)   # {term: already-weighted scalar}
    total = sum(losses.values())

``student_out`` / ``teacher_out`` are :class:`ModelOutput` objects; ``teacher_out`` is ``None`` for
methods that do not need a teacher. Each term must be a *mean over the micro-batch* (use
``masked_mean`` with ``batch.get("mask")``); the loop rescales it so that gradient accumulation and
multi-process runs give the same update as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..losses.logits import cross_entropy, soft_cross_entropy
from ..losses.reduce import masked_mean


@dataclass
class ModelOutput:
    """What a forward pass produced: ``logits`` (``(B, C)`` or ``(B, T, V)``), hooked ``features``
    by layer name, and task-specific ``extra`` entries (e.g. cached top-k targets)."""

    logits: Tensor | None
    features: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SetupInfo:
    """What a method may need to size its parameters before training, gathered from one probe batch."""

    student_features: dict[str, tuple[int, ...]]
    teacher_features: dict[str, tuple[int, ...]]
    num_classes: int | None = None
    num_train: int | None = None
    student_logits: tuple[int, ...] | None = None
    teacher_logits: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Optional per-dataset statistics (filled by the runner when it has them; methods fall back to
    # estimating them online). ``teacher_class_means[layer]``: (C, D) mean of the teacher's flattened
    # features of ``layer`` per training class (used by ``nd_loss``).
    teacher_class_means: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set ``student_layers`` / ``teacher_layers`` (layer names to hook),
    and the class flags ``cacheable`` (teacher targets can be precomputed offline) and
    ``needs_teacher``."""

    cacheable: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.student_layers: tuple[str, ...] = ()
        self.teacher_layers: tuple[str, ...] = ()
        self._metrics: dict[str, float] = {}

    def setup(self, info: SetupInfo) -> None:
        """Create shape-dependent parameters. Called once, before the optimizer is built."""

    def log(self, name: str, value: Tensor | float) -> None:
        """Record a diagnostic (not a loss term); the loop collects it with :meth:`pop_metrics`."""
        self._metrics[name] = float(value.detach()) if isinstance(value, Tensor) else float(value)

    def pop_metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError


def label_loss(logits: Tensor, batch: dict[str, Any]) -> Tensor:
    """Mean supervised loss of a batch: soft cross-entropy against ``batch['target_probs']`` when an
    augmentation provided mixed targets, else cross-entropy on ``batch['labels']``."""
    mask = batch.get("mask")
    if batch.get("target_probs") is not None:
        return masked_mean(soft_cross_entropy(logits, batch["target_probs"]), mask)
    return masked_mean(cross_entropy(logits, batch["labels"]), mask)


def require_teacher(name: str, teacher: ModelOutput | None) -> ModelOutput:
    if teacher is None:
        raise RuntimeError(f"method {name!r} needs teacher outputs, but the loop passed none")
    return teacher


def zero_like(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=t.device)
