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

``distractors`` (e.g. hard negatives of held-out triples) join the candidate pool: every query is then ranked
against ``N + M`` candidates, its partner still ``candidates[i]``.

Without pairs (unlabelled texts) there is nothing to retrieve; :func:`evaluate_texts` measures how closely the
student follows the teacher on held-out texts:

* ``cosine_to_teacher`` - mean cosine between the student's and the teacher's vector of each text (same width);
* ``neighbour_agreement_at_k`` (:func:`neighbour_agreement`) - for each held-out text, the share of its ``k``
  nearest other held-out texts under the teacher (cosine) that are also among its ``k`` nearest under the
  student, averaged over the texts: ``mean_i |N_k^T(i) & N_k^S(i)| / k``; 1 = the student finds the teacher's
  neighbours, ``k / (n - 1)`` = chance;
* ``spearman_vs_teacher`` - Spearman correlation of the student's and the teacher's cosine similarities over
  the pairs of distinct held-out texts (works across widths).

:func:`encoder_entry` is one model's entry of the embedding report; :func:`embedding_report_md` the report's
embedding section (retrieval trade-off, mixed sides, product quantisation; or the text agreement figures).
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


def _with_distractors(cand_emb: Tensor, distractors: Tensor | None) -> Tensor:
    if distractors is None or not len(distractors):
        return cand_emb
    if distractors.dim() != 2 or distractors.shape[1] != cand_emb.shape[1]:
        raise KDistillError(f"retrieval: distractor embeddings {tuple(distractors.shape)}; expected (M, "
                            f"{cand_emb.shape[1]}), the candidates' width.")
    return torch.cat([cand_emb, distractors])


def partner_ranks(query_emb: Tensor, cand_emb: Tensor, *, distractors: Tensor | None = None,
                  chunk: int = 1024) -> Tensor:
    """``(N,)`` 1-based rank of each query's partner among all candidates (cosine; ties rank last); ``distractors``
    ``(M, D)`` are extra candidates that are nobody's partner."""
    _check_pairs(query_emb, cand_emb)
    q = F.normalize(query_emb.float(), dim=1)
    c = F.normalize(_with_distractors(cand_emb, distractors).float(), dim=1)
    n = q.shape[0]
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk):
        s = q[start:start + chunk] @ c.T  # (b, N)
        idx = torch.arange(start, min(start + chunk, n))
        pos = s[torch.arange(len(idx)), idx].unsqueeze(1)
        ties = (s == pos).sum(1) - 1  # minus the partner itself
        ranks[idx] = 1 + (s > pos).sum(1) + ties
    return ranks


def retrieval_metrics(query_emb: Tensor, cand_emb: Tensor, *, ks: Sequence[int] = (1, 10),
                      distractors: Tensor | None = None) -> dict[str, float]:
    """``{"recall_at_1": ..., "recall_at_10": ..., "mrr": ...}`` for the pair set (``distractors`` in the pool)."""
    ranks = partner_ranks(query_emb, cand_emb, distractors=distractors).double()
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
def mixed_retrieval(student_q: Tensor, student_c: Tensor, teacher_q: Tensor, teacher_c: Tensor, *,
                    student_d: Tensor | None = None, teacher_d: Tensor | None = None) -> dict[str, float]:
    """Recall@1 and MRR with the sides mixed: ``student_queries`` ranks the teacher's candidate vectors with the
    student's query vectors (a teacher-built index kept, only the query encoder swapped), ``student_candidates``
    ranks the student's candidate vectors with the teacher's queries. Meaningful when the student was trained
    into the teacher's space (same width); ``{}`` when the widths differ. ``student_d`` / ``teacher_d``: the
    distractors' vectors, added to the candidate side of the same encoder."""
    _check_pairs(student_q, student_c)
    _check_pairs(teacher_q, teacher_c)
    if student_q.shape[1] != teacher_q.shape[1]:
        return {}
    out: dict[str, float] = {}
    sides = {"student_queries": (student_q, teacher_c, teacher_d),
             "student_candidates": (teacher_q, student_c, student_d)}
    for name, (q, c, d) in sides.items():
        m = retrieval_metrics(q, c, ks=(1,), distractors=d)
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


