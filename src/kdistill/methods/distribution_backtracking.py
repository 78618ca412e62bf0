"""``distribution_backtracking``: score distillation along the teacher's degradation path, walked backwards (DisBack).

Zhang, Chen, Chen, Zhou & Zhao, "Distribution Backtracking Builds A Faster Convergence Trajectory for Diffusion
Distillation" (2024). Score distillation (``dmd`` / ``vsd``) starts with a generator whose distribution is far from
the teacher's, where the teacher's score says little about how to move it. DisBack first records a path between the
two and then makes the generator follow it from the generator's end:

* **degradation** (before training, in ``prepare_diffusion``): a copy of the teacher is fine-tuned for
  ``degradation_steps`` with the denoising loss on samples of the *initial* generator, so it drifts from the
  teacher's distribution to the generator's; ``checkpoints`` points of that path are kept, the teacher first and the
  most degraded last (the ``checkpoints - 1`` fine-tuned ones as frozen copies; the first is the run's teacher);
* **backtracking** (training): the DMD update, ``dL/dx = (fake_x0 - target_x0) / mean_d |x - target_x0|`` at a
  noised one-step sample, where the target walks the path backwards on equal shares of the run: the most degraded
  snapshot first, ..., the guided teacher for the last share. The fake score network starts as a trainable copy of
  the most degraded snapshot (which already fits the initial generator) and keeps following the generator.

The snapshots are conditional networks used without guidance (their fine-tuning saw no null class); the teacher's
share uses the run's guidance, or SNOOPI's per-example random scale with ``guidance_range``. Use it instead of
``dmd`` when the one-step student starts far from the teacher (e.g. from scratch) and convergence is slow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect
from ..losses.score_distillation import dmd_gradient, sample_mse
from ..registry import METHODS
from ._score_distillation import ScoreDistillation, frozen_copy, module_device, one_step_sample, trainable_copy


@METHODS.register("distribution_backtracking")
class DistributionBacktracking(ScoreDistillation):
    """DMD against a path of degraded teacher snapshots walked backwards (most degraded first, the teacher last)."""

    method_name = "distribution_backtracking"

    def __init__(self, checkpoints: int = 4, degradation_steps: int = 400, degradation_lr: float = 1e-4,
                 degradation_batch: int = 64, generator_weight: float = 1.0, fake_weight: float = 1.0,
                 timestep_range: Sequence[float] = (0.02, 0.98),
                 guidance_range: Sequence[float] | None = None, fake_updates: int = 1) -> None:
        super().__init__(generator_weight=generator_weight, fake_weight=fake_weight, timestep_range=timestep_range,
                         guidance_range=guidance_range, fake_updates=fake_updates)
        expect(int(checkpoints) >= 2, "distribution_backtracking checkpoints", checkpoints,
               "an integer >= 2 (points of the degradation path, the teacher included)")
        expect(int(degradation_steps) >= int(checkpoints) - 1, "distribution_backtracking degradation_steps",
               degradation_steps, f"an integer >= checkpoints - 1 = {int(checkpoints) - 1} (one step per snapshot)")
        expect(degradation_lr > 0, "distribution_backtracking degradation_lr", degradation_lr, "a positive number")
        expect(int(degradation_batch) >= 1, "distribution_backtracking degradation_batch", degradation_batch,
               "an integer >= 1")
        self.checkpoints, self.degradation_steps = int(checkpoints), int(degradation_steps)
        self.degradation_lr, self.degradation_batch = float(degradation_lr), int(degradation_batch)
        self.snapshots = nn.ModuleList()
        self.total_steps = 0

    def set_total_steps(self, total_steps: int) -> None:
        expect(int(total_steps) >= 1, "distribution_backtracking total_steps", total_steps, "an integer >= 1")
        self.total_steps = int(total_steps)

    def target_index(self) -> int:
        """Which point of the path is the target now: ``checkpoints - 1`` (most degraded) during the first share of
        the run, ..., 0 (the teacher) during the last."""
        if self.total_steps <= 0:
            raise KDistillError("distribution_backtracking: set_total_steps was not called, so the method cannot tell "
                                "which share of the run it is in; the diffusion task calls it before training.")
        k = self.checkpoints
        share = min(k - 1, int(self.step) * k // self.total_steps)
        return k - 1 - share

    def generator_gradient(self, x: Tensor, fake_x0: Tensor, real_x0: Tensor, t: Tensor) -> Tensor:
        return dmd_gradient(x, fake_x0, real_x0)

    def real_x0(self, teacher_net: Callable[..., Tensor], z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        index = self.target_index()
        self.log("target_index", index)
        if index == 0:
            return super().real_x0(teacher_net, z, t, y)
        return self.schedule.predict_x0(self.snapshots[index - 1](z, t, y), z, t)

    def prepare_extra(self, *, student: nn.Module, teacher: nn.Module, guidance_scale: float, num_classes: int,
                      seed: int) -> dict[str, Any]:
        snapshots, losses = self.degrade(student=student, teacher=teacher, num_classes=num_classes, seed=seed)
        self.snapshots = nn.ModuleList(snapshots)
        return {"path_points": len(snapshots) + 1, "degradation_loss_first": losses[0],
                "degradation_loss_last": losses[-1]}

    def init_fake(self, *, student: nn.Module, teacher: nn.Module) -> nn.Module:
        """The fake score starts where the path ends: a trainable copy of the most degraded snapshot."""
        return trainable_copy(self.snapshots[-1])

    def degrade(self, *, student: nn.Module, teacher: nn.Module, num_classes: int,
                seed: int) -> tuple[list[nn.Module], list[float]]:
        """Fine-tune a copy of ``teacher`` towards the one-step samples of ``student`` (as it is before training) with
        the denoising loss. Returns ``checkpoints - 1`` frozen snapshots, least degraded first, the last one at the
        end of the fine-tuning, and the loss of every fine-tuning step."""
        device, sched = module_device(teacher), self.schedule
        gen = torch.Generator().manual_seed(seed + 1)
        work = trainable_copy(teacher)
        opt = torch.optim.Adam(work.parameters(), lr=self.degradation_lr)
        k, n, b = self.checkpoints, self.degradation_steps, self.degradation_batch
        keep = {int(round(i * n / (k - 1))) for i in range(1, k)}
        snapshots: list[nn.Module] = []
        losses: list[float] = []
        for step in range(1, n + 1):
            eps = torch.randn((b, *self.sample_shape), generator=gen).to(device)
            y = torch.randint(0, num_classes, (b,), generator=gen).to(device)
            t = torch.randint(0, sched.num_timesteps, (b,), generator=gen).to(device)
            noise = torch.randn((b, *self.sample_shape), generator=gen).to(device)
            with torch.no_grad():
                x = one_step_sample(student, sched, eps, y).float()
            loss = sample_mse(work(sched.add_noise(x, noise, t), t, y), sched.v_target(x, noise, t)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step in keep:
                snapshots.append(frozen_copy(work))
        return snapshots, losses
