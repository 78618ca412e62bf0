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
Given the teacher's hidden states and LM head as well, the teacher's logits are built per chunk too, so
neither model's ``(B*T, V)`` logits exist. It applies final-logit soft-capping / ``logit_scale`` per model
(:func:`apply_head_transform`), adds a CE term against labels from the same chunks, takes top-k cached
targets, and uses the closed-form gradients of :func:`kdistill.losses.logits.divergence_rows` for the
divergences that have one (per-chunk autograd for any other loss). With a gradient hint the whole gradient
is formed during the forward pass (:func:`fused_linear_loss`); the chunk size follows
:func:`fused_chunk_size`.

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
from . import logits as L


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


# ------------------------------------------------------------------------------------------------ fused LM heads

#: one chunk (the whole batch) while the ``(tokens, V)`` fp32 logits take at most this many bytes
SINGLE_CHUNK_BYTES = 512 * 2**20
#: beyond that, fp32 bytes one chunk may hold in ``(rows, V)`` tensors (see :func:`fused_chunk_size`)
CHUNK_BUDGET_BYTES = 256 * 2**20
#: on a CUDA device: fp32 bytes one chunk may hold in ``(rows, V)`` tensors, with no separate one-chunk threshold
#: (see :func:`fused_chunk_size`)
CUDA_CHUNK_BUDGET_BYTES = 4 * 2**30
#: ``(rows, V)`` fp32 tensors alive at once inside a chunk at most: student logits, teacher logits, their gradient
#: (written over the student logits unless the CE term or a soft-cap needs them) and one temporary
_LIVE_PER_ROW = 4


