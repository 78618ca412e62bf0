"""Data of the ``embedding`` task: (query, positive) pairs, (query, positive, hard negative) triples, or plain
unlabelled texts, split once into training texts and held-out dev / test sets.

:func:`load_embedding_data` returns an :class:`EmbeddingSplits`:

* ``train`` - the training texts, ``group_size`` consecutive texts a training row: ``1`` single texts (shuffled
  alone), ``2`` ``[q1, p1, q2, p2, ...]`` (pairs kept together), ``3`` ``[q1, p1, n1, q2, p2, n2, ...]`` (a query,
  its positive and its hard negative);
* ``dev`` / ``test`` - held-out :class:`~kdistill.data.text.Pair` s (query, positive) with, for triples,
  ``dev_negatives`` / ``test_negatives``: the held-out rows' hard negatives, added to the candidate pool that every
  held-out query is ranked against (a negative that is also one of the positives is dropped from the pool, so a
  partner never ties with a copy of itself);
* ``dev_texts`` / ``test_texts`` - for unlabelled texts (``text_column``): the held-out texts, on which the student
  is compared with the teacher (there is no partner to retrieve).

Built-in pair sets: ``wordnet`` (lemma -> gloss), ``kjv`` (verse -> next verse), ``tiny`` (prefix -> sentence,
for smoke tests); ``files`` reads your rows through :func:`kdistill.data.files.load_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import KDistillError
from .text import Pair, kjv_pairs, pair_texts, retrieval_split, wordnet_pairs, wordnet_synonym_gloss_pairs


@dataclass
class EmbeddingSplits:
    """Training texts (``group_size`` consecutive texts a row) and the held-out sets (see the module docstring)."""

    train: list[str]
    group_size: int = 1
    dev: list[Pair] = field(default_factory=list)
    test: list[Pair] = field(default_factory=list)
    dev_negatives: list[str] = field(default_factory=list)
    test_negatives: list[str] = field(default_factory=list)
    dev_texts: list[str] = field(default_factory=list)
    test_texts: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """True for pairs / triples (held-out retrieval), False for unlabelled texts."""
        return bool(self.test)


def _text(value: Any, *, split: str, row: int, column: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KDistillError(f"data ({split} split), row {row}, column {column!r}: got {value!r} "
                            f"({type(value).__name__}), expected a non-empty text ({what}). Fix: fill or drop the "
                            "row.")
    return value


def _file_rows(*, files: Any, format: str, hf_dataset: Mapping[str, Any] | None, columns: Sequence[str],
               what: Sequence[str], validation_fraction: float, test_fraction: float, seed: int,
               base: Path | None = None) -> dict[str, list[tuple[str, ...]]]:
    """``{split: [row texts in the order of columns]}``, every text checked."""
    from .files import load_rows

    rows = load_rows(files=files, format=format, hf_dataset=hf_dataset, validation_fraction=validation_fraction,
                     test_fraction=test_fraction, seed=seed, columns=list(columns), base=base)
    out: dict[str, list[tuple[str, ...]]] = {}
    for split in ("train", "validation", "test"):
        out[split] = [tuple(_text(r[c], split=split, row=i, column=c, what=w) for c, w in zip(columns, what))
                      for i, r in enumerate(rows.get(split, []), start=1)]
    for split, name in (("test", "test_fraction"), ("validation", "validation_fraction")):
        if not out[split]:
            raise KDistillError(f"data: no {split} rows; expected a {split} file or data.{name} > 0 (the student is "
                                "measured on held-out rows, learning curves on validation rows).")
    return out


def _cap(items: list[Any], n: int | None, seed: int) -> list[Any]:
    """At most ``n`` of ``items``, a seeded subset kept in order."""
    if n is None or n >= len(items):
        return items
    keep = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(keep)]


def _pool(negatives: list[str], positives: list[Pair]) -> list[str]:
    """Distinct negatives that are not also a positive (a copy of a partner would tie with it)."""
    pos = {p.candidate for p in positives}
    return [n for n in dict.fromkeys(negatives) if n not in pos]


def load_embedding_data(*, name: str = "wordnet", files: Any = None, format: str = "auto",
                        hf_dataset: Mapping[str, Any] | None = None, query_column: str = "query",
                        positive_column: str = "positive", negative_column: str | None = None,
                        text_column: str | None = None, validation_fraction: float = 0.1,
                        test_fraction: float = 0.1, num_eval: int = 2000, num_dev: int = 500,
                        num_train: int | None = 20000, data_seed: int = 0, pairs: bool = False,
                        synonym_queries: bool = False, base: Path | None = None) -> EmbeddingSplits:
    """The embedding task's data, deterministic in the arguments (see the module docstring).

    ``name``: ``wordnet``, ``kjv``, ``tiny`` or ``files`` (``files`` / ``hf_dataset`` read with ``format``).
    For files, ``text_column`` alone gives unlabelled texts; else ``query_column`` and ``positive_column`` give
    pairs and ``negative_column`` adds a hard negative to each (triples, kept together in training). ``pairs``
    keeps training pairs together (``num_train // 2`` of them; triples: ``num_train // 3``), else the training
    texts are the pairs' distinct texts, at most ``num_train``. Built-in sets hold out ``num_eval`` test and
    ``num_dev`` dev pairs with texts distinct from the training pairs; files cut ``validation_fraction`` /
    ``test_fraction`` of the rows (or read split files). ``synonym_queries`` (``wordnet`` only) adds the other
    lemmas of each training synset as queries."""
    if name != "files" and (text_column is not None or negative_column is not None):
        raise KDistillError(f"data.name {name!r} is a built-in pair set; text_column and negative_column read your "
                            "own files. Fix: give data.files (or data.hf_dataset), or drop those columns.")
    if synonym_queries and name != "wordnet":
        raise KDistillError(f"data.synonym_queries needs data.name 'wordnet' (got {name!r}): only WordNet synsets "
                            "have synonym lemmas. Set synonym_queries: false.")
    source = {"files": files, "format": format, "hf_dataset": hf_dataset, "validation_fraction": validation_fraction,
              "test_fraction": test_fraction, "seed": data_seed, "base": base}
    if text_column is not None:
        return _texts(_file_rows(columns=[text_column], what=["a text to embed"], **source), num_train, data_seed)
    negatives: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    if name == "files":
        cols = [query_column, positive_column] + ([negative_column] if negative_column else [])
        what = ["a query", "the query's positive", "a hard negative of the row's query"][: len(cols)]
        rows = _file_rows(columns=cols, what=what, **source)
        for split, got in rows.items():
            for i, r in enumerate(got, start=1):
                if len(r) == 3 and r[2] == r[1]:
                    raise KDistillError(f"data ({split} split), row {i}: the negative ({negative_column!r}) equals "
                                        f"the positive ({positive_column!r}), {r[1]!r}; expected a text that does "
                                        "not answer the query. Fix the row or drop it.")
            negatives[split] = [r[2] for r in got] if negative_column else []
        train_pairs, dev, test = ([Pair(r[0], r[1]) for r in rows[s]] for s in ("train", "validation", "test"))
    else:
        if name == "wordnet":
            all_pairs = wordnet_pairs()
        elif name == "kjv":
            all_pairs = kjv_pairs()
        elif name == "tiny":  # prefix -> full sentence
            from ..students.encoders import tiny_corpus

            all_pairs = [Pair(" ".join(s.split()[: max(1, len(s.split()) // 2)]), s) for s in tiny_corpus(600, seed=11)]
        else:
            raise KDistillError(f"data.name: got {name!r}, expected wordnet, kjv, tiny or files.")
        rest, test = retrieval_split(all_pairs, num_eval=num_eval, seed=data_seed)
        train_pairs, dev = retrieval_split(rest, num_eval=min(num_dev, len(rest) // 2), seed=data_seed + 1)
    if synonym_queries:
        held_q = {p.query.lower() for p in (*test, *dev)}
        held_c = {p.candidate.lower() for p in (*test, *dev)}
        train_pairs = train_pairs + [p for p in wordnet_synonym_gloss_pairs()
                                     if p.query.lower() not in held_q and p.candidate.lower() not in held_c]
    held = {"dev": dev, "test": test, "dev_negatives": _pool(negatives["validation"], dev),
            "test_negatives": _pool(negatives["test"], test)}
    empty = (f"data {name!r}: no training rows left after holding out {num_eval} + {num_dev} pairs; lower "
             "data.num_eval / data.num_dev." if name != "files" else
             "data: no training rows left after the held-out splits; give more rows.")
    if negative_column:  # [q1, p1, n1, q2, ...]: whole triples, num_train // 3 of them
        rows3 = _cap([(p.query, p.candidate, n) for p, n in zip(train_pairs, negatives["train"])],
                     None if num_train is None else num_train // 3, data_seed)
        if not rows3:
            raise KDistillError(empty)
        return EmbeddingSplits(train=[t for r in rows3 for t in r], group_size=3, **held)
    if pairs:  # [q1, c1, q2, c2, ...]: whole pairs, num_train // 2 of them
        train_pairs = _cap(train_pairs, None if num_train is None else num_train // 2, data_seed)
        if not train_pairs:
            raise KDistillError(empty)
        return EmbeddingSplits(train=[t for p in train_pairs for t in (p.query, p.candidate)], group_size=2, **held)
    sentences = _cap(pair_texts(train_pairs), num_train, data_seed)
    if not sentences:
        raise KDistillError(empty)
    return EmbeddingSplits(train=sentences, group_size=1, **held)


def _texts(rows: dict[str, list[tuple[str, ...]]], num_train: int | None, seed: int) -> EmbeddingSplits:
    """Unlabelled texts: distinct texts of each split (duplicates would tie as each other's neighbours)."""
    texts = {k: list(dict.fromkeys(r[0] for r in v)) for k, v in rows.items()}
    for split in ("validation", "test"):
        if len(texts[split]) < 2:
            raise KDistillError(f"data: the {split} split holds {len(texts[split])} distinct text(s); expected at "
                                "least 2 (each held-out text is compared with its nearest neighbours among the "
                                "others). Fix: more rows, or a larger validation_fraction / test_fraction.")
    return EmbeddingSplits(train=_cap(texts["train"], num_train, seed), group_size=1,
                           dev_texts=texts["validation"], test_texts=texts["test"])


def load_pairs(**kwargs: Any) -> tuple[list[str], list[Pair], list[Pair]]:
    """``(train_sentences, dev_pairs, test_pairs)`` of :func:`load_embedding_data` (same keyword arguments)."""
    s = load_embedding_data(**kwargs)
    return s.train, s.dev, s.test


def row_neighbours(teacher_emb: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k)`` nearest training rows by the teacher (for :class:`~kdistill.data.NeighbourGroupSampler`): rows of
    ``(N, D)`` sentence embeddings, or of ``(N, G, D)`` groups (pairs, triples) keyed by the sum of their unit
    vectors."""
    from ..modules.quantization import teacher_neighbours

    t = torch.nn.functional.normalize(teacher_emb.float(), dim=-1)
    key = t.sum(1) if t.dim() == 3 else t
    return teacher_neighbours(key, min(k, len(key) - 1)) if len(key) > 1 else torch.zeros(1, 0, dtype=torch.long)
