"""Shared helpers for method tests: tiny models, data, and a 3-step run through the real loop."""

from __future__ import annotations

import torch

from kdistill.data import TensorDictDataset, make_loader
from kdistill.models import build_cnn, build_mlp
from kdistill.train import fit, make_accelerator


def tiny_data(n: int = 48, length: int = 40, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def three_step_run(method, *, teacher=None, student=None, batch_size: int = 16, **kw):
    """Run 3 optimizer steps; return (FitResult, initial student params, teacher params before)."""
    torch.manual_seed(0)
    x, y = tiny_data()
    teacher = teacher if teacher is not None else build_cnn((40,), 10, width=8, depth=3)
    student = student if student is not None else build_mlp((40,), 10, width=16, depth=2)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    loader = make_loader(TensorDictDataset(inputs=x, labels=y), batch_size, seed=0)
    res = fit(student=student, method=method, teacher=teacher, train_loader=loader,
              accelerator=make_accelerator(), max_steps=3, epochs=1, progress=False, log_every=1, **kw)
    return res, s0, t0, teacher


def assert_trained(res, s0, t0, teacher):
    assert res.steps == 3
    changed = [k for k, v in res.student.state_dict().items() if not torch.equal(v, s0[k])]
    assert changed, "student weights did not change"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t0[k]), f"teacher weight {k} changed"
    assert all(p.grad is None for p in teacher.parameters())
