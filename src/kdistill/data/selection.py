"""Data selection before distillation: which training examples are worth the teacher's time.

A recipe's ``data.selection`` (``kdistill select RECIPE --output DIR`` writes the same choice to disk) keeps a
``budget`` of the training pool (``fraction`` of it, or a count) chosen by one of the :data:`SELECTORS`:

* ``random``: a uniform draw at the same budget, the baseline every other strategy is compared with;
* ``miniplm``: difference sampling (Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training Language Models",
  ICLR 2025): the score of a document is ``log p_teacher(x) - log p_reference(x)`` (mean over its tokens), the
  reference a small LM; the top ``budget`` are kept. Text the teacher knows far better than a small model does is
  where the teacher has something to teach; text both find easy (boilerplate) or both find hard (noise) is dropped;
* ``ddk``: domain reweighting (Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
  NeurIPS 2024): domains are sampled in proportion to a smoothed discrepancy factor, the softmax over domains of
  the student's held-out loss divided by the teacher's; during training the factor is recomputed every ``every``
  steps (:class:`DomainSampler` + :class:`DomainReweighter`, a sampler and an ``on_step`` hook of the loop);
* ``pcoreset``: greedy k-center in probability space (Kang et al., "PCoreSet: Effective Active Learning through
  Knowledge Distillation from Vision-Language Models", 2025): each pick is the example whose predicted class
  distribution is farthest (L2) from every distribution already chosen, so the budget covers the simplex;
* ``rad``: robust active distillation (Baykal et al., "Robust Active Distillation", ICLR 2023): query the examples
  the student is least sure of (small margin), but spread the queries as the solution of a game against a teacher
  that gets an estimated share of them wrong (:func:`rad_inclusion`), so no single region of likely teacher mistakes
  takes the budget;
* ``kd3``: shift-aware selection after KD^3 (Tang et al., "Distribution Shift Matters for Knowledge Distillation
  with Webly Collected Images", ICCV 2023): scores from teacher and student on augmented views of each example;
  ``prefer: disagree`` (default) keeps the examples where they disagree most (what the student has not learned),
  ``prefer: confident`` keeps those whose combined teacher + student prediction is most confident (the paper's
  filter against shifted, out-of-distribution web data).

Selectors are functions over tensors and lazy *inputs* a task provides (:data:`INPUTS`: teacher probabilities, a
proxy student trained on a seed slice, per-document log-likelihoods, domain ids, ...); a task passes the inputs it
can give and never names a strategy. Everything here is pure apart from calling those inputs; every random choice
takes a seed.

The real-example choices of dataset distillation live here too (:func:`per_class_random`, :func:`select_by_score`,
:func:`dq_bins` + :func:`sample_across_bins`, the last two after Zhou et al., "Dataset Quantization", ICCV 2023).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from ..errors import KDistillError, expect
from ..registry import SELECTORS

#: what a task may hand to :func:`choose_subset` (all lazy: nothing is computed unless the strategy asks for it)
INPUTS = {
    "teacher_probs": "() -> (N, C) the teacher's class probabilities on the pool",
    "proxy_probs": "(seed indices) -> ((N, C) probabilities of a proxy student trained on the teacher's targets of "
                   "those examples, (S, C) the teacher's probabilities there)",
    "view_probs": "(seed indices, views, seed) -> ((V, N, C) teacher, (V, N, C) proxy-student probabilities on V "
                  "augmented views)",
    "teacher_log_likelihood": "() -> (N,) mean log-likelihood of each document under the teacher",
    "reference_log_likelihood": "(name, train_indices) -> (N,) the same under a reference LM (a given one, or one "
                                "trained here on train_indices)",
    "domains": "() -> ((N,) domain id of each example, the name of each id)",
    "example_losses": "(model or None for the teacher, indices) -> per-example loss (the student's initial model "
                      "when model is 'student')",
}
#: what :func:`choose_subset` itself gives every selector
GIVEN = ("n", "budget", "seed")


# ------------------------------------------------------------------------------------------- budgets

def budget_of(n: int, *, fraction: float | None = None, budget: int | None = None) -> int:
    """How many of ``n`` pool examples to keep: ``budget`` if given, else ``fraction * n`` rounded half up (at least
    one)."""
    expect(isinstance(n, int) and n >= 1, "selection pool size", n, "an integer >= 1 (training examples)")
    if budget is not None:
        expect(isinstance(budget, int) and 1 <= budget <= n, "data.selection.budget", budget,
               f"an integer in [1, {n}] (the pool has {n} training examples)",
               "Fix: lower the budget, or give a fraction instead.")
        return budget
    expect(fraction is not None and 0.0 < fraction <= 1.0, "data.selection.fraction", fraction,
           "a number in (0, 1] (the share of the training pool kept)")
    return max(1, min(n, math.floor(float(fraction) * n + 0.5)))


def top_budget(scores: Tensor, budget: int, *, among: Tensor | None = None) -> Tensor:
    """Indices of the ``budget`` highest ``scores`` ``(N,)`` (NaN never chosen; ties go to the lower index), restricted
    to the positions in ``among`` when given; returned in ascending order."""
    expect(scores.dim() == 1, "scores shape", tuple(scores.shape), "(N,)")
    cand = torch.arange(len(scores)) if among is None else among.long()
    s = scores.double()[cand]
    s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
    expect(0 <= budget <= len(cand), "budget", budget, f"an integer in [0, {len(cand)}]")
    order = torch.sort(-s, stable=True).indices
    return cand[order[:budget]].sort().values


def random_subset(n: int, budget: int, *, seed: int, exclude: Tensor | None = None) -> Tensor:
    """``budget`` indices of ``range(n)`` drawn uniformly without replacement (seeded), avoiding ``exclude``."""
    g = torch.Generator().manual_seed(int(seed))
    pool = torch.arange(n)
    if exclude is not None and len(exclude):
        keep = torch.ones(n, dtype=torch.bool)
        keep[exclude.long()] = False
        pool = pool[keep]
    expect(0 <= budget <= len(pool), "budget", budget, f"an integer in [0, {len(pool)}]")
    return pool[torch.randperm(len(pool), generator=g)[:budget]].sort().values


# ------------------------------------------------------------------------------------------- scores

def miniplm_scores(teacher_log_likelihood: Tensor, reference_log_likelihood: Tensor) -> Tensor:
    """MiniPLM's difference score of each document ``(N,)``: teacher minus reference mean token log-likelihood
    (equivalently the reference's loss minus the teacher's). Large: the teacher knows the text much better than a
    small model."""
    expect(teacher_log_likelihood.shape == reference_log_likelihood.shape and teacher_log_likelihood.dim() == 1,
           "log-likelihood shapes", (tuple(teacher_log_likelihood.shape), tuple(reference_log_likelihood.shape)),
           "two (N,) tensors")
    return teacher_log_likelihood.double() - reference_log_likelihood.double()


def margins(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability of each row of ``probs`` ``(N, C)`` (0 = undecided, 1 = certain)."""
    expect(probs.dim() == 2 and probs.shape[1] >= 2, "probs shape", tuple(probs.shape), "(N, C) with C >= 2")
    top = probs.double().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between the rows of two probability tensors ``(..., C)``."""
    p, q = p.double().clamp_min(0), q.double().clamp_min(0)
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), torch.zeros_like(a)
                           ).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def k_center_greedy(points: Tensor, budget: int, *, centers: Tensor | None = None, first: int | None = None,
                    taken: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Greedy k-center (farthest-first traversal) over the rows of ``points`` ``(N, D)``, Euclidean distance.

    Starts from ``centers`` ``(M, D)`` (already chosen, e.g. labelled examples) or, without them, from row ``first``
    (default 0). Each of the ``budget`` picks is the row with the largest distance to its nearest chosen point; ties
    go to the lower index; rows in ``taken`` (e.g. the rows ``centers`` came from) are never picked. Returns
    ``(picks in order, the distance each pick had when chosen)``. A 2-approximation
    of the minimax cover radius (Gonzalez, 1985)."""
    expect(points.dim() == 2 and len(points) >= 1, "points shape", tuple(points.shape), "(N, D) with N >= 1")
    n = len(points)
    x = points.double()
    picks: list[int] = []
    gaps: list[float] = []
    if centers is not None and len(centers):
        nearest = torch.cdist(x, centers.double().reshape(-1, x.shape[1])).min(1).values
    else:
        start = 0 if first is None else int(first)
        expect(0 <= start < n, "first", first, f"a row index in [0, {n})")
        if budget == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        picks.append(start)
        gaps.append(math.inf)
        nearest = (x - x[start]).norm(dim=1)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[picks] = True
    if taken is not None and len(taken):
        chosen[taken.long()] = True
    expect(0 <= budget <= n - int(chosen.sum()) + len(picks), "budget", budget,
           f"an integer in [0, {n - int(chosen.sum()) + len(picks)}] (the rows not yet taken)")
    while len(picks) < budget:
        d = torch.where(chosen, torch.full_like(nearest, -1.0), nearest)
        k = int(torch.argmax(d))  # argmax returns the first maximum: ties go to the lower index
        picks.append(k)
        gaps.append(float(nearest[k]))
        chosen[k] = True
        nearest = torch.minimum(nearest, (x - x[k]).norm(dim=1))
    return torch.tensor(picks, dtype=torch.long), torch.tensor(gaps, dtype=torch.float64)


