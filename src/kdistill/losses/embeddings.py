"""Losses between student and teacher sentence embeddings and similarity scores.

Pure functions: student first, teacher second, keyword-only hyper-parameters, fp32 inside, *unreduced*
output (one value per example, shape ``(B,)``). Reduce with :func:`kdistill.losses.reduce.masked_mean`.

Shapes: embeddings ``(B, D)``; score matrices ``(B, N)`` (row ``i`` = one query's scores over ``N``
candidates); margin scores ``(B, 1 + K)`` with the positive in column 0 and ``K`` negatives after it.

* :func:`embedding_mse` / :func:`cosine` - match the teacher's vectors (sentence-transformers'
  ``MSELoss`` recipe, Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual
  using Knowledge Distillation").
* :func:`margin_mse` - match the teacher's score *margins* between a positive and negatives (Hofstätter
  et al., 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
  Distillation").
* :func:`listwise_kl` - KL between the teacher's and the student's softmax over a list of candidate
  scores (in-batch negatives), at temperature ``kd_temperature``.
* :func:`token_cosine` - ``1 - cos`` between the student's and the teacher's *token* states (last hidden layer),
  averaged over real tokens: hidden-state distillation as in TinyBERT (Jiao et al., 2020, "TinyBERT:
  Distilling BERT for Natural Language Understanding"), with a cosine so the scale of the states is free.
* :func:`rkd_distance` / :func:`rkd_angle` - relational terms of Park et al., 2019, "Relational Knowledge
  Distillation": match normalised pairwise distances and triplet angles, so the student's embedding
  space may be rotated, scaled or of another width than the teacher's.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError
from .logits import forward_kl
from .relations import triplet_cosines

Similarity = Literal["cos", "dot"]


def _check_same(student: Tensor, teacher: Tensor, name: str, hint: str = "") -> None:
    if student.shape != teacher.shape:
        raise KDistillError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; expected "
            f"identical shapes.{(' ' + hint) if hint else ''}"
        )


def _check_2d(x: Tensor, name: str, what: str) -> None:
    if x.dim() != 2:
        raise KDistillError(f"{name}: {what} has shape {tuple(x.shape)}; expected a 2-D tensor (B, D) or (B, N).")


_PROJECT_HINT = ("If the student is narrower than the teacher, project it first (the `embedding_kd` method "
                 "has a projector; a narrow student from kdistill.students.encoders projects itself).")


def embedding_mse(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Mean over ``D`` of ``(s - t)^2`` per example: ``(B, D), (B, D) -> (B,)``."""
    _check_same(student_emb, teacher_emb, "embedding_mse", _PROJECT_HINT)
    return (student_emb.float() - teacher_emb.float()).pow(2).flatten(1).mean(1)


def cosine(student_emb: Tensor, teacher_emb: Tensor, *, eps: float = 1e-8) -> Tensor:
    """``1 - cos(s, t)`` per example, in ``[0, 2]``: ``(B, D), (B, D) -> (B,)``. Scale-invariant."""
    _check_same(student_emb, teacher_emb, "cosine", _PROJECT_HINT)
    return 1.0 - F.cosine_similarity(student_emb.float(), teacher_emb.float(), dim=-1, eps=eps)


def token_cosine(student_tokens: Tensor, teacher_tokens: Tensor, attention_mask: Tensor, *,
                 eps: float = 1e-8) -> Tensor:
    """Mean over real tokens of ``1 - cos(s_bt, t_bt)`` per example: ``(B, T, D), (B, T, D), (B, T) -> (B,)``.

    ``attention_mask`` (bool or 0/1) marks the real tokens; padding never counts, and a row without real tokens
    gives 0. Both models must see the same tokens (same tokenizer, same padding)."""
    _check_same(student_tokens, teacher_tokens, "token_cosine", _PROJECT_HINT)
    if student_tokens.dim() != 3:
        raise KDistillError(f"token_cosine: token states have shape {tuple(student_tokens.shape)}; expected "
                            "(B, T, D).")
    if tuple(attention_mask.shape) != tuple(student_tokens.shape[:2]):
        raise KDistillError(f"token_cosine: attention_mask has shape {tuple(attention_mask.shape)}; expected "
                            f"{tuple(student_tokens.shape[:2])} (B, T), the token states' first two dimensions.")
    per_token = 1.0 - F.cosine_similarity(student_tokens.float(), teacher_tokens.float(), dim=-1, eps=eps)
    m = attention_mask.bool()
    per_token = torch.where(m, per_token, per_token.new_zeros(()))
    return per_token.sum(1) / m.sum(1).clamp_min(1)


