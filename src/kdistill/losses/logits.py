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
* Gradients. With a frozen teacher (the usual case: its logits need no gradient) every token-level divergence but
  ``uld`` runs over row blocks and computes the student gradient ``dL/dz_s`` in closed form from the two
  probability vectors (:func:`divergence_rows`); only that gradient is kept for backward, no autograd graph of the
  ``(rows, V)`` intermediates. When the teacher logits need a gradient too, the plain autograd composition runs.
  fp64 inputs are computed in fp64 (so ``torch.autograd.gradcheck`` applies), everything else in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError, unknown_name


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


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """The dtype the divergences compute in: fp32 for half / bf16 / fp32 inputs, fp64 when an input is fp64."""
    dt = torch.float32
    for x in xs:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def _lsm(logits: Tensor, t: float, dt: torch.dtype) -> Tensor:
    """``log_softmax(logits / t)`` in ``dt``."""
    z = logits.to(dt)
    return F.log_softmax(z / t if t != 1.0 else z, dim=-1)


def _kl_parts(student_logits: Tensor, teacher_logits: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(log p_s, p_t, log p_t - log p_s, KL(p_t || p_s))`` at temperature ``t``; the difference is 0
    where ``p_t = 0`` whenever that is needed for a finite KL (0 log 0 = 0 for a teacher-excluded class)."""
    dt = _compute_dtype(student_logits, teacher_logits)
    ls = _lsm(student_logits, t, dt)
    lt = _lsm(teacher_logits, t, dt)
    p = lt.exp()
    diff = lt - ls
    kl = (p * diff).sum(-1)
    if not torch.isfinite(kl).all():
        diff = torch.where(p > 0, diff, torch.zeros_like(diff))
        kl = (p * diff).sum(-1)
    return ls, p, diff, kl


def _check_forward_kl(kl: Tensor, student_logits: Tensor, teacher_logits: Tensor, t: float) -> None:
    """One finiteness check per call; on failure, the offending row's error."""
    pos = _first_non_finite(kl)
    if pos is not None:
        ls = F.log_softmax(student_logits[pos].float() / t, dim=-1)
        lt = F.log_softmax(teacher_logits[pos].float() / t, dim=-1)
        raise _infinite_error("forward_kl", pos, lt, ls, "teacher", "student")


class _ForwardKL(torch.autograd.Function):
    """KL(p_t || p_s) with analytic gradients for both models: ``dKL/dz_s = (p_s - p_t) / T`` and
    ``dKL/dz_t = p_t ((log p_t - log p_s) - KL) / T``. Used when the teacher logits need a gradient (it saves
    ``log p_s``, ``p_t``, ``log p_t - log p_s`` and the KL); with a frozen teacher :func:`forward_kl` runs the
    blocked student-only path of :class:`_Analytic` instead."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:  # type: ignore[override]
        ctx.t = t
        ctx.dtypes = (student_logits.dtype, teacher_logits.dtype)
        ls, p, diff, kl = _kl_parts(student_logits, teacher_logits, t)
        _check_forward_kl(kl, student_logits, teacher_logits, t)
        ctx.save_for_backward(ls, p, diff, kl)
        return kl

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g = grad.unsqueeze(-1) / ctx.t
        ls, p, diff, kl = ctx.saved_tensors
        gs = gt = None
        if ctx.needs_input_grad[0]:
            gs = ((ls.exp() - p) * g).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gt = (p * (diff - kl.unsqueeze(-1)) * g).to(ctx.dtypes[1])
        return gs, gt, None


def _teacher_needs_grad(teacher_logits: Tensor) -> bool:
    """True when autograd must reach the teacher logits (then the plain autograd composition runs)."""
    return torch.is_grad_enabled() and teacher_logits.requires_grad


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """KL(p_teacher || p_student) at temperature T. Shape ``(...,)``. Hinton et al., 2015."""
    _check_pair(student_logits, teacher_logits, "forward_kl")
    _check_temperature(kd_temperature)
    if _teacher_needs_grad(teacher_logits):
        return _ForwardKL.apply(student_logits, teacher_logits, float(kd_temperature))
    return _Analytic.apply("forward_kl", {}, student_logits, teacher_logits, float(kd_temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """KL(p_student || p_teacher) at temperature T (mode-seeking). Shape ``(...,)``."""
    _check_pair(student_logits, teacher_logits, "reverse_kl")
    _check_temperature(kd_temperature)
    if not _teacher_needs_grad(teacher_logits):
        return _Analytic.apply("reverse_kl", {}, student_logits, teacher_logits, float(kd_temperature))
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
    _check_temperature(kd_temperature)
    if not _teacher_needs_grad(teacher_logits):
        return _Analytic.apply("generalized_jsd", {"beta": float(beta)}, student_logits, teacher_logits,
                               float(kd_temperature))
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
    V = student_logits.shape[-1]
    # torch's fused kernel (log-softmax + pick in one op, one backward op): every negative label -> ignored (0)
    out = F.cross_entropy(student_logits.reshape(-1, V).float(), labels.reshape(-1).long().clamp_min(-1),
                          ignore_index=-1, reduction="none")
    return out.reshape(labels.shape)


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
    _check_temperature(kd_temperature)
    if not _teacher_needs_grad(teacher_logits):
        return _Analytic.apply("skew_kl", {"skew": float(skew)}, student_logits, teacher_logits, float(kd_temperature))
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
    _check_temperature(kd_temperature)
    if not _teacher_needs_grad(teacher_logits):
        return _Analytic.apply("skew_reverse_kl", {"skew": float(skew)}, student_logits, teacher_logits,
                               float(kd_temperature))
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
    _check_temperature(kd_temperature)
    if not _teacher_needs_grad(teacher_logits):
        return _Analytic.apply("tvd", {}, student_logits, teacher_logits, float(kd_temperature))
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
    _check_temperature(kd_temperature)
    if not _teacher_needs_grad(teacher_logits):
        return _Analytic.apply("taid", {"t": float(t)}, student_logits, teacher_logits, float(kd_temperature))
    zs = student_logits.float()
    return kl_from_log_probs(log_probs(_taid_target(zs.detach(), teacher_logits.float(), t), kd_temperature),
                             log_probs(zs, kd_temperature))


def _taid_target(zs: Tensor, zt: Tensor, t: float) -> Tensor:
    """TAID's target logits ``(1 - t) * z_s + t * z_t``, with -inf kept as -inf (0 * -inf would be NaN at t = 0 or
    t = 1); ``z_s`` is the student's detached logits."""
    if t == 1.0:
        return zt
    if t == 0.0:
        return zs
    finite = torch.isfinite(zs) & torch.isfinite(zt)
    return torch.where(finite, (1.0 - t) * torch.where(finite, zs, 0.0) + t * torch.where(finite, zt, 0.0),
                       torch.full_like(zt, -math.inf))


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
    _check_temperature(kd_temperature)
    if not _teacher_needs_grad(teacher_logits):
        return _Analytic.apply("token_selective", {"entropy_weight": float(entropy_weight)}, student_logits,
                               teacher_logits, float(kd_temperature))
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


