"""``distribution_backtracking``: DMD along the teacher's degradation path walked backwards (DisBack, 2024)."""

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.score_distillation import sample_mse
from kdistill.methods._score_distillation import one_step_sample
from kdistill.methods.distribution_backtracking import DistributionBacktracking
from kdistill.models.diffusion import DiffusionSchedule, MLPDenoiser
from kdistill.registry import METHODS

from ._diffusion import guided_teacher, outputs, toy_teacher
from ._score_toys import energy_distance, mlp_teacher, samples, tiny_run, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    sched = DiffusionSchedule()
    return sched, mlp_teacher(sched)


def student_from_scratch(seed: int = 3) -> MLPDenoiser:
    torch.manual_seed(seed)
    return MLPDenoiser((2,), 2, width=32, depth=2, time_dim=16)


def prepared(method, toy, student=None, seed=0):
    sched, teacher = toy
    student = student or student_from_scratch()
    info = method.prepare_diffusion(student=student, teacher=teacher, schedule=sched, guidance_scale=1.0,
                                    null_class=2, sample_shape=(2,), num_classes=2, seed=seed)
    return method, student, info


def test_registered_with_the_one_step_sampler():
    assert METHODS.get("distribution_backtracking") is DistributionBacktracking
    assert DistributionBacktracking.diffusion_sampler == "consistency"


def test_snapshots_degrade_from_the_teacher_towards_the_generator(toy):
    sched, teacher = toy
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method, student, info = prepared(DistributionBacktracking(checkpoints=4, degradation_steps=60,
                                                              degradation_lr=1e-3), toy)
    assert len(method.snapshots) == 3 and info["path_points"] == 4
    assert info["degradation_loss_last"] < info["degradation_loss_first"]
    assert all(not p.requires_grad for p in method.snapshots.parameters())
    assert all(p.requires_grad for p in method.fake.parameters())
    for a, b in zip(method.fake.parameters(), method.snapshots[-1].parameters()):  # the fake starts at the end
        assert torch.equal(a, b)
    # the denoising loss on the initial generator's samples falls along the path: teacher first, most degraded last
    torch.manual_seed(7)
    eps, y = torch.randn(2048, 2), torch.randint(0, 2, (2048,))
    t, noise = torch.randint(0, 1000, (2048,)), torch.randn(2048, 2)
    with torch.no_grad():
        x = one_step_sample(student, sched, eps, y)
        z, v = sched.add_noise(x, noise, t), sched.v_target(x, noise, t)
        losses = [float(sample_mse(net(z, t, y), v).mean()) for net in [teacher, *method.snapshots]]
    assert losses == sorted(losses, reverse=True), losses
    # the teacher itself was not touched
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_snapshots_are_seeded(toy):
    make = lambda seed: prepared(DistributionBacktracking(checkpoints=2, degradation_steps=5), toy,  # noqa: E731
                                 seed=seed)[0].snapshots[0].parameters()
    assert all(torch.equal(a, b) for a, b in zip(make(0), make(0)))
    assert not all(torch.equal(a, b) for a, b in zip(make(0), make(1)))


def test_target_walks_the_path_backwards_on_equal_shares():
    method = DistributionBacktracking(checkpoints=3, degradation_steps=2)
    method.set_total_steps(6)
    walked = []
    for _ in range(6):
        walked.append(method.target_index())
        method.after_optimizer_step(None)
    assert walked == [2, 2, 1, 1, 0, 0]
    assert int(method.state_dict()["step"]) == 6  # a resumed run continues where it stopped
    method.load_state_dict({"step": torch.tensor(2)})
    assert method.target_index() == 1


def test_first_share_targets_the_most_degraded_and_the_last_the_teacher(toy):
    """At step 0 the target is the most degraded snapshot, which the fake network copies, so the generator gets no
    gradient and the teacher is never asked; in the last share the guided teacher is the target."""
    sched, teacher = toy
    calls = []
    real = guided_teacher(teacher, 1.0, 2)

    def counting(z, t, y, guidance_scale=None):
        calls.append(len(z))
        return real(z, t, y, guidance_scale)

    method, student, _ = prepared(DistributionBacktracking(checkpoints=3, degradation_steps=20,
                                                           degradation_lr=1e-3), toy)
    method.set_total_steps(9)
    batch = {"inputs": torch.zeros(16, 2), "labels": torch.randint(0, 2, (16,))}
    method(*outputs(student, counting), batch)["generator"].backward()
    assert calls == [] and method.pop_metrics()["target_index"] == 2
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())
    for _ in range(6):
        method.after_optimizer_step(student)
    method(*outputs(student, counting), batch)["generator"].backward()
    assert calls == [16] and method.pop_metrics()["target_index"] == 0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in student.parameters())


def test_training_moves_one_step_samples_to_the_teacher(toy):
    sched, teacher = toy
    reference = samples(toy_teacher(sched), sched, sampler="ddim", steps=100)
    student = student_from_scratch()
    before = energy_distance(samples(student, sched, sampler="consistency", steps=1), reference)
    method = DistributionBacktracking(checkpoints=3, degradation_steps=100, degradation_lr=1e-3)
    history = train(method, student, teacher, sched, steps=400, lr=3e-4)
    after = energy_distance(samples(student, sched, sampler="consistency", steps=1), reference)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert after < 0.5 * before, (before, after)


def test_bad_kwargs_and_missing_total_steps_fail_clearly(toy):
    with pytest.raises(KDistillError, match="checkpoints"):
        DistributionBacktracking(checkpoints=1)
    with pytest.raises(KDistillError, match="degradation_steps"):
        DistributionBacktracking(checkpoints=5, degradation_steps=3)
    method, student, _ = prepared(DistributionBacktracking(checkpoints=2, degradation_steps=1), toy)
    with pytest.raises(KDistillError, match="set_total_steps"):
        method(*outputs(student, guided_teacher(toy[1], 1.0, 2)), {"labels": torch.zeros(2).long()})


def test_three_steps_of_the_tiny_recipe(tmp_path):
    report = tiny_run(tmp_path / "run", "distribution_backtracking", "method.kwargs.checkpoints=3",
                      "method.kwargs.degradation_steps=4")
    assert report["student"]["sampler"] == "consistency" and report["student"]["prepare"]["path_points"] == 3
