"""What the dataset-distillation methods share (not a method; no registration): their base class, a functional
(differentiable) view of a network's parameters, the unrolled inner training of trajectory matching, expert
training, and feature extraction from a teacher."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..capture import capture
from ..errors import KDistillError, expect
from .base import Method, ModelOutput, label_loss


class DataDistillMethod(Method):
    """Base of the dataset-distillation methods: ``distill_data`` builds the set; the forward is the loss of a
    student trained on it (cross-entropy on its labels, or soft cross-entropy when the set has soft labels)."""

    distills_data = True
    needs_teacher = False  # the student trains on the set alone; a teacher, if any, was used to build it
    cacheable = True

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"ce": label_loss(student.logits, batch)}


def check_budget(name: str, per_class: int, labels: Tensor, num_classes: int) -> None:
    expect(isinstance(per_class, int) and per_class >= 1, f"{name} per_class", per_class, "an integer >= 1")
    if labels.dim() != 1 or len(labels) == 0:
        raise KDistillError(f"{name}: labels of shape {tuple(labels.shape)}; expected (N,) class ids of N >= 1 "
                            "training examples.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise KDistillError(f"{name}: labels range over [{int(labels.min())}, {int(labels.max())}], expected class "
                            f"ids in [0, {num_classes - 1}].")


# ---------------------------------------------------------------------------------------------- parameters as a vector


class FlatParams:
    """A network's parameters as one flat vector and back (names, shapes and offsets of ``model.parameters()``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def get(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).clone()

    def set(self, flat: Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(self.model.parameters(), flat.split(self.sizes)):
                p.copy_(chunk.view_as(p))

    def as_dict(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: chunk.view(s) for n, chunk, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def logits(self, flat: Tensor, x: Tensor) -> Tensor:
        """The network's output at parameters ``flat`` (differentiable in both); buffers are the module's own."""
        return functional_call(self.model, self.as_dict(flat), (x,))


def soft_or_hard_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy against class ids ``(B,)`` or probabilities ``(B, C)``."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, -1)).sum(-1).mean()


def unrolled_sgd(net: FlatParams, start: Tensor, x: Tensor, targets: Tensor, *, steps: int, lr: Tensor | float,
                 batch_size: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The flat parameters after ``steps`` plain SGD steps from ``start`` on ``(x, targets)`` (mean cross-entropy),
    kept differentiable in ``x``, ``targets`` (when soft) and ``lr``: each step is
    ``theta <- theta - lr * grad CE(f(x_b; theta), y_b)`` with ``create_graph=True``. Minibatches of
    ``batch_size`` rows are drawn with ``generator`` (all rows when ``batch_size`` is None or covers them)."""
    theta = start.detach().clone().requires_grad_(True)
    n = len(x)
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            xb, yb = x, targets
        else:
            idx = torch.randperm(n, generator=generator)[:batch_size]
            xb, yb = x[idx], targets[idx]
        loss = soft_or_hard_ce(net.logits(theta, xb), yb)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * grad
    return theta


def train_expert(net: FlatParams, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int,
                 generator: torch.Generator, sam_rho: float = 0.0) -> Tensor:
    """An expert trajectory: plain SGD on the real data from the network's current weights, the flat parameters
    recorded at the start and after every epoch, ``(epochs + 1, P)``. With ``sam_rho > 0`` every step is a
    sharpness-aware one (Foret et al., 2021): the gradient is taken at ``theta + rho * g / ||g||``, which steers the
    expert along a flat trajectory (FTD)."""
    model = net.model
    model.train()
    params = list(model.parameters())
    points = [net.get()]
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), params)
            if sam_rho > 0:
                norm = torch.sqrt(sum((g * g).sum() for g in grads)).clamp_min(1e-12)
                eps = [sam_rho * g / norm for g in grads]
                with torch.no_grad():
                    for p, e in zip(params, eps):
                        p.add_(e)
                grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), params)
                with torch.no_grad():
                    for p, e in zip(params, eps):
                        p.sub_(e)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
        points.append(net.get())
    return torch.stack(points)


def cache_file(cache_dir: Path | None, kind: str, identity: dict[str, Any]) -> Path | None:
    """``cache_dir/<kind>/<fingerprint>.safetensors`` for a JSON-able identity, or None without a cache folder."""
    if cache_dir is None:
        return None
    fp = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / kind / f"{fp}.safetensors"


# ---------------------------------------------------------------------------------------------- teacher views


@torch.no_grad()
def layer_features(model: nn.Module, x: Tensor, layer: str, *, batch_size: int = 1024) -> Tensor:
    """The flattened output of ``layer`` (e.g. ``embed``, the penultimate features) for every row of ``x``, in eval
    mode, ``(N, D)``; an unknown layer name raises with close matches."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x), batch_size):
            with capture(model, [layer], detach=True) as feats:
                model(x[i:i + batch_size])
            out.append(feats[layer].flatten(1).float())
    finally:
        model.train(was)
    return torch.cat(out)


def require(name: str, what: str, value: Any) -> Any:
    if value is None:
        raise KDistillError(f"method {name!r} needs {what}, but the run passed none; expected the "
                            "dataset_distillation task to give it (a teacher: the recipe's teacher section).")
    return value


def build_checked(build_model: Callable[[], nn.Module], name: str) -> nn.Module:
    model = build_model()
    if not any(p.requires_grad for p in model.parameters()):
        raise KDistillError(f"method {name!r}: the distillation model has no trainable parameters; expected a "
                            "network to match gradients or trajectories on (distill_model in the recipe).")
    return model