def cover_radius(points: Tensor, chosen: Tensor) -> float:
    """The largest distance from a row of ``points`` to its nearest chosen row (what k-center makes small)."""
    x = points.double()
    return float(torch.cdist(x, x[chosen.long()]).min(1).values.max())


def ddk_discrepancy(teacher_loss: Tensor, student_loss: Tensor) -> Tensor:
    """DDK's domain discrepancy factor ``(D,)``: the softmax over domains of ``student_loss / teacher_loss`` (each
    domain's held-out loss ratio). Domains where the student lags the teacher most get the most weight."""
    expect(teacher_loss.shape == student_loss.shape and teacher_loss.dim() == 1, "domain loss shapes",
           (tuple(teacher_loss.shape), tuple(student_loss.shape)), "two (D,) tensors")
    expect(bool((teacher_loss > 0).all()), "teacher domain losses", teacher_loss.tolist(), "positive numbers")
    return torch.softmax(student_loss.double() / teacher_loss.double(), 0)


def ddk_update(previous: Tensor, teacher_loss: Tensor, student_loss: Tensor, *, smoothing: float) -> Tensor:
    """DDK's factor smooth updating: ``psi = previous * exp(discrepancy)``, then
    ``smoothing * psi / sum(psi) + (1 - smoothing) / D``. The uniform share keeps every domain sampled; the product
    with the previous weights keeps the mixture from jumping between evaluations."""
    expect(0.0 <= smoothing <= 1.0, "ddk smoothing", smoothing, "a number in [0, 1] (weight of the new factor)")
    psi = previous.double() * torch.exp(ddk_discrepancy(teacher_loss, student_loss))
    d = len(previous)
    return smoothing * psi / psi.sum() + (1.0 - smoothing) / d


def rad_inclusion(gains: Tensor, budget: int, *, mistakes: int) -> Tensor:
    """Inclusion probabilities ``(N,)`` (each in [0, 1], summing to ``budget``) of Robust Active Distillation's game.

    The learner queries example ``i`` with probability ``p_i`` and gains ``g_i`` (its informativeness) when the
    teacher labels it correctly; an adversary makes the teacher wrong on ``mistakes`` examples, and picks those where
    ``p_i g_i`` is largest. The learner maximises ``sum_i p_i g_i - (the mistakes largest p_i g_i)``. For a level
    ``lam`` the best ``v_i = p_i g_i`` fill the highest gains up to ``min(lam, g_i)`` at cost ``v_i / g_i`` each
    until the budget is spent (a fractional knapsack); the objective is concave in ``lam`` and maximised here by
    ternary search. With ``mistakes = 0`` this is plain margin sampling (the ``budget`` highest gains); with more,
    the budget spreads over more informative examples, each contributing the same ``lam`` (nothing for the
    adversary to aim at)."""
    g = gains.double().clamp_min(0)
    n = len(g)
    expect(0 <= budget <= n, "budget", budget, f"an integer in [0, {n}]")
    expect(isinstance(mistakes, int) and mistakes >= 0, "rad mistakes", mistakes, "an integer >= 0")
    if budget == 0:
        return torch.zeros(n, dtype=torch.float64)
    positive = int((g > 0).sum())
    if positive <= budget:  # every informative example fits: take them all, fill with the rest at random weight
        p = (g > 0).double()
        rest = budget - positive
        if rest:
            p[g <= 0] = rest / max(1, n - positive)
        return p
    order = torch.sort(-g, stable=True).indices
    gs = g[order]

    def fill(lam: float) -> tuple[Tensor, float]:
        v = torch.minimum(torch.full_like(gs, lam), gs)
        cost = torch.where(gs > 0, v / gs.clamp_min(1e-300), torch.zeros_like(gs))
        before = torch.cumsum(cost, 0) - cost
        take = ((budget - before).clamp(min=0) / cost.clamp_min(1e-300)).clamp(max=1.0)
        take = torch.where(cost > 0, take, torch.zeros_like(take))
        vv = v * take
        top = vv.topk(min(mistakes, n)).values.sum() if mistakes else torch.tensor(0.0, dtype=torch.float64)
        return vv, float(vv.sum() - top)

    lo, hi = 0.0, float(gs[0])
    for _ in range(200):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if fill(a)[1] < fill(b)[1]:
            lo = a
        else:
            hi = b
    v, _ = fill(0.5 * (lo + hi))
    p_sorted = torch.where(gs > 0, v / gs.clamp_min(1e-300), torch.zeros_like(gs)).clamp(0, 1)
    p_sorted[p_sorted < 1e-9] = 0.0  # the search ends within ~1e-15 of the optimum: snap its rounding
    p_sorted[p_sorted > 1 - 1e-9] = 1.0
    slack = budget - float(p_sorted.sum())  # then restore the exact budget: add to the most informative entries
    order_fix = range(n) if slack > 0 else reversed(range(n))  # with room, or take from the least informative
    for i in order_fix:
        if abs(slack) <= 1e-12:
            break
        if slack > 0 and gs[i] > 0 and p_sorted[i] < 1:
            step = min(1.0 - float(p_sorted[i]), slack)
        elif slack < 0 and p_sorted[i] > 0:
            step = -min(float(p_sorted[i]), -slack)
        else:
            continue
        p_sorted[i] += step
        slack -= step
    p = torch.zeros(n, dtype=torch.float64)
    p[order] = p_sorted
    return p


