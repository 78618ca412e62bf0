"""``boot``: data-free one-step distillation by bootstrapping along the teacher's ODE.

Gu, Zhai, Zhang, Liu & Susskind, "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping"
(2023). The student is a generator ``g(eps, t, y)`` of the *signal* ``y_t = (x_t - sigma_t eps) / alpha_t`` of the
teacher's deterministic (DDIM) trajectory ``x_t`` that starts from the noise ``eps``; with the ``noise_to_data``
parameterisation ``g(eps, t, y) = alpha_T eps - sigma_T net(eps, t, y)`` (so a student copied from the teacher starts
as the teacher's one-step prediction). It learns from the teacher alone -- no data, only labels and fresh noise:

    t ~ U{delta..T-1},  s = t - delta,  x_t = alpha_t sg(g(eps, t)) + sigma_t eps,  x0 = teacher_x0(x_t, t, y)
    target = x0 + (sigma_s alpha_t) / (alpha_s sigma_t) * (sg(g(eps, t)) - x0)      one teacher DDIM step t -> s
    L = bootstrap_weight * || g(eps, s) - target ||^2 + boundary_weight * || g(eps, T-1) - teacher_x0(eps, T-1) ||^2

The target is the signal of the DDIM step ``x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t`` written without
dividing by ``alpha_s`` (:func:`kdistill.losses.score_distillation.boot_signal_target`), so every timestep is well
conditioned, including the last ones where ``alpha`` is nearly 0 (the paper's signal-ODE reaches the same end by
working in the signal space). The boundary term pins the start of the trajectory: at the last timestep the signal is
the teacher's clean-data prediction from the noise. Both terms are plain mean squared errors: the paper's division by
``delta**2`` is a constant for a fixed ``delta`` and is absorbed by the weights and the learning rate. Sampling reads
the signal at timestep 0, one network evaluation (sampler ``noise_to_data``). ``delta`` trades how far the teacher's
boundary value has to propagate (``T / delta`` links) against how accurate one DDIM step is.

Use it for a one-step student when no training data may be used: only the teacher and the class labels are needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import expect
from ..losses.reduce import masked_mean
from ..losses.score_distillation import boot_signal_target, sample_mse
from ..models.diffusion import noise_to_data
from ..registry import METHODS
from ._diffusion import diffusion_nets, require_schedule
from .base import Method, ModelOutput


@METHODS.register("boot")
class BOOT(Method):
    """Bootstrapped signal regression along the guided teacher's DDIM trajectory from noise, plus its boundary
    condition at the last timestep. Data-free: the batch's inputs are never read."""

    diffusion_sampler = "noise_to_data"

    def __init__(self, delta: int = 50, bootstrap_weight: float = 1.0, boundary_weight: float = 1.0) -> None:
        super().__init__()
        expect(isinstance(delta, int) and delta >= 1, "boot delta", delta,
               "an integer >= 1 (timesteps of one teacher DDIM step, e.g. 50 of 1000)")
        expect(bootstrap_weight > 0, "boot bootstrap_weight", bootstrap_weight, "a positive number")
        expect(boundary_weight > 0, "boot boundary_weight", boundary_weight,
               "a positive number (without the boundary term the trajectory has no start)")
        self.delta = int(delta)
        self.bootstrap_weight, self.boundary_weight = float(bootstrap_weight), float(boundary_weight)
        self.schedule: Any = None
        self.sample_shape: tuple[int, ...] = ()

    def prepare_diffusion(self, *, student: nn.Module, teacher: nn.Module, schedule: Any, guidance_scale: float,
                          null_class: int, sample_shape: tuple[int, ...], num_classes: int,
                          seed: int) -> dict[str, Any]:
        expect(self.delta < schedule.num_timesteps, "boot delta", self.delta,
               f"an integer below the schedule's {schedule.num_timesteps} timesteps")
        self.schedule, self.sample_shape = schedule, tuple(int(d) for d in sample_shape)
        return {}

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        sched = require_schedule("boot", self.schedule).to(batch["labels"].device)
        net, real = diffusion_nets("boot", student, teacher)
        y, mask = batch["labels"], batch.get("mask")
        b, n = y.shape[0], sched.num_timesteps
        eps = torch.randn((b, *self.sample_shape), device=y.device)
        t = torch.randint(self.delta, n, (b,), device=y.device)
        s = t - self.delta
        last = torch.full_like(t, n - 1)

        with torch.no_grad():
            signal_t = noise_to_data(net, sched, eps, y, t)
            alpha_t, sigma_t = sched.alpha_sigma(t, eps.ndim)
            alpha_s, sigma_s = sched.alpha_sigma(s, eps.ndim)
            x_t = alpha_t * signal_t + sigma_t * eps
            target = boot_signal_target(signal_t, sched.predict_x0(real(x_t, t, y), x_t, t), alpha_t=alpha_t,
                                        sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s)
            start = sched.predict_x0(real(eps, last, y), eps, last)
        bootstrap = masked_mean(sample_mse(noise_to_data(net, sched, eps, y, s), target), mask)
        boundary = masked_mean(sample_mse(noise_to_data(net, sched, eps, y, last), start), mask)
        self.log("target_step_rms", (target - signal_t.float()).pow(2).mean().sqrt())
        return {"bootstrap": self.bootstrap_weight * bootstrap, "boundary": self.boundary_weight * boundary}
