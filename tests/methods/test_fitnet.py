import torch

from kdistill.methods.base import ModelOutput, SetupInfo
from kdistill.methods.fitnet import FitNet
from kdistill.models import build_cnn, build_mlp

from ._tiny import assert_trained, three_step_run


def test_projector_shapes_and_zero_hint_when_matched():
    m = FitNet("blocks.0", "blocks.1")
    m.setup(SetupInfo(student_features={"blocks.0": (4, 16)}, teacher_features={"blocks.1": (4, 8, 20)}))
    f_s = torch.randn(4, 16)
    proj = m.projector(f_s)
    assert proj.shape == (4, 8, 20)
    terms = m(ModelOutput(torch.randn(4, 10), {"blocks.0": f_s}),
              ModelOutput(torch.randn(4, 10), {"blocks.1": proj.detach()}),
              {"labels": torch.zeros(4, dtype=torch.long)})
    assert terms["hint"].item() < 1e-10


def test_gradients_reach_student_and_projector_not_teacher():
    teacher = build_cnn((40,), 10, width=8, depth=3)
    student = build_mlp((40,), 10, width=16, depth=2)
    res, s0, t0, teacher = three_step_run(FitNet("blocks.1", "blocks.2", alpha=0.5), teacher=teacher, student=student)
    assert_trained(res, s0, t0, teacher)
    # one manual backward: gradients reach the student and the projector, never the teacher
    from kdistill.capture import capture

    x = torch.randn(4, 40)
    with capture(student, ["blocks.1"]) as fs:
        s_logits = student(x)
    with torch.no_grad(), capture(teacher, ["blocks.2"], detach=True) as ft:
        t_logits = teacher(x)
    terms = res.method(ModelOutput(s_logits, dict(fs)), ModelOutput(t_logits, dict(ft)),
                       {"labels": torch.zeros(4, dtype=torch.long)})
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in res.method.projector.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_projector_is_trained_by_the_loop():
    method = FitNet("blocks.1", "blocks.2")
    teacher = build_cnn((40,), 10, width=8, depth=3)
    captured = {}

    # capture the projector's initial weights right after setup (done inside fit)
    orig_setup = method.setup

    def setup(info):
        orig_setup(info)
        captured.update({k: v.clone() for k, v in method.projector.state_dict().items()})

    method.setup = setup
    res, *_ = three_step_run(method, teacher=teacher)
    moved = [k for k, v in res.method.projector.state_dict().items()
             if v.dtype.is_floating_point and not torch.equal(v, captured[k])]
    assert moved, "projector parameters were not updated by the optimizer"
