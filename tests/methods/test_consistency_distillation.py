"""``consistency_distillation`` and the EMA helper: exact zero at the teacher's discrete consistency function, the
target network, gradients, and a short toy distillation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdistill.errors import KDistillError
from kdistill.methods.base import DiffusionStage
from kdistill.methods.consistency_distillation import ConsistencyDistillation
from kdistill.models.diffusion import DiffusionSchedule, MLPDenoiser, sample
from kdistill.modules.ema import ema_update, frozen_copy
from kdistill.registry import METHODS

from ._diffusion import (
    ChainStudent,
    GaussianTeacher,
    assert_tiny_report,
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
)

SCH = DiffusionSchedule()


def grid(n: int, total: int = 1000) -> list[int]:
    """``-1, T/n - 1, 2T/n - 1, ..., T - 1``, written out independently of the method."""
    return [-1] + [k * total // n - 1 for k in range(1, n + 1)]


def _loss(method, student_net, teacher_net, batch):
    s, t = outputs(student_net, teacher_net)
    return method(s, t, batch)["consistency"]


# ------------------------------------------------------------------------------------------------------ EMA helper


def test_ema_update_closed_form_and_limits():
    torch.manual_seed(0)
    src = nn.BatchNorm1d(3)
    src.weight.data, src.bias.data = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, -1.0])
    src.running_mean.fill_(7.0)
    tgt = frozen_copy(src)
    assert not tgt.training and not any(p.requires_grad for p in tgt.parameters())
    tgt.weight.data.fill_(0.0)
    ema_update(tgt, src, decay=0.75)
    torch.testing.assert_close(tgt.weight, torch.tensor([0.25, 0.5, 0.75]))      # 0.75 * 0 + 0.25 * w
    torch.testing.assert_close(tgt.bias, src.bias)                              # equal stays equal
    torch.testing.assert_close(tgt.running_mean, torch.full((3,), 7.0))         # buffers are copied
    ema_update(tgt, src, decay=1.0)
    torch.testing.assert_close(tgt.weight, torch.tensor([0.25, 0.5, 0.75]))      # decay 1 keeps the target
    ema_update(tgt, src, decay=0.0)
    torch.testing.assert_close(tgt.weight, src.weight)                          # decay 0 copies
    src.weight.data.add_(1.0)
    assert not torch.equal(tgt.weight, src.weight)                              # a copy, not shared storage


def test_ema_update_rejects_a_different_network_and_a_bad_decay():
    with pytest.raises(KDistillError, match="parameters differ"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), decay=0.5)
    with pytest.raises(KDistillError, match="shape"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 3), decay=0.5)
    with pytest.raises(KDistillError, match="decay"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), decay=1.5)


# ---------------------------------------------------------------------------------------------------------- method


def test_registered_one_stage_consistency_sampler():
    assert METHODS.get("consistency_distillation") is ConsistencyDistillation
    m = ConsistencyDistillation()
    assert m.diffusion_sampler == "consistency" and m.diffusion_stages() == [DiffusionStage("distil", "teacher")]
    assert m._grid(SCH) == grid(40)


@pytest.mark.parametrize("kwargs, match", [({"num_intervals": 0}, "num_intervals"), ({"ema_decay": 1.0}, "ema_decay"),
                                           ({"distance": "l1"}, "pseudo_huber"), ({"huber_c": 0.0}, "huber_c")])
def test_bad_kwargs_fail_with_the_fix(kwargs, match):
    with pytest.raises(KDistillError, match=match):
        ConsistencyDistillation(**kwargs)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_loss_is_zero_at_the_teachers_consistency_function_and_not_at_the_teacher(distance):
    # the student (and hence its EMA target) is the exact discrete consistency function of the guided teacher's DDIM
    # steps on the method's grid: f(z_{t_{n+1}}) = f(z_hat_{t_n}) holds for every pair, so the loss vanishes
    teacher = toy_teacher(SCH)
    t_net = guided_teacher(teacher, 2.0, 2)
    m = ConsistencyDistillation(num_intervals=20, distance=distance)
    student = ChainStudent(t_net, SCH, grid(20))
    prepare(m, student, teacher, SCH, guidance=2.0)
    torch.manual_seed(0)
    batch = toy_batch(teacher, 64)
    assert _loss(m, student, t_net, batch) < 1e-5
    # the teacher's own clean-data prediction is not a consistency function (x_hat changes along the trajectory)
    m2 = ConsistencyDistillation(num_intervals=20, distance=distance)
    prepare(m2, t_net, teacher, SCH, guidance=2.0)
    torch.manual_seed(0)
    assert _loss(m2, t_net, t_net, batch) > 1e-3


def test_loss_is_zero_for_point_masses_where_the_teacher_is_its_own_consistency_function():
    teacher = GaussianTeacher(SCH, torch.tensor([[1.0, -2.0], [0.5, 0.5]]), 0.0)
    m = ConsistencyDistillation(num_intervals=20)
    prepare(m, teacher, teacher, SCH)
    batch = {"inputs": teacher.means[torch.arange(32) % 2], "labels": torch.arange(32) % 2}
    assert _loss(m, teacher, guided_teacher(teacher, 1.0, 2), batch) < 1e-10


def test_one_interval_targets_the_teachers_clean_data_prediction():
    # with one interval every pair is (T - 1, -1): the boundary condition makes the target the teacher's DDIM step to
    # clean data, whatever the target network is -- the anchor of the chain
    teacher = toy_teacher(SCH)
    t_net = guided_teacher(teacher, 2.0, 2)
    batch = toy_batch(teacher, 32)
    for student, zero in ((t_net, True), (small_student(6, width=16), False)):
        m = ConsistencyDistillation(num_intervals=1)
        prepare(m, student, teacher, SCH, guidance=2.0)
        loss = float(_loss(m, student, t_net, batch).detach())
        assert (loss < 1e-10) if zero else (loss > 1e-2), loss


def test_target_network_is_a_frozen_ema_saved_with_the_method_and_gradients_reach_only_the_student():
    torch.manual_seed(0)
    student, teacher = MLPDenoiser((2,), 2, width=16, depth=2), MLPDenoiser((2,), 2, width=16, depth=2)
    m = ConsistencyDistillation(ema_decay=0.5)
    prepare(m, student, teacher, SCH, guidance=3.0)
    assert m.target is not student and not any(p.requires_grad for p in m.parameters())
    assert m.train().training and not m.target.training                          # the loop's train() keeps it frozen
    assert any(k.startswith("target.") for k in m.state_dict())                 # checkpointed with the method
    loss = _loss(m, student, guided_teacher(teacher, 3.0, 2), toy_batch(toy_teacher(SCH), 16))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in m.parameters())
    before = {k: v.clone() for k, v in m.target.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    m.after_optimizer_step(student)
    for k, v in m.target.state_dict().items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * student.state_dict()[k])


def test_runs_are_seeded():
    student, teacher = small_student(1, width=16), toy_teacher(SCH)
    m = ConsistencyDistillation()
    prepare(m, student, teacher, SCH)
    batch = toy_batch(teacher, 32)
    losses = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        losses.append(float(_loss(m, student, guided_teacher(teacher, 1.0, 2), batch).detach()))
    assert losses[0] == losses[1] != losses[2]


def test_clear_errors_without_prepare_and_on_a_too_fine_grid():
    t = toy_teacher(SCH)
    with pytest.raises(KDistillError, match="prepare_diffusion"):
        _loss(ConsistencyDistillation(), t, t, toy_batch(t, 4))
    with pytest.raises(KDistillError, match="prepare_diffusion"):
        ConsistencyDistillation().after_optimizer_step(t)
    with pytest.raises(KDistillError, match="at most the schedule"):
        prepare(ConsistencyDistillation(num_intervals=40), t, t, DiffusionSchedule(num_timesteps=20))


@pytest.mark.usefixtures("one_thread")
def test_toy_distillation_beats_the_teacher_at_one_step():
    teacher = toy_teacher(SCH)
    torch.manual_seed(0)
    student = fit_to_teacher(small_student(), teacher, SCH, steps=200, batch=128, lr=5e-3)
    noise, labels = torch.randn(512, 2, generator=torch.Generator().manual_seed(5)), torch.arange(512) % 2
    reference = sample(teacher, SCH, sampler="ddim", steps=32, noise=noise, labels=labels)
    before = sample_mse(student, SCH, reference, sampler="consistency", steps=1, noise=noise, labels=labels)
    teacher_one_step = sample_mse(teacher, SCH, reference, sampler="ddim", steps=1, noise=noise, labels=labels)
    distilled = copy.deepcopy(student)
    distil(ConsistencyDistillation(num_intervals=20, ema_decay=0.9), distilled, teacher, SCH, steps_per_stage=300,
           batch=128, lr=2e-3)
    after = sample_mse(distilled, SCH, reference, sampler="consistency", steps=1, noise=noise, labels=labels)
    assert after < 0.25 * teacher_one_step and after < 0.25 * before, (before, teacher_one_step, after)


@pytest.mark.usefixtures("one_thread")
def test_tiny_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    report = tiny_run(out, ["method=consistency_distillation", "method.kwargs.num_intervals=20", "train.max_steps=3"])
    assert_tiny_report(report, method="consistency_distillation", sampler="consistency", steps=3,
                       stages=[("distil", "teacher")])
    from kdistill.io import load_state_dict

    teacher, student = load_state_dict(out / "teacher" / "model.safetensors"), stage_state(out, "00_distil", "student")
    target = stage_state(out, "00_distil", "method")
    # the EMA target started as the student (a teacher copy), moved with it, and lags behind it
    assert set(target) == {f"target.{k}" for k in student}
    assert any(not torch.equal(target[f"target.{k}"], teacher[k]) for k in teacher)
    assert any(not torch.equal(target[f"target.{k}"], student[k]) for k in student)
