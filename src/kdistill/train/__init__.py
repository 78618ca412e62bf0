"""Training: the loop, optimizers and schedules, atomic checkpoints."""

from .loop import DistillStep, FitResult, fit, make_accelerator

__all__ = ["DistillStep", "FitResult", "fit", "make_accelerator"]
