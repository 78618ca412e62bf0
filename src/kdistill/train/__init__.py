"""Training: the loop, optimizers and schedules, atomic checkpoints."""

from .loop import DistillStep, FitResult, end_distributed, fit, make_accelerator

__all__ = ["DistillStep", "FitResult", "end_distributed", "fit", "make_accelerator"]
