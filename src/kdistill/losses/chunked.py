"""Memory-safe vocabulary losses: evaluate any per-token loss over row chunks.

A token-level divergence over a ``(B, T, V)`` pair with a large vocabulary materialises several fp32
``(B*T, V)`` intermediates (both log-softmaxes, probabilities, differences) and autograd keeps them until
the backward pass. For ``V = 49152`` and 4096 tokens each one is 805 MB.

:func:`chunked` wraps a loss so that only one chunk of rows is ever expanded at a time:

* **forward**: the loss runs chunk by chunk under ``no_grad``; only the ``(N,)`` result is kept.
* **backward**: each chunk is recomputed with gradients enabled and ``torch.autograd.grad`` writes that
  chunk's input gradient into one preallocated buffer (the same dtype as the input), then the chunk's
  graph is freed (checkpoint-style recomputation, one custom ``autograd.Function``).

Rows are independent for every loss in :mod:`kdistill.losses.logits` / :mod:`kdistill.losses.topk`, so
values and gradients equal the unchunked call (the same operations on subsets of rows). The price is
one extra forward of the loss per chunk during backward.

:func:`fused_linear_loss` goes further, as Liger-Kernel's fused linear losses do with kernels, here in
plain PyTorch: it takes the student's final hidden states and LM-head weight and computes the student
logits chunk by chunk too, so the student's ``(B*T, V)`` logits (and their gradient) never exist either.

Both return *unreduced* values (shape ``(...,)``), so masking and token-count normalisation stay where
they belong (``masked_mean`` and the loop). Double backward is not supported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError


def _check_chunk_size(chunk_size: int) -> None:
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise KDistillError(f"chunk_size: got {chunk_size!r}, expected an integer >= 1 (rows per chunk; "
                            "256-1024 suits vocabularies of 30k-250k entries).")


def _flatten(lead: torch.Size, tensors: tuple[Tensor, ...], what: str) -> list[Tensor]:
    n = len(lead)
    out = []
    for i, x in enumerate(tensors):
        if not isinstance(x, Tensor):
            raise KDistillError(f"{what}: positional argument {i} is a {type(x).__name__}; expected a tensor. "
                                "Pass hyper-parameters as keywords, e.g. chunked(fn)(s, t, kd_temperature=2.0).")
        if tuple(x.shape[:n]) != tuple(lead):
            raise KDistillError(f"{what}: tensor argument {i} has shape {tuple(x.shape)}, expected it to start with "
                                f"the token shape {tuple(lead)} of the first argument.")
        out.append(x.reshape(-1, *x.shape[n:]))
    return out


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], chunk_size: int, kwargs: dict[str, Any],
                lead: torch.Size, *flat: Tensor) -> Tensor:
        n = flat[0].shape[0]
        with torch.no_grad():
            parts = [fn(*(x[i:i + chunk_size] for x in flat), **kwargs).float() for i in range(0, n, chunk_size)]
        ctx.fn, ctx.chunk_size, ctx.kwargs = fn, chunk_size, kwargs
        ctx.save_for_backward(*flat)
        out = torch.cat(parts) if parts else flat[0].new_zeros((0,), dtype=torch.float32)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        flat = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        grads = [torch.zeros_like(x) if need else None for x, need in zip(flat, needs)]
        n = flat[0].shape[0]
        for i in range(0, n, ctx.chunk_size):
            with torch.enable_grad():
                xs = [x[i:i + ctx.chunk_size].detach().requires_grad_(need) for x, need in zip(flat, needs)]
                out = ctx.fn(*xs, **ctx.kwargs).float()
                wrt = [x for x, need in zip(xs, needs) if need]
                got = torch.autograd.grad(out, wrt, grad_out[i:i + ctx.chunk_size], allow_unused=True)
            it = iter(got)
            for g, need in zip(grads, needs):
                if need:
                    gi = next(it)
                    if gi is not None:
                        g[i:i + ctx.chunk_size] = gi
        return (None, None, None, None, *grads)


def chunked(fn: Callable[..., Tensor], chunk_size: int = 512) -> Callable[..., Tensor]:
    """Wrap a per-token loss ``fn(student_logits, teacher_x, ..., **hypers) -> (...,)`` so it runs over
    ``chunk_size`` rows at a time (rows = every leading position, e.g. ``B*T``).

    Every positional argument must be a tensor whose shape starts with the leading (token) shape of the
    first one, ``(B, T, V)`` logits, ``(B, T, k)`` top-k targets or ``(B, T)`` per-token values all work;
    hyper-parameters are keywords and pass through. Values and gradients equal ``fn``'s::

        per_token = chunked(forward_kl, 256)(student_logits, teacher_logits, kd_temperature=2.0)
        loss = masked_mean(per_token, mask)
    """
    _check_chunk_size(chunk_size)

    @functools.wraps(fn)
    def wrapper(*tensors: Tensor, **kwargs: Any) -> Tensor:
        if not tensors:
            raise KDistillError("chunked loss: got no tensors; expected (student_logits, teacher_x, ...).")
        lead = tensors[0].shape[:-1]
        flat = _flatten(lead, tensors, f"chunked({getattr(fn, '__name__', 'loss')})")
        out = _ChunkedLoss.apply(fn, chunk_size, kwargs, lead, *flat)
        return out.reshape(lead)

    wrapper.chunk_size = chunk_size  # type: ignore[attr-defined]
    return wrapper


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], chunk_size: int, kwargs: dict[str, Any],
                hidden: Tensor, weight: Tensor, bias: Tensor | None, *others: Tensor) -> Tensor:
        n = hidden.shape[0]
        with torch.no_grad():
            parts = [fn(F.linear(hidden[i:i + chunk_size], weight, bias),
                        *(x[i:i + chunk_size] for x in others), **kwargs).float()
                     for i in range(0, n, chunk_size)]
        ctx.fn, ctx.chunk_size, ctx.kwargs, ctx.has_bias = fn, chunk_size, kwargs, bias is not None
        ctx.save_for_backward(hidden, weight, *( [bias] if bias is not None else []), *others)
        return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        hidden, weight = saved[0], saved[1]
        bias = saved[2] if ctx.has_bias else None
        others = saved[3:] if ctx.has_bias else saved[2:]
        need_h, need_w, need_b = ctx.needs_input_grad[3:6]
        need_o = ctx.needs_input_grad[6:]
        g_hidden = torch.zeros_like(hidden) if need_h else None
        # the weight gradient is a sum over chunks: accumulate in fp32, cast once at the end
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (need_b and bias is not None)
                  else None)
        g_others = [torch.zeros_like(x) if need else None for x, need in zip(others, need_o)]
        w = weight.detach().requires_grad_(need_w)
        b = bias.detach().requires_grad_(bool(need_b)) if bias is not None else None
        n = hidden.shape[0]
        for i in range(0, n, ctx.chunk_size):
            sl = slice(i, i + ctx.chunk_size)
            with torch.enable_grad():
                h = hidden[sl].detach().requires_grad_(need_h)
                xs = [x[sl].detach().requires_grad_(need) for x, need in zip(others, need_o)]
                out = ctx.fn(F.linear(h, w, b), *xs, **ctx.kwargs).float()
                wrt: list[Tensor] = []
                if need_h:
                    wrt.append(h)
                if need_w:
                    wrt.append(w)
                if need_b and b is not None:
                    wrt.append(b)
                wrt += [x for x, need in zip(xs, need_o) if need]
                if not wrt:
                    continue
                got = list(torch.autograd.grad(out, wrt, grad_out[sl], allow_unused=True))
            if need_h:
                g_hidden[sl] = got.pop(0)
            if need_w:
                gw = got.pop(0)
                if gw is not None:
                    g_weight += gw.float()
            if need_b and b is not None:
                gb = got.pop(0)
                if gb is not None:
                    g_bias += gb.float()
            for g, need in zip(g_others, need_o):
                if need:
                    gi = got.pop(0)
                    if gi is not None:
                        g[sl] = gi
        return (None, None, None, g_hidden,
                g_weight.to(weight.dtype) if g_weight is not None else None,
                g_bias.to(bias.dtype) if g_bias is not None else None, *g_others)


def fused_linear_loss(fn: Callable[..., Tensor], hidden: Tensor, weight: Tensor, *targets: Tensor,
                      bias: Tensor | None = None, chunk_size: int = 512, **kwargs: Any) -> Tensor:
    """``fn(F.linear(hidden, weight, bias), *targets, **kwargs)`` without ever building the full logits.

    ``hidden``: the student's final hidden states ``(B, T, H)`` (after the final norm); ``weight``: its
    LM head ``(V, H)`` (tied or not), ``bias`` optional ``(V,)``. ``targets``: the teacher side, each
    starting with ``(B, T)``: teacher logits ``(B, T, V)``, or top-k log-probs / indices / residuals.
    Returns the unreduced loss ``(B, T)``; gradients flow to ``hidden``, ``weight`` and ``bias`` (and to
    targets that require them) and match the unfused computation up to float summation order.

    Example with a Hugging Face causal LM::

        out = student(input_ids, output_hidden_states=True)   # or run student.model and skip lm_head
        per_token = fused_linear_loss(forward_kl, out.hidden_states[-1], student.lm_head.weight,
                                      teacher_logits, kd_temperature=2.0, chunk_size=256)
    """
    _check_chunk_size(chunk_size)
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise KDistillError(f"fused_linear_loss: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}; "
                            "expected hidden (..., H) and an LM-head weight (V, H) with the same H.")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise KDistillError(f"fused_linear_loss: bias {tuple(bias.shape)}, expected ({weight.shape[0]},).")
    lead = hidden.shape[:-1]
    flat = _flatten(lead, (hidden, *targets), f"fused_linear_loss({getattr(fn, '__name__', 'loss')})")
    out = _FusedLinearLoss.apply(fn, chunk_size, kwargs, flat[0], weight, bias, *flat[1:])
    return out.reshape(lead)