# ------------------------------------------------------------------------------------------------------
# Blocked analytic gradients. With a = z_s / T, p = softmax(a) (student), q = softmax(z_t / T) (teacher) and a
# per-row loss L, the student gradient is dL/dz_s = (1/T) (G - p * sum_v G_v) with G_v = p_v dL/dp_v (the
# softmax Jacobian applied to the derivative in p). Each ``_*_rows`` function below returns the values and
# dL/dz_s of its divergence for a block of rows, written from that closed form:
#
#   forward_kl       KL(q || p)                         dL/da = p - q
#   reverse_kl       KL(p || q)                         dL/da = p (log p - log q - L)
#   generalized_jsd  b KL(q||m) + (1-b) KL(p||m),       dL/dp_v = (1-b) (log p_v - log m_v)
#                    m = b q + (1-b) p
#   skew_kl          KL(q || m), m = a q + (1-a) p      dL/dp_v = -(1-a) q_v / m_v
#   skew_reverse_kl  KL(p || m), m = a p + (1-a) q      dL/dp_v = log p_v - log m_v + 1 - a p_v / m_v
#   tvd              0.5 sum |q - p|                    dL/dp_v = 0.5 sign(p_v - q_v)   (0 where p_v = q_v)
#   taid             KL(r || p), r = softmax(((1-t) sg(z_s) + t z_t) / T)    dL/da = p - r
#   token_selective  s KL(q || p) + w H(p)              dL/da = s (p - q) - w p (log p + H)
#
# (constants inside dL/dp cancel in G - p sum G). Entries with p_v = 0 get a zero gradient, as autograd gives on
# the compositions above. Only the student gradient is formed; with a teacher that needs one the public
# functions run their autograd composition instead.


