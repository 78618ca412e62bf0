"""``progressive_distillation``: stages, the exact two-step target, gradients, and a short toy distillation."""

from __future__ import annotations

import copy

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.methods.base import DiffusionStage, ModelOutput
from kdistill.methods.progressive_distillation import ProgressiveDistillation
from kdistill.models.diffusion import DiffusionSchedule, MLPDenoiser, sample
from kdistill.registry import METHODS

from ._diffusion import (
    GaussianTeacher,
    assert_tiny_report,
    ddim_chain,
    distil,
    fit_to_teacher,
    guided_teacher,
    one_thread,  # noqa: F401  (fixture)
    outputs,
    prepare,
    sample_mse,
    small_student,
    stage_state,
    tiny_run,
    toy_batch,
    toy_teacher,
    v_landing_on,
)

SCH = DiffusionSchedule()


def trailing(steps: int, n: int = 1000) -> list[int]:
    """The trailing grid, written out independently of the schedule: ``round(n - i n / steps) - 1``."""
    return [round(n - i * n / steps) - 1 for i in range(steps)]


class TwoStepStudent(torch.nn.Module):
    """The exact progressive-distillation solution: at a timestep of the ``n``-step grid, the v whose one DDIM step
    lands where two DDIM steps of ``net`` on the ``2n``-step grid land."""

    def __init__(self, net, n: int) -> None:
        super().__init__()
        self.net, self.coarse, self.fine = net, trailing(n), trailing(2 * n) + [-1]

    def forward(self, z, t, y):
        out = torch.zeros_like(z)
        for tv in t.unique().tolist():
            rows, i = t == tv, self.coarse.index(tv)
            path = self.fine[2 * i: 2 * i + 3]
            z_end = ddim_chain(self.net, SCH, z[rows], y[rows], path)
            out[rows] = v_landing_on(SCH, z[rows], t[rows], z_end, torch.full_like(t[rows], path[-1]))
        return out


def _loss(method, student_net, teacher_net, batch):
    s, t = outputs(student_net, teacher_net)
    return method(s, t, batch)["progressive"]


def test_registered_with_ddim_sampler_and_halving_stages():
    assert METHODS.get("progressive_distillation") is ProgressiveDistillation
    assert ProgressiveDistillation.diffusion_sampler == "ddim"
    m = ProgressiveDistillation(start_steps=16, final_steps=1)
    assert m.diffusion_stages() == [DiffusionStage("steps_8", "teacher"), DiffusionStage("steps_4", "previous"),
                                    DiffusionStage("steps_2", "previous"), DiffusionStage("steps_1", "previous")]
    for i, n in enumerate([8, 4, 2, 1]):
        m.set_diffusion_stage(i)
        assert m.student_steps == n
    assert [s.name for s in ProgressiveDistillation(start_steps=8, final_steps=2).diffusion_stages()] == \
        ["steps_4", "steps_2"]
    with pytest.raises(KDistillError, match="stage"):
        m.set_diffusion_stage(4)


@pytest.mark.parametrize("kwargs, match", [({"start_steps": 12}, "power of two"), ({"final_steps": 3}, "power of two"),
                                           ({"start_steps": 4, "final_steps": 4}, "more than final_steps"),
                                           ({"weight": 0.0}, "positive")])
def test_bad_kwargs_fail_with_the_fix(kwargs, match):
    with pytest.raises(KDistillError, match=match):
        ProgressiveDistillation(**kwargs)


def test_timesteps_lie_on_the_student_grid_and_its_halves():
    m = ProgressiveDistillation(start_steps=16)
    prepare(m, None, None, SCH)
    for stage, n in enumerate([8, 4, 2, 1]):
        m.set_diffusion_stage(stage)
        t, t_mid, t_end = m._grid(torch.zeros(4000, 2))
        fine = trailing(2 * n) + [-1]
        assert sorted(set(t.tolist())) == sorted(trailing(n))          # every step of the student's sampler
        for a, b, c in set(zip(t.tolist(), t_mid.tolist(), t_end.tolist())):
            i = fine.index(a)
            assert i % 2 == 0 and (b, c) == (fine[i + 1], fine[i + 2])


@pytest.mark.parametrize("stage", [0, 3])
def test_loss_is_zero_for_the_exact_two_step_student_and_not_for_the_teacher(stage):
    teacher = toy_teacher(SCH)
    t_net = guided_teacher(teacher, 2.0, 2)
    m = ProgressiveDistillation(start_steps=16)
    prepare(m, None, teacher, SCH, guidance=2.0)
    m.set_diffusion_stage(stage)
    torch.manual_seed(0)
    batch = toy_batch(teacher, 64)
    exact = _loss(m, TwoStepStudent(t_net, m.student_steps), t_net, batch)
    as_teacher = _loss(m, t_net, t_net, batch)   # one teacher step is not two: the target differs
    assert exact < 1e-8 and as_teacher > 1e-3


def test_loss_is_zero_when_one_teacher_step_is_exact():
    # point masses: the optimal denoiser's clean-data estimate is constant, so DDIM steps are exact and the student
    # that equals the teacher already does in one step what the teacher does in two
    teacher = GaussianTeacher(SCH, torch.tensor([[1.0, -2.0], [0.5, 0.5]]), 0.0)
    m = ProgressiveDistillation(start_steps=4)
    prepare(m, None, teacher, SCH)
    torch.manual_seed(0)
    batch = {"inputs": teacher.means[torch.arange(32) % 2], "labels": torch.arange(32) % 2}
    assert _loss(m, teacher, guided_teacher(teacher, 1.0, 2), batch) < 1e-8


