"""Product quantisation of embeddings, with codebooks learned by distillation (Distill-VQ).

Product quantisation (Jégou, Douze & Schmid, 2011, "Product Quantization for Nearest Neighbor Search")
splits a ``D``-dimensional vector into ``M`` sub-vectors and stores, per sub-vector, the id of its
nearest centroid in a per-subspace codebook of ``K`` entries: ``M`` bytes per vector for ``K <= 256``
instead of ``4 D``. Retrieval then scores a dense query against decoded candidates (asymmetric distance).

The usual codebooks minimise reconstruction error (k-means per subspace). Distill-VQ (Xiao, Liu, Shao,
Lian, Xie et al., 2022, "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling
Knowledge from Dense Embeddings", SIGIR) instead trains them so that the scores of queries against
*quantised* candidates reproduce the teacher's ranking: a list-wise KL between the teacher's softmax over
candidate scores and the one computed with quantised candidates. Assignments are hard (nearest centroid,
recomputed every step); the gradient reaches the selected centroids through the decoded vectors.

Here the data are unlabelled sentences: each batch scores every sentence (dense student embedding, the
query side) against every other sentence of the batch (quantised student embedding, the candidate side),
with the teacher's in-batch cosine scores as targets and the trivial self-pair masked out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect


class ProductQuantizer(nn.Module):
    """``M`` codebooks of ``K`` centroids over ``D / M``-dimensional subspaces (``codebooks``: ``(M, K, D/M)``).

    ``assign(x) -> codes (N, M)``, ``decode(codes) -> (N, D)``, ``forward(x) = decode(assign(x))`` with the
    gradient flowing to the codebooks (not to ``x``). ``bytes_per_vector`` is the storage of one code.
    """

    def __init__(self, dim: int, num_subspaces: int = 32, num_centroids: int = 256) -> None:
        super().__init__()
        expect(int(num_subspaces) >= 1 and int(dim) % int(num_subspaces) == 0, "quantize num_subspaces",
               num_subspaces, f"a divisor of the embedding width {dim}",
               f"Divisors of {dim} near your value: {_divisors_near(int(dim), int(num_subspaces))}.")
        expect(2 <= int(num_centroids) <= 65536, "quantize num_centroids", num_centroids,
               "an integer in [2, 65536] (256 = one byte per subspace)")
        self.dim, self.m, self.k = int(dim), int(num_subspaces), int(num_centroids)
        self.sub = self.dim // self.m
        self.codebooks = nn.Parameter(torch.zeros(self.m, self.k, self.sub))

    @property
    def bytes_per_vector(self) -> int:
        return self.m * math.ceil(math.log2(self.k) / 8)

    def _split(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise KDistillError(f"ProductQuantizer: got embeddings of shape {tuple(x.shape)}, "
                                f"expected (N, {self.dim}).")
        return x.float().reshape(len(x), self.m, self.sub).transpose(0, 1)  # (M, N, sub)

    @torch.no_grad()
    def assign(self, x: Tensor, *, chunk: int = 4096) -> Tensor:
        """``(N, M)`` nearest-centroid ids per subspace (squared L2)."""
        parts = self._split(x)
        cb = self.codebooks.detach()
        cb_sq = cb.pow(2).sum(-1).unsqueeze(1)  # (M, 1, K)
        codes = torch.empty(len(x), self.m, dtype=torch.long, device=x.device)
        for s in range(0, len(x), chunk):
            p = parts[:, s:s + chunk]  # (M, n, sub)
            d = cb_sq - 2 * torch.bmm(p, cb.transpose(1, 2))  # |c|^2 - 2 <p, c>; |p|^2 is constant per row
            codes[s:s + chunk] = d.argmin(-1).T
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        """``(N, D)`` vectors from ``(N, M)`` codes (differentiable with respect to the codebooks)."""
        if codes.dim() != 2 or codes.shape[1] != self.m:
            raise KDistillError(f"ProductQuantizer.decode: got codes of shape {tuple(codes.shape)}, "
                                f"expected (N, {self.m}).")
        rows = torch.arange(self.m, device=codes.device)
        return self.codebooks[rows, codes].reshape(len(codes), self.dim)  # (N, M, sub) -> (N, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.assign(x))

    @torch.no_grad()
    def init_kmeans(self, x: Tensor, *, iters: int = 25, seed: int = 0) -> ProductQuantizer:
        """Lloyd's k-means in every subspace at once (initial centroids: ``K`` distinct random rows)."""
        expect(len(x) >= self.k, "quantize num_centroids", self.k,
               f"at most the number of training vectors ({len(x)})", "Lower num_centroids or give more data.")
        parts = self._split(x)
        g = torch.Generator().manual_seed(seed)
        cb = parts[:, torch.randperm(len(x), generator=g)[: self.k]].clone()  # (M, K, sub)
        self.codebooks.data.copy_(cb)
        for _ in range(iters):
            codes = self.assign(x)  # (N, M)
            for j in range(self.m):
                sums = torch.zeros(self.k, self.sub).index_add_(0, codes[:, j], parts[j])
                counts = torch.bincount(codes[:, j], minlength=self.k).unsqueeze(1).float()
                # an empty cluster keeps its centroid
                self.codebooks.data[j] = torch.where(counts > 0, sums / counts.clamp_min(1), self.codebooks.data[j])
        return self

    @torch.no_grad()
    def reconstruction_error(self, x: Tensor) -> float:
        """Mean squared error per vector of ``decode(assign(x))``."""
        return float((self(x) - x.float()).pow(2).sum(1).mean())


