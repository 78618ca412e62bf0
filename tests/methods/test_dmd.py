"""``dmd``: distribution matching distillation into a one-step generator (Yin et al., 2024)."""

import pytest
import torch
from torch import nn

from kdistill.errors import KDistillError
from kdistill.methods.dmd import DMD
from kdistill.models.diffusion import DiffusionSchedule, MLPDenoiser, guided, sample
from kdistill.registry import METHODS

from ._diffusion import GaussianTeacher, guided_teacher, outputs, toy_teacher
from ._score_toys import energy_distance, generator_grad, mlp_teacher, samples, term_grads, tiny_run, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MU_R, MU_F = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 0.5])


def prepared(method: DMD, teacher: nn.Module, *, guidance: float = 2.0, seed: int = 0) -> DMD:
    method.prepare_diffusion(student=MLPDenoiser((2,), 2, width=8, depth=1), teacher=teacher,
                             schedule=teacher.schedule, guidance_scale=guidance, null_class=2, sample_shape=(2,),
                             num_classes=2, seed=seed)
    return method


class ODEGenerator(nn.Module):
    """The ideal one-step student of the regression term: at the last timestep it returns the v whose clean-data
    prediction is the teacher's ``steps``-step guided DDIM sample from the same noise (plus ``offset``)."""

    def __init__(self, teacher: GaussianTeacher, steps: int, guidance: float, offset: float = 0.0) -> None:
        super().__init__()
        self.teacher, self.steps, self.guidance, self.offset = teacher, steps, guidance, offset

    def forward(self, z, t, y):
        sched = self.teacher.schedule
        net = lambda z_, t_, y_: guided(self.teacher, z_, t_, y_, self.guidance, 2)  # noqa: E731
        x = sample(net, sched, sampler="ddim", steps=self.steps, noise=z, labels=y) + self.offset
        a, s = sched.alpha_sigma(t, z.ndim)
        return (a * z - x) / s


def test_registered_with_the_one_step_sampler():
    assert METHODS.get("dmd") is DMD and DMD.diffusion_sampler == "consistency"


def test_gradient_points_from_the_fake_mean_to_the_real_mean():
    """Real N(mu_r, I), fake N(mu_f, I): ``fake_x0 - real_x0 = sigma_t**2 (mu_f - mu_r)`` at every z, so after DMD's
    positive per-example normalisation every sample's gradient is parallel to ``mu_f - mu_r``."""
    x = torch.randn(6, 2)
    grad = generator_grad(DMD(regression_weight=0), real_mean=MU_R, fake_mean=MU_F, x=x)
    ratio = -grad / (MU_R - MU_F)
    assert (ratio > 0).all() and torch.allclose(ratio[:, 0], ratio[:, 1], rtol=1e-4)
    # the step shrinks with the distance between the two means
    near = generator_grad(DMD(regression_weight=0), real_mean=MU_R, fake_mean=MU_R + 0.1 * (MU_F - MU_R), x=x)
    assert (near.norm(dim=1) < grad.norm(dim=1)).all()


def test_zero_gradient_when_fake_equals_real():
    x = torch.randn(5, 2)
    assert generator_grad(DMD(regression_weight=0), real_mean=MU_R, fake_mean=MU_R, x=x, guidance=3.0).abs().max() == 0
    snoopi = DMD(regression_weight=0, guidance_range=(1.0, 5.0))
    assert generator_grad(snoopi, real_mean=MU_R, fake_mean=MU_R, x=x).abs().max() == 0
    assert generator_grad(DMD(regression_weight=0), real_mean=MU_R, fake_mean=None, x=x).abs().max() == 0


def test_each_term_reaches_only_its_own_parameters():
    for term, student_grad, method_grad in [("generator", True, False), ("fake_score", False, True),
                                            ("regression", True, False)]:
        student, fake, teacher = term_grads(DMD(regression_pairs=8, regression_steps=2), term)
        assert (student > 0) == student_grad and (fake > 0) == method_grad, term
        assert all(p.grad is None for p in teacher.parameters())