def systematic_sample(probs: Tensor, *, seed: int) -> Tensor:
    """Exactly ``round(sum(probs))`` distinct indices, each included with probability ``probs[i]`` (systematic
    sampling over a seeded random order: one uniform offset, then every unit step). Ascending order."""
    p = probs.double()
    expect(bool(((p >= -1e-9) & (p <= 1 + 1e-9)).all()), "inclusion probabilities", "values outside [0, 1]",
           "numbers in [0, 1]")
    total = float(p.sum())
    k = round(total)
    expect(abs(total - k) < 1e-6, "inclusion probabilities", total, "a whole number in total (the budget)")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(p), generator=g)
    cum = torch.cumsum(p[perm].clamp(0, 1), 0)
    u = float(torch.rand(1, generator=g, dtype=torch.float64))
    marks = u + torch.arange(k, dtype=torch.float64)
    pos = torch.searchsorted(cum, marks, right=True).clamp(max=len(p) - 1)
    out = perm[pos].unique()
    if len(out) < k:  # rounding at the very end of the cumulative sum: top up with the largest remaining
        left = torch.ones(len(p), dtype=torch.bool)
        left[out] = False
        extra = top_budget(torch.where(left, p, torch.full_like(p, math.nan)), k - len(out))
        out = torch.cat([out, extra])
    return out.sort().values


# --------------------------------------------------------------------------------------------- domains

#: the KJV's traditional divisions, by book (the abbreviations of ``bible -f``)
KJV_DIVISIONS = {
    "law": ("Ge", "Exo", "Lev", "Num", "Deu"),
    "history": ("Josh", "Jdgs", "Ruth", "1Sm", "2Sm", "1Ki", "2Ki", "1Chr", "2Chr", "Ezra", "Neh", "Est"),
    "poetry": ("Job", "Psa", "Prv", "Eccl", "SSol"),
    "prophets": ("Isa", "Jer", "Lam", "Eze", "Dan", "Hos", "Joel", "Amos", "Obad", "Jonah", "Mic", "Nahum", "Hab",
                 "Zep", "Hag", "Zec", "Mal"),
    "gospels_acts": ("Mat", "Mark", "Luke", "John", "Acts"),
    "epistles": ("Rom", "1Cor", "2Cor", "Gal", "Eph", "Phi", "Col", "1Th", "2Th", "1Tim", "2Tim", "Titus", "Phmn",
                 "Heb", "Jas", "1Pet", "2Pet", "1Jn", "2Jn", "3Jn", "Jude"),
    "revelation": ("Rev",),
}
#: built-in domain groups of each corpus (``data.selection.groups``)
GROUPS = {"kjv": ("division", "testament", "book"), "wordnet": ("pos",)}
OTHER = "other"


def corpus_domain_map(name: str, group: str | None) -> tuple[dict[str, str], str]:
    """``({text: domain}, group)`` for a built-in corpus: KJV verses by ``division`` (default), ``testament`` or
    ``book``; WordNet texts by part of speech (``pos``). Texts not in the map (e.g. inserted canaries) are
    :data:`OTHER`."""
    if name not in GROUPS:
        raise KDistillError(f"data.selection.groups: corpus {name!r} has no built-in domains; expected data.name one "
                            f"of {', '.join(GROUPS)}, or your own files with data.selection.domain_column.")
    group = group or GROUPS[name][0]
    expect(group in GROUPS[name], "data.selection.groups", group, f"one of {', '.join(GROUPS[name])} for {name}")
    out: dict[str, str] = {}
    if name == "kjv":
        from .text import kjv_verses

        division = {b: d for d, books in KJV_DIVISIONS.items() for b in books}
        new = set(KJV_DIVISIONS["gospels_acts"] + KJV_DIVISIONS["epistles"] + KJV_DIVISIONS["revelation"])
        for book, _, _, text in kjv_verses():
            label = {"book": book, "division": division.get(book, OTHER),
                     "testament": "new" if book in new else "old"}[group]
            out.setdefault(text, label)
    else:
        from .text import wordnet_pairs

        for p in wordnet_pairs(examples=True):
            out.setdefault(f"{p.query}: {p.candidate}", p.group)
    return out, group


def corpus_item_domains(*, name: str, items: Sequence[Any], groups: str | None = None,
                        domain_column: str | None = None, files: Any = None, format: str = "auto",
                        hf_dataset: Mapping[str, Any] | None = None, eval_fraction: float = 0.05) -> list[str]:
    """The domain label of each training item of an LM corpus: the ``domain_column`` of your own files (the rows
    read exactly as the corpus reads them), or a built-in grouping (:func:`corpus_domain_map`)."""
    if not isinstance(items, Sequence):
        raise KDistillError("data.selection: domains need the training texts as a list; a streamed corpus "
                            "(data.stream) has none. Fix: remove stream, or use a strategy without domains.")
    if domain_column is not None:
        if name != "files":
            raise KDistillError(f"data.selection.domain_column: got {domain_column!r} with data.name {name!r}; "
                                "expected your own files (data.files or data.hf_dataset). Built-in corpora have "
                                "data.selection.groups instead.")
        from .files import load_rows

        rows = load_rows(files=files, format=format, hf_dataset=hf_dataset, validation_fraction=eval_fraction,
                         test_fraction=0.0, seed=0, columns=[domain_column])["train"]
        if len(rows) != len(items):
            raise KDistillError(f"data.selection.domain_column: {len(rows)} training rows, {len(items)} training "
                                "texts; expected one domain per text (texts inserted by data.canaries have none). "
                                "Fix: remove canaries, or use a strategy without domains.")
        return [str(r[domain_column]) for r in rows]
    if name not in GROUPS:
        raise KDistillError(f"data.selection: strategy needs domains, and data.name {name!r} has no built-in groups; "
                            "expected data.selection.domain_column (a column of your files naming each row's domain) "
                            f"or a built-in corpus ({', '.join(GROUPS)}).")
    lookup, _ = corpus_domain_map(name, groups)
    return [lookup.get(x, OTHER) if isinstance(x, str) else OTHER for x in items]


def subset_dataset(dataset: Any, indices: Tensor) -> Any:
    """The rows ``indices`` of a :class:`~kdistill.data.loaders.TensorDictDataset`, as a new one."""
    from .loaders import TensorDictDataset

    return TensorDictDataset(**{k: v[indices.long()] for k, v in dataset.tensors.items()})


