"""Divergences between student and teacher logits.

Every function takes ``student_logits`` first and ``teacher_logits`` second, with the class / vocabulary
axis last: shapes ``(B, C)`` for classifiers or ``(B, T, V)`` for language models. Hyper-parameters are
keyword-only. Computation is in fp32 whatever the input dtype, and the result is *unreduced*: one value
per row (shape ``logits.shape[:-1]``). Reduce with :func:`kdistill.losses.reduce.masked_mean`.

Conventions
-----------
* ``forward_kl`` = KL(teacher || student) (mean-seeking), ``reverse_kl`` = KL(student || teacher)
  (mode-seeking).
* ``kd_temperature`` divides both logit tensors before the softmax. The losses do **not** rescale for it;
  methods multiply by :func:`kdistill.losses.reduce.kd_scale` with the divergence's
  :data:`TEMPERATURE_POWER` (``T^2`` for the KL family, ``T`` for the L1-type ``tvd`` and ``uld``), the
  factor that keeps the gradient scale independent of ``T``.
* ``-inf`` logits (masked vocabulary entries) give probability 0. An entry that is ``-inf`` for *both*
  models contributes exactly 0, with finite values and gradients. Where a KL would be truly infinite -- the
  distribution that weights the sum gives mass to an entry the other model sets to ``-inf`` (``forward_kl``
  with a student-only ``-inf``, ``reverse_kl`` with a teacher-only one; also ``generalized_jsd`` at beta 0 or 1
  and the skew divergences at skew 0) -- the loss raises :class:`~kdistill.errors.KDistillError` naming the
  position and the vocabulary entry instead of returning ``inf`` with a NaN gradient. The mixtures
  (``generalized_jsd`` with 0 < beta < 1, skew > 0), ``tvd``, ``taid`` and ``uld`` stay finite there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, name: str) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise KDistillError(
            f"{name}: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ; expected identical shapes (..., V). If the "
            "vocabularies differ in size, pad/mask them first (see kdistill.teachers.vocab) or use the "
            "cross-tokenizer loss `uld`."
        )


def _check_temperature(kd_temperature: float) -> None:
    if not kd_temperature > 0:
        raise KDistillError(f"kd_temperature: got {kd_temperature!r}, expected a positive number.")


def _infinite_error(name: str, pos: tuple[int, ...], log_weight: Tensor, log_other: Tensor, weight: str,
                    other: str) -> KDistillError:
    """The error for a non-finite KL at ``pos``, given the two log-distributions ``(V,)`` of that position:
    ``log_weight`` weights the sum (teacher for forward KL, student for reverse KL), ``log_other`` is inside the log."""
    lw, lo = log_weight.detach(), log_other.detach()
    hit = (torch.isfinite(lw) & torch.isneginf(lo)).nonzero()
    where = f"position {pos if len(pos) > 1 else pos[0]}"
    if len(hit) == 0:
        return KDistillError(f"{name}: got a non-finite value at {where} (NaN or inf in the {weight} or {other} "
                             "logits); expected finite logits, or -inf for entries both models exclude.")
    v = int(hit[0])
    return KDistillError(
        f"{name}: the divergence is infinite at {where}: vocabulary entry {v} has probability "
        f"{float(lw[v].exp()):.3g} under the {weight} but a -inf logit for the {other}. Expected -inf entries to be "
        f"shared by both models. Fix: set the same entries to -inf in the {weight} logits (e.g. "
        "kdistill.teachers.vocab.VocabAlignment), or use a divergence that stays finite there (generalized_jsd "
        "with 0 < beta < 1, skew_kl / skew_reverse_kl with skew > 0, tvd).")


def _first_non_finite(values: Tensor) -> tuple[int, ...] | None:
    """The index of the first non-finite value (one host sync), or None when all are finite."""
    if bool(torch.isfinite(values).all()):
        return None
    return tuple(int(i) for i in (~torch.isfinite(values)).nonzero()[0])


def _raise_if_infinite(values: Tensor, log_weight: Tensor, log_other: Tensor, name: str, weight: str,
                       other: str) -> None:
    """Raise :func:`_infinite_error` at the first non-finite value of a KL-type loss."""
    pos = _first_non_finite(values)
    if pos is not None:
        raise _infinite_error(name, pos, log_weight[pos], log_other[pos], weight, other)


#: Power of ``kd_temperature`` that keeps each divergence's gradient scale independent of the temperature
#: (multiply the loss by ``kd_scale(T, power=...)``). As ``T`` grows, ``p_s - p_t`` shrinks like ``1/T``: the
#: KL family is quadratic in that difference (gradient ~ 1/T^2), the L1-type losses are linear (~ 1/T).
#: Checked by ``tests/losses/test_temperature_scaling.py`` (gradient norms at T = 4, 8, 16).
TEMPERATURE_POWER: dict[str, int] = {
    "forward_kl": 2, "reverse_kl": 2, "generalized_jsd": 2, "skew_kl": 2, "skew_reverse_kl": 2, "taid": 2,
    "token_selective": 2, "tvd": 1, "uld": 1,
}


def log_probs(logits: Tensor, kd_temperature: float = 1.0) -> Tensor:
    """fp32 log-softmax of ``logits / kd_temperature`` over the last axis."""
    _check_temperature(kd_temperature)
    return F.log_softmax(logits.float() / kd_temperature, dim=-1)


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last axis, with 0 log 0 = 0."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


#: elements per row block of the blocked vocabulary losses on CPU: 2**18 fp32 values = 1 MB, so one block
#: of each operand (student, teacher, log-probs, gradient) stays in cache between passes. On 1024 x 8192
#: logits, 16-64 rows per block measured alike (~30 ms forward + backward), 1024 rows ~3x slower.
_BLOCK_ELEMENTS = 1 << 18


def _block_rows(x: Tensor) -> int:
    """Rows per block for the blocked vocabulary losses: ~:data:`_BLOCK_ELEMENTS` values on CPU, where the
    passes of a block then hit cache instead of memory; all rows at once on accelerators, where many small
    kernel launches would cost more than they save."""
    n, V = x.shape[0], max(x.shape[-1], 1)
    if x.device.type != "cpu":
        return max(n, 1)
    return max(1, _BLOCK_ELEMENTS // V)


def _kl_parts(student_logits: Tensor, teacher_logits: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(log p_s, p_t, log p_t - log p_s, KL(p_t || p_s))`` in fp32 at temperature ``t``; the difference is 0
    where ``p_t = 0`` whenever that is needed for a finite KL (0 log 0 = 0 for a teacher-excluded class)."""
    zs, zt = student_logits.float(), teacher_logits.float()
    ls = F.log_softmax(zs / t if t != 1.0 else zs, dim=-1)
    lt = F.log_softmax(zt / t if t != 1.0 else zt, dim=-1)
    p = lt.exp()
    diff = lt - ls
    kl = (p * diff).sum(-1)
    if not torch.isfinite(kl).all():
        diff = torch.where(p > 0, diff, torch.zeros_like(diff))
        kl = (p * diff).sum(-1)
    return ls, p, diff, kl


