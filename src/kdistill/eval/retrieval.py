"""Retrieval evaluation of sentence encoders, and teacher-student agreement.

A *pair set* is two aligned lists: ``queries[i]``'s only relevant candidate is ``candidates[i]``; every
query is ranked against all ``N`` candidates by cosine similarity.

* :func:`retrieval_metrics` - recall@k and MRR from embeddings. Ties count *against* the query (a query
  whose partner ties with another candidate is not ranked first), so degenerate encoders (e.g. all-zero
  vectors) score as badly as they are.
* :func:`similarity_spearman` - Spearman correlation of the student's and teacher's query-candidate
  similarities (do they order pairs alike).
* :func:`mean_cosine` - mean cosine between the student's and the teacher's vectors (same width only).
* :func:`mixed_retrieval` - one side encoded by the student, the other by the teacher (same width only): can the
  student encode queries against an index the teacher built, or fill an index the teacher's queries search?
* :func:`sentences_per_second` - encoding throughput with a fixed batch size and thread count.
* :func:`evaluate_encoder` - all of it for one encoder (anything with ``encode(sentences, batch_size)``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError, expect


class Encoder(Protocol):
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> Tensor: ...


def _check_pairs(q: Tensor, c: Tensor) -> None:
    if q.dim() != 2 or c.dim() != 2 or q.shape[0] != c.shape[0] or q.shape[1] != c.shape[1]:
        raise KDistillError(f"retrieval: query embeddings {tuple(q.shape)} and candidate embeddings "
                            f"{tuple(c.shape)}; expected two (N, D) matrices with query i paired to candidate i.")


def partner_ranks(query_emb: Tensor, cand_emb: Tensor, *, chunk: int = 1024) -> Tensor:
    """``(N,)`` 1-based rank of each query's partner among all candidates (cosine; ties rank last)."""
    _check_pairs(query_emb, cand_emb)
    q = F.normalize(query_emb.float(), dim=1)
    c = F.normalize(cand_emb.float(), dim=1)
    n = q.shape[0]
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk):
        s = q[start:start + chunk] @ c.T  # (b, N)
        idx = torch.arange(start, min(start + chunk, n))
        pos = s[torch.arange(len(idx)), idx].unsqueeze(1)
        ties = (s == pos).sum(1) - 1  # minus the partner itself
        ranks[idx] = 1 + (s > pos).sum(1) + ties
    return ranks


