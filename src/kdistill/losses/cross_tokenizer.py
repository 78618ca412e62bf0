"""Losses between a student and a teacher with different tokenizers (see :mod:`kdistill.data.align` for how the
positions are paired). Pure functions: fp32 (float64 where a probability is subtracted from 1), unreduced.

* :func:`shared_vocab_kl` -- at a pair of positions that read the same text and predict tokens covering the same
  span: KL(teacher || student) over the tokens both vocabularies hold, plus one bucket holding each model's
  probability of every other token of its own vocabulary.
* :func:`span_kl` -- for a span the two tokenisations cut differently: the probability of the span under each
  model is the chain (product) of the probabilities of its own tokens, ``P = prod_k p(x_k | x_<k)``; the loss is
  the KL between the two Bernoulli distributions "the next characters are this span" (yes / no):
  ``P_t log(P_t / P_s) + (1 - P_t) log((1 - P_t) / (1 - P_s))``.
* The sorted-probability ULD (:func:`kdistill.losses.logits.uld`) compares what remains, needing no vocabulary
  correspondence at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import KDistillError
from .logits import log_probs

#: log-probabilities of a span are kept below this (P < 1), so that log(1 - P) stays finite
_MAX_LOG_PROB = -1e-6


def shared_vocab_kl(student_logits: Tensor, teacher_logits: Tensor, *, student_ids: Tensor, teacher_ids: Tensor,
                    kd_temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) on the distributions coarsened to the shared tokens plus one rest bucket.

    ``student_logits (..., Vs)``, ``teacher_logits (..., Vt)`` with the same leading shape; ``student_ids`` /
    ``teacher_ids`` ``(M,)``: entry ``m`` is the same token string in both vocabularies. With ``q`` either model's
    softmax at ``kd_temperature``, the coarsened distribution is ``(q[ids_1], ..., q[ids_M], 1 - sum_m q[ids_m])``.
    0 when the coarsened distributions coincide (same model and tokenizer with the identity map: exactly 0).
    Shape ``(...,)``."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise KDistillError(f"shared_vocab_kl: student_logits {tuple(student_logits.shape)} and teacher_logits "
                            f"{tuple(teacher_logits.shape)} differ before the vocabulary axis; expected the same "
                            "positions (pair them first, see kdistill.data.align).")
    if student_ids.shape != teacher_ids.shape or student_ids.ndim != 1:
        raise KDistillError(f"shared_vocab_kl: got student_ids {tuple(student_ids.shape)} and teacher_ids "
                            f"{tuple(teacher_ids.shape)}; expected two (M,) index tensors of paired tokens.")
    ls = log_probs(student_logits, kd_temperature)[..., student_ids.to(student_logits.device)]
    lt = log_probs(teacher_logits, kd_temperature)[..., teacher_ids.to(teacher_logits.device)]
    pt = lt.exp()
    shared = (pt * torch.where(pt > 0, lt - ls, torch.zeros_like(lt))).sum(-1)
    rest_t = (1.0 - pt.double().sum(-1)).clamp_min(0.0)
    rest_s = (1.0 - ls.exp().double().sum(-1)).clamp_min(1e-12)
    safe_t = torch.where(rest_t > 0, rest_t, torch.ones_like(rest_t))
    rest = torch.where(rest_t > 0, rest_t * (safe_t.log() - rest_s.log()), torch.zeros_like(rest_t))
    return shared + rest.float()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def span_kl(student_log_prob: Tensor, teacher_log_prob: Tensor) -> Tensor:
    """KL(Bernoulli(P_t) || Bernoulli(P_s)) of the span probabilities given as log-probabilities (each the sum of
    the log-probabilities of one model's tokens of the span: the chain rule). Any shape; 0 where they are equal.
    Both are kept at ``log P <= -1e-6`` so that ``log(1 - P)`` is finite."""
    if student_log_prob.shape != teacher_log_prob.shape:
        raise KDistillError(f"span_kl: got student {tuple(student_log_prob.shape)} and teacher "
                            f"{tuple(teacher_log_prob.shape)}; expected one log-probability per span on each side.")
    ls = student_log_prob.double().clamp(max=_MAX_LOG_PROB)
    lt = teacher_log_prob.double().clamp(max=_MAX_LOG_PROB)
    pt = lt.exp()
    return (pt * (lt - ls) + (1.0 - pt) * (_log1mexp(lt) - _log1mexp(ls))).float()
