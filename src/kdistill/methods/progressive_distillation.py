"""``progressive_distillation``: halve a diffusion sampler's steps, stage by stage.

Salimans & Ho, 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR).

A stage trains a student that takes ``N`` DDIM steps to do what its teacher does in ``2N``. For a training example
``x`` (with class ``y``), a step ``i`` of the student's grid and fresh noise ``eps``::

    t, t', t'' = grid_2N[2i], grid_2N[2i + 1], grid_2N[2i + 2]      (t'' = -1, clean data, after the last step)
    z_t   = alpha_t x + sigma_t eps
    z_t'' = DDIM(teacher, DDIM(teacher, z_t, t -> t'), t' -> t'')        (two teacher steps, guided)
    x~    = (sigma_t z_t'' - sigma_t'' z_t) / (alpha_t'' sigma_t - sigma_t'' alpha_t)
    L     = max(SNR_t, 1) * || x_hat_student(z_t, t) - x~ ||^2

``x~`` is the clean-data prediction with which ONE student DDIM step from ``z_t`` lands exactly on ``z_t''``
(``x~ = z_t''`` when ``t'' = -1``). ``grid_N`` is :meth:`DiffusionSchedule.timesteps` (trailing spacing, the grid the
``ddim`` sampler uses), so ``grid_N[i] = grid_2N[2i]`` and the trained steps are the steps the student samples with.

The loss is on ``x`` with the paper's truncated-SNR weight ``max(SNR, 1)`` rather than on ``v`` (whose MSE is the
``SNR + 1`` weight): both agree at high SNR, but the stages that matter most -- 1 and 2 steps -- train near
``t = T - 1`` where SNR is ~0, and there the x-space term is exactly what the sample is judged on.

Stages: ``start_steps -> start_steps / 2`` against the run's (guided) teacher, then each further halving against a
frozen copy of the previous stage's student (its guidance is baked in), down to ``final_steps``; the task trains the
stages on equal shares of the step budget and the student continues from one stage to the next. The student samples
with ``ddim`` at ``final_steps`` steps. When to use: the reference point of step distillation; it needs training data
(or teacher samples) and ``log2(start_steps / final_steps)`` stages.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import expect
from ..losses.diffusion import progressive_target, truncated_snr_mse
from ..losses.reduce import masked_mean
from ..registry import METHODS
from ._diffusion import diffusion_batch, diffusion_nets, require_schedule
from .base import DiffusionStage, Method, ModelOutput


def _power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@METHODS.register("progressive_distillation")
class ProgressiveDistillation(Method):
    """Each stage halves the DDIM steps: one student step reproduces two steps of its teacher (truncated-SNR x loss)."""

    diffusion_sampler = "ddim"

    def __init__(self, start_steps: int = 16, final_steps: int = 1, weight: float = 1.0) -> None:
        super().__init__()
        for key, value in (("start_steps", start_steps), ("final_steps", final_steps)):
            expect(isinstance(value, int) and _power_of_two(value), f"progressive_distillation {key}", value,
                   "a power of two (1, 2, 4, ...)")
        expect(start_steps > final_steps, "progressive_distillation start_steps", start_steps,
               f"more than final_steps ({final_steps}): each stage halves the teacher's steps",
               "Fix: e.g. start_steps: 16, final_steps: 1 (four stages).")
        expect(weight > 0, "progressive_distillation weight", weight, "a positive number")
        self.start_steps, self.final_steps, self.weight = int(start_steps), int(final_steps), float(weight)
        self.student_steps = self.start_steps // 2
        self.schedule: nn.Module | None = None

    def diffusion_stages(self) -> list[DiffusionStage]:
        n = int(math.log2(self.start_steps // self.final_steps))
        return [DiffusionStage(f"steps_{self.start_steps >> (i + 1)}", teacher="teacher" if i == 0 else "previous")
                for i in range(n)]

    def set_diffusion_stage(self, index: int) -> None:
        stages = len(self.diffusion_stages())
        expect(0 <= index < stages, "progressive_distillation stage", index, f"an index in [0, {stages})")
        self.student_steps = self.start_steps >> (index + 1)

    def prepare_diffusion(self, *, student: nn.Module, teacher: nn.Module, schedule: Any, guidance_scale: float,
                          null_class: int, sample_shape: tuple[int, ...], num_classes: int,
                          seed: int) -> dict[str, Any]:
        expect(self.start_steps <= schedule.num_timesteps, "progressive_distillation start_steps", self.start_steps,
               f"at most the schedule's {schedule.num_timesteps} timesteps")
        self.schedule = schedule
        return {"stages": len(self.diffusion_stages()), "start_steps": self.start_steps,
                "final_steps": self.final_steps}

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per example: the student's timestep ``t``, the teacher's intermediate ``t'`` and the end ``t''``."""
        n = self.student_steps
        fine = torch.tensor(self.schedule.timesteps(2 * n) + [-1], device=x.device)
        i = torch.randint(0, n, (x.shape[0],), device=x.device)
        return fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        s_net, t_net = diffusion_nets("progressive_distillation", student, teacher)
        sch = require_schedule("progressive_distillation", self.schedule)
        x0, y = diffusion_batch("progressive_distillation", batch)
        t, t_mid, t_end = self._grid(x0)
        z = sch.add_noise(x0, torch.randn_like(x0), t)
        with torch.no_grad():
            z_mid = sch.ddim_step(t_net(z, t, y).float(), z, t, t_mid)
            z_end = sch.ddim_step(t_net(z_mid, t_mid, y).float(), z_mid, t_mid, t_end)
            a, s = sch.alpha_sigma(t, z.ndim)
            a_end, s_end = sch.alpha_sigma(t_end, z.ndim)
            target = progressive_target(z, z_end, alpha=a, sigma=s, alpha_next=a_end, sigma_next=s_end)
        x_student = sch.predict_x0(s_net(z, t, y).float(), z, t)
        per_example = truncated_snr_mse(x_student, target, snr=sch.snr(t))
        self.log("student_steps", float(self.student_steps))
        self.log("x_mse", masked_mean(((x_student.detach() - target) ** 2).reshape(len(t), -1).mean(1),
                                      batch.get("mask")))
        return {"progressive": self.weight * masked_mean(per_example, batch.get("mask"))}
