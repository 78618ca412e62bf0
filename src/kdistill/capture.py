"""Forward-hook feature capture as a context manager that always removes its hooks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import unknown_name


def unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``._orig_mod``) and ``DistributedDataParallel`` / ``DataParallel``
    (``.module``) wrappers, repeatedly, so module names resolve. FSDP and other wrappers are returned as
    they are."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def device_of(model: nn.Module) -> torch.device:
    """Where a module's weights live (the first parameter or buffer); the CPU for a module with neither (e.g. a
    scikit-learn teacher wrapped as a module). Evaluation inputs are moved here."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Map layer names to submodules of the unwrapped model; unknown names raise with close matches."""
    model = unwrap(model)
    available = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        if name not in available:
            raise unknown_name(
                "layer", name, [n for n in available if n],
                f"Layer names come from `model.named_modules()` of {type(model).__name__}.",
            )
        out[name] = available[name]
    return out


def _first_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # HF decoder layers return (hidden_states, ...)
    for attr in ("last_hidden_state", "hidden_states", "logits"):
        value = getattr(output, attr, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot capture a {type(output).__name__} output; expected a Tensor or a tuple of them")


@contextmanager
def capture(model: nn.Module, names: Iterable[str], *, detach: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the named submodules during forward passes inside the ``with`` block.

    >>> with capture(model, ["blocks.1"]) as feats:
    ...     model(x)
    >>> feats["blocks.1"].shape

    Hooks are registered on the unwrapped model and removed on exit, even when the block raises.
    With ``detach=True`` (used for the teacher) the stored tensors are detached.
    """
    names = list(names)
    if not names:  # the common case (logit-only methods): no module walk on the hot path
        yield {}
        return
    modules = resolve_modules(model, names)
    store: dict[str, Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            t = _first_tensor(output)
            store[name] = t.detach() if detach else t

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()