def _check_forward_kl(kl: Tensor, student_logits: Tensor, teacher_logits: Tensor, t: float) -> None:
    """One finiteness check per call; on failure, the offending row's error (the blocked path keeps no log-probs,
    so that row's are recomputed)."""
    pos = _first_non_finite(kl)
    if pos is not None:
        ls = F.log_softmax(student_logits[pos].float() / t, dim=-1)
        lt = F.log_softmax(teacher_logits[pos].float() / t, dim=-1)
        raise _infinite_error("forward_kl", pos, lt, ls, "teacher", "student")


class _ForwardKL(torch.autograd.Function):
    """KL(p_t || p_s) with analytic gradients: ``dKL/dz_s = (p_s - p_t) / T`` and
    ``dKL/dz_t = p_t ((log p_t - log p_s) - KL) / T``.

    Student-only gradient (the usual case, the teacher is frozen): the rows are processed in blocks of
    about :data:`_BLOCK_ELEMENTS` values. Each block's log-softmaxes, KL and gradient ``p_s - p_t`` are
    computed while the block is still in cache, and only that gradient (one tensor of the student's shape
    and dtype) is saved; backward is one multiply by the incoming per-row gradient. On 1024 x 8192 logits
    this is ~3x faster than the unblocked passes over DRAM and faster than a cross-entropy's forward +
    backward (``benchmarks/llm_throughput.py``). When the teacher also needs a gradient the whole-tensor
    path saves ``log p_s``, ``p_t``, ``log p_t - log p_s`` and the KL instead."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:  # type: ignore[override]
        ctx.t = t
        ctx.dtypes = (student_logits.dtype, teacher_logits.dtype)
        ctx.blocked = not ctx.needs_input_grad[1]
        if ctx.blocked:
            V = student_logits.shape[-1]
            zs = student_logits.reshape(-1, V)
            zt = teacher_logits.reshape(-1, V)
            n = zs.shape[0]
            rows = _block_rows(zs)
            kl = torch.empty(n, dtype=torch.float32, device=zs.device)
            keep_grad = ctx.needs_input_grad[0]
            grad = torch.empty(zs.shape, dtype=student_logits.dtype, device=zs.device) if keep_grad else None
            for i in range(0, n, rows):
                ls, p, _, kl[i:i + rows] = _kl_parts(zs[i:i + rows], zt[i:i + rows], t)
                if keep_grad:
                    grad[i:i + rows] = ls.exp_().sub_(p)
            kl = kl.reshape(student_logits.shape[:-1])
            _check_forward_kl(kl, student_logits, teacher_logits, t)
            if keep_grad:
                ctx.save_for_backward(grad)
            return kl
        ls, p, diff, kl = _kl_parts(student_logits, teacher_logits, t)
        _check_forward_kl(kl, student_logits, teacher_logits, t)
        ctx.save_for_backward(ls, p, diff, kl)
        return kl

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g = grad.unsqueeze(-1) / ctx.t
        if ctx.blocked:
            (ds,) = ctx.saved_tensors
            return (ds.reshape(g.shape[:-1] + ds.shape[-1:]) * g).to(ctx.dtypes[0]), None, None
        ls, p, diff, kl = ctx.saved_tensors
        gs = gt = None
        if ctx.needs_input_grad[0]:
            gs = ((ls.exp() - p) * g).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gt = (p * (diff - kl.unsqueeze(-1)) * g).to(ctx.dtypes[1])
        return gs, gt, None


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """KL(p_teacher || p_student) at temperature T. Shape ``(...,)``. Hinton et al., 2015."""
    _check_pair(student_logits, teacher_logits, "forward_kl")
    _check_temperature(kd_temperature)
    return _ForwardKL.apply(student_logits, teacher_logits, float(kd_temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """KL(p_student || p_teacher) at temperature T (mode-seeking). Shape ``(...,)``."""
    _check_pair(student_logits, teacher_logits, "reverse_kl")
    ls, lt = log_probs(student_logits, kd_temperature), log_probs(teacher_logits, kd_temperature)
    out = kl_from_log_probs(ls, lt)
    _raise_if_infinite(out, ls, lt, "reverse_kl", "student", "teacher")
    return out


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, kd_temperature: float = 1.0
) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes").

    ``JSD(beta) = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``.
    ``beta = 0`` is exactly :func:`forward_kl` and ``beta = 1`` exactly :func:`reverse_kl` (the interior
    formula vanishes there, so the end points are defined by their limits: ``JSD(beta) / beta ->
    forward_kl`` as beta -> 0 and ``JSD(beta) / (1 - beta) -> reverse_kl`` as beta -> 1).
    """
    if not 0.0 <= beta <= 1.0:
        raise KDistillError(f"generalized_jsd beta: got {beta!r}, expected a number in [0, 1].")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, kd_temperature=kd_temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, kd_temperature=kd_temperature)
    _check_pair(student_logits, teacher_logits, "generalized_jsd")
    ls = log_probs(student_logits, kd_temperature)
    lt = log_probs(teacher_logits, kd_temperature)
    # log m via _log_mix (defined below): same value as a logsumexp of the two terms, but its gradient
    # stays finite where both models give -inf (a logsumexp of two -inf entries back-propagates NaN).
    log_m = _log_mix(lt, ls, beta)
    return beta * kl_from_log_probs(lt, log_m) + (1.0 - beta) * kl_from_log_probs(ls, log_m)