def _split(emb: tuple[Tensor, ...], what: str) -> tuple[Tensor, Tensor, Tensor | None]:
    if len(emb) not in (2, 3):
        raise KDistillError(f"evaluate_encoder {what}: got {len(emb)} tensors, expected (query_emb, cand_emb) or "
                            "(query_emb, cand_emb, distractor_emb).")
    return emb[0], emb[1], emb[2] if len(emb) == 3 else None


def evaluate_encoder(model: Encoder, queries: Sequence[str], candidates: Sequence[str], *,
                     teacher_embeddings: tuple[Tensor, ...] | None = None, batch_size: int = 64,
                     throughput_sentences: Sequence[str] | None = None, threads: int | None = None,
                     throughput_repeats: int = 1, ks: Sequence[int] = (1, 10),
                     embeddings: tuple[Tensor, ...] | None = None, distractors: Sequence[str] = ()) -> dict[str, Any]:
    """Retrieval metrics, agreement with the teacher (when its embeddings are given) and throughput.

    Returns a plain dict: ``recall_at_<k>``, ``mrr``, ``sentences_per_second`` (with
    ``throughput_sentences``) and, with ``teacher_embeddings`` ``(query_emb, cand_emb)``,
    ``spearman_vs_teacher``, ``cosine_to_teacher`` (``None`` when widths differ) and the
    :func:`mixed_retrieval` figures (same width only). ``embeddings``
    ``(query_emb, cand_emb)`` skips encoding (throughput is still measured on ``model``). ``distractors``: texts
    added to the candidate pool (nobody's partner); the embedding tuples then carry their vectors third.
    """
    expect(len(queries) == len(candidates) and len(queries) > 0, "pair set sizes", (len(queries), len(candidates)),
           "two non-empty lists of equal length")
    if embeddings is not None:  # already encoded (e.g. cached teacher vectors)
        q, c, d = _split(embeddings, "embeddings")
    else:
        q = model.encode(list(queries), batch_size=batch_size)
        c = model.encode(list(candidates), batch_size=batch_size)
        d = model.encode(list(distractors), batch_size=batch_size) if len(distractors) else None
    out: dict[str, Any] = retrieval_metrics(q, c, ks=ks, distractors=d)
    if teacher_embeddings is not None:
        tq, tc, td = _split(teacher_embeddings, "teacher_embeddings")
        out["spearman_vs_teacher"] = similarity_spearman(q, c, tq, tc)
        cq, cc = mean_cosine(q, tq), mean_cosine(c, tc)
        out["cosine_to_teacher"] = None if cq is None else (cq + cc) / 2
        out.update(mixed_retrieval(q, c, tq, tc, student_d=d, teacher_d=td))
    if throughput_sentences is not None:
        out["sentences_per_second"] = sentences_per_second(model, throughput_sentences, batch_size=batch_size,
                                                           threads=threads, repeats=throughput_repeats)
    return out


# ----------------------------------------------------------------------------------------- unlabelled texts

NEIGHBOUR_K = 10


@torch.no_grad()
def neighbour_agreement(student_emb: Tensor, teacher_emb: Tensor, *, k: int = NEIGHBOUR_K) -> float:
    """``mean_i |N_k^T(i) & N_k^S(i)| / k``: the share of each text's ``k`` nearest other texts (cosine) under the
    teacher that are also among its ``k`` nearest under the student, averaged over the ``n`` texts (rows of both
    matrices are the same texts; widths may differ). ``k`` is capped at ``n - 1``."""
    n = student_emb.shape[0]
    expect(teacher_emb.shape[0] == n and n >= 2, "neighbour_agreement rows", (n, teacher_emb.shape[0]),
           "the same texts on both sides, at least 2")
    k = min(int(k), n - 1)
    expect(k >= 1, "neighbour_agreement k", k, "an integer >= 1")

    def top(x: Tensor) -> Tensor:
        x = F.normalize(x.float(), dim=1)
        sim = x @ x.T
        sim.fill_diagonal_(float("-inf"))  # not itself
        return sim.topk(k, dim=1).indices

    ts, ss = top(teacher_emb), top(student_emb)
    hits = torch.zeros(n, n, dtype=torch.bool)
    hits.scatter_(1, ts, True)
    return float(hits.gather(1, ss).float().sum(1).mean() / k)