def fused_chunk_size(tokens: int, vocab: int, *, budget_bytes: int | None = None, single_bytes: int | None = None,
                     device: torch.device | str | None = None) -> int:
    """Rows per chunk of :func:`fused_linear_loss` for ``tokens`` rows over a ``vocab``-sized head.

    The rule:

    * **one chunk** while the batch's ``(tokens, V)`` fp32 logits take at most ``single_bytes`` (512 MiB). The
      eager loss holds at least three tensors of that size (both models' logits and the gradient), a single
      chunk holds two (the gradient overwrites the student's logits), so it never needs more memory than eager,
      and it runs the same matmuls at the same sizes: small batches are never slower than the eager loss
      (Liger-Kernel's fixed small chunks make its fused loss ~3x slower than eager below ~4,096 tokens);
    * beyond that, **equal chunks** of at most ``budget_bytes // (4 tensors * 4 bytes * V)`` rows (256 MiB:
      341 rows at V = 49,152, 128 at V = 131,072, 64 at V = 262,144), where the head matmuls of one chunk are
      large enough to run at full speed and the chunk's working set stays a fraction of the weight gradient.

    On a **CUDA** device (``device``) the cost of a chunk is not its matmuls but what every chunk repeats (adding
    into the fp32 weight-gradient accumulator, launches): on an H200 in bf16, 64-row chunks at V = 262,144 made the
    loss 3.4x slower than eager, 1,024-row chunks 1.06x, 4,096-row chunks 1.02x. There the rule is equal chunks of
    at most ``CUDA_CHUNK_BUDGET_BYTES // (16 V)`` rows (4 GiB: 5,461 rows at V = 49,152, 2,048 at 131,072, 1,024
    at 262,144), one chunk when the batch has no more rows. ``budget_bytes`` / ``single_bytes`` override either
    rule's numbers."""
    if not (isinstance(tokens, int) and tokens >= 0 and isinstance(vocab, int) and vocab >= 1):
        raise KDistillError(f"fused_chunk_size: got tokens={tokens!r}, vocab={vocab!r}; expected integers >= 0 / >= 1.")
    cuda = device is not None and torch.device(device).type == "cuda"
    if budget_bytes is None:
        budget_bytes = CUDA_CHUNK_BUDGET_BYTES if cuda else CHUNK_BUDGET_BYTES
    if single_bytes is None:
        single_bytes = 0 if cuda else SINGLE_CHUNK_BYTES
    if tokens * vocab * 4 <= single_bytes:
        return max(1, tokens)
    rows = max(8, budget_bytes // (_LIVE_PER_ROW * 4 * vocab))
    chunks = -(-tokens // rows)
    return -(-tokens // chunks)


def apply_head_transform(logits: Tensor, *, softcap: float | None = None, logit_scale: float | None = None) -> Tensor:
    """Final logits from an LM head's output ``z``: ``z * logit_scale`` (Cohere; Granite's ``/ logits_scaling`` is
    ``logit_scale = 1 / logits_scaling``), then ``softcap * tanh(. / softcap)`` (Gemma-2/3 final-logit soft-capping).
    ``None`` skips a step. Returns a new tensor in the input dtype."""
    _check_transform(softcap, logit_scale, "apply_head_transform")
    y = logits
    if logit_scale is not None and logit_scale != 1.0:
        y = y * logit_scale
    if softcap is not None:
        y = torch.tanh(y / softcap) * softcap
    return y


def _check_transform(softcap: float | None, logit_scale: float | None, who: str) -> None:
    import math

    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise KDistillError(f"{who}: softcap {softcap!r}; expected a positive number (the model config's "
                            "final_logit_softcapping, e.g. 30.0 for Gemma-2) or None.")
    if logit_scale is not None and not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale)
                                        and logit_scale > 0):
        raise KDistillError(f"{who}: logit_scale {logit_scale!r}; expected a positive number (the model config's "
                            "logit_scale, e.g. 0.0625 for Cohere) or None.")


def _head(z: Tensor, softcap: float | None, scale: float | None) -> Tensor:
    """:func:`apply_head_transform` on a fresh ``(rows, V)`` head output, in place, in the compute dtype."""
    y = z.to(torch.promote_types(z.dtype, torch.float32))
    if scale is not None and scale != 1.0:
        y.mul_(scale)
    if softcap is not None:
        y.div_(softcap).tanh_().mul_(softcap)
    return y


def _head_backward(dy: Tensor, y: Tensor, softcap: float | None, scale: float | None) -> Tensor:
    """dL/dz from dL/dy for ``y = softcap * tanh(scale * z / softcap)`` (in place on ``dy``)."""
    if softcap is not None:  # d(c tanh(u / c))/du = 1 - tanh^2 = 1 - (y / c)^2
        dy.mul_(1.0 - (y / softcap).square_())
    if scale is not None and scale != 1.0:
        dy.mul_(scale)
    return dy


def _ce_rows(y: Tensor, labels: Tensor, dy: Tensor | None, weights: Tensor | None) -> Tensor:
    """Cross-entropy of logits ``y (rows, V)`` against ``labels (rows,)`` (0 where :func:`kdistill.data.lm.label_mask`
    is False); when ``dy`` is given, adds ``weights * dCE/dy = weights * (softmax(y) - onehot)`` into it."""
    from ..data.lm import label_mask

    valid = label_mask(labels)
    idx = torch.where(valid, labels.long(), torch.zeros_like(labels, dtype=torch.long)).unsqueeze(-1)
    lse = torch.logsumexp(y, -1)
    ce = torch.where(valid, lse - y.gather(-1, idx).squeeze(-1), torch.zeros_like(lse))
    if dy is not None:
        w = (weights * valid).to(y.dtype)
        dy.add_(torch.exp(y - lse.unsqueeze(-1)).mul_(w.unsqueeze(-1)))
        dy.scatter_add_(-1, idx, -w.unsqueeze(-1))
    return ce


class _FusedSpec:
    """What :class:`_FusedLinearLoss` needs besides tensors (one object, so ``apply`` gets few arguments)."""

    def __init__(self, fn: Callable[..., Tensor], kwargs: dict[str, Any], name: str | None, chunk_size: int,
                 lead: tuple[int, ...], transforms: tuple, teacher_head: bool, labels: bool) -> None:
        self.fn, self.kwargs, self.name, self.chunk_size, self.lead = fn, kwargs, name, chunk_size, lead
        self.softcap, self.scale, self.t_softcap, self.t_scale = transforms
        self.teacher_head, self.labels = teacher_head, labels
        rows_kw = {k: v for k, v in kwargs.items() if k != "kd_temperature"}
        self.rows_kwargs, self.temperature = rows_kw, float(kwargs.get("kd_temperature", 1.0))


_LOW = (torch.bfloat16, torch.float16)
_ADDMM_OUT_DTYPE: bool | None = None  # whether torch.addmm(..., out_dtype=float32, out=acc) works here (CUDA)


def addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` for an fp32 accumulator ``acc``, in the precision of ``a`` and ``b``: fp32 operands run an
    fp32 GEMM (``addmm_``); bf16 / fp16 operands run a bf16 / fp16 GEMM (fp32 accumulation inside the GEMM, as
    autocast's matmuls), through ``torch.addmm(out_dtype=float32)`` into ``acc`` where this torch has it (CUDA,
    no temporary), else one ``(rows, cols)`` product in the operands' dtype added to ``acc``. An fp32 GEMM is ~10x
    slower than a bf16 one on a GPU: this is what keeps a fused head in a bf16 run as fast as the eager loss."""
    global _ADDMM_OUT_DTYPE
    if a.dtype not in _LOW or b.dtype != a.dtype:
        return acc.addmm_(a.float(), b.float())
    with torch.autocast(acc.device.type, enabled=False):
        if acc.is_cuda and _ADDMM_OUT_DTYPE is not False:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                _ADDMM_OUT_DTYPE = True
                return acc
            except (RuntimeError, TypeError, NotImplementedError):
                _ADDMM_OUT_DTYPE = False
        return acc.add_(a @ b)


def gemm_dtype(*xs: Tensor) -> torch.dtype:
    """The dtype a head's matmuls run in: autocast's where it is on for the tensors' device, else the lowest
    precision among ``xs`` (bf16 / fp16), else fp32."""
    dev = xs[0].device.type
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4: per device type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    elif dev == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    return next((x.dtype for x in xs if x.dtype in _LOW), torch.float32)


class _Grads:
    """The student-side gradient buffers of one fused call: hidden ``(N, H)``, weight (an fp32 accumulator), bias.
    Allocated at the first chunk's :meth:`add`, after that chunk's teacher logits are freed, so the weight-sized
    buffer never coexists with both models' logits."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool]) -> None:
        self.need = (need[0], need[1], need[2] and bias is not None)
        self.h = self.w = self.b = None
        self.ready = False

    def _allocate(self, hidden: Tensor, weight: Tensor, accumulate: bool = True) -> None:
        dev = weight.device
        self.accumulate = accumulate
        self.h = torch.zeros_like(hidden) if self.need[0] else None
        self.w = (torch.zeros(weight.shape, dtype=torch.float32, device=dev) if self.need[1] and accumulate
                  else None)
        self.b = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if self.need[2] else None
        self.ready = True

    def add(self, sl: slice, dz: Tensor, hidden: Tensor, weight: Tensor) -> None:
        # on a GPU, in the matmuls' precision (bf16 runs: bf16 GEMMs); on the CPU in fp32, where bf16 is not faster
        dt = gemm_dtype(hidden, weight) if weight.is_cuda else torch.float32
        if not self.ready and self.need[1] and (sl.start or 0) == 0 and (sl.stop or 0) >= hidden.shape[0]:
            # one chunk: the weight gradient is one GEMM, written directly (as the eager backward writes it), with
            # no fp32 accumulator to zero, add into and convert (on a GPU that traffic cost as much as the GEMM)
            self._allocate(hidden, weight, accumulate=False)
            self.w = dz.t().to(dt) @ hidden.to(dt)
        if not self.ready:
            self._allocate(hidden, weight)
        if self.h is not None:
            self.h[sl] = (dz.to(weight.dtype) @ weight).to(self.h.dtype)
        if self.w is not None and self.accumulate:
            addmm_fp32_(self.w, dz.t().to(dt), hidden[sl].to(dt))
        if self.b is not None:
            self.b += dz.sum(0).to(torch.float32)

    def scaled(self, c: float, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, ...]:
        """The gradients times ``c``, handed over: the buffers drop their references, so autograd can take the
        tensors as the parameters' ``.grad`` without a copy."""
        if not self.ready:  # no rows
            self._allocate(hidden, weight)
        h, w, b = self.h, self.w, self.b
        self.h = self.w = self.b = None
        if c != 1.0:
            for g in (h, w, b):
                if g is not None:
                    g.mul_(c)
        return (h, w.to(weight.dtype) if w is not None else None, b.to(bias.dtype) if b is not None else None)


def _chunk(spec: _FusedSpec, sl: slice, hidden: Tensor, weight: Tensor, bias: Tensor | None,
           t_hidden: Tensor | None, t_weight: Tensor | None, t_bias: Tensor | None, labels: Tensor | None,
           targets: tuple[Tensor, ...], w_kd: Tensor | None, w_ce: Tensor | None, need_s: bool,
           t_need: tuple[bool, ...] = (), t_grads: list[Tensor | None] | None = None) -> tuple[Tensor, Tensor | None,
                                                                                                Tensor | None]:
    """One chunk of rows: ``(values, ce values, dL/dz)``, where ``dL/dz`` (the student head's output gradient for
    per-row weights ``w_kd`` on the values and ``w_ce`` on the CE term) is formed only when ``need_s``. With
    ``t_need`` (teacher-side inputs that need a gradient), the teacher side runs under autograd and its gradients
    for the weights ``w_kd`` are added into ``t_grads``."""
    y = _head(F.linear(hidden[sl], weight, bias), spec.softcap, spec.scale)
    teacher_grad = any(t_need)
    if spec.name is not None and not teacher_grad:  # closed-form student gradient, no autograd graph
        if spec.teacher_head:
            other = _head(F.linear(t_hidden[sl], t_weight, t_bias), spec.t_softcap, spec.t_scale)
        else:
            other = targets[0][sl]
        # the gradient overwrites the student logits unless the CE term or the soft-cap still needs them
        into = (y if need_s and not spec.labels and spec.softcap is None
                and torch.promote_types(y.dtype, other.dtype) == y.dtype else None)
        values, dy = L.divergence_rows(spec.name, y, other, kd_temperature=spec.temperature, need_grad=need_s,
                                       grad_into=into, lead=spec.lead, offset=sl.start, **spec.rows_kwargs)
        del other
        if need_s:
            dy.mul_(w_kd.to(dy.dtype).unsqueeze(-1))
    else:
        with torch.enable_grad():
            y_leaf = y.detach().requires_grad_(need_s)
            leaves: list[Tensor] = []
            if spec.teacher_head:
                th = t_hidden[sl].detach().requires_grad_(t_need[0] if teacher_grad else False)
                tw = t_weight.detach().requires_grad_(t_need[1] if teacher_grad else False)
                tb = (t_bias.detach().requires_grad_(t_need[2] if teacher_grad else False) if t_bias is not None
                      else None)
                xs = [_teacher_logits(th, tw, tb, spec)]
                leaves = [th, tw] + ([tb] if tb is not None else [])
            else:
                xs = [x[sl].detach().requires_grad_(bool(teacher_grad and t_need[3 + i]))
                      for i, x in enumerate(targets)]
                leaves = xs
            out = spec.fn(y_leaf, *xs, **spec.kwargs)
            values = out.detach().to(y.dtype)
            wrt = ([y_leaf] if need_s else []) + [x for x in leaves if x.requires_grad]
            dy = None
            if wrt and (need_s or teacher_grad):
                g_out = (w_kd if w_kd is not None else torch.zeros_like(values)).to(out.dtype)
                got = list(torch.autograd.grad(out, wrt, g_out, allow_unused=True))
                if need_s:
                    dy = got.pop(0)
                    dy = torch.zeros_like(y) if dy is None else dy.to(y.dtype)
                _add_teacher_grads(spec, sl, leaves, got, t_grads)
    ce = _ce_rows(y, labels[sl], dy, w_ce) if spec.labels else None
    dz = _head_backward(dy, y, spec.softcap, spec.scale) if need_s else None
    return values, ce, dz


def _teacher_logits(th: Tensor, tw: Tensor, tb: Tensor | None, spec: _FusedSpec) -> Tensor:
    """The teacher head under autograd (only when it needs a gradient): out-of-place transform."""
    z = F.linear(th, tw, tb)
    return apply_head_transform(z.to(torch.promote_types(z.dtype, torch.float32)), softcap=spec.t_softcap,
                                logit_scale=spec.t_scale)


def _add_teacher_grads(spec: _FusedSpec, sl: slice, leaves: list[Tensor], got: list[Tensor | None],
                       t_grads: list[Tensor | None] | None) -> None:
    """Write / accumulate the teacher-side gradients of one chunk into ``t_grads`` (hidden, weight, bias or the
    targets, in the order of ``leaves``)."""
    it = iter(got)
    for i, leaf in enumerate(leaves):
        if not leaf.requires_grad:
            continue
        g = next(it)
        if g is None or t_grads is None or t_grads[i] is None:
            continue
        if spec.teacher_head and i > 0:  # the teacher's weight / bias: summed over chunks
            t_grads[i] += g.to(t_grads[i].dtype)
        else:
            t_grads[i][sl] = g.to(t_grads[i].dtype)


def _proportion(grads: tuple[Tensor, ...], hints: tuple[Tensor, ...]) -> float | None:
    """``c`` with ``grads == c * hints`` (all pairs at once), or None when the incoming gradients are not
    proportional to the hints (then the backward recomputes)."""
    g = torch.cat([x.reshape(-1).double() for x in grads])
    w = torch.cat([x.reshape(-1).double() for x in hints])
    ww = float((w * w).sum())
    gmax = float(g.abs().max()) if g.numel() else 0.0
    if ww == 0.0:
        return 0.0 if gmax == 0.0 else None
    c = float((g * w).sum()) / ww
    return c if float((g - c * w).abs().max()) <= 1e-6 * max(gmax, 1e-30) else None


class _FusedLinearLoss(torch.autograd.Function):
    """Values (and CE values) of a loss on ``head(hidden)`` chunk by chunk; see :func:`fused_linear_loss`.

    Inputs after ``spec``: hidden, weight, bias, teacher hidden, teacher weight, teacher bias, labels, the two
    gradient hints, then the targets. With hints and a student-only gradient, forward already forms the whole
    gradient for incoming per-row gradients equal to the hints (one pass over the vocabulary, as the eager
    backward); backward then only rescales it when the incoming gradients are ``c * hints`` and recomputes the
    chunks otherwise."""

    @staticmethod
    def forward(ctx: Any, spec: _FusedSpec, hidden: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                t_hidden: Tensor | None, t_weight: Tensor | None, t_bias: Tensor | None, labels: Tensor | None,
                hint_kd: Tensor | None, hint_ce: Tensor | None, *targets: Tensor) -> tuple[Tensor, Tensor]:
        need_s = ctx.needs_input_grad[1:4]
        need_t = ctx.needs_input_grad[4:7] + ctx.needs_input_grad[10:]
        n = hidden.shape[0]
        dt = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        values = torch.empty(n, dtype=dt, device=hidden.device)
        ce = torch.empty(n if spec.labels else 0, dtype=dt, device=hidden.device)
        precompute = any(need_s) and hint_kd is not None and not any(need_t)
        pre = _Grads(hidden, weight, bias, need_s) if precompute else None
        for i in range(0, n, spec.chunk_size):
            sl = slice(i, i + spec.chunk_size)
            w_kd = hint_kd[sl] if pre is not None else None
            w_ce = hint_ce[sl] if (pre is not None and hint_ce is not None) else None
            v, c, dz = _chunk(spec, sl, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, targets, w_kd,
                              w_ce, need_s=pre is not None)
            values[sl] = v
            if c is not None:
                ce[sl] = c
            if pre is not None:
                pre.add(sl, dz, hidden, weight)
        ctx.spec, ctx.pre = spec, pre
        ctx.save_for_backward(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, hint_kd, hint_ce, *targets)
        ctx.set_materialize_grads(False)
        return values, ce

    @staticmethod
    def backward(ctx: Any, g_values: Tensor | None, g_ce: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, t_hidden, t_weight, t_bias, labels, hint_kd, hint_ce, *targets = ctx.saved_tensors
        spec: _FusedSpec = ctx.spec
        need_s = ctx.needs_input_grad[1:4]
        need_t = tuple(ctx.needs_input_grad[4:7]) + tuple(ctx.needs_input_grad[10:])
        n = hidden.shape[0]
        dt = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        g_values = g_values if g_values is not None else torch.zeros(n, dtype=dt, device=hidden.device)
        if spec.labels:
            g_ce = g_ce if g_ce is not None else torch.zeros(n, dtype=dt, device=hidden.device)
        pre, ctx.pre = ctx.pre, None
        none_t = (None,) * (len(targets) + 3)
        if pre is not None:  # forward formed the gradient for the hinted per-row weights
            grads, hints = (g_values,), (hint_kd,)
            if spec.labels:
                grads, hints = (g_values, g_ce), (hint_kd, hint_ce)
            c = _proportion(grads, hints)
            if c is not None:
                gh, gw, gb = pre.scaled(c, hidden, weight, bias)
                return (None, gh, gw, gb, *none_t[:3], None, None, None, *none_t[3:])
            del pre
        out = _Grads(hidden, weight, bias, need_s)
        # teacher-side gradients (rare: a teacher that is trained too): hidden / weight / bias, or the targets
        t_inputs = (t_hidden, t_weight, t_bias) if spec.teacher_head else tuple(targets)
        t_flags = need_t[:3] if spec.teacher_head else need_t[3:]
        t_grads = [torch.zeros_like(x) if (x is not None and f) else None for x, f in zip(t_inputs, t_flags)]
        for i in range(0, n, spec.chunk_size):
            sl = slice(i, i + spec.chunk_size)
            _, _, dz = _chunk(spec, sl, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, targets,
                              g_values[sl], g_ce[sl] if spec.labels else None, need_s=any(need_s),
                              t_need=need_t if any(need_t) else (), t_grads=t_grads)
            if dz is not None:
                out.add(sl, dz, hidden, weight)
        gh, gw, gb = out.scaled(1.0, hidden, weight, bias)
        if spec.teacher_head:
            tg = (*t_grads, None, None, None, *((None,) * len(targets)))
        else:
            tg = (None, None, None, None, None, None, *t_grads)
        return (None, gh, gw, gb, *tg)


def _unwrap(fn: Callable[..., Tensor], kwargs: dict[str, Any]) -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """``functools.partial(f, **kw)`` -> ``(f, kw + kwargs)`` so a divergence given as a partial still finds its
    closed-form gradient."""
    while isinstance(fn, functools.partial) and not fn.args:
        kwargs = {**(fn.keywords or {}), **kwargs}
        fn = fn.func
    return fn, kwargs


def _shape_error(what: str, got: Tensor, expected: str) -> KDistillError:
    return KDistillError(f"fused_linear_loss: {what} has shape {tuple(got.shape)}; expected {expected}.")


def fused_linear_loss(fn: Callable[..., Tensor], hidden: Tensor, weight: Tensor, *targets: Tensor,
                      bias: Tensor | None = None, chunk_size: int | None = None,
                      teacher_hidden: Tensor | None = None, teacher_weight: Tensor | None = None,
                      teacher_bias: Tensor | None = None, softcap: float | None = None,
                      logit_scale: float | None = None, teacher_softcap: float | None = None,
                      teacher_logit_scale: float | None = None, labels: Tensor | None = None,
                      grad_hint: Tensor | tuple[Tensor, Tensor] | None = None,
                      **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
    """``fn(head(hidden), teacher_side, **kwargs)`` without ever building either model's full ``(tokens, V)`` logits.

    Student: ``hidden`` its final hidden states ``(B, T, H)`` (after the final norm), ``weight`` its LM head
    ``(V, H)`` (tied or not), ``bias`` optional ``(V,)``; its logits are
    ``head(hidden) = apply_head_transform(hidden @ weight.T + bias, softcap=softcap, logit_scale=logit_scale)``.
    Teacher side, either

    * ``targets``: tensors starting with ``(B, T)``, passed to ``fn`` chunk by chunk: teacher logits
      ``(B, T, V)``, or top-k log-probs / indices / residuals for :func:`~kdistill.losses.topk.topk_loss`; or
    * ``teacher_hidden (B, T, Ht)`` and ``teacher_weight (V, Ht)`` (+ ``teacher_bias``, ``teacher_softcap``,
      ``teacher_logit_scale``): the teacher's logits are built chunk by chunk as well.

    ``labels (B, T)``: also the cross-entropy of the student logits (at temperature 1) against them, 0 where
    :func:`kdistill.data.lm.label_mask` is False; the result is then ``(loss, ce)``, both ``(B, T)``.

    For the divergences of :data:`kdistill.losses.logits.ANALYTIC` (all of ``losses/logits.py`` but ``uld``, also
    given as a ``functools.partial``), the student gradient is the closed form of
    :func:`~kdistill.losses.logits.divergence_rows`; other ``fn`` (``topk_loss``, your own) are differentiated per
    chunk with autograd. Gradients flow to ``hidden``, ``weight`` and ``bias`` (and to teacher-side inputs that
    require them) and equal the unfused computation up to float summation order.

    ``chunk_size``: rows per chunk, by default :func:`fused_chunk_size` (one chunk when the eager working set is
    small). ``grad_hint``: per-row weights ``(B, T)`` (a bool mask works) that the caller expects the incoming
    gradient of the result to be proportional to -- ``mask`` for ``masked_mean(loss, mask)``, a pair
    ``(w_loss, w_ce)`` with ``labels``. With it, forward already forms the gradient and backward only rescales it
    (the eager loss's cost: one pass over the vocabulary); when the incoming gradient turns out not to be
    proportional, backward recomputes the chunks, so the hint changes speed, never results.

    Example with a Hugging Face causal LM::

        hs = student.model(input_ids).last_hidden_state                  # skip the LM head
        with torch.no_grad():
            ht = teacher.model(input_ids).last_hidden_state
        per_token = fused_linear_loss(forward_kl, hs, student.lm_head.weight, teacher_hidden=ht,
                                      teacher_weight=teacher.lm_head.weight, kd_temperature=2.0, grad_hint=mask)
        loss = masked_mean(per_token, mask)
    """
    name = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", "loss"))
    who = f"fused_linear_loss({name})"
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise KDistillError(f"{who}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}; "
                            "expected hidden (..., H) and an LM-head weight (V, H) with the same H.")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise _shape_error("bias", bias, f"({V},), one entry per row of the LM-head weight")
    _check_transform(softcap, logit_scale, who)
    _check_transform(teacher_softcap, teacher_logit_scale, f"{who} teacher")
    lead = tuple(hidden.shape[:-1])
    teacher_head = teacher_hidden is not None or teacher_weight is not None
    if teacher_head:
        if teacher_hidden is None or teacher_weight is None:
            raise KDistillError(f"{who}: got only one of teacher_hidden / teacher_weight; expected both (the "
                                "teacher's final hidden states (..., Ht) and its LM-head weight (V, Ht)).")
        if targets:
            raise KDistillError(f"{who}: got {len(targets)} target tensor(s) and a teacher head; expected one "
                                "teacher side: teacher logits / top-k targets, or teacher_hidden + teacher_weight.")
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise _shape_error("teacher_hidden", teacher_hidden, f"{lead} + (Ht,): the student's token shape")
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise _shape_error("teacher_weight", teacher_weight, f"(V, {teacher_hidden.shape[-1]}): the teacher's "
                               "LM head, with the teacher's hidden size")
        if teacher_weight.shape[0] != V:
            raise KDistillError(f"{who}: the teacher's LM head has {teacher_weight.shape[0]} rows and the student's "
                                f"{V}; expected the same vocabulary. Fix: align the vocabularies first "
                                "(kdistill.teachers.vocab) and pass teacher logits, or use the cross-tokenizer "
                                "loss `uld` without the fused head.")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (V,):
            raise _shape_error("teacher_bias", teacher_bias, f"({V},)")
    elif not targets:
        raise KDistillError(f"{who}: got no teacher side; expected teacher logits or top-k targets as positional "
                            "tensors, or teacher_hidden= and teacher_weight=.")
    base, kw = _unwrap(fn, kwargs)
    analytic = L.ANALYTIC.get(base)
    if analytic is not None and not teacher_head:
        if len(targets) != 1:
            analytic = None
        elif targets[0].shape[-1] != V:
            raise _shape_error("the teacher logits", targets[0], f"{lead} + ({V},): the student head's vocabulary")
    flat = _flatten(torch.Size(lead), (hidden, *targets), who)
    n = flat[0].shape[0]
    flat_labels = None
    if labels is not None:
        if tuple(labels.shape) != lead or labels.is_floating_point():
            raise _shape_error("labels", labels, f"{lead}, integer token ids (-100 where nothing is predicted)")
        from ..data.lm import label_mask

        flat_labels = labels.reshape(-1)
        valid = label_mask(flat_labels)
        if bool(((flat_labels < 0) | (flat_labels >= V))[valid].any()):
            bad = flat_labels[valid & ((flat_labels < 0) | (flat_labels >= V))][0]
            raise KDistillError(f"{who}: labels hold {int(bad)}; expected token ids in [0, {V - 1}] or -100 "
                                "(ignored). Is the batch tokenized for this model?")
    hints = _hints(grad_hint, lead, labels is not None, who)
    spec = _FusedSpec(base, kw, analytic, chunk_size or fused_chunk_size(n, V, device=hidden.device), lead,
                      (softcap, logit_scale, teacher_softcap, teacher_logit_scale), teacher_head, labels is not None)
    th = teacher_hidden.reshape(n, -1) if teacher_head else None
    values, ce = _FusedLinearLoss.apply(spec, flat[0], weight, bias, th, teacher_weight, teacher_bias, flat_labels,
                                        *hints, *flat[1:])
    if labels is not None:
        return values.reshape(lead), ce.reshape(lead)
    return values.reshape(lead)


def _hints(grad_hint: Any, lead: tuple[int, ...], with_ce: bool, who: str) -> tuple[Tensor | None, Tensor | None]:
    """The gradient hints, flattened to ``(N,)`` floats: ``(loss hint, CE hint)``."""
    if grad_hint is None:
        return None, None
    parts = tuple(grad_hint) if isinstance(grad_hint, (tuple, list)) else (grad_hint,)
    if len(parts) != (2 if with_ce else 1):
        raise KDistillError(f"{who}: grad_hint has {len(parts)} part(s); expected "
                            + ("a pair (weights of the loss, weights of the CE term) with labels." if with_ce else
                               "one tensor of per-row weights (e.g. the mask of masked_mean)."))
    out = []
    for x in parts:
        if not isinstance(x, Tensor) or tuple(x.shape) != lead:
            raise KDistillError(f"{who}: grad_hint part of shape {tuple(getattr(x, 'shape', ()))}; expected a tensor "
                                f"of the token shape {lead} (a bool mask or float weights).")
        out.append(x.detach().reshape(-1).to(torch.float32))
    return (out[0], out[1] if with_ce else None)