def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """Cross-entropy ``-sum_v q_v log p_student,v`` against a target distribution ``q`` (rows sum to 1).

    Used for soft labels that are already probabilities (mixup targets, API teachers, tabular
    teachers). Entries with ``q = 0`` contribute 0 even where the student's log-prob is ``-inf``.
    """
    if student_logits.shape != target_probs.shape:
        raise KDistillError(
            f"soft_cross_entropy: student_logits {tuple(student_logits.shape)} vs target_probs "
            f"{tuple(target_probs.shape)}; expected identical shapes."
        )
    ls = log_probs(student_logits, kd_temperature)
    q = target_probs.float()
    return -(q * torch.where(q > 0, ls, torch.zeros_like(ls))).sum(-1)


def cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row cross-entropy with integer ``labels`` (shape ``logits.shape[:-1]``).

    Rows whose label is negative (e.g. the -100 padding convention) give 0; mask them out of the
    reduction as well (see ``kdistill.data``).
    """
    if labels.shape != student_logits.shape[:-1]:
        raise KDistillError(
            f"cross_entropy labels: got shape {tuple(labels.shape)}, expected "
            f"{tuple(student_logits.shape[:-1])} (logits without the class axis)."
        )
    ls = log_probs(student_logits)
    valid = labels >= 0
    picked = ls.gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, -picked, torch.zeros_like(picked))


# ------------------------------------------------------------------------------------------------------
# LLM distillation divergences (issue 4). Same conventions as above: student first, keyword-only
# hyper-parameters, ``kd_temperature`` divides *both* logit tensors, fp32 inside, unreduced output of
# shape ``logits.shape[:-1]``, no NaN values or gradients on ``-inf`` logits (masked vocabulary rows).


def _safe_log(x: Tensor) -> Tensor:
    """``log(x)`` that returns ``-inf`` at ``x == 0`` with a zero (not NaN) gradient there."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), torch.full_like(x, -math.inf))


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a * exp(log_a) + (1 - weight_a) * exp(log_b))``, stable, NaN-free gradients when both
    entries are ``-inf`` (then the result is ``-inf``)."""
    shift = torch.maximum(log_a, log_b).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    mix = weight_a * torch.exp(log_a - shift) + (1.0 - weight_a) * torch.exp(log_b - shift)
    return _safe_log(mix) + shift


def _check_skew(skew: float, name: str) -> None:
    if not 0.0 <= skew < 1.0:
        raise KDistillError(
            f"{name} skew: got {skew!r}, expected a number in [0, 1) (0 gives the plain divergence; "
            "DistiLLM uses 0.1). skew = 1 makes the divergence identically 0."
        )


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1,
            kd_temperature: float = 1.0) -> Tensor:
    """Skew forward KL of DistiLLM (Ko et al., 2024, "DistiLLM: Towards Streamlined Distillation for
    Large Language Models").

    ``SKL(a) = KL(p_t || a p_t + (1 - a) p_s)`` with ``a = skew``. ``skew = 0`` is exactly
    :func:`forward_kl`. The mixture keeps the student's gradient (as in the paper); mixing in the teacher
    bounds the loss and its gradient where the student puts ~0 mass on a teacher token. Shape ``(...,)``.
    """
    _check_pair(student_logits, teacher_logits, "skew_kl")
    _check_skew(skew, "skew_kl")
    ls = log_probs(student_logits, kd_temperature)
    lt = log_probs(teacher_logits, kd_temperature)
    out = kl_from_log_probs(lt, _log_mix(lt, ls, skew))
    if skew == 0.0:
        _raise_if_infinite(out, lt, ls, "skew_kl", "teacher", "student")
    return out


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1,
                    kd_temperature: float = 1.0) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., 2024): ``SRKL(a) = KL(p_s || a p_s + (1 - a) p_t)``,
    ``a = skew``. ``skew = 0`` is exactly :func:`reverse_kl`. Shape ``(...,)``."""
    _check_pair(student_logits, teacher_logits, "skew_reverse_kl")
    _check_skew(skew, "skew_reverse_kl")
    ls = log_probs(student_logits, kd_temperature)
    lt = log_probs(teacher_logits, kd_temperature)
    out = kl_from_log_probs(ls, _log_mix(ls, lt, skew))
    if skew == 0.0:
        _raise_if_infinite(out, ls, lt, "skew_reverse_kl", "student", "teacher")
    return out


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """Total variation distance ``0.5 * sum_v |p_t,v - p_s,v|`` in [0, 1] (symmetric, bounded; used as a
    distillation objective e.g. by Wen et al., 2023, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation"). Shape ``(...,)``."""
    _check_pair(student_logits, teacher_logits, "tvd")
    ps = log_probs(student_logits, kd_temperature).exp()
    pt = log_probs(teacher_logits, kd_temperature).exp()
    return 0.5 * (pt - ps).abs().sum(-1)


def taid(student_logits: Tensor, teacher_logits: Tensor, *, t: float, kd_temperature: float = 1.0) -> Tensor:
    """TAID loss (Shing et al., 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025).

    The target interpolates, in logit space, from the student's own *detached* distribution toward the
    teacher's::

        p_t = softmax(((1 - t) * stopgrad(z_s) + t * z_t) / T)
        TAID(t) = KL(p_t || softmax(z_s / T))

    ``t = 1`` is exactly :func:`forward_kl`; ``t = 0`` is identically 0 (the target is the student).
    ``t`` comes from a schedule (:class:`TAIDSchedule`, the adaptive update of the paper); the loss itself is
    pure. ``-inf`` logits: a vocabulary entry that is ``-inf`` for either model is ``-inf`` in the target.
    Shape ``(...,)``.
    """
    _check_pair(student_logits, teacher_logits, "taid")
    if not 0.0 <= t <= 1.0:
        raise KDistillError(f"taid t: got {t!r}, expected a number in [0, 1] (interpolation coefficient; "
                            "use kdistill.losses.logits.TAIDSchedule to produce it).")
    zs = student_logits.float()
    zt = teacher_logits.float()
    zs_d = zs.detach()
    # (1 - t) * z_s + t * z_t, with -inf kept as -inf (0 * -inf would be NaN at t = 0 or t = 1).
    if t == 1.0:
        mixed = zt
    elif t == 0.0:
        mixed = zs_d
    else:
        finite = torch.isfinite(zs_d) & torch.isfinite(zt)
        mixed = torch.where(finite, (1.0 - t) * torch.where(finite, zs_d, 0.0) + t * torch.where(finite, zt, 0.0),
                            torch.full_like(zt, -math.inf))
    return kl_from_log_probs(log_probs(mixed, kd_temperature), log_probs(zs, kd_temperature))


class TAIDSchedule:
    """The adaptive interpolation schedule of TAID (Shing et al., 2025, Algorithm 1). Stateful, tiny, and
    separate from the pure loss::

        sched = TAIDSchedule(total_steps=1000)
        loss = taid(zs, zt, t=sched.t)           # use the current t
        sched.update(float(loss))                 # after the step: advance t

    Update rule, with ``J_n`` the TAID objective measured at step n::

        delta_n = (J_{n-1} - J_n) / (J_{n-1} + eps)          (relative improvement)
        m_n     = beta * m_{n-1} + (1 - beta) * delta_n      (momentum)
        t_{n+1} = min(t_end, max(t_linear(n), t_n + alpha * sigmoid(m_n) * (1 - t_n)))
        t_linear(n) = t_start + (t_end - t_start) * n / total_steps

    with ``n`` the number of updates before this one (0-based). The first update (n = 0) only records ``J_0``
    and leaves ``t`` and ``m`` unchanged. This follows the authors' code (SakanaAI/TAID,
    ``src/distil_losses/taid.py``: ``update_t`` with Lightning's ``global_step``).

    so ``t`` never falls behind the linear schedule and moves faster while the student improves quickly.
    Defaults follow the paper: ``t_start = 0.4, t_end = 1.0, alpha = 5e-4, beta = 0.99``. ``adaptive=False``
    gives the plain linear schedule. ``state_dict`` / ``load_state_dict`` make it checkpointable.
    """

    def __init__(self, total_steps: int, *, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, adaptive: bool = True, eps: float = 1e-8) -> None:
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise KDistillError(f"TAIDSchedule total_steps: got {total_steps!r}, expected an integer >= 1 "
                                "(the number of optimizer steps of the run).")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise KDistillError(f"TAIDSchedule: got t_start={t_start!r}, t_end={t_end!r}; expected "
                                "0 <= t_start <= t_end <= 1 (paper: 0.4 -> 1.0).")
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta < 1.0):
            raise KDistillError(f"TAIDSchedule: got alpha={alpha!r}, beta={beta!r}; expected alpha in [0, 1] "
                                "and beta in [0, 1) (paper: alpha=5e-4, beta=0.99).")
        self.total_steps, self.t_start, self.t_end = total_steps, float(t_start), float(t_end)
        self.alpha, self.beta, self.adaptive, self.eps = float(alpha), float(beta), bool(adaptive), float(eps)
        self.t = self.t_start
        self.step = 0
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def linear(self, step: int) -> float:
        return self.t_start + (self.t_end - self.t_start) * min(step, self.total_steps) / self.total_steps

    def update(self, loss: float) -> float:
        """Advance one optimizer step given the TAID objective just measured; returns the new ``t``."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise KDistillError(f"TAIDSchedule.update: got a non-finite loss {loss!r}; expected a finite "
                                "number. Check the learning rate / inputs.")
        if self.prev_loss is None:  # the first measurement only sets the reference (as the official code does)
            self.prev_loss = loss
            self.step += 1
            return self.t
        delta = (self.prev_loss - loss) / (self.prev_loss + self.eps)
        self.prev_loss = loss
        lin = self.linear(self.step)  # steps completed before this update: the official `global_step`
        self.step += 1
        if self.adaptive:
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            sig = 1.0 / (1.0 + math.exp(-self.momentum))
            proposal = self.t + self.alpha * sig * (1.0 - self.t)
            self.t = min(self.t_end, max(lin, proposal))
        else:
            self.t = min(self.t_end, lin)
        return self.t

    def state_dict(self) -> dict[str, float | int | None]:
        return {"t": self.t, "step": self.step, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.step = float(state["t"]), int(state["step"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])


def entropy(logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """Shannon entropy ``-sum_v p_v log p_v`` of ``softmax(logits / T)`` (nats), ``0 log 0 = 0``."""
    lp = log_probs(logits, kd_temperature)
    p = lp.exp()
    return -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)


def token_selective(student_logits: Tensor, teacher_logits: Tensor, *, entropy_weight: float = 0.1,
                    kd_temperature: float = 1.0) -> Tensor:
    """Direct (distribution-matching) part of Token-Selective Dual KD (Kim & Baek, 2025/2026, "Explain in
    Your Own Words: Improving Reasoning via Token-Selective Dual Knowledge Distillation", TSD-KD).

    Exactly what is implemented (per token, at temperature ``T``)::

        c_t = max_v softmax(z_t / T)_v,   c_s = max_v softmax(z_s / T)_v     (confidences)
        s   = 1[c_t > c_s]                                                    (selection, no gradient)
        L   = s * KL(p_t || p_s) + entropy_weight * H(p_s)

    Only tokens where the teacher is more confident than the student are distilled; the entropy term keeps
    the student confident everywhere (it is minimised, hence added). The paper's indirect, preference-
    ranking part needs generation and re-ranking and is not a token loss; it is not included here.
    Identical inputs give ``entropy_weight * H(p_s)`` (no token is selected). Shape ``(...,)``.
    """
    _check_pair(student_logits, teacher_logits, "token_selective")
    if not entropy_weight >= 0.0:
        raise KDistillError(f"token_selective entropy_weight: got {entropy_weight!r}, expected a number >= 0.")
    ls = log_probs(student_logits, kd_temperature)
    lt = log_probs(teacher_logits, kd_temperature)
    selected = (lt.amax(-1) > ls.detach().amax(-1)).float()
    out = selected * kl_from_log_probs(lt, ls)
    if entropy_weight:
        ps = ls.exp()
        out = out - entropy_weight * (ps * torch.where(ps > 0, ls, torch.zeros_like(ls))).sum(-1)
    return out


def uld(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the
    Universal Logit Distillation Loss for LLMs").

    Works across tokenizers: the vocabularies may differ in size and meaning. Both distributions are
    sorted in decreasing order, the shorter one is padded with zeros, and the loss is the closed-form
    Wasserstein-1 distance of the paper with uniform transport cost::

        ULD = sum_i | sort(p_s)_i - sort(p_t)_i |

    Leading shapes must agree (align the sequences first, e.g. by truncating both to the shorter answer as
    in the paper); the vocabulary axes ``Vs`` and ``Vt`` may differ. Invariant to permutations of either
    vocabulary; 0 when the sorted distributions coincide. Shape ``(...,)``.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise KDistillError(
            f"uld: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ before the vocabulary axis; expected the same (..., ) "
            "positions. Align the two token sequences (e.g. truncate both to the shorter one) first."
        )
    ps = log_probs(student_logits, kd_temperature).exp().sort(dim=-1, descending=True).values
    pt = log_probs(teacher_logits, kd_temperature).exp().sort(dim=-1, descending=True).values
    vs, vt = ps.shape[-1], pt.shape[-1]
    if vs < vt:
        ps = F.pad(ps, (0, vt - vs))
    elif vt < vs:
        pt = F.pad(pt, (0, vs - vt))
    return (ps - pt).abs().sum(-1)
