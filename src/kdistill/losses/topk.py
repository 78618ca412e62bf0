"""Divergences against cached sparse teacher targets: top-k log-probabilities plus the residual mass, or tokens
sampled from the teacher (:func:`sampled_loss`, an unbiased forward-KL estimate; see the section at the end).

An offline cache (:mod:`kdistill.teachers.cache`) keeps, per token, the teacher's ``k`` largest
log-probabilities at temperature ``T``, their vocabulary indices and ``log r_t``, the log of the
probability mass outside the top k. Distillation then compares *coarsened* distributions over ``k + 1``
categories, the k cached tokens and one "everything else" bucket::

    p_t^k = (p_t[i_1], ..., p_t[i_k], r_t)              r_t = 1 - sum_j p_t[i_j]
    p_s^k = (p_s[i_1], ..., p_s[i_k], r_s)              r_s = 1 - sum_j p_s[i_j]   (exact, not fitted)

and any divergence of :mod:`kdistill.losses.logits` is applied to that pair. Properties (tested):

* ``k = V`` gives exactly the full divergence (the bucket is empty on both sides);
* for the KL family, the coarsened divergence never exceeds the full one and grows monotonically with ``k``
  (data-processing inequality: top-k sets are nested), so it is a tight lower bound that converges to the
  full loss as ``k -> V``;
* the student's gradient reaches every vocabulary entry through ``r_s`` (pushing tail mass down or up as
  a whole), unlike "renormalise over the top k" losses that ignore the tail.

``kd_temperature`` is applied to the student here; the teacher log-probs were taken at the cache's
temperature, which must be the same number (the cache manifest records it, and the method refuses a
mismatch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import KDistillError, unknown_name
from . import logits as L

#: divergences usable on the coarsened (k + 1)-category distributions
DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": L.forward_kl,
    "reverse_kl": L.reverse_kl,
    "generalized_jsd": L.generalized_jsd,
    "skew_kl": L.skew_kl,
    "skew_reverse_kl": L.skew_reverse_kl,
    "tvd": L.tvd,
    "taid": L.taid,
    "token_selective": L.token_selective,
}


def safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` that returns ``-inf`` for all ``-inf`` slices with a zero (not NaN) gradient."""
    shift = x.detach().amax(dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(x - shift).sum(dim)
    return L._safe_log(total) + shift.squeeze(dim)


def teacher_topk(teacher_logits: Tensor, *, k: int, kd_temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` log-probs of ``softmax(teacher_logits / T)``, their indices and the log residual mass.

    Returns ``(topk_logprobs (..., k) fp32, topk_indices (..., k) int64, log_residual (...,) fp32)``. The
    residual is computed exactly (a log-sum-exp over the entries outside the top k), not as ``1 - sum``.
    """
    V = teacher_logits.shape[-1]
    if not (isinstance(k, int) and 1 <= k <= V):
        raise KDistillError(f"top-k k: got {k!r}, expected an integer in [1, {V}] (the vocabulary size).")
    lt = L.log_probs(teacher_logits, kd_temperature)
    values, indices = lt.topk(k, dim=-1)
    rest = lt.scatter(-1, indices, -math.inf)
    return values, indices, safe_logsumexp(rest)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (``-inf`` at ``x = 0``), the stable two-branch form."""
    x = x.clamp_max(0.0)
    small = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.where(small, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(small, torch.full_like(x, -1.0), x)))
    return torch.where(small, a, b)


def teacher_coarse(topk_logprobs: Tensor, log_residual: Tensor | None = None) -> Tensor:
    """The teacher's ``(k + 1)``-category log-distribution ``(..., k + 1)``, renormalised (fp16/bf16 storage
    rounds the stored values, so they rarely sum to exactly 1)."""
    lp = topk_logprobs.float()
    if log_residual is None:
        log_residual = _log1mexp(safe_logsumexp(lp))
    if tuple(log_residual.shape) != tuple(lp.shape[:-1]):
        raise KDistillError(f"log_residual: got shape {tuple(log_residual.shape)}, expected {tuple(lp.shape[:-1])} "
                            "(one value per token).")
    coarse = torch.cat([lp, log_residual.float().unsqueeze(-1)], -1)
    return coarse - safe_logsumexp(coarse).unsqueeze(-1)


def student_coarse(student_logits: Tensor, topk_indices: Tensor, *, kd_temperature: float = 1.0) -> Tensor:
    """The student's log-probs at the teacher's top-k indices plus its exact log mass elsewhere, ``(..., k + 1)``."""
    if tuple(topk_indices.shape[:-1]) != tuple(student_logits.shape[:-1]):
        raise KDistillError(
            f"topk_indices: got shape {tuple(topk_indices.shape)}, expected {tuple(student_logits.shape[:-1])} + (k,) "
            "to match the student logits. Is the cache aligned with this batch (same sequences, same order)?")
    L._check_temperature(kd_temperature)
    return _StudentCoarse.apply(student_logits, topk_indices.long(), float(kd_temperature))


def _index_error(name: str, idx: Tensor, V: int) -> KDistillError:
    """The error for cached ids outside the student's vocabulary (built only once they are known to be)."""
    return KDistillError(f"{name}: got values in [{int(idx.min())}, {int(idx.max())}], expected [0, {V - 1}] (the "
                         "student's vocabulary). The cache was made with a different vocabulary.")


def _out_of_range(idx: Tensor, V: int) -> Tensor:
    """A 0-d bool tensor on ``idx``'s device: is any id outside ``[0, V)``? (read with the other flags of a call,
    so a GPU step waits for the host once)."""
    return ((idx < 0) | (idx >= V)).any()


def _coarse_block(logits: Tensor, idx: Tensor, t: float, e: Tensor, total: Tensor, rest_mass: Tensor,
                  out: Tensor, under: Tensor) -> None:
    """One row block of :class:`_StudentCoarse`'s forward, written into the given output views: ``e`` the
    shifted exponentials with the picked ids zeroed, ``total`` / ``rest_mass`` their sums before / after
    zeroing, ``out`` the k picked log-probs and the rest's, ``under`` the rows whose rest mass underflowed in
    linear space (:func:`_rest_in_log_space` redoes them). No host synchronisation."""
    z = logits.float()
    if t != 1.0:
        z = z / t
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row stays finite here
    torch.sub(z, m, out=e)
    e.exp_()
    total.copy_(e.sum(-1, keepdim=True))
    out[:, :-1] = (z.gather(-1, idx) - m) - L._safe_log(total)  # log p at the picked ids
    e.scatter_(-1, idx, 0.0)
    rest_mass.copy_(e.sum(-1, keepdim=True))  # exact sum over the ids not picked
    out[:, -1:] = L._safe_log(rest_mass) - L._safe_log(total)
    under.copy_(rest_mass == 0)


def _rest_in_log_space(logits: Tensor, idx: Tensor, t: float, e: Tensor, total: Tensor, rest_mass: Tensor,
                       out: Tensor, shifted: Tensor, rows: Tensor) -> None:
    """Rows whose rest mass underflowed in linear space (a very confident student): the rest redone in log space
    with its own shift, so log p(rest) stays finite as in an exact log-sum-exp; there the p_v of the ids not picked
    are below float range and drop out of the gradient's second term (``shifted`` marks the rows)."""
    z = logits[rows].float()
    if t != 1.0:
        z = z / t
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    zr = z.scatter(-1, idx[rows], -math.inf)
    m_r = zr.amax(-1, keepdim=True)
    ok = torch.isfinite(m_r)
    e_r = torch.exp(zr - torch.where(ok, m_r, torch.zeros_like(m_r)))
    mass_r = e_r.sum(-1, keepdim=True)
    rest_r = torch.where(ok, m_r - m + L._safe_log(mass_r) - L._safe_log(total[rows]),
                         torch.full_like(m_r, -math.inf))
    e[rows] = torch.where(ok, e_r, torch.zeros_like(e_r))
    rest_mass[rows] = torch.where(ok, mass_r, torch.zeros_like(mass_r))
    out[rows, -1:] = rest_r
    shifted[rows] = ok


class _StudentCoarse(torch.autograd.Function):
    """``[log p_s at idx..., log p_s(rest)]`` in few passes over the vocabulary, with the analytic gradient.

    Forward: one max, one exp, two sums (the second after zeroing the k picked entries in place, so the rest
    mass is summed exactly, never as ``1 - sum(picked)``). Backward, with ``G = sum(g_picked) + g_rest``:
    ``dz_v = (g_rest [v not picked] / P_rest - G) p_v + g_picked_j [v = idx_j]``, all divided by T.
    The ids' range check and the underflow test are read together at the end, one wait for the host per call
    (the picked ids are clamped meanwhile, so a bad id reaches the clear error, not a device-side assert).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, idx: Tensor, t: float) -> Tensor:  # type: ignore[override]
        V, k = logits.shape[-1], idx.shape[-1]
        lead = logits.shape[:-1]
        zf, idf = logits.reshape(-1, V), idx.reshape(-1, k)
        n = zf.shape[0]
        dev = logits.device
        e = torch.empty((n, V), dtype=torch.float32, device=dev)
        total = torch.empty((n, 1), dtype=torch.float32, device=dev)
        rest_mass = torch.empty((n, 1), dtype=torch.float32, device=dev)
        out = torch.empty((n, k + 1), dtype=torch.float32, device=dev)
        shifted = torch.zeros((n, 1), dtype=torch.bool, device=dev)
        under = torch.empty((n, 1), dtype=torch.bool, device=dev)
        bad = _out_of_range(idf, V)
        ids = idf.clamp(0, max(V - 1, 0))
        # row blocks of ~1 MB (as in forward_kl): the max, exp and both sums of a block run while it is in cache
        rows = L._block_rows(zf)
        for i in range(0, n, rows):
            j = slice(i, i + rows)
            _coarse_block(zf[j], ids[j], t, e[j], total[j], rest_mass[j], out[j], under[j])
        bad_ids, any_under = torch.stack([bad, under.any()]).tolist() if n else (False, False)
        if bad_ids:
            raise _index_error("topk_indices", idf, V)
        if any_under:
            _rest_in_log_space(zf, ids, t, e, total, rest_mass, out, shifted, under.squeeze(1).nonzero().squeeze(1))
        ctx.t, ctx.dtype = t, logits.dtype
        ctx.save_for_backward(e.reshape(*lead, V), total.reshape(*lead, 1), rest_mass.reshape(*lead, 1),
                              out[:, :k].reshape(*lead, k), ids.reshape(idx.shape), shifted.reshape(*lead, 1))
        return out.reshape(*lead, k + 1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        e, total, rest_mass, picked, idx, shifted = ctx.saved_tensors
        g_picked, g_rest = grad[..., :-1], grad[..., -1:]
        g_all = g_picked.sum(-1, keepdim=True) + g_rest
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        safe_rest = torch.where(rest_mass > 0, rest_mass, torch.ones_like(rest_mass))
        coef = (torch.where(rest_mass > 0, g_rest / safe_rest, torch.zeros_like(g_rest))
                - torch.where(shifted, torch.zeros_like(g_all), g_all / safe_total))
        dz = e * coef  # the ids not picked (their e is untouched; picked ids are 0 here)
        dz.scatter_(-1, idx, g_picked - g_all * picked.exp())
        if ctx.t != 1.0:
            dz = dz / ctx.t
        return dz.to(ctx.dtype), None, None


def topk_loss(student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, log_residual: Tensor | None = None,
              *, divergence: str = "forward_kl", kd_temperature: float = 1.0, **divergence_kwargs: Any) -> Tensor:
    """A divergence of :data:`DIVERGENCES` between the coarsened teacher and student distributions.

    ``student_logits (..., V)``; ``topk_logprobs (..., k)`` teacher log-probs at the cache temperature
    (any float dtype); ``topk_indices (..., k)`` (any integer dtype); ``log_residual (...,)`` or ``None`` to
    recover it from the stored log-probs. Extra keywords go to the divergence (``beta``, ``skew``, ``t``,
    ``entropy_weight``). Returns fp32 ``(...,)``, unreduced. Usable under :func:`~kdistill.losses.chunked.chunked`.
    """
    if divergence not in DIVERGENCES:
        raise unknown_name("top-k divergence", divergence, DIVERGENCES,
                           "uld compares whole sorted distributions and has no top-k form.")
    if tuple(topk_logprobs.shape) != tuple(topk_indices.shape):
        raise KDistillError(f"topk_logprobs {tuple(topk_logprobs.shape)} and topk_indices {tuple(topk_indices.shape)}: "
                            "expected the same shape (..., k).")
    s = student_coarse(student_logits, topk_indices, kd_temperature=kd_temperature)
    t = teacher_coarse(topk_logprobs, log_residual)
    # both are normalised log-probs already at the temperature: the divergence runs at T = 1
    return DIVERGENCES[divergence](s, t, kd_temperature=1.0, **divergence_kwargs)


# ------------------------------------------------------------------------------------ sampled sparse targets
# Random-sampling KD ("Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", Anshumann et al.,
# ACL 2025): instead of the k most likely tokens, store N tokens drawn from the teacher. The sparse target
#
#     q(v) = (c_v / N) * p_T(v) / p_prop(v)        c_v = how often v was drawn from p_prop
#
# has E[q(v)] = p_T(v) for every v, so any loss that is linear in the target -- the cross-entropy
# -sum_v q(v) log p_s(v), hence forward KL = CE - H(p_T) -- is an unbiased estimate of the full one, and so is its
# gradient. Top-k targets are biased (the coarsened KL is a lower bound, tested). With the proposal at the
# targets' own temperature the weights are the counts / N: no teacher log-probs need storing.

#: divergences whose value is linear in the teacher distribution (the sampled estimate is unbiased only for these)
SAMPLED_DIVERGENCES = ("forward_kl",)


def teacher_sample(teacher_logits: Tensor, *, samples: int, kd_temperature: float = 1.0,
                   proposal_temperature: float | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Draw ``samples`` tokens per position from ``softmax(teacher_logits / proposal_temperature)`` (with
    replacement; the proposal defaults to ``kd_temperature``, the targets' own distribution) and fold repeats.

    Returns ``(sample_indices (..., N) int64, sample_counts (..., N) int64, log_ratio (..., N) fp32 or None,
    teacher_entropy (...,) fp32)``: the distinct drawn ids in ascending order followed by padding (id 0, count
    0), how often each was drawn (they sum to ``N``), ``log p_T(v) - log p_prop(v)`` at the ids (None when the
    proposal is the targets' distribution: every ratio is 1) and the entropy of ``p_T`` (so the stored targets
    give the forward KL, not only the cross-entropy). :func:`sample_weights` turns them into the target ``q``.
    """
    V = teacher_logits.shape[-1]
    if not (isinstance(samples, int) and 1 <= samples <= 255):
        raise KDistillError(f"sampled targets: samples={samples!r}, expected an integer in [1, 255] (draws per "
                            "token; counts are stored in one byte). 24-64 is typical.")
    L._check_temperature(kd_temperature)
    prop_t = float(kd_temperature if proposal_temperature is None else proposal_temperature)
    if not prop_t > 0:
        raise KDistillError(f"proposal_temperature: got {proposal_temperature!r}, expected a positive number "
                            "(or None: sample at kd_temperature).")
    lead = teacher_logits.shape[:-1]
    lp_t = L.log_probs(teacher_logits.reshape(-1, V), kd_temperature)
    lp_q = lp_t if prop_t == kd_temperature else L.log_probs(teacher_logits.reshape(-1, V), prop_t)
    n = lp_t.shape[0]
    draws = (torch.multinomial(lp_q.exp(), samples, replacement=True, generator=generator) if n
             else lp_t.new_zeros((0, samples), dtype=torch.long))
    ordered = draws.sort(-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = first.cumsum(-1) - 1  # the distinct-id slot of every draw
    counts = torch.zeros_like(ordered).scatter_add_(1, slot, torch.ones_like(ordered))
    ids = torch.zeros_like(ordered).scatter_(1, slot, ordered)  # draws in one slot share their id
    ratio = None
    if lp_q is not lp_t:
        ratio = torch.where(counts > 0, lp_t.gather(-1, ids) - lp_q.gather(-1, ids), torch.zeros_like(lp_t[:, :1]))
        ratio = ratio.reshape(*lead, samples)
    ent = L.entropy(teacher_logits, kd_temperature=kd_temperature)
    return ids.reshape(*lead, samples), counts.reshape(*lead, samples), ratio, ent


def sample_weights(sample_counts: Tensor, log_ratio: Tensor | None = None) -> Tensor:
    """The sparse target ``q`` of :func:`teacher_sample`'s draws, fp32 ``(..., N)``: ``counts / N`` (``N`` = the
    counts' sum per position; all-zero rows, padding, stay 0) times the importance ratio when there is one."""
    c = sample_counts.float()
    w = c / c.sum(-1, keepdim=True).clamp_min(1.0)
    return w if log_ratio is None else w * log_ratio.float().exp()


def sampled_loss(student_logits: Tensor, sample_indices: Tensor, sample_weights: Tensor,
                 teacher_entropy: Tensor | None = None, *, divergence: str = "forward_kl",
                 kd_temperature: float = 1.0) -> Tensor:
    """Unbiased estimate of the forward KL (or, without ``teacher_entropy``, the cross-entropy) against a sampled
    sparse teacher target::

        sum_j w_j * (log Z_s - z_s[i_j] / T)  -  H(p_T)          log Z_s = logsumexp(z_s / T)

    ``student_logits (..., V)``, ``sample_indices (..., m)`` (any integer dtype; slots with weight 0 are padding),
    ``sample_weights (..., m)`` (:func:`sample_weights`), ``teacher_entropy (...,)`` the teacher's entropy at the
    cache temperature. Returns fp32 ``(...,)``, unreduced; usable under :func:`~kdistill.losses.chunked.chunked`
    and :func:`~kdistill.losses.chunked.fused_linear_loss`. ``divergence`` must be one of
    :data:`SAMPLED_DIVERGENCES`: the other divergences are not linear in the teacher distribution, so a sampled
    target would bias them.
    """
    if divergence not in SAMPLED_DIVERGENCES:
        raise KDistillError(f"sampled teacher targets: got divergence {divergence!r}, expected one of "
                            f"{list(SAMPLED_DIVERGENCES)}: only a loss linear in the teacher distribution stays "
                            "unbiased under sampling. Fix: use loss forward_kl, or a top-k cache (cache.mode: topk).")
    lead = tuple(student_logits.shape[:-1])
    if tuple(sample_indices.shape[:-1]) != lead or tuple(sample_weights.shape) != tuple(sample_indices.shape):
        raise KDistillError(f"sampled targets: sample_indices {tuple(sample_indices.shape)} and sample_weights "
                            f"{tuple(sample_weights.shape)}; expected both {lead} + (m,), the student's token shape. "
                            "Is the cache aligned with this batch (same sequences, same order)?")
    idx = sample_indices.long()
    V = student_logits.shape[-1]
    if idx.numel() and bool(_out_of_range(idx, V)):  # one wait for the host, as student_coarse
        raise _index_error("sample_indices", idx, V)
    L._check_temperature(kd_temperature)
    z = student_logits.float()
    if kd_temperature != 1.0:
        z = z / kd_temperature
    w = sample_weights.float()
    nll = safe_logsumexp(z).unsqueeze(-1) - z.gather(-1, idx)
    out = torch.where(w > 0, w * nll, torch.zeros_like(nll)).sum(-1)  # padding never meets a -inf logit
    if teacher_entropy is not None:
        if tuple(teacher_entropy.shape) != lead:
            raise KDistillError(f"teacher_entropy: got shape {tuple(teacher_entropy.shape)}, expected {lead} (one "
                                "value per token).")
        out = out - teacher_entropy.float()
    return out
