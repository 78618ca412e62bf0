"""Exponential moving averages of a network's weights, and frozen copies of a network.

A method that needs a target network (consistency distillation's ``theta^-``, Song et al., 2023) keeps
``frozen_copy(student)`` as its own submodule, so the copy is saved in the method's checkpoints and never optimised
(its parameters have ``requires_grad`` False; the optimizer skips them), and calls :func:`ema_update` after every
optimizer step::

    target <- decay * target + (1 - decay) * student        (parameters; buffers are copied)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import KDistillError, expect


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode whose parameters do not require gradients."""
    out = copy.deepcopy(module)
    out.eval()
    out.requires_grad_(False)
    return out


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, *, decay: float) -> None:
    """Move ``target``'s parameters towards ``source``'s: ``p_t <- decay * p_t + (1 - decay) * p_s`` (``decay = 0``
    copies, ``decay = 1`` keeps the target); floating buffers (e.g. BatchNorm statistics) and integer buffers are
    copied. Both modules must have the same parameter and buffer names and shapes (``target`` a copy of ``source``)."""
    expect(0.0 <= decay <= 1.0, "ema decay", decay, "a number in [0, 1]")
    t_params, s_params = dict(target.named_parameters()), dict(source.named_parameters())
    if t_params.keys() != s_params.keys():
        only_t = sorted(t_params.keys() - s_params.keys())[:3]
        only_s = sorted(s_params.keys() - t_params.keys())[:3]
        raise KDistillError(f"ema_update: the target and source parameters differ (only in the target: {only_t}, only "
                            f"in the source: {only_s}); expected the target to be a copy of the source. Pass the "
                            "unwrapped model (not its DDP/compiled wrapper).")
    for name, p in t_params.items():
        q = s_params[name]
        if p.shape != q.shape:
            raise KDistillError(f"ema_update: parameter {name!r} has shape {tuple(p.shape)} in the target and "
                                f"{tuple(q.shape)} in the source; expected a copy of the source.")
        p.lerp_(q.detach().to(p.dtype), 1.0 - decay)
    s_buffers = dict(source.named_buffers())
    for name, b in target.named_buffers():
        if name in s_buffers:
            b.copy_(s_buffers[name])