def _divisors_near(n: int, m: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - m))[:4]


def distill_vq_loss(pq: ProductQuantizer, student_emb: Tensor, teacher_emb: Tensor, *,
                    kd_temperature: float = 0.05) -> Tensor:
    """Distill-VQ's list-wise loss on one batch, ``(B,)``: KL between the teacher's softmax over in-batch cosine
    scores and the softmax of the dense student queries against the *quantised* student candidates (the
    self-pair masked). Gradients reach the codebooks only."""
    from ..losses.embeddings import listwise_kl, similarity

    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise KDistillError(f"distill_vq_loss: {student_emb.shape[0]} student and {teacher_emb.shape[0]} teacher "
                            "embeddings; expected the same sentences on both sides.")
    q = student_emb.detach().float()
    s_scores = similarity(q, pq(q), kind="cos")
    t_scores = similarity(teacher_emb.float(), teacher_emb.float(), kind="cos")
    off_diag = ~torch.eye(len(q), dtype=torch.bool, device=q.device)
    return listwise_kl(s_scores, t_scores, kd_temperature=kd_temperature, candidate_mask=off_diag)


def teacher_neighbours(teacher_emb: Tensor, k: int, *, chunk: int = 2048) -> Tensor:
    """``(N, k)`` indices of each row's ``k`` nearest other rows by the teacher's cosine similarity."""
    t = torch.nn.functional.normalize(teacher_emb.float(), dim=1)
    out = torch.empty(len(t), k, dtype=torch.long)
    for s in range(0, len(t), chunk):
        sim = t[s:s + chunk] @ t.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = float("-inf")  # not itself
        out[s:s + chunk] = sim.topk(k, dim=1).indices
    return out