def token_mse(student_tokens: Tensor, teacher_tokens: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens of ``mean_d (s_btd - t_btd)^2`` per example: ``(B, T, D), (B, T, D), (B, T) -> (B,)``
    (the hidden-state MSE of TinyBERT; :func:`token_cosine`'s masking: padding never counts, no real token -> 0)."""
    _check_same(student_tokens, teacher_tokens, "token_mse", _PROJECT_HINT)
    if student_tokens.dim() != 3 or tuple(attention_mask.shape) != tuple(student_tokens.shape[:2]):
        raise KDistillError(f"token_mse: token states {tuple(student_tokens.shape)}, attention_mask "
                            f"{tuple(attention_mask.shape)}; expected (B, T, D) and (B, T).")
    per_token = (student_tokens.float() - teacher_tokens.float()).pow(2).mean(-1)
    m = attention_mask.bool()
    per_token = torch.where(m, per_token, per_token.new_zeros(()))
    return per_token.sum(1) / m.sum(1).clamp_min(1)


def similarity(queries: Tensor, candidates: Tensor, *, kind: Similarity = "cos") -> Tensor:
    """Score matrix ``(B, N)`` between queries ``(B, D)`` and candidates ``(N, D)`` (fp32).

    ``kind="cos"``: cosine similarity; ``"dot"``: inner product.
    """
    _check_2d(queries, "similarity", "queries")
    _check_2d(candidates, "similarity", "candidates")
    if queries.shape[1] != candidates.shape[1]:
        raise KDistillError(f"similarity: queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)} "
                            "have different widths; expected the same D.")
    q, c = queries.float(), candidates.float()
    if kind == "cos":
        q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    elif kind != "dot":
        raise KDistillError(f"similarity kind: got {kind!r}, expected 'cos' or 'dot'.")
    return q @ c.T


def margin_mse(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """Margin-MSE (Hofstätter et al., 2020): ``mean_k ((s_pos - s_neg_k) - (t_pos - t_neg_k))^2``.

    Scores ``(B, 1 + K)``: column 0 is each query's score with its positive, columns ``1..K`` with its
    negatives. Returns ``(B,)``. Zero whenever the student's margins equal the teacher's, even if the
    raw scores differ by a per-query constant (the student only has to rank like the teacher).
    """
    _check_same(student_scores, teacher_scores, "margin_mse")
    if student_scores.dim() != 2 or student_scores.shape[1] < 2:
        raise KDistillError(
            f"margin_mse: scores have shape {tuple(student_scores.shape)}; expected (B, 1 + K) with K >= 1 "
            "(column 0 = positive, then negatives). Stack them: torch.stack([pos, neg], dim=1)."
        )
    s, t = student_scores.float(), teacher_scores.float()
    s_margin = s[:, :1] - s[:, 1:]
    t_margin = t[:, :1] - t[:, 1:]
    return (s_margin - t_margin).pow(2).mean(1)


def listwise_kl(student_scores: Tensor, teacher_scores: Tensor, *, kd_temperature: float = 1.0,
                candidate_mask: Tensor | None = None) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) over each row of candidate scores: ``(B, N) -> (B,)``.

    With in-batch negatives the scores are ``similarity(queries, candidates)``. ``candidate_mask``
    ``(B, N)`` or ``(N,)`` (bool, True = candidate counts) removes candidates from both softmaxes.
    Zero at equal scores and invariant to adding a per-row constant. Cosine scores live in ``[-1, 1]``,
    so a small ``kd_temperature`` (0.05-0.1) makes the distributions peaked enough to carry signal; the
    loss does not multiply by ``T^2`` (methods decide).
    """
    _check_same(student_scores, teacher_scores, "listwise_kl")
    _check_2d(student_scores, "listwise_kl", "student_scores")
    s, t = student_scores.float(), teacher_scores.float()
    if candidate_mask is not None:
        if candidate_mask.dtype != torch.bool:
            raise KDistillError(f"listwise_kl candidate_mask dtype: got {candidate_mask.dtype}, expected torch.bool "
                                "(True = candidate counts).")
        try:
            m = candidate_mask.expand_as(s)
        except RuntimeError:
            raise KDistillError(f"listwise_kl candidate_mask: got shape {tuple(candidate_mask.shape)}, expected "
                                f"{tuple(s.shape)} or ({s.shape[1]},).") from None
        neg_inf = torch.tensor(float("-inf"), device=s.device)
        s, t = torch.where(m, s, neg_inf), torch.where(m, t, neg_inf)
        # a row with no candidate at all would be NaN; give it loss 0
        empty = ~m.any(1, keepdim=True)
        s, t = torch.where(empty, 0.0, s), torch.where(empty, 0.0, t)
    return forward_kl(s, t, kd_temperature=kd_temperature)


def _pair_mask(mask: Tensor | None, b: int, device: torch.device) -> Tensor:
    """(B, B) bool: pairs of distinct examples that both count."""
    eye = torch.eye(b, dtype=torch.bool, device=device)
    valid = ~eye
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (b,):
            raise KDistillError(f"relational mask: got dtype {mask.dtype} shape {tuple(mask.shape)}, expected a "
                                f"bool tensor of shape ({b},) (True = example counts).")
        valid = valid & mask[:, None] & mask[None, :]
    return valid


def _normalised_distances(x: Tensor, valid: Tensor) -> Tensor:
    sq = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    d = sq.clamp_min(1e-12).sqrt()  # clamp: finite gradients at zero distance (diagonal, duplicates)
    mean = (d * valid).sum() / valid.sum().clamp_min(1)
    return d / mean.clamp_min(1e-12)


def rkd_distance(student_emb: Tensor, teacher_emb: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """RKD distance term (Park et al., 2019): Huber loss between the student's and the teacher's pairwise
    distances, each divided by its mean over the batch. ``(B, Ds), (B, Dt) -> (B,)`` (row ``i`` averages
    over the pairs ``(i, j)``, ``j != i``). Widths may differ. ``mask`` ``(B,)`` drops examples from every
    pair and from the mean distance; a masked (or lone) example gets 0.
    """
    _check_2d(student_emb, "rkd_distance", "student_emb")
    _check_2d(teacher_emb, "rkd_distance", "teacher_emb")
    b = student_emb.shape[0]
    if teacher_emb.shape[0] != b:
        raise KDistillError(f"rkd_distance: batch sizes differ ({b} vs {teacher_emb.shape[0]}); expected equal.")
    valid = _pair_mask(mask, b, student_emb.device)
    ds = _normalised_distances(student_emb.float(), valid)
    dt = _normalised_distances(teacher_emb.float(), valid)
    per_pair = F.smooth_l1_loss(ds, dt, reduction="none")
    per_pair = torch.where(valid, per_pair, per_pair.new_zeros(()))
    return per_pair.sum(1) / valid.sum(1).clamp_min(1)


def rkd_angle(student_emb: Tensor, teacher_emb: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """RKD angle term (Park et al., 2019): Huber loss between the cosines of the angles that every triplet
    ``(i, j, k)`` forms at ``j``, student vs teacher. ``(B, Ds), (B, Dt) -> (B,)`` (row ``j`` averages over
    its triplets with distinct ``i, k != j``). Memory grows as ``B^3``: keep ``B`` modest (<= 256).
    """
    _check_2d(student_emb, "rkd_angle", "student_emb")
    _check_2d(teacher_emb, "rkd_angle", "teacher_emb")
    b = student_emb.shape[0]
    if teacher_emb.shape[0] != b:
        raise KDistillError(f"rkd_angle: batch sizes differ ({b} vs {teacher_emb.shape[0]}); expected equal.")
    pair = _pair_mask(mask, b, student_emb.device)  # [j, i]: i != j, both count
    valid = pair[:, :, None] & pair[:, None, :]  # [j, i, k]
    valid = valid & ~torch.eye(b, dtype=torch.bool, device=student_emb.device)[None]  # i != k
    a_s = triplet_cosines(student_emb.float())
    a_t = triplet_cosines(teacher_emb.float())
    per = F.smooth_l1_loss(a_s, a_t, reduction="none")
    per = torch.where(valid, per, per.new_zeros(()))
    return per.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
