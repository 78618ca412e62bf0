"""What ``vsd``, ``dmd`` and ``distribution_backtracking`` share: a one-step generator trained by score distillation
against a "real" score (the guided teacher, or a point on a path towards it) and a trainable "fake" score network
that follows the generator's own distribution.

One training step (task ``diffusion``), for labels ``y`` of the batch and fresh noise ``eps``::

    x = G(eps, y) = alpha_T eps - sigma_T net(eps, T-1, y)          the student's one-step sample
    t ~ U{t_lo..t_hi},  z_t = alpha_t sg(x) + sigma_t n
    grad = direction(x, fake_x0(z_t), real_x0(z_t), t)              (subclass: DMD's or VSD's weighting)
    L_generator  = 0.5 * mean_d (x - sg(x - grad))**2               reaches the student only
    L_fake_score = || fake(z_t', t', y) - v_target(sg(x), n', t') ||^2    reaches the fake network only

The two objectives touch disjoint parameters (the fake predictions of the generator term run under ``no_grad``; the
fake network sees detached samples), so the loop's one optimizer over ``student + method`` parameters trains both.
``fake_updates = k`` is DMD2's two time-scale rule (Yin et al., "Improved Distribution Matching Distillation for Fast
Image Synthesis", 2024): the generator term is added on every k-th optimizer step only, so the fake score network
takes k updates per generator update. On the other steps the generator gets no gradient at all, and PyTorch's
optimizers skip a parameter without one (its Adam moments do not move either).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import expect
from ..losses.reduce import masked_mean
from ..losses.score_distillation import sample_mse, surrogate_loss
from ..modules.ema import frozen_copy  # noqa: F401  (re-exported for the subclasses)
from ._diffusion import diffusion_nets, require_schedule
from .base import Method, ModelOutput


def as_range(name: str, value: Sequence[float] | None, *, lowest: float, highest: float | None = None,
             fix: str = "") -> tuple[float, float] | None:
    """Validate an inclusive ``(lo, hi)`` pair given as a list or tuple (YAML gives lists)."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    bound = f"[{lowest}, {highest}]" if highest is not None else f">= {lowest}"
    expect(ok, name, value, f"a pair [lo, hi] of numbers {bound} with lo <= hi", fix)
    lo, hi = float(value[0]), float(value[1])
    expect(lowest <= lo <= hi and (highest is None or hi <= highest), name, value,
           f"a pair [lo, hi] of numbers {bound} with lo <= hi", fix)
    return lo, hi


def trainable_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(True).train()


def one_step_sample(net: Callable[[Tensor, Tensor, Tensor], Tensor], schedule: Any, noise: Tensor,
                    labels: Tensor) -> Tensor:
    """The one-step generator of the ``consistency`` sampler: the clean-data prediction of ``net`` at the last timestep
    from ``noise``."""
    last = torch.full((noise.shape[0],), schedule.num_timesteps - 1, dtype=torch.long, device=noise.device)
    return schedule.predict_x0(net(noise, last, labels), noise, last)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


