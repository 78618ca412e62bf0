"""``vsd``: variational score distillation into a one-step generator.

Wang, Lu, Wang, Bao, Li, Su & Zhu, "ProlificDreamer: High-Fidelity and Diverse Text-to-3D Generation with Variational
Score Distillation" (2023), here with a one-step image/point generator instead of a 3-D scene (as in Diff-Instruct and
DMD). The generator ``x = G(eps, y)`` (the student's clean-data prediction from noise at the last timestep) descends

    dL/dx = w(t) * (eps_real(z_t, t, y) - eps_fake(z_t, t, y)),   z_t = alpha_t x + sigma_t n,  w(t) = sigma_t**2
          = alpha_t * sigma_t * (fake_x0 - real_x0)

where ``eps_real`` is the teacher with classifier-free guidance and ``eps_fake`` a copy of the teacher trained, at
the same time, with the denoising loss on the generator's (detached) samples: the score of the generator's own
distribution. The difference of the two scores is the gradient of KL(p_generator || p_teacher) on the noised data,
so the generator matches the teacher's distribution instead of collapsing onto one high-density point (plain score
distillation, SDS, puts the injected noise where the fake score is). ``guidance_range=[lo, hi]`` draws the teacher's
guidance scale uniformly per example (SNOOPI: Nguyen et al., "SNOOPI: Supercharged One-step Diffusion Distillation
with Proper Guidance", 2024), which keeps VSD stable across guidance strengths.

Use it for a one-step student when no data is at hand (it only needs labels and the teacher); compared with ``dmd``
its step size is ``alpha_t sigma_t`` times the prediction gap, small at both ends of the noise range, instead of
being normalised per example.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..losses.score_distillation import vsd_gradient
from ..registry import METHODS
from ._score_distillation import ScoreDistillation


@METHODS.register("vsd")
class VSD(ScoreDistillation):
    """Variational score distillation: ``sigma_t**2``-weighted difference of the guided teacher's and a trained fake
    network's noise predictions at a noised one-step sample."""

    method_name = "vsd"

    def __init__(self, generator_weight: float = 1.0, fake_weight: float = 1.0,
                 timestep_range: Sequence[float] = (0.02, 0.98), guidance_range: Sequence[float] | None = None,
                 fake_updates: int = 1) -> None:
        super().__init__(generator_weight=generator_weight, fake_weight=fake_weight, timestep_range=timestep_range,
                         guidance_range=guidance_range, fake_updates=fake_updates)

    def generator_gradient(self, x: Tensor, fake_x0: Tensor, real_x0: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t, x.ndim)
        return vsd_gradient(fake_x0, real_x0, alpha=alpha, sigma=sigma)