def test_final_stage_weight_is_one_and_earlier_stages_weigh_by_snr():
    teacher = toy_teacher(SCH)
    student = small_student()
    for start, stage, relation in ((4, 1, "equal"), (16, 0, "greater")):
        m = ProgressiveDistillation(start_steps=start)
        prepare(m, None, teacher, SCH)
        m.set_diffusion_stage(stage)
        torch.manual_seed(3)
        loss = float(_loss(m, student, guided_teacher(teacher, 1.0, 2), toy_batch(teacher, 64)).detach())
        x_mse = m.pop_metrics()["x_mse"]
        if relation == "equal":    # 1 step: t = 999, SNR ~ 0, weight max(SNR, 1) = 1
            assert loss == pytest.approx(x_mse, rel=1e-5)
        else:                      # 8 steps: t down to 124, where SNR >> 1
            assert loss > 1.05 * x_mse


def test_loss_matches_an_independent_computation_with_the_same_draws():
    # the method draws the step index, then the noise, with torch's global RNG: replay them and recompute the loss
    # from the two-step student (x~ = alpha z - sigma v~) and the truncated-SNR weight written out here
    teacher = toy_teacher(SCH)
    t_net = guided_teacher(teacher, 2.0, 2)
    student = small_student(4, width=16)
    m = ProgressiveDistillation(start_steps=16)
    prepare(m, student, teacher, SCH, guidance=2.0)
    batch = toy_batch(teacher, 64)
    torch.manual_seed(11)
    loss = float(_loss(m, student, t_net, batch).detach())
    torch.manual_seed(11)
    coarse = torch.tensor(trailing(8))
    t = coarse[torch.randint(0, 8, (64,))]
    x0, y = batch["inputs"], batch["labels"]
    a, s = SCH.alpha_sigma(t, 2)
    z = a * x0 + s * torch.randn_like(x0)
    with torch.no_grad():
        x_target = a * z - s * TwoStepStudent(t_net, 8)(z, t, y)
        x_student = a * z - s * student(z, t, y)
    weight = torch.clamp((a / s) ** 2, min=1.0).flatten()
    expected = (weight * ((x_student - x_target) ** 2).mean(1)).mean()
    assert weight.max() > 10 and loss == pytest.approx(float(expected), rel=1e-4)


def test_gradients_reach_only_the_student_and_runs_are_seeded():
    torch.manual_seed(0)
    student, teacher = MLPDenoiser((2,), 2, width=16, depth=2), MLPDenoiser((2,), 2, width=16, depth=2)
    m = ProgressiveDistillation(start_steps=8)
    prepare(m, student, teacher, SCH, guidance=3.0)
    batch = toy_batch(toy_teacher(SCH), 16)
    torch.manual_seed(5)
    loss = _loss(m, student, guided_teacher(teacher, 3.0, 2), batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and not list(m.parameters())
    again = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        again.append(float(_loss(m, student, guided_teacher(teacher, 3.0, 2), batch).detach()))
    assert again[0] == float(loss.detach()) and again[1] != float(loss.detach())


def test_clear_errors_without_prepare_or_task_outputs():
    m = ProgressiveDistillation()
    t = toy_teacher(SCH)
    with pytest.raises(KDistillError, match="prepare_diffusion"):
        _loss(m, t, t, toy_batch(t, 4))
    prepare(m, None, t, SCH)
    with pytest.raises(KDistillError, match="task: diffusion"):
        m(ModelOutput(torch.zeros(4, 2)), outputs(t, t)[1], toy_batch(t, 4))
    with pytest.raises(KDistillError, match="'inputs'"):
        _loss(m, t, t, {"labels": torch.zeros(4).long()})
    with pytest.raises(KDistillError, match="at most the schedule"):
        prepare(ProgressiveDistillation(start_steps=16), None, None, DiffusionSchedule(num_timesteps=8))


@pytest.mark.usefixtures("one_thread")
def test_toy_distillation_beats_the_teacher_at_one_step():
    # teacher: exact class-conditional Gaussians; the student starts as a fit of the teacher (as a real run starts
    # from the teacher's weights) and is distilled 4 -> 2 -> 1 steps, the second stage from the first's student
    teacher = toy_teacher(SCH)
    torch.manual_seed(0)
    student = fit_to_teacher(small_student(), teacher, SCH, steps=200, batch=128, lr=5e-3)
    noise, labels = torch.randn(512, 2, generator=torch.Generator().manual_seed(5)), torch.arange(512) % 2
    reference = sample(teacher, SCH, sampler="ddim", steps=32, noise=noise, labels=labels)
    mse = lambda net: sample_mse(net, SCH, reference, sampler="ddim", steps=1, noise=noise, labels=labels)  # noqa: E731
    before, teacher_one_step = mse(student), mse(teacher)
    distilled = copy.deepcopy(student)
    distil(ProgressiveDistillation(start_steps=4, final_steps=1), distilled, teacher, SCH, steps_per_stage=150,
           batch=128, lr=2e-3)
    after = mse(distilled)
    assert after < 0.25 * teacher_one_step and after < 0.25 * before, (before, teacher_one_step, after)


@pytest.mark.usefixtures("one_thread")
def test_tiny_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    report = tiny_run(out, ["method=progressive_distillation", "method.kwargs.start_steps=4", "train.max_steps=4"])
    assert_tiny_report(report, method="progressive_distillation", sampler="ddim", steps=4,
                       stages=[("steps_2", "teacher"), ("steps_1", "previous")])
    from kdistill.io import load_state_dict

    teacher = load_state_dict(out / "teacher" / "model.safetensors")
    first, last = stage_state(out, "00_steps_2", "student"), stage_state(out, "01_steps_1", "student")
    assert any(not torch.equal(teacher[k], first[k]) for k in teacher)   # the student (a teacher copy) trained
    assert any(not torch.equal(first[k], last[k]) for k in first)        # and went on training in stage 2
