"""``consistency_distillation``: a student that maps any point of the teacher's ODE trajectory to its clean end.

Song, Dhariwal, Chen & Sutskever, 2023, "Consistency Models" (ICML), consistency distillation with the skipping
timestep grid of latent consistency models (Luo et al., 2023, "Latent Consistency Models").

The 1,000-step schedule is cut into ``num_intervals`` intervals ``N`` on the trailing grid
``-1 = t_0 < t_1 < ... < t_N = T - 1`` (``t_k = k T / N - 1``: skipping ``T / N`` timesteps, LCM's "skipping-step").
For an example ``x`` (class ``y``), ``n ~ U{0..N-1}`` and fresh noise::

    z      = alpha_{t_{n+1}} x + sigma_{t_{n+1}} eps
    z_hat  = DDIM(teacher, z, t_{n+1} -> t_n)                      (one guided teacher ODE step)
    L      = d( f_student(z, t_{n+1}),  f_target(z_hat, t_n) ),     f(z, t) = x_hat(z, t) = alpha_t z - sigma_t v(z, t)

``f_target`` is the target network ``theta^-``, an EMA of the student (``theta^- <- mu theta^- + (1 - mu) theta``,
``mu = ema_decay``, updated after every optimizer step), kept frozen on the method and saved in its checkpoints. The
boundary condition ``f(z, -1) = z`` holds by construction (at ``t = -1``, ``alpha = 1`` and ``sigma = 0``), so for
``n = 0`` the target is the teacher's own clean-data prediction, which anchors the chain. ``d``: ``l2`` (squared
error) or ``pseudo_huber`` (Song & Dhariwal, 2023, "Improved Techniques for Training Consistency Models":
``sqrt(||a - b||^2 + c^2) - c``, ``c = 0.00054 sqrt(dim)`` unless ``huber_c`` is set).

The student samples with the ``consistency`` sampler: predict clean data, re-noise it to the next timestep with fresh
noise (multistep consistency sampling). ``num_intervals`` divisible by 4 puts the 1-, 2- and 4-step sampling timesteps
on the training grid. When to use: one- to four-step students from a teacher and training data; fewer stages than
progressive distillation (one), but it needs the EMA target network (one more copy of the student in memory).
Hyper-SD (``hyper_sd``) is the same loss with a segment boundary in place of clean data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect
from ..losses.diffusion import DISTANCES, consistency_loss, segment_boundaries
from ..losses.reduce import masked_mean
from ..modules.ema import ema_update, frozen_copy
from ..registry import METHODS
from ._diffusion import diffusion_batch, diffusion_nets, require_schedule
from .base import Method, ModelOutput


@METHODS.register("consistency_distillation")
class ConsistencyDistillation(Method):
    """Consistency distillation: the student's clean-data map at ``t_{n+1}`` matches its EMA's at the teacher's
    one-step DDIM estimate ``z_hat_{t_n}``; sampled with the ``consistency`` sampler."""

    diffusion_sampler = "consistency"
    _name = "consistency_distillation"

    def __init__(self, num_intervals: int = 40, ema_decay: float = 0.95, distance: str = "l2",
                 huber_c: float | None = None, weight: float = 1.0) -> None:
        super().__init__()
        n = self._name
        expect(isinstance(num_intervals, int) and num_intervals >= 1, f"{n} num_intervals", num_intervals,
               "a positive integer (the number of intervals of the timestep grid; 20-50 skips 50-20 timesteps)")
        expect(0.0 <= ema_decay < 1.0, f"{n} ema_decay", ema_decay, "a number in [0, 1) (the target network's decay)")
        expect(distance in DISTANCES, f"{n} distance", distance, " or ".join(repr(d) for d in DISTANCES))
        expect(huber_c is None or huber_c > 0, f"{n} huber_c", huber_c, "a positive number or null (0.00054 sqrt(dim))")
        expect(weight > 0, f"{n} weight", weight, "a positive number")
        self.num_intervals, self.ema_decay, self.distance = int(num_intervals), float(ema_decay), distance
        self.huber_c = None if huber_c is None else float(huber_c)
        self.weight = float(weight)
        #: segments of the trajectory in the current stage (1: every timestep maps to clean data)
        self.num_segments = 1
        self.schedule: nn.Module | None = None
        self.target: nn.Module | None = None

    def prepare_diffusion(self, *, student: nn.Module, teacher: nn.Module, schedule: Any, guidance_scale: float,
                          null_class: int, sample_shape: tuple[int, ...], num_classes: int,
                          seed: int) -> dict[str, Any]:
        expect(self.num_intervals <= schedule.num_timesteps, f"{self._name} num_intervals", self.num_intervals,
               f"at most the schedule's {schedule.num_timesteps} timesteps")
        self.schedule = schedule
        self.target = frozen_copy(student)
        return {"num_intervals": self.num_intervals, "skip": schedule.num_timesteps / self.num_intervals}

    def _grid(self, schedule: Any) -> list[int]:
        """``t_0 = -1 < t_1 < ... < t_N``: the trailing ``N``-step grid and clean data."""
        return [-1] + schedule.timesteps(self.num_intervals)[::-1]

    @staticmethod
    def _boundaries(schedule: Any, segments: int) -> list[int]:
        """Ascending lower boundaries of ``segments`` equal segments: clean data and the ``segments``-step sampling
        timesteps below ``T - 1`` (so a segment is the span of one step of the trailing ``segments``-step grid)."""
        return [-1] + schedule.timesteps(segments)[1:][::-1]

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        s_net, t_net = diffusion_nets(self._name, student, teacher)
        sch = require_schedule(self._name, self.schedule)
        if self.target is None:
            raise KDistillError(f"method {self._name!r}: no target network; prepare_diffusion makes it.")
        x0, y = diffusion_batch(self._name, batch)
        grid = torch.tensor(self._grid(sch), device=x0.device)
        k = torch.randint(1, self.num_intervals + 1, (x0.shape[0],), device=x0.device)
        t_hi, t_lo = grid[k], grid[k - 1]
        z = sch.add_noise(x0, torch.randn_like(x0), t_hi)
        with torch.no_grad():
            z_hat = sch.ddim_step(t_net(z, t_hi, y).float(), z, t_hi, t_lo)
            v_target = self.target(z_hat, t_lo, y).float()
        bounds = torch.tensor(self._boundaries(sch, self.num_segments), device=x0.device)
        b = segment_boundaries(t_hi, boundaries=bounds)
        per_example = consistency_loss(
            s_net(z, t_hi, y), v_target, student_z=z, target_z=z_hat,
            student_alpha_sigma=sch.alpha_sigma(t_hi, z.ndim), target_alpha_sigma=sch.alpha_sigma(t_lo, z.ndim),
            boundary=sch.alpha_sigma(b, z.ndim), distance=self.distance, huber_c=self.huber_c)
        self.log("segments", float(self.num_segments))
        return {"consistency": self.weight * masked_mean(per_example, batch.get("mask"))}

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        """The loop switches the method to training mode; the target network stays in eval mode (a frozen copy)."""
        super().train(mode)
        if self.target is not None:
            self.target.eval()
        return self

    def after_optimizer_step(self, student: nn.Module) -> None:
        if self.target is None:
            raise KDistillError(f"method {self._name!r}: no target network to update; prepare_diffusion makes it.")
        ema_update(self.target, student, decay=self.ema_decay)