def retrieval_metrics(query_emb: Tensor, cand_emb: Tensor, *, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """``{"recall_at_1": ..., "recall_at_10": ..., "mrr": ...}`` for the pair set."""
    ranks = partner_ranks(query_emb, cand_emb).double()
    out = {f"recall_at_{k}": float((ranks <= k).double().mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def _ranks(x: Tensor) -> Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[torch.argsort(x)] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equal-length vectors (ties broken by position)."""
    a, b = a.flatten().double(), b.flatten().double()
    expect(a.numel() == b.numel() and a.numel() >= 2, "spearman inputs", (a.numel(), b.numel()),
           "two vectors of the same length >= 2")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def similarity_spearman(student_q: Tensor, student_c: Tensor, teacher_q: Tensor, teacher_c: Tensor, *,
                        max_pairs: int = 1_000_000, seed: int = 0) -> float:
    """Spearman correlation between student and teacher cosine similarities over query-candidate pairs
    (all ``N^2`` pairs, or a fixed random sample of ``max_pairs`` of them)."""
    n = student_q.shape[0]
    expect(teacher_q.shape[0] == n and student_c.shape[0] == n and teacher_c.shape[0] == n,
           "similarity_spearman sizes", (n, student_c.shape[0], teacher_q.shape[0], teacher_c.shape[0]), "equal")
    s = F.normalize(student_q.float(), dim=1) @ F.normalize(student_c.float(), dim=1).T
    t = F.normalize(teacher_q.float(), dim=1) @ F.normalize(teacher_c.float(), dim=1).T
    s, t = s.flatten(), t.flatten()
    if s.numel() > max_pairs:
        pick = torch.randperm(s.numel(), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        s, t = s[pick], t[pick]
    return spearman(s, t)


def mean_cosine(student_emb: Tensor, teacher_emb: Tensor) -> float | None:
    """Mean cosine between aligned student and teacher vectors; ``None`` when the widths differ."""
    if student_emb.shape != teacher_emb.shape:
        return None
    return float(F.cosine_similarity(student_emb.float(), teacher_emb.float(), dim=1).mean())


@torch.no_grad()
def mixed_retrieval(student_q: Tensor, student_c: Tensor, teacher_q: Tensor, teacher_c: Tensor) -> dict[str, float]:
    """Recall@1 and MRR with the sides mixed: ``student_queries`` ranks the teacher's candidate vectors with the
    student's query vectors (a teacher-built index kept, only the query encoder swapped), ``student_candidates``
    ranks the student's candidate vectors with the teacher's queries. Meaningful when the student was trained
    into the teacher's space (same width); ``{}`` when the widths differ."""
    _check_pairs(student_q, student_c)
    _check_pairs(teacher_q, teacher_c)
    if student_q.shape[1] != teacher_q.shape[1]:
        return {}
    out: dict[str, float] = {}
    sides = {"student_queries": (student_q, teacher_c), "student_candidates": (teacher_q, student_c)}
    for name, (q, c) in sides.items():
        m = retrieval_metrics(q, c, ks=(1,))
        out[f"{name}_recall_at_1"], out[f"{name}_mrr"] = m["recall_at_1"], m["mrr"]
    return out


def sentences_per_second(model: Encoder, sentences: Sequence[str], *, batch_size: int = 64,
                         threads: int | None = None, repeats: int = 1) -> float:
    """Encoding throughput of ``model.encode`` after a warm-up batch, with torch limited to ``threads``
    threads (restored afterwards). Best of ``repeats`` timed passes over ``sentences``."""
    expect(len(sentences) > 0, "sentences_per_second sentences", len(sentences), "a non-empty list")
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        model.encode(list(sentences[:batch_size]), batch_size=batch_size)  # warm-up
        best = 0.0
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model.encode(list(sentences), batch_size=batch_size)
            best = max(best, len(sentences) / max(time.perf_counter() - t0, 1e-9))
        return best
    finally:
        torch.set_num_threads(old)


def evaluate_encoder(model: Encoder, queries: Sequence[str], candidates: Sequence[str], *,
                     teacher_embeddings: tuple[Tensor, Tensor] | None = None, batch_size: int = 64,
                     throughput_sentences: Sequence[str] | None = None, threads: int | None = None,
                     throughput_repeats: int = 1, ks: Sequence[int] = (1, 10),
                     embeddings: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """Retrieval metrics, agreement with the teacher (when its embeddings are given) and throughput.

    Returns a plain dict: ``recall_at_<k>``, ``mrr``, ``sentences_per_second`` (with
    ``throughput_sentences``) and, with ``teacher_embeddings`` ``(query_emb, cand_emb)``,
    ``spearman_vs_teacher``, ``cosine_to_teacher`` (``None`` when widths differ) and the
    :func:`mixed_retrieval` figures (same width only). ``embeddings``
    ``(query_emb, cand_emb)`` skips encoding (throughput is still measured on ``model``).
    """
    expect(len(queries) == len(candidates) and len(queries) > 0, "pair set sizes", (len(queries), len(candidates)),
           "two non-empty lists of equal length")
    if embeddings is not None:  # already encoded (e.g. cached teacher vectors)
        q, c = embeddings
    else:
        q = model.encode(list(queries), batch_size=batch_size)
        c = model.encode(list(candidates), batch_size=batch_size)
    out: dict[str, Any] = retrieval_metrics(q, c, ks=ks)
    if teacher_embeddings is not None:
        tq, tc = teacher_embeddings
        out["spearman_vs_teacher"] = similarity_spearman(q, c, tq, tc)
        cq, cc = mean_cosine(q, tq), mean_cosine(c, tc)
        out["cosine_to_teacher"] = None if cq is None else (cq + cc) / 2
        out.update(mixed_retrieval(q, c, tq, tc))
    if throughput_sentences is not None:
        out["sentences_per_second"] = sentences_per_second(model, throughput_sentences, batch_size=batch_size,
                                                           threads=threads, repeats=throughput_repeats)
    return out