def domain_ids(labels: Sequence[str]) -> tuple[Tensor, list[str]]:
    """``(ids (N,), names)``: integer ids of string domain labels, names sorted."""
    names = sorted(set(labels))
    lookup = {n: i for i, n in enumerate(names)}
    return torch.tensor([lookup[x] for x in labels], dtype=torch.long), names


def drop_empty_domains(ids: Tensor, names: Sequence[str]) -> tuple[Tensor, list[str]]:
    """``(ids, names)`` with the domains no example has removed and the ids renumbered in the same order (a
    corpus cut to its first ``train_tokens`` holds only some of its books; DDK weighs the domains of the pool)."""
    used = torch.unique(ids)
    remap = torch.full((len(names),), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    return remap[ids], [names[i] for i in used.tolist()]


def block_domains(token_lists: Iterable[Sequence[int]], item_domains: Sequence[int], *, block_length: int,
                  eos_id: int | None, max_blocks: int | None, num_domains: int) -> Tensor:
    """The domain of each packed block ``(N,)``: the domain most of its tokens come from (ties: the lower id).

    Packs exactly like :func:`kdistill.data.lm.pack_blocks` (an EOS after each text, the EOS counted with its text),
    so block ``i`` here is block ``i`` of the training data."""
    from .lm import BlockPacker

    ids_packer = BlockPacker(block_length, eos_id=None, max_blocks=max_blocks)
    for ids, d in zip(token_lists, item_domains, strict=False):
        ids_packer.add([int(d)] * (len(ids) + (1 if eos_id is not None else 0)))
        if ids_packer.full:
            break
    tags = ids_packer.tensor()
    counts = torch.zeros(len(tags), num_domains, dtype=torch.long)
    counts.scatter_add_(1, tags, torch.ones_like(tags))
    return counts.argmax(1)


def domain_sizes(domains: Tensor, num_domains: int) -> Tensor:
    return torch.bincount(domains.long(), minlength=num_domains)


def allocate(weights: Tensor, budget: int, capacity: Tensor) -> Tensor:
    """Integer counts per domain summing to ``budget``, proportional to ``weights`` (largest remainders), never more
    than ``capacity``; what a full domain cannot take goes to the others by weight."""
    w = weights.double().clamp_min(0)
    cap = capacity.long()
    expect(int(cap.sum()) >= budget, "budget", budget, f"at most the {int(cap.sum())} examples available")
    counts = torch.zeros(len(w), dtype=torch.long)
    left = budget
    open_ = cap > 0
    while left > 0:
        ww = torch.where(open_, w, torch.zeros_like(w))
        if float(ww.sum()) <= 0:
            ww = open_.double()
        share = ww / ww.sum() * left
        base = torch.minimum(share.floor().long(), cap - counts)
        counts += base
        left -= int(base.sum())
        rem = torch.where(open_ & (counts < cap), share - share.floor(), torch.full_like(share, -1.0))
        for d in torch.sort(-rem, stable=True).indices.tolist():
            if left == 0 or rem[d] < 0:
                break
            counts[d] += 1
            left -= 1
        open_ = counts < cap
        if not bool(open_.any()):
            break
    return counts


class DomainSampler(Sampler[int]):
    """Draws ``draws`` pool indices per epoch from the rows ``among`` (default: all but ``exclude``): each draw picks
    a domain by the current ``weights``, then the next row of that domain in a seeded shuffle (reshuffled when the
    domain runs out). ``weights`` may change while an epoch is being drawn (DDK's :class:`DomainReweighter` updates
    them every few steps); the order depends only on the seed, the epoch and the weights at each draw. The sampler
    logs when, in draws, the weights changed during the current epoch (:meth:`state_dict`), so a resumed run that
    re-draws the epoch's first batches to skip them replays the same changes at the same draws and continues with
    exactly the indices the interrupted run would have drawn. ``subset = True``: it covers part of the dataset by
    design."""

    subset = True

    def __init__(self, domains: Tensor, *, draws: int, seed: int, weights: Tensor | None = None,
                 exclude: Tensor | None = None, among: Tensor | None = None) -> None:
        self.domains = domains.long().cpu()
        self.num_domains = len(weights) if weights is not None else int(self.domains.max()) + 1
        mask = torch.ones(len(self.domains), dtype=torch.bool)
        if among is not None:
            mask = torch.zeros(len(self.domains), dtype=torch.bool)
            mask[among.long()] = True
        if exclude is not None and len(exclude):
            mask[exclude.long()] = False
        self.members = [torch.nonzero(mask & (self.domains == d)).squeeze(1) for d in range(self.num_domains)]
        expect(draws >= 1, "draws", draws, "an integer >= 1")
        self.draws, self.seed, self.epoch = int(draws), int(seed), 0
        sizes = torch.tensor([len(m) for m in self.members], dtype=torch.float64)
        w = (weights.double() if weights is not None else sizes / sizes.sum()).clone()
        w[sizes == 0] = 0.0
        self._weights, self._drawn = w, 0
        self._log: dict[str, Any] | None = None  # this epoch: its starting weights and every change, by draw
        self._replay: dict[str, Any] | None = None  # a checkpoint's log, replayed by the next __iter__ of its epoch

    @property
    def weights(self) -> Tensor:
        return self._weights

    @weights.setter
    def weights(self, value: Tensor) -> None:
        self._weights = value.double().clone()
        if self._log is not None:
            self._log["changes"].append([self._drawn, self._weights.tolist()])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.draws

    def state_dict(self) -> dict[str, Any]:
        """The current weights and this epoch's log (its starting weights, and the draw at which each change came)."""
        return {"weights": self._weights.tolist(), "log": self._log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the weights now, and the log that the next pass over the same epoch replays."""
        self._weights = torch.tensor(state["weights"], dtype=torch.float64)
        self._replay = state.get("log")

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        replay, self._replay = self._replay, None
        pending: list[list[Any]] = []
        if replay is not None and int(replay["epoch"]) == self.epoch:
            self._weights = torch.tensor(replay["start"], dtype=torch.float64)
            pending = [list(c) for c in replay["changes"]]
        self._drawn = 0
        self._log = {"epoch": self.epoch, "start": self._weights.tolist(), "changes": []}
        queues: list[list[int]] = [[] for _ in self.members]
        for i in range(self.draws):
            while pending and int(pending[0][0]) <= i:  # a change the interrupted run made before this draw
                self.weights = torch.tensor(pending.pop(0)[1], dtype=torch.float64)
            w = self._weights.clone()
            w[[len(m) == 0 for m in self.members]] = 0.0
            d = int(torch.multinomial(w / w.sum(), 1, generator=g))
            if not queues[d]:
                m = self.members[d]
                queues[d] = m[torch.randperm(len(m), generator=g)].tolist()
            self._drawn = i + 1
            yield queues[d].pop()
        for _, w in pending:  # changes made after the epoch's last draw
            self.weights = torch.tensor(w, dtype=torch.float64)


class DomainReweighter:
    """DDK during training, as the loop's ``on_step(step, student)`` hook: every ``every`` optimizer steps, the
    student's mean loss per domain on the held-out slice (``student_losses(student) -> (D,)``) against the teacher's
    (``teacher_losses`` ``(D,)``, fixed) updates ``sampler.weights`` by :func:`ddk_update`. ``history`` keeps every
    update (step, weights) for the report."""

    def __init__(self, sampler: DomainSampler, *, teacher_losses: Tensor, student_losses: Callable[[Any], Tensor],
                 every: int, smoothing: float) -> None:
        expect(every >= 1, "ddk every", every, "an integer >= 1 (optimizer steps between reweightings)")
        self.sampler, self.teacher_losses, self.student_losses = sampler, teacher_losses.double(), student_losses
        self.every, self.smoothing = int(every), float(smoothing)
        self.history: list[dict[str, Any]] = [{"step": 0, "weights": sampler.weights.tolist()}]

    def __call__(self, step: int, student: Any) -> None:
        if step % self.every:
            return
        s = self.student_losses(student).double()
        present = self.sampler.weights > 0
        new = torch.zeros_like(self.sampler.weights)
        new[present] = ddk_update(self.sampler.weights[present] / self.sampler.weights[present].sum(),
                                  self.teacher_losses[present], s[present], smoothing=self.smoothing)
        self.sampler.weights = new
        self.history.append({"step": int(step), "weights": new.tolist(), "student_losses": s.tolist()})

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (``fit`` saves the ``on_step`` hook's state): the history and the sampler's."""
        return {"history": self.history, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.sampler.load_state_dict(state["sampler"])


# --------------------------------------------------------------------------------------- the choice

@dataclass
class Selection:
    """A chosen subset of a training pool of ``n`` examples: ``indices`` (ascending), ``scores`` ``(N,)`` (NaN where
    a strategy scored nothing), the strategy's ``info`` (JSON-able), and, for strategies that act during training
    (DDK), ``schedule``: ``(example_losses) -> (sampler, on_step)``."""

    method: str
    n: int
    indices: Tensor
    scores: Tensor
    info: dict[str, Any] = field(default_factory=dict)
    source: str = "chosen"
    schedule: Callable[..., tuple[Sampler[int], Callable[[int, Any], None]]] | None = None

    @property
    def budget(self) -> int:
        return len(self.indices)

    def summary(self) -> dict[str, Any]:
        """What a report shows: strategy, budget, share of the pool, where it came from, the strategy's info."""
        kept = self.scores[self.indices]
        finite = kept[torch.isfinite(kept)]
        return {"method": self.method, "pool": self.n, "budget": self.budget, "fraction": self.budget / self.n,
                "source": self.source, "dynamic": self.schedule is not None,
                "indices_sha256": hashlib.sha256(json.dumps(self.indices.tolist()).encode()).hexdigest()[:16],
                "mean_score_kept": float(finite.mean()) if len(finite) else None, **self.info}


def _strategy_params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items()}


def options_of(method: str) -> list[str]:
    """The hyperparameters a selection strategy takes (what ``data.selection`` may set besides its own fields)."""
    return [n for n in _strategy_params(SELECTORS.get(method)) if n not in INPUTS and n not in GIVEN]


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """Unknown hyperparameters of a strategy fail here, with close matches (used when a recipe loads)."""
    from ..config import check_kwargs

    fn = SELECTORS.get(method)
    check_kwargs("selection method", method, fn, options, provided=tuple(INPUTS) + GIVEN)


def choose_subset(method: str, *, n: int, budget: int, seed: int, options: Mapping[str, Any] | None = None,
                  **inputs: Any) -> Selection:
    """Run selection strategy ``method`` (a :data:`SELECTORS` name) on a pool of ``n`` examples, keeping exactly
    ``budget``; ``options`` are its hyperparameters, ``inputs`` the lazy :data:`INPUTS` the task can give (None or
    absent = cannot). A strategy that needs an input the task lacks fails with what it needs."""
    fn = SELECTORS.get(method)
    options = dict(options or {})
    check_options(method, options)
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise KDistillError(f"choose_subset: got unknown inputs {unknown}; expected some of {sorted(INPUTS)}.")
    params = _strategy_params(fn)
    kwargs: dict[str, Any] = {"n": n, "budget": budget, "seed": seed, **options}
    available = sorted(k for k, v in inputs.items() if v is not None)
    for name, p in params.items():
        if name not in INPUTS:
            continue
        if inputs.get(name) is not None:
            kwargs[name] = inputs[name]
        elif p.default is inspect.Parameter.empty:
            able = [m for m in SELECTORS.names()
                    if all(q.default is not inspect.Parameter.empty or k not in INPUTS or k in available
                           for k, q in _strategy_params(SELECTORS.get(m)).items())]
            raise KDistillError(f"data.selection.method {method!r} needs {name} ({INPUTS[name]}), which this task "
                                f"does not provide (it gives {', '.join(available) or 'nothing'}). Fix: use one of "
                                f"{', '.join(able)} here.")
    picked = fn(**kwargs)
    indices, scores, info = picked[:3]
    indices = torch.as_tensor(indices, dtype=torch.long).sort().values
    if len(indices) != budget or len(indices.unique()) != budget:
        raise KDistillError(f"selection method {method!r} returned {len(indices.unique())} distinct examples for a "
                            f"budget of {budget}; a selector must keep exactly its budget (a bug in the selector).")
    sel = Selection(method, n, indices, torch.as_tensor(scores, dtype=torch.float64), dict(info))
    if len(picked) > 3:
        sel.schedule = picked[3]
    return sel


# ------------------------------------------------------------------------------------------ strategies

@SELECTORS.register("random")
def select_random(*, n: int, budget: int, seed: int) -> tuple[Tensor, Tensor, dict]:
    """Uniform random subset at the same budget: the baseline every strategy is compared with."""
    return random_subset(n, budget, seed=seed), torch.full((n,), math.nan), {}


@SELECTORS.register("miniplm")
def select_miniplm(*, n: int, budget: int, seed: int, teacher_log_likelihood: Callable[[], Tensor],
                   reference_log_likelihood: Callable[..., Tensor], reference: str | None = None,
                   reference_fraction: float = 0.1, reference_epochs: int = 3) -> tuple[Tensor, Tensor, dict]:
    """MiniPLM difference sampling (Gu et al., ICLR 2025): keep the ``budget`` documents with the largest teacher minus
    reference mean log-likelihood. ``reference``: a causal LM sharing the teacher's tokenizer (zoo name or folder);
    None trains a small one here (the student's architecture, ``reference_epochs`` epochs of cross-entropy) on a random
    ``reference_fraction`` of the pool."""
    expect(0.0 < reference_fraction <= 1.0, "miniplm reference_fraction", reference_fraction, "a number in (0, 1]")
    expect(reference_epochs >= 1, "miniplm reference_epochs", reference_epochs, "an integer >= 1")
    train_idx = None if reference else random_subset(n, max(1, round(reference_fraction * n)), seed=seed + 1)
    t = teacher_log_likelihood()
    r = reference_log_likelihood(name=reference, train_indices=train_idx, epochs=reference_epochs)
    scores = miniplm_scores(t, r)
    info = {"reference": reference or f"trained here on {len(train_idx)} pool examples",
            "teacher_mean_log_likelihood": float(t.mean()), "reference_mean_log_likelihood": float(r.mean())}
    return top_budget(scores, budget), scores, info


@SELECTORS.register("ddk")
def select_ddk(*, n: int, budget: int, seed: int, domains: Callable[[], tuple[Tensor, Sequence[str]]],
               example_losses: Callable[[Any, Tensor], Tensor], every: int = 50, smoothing: float = 0.5,
               heldout_per_domain: int = 2) -> tuple[Tensor, Tensor, dict, Callable]:
    """DDK domain reweighting (Liu et al., NeurIPS 2024). ``heldout_per_domain`` examples of every domain are set
    aside (never trained on) to compare the teacher's and the student's loss per domain; the static choice draws the
    budget across domains by the discrepancy factor of the initial student; during training the sampler draws
    ``budget`` rows per epoch from that subset (so the student sees exactly the budget of distinct rows), each
    draw's domain by the current factor, updated every ``every`` steps with smoothing ``smoothing``."""
    domains, domain_names = domains()
    expect(len(domains) == n, "domains", len(domains), f"one domain id per pool example ({n})")
    expect(heldout_per_domain >= 1, "ddk heldout_per_domain", heldout_per_domain, "an integer >= 1")
    num = len(domain_names)
    sizes = domain_sizes(domains, num)
    g = torch.Generator().manual_seed(int(seed) + 2)
    held = []
    for d in range(num):
        members = torch.nonzero(domains == d).squeeze(1)
        if len(members) > heldout_per_domain:  # a domain too small to spare examples keeps them for training
            held.append(members[torch.randperm(len(members), generator=g)[:heldout_per_domain]])
    held_idx = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    held_dom = domains[held_idx]
    present = torch.zeros(num, dtype=torch.bool)
    present[held_dom.unique()] = True
    expect(bool(present.any()), "ddk domains", dict(zip(domain_names, sizes.tolist())),
           f"at least one domain with more than heldout_per_domain ({heldout_per_domain}) examples")

    def per_domain(losses: Tensor) -> Tensor:
        total = torch.zeros(num, dtype=torch.float64).index_add_(0, held_dom, losses.double())
        return total / domain_sizes(held_dom, num).clamp_min(1)

    teacher = per_domain(example_losses(None, held_idx))
    student0 = per_domain(example_losses("student", held_idx))
    weights = torch.zeros(num, dtype=torch.float64)
    weights[present] = ddk_discrepancy(teacher[present], student0[present])
    capacity = sizes - domain_sizes(held_dom, num)  # held-out examples are never drawn
    expect(budget <= int(capacity.sum()), "data.selection budget", budget,
           f"at most {int(capacity.sum())} (the pool minus the {len(held_idx)} held-out examples DDK compares on)")
    # a domain too small for a held-out slice gets the smallest weight (its gap is unknown); one absent from the pool
    # none; the weights are then a distribution over the pool's domains
    unmeasured = ~present & (sizes > 0)
    if bool(unmeasured.any()):
        weights[unmeasured] = float(weights[present].min())
    weights = weights / weights.sum()
    counts = allocate(weights, budget, capacity)
    picked = []
    for d in range(num):
        members = torch.nonzero(domains == d).squeeze(1)
        members = members[~torch.isin(members, held_idx)]
        picked.append(members[torch.randperm(len(members), generator=g)[: int(counts[d])]])
    indices = torch.cat(picked)
    scores = weights[domains].clone()
    scores[held_idx] = math.nan
    info = {"domains": list(domain_names), "domain_sizes": sizes.tolist(), "heldout": len(held_idx),
            "teacher_domain_loss": teacher.tolist(), "student_domain_loss": student0.tolist(),
            "initial_weights": weights.tolist(), "counts": counts.tolist(), "every": every, "smoothing": smoothing}

    def schedule(example_losses: Callable[[Any, Tensor], Tensor]) -> tuple[DomainSampler, DomainReweighter]:
        sampler = DomainSampler(domains, draws=budget, seed=seed, weights=weights, among=indices)
        hook = DomainReweighter(sampler, teacher_losses=torch.where(present, teacher, torch.ones_like(teacher)),
                                student_losses=lambda model: per_domain(example_losses(model, held_idx)),
                                every=every, smoothing=smoothing)
        return sampler, hook

    return indices, scores, info, schedule


@SELECTORS.register("pcoreset")
def select_pcoreset(*, n: int, budget: int, seed: int, teacher_probs: Callable[[], Tensor] | None = None,
                    proxy_probs: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                    seed_fraction: float = 0.0) -> tuple[Tensor, Tensor, dict]:
    """PCoreSet (Kang et al., 2025): greedy k-center in probability space. With the teacher's probabilities on the
    whole pool (a local teacher) the cover starts from the example nearest the mean distribution and needs no
    training. ``seed_fraction`` > 0, or a teacher that answers only what is queried (black box; then 0.2 when 0 is
    given), first queries a random seed of that share of the budget (at least one), trains a proxy student on the
    teacher's answers and covers the proxy's probability space from the seed (as the paper does with its student)."""
    expect(0.0 <= seed_fraction < 1.0, "pcoreset seed_fraction", seed_fraction, "a number in [0, 1)")
    info: dict[str, Any] = {}
    if teacher_probs is not None and seed_fraction == 0.0:
        probs = teacher_probs().double()
        # start at the example closest to the mean distribution, so the first picks go to the simplex's far regions
        first = int(torch.argmin((probs - probs.mean(0)).norm(dim=1)))
        picks, gaps = k_center_greedy(probs, budget, first=first)
        info["space"] = "teacher probabilities"
        seed_idx = torch.zeros(0, dtype=torch.long)
    else:
        if proxy_probs is None:
            raise KDistillError("pcoreset with a seed (seed_fraction > 0, or a black-box teacher) needs a proxy "
                                "student, which this task does not provide; set seed_fraction: 0.")
        s = min(budget, max(1, round(seed_fraction * budget) if seed_fraction else round(0.2 * budget)))
        seed_idx = random_subset(n, s, seed=seed)
        probs = proxy_probs(seed_idx)[0].double()
        picks, gaps = k_center_greedy(probs, budget - s, centers=probs[seed_idx], taken=seed_idx)
        info["space"] = f"proxy student probabilities (trained on {s} random seed examples)"
        info["seed"] = s
    chosen = torch.cat([seed_idx, picks])
    scores = torch.cdist(probs, probs[chosen]).min(1).values  # unchosen: how far from the cover
    scores[picks] = torch.where(torch.isinf(gaps), torch.full_like(gaps, math.nan), gaps)  # the start: no gap
    scores[seed_idx] = math.nan
    info["cover_radius"] = cover_radius(probs, chosen)
    return chosen, scores, info


@SELECTORS.register("rad")
def select_rad(*, n: int, budget: int, seed: int, proxy_probs: Callable[[Tensor], tuple[Tensor, Tensor]],
               seed_fraction: float = 0.2, mistakes: float | None = None) -> tuple[Tensor, Tensor, dict]:
    """Robust Active Distillation (Baykal et al., ICLR 2023) under a query budget. A random seed (``seed_fraction``
    of the budget, at least one) is queried first and a proxy student trained on the teacher's answers. The rest of
    the budget goes to unqueried examples: gain = 1 - the proxy's margin (informativeness); the teacher is expected
    to be wrong on a share ``mistakes`` of them (default: the teacher's mean uncertainty, 1 - its top probability, on
    the seed); inclusion probabilities come from :func:`rad_inclusion` and the draw from
    :func:`systematic_sample`, so exactly the budget is queried."""
    expect(0.0 < seed_fraction < 1.0, "rad seed_fraction", seed_fraction, "a number in (0, 1)")
    s = min(budget, max(1, round(seed_fraction * budget)))
    seed_idx = random_subset(n, s, seed=seed)
    student, teacher_seed = proxy_probs(seed_idx)
    eps = float(mistakes) if mistakes is not None else float((1.0 - teacher_seed.double().max(1).values).mean())
    expect(0.0 <= eps < 1.0, "rad mistakes", eps, "a share in [0, 1) of queried examples the teacher gets wrong")
    rest = torch.ones(n, dtype=torch.bool)
    rest[seed_idx] = False
    pool = torch.nonzero(rest).squeeze(1)
    gains = 1.0 - margins(student.double()[pool])
    k = budget - s
    wrong = math.ceil(eps * k)
    p = rad_inclusion(gains, k, mistakes=wrong)
    drawn = pool[systematic_sample(p, seed=seed + 3)] if k else torch.zeros(0, dtype=torch.long)
    scores = torch.full((n,), math.nan, dtype=torch.float64)
    scores[pool] = p
    info = {"seed": s, "estimated_teacher_error": eps, "adversary_mistakes": wrong,
            "mean_gain_pool": float(gains.mean()) if len(gains) else None,
            "mean_gain_chosen": float((1.0 - margins(student.double()[drawn])).mean()) if len(drawn) else None}
    return torch.cat([seed_idx, drawn]), scores, info


@SELECTORS.register("kd3")
def select_kd3(*, n: int, budget: int, seed: int,
               view_probs: Callable[[Tensor, int, int], tuple[Tensor, Tensor]], views: int = 4,
               seed_fraction: float = 0.2, prefer: str = "disagree") -> tuple[Tensor, Tensor, dict]:
    """Shift-aware selection after KD^3 (Tang et al., ICCV 2023). A random seed (``seed_fraction`` of the budget)
    trains a proxy student; teacher and proxy then predict ``views`` augmented copies of every example.
    ``prefer: disagree``: keep the largest mean Jensen-Shannon divergence between them (where the student has most
    to learn); ``prefer: confident``: keep the most confident combined prediction ``max_c (p_t + p_s) / 2`` averaged
    over views (the paper's instance selection, which drops shifted examples both models find ambiguous)."""
    expect(prefer in ("disagree", "confident"), "kd3 prefer", prefer, "'disagree' or 'confident'")
    expect(views >= 1, "kd3 views", views, "an integer >= 1")
    expect(0.0 < seed_fraction < 1.0, "kd3 seed_fraction", seed_fraction, "a number in (0, 1)")
    s = min(budget, max(1, round(seed_fraction * budget)))
    seed_idx = random_subset(n, s, seed=seed)
    t, st = view_probs(seed_idx, views, seed)
    if prefer == "disagree":
        scores = js_divergence(t, st).mean(0)
    else:
        scores = (0.5 * (t.double() + st.double())).max(-1).values.mean(0)
    rest = torch.ones(n, dtype=torch.bool)
    rest[seed_idx] = False
    picked = top_budget(scores, budget - s, among=torch.nonzero(rest).squeeze(1))
    return torch.cat([seed_idx, picked]), scores, {"seed": s, "views": views, "prefer": prefer}


# ------------------------------------------------------------------------------------- subsets on disk

SUBSET_FILE, MANIFEST_FILE = "subset.jsonl", "selection.json"


def pool_fingerprint(*parts: Any) -> str:
    """A short hash of a training pool (tensors, arrays or lists of texts), so a stored subset is only reused on
    the pool it was chosen from."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            for x in p:
                h.update(str(x).encode())
                h.update(b"\x00")
    return h.hexdigest()[:16]


def write_subset(directory: str | Path, selection: Selection, *, pool: str,
                 describe: Callable[[int], str] | None = None) -> Path:
    """Write ``subset.jsonl`` (one line per pool example: ``index``, ``selected``, ``score``, and ``text`` -- a short
    description -- for the selected ones when ``describe`` is given) and ``selection.json`` (strategy, budget, pool
    fingerprint, info) into ``directory``, atomically. :func:`read_subset` reads it back."""
    from ..io import write_bytes_atomic, write_json_atomic

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chosen = set(selection.indices.tolist())
    lines = []
    for i in range(selection.n):
        s = float(selection.scores[i])
        row: dict[str, Any] = {"index": i, "selected": i in chosen, "score": None if math.isnan(s) else s}
        if describe is not None and i in chosen:
            row["text"] = describe(i)
        lines.append(json.dumps(row))
    write_bytes_atomic(d / SUBSET_FILE, ("\n".join(lines) + "\n").encode())
    write_json_atomic(d / MANIFEST_FILE, {**selection.summary(), "pool_fingerprint": pool, "format_version": 1})
    return d


def read_subset(directory: str | Path, *, n: int, pool: str) -> Selection:
    """The subset ``kdistill select`` wrote into ``directory``, refused unless it was chosen from this pool."""
    d = Path(directory)
    if not (d / MANIFEST_FILE).is_file() or not (d / SUBSET_FILE).is_file():
        raise KDistillError(f"data.selection.subset: {str(d)!r} holds no {MANIFEST_FILE} and {SUBSET_FILE}; expected "
                            "the --output folder of `kdistill select RECIPE --output DIR`. Run that first.")
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    if manifest.get("pool_fingerprint") != pool or manifest.get("pool") != n:
        raise KDistillError(f"data.selection.subset: {str(d)!r} was chosen from another training pool (fingerprint "
                            f"{manifest.get('pool_fingerprint')!r} of {manifest.get('pool')} examples; this recipe's "
                            f"pool is {pool!r} of {n}). Fix: run `kdistill select` for this recipe again, or remove "
                            "subset.")
    chosen, scores = [], torch.full((n,), math.nan, dtype=torch.float64)
    for line in (d / SUBSET_FILE).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        i = int(row["index"])
        if row.get("score") is not None:
            scores[i] = float(row["score"])
        if row.get("selected"):
            chosen.append(i)
    info = {k: v for k, v in manifest.items() if k not in ("method", "pool", "budget", "fraction", "source", "dynamic",
                                                            "indices_sha256", "mean_score_kept", "pool_fingerprint",
                                                            "format_version")}
    return Selection(str(manifest.get("method")), n, torch.tensor(sorted(chosen), dtype=torch.long), scores, info,
                     source=f"subset {d}")


def select_training_subset(*, method: str, fraction: float | None, budget: int | None, subset: str | None,
                           options: Mapping[str, Any], n: int, seed: int, pool: str, **inputs: Any) -> Selection:
    """The one entry point of the tasks: the stored ``subset`` folder when given (checked against ``pool``), else
    :func:`choose_subset` with the budget from ``fraction`` / ``budget``."""
    if subset is not None:
        return read_subset(subset, n=n, pool=pool)
    return choose_subset(method, n=n, budget=budget_of(n, fraction=fraction, budget=budget), seed=seed,
                         options=options, **inputs)


# ------------------------------------------------------------------ real examples for dataset distillation

def class_counts(labels: Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.long(), minlength=num_classes).tolist()


def check_per_class(labels: Tensor, num_classes: int, per_class: int) -> None:
    """One clear error unless every class has at least ``per_class`` examples."""
    expect(isinstance(per_class, int) and per_class >= 1, "per_class", per_class, "an integer >= 1")
    counts = class_counts(labels, num_classes)
    short = [(c, n) for c, n in enumerate(counts) if n < per_class]
    if short:
        c, n = short[0]
        raise KDistillError(f"per_class: got {per_class}, but class {c} has only {n} training example(s) "
                            f"({len(short)} class(es) have fewer than {per_class}); expected at most the smallest "
                            f"class size, {min(counts)}. Fix: lower per_class, or give more training data.")


def per_class_random(labels: Tensor, num_classes: int, per_class: int, *, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` examples drawn without replacement from every class, class by class, ``(C * k,)``."""
    check_per_class(labels, num_classes, per_class)
    out = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        out.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(out)


def select_by_score(hardness: Tensor, labels: Tensor | None = None, *, keep: Literal["hard", "easy"],
                    fraction: float | None = None, per_class: int | None = None,
                    num_classes: int | None = None) -> Tensor:
    """Indices of the examples to keep, by ``hardness`` ``(N,)`` (higher = harder: EL2N, entropy, minus the margin).

    ``keep="hard"`` keeps the highest scores, ``"easy"`` the lowest; ties go to the lower index. Give exactly one
    budget: ``fraction`` keeps ``max(1, round(fraction * N))`` examples of the whole set, ``per_class`` keeps that
    many of every class (class-balanced; needs ``labels`` and ``num_classes``). Returned in ascending index order."""
    if keep not in ("hard", "easy"):
        raise KDistillError(f"keep: got {keep!r}, expected 'hard' (highest scores) or 'easy' (lowest scores).")
    if (fraction is None) == (per_class is None):
        raise KDistillError("select_by_score: expected exactly one budget, fraction= (of the whole set) or "
                            "per_class= (examples of every class).")
    if hardness.dim() != 1:
        raise KDistillError(f"select_by_score: hardness of shape {tuple(hardness.shape)}, expected (N,).")
    order_key = -hardness.double() if keep == "hard" else hardness.double()

    def ranked(idx: Tensor) -> Tensor:  # positions in idx, best first (stable: ties keep index order)
        return idx[torch.sort(order_key[idx], stable=True).indices]

    if fraction is not None:
        expect(0.0 < fraction <= 1.0, "fraction", fraction, "a number in (0, 1] (the share of examples kept)")
        n = max(1, round(fraction * len(hardness)))
        return ranked(torch.arange(len(hardness)))[:n].sort().values
    if labels is None or num_classes is None:
        raise KDistillError("select_by_score: per_class= needs labels= and num_classes=.")
    if labels.shape != hardness.shape:
        raise KDistillError(f"select_by_score: labels {tuple(labels.shape)} vs hardness {tuple(hardness.shape)}; "
                            "expected one label per score.")
    assert per_class is not None
    check_per_class(labels, num_classes, per_class)
    kept = [ranked((labels == c).nonzero().squeeze(1))[:per_class] for c in range(num_classes)]
    return torch.cat(kept).sort().values


def dq_bins(features: Tensor, num_bins: int) -> list[Tensor]:
    """Dataset Quantization's bins: ``num_bins`` disjoint groups of indices covering all ``N`` rows of ``features``
    ``(N, D)``, the first ``N mod num_bins`` bins one larger than ``N // num_bins``.

    Bin ``n`` is filled greedily from the rows no earlier bin took (the pool ``R``): each step adds to the bin ``S``
    the row ``x`` with the largest submodular gain
    ``sum_{p in S} ||f(p) - f(x)||^2 - sum_{p in R \\ S} ||f(p) - f(x)||^2``: far from what the bin already holds
    (diversity) and close to the rest of the pool (representativeness). Early bins therefore hold representative,
    diverse rows and later bins what is left, so sampling from every bin keeps both (Zhou et al., 2023). Greedy and
    deterministic; O(N^2) memory for the pairwise distances."""
    expect(features.dim() == 2 and len(features) >= 1, "dq_bins features", tuple(features.shape), "an (N, D) tensor")
    n = len(features)
    expect(isinstance(num_bins, int) and 1 <= num_bins <= n, "num_bins", num_bins, f"an integer in [1, {n}] (N = {n})")
    f = features.double()
    sq = (f * f).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * f @ f.T).clamp_min(0).float()  # squared distances (fp32: N^2 memory)
    remaining = torch.ones(n, dtype=torch.bool)
    sizes = [n // num_bins + (1 if b < n % num_bins else 0) for b in range(num_bins)]
    bins = []
    for size in sizes:
        # gain(x) = sum_{p in S} d(p, x) - sum_{p in R \ S} d(p, x); with S empty it is minus the pool sum
        gain = -dist[:, remaining].sum(1, dtype=torch.float64)
        available = remaining.clone()
        chosen = []
        for _ in range(size):
            g = torch.where(available, gain, torch.full_like(gain, float("-inf")))
            k = int(torch.argmax(g))
            chosen.append(k)
            available[k] = False
            gain += 2 * dist[k]  # k moves from R \ S to S: its distance now adds instead of subtracting
        idx = torch.tensor(chosen, dtype=torch.long)
        remaining[idx] = False
        bins.append(idx)
    return bins


def sample_across_bins(bins: list[Tensor], budget: int, *, generator: torch.Generator) -> Tensor:
    """``budget`` indices sampled uniformly without replacement within bins, spread over the bins as evenly as
    their sizes allow (each bin gets ``budget // len(bins)``, the remainder goes to randomly chosen bins, and what
    a small bin cannot give goes to the others). Returned in ascending order."""
    total = sum(len(b) for b in bins)
    expect(isinstance(budget, int) and 1 <= budget <= total, "budget", budget,
           f"an integer in [1, {total}] (the examples in the bins)")
    k = len(bins)
    share = [budget // k] * k
    for b in torch.randperm(k, generator=generator)[: budget % k].tolist():
        share[b] += 1
    # a bin smaller than its share hands the rest to bins with room, in a random order
    spill = sum(max(0, s - len(b)) for s, b in zip(share, bins))
    share = [min(s, len(b)) for s, b in zip(share, bins)]
    while spill:
        for b in torch.randperm(k, generator=generator).tolist():
            if spill and share[b] < len(bins[b]):
                share[b] += 1
                spill -= 1
    picked = [b[torch.randperm(len(b), generator=generator)[:s]] for b, s in zip(bins, share) if s]
    return torch.cat(picked).sort().values
