"""Helpers shared by the diffusion step-distillation methods (not a method; no registration)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import KDistillError
from .base import ModelOutput, require_teacher


def diffusion_nets(name: str, student: ModelOutput, teacher: ModelOutput | None) -> tuple[Any, Any]:
    """The student's ``(z, t, y) -> v`` (with gradients) and the stage teacher's (no_grad, guided) from the diffusion
    task's outputs, with an error that names the task when they are missing."""
    teacher = require_teacher(name, teacher)
    s_net, t_net = student.extra.get("net"), teacher.extra.get("net")
    if s_net is None or t_net is None:
        raise KDistillError(f"method {name!r}: the student and teacher outputs carry no extra['net'] (got "
                            f"{sorted(student.extra)} / {sorted(teacher.extra)}); expected the diffusion task's "
                            "denoisers. Use this method with `task: diffusion`.")
    return s_net, t_net


def diffusion_batch(name: str, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(x0, labels)`` of a diffusion batch."""
    if "inputs" not in batch or "labels" not in batch:
        raise KDistillError(f"method {name!r}: batch keys {sorted(batch)}; expected 'inputs' (clean samples) and "
                            "'labels' (class ids), as the diffusion task provides.")
    return batch["inputs"].float(), batch["labels"]


def require_schedule(name: str, schedule: Any) -> Any:
    """The schedule ``prepare_diffusion`` kept, or an error saying that it was never called."""
    if schedule is None:
        raise KDistillError(f"method {name!r}: prepare_diffusion was not called, so it has no noise schedule; the "
                            "diffusion task calls it before training (call it yourself when driving the method "
                            "directly).")
    return schedule
