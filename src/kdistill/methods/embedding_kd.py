"""``embedding_kd``: distil a sentence encoder's embeddings (point-wise, list-wise and relational terms).

The student's and the teacher's outputs are sentence embeddings ``s, t`` of shape ``(B, D)`` (a
:class:`~kdistill.methods.base.ModelOutput` whose ``logits`` holds them). With ``S = cos(s_i, s_j)`` and
``T = cos(t_i, t_j)`` the in-batch similarity matrices (diagonal excluded)::

    L = w_mse    * mean_i ||P s_i - t_i||^2 / D                       (embedding_mse)
      + w_cos    * mean_i (1 - cos(P s_i, t_i))                       (cosine)
      + w_list   * mean_i KL(softmax(T_i / tau) || softmax(S_i / tau))  (listwise_kl; with listwise_queue = K also
                                                                       over the student's own (detached) vectors
                                                                       of the last K training texts, scored
                                                                       against the teacher's of the same texts)
      + w_cross  * mean_i KL(softmax(T_i / tau) || softmax(X_i / tau))  (listwise_kl, X_ij = cos(P s_i, t_j):
                                                                       the student's vector ranks the
                                                                       teacher's other in-batch vectors and,
                                                                       with cross_queue = K, the teacher's
                                                                       vectors of the last K training texts)
      + w_cand   * mean_k KL(softmax(T_k / tau) || softmax(Y_k / tau))  (listwise_kl, Y_kj = cos(t_k, P s_j): the
                                                                       candidate side - every teacher vector k of
                                                                       the batch and of the queue ranks the
                                                                       batch's student vectors j != k as it ranks
                                                                       their teachers)
      + w_margin * mean_i mean_k ((S_ip - S_ik) - (T_ip - T_ik))^2    (margin_mse; p = teacher's top in-batch
                                                                       neighbour of i, k = the others; with
                                                                       hard negatives, a query's p is its
                                                                       positive and k its own negatives)
      + w_dist   * RKD distance + w_angle * RKD angle                 (rkd_distance / rkd_angle)
      + w_token  * mean_i mean_{real tokens k} (1 - cos(Q h_ik, g_ik))  (token_cosine: the student's last hidden
                                                                       states h vs the teacher's g)
      + w_pair   * mean_p (NCE(q_p -> c_p) + NCE(c_p -> q_p)) / 2      (contrastive_nce on the *labels*: rows 2p and
                                                                       2p+1 are a (query, candidate) pair; each
                                                                       side must pick its partner among the
                                                                       batch's other pairs, at kd_temperature)

``P`` is a learned linear projector, created only when the widths differ and a point-wise or cross term is on; it
lives on the method, so it is trained but never exported (give the student its own projection - e.g.
``narrow_encoder`` - when its vectors must live in the teacher's space). The relational terms compare
similarities, so they work across widths without ``P``.

When to use: ``mse`` (or ``cosine``) alone is sentence-transformers' recipe (Reimers & Gurevych, 2020,
"Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation") and is the strongest
single term when the student can match the teacher's space; the list-wise KL (in-batch negatives,
cf. "RocketQAv2", Ren et al., 2021) and Margin-MSE (Hofstätter et al., 2020, "Improving Efficient
Neural Ranking Models with Cross-Architecture Knowledge Distillation") transfer the *ranking* only -
useful for narrow or static students; RKD (Park et al., 2019, "Relational Knowledge Distillation")
matches the geometry. ``cross_queue`` keeps the teacher's vectors of the last ``K`` training texts in a FIFO
queue (a MoCo-style memory; the teacher is frozen, so they never go stale) as extra candidates of the cross term:
each student vector must then reproduce the teacher's similarity distribution over thousands of texts instead of
a batch (cross-batch negatives, Qu et al., 2021, "RocketQA"). The queue costs one ``(B, K)`` score matrix per
step and is saved in checkpoints. The cross term trains the student's vectors as *queries*; ``candidate_weight``
is its transpose, for the *candidate* side a retrieval index stores: the teacher's vectors (the batch's and the
queue's) act as queries, and each must rank the batch's student vectors as it ranks the teacher's vectors of the
same texts, so every student vector is placed relative to thousands of teacher directions per step (the same
score matrix, normalised over the other axis). ``listwise_queue`` gives the student-student list-wise term - the
one that matches how the student is used, queries and index both its own - the same memory: the student's
vectors of the last ``K`` texts, detached, with the teacher's vectors of those texts for the target (a memory
bank, Wu et al., 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"; the stored
student vectors are up to ``K / B`` steps old, so a small learning rate keeps them close to current). The token
term is hidden-state distillation (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural Language
Understanding"): every token's output state, not only their mean, follows the
teacher's - a denser signal for short texts. It needs token states on both sides: ``student.features["tokens"]``
and ``teacher.features["tokens"]`` ``(B, T, H)`` with ``student.extra["attention_mask"]`` ``(B, T)`` (the
``embedding`` task provides them when ``token_weight > 0``, running the teacher live); ``Q`` is a learned
projector when the hidden widths differ. Teacher embeddings alone can be precomputed (``cacheable``).

``pair_weight`` is the one term that does not come from the teacher: when the training rows are (query,
candidate) pairs (the ``embedding`` task's ``data.pairs: true`` lays a batch out as ``[q1, c1, q2, c2, ...]``),
it adds the pairs' own labels as a symmetric in-batch InfoNCE between the student's query and candidate vectors -
the contrastive objective of sentence-transformers' ``MultipleNegativesRankingLoss`` (Henderson et al., 2017,
"Efficient Natural Language Response Suggestion for Smart Reply"; InfoNCE: van den Oord et al., 2018,
"Representation Learning with Contrastive Predictive Coding"), both directions as in CLIP. It is to embedding KD
what the hard-label cross-entropy is to Hinton KD: the teacher's soft ranking plus the ground truth, so the
student can correct the teacher where the labels disagree with it. Uncounted rows (``mask``) drop their pair.

Hard negatives. The student's output may declare its batch layout in ``student.extra["group_size"] = G``: rows
come in groups of ``G`` texts, ``[query, positive, negative_1, ..., negative_{G-2}]`` (the ``embedding`` task's
``data.negative_column`` gives ``G = 3``; without the key, ``pair_weight`` reads pairs, ``G = 2``). With ``G >= 3``:

* the list-wise, cross and candidate terms need no change: a query's row already ranks every other text of the
  batch, its positive and its own hard negatives among them, as the teacher ranks them;
* ``margin_weight``: a query row's Margin-MSE compares the teacher's margins on its own triples
  ``(query, positive, negative_j)`` (Hofstätter et al., 2020, as published); the other rows (positives and
  negatives) keep the in-batch form above;
* ``pair_weight``: each query must pick its positive among the batch's positives *and* hard negatives (the
  hard-negative form of ``MultipleNegativesRankingLoss``); the positive -> query direction is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect
from ..losses.embeddings import (
    cosine,
    embedding_mse,
    listwise_kl,
    margin_mse,
    rkd_angle,
    rkd_distance,
    similarity,
    token_cosine,
)
from ..losses.reduce import masked_mean
from ..losses.relations import contrastive_nce
from ..modules.banks import FifoQueue
from ..registry import METHODS
from .base import Method, ModelOutput, SetupInfo, require_teacher


def _counted(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of ``x`` that count (all without a mask): what a queue or bank stores."""
    return x if mask is None else x[mask.bool()]


