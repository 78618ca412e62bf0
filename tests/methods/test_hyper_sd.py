"""``hyper_sd``: segment boundaries, stages, exact zero at the teacher's segment-consistent map, the reduction to
consistency distillation at one segment, and a short toy distillation."""

from __future__ import annotations

import copy

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.methods.base import DiffusionStage
from kdistill.methods.consistency_distillation import ConsistencyDistillation
from kdistill.methods.hyper_sd import HyperSD
from kdistill.models.diffusion import DiffusionSchedule, sample
from kdistill.registry import METHODS

from ._diffusion import (
    ChainStudent,
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
from .test_consistency_distillation import grid

SCH = DiffusionSchedule()


def _loss(method, student_net, teacher_net, batch):
    s, t = outputs(student_net, teacher_net)
    return method(s, t, batch)["consistency"]


def test_registered_stages_all_against_the_teacher():
    assert METHODS.get("hyper_sd") is HyperSD and HyperSD.diffusion_sampler == "consistency"
    m = HyperSD()
    assert m.diffusion_stages() == [DiffusionStage(f"segments_{s}", "teacher") for s in (8, 4, 2, 1)]
    for i, s in enumerate((8, 4, 2, 1)):
        m.set_diffusion_stage(i)
        assert m.num_segments == s
    with pytest.raises(KDistillError, match="stage"):
        m.set_diffusion_stage(4)


def test_segment_boundaries_are_the_sampling_steps():
    assert HyperSD._boundaries(SCH, 4) == [-1, 249, 499, 749]
    assert HyperSD._boundaries(SCH, 8) == [-1, 124, 249, 374, 499, 624, 749, 874]
    assert HyperSD._boundaries(SCH, 1) == [-1]


@pytest.mark.parametrize("kwargs, match", [
    ({"segments": (4, 8, 1)}, "decreasing"), ({"segments": (8, 4, 2)}, "end with 1"), ({"segments": []}, "positive"),
    ({"segments": (8, 4, 1), "num_intervals": 20}, "num_intervals: 24"), ({"ema_decay": -0.1}, "ema_decay")])
def test_bad_kwargs_fail_with_the_fix(kwargs, match):
    with pytest.raises(KDistillError, match=match):
        HyperSD(**kwargs)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("segments", [4, 2])
def test_loss_is_zero_at_the_teachers_segment_map_and_not_at_the_clean_data_map(segments):
    teacher = toy_teacher(SCH)
    t_net = guided_teacher(teacher, 2.0, 2)
    bounds = [-1] + [k * 1000 // segments - 1 for k in range(1, segments)]
    torch.manual_seed(0)
    batch = toy_batch(teacher, 64)
    results = {}
    for name, student in (("segment", ChainStudent(t_net, SCH, grid(20), bounds)),
                          ("clean", ChainStudent(t_net, SCH, grid(20)))):
        m = HyperSD(segments=(segments, 1), num_intervals=20)
        prepare(m, student, teacher, SCH, guidance=2.0)
        m.set_diffusion_stage(0)
        torch.manual_seed(1)
        results[name] = float(_loss(m, student, t_net, batch))
        if name == "clean":      # ... which is exactly right in the last stage, one segment
            m.set_diffusion_stage(1)
            torch.manual_seed(1)
            assert float(_loss(m, student, t_net, batch)) < 1e-6
    assert results["segment"] < 1e-6 and results["clean"] > 1e-3, results


def test_one_segment_is_consistency_distillation():
    student, teacher = small_student(2, width=16), toy_teacher(SCH)
    batch = toy_batch(teacher, 32)
    losses = []
    for m in (HyperSD(segments=(1,), num_intervals=20), ConsistencyDistillation(num_intervals=20)):
        prepare(m, student, teacher, SCH)
        torch.manual_seed(7)
        losses.append(float(_loss(m, student, guided_teacher(teacher, 1.0, 2), batch).detach()))
    assert losses[0] == losses[1]


def test_ema_target_carries_over_stages():
    student, teacher = small_student(3, width=16), toy_teacher(SCH)
    m = HyperSD(segments=(2, 1), num_intervals=20, ema_decay=0.5)
    prepare(m, student, teacher, SCH)
    target = m.target
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    m.after_optimizer_step(student)
    moved = {k: v.clone() for k, v in target.state_dict().items()}
    m.set_diffusion_stage(1)
    assert m.target is target and all(torch.equal(v, m.target.state_dict()[k]) for k, v in moved.items())


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
    distil(HyperSD(segments=(4, 2, 1), num_intervals=20, ema_decay=0.9), distilled, teacher, SCH,
           steps_per_stage=100, batch=128, lr=2e-3)
    after = sample_mse(distilled, SCH, reference, sampler="consistency", steps=1, noise=noise, labels=labels)
    assert after < 0.25 * teacher_one_step and after < 0.25 * before, (before, teacher_one_step, after)


@pytest.mark.usefixtures("one_thread")
def test_tiny_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    report = tiny_run(out, ["method=hyper_sd", "method.kwargs.segments=[4,2,1]", "method.kwargs.num_intervals=20",
                            "train.max_steps=3"])
    assert_tiny_report(report, method="hyper_sd", sampler="consistency", steps=3,
                       stages=[("segments_4", "teacher"), ("segments_2", "teacher"), ("segments_1", "teacher")])
    first, last = stage_state(out, "00_segments_4", "method"), stage_state(out, "02_segments_1", "method")
    assert any(not torch.equal(first[k], last[k]) for k in first)   # one EMA target, updated through every stage
