"""``denoising``: train a diffusion model from data, without a teacher (task ``diffusion``: how its teacher is trained).

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020), with the v-parameterisation of Salimans & Ho,
"Progressive Distillation for Fast Sampling of Diffusion Models" (2022), and classifier-free guidance training of Ho
& Salimans, "Classifier-Free Diffusion Guidance" (2022):

    t ~ U{0..T-1},  eps ~ N(0, I),  z_t = alpha_t x + sigma_t eps,  v = alpha_t eps - sigma_t x
    L = E || net(z_t, t, y') - v ||^2,   y' = y, or the null class with probability ``label_dropout``

Dropping labels teaches the same network the unconditional prediction that guidance subtracts. It is not a
distillation method: it is the objective every diffusion teacher here is trained with, and the baseline of a student
trained from data alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import KDistillError, expect
from ..losses.reduce import masked_mean
from ..registry import METHODS
from .base import Method, ModelOutput


@METHODS.register("denoising")
class Denoising(Method):
    """The v-prediction denoising loss on the batch's data; ``label_dropout`` of the labels replaced by the null class
    (0 trains a purely conditional model, which cannot be guided)."""

    needs_teacher = False

    def __init__(self, label_dropout: float = 0.1) -> None:
        super().__init__()
        expect(0.0 <= label_dropout < 1.0, "label_dropout", label_dropout, "a number in [0, 1)")
        self.label_dropout = float(label_dropout)
        self.schedule: Any = None
        self.null_class: int | None = None

    def prepare_diffusion(self, *, student, teacher, schedule, guidance_scale, null_class, sample_shape, num_classes,
                          seed) -> dict[str, Any]:
        self.schedule, self.null_class = schedule, int(null_class)
        return {}

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.schedule is None:
            raise KDistillError("denoising: prepare_diffusion was not called; it trains in task 'diffusion' only")
        net, x, y = student.extra["net"], batch["inputs"], batch["labels"]
        sched = self.schedule.to(x.device)
        t = torch.randint(0, sched.num_timesteps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        if self.label_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        v = net(sched.add_noise(x, noise, t), t, y)
        per_example = (v.float() - sched.v_target(x, noise, t).float()).pow(2).flatten(1).mean(1)
        return {"denoising": masked_mean(per_example, batch.get("mask"))}