def test_regression_pairs_are_the_teachers_ddim_samples():
    sched = DiffusionSchedule()
    teacher = toy_teacher(sched)
    method = prepared(DMD(regression_pairs=40, regression_steps=8), teacher, guidance=2.0)
    noise, labels, targets = method.regression_noise, method.regression_labels, method.regression_targets
    assert noise.shape == targets.shape == (40, 2) and labels.shape == (40,)
    assert set(labels.tolist()) == {0, 1}
    net = lambda z, t, y: guided(teacher, z, t, y, 2.0, 2)  # noqa: E731
    expected = sample(net, sched, sampler="ddim", steps=8, noise=noise, labels=labels)
    assert torch.allclose(targets, expected, atol=1e-6)
    assert {"regression_noise", "regression_targets"} <= set(method.state_dict())  # saved with checkpoints
    again = prepared(DMD(regression_pairs=40, regression_steps=8), teacher, guidance=2.0)
    assert torch.equal(again.regression_targets, targets)
    other = prepared(DMD(regression_pairs=40, regression_steps=8), teacher, guidance=2.0, seed=1)
    assert not torch.equal(other.regression_noise, noise)


def test_regression_is_zero_for_the_teachers_ode_map():
    sched = DiffusionSchedule()
    teacher = toy_teacher(sched)
    method = prepared(DMD(regression_pairs=64, regression_steps=8, regression_weight=0.25), teacher)
    batch = {"inputs": torch.zeros(32, 2), "labels": torch.randint(0, 2, (32,))}
    t_out = guided_teacher(teacher, 2.0, 2)
    exact = method(*outputs(ODEGenerator(teacher, 8, 2.0), t_out), batch)["regression"]
    off = method(*outputs(ODEGenerator(teacher, 8, 2.0, offset=0.1), t_out), batch)["regression"]
    assert float(exact) < 1e-9
    assert float(off) == pytest.approx(0.25 * 0.1 ** 2, rel=1e-3)
    plain = prepared(DMD(regression_weight=0), teacher)
    assert "regression" not in plain(*outputs(ODEGenerator(teacher, 8, 2.0), t_out), batch)
    assert not hasattr(plain, "regression_targets")


def test_seeded_reproducible_and_data_free():
    sched = DiffusionSchedule()
    teacher = toy_teacher(sched)

    def run(inputs):
        torch.manual_seed(0)
        student = MLPDenoiser((2,), 2, width=8, depth=1)
        method = prepared(DMD(regression_pairs=16, regression_steps=4), teacher)
        out = method(*outputs(student, guided_teacher(teacher, 2.0, 2)), {"inputs": inputs,
                                                                        "labels": torch.tensor([0, 1, 1, 0])})
        return {k: float(v.detach()) for k, v in out.items()}

    first = run(torch.zeros(4, 2))
    assert first == run(torch.randn(4, 2)) and set(first) == {"generator", "fake_score", "regression"}


def test_training_moves_one_step_samples_to_the_teacher():
    """From a random one-step generator, 400 steps bring its samples much closer (energy distance) to the teacher's
    100-step DDIM samples of the two-Gaussian toy."""
    sched = DiffusionSchedule()
    teacher = mlp_teacher(sched)
    reference = samples(toy_teacher(sched), sched, sampler="ddim", steps=100)
    torch.manual_seed(3)
    student = MLPDenoiser((2,), 2, width=32, depth=2, time_dim=16)
    before = energy_distance(samples(student, sched, sampler="consistency", steps=1), reference)
    history = train(DMD(regression_pairs=256, regression_steps=20), student, teacher, sched, steps=400, lr=3e-4)
    after = energy_distance(samples(student, sched, sampler="consistency", steps=1), reference)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert history[-1]["regression"] < history[0]["regression"]
    assert after < 0.5 * before, (before, after)


def test_bad_kwargs_fail_clearly():
    with pytest.raises(KDistillError, match="regression_weight"):
        DMD(regression_weight=-1)
    with pytest.raises(KDistillError, match="regression_steps"):
        DMD(regression_steps=0)
    with pytest.raises(KDistillError, match="guidance_range"):
        DMD(guidance_range=[1.0])


def test_three_steps_of_the_tiny_recipe(tmp_path):
    report = tiny_run(tmp_path / "run", "dmd", "method.kwargs.regression_pairs=32", "method.kwargs.regression_steps=4")
    assert report["student"]["sampler"] == "consistency"
    assert report["student"]["prepare"] == {"regression_pairs": 32, "regression_steps": 4}