class ScoreDistillation(Method):
    """Base of the score-distillation methods (not registered). Subclasses set ``method_name`` and implement
    :meth:`generator_gradient`; they may override :meth:`init_fake` (what the fake network starts as),
    :meth:`real_x0` (the target score) and :meth:`extra_terms` (more loss terms)."""

    diffusion_sampler = "consistency"
    method_name = "score_distillation"

    def __init__(self, *, generator_weight: float = 1.0, fake_weight: float = 1.0,
                 timestep_range: Sequence[float] = (0.02, 0.98),
                 guidance_range: Sequence[float] | None = None, fake_updates: int = 1) -> None:
        super().__init__()
        n = self.method_name
        expect(isinstance(fake_updates, int) and fake_updates >= 1, f"{n} fake_updates", fake_updates,
               "an integer >= 1 (fake-score updates per generator update; DMD2 uses 5)")
        self.fake_updates = int(fake_updates)
        # optimizer steps taken: saved in checkpoints, so a resumed run keeps its place in the schedules
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        expect(generator_weight > 0, f"{n} generator_weight", generator_weight, "a positive number")
        expect(fake_weight > 0, f"{n} fake_weight", fake_weight,
               "a positive number (the fake score network must follow the generator)")
        self.generator_weight, self.fake_weight = float(generator_weight), float(fake_weight)
        self.timestep_range = as_range(f"{n} timestep_range", timestep_range, lowest=0.0, highest=1.0,
                                       fix="Give fractions of the schedule's timesteps, e.g. [0.02, 0.98].")
        self.guidance_range = as_range(f"{n} guidance_range", guidance_range, lowest=0.0,
                                       fix="Give SNOOPI's per-example guidance scales, e.g. [2.0, 4.0], or null "
                                           "for the run's guidance_scale.")
        self.schedule: Any = None
        self.fake: nn.Module | None = None
        self.sample_shape: tuple[int, ...] = ()
        self.null_class = -1

    # ------------------------------------------------------------------ hooks for subclasses

    def generator_gradient(self, x: Tensor, fake_x0: Tensor, real_x0: Tensor, t: Tensor) -> Tensor:
        """The direction ``dL/dx`` ``(B, ...)`` the generator's samples descend."""
        raise NotImplementedError

    def init_fake(self, *, student: nn.Module, teacher: nn.Module) -> nn.Module:
        """The fake score network before training: a trainable copy of the teacher."""
        return trainable_copy(teacher)

    def real_x0(self, teacher_net: Callable[..., Tensor], z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The target score as a clean-data prediction at ``z_t``: the guided teacher, with SNOOPI's per-example random
        guidance scale when ``guidance_range`` is set."""
        if self.guidance_range is None:
            v = teacher_net(z, t, y)
        else:
            lo, hi = self.guidance_range
            v = teacher_net(z, t, y, guidance_scale=lo + (hi - lo) * torch.rand(y.shape[0], device=z.device))
        return self.schedule.predict_x0(v, z, t)

    def extra_terms(self, net: Callable[[Tensor, Tensor, Tensor], Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        return {}

    def prepare_extra(self, *, student: nn.Module, teacher: nn.Module, guidance_scale: float, num_classes: int,
                      seed: int) -> dict[str, Any]:
        """What a subclass learns or generates before training (called before :meth:`init_fake`); diagnostics."""
        return {}

    # ------------------------------------------------------------------ the contract

    def prepare_diffusion(self, *, student: nn.Module, teacher: nn.Module, schedule: Any, guidance_scale: float,
                          null_class: int, sample_shape: tuple[int, ...], num_classes: int,
                          seed: int) -> dict[str, Any]:
        self.schedule = schedule.to(module_device(teacher))
        self.null_class, self.sample_shape = int(null_class), tuple(int(d) for d in sample_shape)
        info = self.prepare_extra(student=student, teacher=teacher, guidance_scale=guidance_scale,
                                  num_classes=int(num_classes), seed=int(seed))
        self.fake = self.init_fake(student=student, teacher=teacher)
        return info

    def after_optimizer_step(self, student: nn.Module) -> None:
        self.step += 1

    @property
    def generator_step(self) -> bool:
        """Whether the generator trains at this step (every ``fake_updates``-th optimizer step)."""
        return int(self.step) % self.fake_updates == 0

    def timesteps(self, batch_size: int, device: torch.device) -> Tensor:
        """Timesteps of the generator term, uniform over ``timestep_range`` (fractions of ``T - 1``)."""
        last = self.schedule.num_timesteps - 1
        lo, hi = self.timestep_range
        return torch.randint(int(round(lo * last)), int(round(hi * last)) + 1, (batch_size,), device=device)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        sched = require_schedule(self.method_name, self.schedule).to(batch["labels"].device)
        net, real_net = diffusion_nets(self.method_name, student, teacher)
        y, mask = batch["labels"], batch.get("mask")
        b = y.shape[0]
        train_generator = self.generator_step
        with torch.set_grad_enabled(train_generator and torch.is_grad_enabled()):
            x = one_step_sample(net, sched, torch.randn((b, *self.sample_shape), device=y.device), y)
        xd = x.detach()

        out: dict[str, Tensor] = {}
        if train_generator:
            t = self.timesteps(b, y.device)
            with torch.no_grad():
                z = sched.add_noise(xd, torch.randn_like(xd), t)
                real = self.real_x0(real_net, z, t, y)
                fake = sched.predict_x0(self.fake(z, t, y), z, t)
            grad = self.generator_gradient(xd, fake, real, t)
            out["generator"] = self.generator_weight * masked_mean(surrogate_loss(x, grad), mask)
            self.log("grad_rms", grad.pow(2).mean().sqrt())
            self.log("fake_real_gap", (fake - real).float().pow(2).mean().sqrt())

        # the fake score network learns the generator's current distribution (denoising loss on detached samples)
        tf = torch.randint(0, sched.num_timesteps, (b,), device=y.device)
        noise = torch.randn_like(xd)
        v = self.fake(sched.add_noise(xd, noise, tf), tf, y)
        out["fake_score"] = self.fake_weight * masked_mean(sample_mse(v, sched.v_target(xd, noise, tf)), mask)
        if train_generator:
            out.update(self.extra_terms(net, batch))
        return out
