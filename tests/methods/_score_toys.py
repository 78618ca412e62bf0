"""Helpers for the one-step generator methods (boot, vsd, dmd, distribution_backtracking): a parameter-free
generator whose one-step samples are a given tensor, a small training driver for any teacher network, and the energy
distance between two point clouds. The closed-form Gaussian teacher and the task's call conventions come from
``_diffusion.py``."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdistill.methods.base import Method
from kdistill.models.diffusion import DiffusionSchedule, sample

from ._diffusion import GaussianTeacher, fit_to_teacher, guided_teacher, outputs, small_student, toy_teacher


class FixedSamples(nn.Module):
    """A "generator" whose one-step sample from the last timestep is the parameter ``x`` ``(B, D)`` whatever the noise:
    it returns ``v = (alpha_T z - x) / sigma_T``, so ``predict_x0 = alpha_T z - sigma_T v = x``. ``x.grad`` is then the
    gradient a method sends to the generator's samples."""

    def __init__(self, schedule: DiffusionSchedule, x: Tensor) -> None:
        super().__init__()
        self.schedule = schedule
        self.x = nn.Parameter(x.clone())

    def forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        a, s = self.schedule.alpha_sigma(t, z.ndim)
        return (a * z - self.x) / s


def mlp_teacher(schedule: DiffusionSchedule, *, steps: int = 150, width: int = 32, seed: int = 0) -> nn.Module:
    """A small MLP denoiser fitted to the closed-form toy teacher (two Gaussian classes): a trainable network that the
    score-distillation methods can copy into a fake score."""
    torch.manual_seed(seed)
    return fit_to_teacher(small_student(seed, width=width), toy_teacher(schedule), schedule, steps=steps, batch=128)


def train(method: Method, student: nn.Module, teacher: nn.Module, schedule: DiffusionSchedule, *, steps: int,
          num_classes: int = 2, dim: int = 2, guidance: float = 1.0, lr: float = 1e-3, batch: int = 64,
          seed: int = 0) -> list[dict[str, float]]:
    """prepare_diffusion, then ``steps`` optimizer steps over student + method parameters as the diffusion task runs
    them (data-free batches: random labels, zero inputs). Returns every step's loss terms."""
    torch.manual_seed(seed)
    method.set_total_steps(steps)
    method.prepare_diffusion(student=student, teacher=teacher, schedule=schedule, guidance_scale=guidance,
                             null_class=num_classes, sample_shape=(dim,), num_classes=num_classes, seed=seed)
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    s_out, t_out = outputs(student, guided_teacher(teacher, guidance, num_classes))
    history = []
    for _ in range(steps):
        data = {"inputs": torch.zeros(batch, dim), "labels": torch.randint(0, num_classes, (batch,))}
        losses = method(s_out, t_out, data)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        method.after_optimizer_step(student)
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history


def generator_grad(method: Method, *, real_mean: Tensor, fake_mean: Tensor | None, x: Tensor, guidance: float = 1.0,
                   seed: int = 0) -> Tensor:
    """The gradient a score-distillation method sends to one-step samples ``x`` ``(B, D)`` when the real score is the
    exact denoiser of ``N(real_mean, I)`` and its fake network is replaced by the exact denoiser of ``N(fake_mean,
    I)`` (None: the copy of the teacher the method made)."""
    schedule = DiffusionSchedule()
    real = GaussianTeacher(schedule, real_mean[None], 1.0)
    gen = FixedSamples(schedule, x)
    method.prepare_diffusion(student=gen, teacher=real, schedule=schedule, guidance_scale=guidance, null_class=1,
                             sample_shape=tuple(x.shape[1:]), num_classes=1, seed=seed)
    if fake_mean is not None:
        method.fake = GaussianTeacher(schedule, fake_mean[None], 1.0)
    torch.manual_seed(seed)
    s_out, t_out = outputs(gen, guided_teacher(real, guidance, 1))
    losses = method(s_out, t_out, {"inputs": torch.randn_like(x), "labels": torch.zeros(len(x), dtype=torch.long)})
    losses["generator"].backward()
    return gen.x.grad


def term_grads(method: Method, term: str, *, seed: int = 0) -> tuple[float, float, nn.Module]:
    """Backward only loss ``term`` of one step with a tiny random MLP teacher (guidance 2) and student. Returns the
    summed |gradient| of the student's and of the method's parameters, and the teacher (to check it got none)."""
    schedule = DiffusionSchedule()
    torch.manual_seed(seed)
    teacher = small_student(seed, width=16).requires_grad_(False)
    student = small_student(seed + 1, width=16)
    method.set_total_steps(10)
    method.prepare_diffusion(student=student, teacher=teacher, schedule=schedule, guidance_scale=2.0, null_class=2,
                             sample_shape=(2,), num_classes=2, seed=seed)
    s_out, t_out = outputs(student, guided_teacher(teacher, 2.0, 2))
    losses = method(s_out, t_out, {"inputs": torch.randn(16, 2), "labels": torch.randint(0, 2, (16,))})
    losses[term].backward()
    total = lambda ps: sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None)  # noqa: E731
    return total(student.parameters()), total(method.parameters()), teacher


def energy_distance(a: Tensor, b: Tensor) -> float:
    """``2 E|a - b| - E|a - a'| - E|b - b'|``: 0 for equal distributions, positive otherwise (Szekely, 2004)."""
    d = lambda u, v: torch.cdist(u.double(), v.double()).mean()  # noqa: E731
    return float(2 * d(a, b) - d(a, a) - d(b, b))


def samples(net: Callable, schedule: DiffusionSchedule, *, sampler: str, steps: int, n: int = 512,
            seed: int = 5) -> Tensor:
    """``n`` samples of ``net`` from fixed noise, the classes alternating."""
    g = torch.Generator().manual_seed(seed)
    noise, labels = torch.randn(n, 2, generator=g), torch.arange(n) % 2
    return sample(net, schedule, sampler=sampler, steps=steps, noise=noise, labels=labels)


#: three student steps of the built-in ``diffusion/tiny`` recipe, a small evaluation, the teacher cached per session
TINY_RUN = ["train.max_steps=3", "teacher.train.max_steps=40", "teacher.reuse=true", "eval.samples=64",
            "eval.teacher_steps=8", "eval.steps=[1]", "eval.latency_repeats=1"]


def tiny_run(output, method: str, *overrides: str) -> dict:
    """The report of ``kdistill.run("diffusion/tiny")`` with ``method`` for 3 steps; checks what every one-step method
    must give: 3 steps trained, finite metrics at 1 step."""
    import math

    import kdistill

    report = kdistill.run("diffusion/tiny", output=output, overrides=[*TINY_RUN, f"method={method}", *overrides],
                          progress=False, quiet=True)
    student = report["student"]
    assert report["method"] == method and student["train_steps"] == 3
    assert list(student["by_steps"]) == ["1"] and all(math.isfinite(v) for v in student["metrics"].values())
    return report


def copy_of(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(True)


__all__ = ["FixedSamples", "GaussianTeacher", "TINY_RUN", "copy_of", "energy_distance", "generator_grad", "mlp_teacher",
           "samples", "term_grads", "tiny_run", "train"]