def _rows_fkl(zs: Tensor, zt: Tensor, t: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    ls, p, _, kl = _kl_parts(zs, zt, t)
    return kl, (ls.exp_().sub_(p) if need_grad else None)


def _softmax_jacobian(p: Tensor, pg: Tensor) -> Tensor:
    """``pg - p * sum(pg)``: dL/da from ``pg = p * dL/dp`` (the log-softmax backward)."""
    return pg - p * pg.sum(-1, keepdim=True)


def _rows_rkl(zs: Tensor, zt: Tensor, t: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    dt = _compute_dtype(zs, zt)
    ls, lt = _lsm(zs, t, dt), _lsm(zt, t, dt)
    p = ls.exp()
    diff = torch.where(p > 0, ls - lt, torch.zeros_like(ls))
    kl = (p * diff).sum(-1)
    return kl, (p * (diff - kl.unsqueeze(-1)) if need_grad else None)


def _rows_jsd(zs: Tensor, zt: Tensor, t: float, need_grad: bool, *, beta: float) -> tuple[Tensor, Tensor | None]:
    if beta == 0.0:
        return _rows_fkl(zs, zt, t, need_grad)
    if beta == 1.0:
        return _rows_rkl(zs, zt, t, need_grad)
    dt = _compute_dtype(zs, zt)
    ls, lt = _lsm(zs, t, dt), _lsm(zt, t, dt)
    log_m = _log_mix(lt, ls, beta)
    out = beta * kl_from_log_probs(lt, log_m) + (1.0 - beta) * kl_from_log_probs(ls, log_m)
    if not need_grad:
        return out, None
    p = ls.exp()
    pg = (1.0 - beta) * p * torch.where(p > 0, ls - log_m, torch.zeros_like(ls))  # m >= (1-b) p > 0 where p > 0
    return out, _softmax_jacobian(p, pg)


def _rows_skew_kl(zs: Tensor, zt: Tensor, t: float, need_grad: bool, *, skew: float) -> tuple[Tensor, Tensor | None]:
    dt = _compute_dtype(zs, zt)
    ls, lt = _lsm(zs, t, dt), _lsm(zt, t, dt)
    log_m = _log_mix(lt, ls, skew)
    out = kl_from_log_probs(lt, log_m)
    if not need_grad:
        return out, None
    p = ls.exp()
    fin = torch.isfinite(log_m)
    # p_v dL/dp_v = -(1 - a) q_v p_v / m_v <= 1 in size (m >= (1 - a) p); 0 where p or q is 0
    pg = torch.where(fin, -(1.0 - skew) * torch.exp(lt + ls - torch.where(fin, log_m, torch.zeros_like(log_m))),
                     torch.zeros_like(ls))
    return out, _softmax_jacobian(p, pg)


def _rows_skew_rkl(zs: Tensor, zt: Tensor, t: float, need_grad: bool, *, skew: float) -> tuple[Tensor, Tensor | None]:
    dt = _compute_dtype(zs, zt)
    ls, lt = _lsm(zs, t, dt), _lsm(zt, t, dt)
    log_m = _log_mix(ls, lt, skew)
    out = kl_from_log_probs(ls, log_m)
    if not need_grad:
        return out, None
    p = ls.exp()
    pos = p > 0
    safe_m = torch.where(pos, log_m, torch.zeros_like(log_m))
    # p_v (log p_v - log m_v - a p_v / m_v); p^2 / m <= p / a
    pg = torch.where(pos, p * (ls - safe_m) - skew * torch.exp(2.0 * torch.where(pos, ls, torch.zeros_like(ls))
                                                               - safe_m), torch.zeros_like(ls))
    return out, _softmax_jacobian(p, pg)


def _rows_tvd(zs: Tensor, zt: Tensor, t: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    dt = _compute_dtype(zs, zt)
    p, q = _lsm(zs, t, dt).exp(), _lsm(zt, t, dt).exp()
    out = 0.5 * (q - p).abs().sum(-1)
    if not need_grad:
        return out, None
    return out, _softmax_jacobian(p, 0.5 * p * torch.sign(p - q))


def _rows_taid(zs: Tensor, zt: Tensor, t: float, need_grad: bool, *, t_interp: float) -> tuple[Tensor, Tensor | None]:
    dt = _compute_dtype(zs, zt)
    ls = _lsm(zs, t, dt)
    lr = _lsm(_taid_target(zs.to(dt), zt.to(dt), t_interp), t, dt)
    out = kl_from_log_probs(lr, ls)
    return out, (ls.exp_().sub_(lr.exp_()) if need_grad else None)


def _rows_token_selective(zs: Tensor, zt: Tensor, t: float, need_grad: bool, *,
                          entropy_weight: float) -> tuple[Tensor, Tensor | None]:
    dt = _compute_dtype(zs, zt)
    ls, lt = _lsm(zs, t, dt), _lsm(zt, t, dt)
    selected = (lt.amax(-1) > ls.amax(-1)).to(dt)
    out = selected * kl_from_log_probs(lt, ls)
    p = ls.exp()
    p_log_p = p * torch.where(p > 0, ls, torch.zeros_like(ls))
    if entropy_weight:
        out = out - entropy_weight * p_log_p.sum(-1)
    if not need_grad:
        return out, None
    grad = selected.unsqueeze(-1) * (p - lt.exp())
    if entropy_weight:  # dH/da = -(p log p + p H)
        grad = grad - entropy_weight * (p_log_p - p * p_log_p.sum(-1, keepdim=True))
    return out, grad


#: name -> (rows function, the public loss (for its keyword names), the keyword's name inside the rows function)
_ROWS = {
    "forward_kl": _rows_fkl, "reverse_kl": _rows_rkl, "generalized_jsd": _rows_jsd, "skew_kl": _rows_skew_kl,
    "skew_reverse_kl": _rows_skew_rkl, "tvd": _rows_tvd, "taid": _rows_taid, "token_selective": _rows_token_selective,
}


def _check_divergence_kwargs(name: str, kw: dict) -> dict:
    """The keywords of divergence ``name`` validated as its public function validates them, renamed for its rows
    function (TAID's ``t`` is ``t_interp`` there, beside the temperature)."""
    allowed = {"forward_kl": (), "reverse_kl": (), "tvd": (), "generalized_jsd": ("beta",), "skew_kl": ("skew",),
               "skew_reverse_kl": ("skew",), "taid": ("t",), "token_selective": ("entropy_weight",)}[name]
    for key in kw:
        if key not in allowed:
            raise unknown_name(f"keyword of {name}", key, allowed or ["(none)"])
    out = {k: float(v) for k, v in kw.items()}
    if name == "generalized_jsd":
        out.setdefault("beta", 0.5)
        if not 0.0 <= out["beta"] <= 1.0:
            raise KDistillError(f"generalized_jsd beta: got {out['beta']!r}, expected a number in [0, 1].")
    elif name in ("skew_kl", "skew_reverse_kl"):
        out.setdefault("skew", 0.1)
        _check_skew(out["skew"], name)
    elif name == "taid":
        if "t" not in out:
            raise KDistillError("taid: got no `t`; expected the interpolation coefficient in [0, 1] (e.g. t=0.5, "
                                "from kdistill.losses.logits.TAIDSchedule).")
        if not 0.0 <= out["t"] <= 1.0:
            raise KDistillError(f"taid t: got {out['t']!r}, expected a number in [0, 1].")
        out["t_interp"] = out.pop("t")
    elif name == "token_selective":
        out.setdefault("entropy_weight", 0.1)
        if not out["entropy_weight"] >= 0.0:
            raise KDistillError(f"token_selective entropy_weight: got {out['entropy_weight']!r}, expected a number "
                                ">= 0.")
    return out


def _infinite_sides(name: str, kw: dict) -> tuple[str, str, str] | None:
    """``(reported name, weighting model, other model)`` for divergences that are infinite (and raise) where the
    weighting model gives mass to an entry the other sets to ``-inf``; None for those that stay finite."""
    if name == "forward_kl" or (name == "generalized_jsd" and kw["beta"] == 0.0):
        return "forward_kl", "teacher", "student"
    if name == "reverse_kl" or (name == "generalized_jsd" and kw["beta"] == 1.0):
        return "reverse_kl", "student", "teacher"
    if name == "skew_kl" and kw["skew"] == 0.0:
        return "skew_kl", "teacher", "student"
    if name == "skew_reverse_kl" and kw["skew"] == 0.0:
        return "skew_reverse_kl", "student", "teacher"
    return None


def divergence_rows(name: str, student_logits: Tensor, teacher_logits: Tensor, *, kd_temperature: float = 1.0,
                    need_grad: bool = True, grad_dtype: torch.dtype | None = None, grad_into: Tensor | None = None,
                    lead: tuple[int, ...] | None = None, offset: int = 0,
                    **kwargs: float) -> tuple[Tensor, Tensor | None]:
    """Values ``(N,)`` and student gradients ``dL/dz_s`` ``(N, V)`` (for a per-row incoming gradient of 1) of the
    divergence ``name`` (a key of :data:`ANALYTIC`) on ``(N, V)`` logits, with the closed forms above.

    Rows are processed in blocks of about :data:`_BLOCK_ELEMENTS` values on CPU (each block's passes stay in
    cache); the gradient is written into one ``(N, V)`` tensor of ``grad_dtype`` (the compute dtype by default), or
    into ``grad_into``, which may be ``student_logits`` itself (each block is read before it is overwritten: one
    ``(N, V)`` tensor less). ``kwargs`` are the divergence's own keywords (``beta``, ``skew``, ``t``,
    ``entropy_weight``), validated as the public function does. A divergence that is infinite at some row raises
    the public function's error; ``lead`` / ``offset`` place that row in the caller's token shape (row
    ``offset + i`` of ``lead``)."""
    if name not in _ROWS:
        raise unknown_name("divergence with an analytic gradient", name, _ROWS)
    _check_temperature(kd_temperature)
    kw = _check_divergence_kwargs(name, kwargs)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise KDistillError(f"divergence_rows: got student {tuple(student_logits.shape)} and teacher "
                            f"{tuple(teacher_logits.shape)}; expected two (N, V) tensors of the same shape.")
    t = float(kd_temperature)
    n = student_logits.shape[0]
    dt = _compute_dtype(student_logits, teacher_logits)
    sides = _infinite_sides(name, kw)

    def raise_at(r: int) -> None:
        pos = (tuple(int(i) for i in torch.unravel_index(torch.tensor(offset + r), tuple(lead)))
               if lead is not None and len(lead) else (offset + r,))
        ls, lt = _lsm(student_logits[r], t, dt), _lsm(teacher_logits[r], t, dt)
        shown, weight, other = sides
        lw, lo = (lt, ls) if weight == "teacher" else (ls, lt)
        raise _infinite_error(shown, pos, lw, lo, weight, other)

    rows_fn = _ROWS[name]
    rows = _block_rows(student_logits)
    if n <= rows and grad_into is None:  # one block (classifier logits, accelerators): no copies into buffers
        values, g = rows_fn(student_logits, teacher_logits, t, need_grad, **kw)
        grad = None
        if need_grad:
            grad = (g / t if t != 1.0 else g).to(grad_dtype or dt)
        if sides is not None and (bad := _first_non_finite(values)) is not None:
            raise_at(bad[0])
        return values.to(dt), grad
    values, grad = torch.empty(n, dtype=dt, device=student_logits.device), None
    if need_grad:
        grad = (grad_into if grad_into is not None else
                torch.empty(student_logits.shape, dtype=grad_dtype or dt, device=student_logits.device))
    # when the gradient overwrites the student logits, an infinite row is reported before its logits are gone
    check_each = sides is not None and grad is not None and grad.data_ptr() == student_logits.data_ptr()
    for i in range(0, n, rows):
        j = slice(i, i + rows)
        v, g = rows_fn(student_logits[j], teacher_logits[j], t, need_grad, **kw)
        values[j] = v
        if check_each and (bad := _first_non_finite(v)) is not None:
            raise_at(i + bad[0])
        if need_grad:
            grad[j] = g / t if t != 1.0 else g
    if sides is not None and (bad := _first_non_finite(values)) is not None:
        raise_at(bad[0])
    return values, grad


class _Analytic(torch.autograd.Function):
    """A divergence of :data:`_ROWS` with its blocked closed-form student gradient (:func:`divergence_rows`):
    forward keeps only ``dL/dz_s`` (the student's shape and dtype); backward is one multiply by the incoming
    per-row gradient. The teacher gets no gradient (the public functions take the autograd path when it needs
    one)."""

    @staticmethod
    def forward(ctx, name: str, kw: dict, student_logits: Tensor, teacher_logits: Tensor,  # type: ignore[override]
                t: float) -> Tensor:
        lead, V = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
        keep = ctx.needs_input_grad[2]
        values, grad = divergence_rows(name, student_logits.reshape(-1, V), teacher_logits.reshape(-1, V),
                                       kd_temperature=t, need_grad=keep, grad_dtype=student_logits.dtype, lead=lead,
                                       **kw)
        ctx.dtype = student_logits.dtype
        if keep:
            ctx.save_for_backward(grad)
        return values.reshape(lead)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (d,) = ctx.saved_tensors
        g = (d.reshape(*grad_out.shape, d.shape[-1]) * grad_out.unsqueeze(-1)).to(ctx.dtype)
        return None, None, g, None, None


#: the token-level divergences with a blocked analytic student gradient: public function -> name
ANALYTIC: dict = {forward_kl: "forward_kl", reverse_kl: "reverse_kl", generalized_jsd: "generalized_jsd",
                  skew_kl: "skew_kl", skew_reverse_kl: "skew_reverse_kl", tvd: "tvd", taid: "taid",
                  token_selective: "token_selective"}
