"""Small classifier families with width/depth knobs (teachers and students for classic KD).

Every model exposes ``blocks.<i>`` (hookable stages), ``embed`` (the penultimate features, shape
``(B, D)``) and ``head`` (the linear classifier), so feature methods can name layers uniformly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..capture import device_of
from ..errors import expect
from ..registry import MODELS


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class MLP(nn.Module):
    """``input -> [Linear, ReLU] x depth -> head``. Accepts any input shape (flattened)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        expect(depth >= 1, "mlp depth", depth, "an integer >= 1")
        expect(width >= 1, "mlp width", width, "an integer >= 1")
        dims = [_numel(input_shape)] + [int(width)] * int(depth)
        layers = []
        for i in range(depth):
            block = [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
            if dropout:
                block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
        self.blocks = nn.Sequential(*layers)
        self.embed = nn.Identity()
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(self.blocks(x.flatten(1))))


class CNN(nn.Module):
    """1-D or 2-D conv net: ``[Conv, BN, ReLU] x depth`` (stride 2 after the first) -> global average
    pool -> ``embed`` -> ``head``. Width doubles every two blocks up to ``4 * width``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32, depth: int = 3,
                 kernel_size: int = 3) -> None:
        super().__init__()
        shape = tuple(int(d) for d in input_shape)
        expect(len(shape) in (1, 2, 3), "cnn input_shape", shape,
               "(L,), (C, L), (H, W) or (C, H, W)", "Use the `mlp` model for flat tabular inputs.")
        expect(depth >= 1, "cnn depth", depth, "an integer >= 1")
        # (L,) -> 1-D with one channel; (H, W) -> 2-D with one channel; (C, L) -> 1-D; (C, H, W) -> 2-D.
        self.dims = 1 if len(shape) == 1 or (len(shape) == 2 and shape[0] <= 4 and shape[1] > 8) else 2
        if len(shape) == 2 and self.dims == 2:
            shape = (1, *shape)
        if len(shape) == 1:
            shape = (1, *shape)
        self.input_shape = shape
        conv = nn.Conv1d if self.dims == 1 else nn.Conv2d
        bn = nn.BatchNorm1d if self.dims == 1 else nn.BatchNorm2d
        blocks, c_in = [], shape[0]
        for i in range(depth):
            c_out = int(width) * min(2 ** (i // 2), 4)
            blocks.append(nn.Sequential(
                conv(c_in, c_out, kernel_size, stride=1 if i == 0 else 2, padding=kernel_size // 2, bias=False),
                bn(c_out), nn.ReLU()))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(1) if self.dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Flatten(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        return self.head(self.embed(self.pool(self.blocks(x))))


@MODELS.register("mlp")
def build_mlp(input_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 2,
              dropout: float = 0.0) -> MLP:
    """Multi-layer perceptron; ``width`` units in each of ``depth`` hidden layers."""
    return MLP(input_shape, num_classes, width=width, depth=depth, dropout=dropout)


@MODELS.register("cnn")
def build_cnn(input_shape: Sequence[int], num_classes: int, width: int = 32, depth: int = 3,
              kernel_size: int = 3) -> CNN:
    """Conv net (1-D for sequences such as MNIST-1D, 2-D for images such as Fashion-MNIST)."""
    return CNN(input_shape, num_classes, width=width, depth=depth, kernel_size=kernel_size)


def import_object(target: str, what: str = "factory") -> object:
    """The object named ``"package.module:attribute"`` (the working folder is searched too, as ``python -m``
    does), or one clear error."""
    import importlib
    import os
    import sys

    from ..errors import KDistillError

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise KDistillError(f"{what}: got {target!r}, expected 'package.module:function' (a module you can import "
                            "and a function in it).")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if os.getcwd() in sys.path or e.name != module_name.split(".")[0]:
            raise KDistillError(f"{what} {target!r}: cannot import {module_name!r} ({e}). Fix: install it, or run "
                                "from the folder that holds it.") from None
        sys.path.insert(0, os.getcwd())
        return import_object(target, what)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KDistillError(f"{what} {target!r}: module {module_name!r} has no {attr!r}.")
        obj = getattr(obj, part)
    return obj


@MODELS.register("factory")
def build_from_factory(input_shape: Sequence[int], num_classes: int, factory: str = "",
                       kwargs: dict | None = None) -> nn.Module:
    """Your own ``nn.Module``: ``factory: "package.module:function"`` called with ``kwargs`` (and with
    ``input_shape`` / ``num_classes`` when it takes parameters of those names). Its layer names are yours to hook
    (``student_layers`` of a feature method); a saved student rebuilds it the same way."""
    import inspect

    from ..errors import KDistillError

    fn = import_object(factory, "model factory")
    if not callable(fn):
        raise KDistillError(f"model factory {factory!r}: got a {type(fn).__name__}, expected a function or class.")
    call = dict(kwargs or {})
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for name, value in (("input_shape", tuple(input_shape)), ("num_classes", int(num_classes))):
        if name in params and name not in call:
            call[name] = value
    model = fn(**call)
    if not isinstance(model, nn.Module):
        raise KDistillError(f"model factory {factory!r} returned a {type(model).__name__}, expected a torch "
                            "nn.Module that maps a batch of inputs to logits (B, num_classes).")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits for a whole tensor of inputs, in eval mode, batched."""
    was_training = model.training
    model.eval()
    dev = device_of(model)  # inputs follow the weights; logits come back on the CPU
    outs = [model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)
