"""``vsd``: variational score distillation into a one-step generator (ProlificDreamer, 2023)."""

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.methods.vsd import VSD
from kdistill.models.diffusion import DiffusionSchedule, MLPDenoiser
from kdistill.registry import METHODS

from ._diffusion import guided_teacher, outputs, toy_teacher
from ._score_toys import (
    copy_of,
    energy_distance,
    generator_grad,
    mlp_teacher,
    samples,
    term_grads,
    tiny_run,
    train,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MU_R, MU_F = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 0.5])


def test_registered_with_the_one_step_sampler():
    assert METHODS.get("vsd") is VSD and VSD.diffusion_sampler == "consistency"


def test_gradient_is_the_closed_form_on_gaussians():
    """Real N(mu_r, I), fake N(mu_f, I): ``fake_x0 - real_x0 = sigma_t**2 (mu_f - mu_r)`` at every z, so at t = 500 the
    gradient on each sample is ``alpha sigma**3 (mu_f - mu_r) / (B D)``: descending it moves every sample from mu_f
    towards mu_r."""
    x = torch.randn(6, 2)
    grad = generator_grad(VSD(timestep_range=(0.5, 0.5)), real_mean=MU_R, fake_mean=MU_F, x=x)
    a, s = DiffusionSchedule().alpha_sigma(torch.tensor([500]))
    expected = (a * s ** 3).item() * (MU_F - MU_R) / (6 * 2)
    assert torch.allclose(grad, expected.expand(6, 2), rtol=1e-4, atol=1e-9)
    # over the default timestep range: the direction is the same for every sample, only the size varies
    grad = generator_grad(VSD(), real_mean=MU_R, fake_mean=MU_F, x=x)
    cos = torch.nn.functional.cosine_similarity(-grad, (MU_R - MU_F).expand(6, 2), dim=1)
    assert (cos > 0.9999).all()


def test_zero_gradient_when_fake_equals_real():
    x = torch.randn(5, 2)
    assert generator_grad(VSD(), real_mean=MU_R, fake_mean=MU_R, x=x, guidance=3.0).abs().max() == 0
    # and right after prepare_diffusion, unguided: the fake score is a copy of the teacher
    assert generator_grad(VSD(), real_mean=MU_R, fake_mean=None, x=x).abs().max() == 0


def test_each_term_reaches_only_its_own_parameters():
    student, fake, teacher = term_grads(VSD(), "generator")
    assert student > 0 and fake == 0
    student, fake, teacher = term_grads(VSD(), "fake_score")
    assert student == 0 and fake > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_snoopi_draws_a_guidance_scale_per_example():
    seen = []

    def teacher_net(z, t, y, guidance_scale=None):
        seen.append(guidance_scale)
        return torch.zeros_like(z)

    sched = DiffusionSchedule()
    for method in (VSD(), VSD(guidance_range=[2.0, 4.0])):
        student = MLPDenoiser((2,), 2, width=8, depth=1)
        method.prepare_diffusion(student=student, teacher=copy_of(student), schedule=sched, guidance_scale=3.0,
                                 null_class=2, sample_shape=(2,), num_classes=2, seed=0)
        method(*outputs(student, teacher_net), {"inputs": torch.zeros(32, 2), "labels": torch.zeros(32).long()})
    assert seen[0] is None  # the run's scale
    assert seen[1].shape == (32,) and 2.0 <= seen[1].min() < seen[1].max() <= 4.0


def test_seeded_reproducible_and_data_free():
    def run(inputs):
        torch.manual_seed(0)
        student = MLPDenoiser((2,), 2, width=8, depth=1)
        method = VSD()
        method.prepare_diffusion(student=student, teacher=copy_of(student), schedule=DiffusionSchedule(),
                                 guidance_scale=2.0, null_class=2, sample_shape=(2,), num_classes=2, seed=0)
        out = method(*outputs(student, guided_teacher(copy_of(student), 2.0, 2)),
                     {"inputs": inputs, "labels": torch.tensor([0, 1, 1, 0])})
        return {k: float(v.detach()) for k, v in out.items()}

    first = run(torch.zeros(4, 2))
    assert first == run(torch.randn(4, 2)) and set(first) == {"generator", "fake_score"}
    assert all(v > 0 for v in first.values())


def test_training_moves_one_step_samples_to_the_teacher():
    """From a random one-step generator, 400 steps bring its samples much closer (energy distance) to the teacher's
    100-step DDIM samples of the two-Gaussian toy."""
    sched = DiffusionSchedule()
    teacher = mlp_teacher(sched)
    reference = samples(toy_teacher(sched), sched, sampler="ddim", steps=100)
    torch.manual_seed(3)
    student = MLPDenoiser((2,), 2, width=32, depth=2, time_dim=16)
    before = energy_distance(samples(student, sched, sampler="consistency", steps=1), reference)
    history = train(VSD(), student, teacher, sched, steps=400, lr=3e-4)
    after = energy_distance(samples(student, sched, sampler="consistency", steps=1), reference)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert after < 0.5 * before, (before, after)


def test_bad_kwargs_and_missing_prepare_fail_clearly():
    with pytest.raises(KDistillError, match="guidance_range"):
        VSD(guidance_range=[4.0, 2.0])
    with pytest.raises(KDistillError, match="timestep_range"):
        VSD(timestep_range=[0.1, 1.5])
    with pytest.raises(KDistillError, match="prepare_diffusion"):
        VSD()(*outputs(None, None), {"labels": torch.zeros(2).long()})


def test_three_steps_of_the_tiny_recipe(tmp_path):
    report = tiny_run(tmp_path / "run", "vsd", "method.kwargs.guidance_range=[1.0,3.0]")
    assert report["student"]["sampler"] == "consistency"


def test_two_time_scale_rule_trains_the_generator_every_kth_step_only():
    """``fake_updates=3`` (DMD2): steps 0, 3, 6 train generator and fake score; the steps between, the fake score only,
    and the generator's parameters get no gradient (so its optimizer skips them)."""
    sched = DiffusionSchedule()
    torch.manual_seed(0)
    student = MLPDenoiser((2,), 2, width=8, depth=1)
    method = VSD(fake_updates=3)
    method.prepare_diffusion(student=student, teacher=copy_of(student), schedule=sched, guidance_scale=2.0,
                             null_class=2, sample_shape=(2,), num_classes=2, seed=0)
    teacher = guided_teacher(copy_of(student), 2.0, 2)
    batch = {"inputs": torch.zeros(8, 2), "labels": torch.tensor([0, 1] * 4)}
    seen = []
    for _ in range(7):
        student.zero_grad(set_to_none=True)
        method.zero_grad(set_to_none=True)
        out = method(*outputs(student, teacher), batch)
        sum(out.values()).backward()
        got_grad = any(p.grad is not None for p in student.parameters())
        seen.append((set(out), got_grad))
        assert any(p.grad is not None for p in method.fake.parameters())
        method.after_optimizer_step(student)
    gen = [i for i, (terms, g) in enumerate(seen) if "generator" in terms]
    assert gen == [0, 3, 6]
    assert [g for _, g in seen] == [i in gen for i in range(7)]
    assert int(method.step) == 7 and "step" in method.state_dict()
    with pytest.raises(KDistillError, match="fake_updates"):
        VSD(fake_updates=0)
