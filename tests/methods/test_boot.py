"""``boot``: data-free one-step distillation by bootstrapping along the teacher's ODE (Gu et al., 2023)."""

import pytest
import torch
from torch import nn

from kdistill.errors import KDistillError
from kdistill.methods.boot import BOOT
from kdistill.models.diffusion import DiffusionSchedule, MLPDenoiser
from kdistill.registry import METHODS

from ._diffusion import guided_teacher, outputs, toy_teacher
from ._score_toys import energy_distance, samples, tiny_run, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ExactSignal(nn.Module):
    """The generator BOOT converges to, built independently of its loss: the teacher's DDIM trajectory from the noise,
    one timestep per step, in float64 with the plain formulas. The trajectory starts at the boundary value (the
    teacher's clean-data prediction from ``z = eps`` at the last timestep) and every later signal is
    ``(x_t - sigma_t eps) / alpha_t`` of the DDIM iterate ``x_t``. It returns the v whose ``noise_to_data`` read-out is
    that signal, plus ``offset`` at odd timesteps (a trajectory that is no ODE solution)."""

    def __init__(self, teacher_net, schedule: DiffusionSchedule, offset: float = 0.0) -> None:
        super().__init__()
        self.teacher_net, self.schedule, self.offset = teacher_net, schedule, offset
        self._eps: torch.Tensor | None = None

    def _trajectory(self, eps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._eps is None or not torch.equal(self._eps, eps):
            sched, n = self.schedule, self.schedule.num_timesteps
            e = eps.double()
            step = lambda t: torch.full((len(e),), t, dtype=torch.long)  # noqa: E731
            signal = sched.predict_x0(self.teacher_net(e, step(n - 1), y), e, step(n - 1))
            a, s = sched.alpha_sigma(step(n - 1), 2)
            x = a * signal + s * e
            table = [signal]
            for t in range(n - 1, 0, -1):
                x = sched.ddim_step(self.teacher_net(x, step(t), y), x, step(t), step(t - 1))
                a, s = sched.alpha_sigma(step(t - 1), 2)
                table.append((x - s * e) / a)
            self._eps, self._table = eps.clone(), torch.stack(table[::-1])  # (T, B, D), index = timestep
        return self._table

    def forward(self, z, t, y):
        signal = self._trajectory(z, y)[t, torch.arange(len(z))] + self.offset * (t % 2)[:, None]
        last = torch.full_like(t, self.schedule.num_timesteps - 1)
        a, s = self.schedule.alpha_sigma(last, z.ndim)
        return ((a * z - signal) / s).float()


def prepared(method: BOOT, schedule: DiffusionSchedule) -> BOOT:
    method.prepare_diffusion(student=nn.Identity(), teacher=nn.Identity(), schedule=schedule, guidance_scale=2.0,
                             null_class=2, sample_shape=(2,), num_classes=2, seed=0)
    return method


def test_registered_with_the_noise_to_data_sampler():
    assert METHODS.get("boot") is BOOT and BOOT.diffusion_sampler == "noise_to_data"


def test_loss_is_zero_for_the_exact_ode_solution_generator():
    sched = DiffusionSchedule()
    teacher = guided_teacher(toy_teacher(sched), 2.0, 2)
    method = prepared(BOOT(delta=1), sched)
    batch = {"inputs": torch.zeros(64, 2), "labels": torch.randint(0, 2, (64,))}
    torch.manual_seed(0)
    exact = method(*outputs(ExactSignal(teacher, sched), teacher), batch)
    assert float(exact["bootstrap"]) < 1e-9 and float(exact["boundary"]) < 1e-9
    torch.manual_seed(0)
    off = method(*outputs(ExactSignal(teacher, sched, offset=0.1), teacher), batch)
    # T - 1 is odd: the boundary is off by 0.1; every bootstrapping pair has one odd end, so it is off by about 0.1
    assert float(off["boundary"]) == pytest.approx(0.01, rel=1e-3)
    assert float(off["bootstrap"]) == pytest.approx(0.01, rel=0.1)


def test_bootstraps_from_t_to_t_minus_delta_and_pins_the_last_timestep():
    sched = DiffusionSchedule()
    calls = []
    student = MLPDenoiser((2,), 2, width=8, depth=1)

    def recording(z, t, y):
        calls.append(t.clone())
        return student(z, t, y)

    prepared(BOOT(delta=7), sched)(*outputs(recording, guided_teacher(toy_teacher(sched), 1.0, 2)),
                                   {"inputs": torch.zeros(256, 2), "labels": torch.randint(0, 2, (256,))})
    t, s, last = calls  # the signal at t (no gradient), at s = t - delta, at the last timestep
    assert torch.equal(s, t - 7) and t.min() >= 7 and t.max() <= 999 and (last == 999).all()


def test_data_free_and_seeded():
    sched = DiffusionSchedule()
    teacher = guided_teacher(toy_teacher(sched), 2.0, 2)
    method = prepared(BOOT(), sched)
    torch.manual_seed(0)
    student = MLPDenoiser((2,), 2, width=16, depth=2)
    labels = torch.tensor([0, 1, 0, 1, 1])

    def loss(inputs, seed=0):
        torch.manual_seed(seed)
        return [float(v.detach()) for v in method(*outputs(student, teacher), {"inputs": inputs,
                                                                              "labels": labels}).values()]

    assert loss(torch.zeros(5, 2)) == loss(100 * torch.randn(5, 2))
    assert loss(torch.zeros(5, 2)) != loss(torch.zeros(5, 2), seed=1)


def test_only_the_student_is_trained():
    sched = DiffusionSchedule()
    gaussian = toy_teacher(sched)
    method = prepared(BOOT(), sched)
    student = MLPDenoiser((2,), 2, width=16, depth=2)
    losses = method(*outputs(student, guided_teacher(gaussian, 2.0, 2)),
                    {"inputs": torch.zeros(8, 2), "labels": torch.randint(0, 2, (8,))})
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert list(method.parameters()) == []


def test_training_lowers_the_loss_and_moves_samples_to_the_teacher():
    """From a random student, against the exact two-Gaussian teacher: the bootstrapping loss (evaluated on the same
    noise) falls, and the one-step samples approach the teacher's 100-step DDIM samples."""
    sched = DiffusionSchedule()
    gaussian = toy_teacher(sched)
    reference = samples(gaussian, sched, sampler="ddim", steps=100)
    torch.manual_seed(3)
    student = MLPDenoiser((2,), 2, width=32, depth=2, time_dim=16)
    method = prepared(BOOT(delta=50), sched)
    eval_batch = {"inputs": torch.zeros(512, 2), "labels": torch.arange(512) % 2}

    def evaluate():
        torch.manual_seed(123)
        with torch.no_grad():
            loss = sum(method(*outputs(student, guided_teacher(gaussian, 1.0, 2)), eval_batch).values())
        return float(loss), energy_distance(samples(student, sched, sampler="noise_to_data", steps=1), reference)

    loss_before, dist_before = evaluate()
    train(method, student, gaussian, sched, steps=500, lr=1e-3)
    loss_after, dist_after = evaluate()
    assert loss_after < 0.2 * loss_before, (loss_before, loss_after)
    assert dist_after < 0.3 * dist_before, (dist_before, dist_after)


def test_bad_kwargs_fail_clearly():
    with pytest.raises(KDistillError, match="delta"):
        BOOT(delta=0)
    with pytest.raises(KDistillError, match="delta"):
        prepared(BOOT(delta=1000), DiffusionSchedule())
    with pytest.raises(KDistillError, match="prepare_diffusion"):
        BOOT()(*outputs(None, None), {"labels": torch.zeros(2).long()})


def test_three_steps_of_the_tiny_recipe(tmp_path):
    report = tiny_run(tmp_path / "run", "boot")
    assert report["student"]["sampler"] == "noise_to_data"