def _batches(n: int, batch_size: int, neighbours: Tensor | None, g: torch.Generator):
    """Index batches for one epoch: a shuffled partition, or (with ``neighbours``) anchors in shuffled order,
    each followed by its teacher neighbours (duplicates dropped) until the batch is full."""
    perm = torch.randperm(n, generator=g)
    if neighbours is None:
        for s in range(0, n - 1, batch_size):
            yield perm[s:s + batch_size]
        return
    per = 1 + neighbours.shape[1]
    anchors = max(1, batch_size // per)
    for s in range(0, n, anchors):
        a = perm[s:s + anchors]
        yield torch.unique(torch.cat([a.unsqueeze(1), neighbours[a]], dim=1).flatten())


def train_distill_vq(pq: ProductQuantizer, student_emb: Tensor, teacher_emb: Tensor, *, epochs: int = 3,
                     batch_size: int = 256, lr: float = 1e-3, kd_temperature: float = 0.05, neighbours: int = 0,
                     seed: int = 0) -> dict[str, Any]:
    """Train the codebooks of ``pq`` (initialise them first, e.g. ``init_kmeans``) with ``distill_vq_loss`` and
    Adam; returns ``{"steps", "seconds", "loss_first_epoch", "loss_last_epoch"}``.

    ``neighbours = k > 0`` builds each batch from anchors and their ``k`` nearest sentences by the teacher, so
    the candidates the loss ranks include the hard ones a real query has to tell apart (Distill-VQ ranks
    each query's top teacher-retrieved candidates); ``0`` uses random in-batch candidates only."""
    expect(batch_size >= 2, "quantize batch_size", batch_size, "an integer >= 2 (in-batch candidates)")
    expect(epochs >= 1, "quantize epochs", epochs, "an integer >= 1")
    expect(0 <= neighbours < min(batch_size, len(student_emb)), "quantize neighbours", neighbours,
           f"an integer in [0, {min(batch_size, len(student_emb)) - 1}] (below batch_size and the data size)")
    nb = teacher_neighbours(teacher_emb, neighbours) if neighbours else None
    opt = torch.optim.Adam(pq.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n, steps, t0 = len(student_emb), 0, time.perf_counter()
    epoch_loss: list[float] = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in _batches(n, batch_size, nb, g):
            if len(idx) < 2:
                continue
            loss = distill_vq_loss(pq, student_emb[idx], teacher_emb[idx], kd_temperature=kd_temperature).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count, steps = total + float(loss.detach()) * len(idx), count + len(idx), steps + 1
        epoch_loss.append(total / max(1, count))
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss_first_epoch": epoch_loss[0],
            "loss_last_epoch": epoch_loss[-1]}


def quantize_student(student: Any, teacher: Any, *, texts: list[str], queries: list[str], candidates: list[str],
                     distractors: Sequence[str] = (), teacher_recall_at_1: float, num_subspaces: int = 32,
                     num_centroids: int = 256, kmeans_iters: int = 25, distill: bool = True, epochs: int = 3,
                     batch_size: int = 256, lr: float = 1e-4, temperature: float = 0.05, neighbours: int = 7,
                     max_train: int | None = 50000, seed: int = 0, encode_batch_size: int = 64,
                     teacher_cached_all: bool = False, output: str | Path | None = None) -> dict[str, Any]:
    """Product-quantise an encoder's candidate embeddings and measure retrieval with dense ``queries`` against
    decoded ``candidates`` (+ ``distractors``, e.g. held-out hard negatives, in the pool): k-means codebooks fitted
    on the student's vectors of at most ``max_train`` of the training ``texts`` (a seeded subset), then, with
    ``distill``, Distill-VQ (:func:`train_distill_vq`) against the teacher's embeddings of the same texts.

    ``teacher_cached_all``: the teacher's embeddings of every text are already cached (training computed them), so
    the subset's rows are read from that cache instead of encoding the subset. Codebooks are saved to
    ``<output>/pq.safetensors`` when ``output`` is given. Returns the figures of the report's ``quantization``."""
    from ..eval.retrieval import retrieval_metrics
    from ..io import save_state_dict_atomic
    from ..teachers.cache import cached_embeddings

    bs = encode_batch_size
    keep = list(range(len(texts)))
    if max_train is not None and len(texts) > max_train:
        keep = sorted(np.random.default_rng(seed).permutation(len(texts))[:max_train].tolist())
    if teacher_cached_all:
        t_train = cached_embeddings(teacher, texts, batch_size=bs)[keep]
        texts = [texts[i] for i in keep]
    else:
        texts = [texts[i] for i in keep]
        t_train = cached_embeddings(teacher, texts, batch_size=bs)
    with torch.no_grad():
        s_train = student.encode(texts, bs)
        s_q, s_c = student.encode(queries, bs), student.encode(candidates, bs)
        s_d = student.encode(list(distractors), bs) if len(distractors) else None
    pq = ProductQuantizer(s_train.shape[1], num_subspaces, num_centroids).init_kmeans(
        s_train, iters=kmeans_iters, seed=seed)

    def kept(m: dict[str, Any]) -> dict[str, Any]:
        m["recall_at_1_kept"] = m["recall_at_1"] / teacher_recall_at_1 if teacher_recall_at_1 > 0 else float("nan")
        return m

    def scored() -> dict[str, Any]:
        m = kept(retrieval_metrics(s_q, pq(s_c).detach(), distractors=None if s_d is None else pq(s_d).detach()))
        m["reconstruction_mse"] = pq.reconstruction_error(s_c)
        return m

    out: dict[str, Any] = {"num_subspaces": pq.m, "num_centroids": pq.k, "bytes_per_vector": pq.bytes_per_vector,
                           "dense_bytes_per_vector": 4 * pq.dim, "compression": 4 * pq.dim / pq.bytes_per_vector,
                           "train_texts": len(texts), "dense": kept(retrieval_metrics(s_q, s_c, distractors=s_d)),
                           "kmeans": scored()}
    if distill:
        out["distill_vq_training"] = train_distill_vq(pq, s_train, t_train, epochs=epochs, batch_size=batch_size,
                                                      lr=lr, kd_temperature=temperature, neighbours=neighbours,
                                                      seed=seed)
        out["distill_vq"] = scored()
    if output is not None:
        save_state_dict_atomic(Path(output) / "pq.safetensors", {"codebooks": pq.codebooks.detach().contiguous()})
    return out
