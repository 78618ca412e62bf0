"""Shared fixtures for method tests: tiny classifiers on random data, a 3-step ``fit`` run and a
one-backward gradient probe (student, method parameters and teacher)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from kdistill.data.loaders import TensorDictDataset, make_loader
from kdistill.methods.base import Method
from kdistill.models.classifiers import build_cnn, build_mlp


def tiny_model(kind: str, seed: int, input_shape=(40,), num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return build_mlp(input_shape, num_classes, width=24, depth=2)
    if kind == "cnn":
        return build_cnn(input_shape, num_classes, width=8, depth=3)
    if kind == "transformer1d":
        from kdistill.models.transformer1d import build_transformer1d

        return build_transformer1d(input_shape, num_classes, dim=16, depth=2, heads=2, patch_size=4)
    raise ValueError(kind)


def random_data(n: int = 48, input_shape=(40,), num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randn(n, *input_shape, generator=g),
            "labels": torch.randint(0, num_classes, (n,), generator=g)}


def fit3(method: Method, *, student: str = "mlp", teacher: str = "cnn", batch_size: int = 16,
         teacher_model: nn.Module | None = None, **fit_kwargs: Any):
    """Three optimizer steps of the real loop; returns (FitResult, teacher, teacher weights before)."""
    from kdistill.train.loop import fit, make_accelerator

    data = random_data()
    s = tiny_model(student, 1)
    t = teacher_model if teacher_model is not None else (tiny_model(teacher, 2) if method.needs_teacher else None)
    before = {k: v.clone() for k, v in t.state_dict().items()} if t is not None else {}
    loader = make_loader(TensorDictDataset(**data), batch_size, seed=0)
    res = fit(student=s, method=method, teacher=t, train_loader=loader, accelerator=make_accelerator("no"),
              progress=False, epochs=1, max_steps=3, lr=1e-3, log_every=1, **fit_kwargs)
    return res, t, before


def one_backward(method: Method, *, student: str = "mlp", teacher: str = "cnn", batch_size: int = 16,
                 teacher_model: nn.Module | None = None, batch: dict | None = None):
    """setup() from a probe batch, one forward/backward through the loop's own modules. Returns
    (losses, student, teacher)."""
    from kdistill.train.loop import DistillStep, _teacher_fn, default_forward, probe

    data = batch or {k: v[:batch_size] for k, v in random_data().items()}
    s = tiny_model(student, 1)
    t = teacher_model if teacher_model is not None else tiny_model(teacher, 2)
    t.eval().requires_grad_(False)
    tfn = _teacher_fn(t, method, default_forward, None)
    loader = make_loader(TensorDictDataset(**data), batch_size, seed=0)
    info = probe(s, method, data, default_forward, tfn, len(data["labels"]), train_loader=loader,
                 teacher_targets_fn=tfn)
    method.setup(info)
    step = DistillStep(s, method, default_forward).train()
    losses = step(data, tfn(data))
    sum(losses.values()).backward()
    return losses, s, t


def assert_grads(losses: dict, student: nn.Module, teacher: nn.Module | None, method: Method | None = None) -> None:
    assert losses and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values()), losses
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), "no student gradient"
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters()), "teacher received gradients"
    if method is not None:
        params = list(method.parameters())
        assert params, "method has no parameters to check"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "no method-parameter gradient"


def assert_fit_ok(res, teacher: nn.Module | None, before: dict) -> None:
    assert res.steps == 3
    if teacher is not None:
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, before[k]), f"teacher tensor {k} changed"


@pytest.fixture
def zoo() -> dict[str, Callable]:
    return {"fit3": fit3, "one_backward": one_backward, "assert_grads": assert_grads,
            "assert_fit_ok": assert_fit_ok, "tiny_model": tiny_model, "random_data": random_data}