@torch.no_grad()
def text_agreement(student_emb: Tensor, teacher_emb: Tensor, *, k: int = NEIGHBOUR_K,
                   max_pairs: int = 1_000_000, seed: int = 0) -> dict[str, Any]:
    """``cosine_to_teacher`` (``None`` when the widths differ), ``neighbour_agreement`` (with ``neighbour_k``) and
    ``spearman_vs_teacher`` over the pairs of distinct texts; see the module docstring."""
    n = student_emb.shape[0]
    s = F.normalize(student_emb.float(), dim=1)
    t = F.normalize(teacher_emb.float(), dim=1)
    iu = torch.triu_indices(n, n, offset=1)
    ps, pt = (s @ s.T)[iu[0], iu[1]], (t @ t.T)[iu[0], iu[1]]
    if ps.numel() > max_pairs:
        pick = torch.randperm(ps.numel(), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        ps, pt = ps[pick], pt[pick]
    return {"cosine_to_teacher": mean_cosine(student_emb, teacher_emb),
            "neighbour_agreement": neighbour_agreement(student_emb, teacher_emb, k=k),
            "neighbour_k": min(int(k), n - 1),
            "spearman_vs_teacher": spearman(ps, pt) if ps.numel() >= 2 else float("nan")}


def evaluate_texts(model: Encoder, texts: Sequence[str], *, teacher_embeddings: Tensor | None = None,
                   batch_size: int = 64, throughput_sentences: Sequence[str] | None = None,
                   threads: int | None = None, throughput_repeats: int = 1, k: int = NEIGHBOUR_K,
                   embeddings: Tensor | None = None) -> dict[str, Any]:
    """What can be measured on unlabelled held-out ``texts``: :func:`text_agreement` with the teacher (when its
    embeddings of the texts are given) and throughput. ``embeddings`` skips encoding."""
    expect(len(texts) >= 2, "held-out texts", len(texts), "at least 2 texts")
    emb = embeddings if embeddings is not None else model.encode(list(texts), batch_size=batch_size)
    out: dict[str, Any] = {}
    if teacher_embeddings is not None:
        out.update(text_agreement(emb, teacher_embeddings, k=k))
    if throughput_sentences is not None:
        out["sentences_per_second"] = sentences_per_second(model, throughput_sentences, batch_size=batch_size,
                                                           threads=threads, repeats=throughput_repeats)
    return out


# ------------------------------------------------------------------------------------------------- report


def encoder_entry(model: Any, *, queries: Sequence[str] = (), candidates: Sequence[str] = (),
                  distractors: Sequence[str] = (), texts: Sequence[str] = (), teacher_embeddings: Any = None,
                  embeddings: Any = None, batch_size: int = 64, threads: int | None = None,
                  throughput: Sequence[str], throughput_repeats: int = 1) -> dict[str, Any]:
    """One model's entry of the embedding report: ``params``, ``embedding_dim``, ``metrics`` (retrieval on the
    held-out pairs, or :func:`evaluate_texts` on held-out ``texts`` when no pairs are given),
    ``sentences_per_second`` and ``latency_ms`` (per batch of ``batch_size``)."""
    from ..models.classifiers import count_params

    common = {"teacher_embeddings": teacher_embeddings, "embeddings": embeddings, "batch_size": batch_size,
              "throughput_sentences": throughput, "threads": threads, "throughput_repeats": throughput_repeats}
    if len(queries):
        m = evaluate_encoder(model, queries, candidates, distractors=distractors, **common)
    else:
        m = evaluate_texts(model, texts, **common)
    sps = m.pop("sentences_per_second")
    return {"params": count_params(model), "embedding_dim": int(model.embedding_dim), "metrics": m,
            "sentences_per_second": sps, "latency_ms": 1000.0 * batch_size / sps}


def embedding_report_md(report: dict[str, Any]) -> str:
    """The embedding section of ``report.md``: the retrieval trade-off (held-out pairs), the mixed sides and the
    product quantisation, or for unlabelled texts the agreement figures and their definitions."""
    s, t = report["student"], report["teacher"]
    if "recall_at_1" not in t["metrics"]:
        return _texts_md(s, t)
    return "\n".join([
        "## Retrieval trade-off (held-out pairs)", "",
        f"- teacher: recall@1 {t['metrics']['recall_at_1']:.4f}, MRR {t['metrics']['mrr']:.4f}, "
        f"{t['sentences_per_second']:.1f} sentences/s",
        f"- student: recall@1 {s['metrics']['recall_at_1']:.4f} ({100 * s['recall_at_1_kept']:.1f}% of the teacher), "
        f"MRR {s['metrics']['mrr']:.4f}, {s['sentences_per_second']:.1f} sentences/s ({s['speedup']:.1f}x)",
        f"- agreement: Spearman {s['metrics']['spearman_vs_teacher']:.4f}, cosine to teacher "
        f"{s['metrics']['cosine_to_teacher'] if s['metrics']['cosine_to_teacher'] is not None else 'n/a'}",
        *_pool_md(report.get("data", {})),
        *_mixed_md(s["metrics"], t["metrics"]["recall_at_1"]),
        *_quantization_md(report.get("quantization")),
    ])


def _pool_md(data: dict[str, Any]) -> list[str]:
    n = data.get("test_negatives")
    return [f"- candidate pool: the {data['test_pairs']} held-out positives and {n} held-out hard negatives"] if n \
        else []


def _texts_md(s: dict[str, Any], t: dict[str, Any]) -> str:
    m = s["metrics"]
    cos = m.get("cosine_to_teacher")
    cos = f"{cos:.4f}" if cos is not None else "n/a (widths differ)"
    return "\n".join([
        "## Agreement with the teacher (held-out texts, no pairs)", "",
        f"- cosine to the teacher's vector of the same text: {cos}",
        f"- neighbour agreement: {m['neighbour_agreement']:.4f} (share of each held-out text's {m['neighbour_k']} "
        "nearest other held-out texts under the teacher that are also among its "
        f"{m['neighbour_k']} nearest under the student, averaged over the texts)",
        f"- Spearman of the pairwise similarities: {m['spearman_vs_teacher']:.4f}",
        f"- speed: {s['sentences_per_second']:.1f} sentences/s vs the teacher's {t['sentences_per_second']:.1f} "
        f"({s['speedup']:.1f}x)",
    ])


def _mixed_md(m: dict[str, Any], teacher_r1: float) -> list[str]:
    if "student_queries_recall_at_1" not in m:
        return []

    def kept(x: float) -> str:
        return f"{100 * x / teacher_r1:.1f}%" if teacher_r1 > 0 else "n/a"

    return [f"- mixed sides: the student's queries against the teacher's index: recall@1 "
            f"{m['student_queries_recall_at_1']:.4f} ({kept(m['student_queries_recall_at_1'])}); the teacher's queries "
            f"against the student's index: {m['student_candidates_recall_at_1']:.4f} "
            f"({kept(m['student_candidates_recall_at_1'])})"]


def _quantization_md(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    lines = ["", f"## Product quantisation ({q['num_subspaces']} x {q['num_centroids']} centroids: "
             f"{q['bytes_per_vector']} bytes per vector instead of {q['dense_bytes_per_vector']}, "
             f"{q['compression']:.0f}x)", "",
             "| candidates | recall@1 | MRR | kept of teacher's recall@1 |", "|---|---:|---:|---:|"]
    for key, label in (("dense", "dense student"), ("kmeans", "PQ, k-means codebooks"),
                       ("distill_vq", "PQ, Distill-VQ codebooks")):
        if key in q:
            m = q[key]
            lines.append(f"| {label} | {m['recall_at_1']:.4f} | {m['mrr']:.4f} | {100 * m['recall_at_1_kept']:.1f}% |")
    return lines
