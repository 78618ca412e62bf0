"""Test helpers for the diffusion step-distillation methods: a closed-form Gaussian teacher, exact reference students
built from the teacher's DDIM steps, and a small driver that calls a method the way the diffusion task does
(prepare, stages with 'teacher' / 'previous' teachers, optimizer steps, ``after_optimizer_step``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from kdistill.methods.base import Method, ModelOutput
from kdistill.models.diffusion import DiffusionSchedule, MLPDenoiser, guided, sample


@pytest.fixture
def one_thread():
    """Run a short training on one thread (on a busy 2-core machine, two threads of tiny matmuls contend), restoring
    the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class GaussianTeacher(nn.Module):
    """The exact v-prediction of data ``x ~ N(means[y], std^2 I)`` (class ``y``); the null class (id ``C``) is the equal
    mixture of the classes. For one Gaussian, with ``var = alpha^2 std^2 + sigma^2``::

        E[x | z]   = mu + alpha std^2 / var (z - alpha mu)
        E[eps | z] = sigma / var (z - alpha mu)
        v          = alpha E[eps | z] - sigma E[x | z]

    and the mixture weights each class by its likelihood ``N(z; alpha mu_k, var I)``."""

    def __init__(self, schedule: DiffusionSchedule, means: Tensor, std: float) -> None:
        super().__init__()
        self.schedule, self.std = schedule, float(std)
        self.register_buffer("means", means.float())

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def posterior(self, z: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        a, s = self.schedule.alpha_sigma(t, z.ndim)
        var = (a ** 2 * self.std ** 2 + s ** 2).clamp_min(1e-12)
        mu = self.means[None]                                      # (1, C, D)
        dev = z[:, None] - a[:, None] * mu                         # (B, C, D)
        x_k = mu + (a * self.std ** 2 / var)[:, None] * dev
        e_k = (s / var)[:, None] * dev
        logw = -(dev ** 2).sum(-1) / (2 * var.reshape(-1, 1))     # (B, C)
        w = torch.softmax(logw, dim=1)
        onehot = torch.nn.functional.one_hot(y.clamp_max(self.num_classes - 1), self.num_classes).to(z)
        w = torch.where((y == self.num_classes)[:, None], w, onehot)
        return (w[..., None] * x_k).sum(1), (w[..., None] * e_k).sum(1)

    def forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        a, s = self.schedule.alpha_sigma(t, z.ndim)
        x, eps = self.posterior(z, t, y)
        return a * eps - s * x


def v_landing_on(schedule: DiffusionSchedule, z: Tensor, t: Tensor, z_to: Tensor, t_to: Tensor) -> Tensor:
    """The v at ``(z, t)`` whose one DDIM step to ``t_to`` lands on ``z_to`` (solved from the DDIM formula)."""
    a, s = schedule.alpha_sigma(t, z.ndim)
    a2, s2 = schedule.alpha_sigma(t_to, z.ndim)
    return (z_to - (a2 * a + s2 * s) * z) / (s2 * a - a2 * s)


def ddim_chain(net: Callable, schedule: DiffusionSchedule, z: Tensor, y: Tensor, steps: Sequence[int]) -> Tensor:
    """DDIM steps of ``net`` along ``steps`` (descending timesteps, the first is where ``z`` is)."""
    for t, t_next in zip(steps, steps[1:]):
        tb, nb = torch.full((len(z),), t), torch.full((len(z),), t_next)
        z = schedule.ddim_step(net(z, tb, y), z, tb, nb)
    return z


class ChainStudent(nn.Module):
    """The exact (discrete) consistency function of ``net``'s DDIM steps on ``grid``: at ``(z, t)`` it returns the v
    whose DDIM map from ``t`` to ``t``'s segment boundary lands where ``net``'s DDIM steps along the grid land.
    ``grid`` and ``boundaries``: ascending, starting with -1. Timestep -1 returns 0 (no segment; unused)."""

    def __init__(self, net: Callable, schedule: DiffusionSchedule, grid: Sequence[int],
                 boundaries: Sequence[int] = (-1,)) -> None:
        super().__init__()
        self.net, self.schedule, self.grid, self.boundaries = net, schedule, list(grid), list(boundaries)

    def forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = torch.zeros_like(z)
        for tv in t.unique().tolist():
            if tv < 0:
                continue
            rows = t == tv
            b = max(x for x in self.boundaries if x < tv)
            path = [g for g in reversed(self.grid) if b <= g <= tv]
            assert path[0] == tv and path[-1] == b, (tv, b, path)
            z_b = ddim_chain(self.net, self.schedule, z[rows], y[rows], path)
            out[rows] = v_landing_on(self.schedule, z[rows], t[rows], z_b, torch.full_like(t[rows], b))
        return out


def outputs(student_net: Callable, teacher_net: Callable) -> tuple[ModelOutput, ModelOutput]:
    """The student / teacher outputs the diffusion task hands a method."""
    return ModelOutput(None, extra={"net": student_net}), ModelOutput(None, extra={"net": teacher_net})


class guided_teacher(nn.Module):  # noqa: N801  (used like the task's teacher callable)
    """The task's teacher callable: no_grad, classifier-free guided; ``guidance_scale`` overrides the run's scale. A
    module, so a test can also hand it over as a (parameter-free) student."""

    def __init__(self, teacher: nn.Module, scale: float, null_class: int) -> None:
        super().__init__()
        self.teacher, self.scale, self.null_class = teacher, scale, null_class

    def forward(self, z: Tensor, t: Tensor, y: Tensor, guidance_scale: float | Tensor | None = None) -> Tensor:
        with torch.no_grad():
            scale = self.scale if guidance_scale is None else guidance_scale
            return guided(self.teacher, z, t, y, scale, self.null_class)


def prepare(method: Method, student: nn.Module, teacher: nn.Module, schedule: DiffusionSchedule, *,
            guidance: float = 1.0, num_classes: int = 2, dim: int = 2) -> dict:
    return method.prepare_diffusion(student=student, teacher=teacher, schedule=schedule, guidance_scale=guidance,
                                    null_class=num_classes, sample_shape=(dim,), num_classes=num_classes, seed=0)


def toy_teacher(schedule: DiffusionSchedule, std: float = 0.5) -> GaussianTeacher:
    return GaussianTeacher(schedule, torch.tensor([[-1.5, 0.5], [1.5, -0.5]]), std)


def toy_batch(teacher: GaussianTeacher, n: int) -> dict[str, Tensor]:
    y = torch.randint(0, teacher.num_classes, (n,))
    return {"inputs": teacher.means[y] + teacher.std * torch.randn(n, teacher.means.shape[1]), "labels": y}


def small_student(seed: int = 0, width: int = 64) -> MLPDenoiser:
    torch.manual_seed(seed)
    return MLPDenoiser((2,), 2, width=width, depth=2, time_dim=16)


def fit_to_teacher(student: nn.Module, teacher: GaussianTeacher, schedule: DiffusionSchedule, *, steps: int,
                   lr: float = 3e-3, batch: int = 256) -> nn.Module:
    """Regress the student's v on the teacher's (all classes and the null class): a teacher-initialised student, as a
    real run would start from the teacher's weights."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for _ in range(steps):
        b = toy_batch(teacher, batch)
        y = torch.where(torch.rand(batch) < 0.2, torch.full_like(b["labels"], teacher.num_classes), b["labels"])
        t = torch.randint(0, schedule.num_timesteps, (batch,))
        z = schedule.add_noise(b["inputs"], torch.randn_like(b["inputs"]), t)
        loss = ((student(z, t, y) - teacher(z, t, y)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def distil(method: Method, student: nn.Module, teacher: GaussianTeacher, schedule: DiffusionSchedule, *,
           steps_per_stage: int, guidance: float = 1.0, lr: float = 1e-3, batch: int = 256) -> list[float]:
    """Train ``student`` with ``method`` as the diffusion task does; returns the summed loss of every step."""
    prepare(method, student, teacher, schedule, guidance=guidance, num_classes=teacher.num_classes)
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for i, stage in enumerate(method.diffusion_stages()):
        method.set_diffusion_stage(i)
        if stage.teacher == "previous":
            frozen = copy.deepcopy(student).requires_grad_(False)

            def teacher_net(z, t, y, guidance_scale=None, _net=frozen):
                with torch.no_grad():
                    return _net(z, t, y)
        else:
            teacher_net = guided_teacher(teacher, guidance, teacher.num_classes)
        for _ in range(steps_per_stage):
            s_out, t_out = outputs(student, teacher_net)
            loss = sum(method(s_out, t_out, toy_batch(teacher, batch)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_optimizer_step(student)
            history.append(float(loss.detach()))
    return history


def sample_mse(net: Callable, schedule: DiffusionSchedule, reference: Tensor, *, sampler: str, steps: int,
               noise: Tensor, labels: Tensor) -> float:
    """Mean squared distance of ``net``'s samples to ``reference`` samples from the same noise and labels."""
    out = sample(net, schedule, sampler=sampler, steps=steps, noise=noise, labels=labels,
                 generator=torch.Generator().manual_seed(1))
    return float(((out - reference) ** 2).sum(1).mean())


#: the diffusion/tiny recipe cut to seconds; the teacher is cached (per test session) and shared by the runs
TINY_FAST = ["teacher.train.max_steps=40", "teacher.reuse=true", "eval.samples=64", "eval.teacher_steps=8",
             "eval.steps=[1,2]", "eval.latency_repeats=1"]


def tiny_run(output, overrides: Sequence[str]) -> dict:
    """The built-in ``diffusion/tiny`` recipe through ``kdistill.run`` with ``overrides`` (method and kwargs)."""
    import kdistill

    return kdistill.run("diffusion/tiny", output=output, overrides=[*TINY_FAST, *overrides], progress=False,
                        quiet=True)


def stage_state(output, stage_dir: str, what: str) -> dict[str, Tensor]:
    """The weights a finished stage left: ``what`` = ``"student"`` or ``"method"``."""
    from kdistill.io import load_state_dict

    return load_state_dict(output / "work" / "student" / "stages" / stage_dir / f"{what}.safetensors")


def assert_tiny_report(report: dict, *, method: str, sampler: str, steps: int, stages: list[tuple[str, str]]) -> None:
    """The student row of a tiny run: the method, its sampler, its step budget and stages, finite metrics."""
    s = report["student"]
    assert report["method"] == method and s["sampler"] == sampler and s["train_steps"] == steps
    assert [(r["stage"], r["teacher"]) for r in s["stages"]] == stages
    assert set(s["by_steps"]) == {"1", "2"}
    for m in s["by_steps"].values():
        assert all(torch.isfinite(torch.tensor(float(v))) for v in m.values()) and 0 <= m["accuracy"] <= 1
