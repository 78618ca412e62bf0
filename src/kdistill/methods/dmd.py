"""``dmd``: distribution matching distillation into a one-step generator.

Yin, Gharbi, Zhang, Shechtman, Durand, Freeman & Park, "One-step Diffusion with Distribution Matching Distillation"
(2024). The generator ``x = G(eps, y)`` (the student's clean-data prediction from noise at the last timestep)
descends the approximate gradient of KL(p_generator || p_teacher):

    dL/dx = (fake_x0(z_t) - real_x0(z_t)) / mean_d |x - real_x0(z_t)|,   z_t = alpha_t x + sigma_t n

``real_x0``: the teacher's guided clean-data prediction; ``fake_x0``: a copy of the teacher trained, at the same time,
with the denoising loss on the generator's detached samples (the score of the generator's distribution). Dividing by
the mean distance to the teacher's prediction gives every example and timestep the same step size. Optionally
(``regression_weight > 0``, the paper's 0.25) the generator also regresses onto the teacher's ODE outputs for fixed
noise: ``regression_pairs`` pairs (noise, label) -> the teacher's ``regression_steps``-step guided DDIM sample,
generated once before training and kept as buffers, which anchors the mode structure (the paper uses LPIPS on images;
here the mean squared error, which also serves 2-D points). ``guidance_range=[lo, hi]``: SNOOPI's random per-example
guidance scale of the teacher (Nguyen et al., "SNOOPI: Supercharged One-step Diffusion Distillation with Proper
Guidance", 2024).

Use it for a one-step student of a guided teacher; it is data-free apart from the teacher's own samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import expect
from ..losses.reduce import masked_mean
from ..losses.score_distillation import dmd_gradient, sample_mse
from ..models.diffusion import guided, sample
from ..registry import METHODS
from ._score_distillation import ScoreDistillation, module_device, one_step_sample


@METHODS.register("dmd")
class DMD(ScoreDistillation):
    """Distribution matching distillation: normalised difference of a trained fake network's and the guided teacher's
    clean-data predictions, plus an optional regression onto the teacher's ODE samples from fixed noise."""

    method_name = "dmd"

    def __init__(self, generator_weight: float = 1.0, fake_weight: float = 1.0,
                 timestep_range: Sequence[float] = (0.02, 0.98), guidance_range: Sequence[float] | None = None,
                 regression_weight: float = 0.25, regression_pairs: int = 512, regression_steps: int = 50,
                 fake_updates: int = 1) -> None:
        super().__init__(generator_weight=generator_weight, fake_weight=fake_weight, timestep_range=timestep_range,
                         guidance_range=guidance_range, fake_updates=fake_updates)
        expect(regression_weight >= 0, "dmd regression_weight", regression_weight, "a number >= 0 (0: no regression)")
        expect(int(regression_pairs) >= 1, "dmd regression_pairs", regression_pairs, "an integer >= 1")
        expect(int(regression_steps) >= 1, "dmd regression_steps", regression_steps,
               "an integer >= 1 (the teacher's DDIM steps for the regression targets, e.g. 50)")
        self.regression_weight = float(regression_weight)
        self.regression_pairs, self.regression_steps = int(regression_pairs), int(regression_steps)

    def generator_gradient(self, x: Tensor, fake_x0: Tensor, real_x0: Tensor, t: Tensor) -> Tensor:
        return dmd_gradient(x, fake_x0, real_x0)

    @torch.no_grad()
    def prepare_extra(self, *, student: nn.Module, teacher: nn.Module, guidance_scale: float, num_classes: int,
                      seed: int) -> dict[str, Any]:
        if self.regression_weight == 0:
            return {}
        device = module_device(teacher)
        gen = torch.Generator().manual_seed(int(seed))
        n = self.regression_pairs
        noise = torch.randn((n, *self.sample_shape), generator=gen).to(device)
        labels = torch.randint(0, num_classes, (n,), generator=gen).to(device)

        def net(z: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return guided(teacher, z, t, y, guidance_scale, self.null_class)

        targets = torch.cat([sample(net, self.schedule, sampler="ddim", steps=self.regression_steps,
                                    noise=noise[i:i + 256], labels=labels[i:i + 256]) for i in range(0, n, 256)])
        self.register_buffer("regression_noise", noise)
        self.register_buffer("regression_labels", labels)
        self.register_buffer("regression_targets", targets.float())
        return {"regression_pairs": n, "regression_steps": self.regression_steps}

    def extra_terms(self, net: Callable[[Tensor, Tensor, Tensor], Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.regression_weight == 0:
            return {}
        y = batch["labels"]
        idx = torch.randint(0, self.regression_targets.shape[0], (y.shape[0],), device=self.regression_targets.device)
        x = one_step_sample(net, self.schedule, self.regression_noise[idx], self.regression_labels[idx])
        return {"regression": self.regression_weight * masked_mean(sample_mse(x, self.regression_targets[idx]))}