def _group_size(student: ModelOutput, default: int) -> int:
    """The rows-per-group layout the student's forward declared (``extra["group_size"]``), else ``default``."""
    return int(student.extra.get("group_size", default))


def _check_groups(b: int, g: int, name: str, weight: float) -> None:
    if g < 2 or b % g:
        layout = "an even number laid out as (query, candidate) pairs [q1, c1, q2, c2, ...]" if g <= 2 else \
            f"a multiple of {g} laid out as groups [query, positive, {g - 2} negative(s)]"
        raise KDistillError(f"embedding_kd {name}={weight}: got a batch of {b} rows, expected {layout}. Use the "
                            f"embedding task with data.pairs: true (or data.negative_column), or set {name}: 0.")


def _off_diagonal(x: Tensor) -> Tensor:
    """``(B, B) -> (B, B - 1)`` without the diagonal."""
    b = x.shape[0]
    keep = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return x[keep].view(b, b - 1)


@METHODS.register("embedding_kd")
class EmbeddingKD(Method):
    """Weighted sum of embedding-distillation terms; see the module docstring for the formula."""

    cacheable = True

    def __init__(self, mse_weight: float = 1.0, cosine_weight: float = 0.0, listwise_weight: float = 0.0,
                 margin_weight: float = 0.0, rkd_distance_weight: float = 0.0, rkd_angle_weight: float = 0.0,
                 kd_temperature: float = 0.05, cross_weight: float = 0.0, token_weight: float = 0.0,
                 cross_queue: int = 0, candidate_weight: float = 0.0, listwise_queue: int = 0,
                 pair_weight: float = 0.0) -> None:
        super().__init__()
        weights = {"mse_weight": mse_weight, "cosine_weight": cosine_weight, "listwise_weight": listwise_weight,
                   "margin_weight": margin_weight, "rkd_distance_weight": rkd_distance_weight,
                   "rkd_angle_weight": rkd_angle_weight, "cross_weight": cross_weight, "token_weight": token_weight,
                   "candidate_weight": candidate_weight, "pair_weight": pair_weight}
        for k, v in weights.items():
            expect(v >= 0, f"embedding_kd {k}", v, "a number >= 0")
        expect(sum(weights.values()) > 0, "embedding_kd weights", weights, "at least one positive weight")
        expect(kd_temperature > 0, "embedding_kd kd_temperature", kd_temperature,
               "a positive number (0.05 suits cosine scores)")
        self.mse_weight, self.cosine_weight = float(mse_weight), float(cosine_weight)
        self.listwise_weight, self.margin_weight = float(listwise_weight), float(margin_weight)
        self.rkd_distance_weight, self.rkd_angle_weight = float(rkd_distance_weight), float(rkd_angle_weight)
        self.kd_temperature, self.cross_weight = float(kd_temperature), float(cross_weight)
        self.token_weight, self.candidate_weight = float(token_weight), float(candidate_weight)
        self.pair_weight = float(pair_weight)
        expect(isinstance(cross_queue, int) and cross_queue >= 0, "embedding_kd cross_queue", cross_queue,
               "an integer >= 0 (0 = in-batch candidates only; e.g. 4096)")
        expect(cross_queue == 0 or cross_weight > 0 or candidate_weight > 0, "embedding_kd cross_queue", cross_queue,
               "0 unless cross_weight or candidate_weight > 0 (the queue only feeds those terms)")
        self.cross_queue = int(cross_queue)
        self.queue: FifoQueue | None = None
        expect(isinstance(listwise_queue, int) and listwise_queue >= 0, "embedding_kd listwise_queue", listwise_queue,
               "an integer >= 0 (0 = in-batch candidates only; e.g. 4096)")
        expect(listwise_queue == 0 or listwise_weight > 0, "embedding_kd listwise_queue", listwise_queue,
               "0 unless listwise_weight > 0 (the queue only feeds the list-wise term)")
        self.listwise_queue = int(listwise_queue)
        self.student_bank: FifoQueue | None = None  # the student's past vectors ...
        self.teacher_bank: FifoQueue | None = None  # ... and the teacher's of the same texts
        self.projector: nn.Module | None = None
        self.token_projector: nn.Module | None = None

    @property
    def uses_token_states(self) -> bool:
        """True when the forward needs token states (``features["tokens"]``) from the student and the teacher."""
        return self.token_weight > 0

    @property
    def needs_pairs(self) -> bool:
        """True with ``pair_weight > 0``: the term reads (query, candidate) rows ``[q1, c1, q2, c2, ...]``."""
        return self.pair_weight > 0

    @property
    def _pointwise(self) -> bool:  # terms that compare student vectors with teacher vectors directly
        return self.mse_weight > 0 or self.cosine_weight > 0 or self.cross_weight > 0 or self.candidate_weight > 0

    def setup(self, info: SetupInfo) -> None:
        s, t = info.student_logits, info.teacher_logits
        if s is None or t is None:
            return
        if self._pointwise and s[-1] != t[-1]:
            self.projector = nn.Linear(s[-1], t[-1], bias=False)
        if self.cross_queue > 0:
            self.queue = FifoQueue(self.cross_queue, t[-1])
        if self.listwise_queue > 0:
            self.student_bank = FifoQueue(self.listwise_queue, s[-1])
            self.teacher_bank = FifoQueue(self.listwise_queue, t[-1])
        st, tt = info.student_features.get("tokens"), info.teacher_features.get("tokens")
        if self.uses_token_states and st is not None and tt is not None and st[-1] != tt[-1]:
            self.token_projector = nn.Linear(st[-1], tt[-1], bias=False)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("embedding_kd", teacher)
        s, t = student.logits, teacher.logits.float().detach()
        mask = batch.get("mask")
        out: dict[str, Tensor] = {}
        b = s.shape[0]
        ranking = b >= 3 and (self.listwise_weight > 0 or self.margin_weight > 0 or self.cross_weight > 0
                              or self.candidate_weight > 0)
        t_sim = _off_diagonal(similarity(t, t)) if ranking else None  # the teacher's in-batch scores, once
        if self._pointwise:
            ps = self.projector(s.float()) if self.projector is not None else s
            bank = self._bank(t) if self.cross_queue > 0 else None  # read before this batch is enqueued
            if self.cross_weight > 0 and t_sim is not None:
                x_sim, target = _off_diagonal(similarity(ps, t)), t_sim
                if bank is not None and len(bank):
                    x_sim = torch.cat([x_sim, similarity(ps, bank)], dim=1)
                    target = torch.cat([target, similarity(t, bank)], dim=1)
                kl = listwise_kl(x_sim, target, kd_temperature=self.kd_temperature)
                out["cross"] = self.cross_weight * masked_mean(kl, mask)
            if self.candidate_weight > 0 and ranking:
                out["candidates"] = self.candidate_weight * self._candidate_term(ps, t, bank, mask)
            if bank is not None and self.training:
                self.queue.push(_counted(t, mask))
            if self.mse_weight > 0:
                out["mse"] = self.mse_weight * masked_mean(embedding_mse(ps, t), mask)
            if self.cosine_weight > 0:
                out["cosine"] = self.cosine_weight * masked_mean(cosine(ps, t), mask)
        if (self.listwise_weight > 0 or self.margin_weight > 0) and t_sim is not None:
            s_sim = _off_diagonal(similarity(s, s))
            if self.listwise_weight > 0:
                x_sim, target = s_sim, t_sim
                if self.listwise_queue > 0:
                    x_sim, target = self._with_student_bank(s, t, x_sim, target, mask)
                kl = listwise_kl(x_sim, target, kd_temperature=self.kd_temperature)
                out["listwise"] = self.listwise_weight * masked_mean(kl, mask)
            if self.margin_weight > 0:
                order = torch.argsort(t_sim, dim=1, descending=True)  # column 0: the teacher's top neighbour
                mm = margin_mse(s_sim.gather(1, order), t_sim.gather(1, order))
                g = _group_size(student, 1)
                if g >= 3:  # query rows: margins on their own (query, positive, negative_j) triples
                    mm = mm.clone()
                    mm[0::g] = self._labelled_margins(s, t, g)
                out["margin"] = self.margin_weight * masked_mean(mm, mask)
        if self.rkd_distance_weight > 0 and b >= 2:
            out["rkd_distance"] = self.rkd_distance_weight * masked_mean(rkd_distance(s, t, mask=mask), mask)
        if self.rkd_angle_weight > 0 and b >= 3:
            out["rkd_angle"] = self.rkd_angle_weight * masked_mean(rkd_angle(s, t, mask=mask), mask)
        if self.pair_weight > 0:
            out["pairs"] = self.pair_weight * self._pair_term(s, mask, _group_size(student, 2))
        if self.uses_token_states:
            out["tokens"] = self.token_weight * masked_mean(self._token_term(student, teacher), mask)
        if not out:  # a batch too small for the chosen relational terms
            out["mse"] = s.float().sum() * 0.0
        if s.shape == t.shape:
            with torch.no_grad():
                self.log("student_teacher_cos", (1 - cosine(s, t)).mean())
        return out

    def _token_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        st, tt = student.features.get("tokens"), teacher.features.get("tokens")
        am = student.extra.get("attention_mask")
        if st is None or tt is None or am is None:
            missing = [n for n, v in (("student.features['tokens']", st), ("teacher.features['tokens']", tt),
                                      ("student.extra['attention_mask']", am)) if v is None]
            raise KDistillError(f"embedding_kd token_weight={self.token_weight}: "
                                f"the forward got no {', '.join(missing)}; "
                                "expected (B, T, H) token states from both models and the (B, T) attention mask. "
                                "The embedding task provides them for transformer students (layer_subset, narrow); "
                                "elsewhere return them in ModelOutput, or set token_weight: 0.")
        if self.token_projector is not None:
            st = self.token_projector(st.float())
        return token_cosine(st, tt.float().detach(), am)

    def _labelled_margins(self, s: Tensor, t: Tensor, g: int) -> Tensor:
        """``(B / g,)`` Margin-MSE of each group's query over ``[positive, negatives]`` (rows ``1..g-1`` of its
        group), student scores against the teacher's."""
        _check_groups(s.shape[0], g, "margin_weight", self.margin_weight)
        gs, gt = s.float().view(-1, g, s.shape[-1]), t.float().view(-1, g, t.shape[-1])

        def scores(x: Tensor) -> Tensor:  # cos(query, [positive, negatives]): (groups, g - 1)
            x = torch.nn.functional.normalize(x, dim=-1)
            return (x[:, :1] * x[:, 1:]).sum(-1)

        return margin_mse(scores(gs), scores(gt))

    def _pair_term(self, s: Tensor, mask: Tensor | None, g: int = 2) -> Tensor:
        """Symmetric in-batch InfoNCE over the (query, candidate) pairs in rows ``(g p, g p + 1)``, mean over the
        pairs whose two rows both count; with ``g >= 3`` the rows ``g p + 2 ...`` (hard negatives) are extra
        candidates of every query."""
        _check_groups(s.shape[0], g, "pair_weight", self.pair_weight)
        q, c = s[0::g], s[1::g]
        negs = torch.cat([s[j::g] for j in range(2, g)]) if g >= 3 else None
        if mask is not None:
            m = mask.bool()
            keep = m[0::g] & m[1::g]
            q, c = q[keep], c[keep]
            if negs is not None:
                negs = negs[torch.cat([m[j::g] for j in range(2, g)])]
        if not len(q) or (len(q) < 2 and (negs is None or not len(negs))):  # no negative at all
            return s.float().sum() * 0.0
        nce = contrastive_nce(q, c, negs, nce_temperature=self.kd_temperature)
        if len(q) < 2:
            return 0.5 * nce.mean()
        return 0.5 * (nce + contrastive_nce(c, q, nce_temperature=self.kd_temperature)).mean()

    def _bank(self, t: Tensor) -> Tensor:
        """The queued teacher vectors ``(n, D)``, ``n <= cross_queue`` (created on first use without ``setup``)."""
        if self.queue is None:  # forward without setup (direct use): size the queue from the teacher's width
            self.queue = FifoQueue(self.cross_queue, t.shape[-1]).to(t.device)
        return self.queue.get()

    def _with_student_bank(self, s: Tensor, t: Tensor, s_sim: Tensor, t_sim: Tensor,
                           mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Append the banked (detached) student vectors as candidates, with the teacher's scores against the same
        texts as targets; then (training only) bank this batch's counted rows."""
        if self.student_bank is None or self.teacher_bank is None:  # direct use without setup
            self.student_bank = FifoQueue(self.listwise_queue, s.shape[-1]).to(s.device)
            self.teacher_bank = FifoQueue(self.listwise_queue, t.shape[-1]).to(t.device)
        sb, tb = self.student_bank.get(), self.teacher_bank.get()
        if len(sb):
            s_sim = torch.cat([s_sim, similarity(s, sb)], dim=1)
            t_sim = torch.cat([t_sim, similarity(t, tb)], dim=1)
        if self.training:
            self.student_bank.push(_counted(s.detach(), mask))
            self.teacher_bank.push(_counted(t, mask))
        return s_sim, t_sim

    def _candidate_term(self, ps: Tensor, t: Tensor, bank: Tensor | None, mask: Tensor | None) -> Tensor:
        """Mean over teacher queries (the batch's counted rows, then the queue's) of the list-wise KL over the
        batch's student vectors as candidates (a query's own text and uncounted rows excluded)."""
        b = t.shape[0]
        queries = t if bank is None or not len(bank) else torch.cat([t, bank])
        cand = torch.ones(len(queries), b, dtype=torch.bool, device=t.device)
        cand[:b] &= ~torch.eye(b, dtype=torch.bool, device=t.device)
        rows = torch.ones(len(queries), dtype=torch.bool, device=t.device)
        if mask is not None:
            cand &= mask.bool()[None, :]
            rows[:b] = mask.bool()
        kl = listwise_kl(similarity(queries, ps), similarity(queries, t), kd_temperature=self.kd_temperature,
                         candidate_mask=cand)
        return kl[rows].mean()
