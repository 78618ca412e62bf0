"""Offline text data for embedding distillation: WordNet lemma <-> gloss pairs and KJV verses.

Both come from Debian packages (``wordnet-base``, ``bible-kjv``; see RESOURCES.md), located through
``dpkg -L`` (:func:`kdistill.data.debian_files`), never by hard-coded paths.

:func:`retrieval_split` makes a deterministic held-out pair set: ``num_eval`` pairs with distinct queries
and distinct candidates, and a training list from which every pair sharing a query or a candidate text
with the held-out set is removed (no leakage through repeated lemmas or glosses).
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass

import numpy as np

from ..errors import KDistillError, expect
from .classification import debian_files

WORDNET_POS = ("noun", "verb", "adj", "adv")


@dataclass(frozen=True)
class Pair:
    query: str
    candidate: str
    group: str = ""  # e.g. the WordNet part of speech, or a KJV book


#: WordNet pointer ``pos`` letters -> data file (``s``: an adjective satellite, stored in data.adj)
_POS_FILE = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


@dataclass(frozen=True)
class Synset:
    """One record of a WordNet data file (wndb(5WN)): where it is (``pos`` file and byte ``offset``, the pair that
    identifies it), its lexicographer file number (lexnames(5WN); the supersense), lemmas, gloss, and pointers
    ``(symbol, target pos file, target offset)`` (``@`` hypernym, ``~`` hyponym, ``%p`` part meronym, ``&``
    similar to, ...; wninput(5WN))."""

    pos: str
    offset: int
    lex_filenum: int
    lemmas: tuple[str, ...]
    gloss: str
    pointers: tuple[tuple[str, str, int], ...]


@functools.lru_cache(maxsize=4)
def wordnet_synsets(pos: tuple[str, ...] = WORDNET_POS) -> tuple[Synset, ...]:
    """Every synset of the ``pos`` data files of ``wordnet-base``, in file order (117,659 for all four)."""
    files = {f.rsplit(".", 1)[1]: f for f in debian_files("wordnet-base")
             if re.search(r"/data\.(noun|verb|adj|adv)$", f)}
    out = []
    for p in pos:
        expect(p in WORDNET_POS, "wordnet part of speech", p, f"one of {WORDNET_POS}")
        if p not in files:
            raise KDistillError(f"WordNet data file for {p!r} not found in package wordnet-base; expected "
                                "data.noun/verb/adj/adv. Fix: `sudo apt-get install --reinstall wordnet-base`.")
        with open(files[p], encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue  # licence header
                head, _, gloss = line.partition(" | ")
                parts = head.split(" ")
                n_words = int(parts[3], 16)
                lemmas = tuple(re.sub(r"\([a-z]+\)$", "", parts[4 + 2 * i]).replace("_", " ") for i in range(n_words))
                at = 4 + 2 * n_words  # p_cnt, then 4 fields a pointer: symbol, offset, pos, source/target
                pointers = tuple((parts[at + 1 + 4 * k], _POS_FILE[parts[at + 3 + 4 * k]], int(parts[at + 2 + 4 * k]))
                                 for k in range(int(parts[at])))
                out.append(Synset(p, int(parts[0]), int(parts[1]), lemmas, gloss.strip(), pointers))
    return tuple(out)


def _wordnet_rows(pos: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...], str, str], ...]:
    return tuple((s.lemmas[0], s.lemmas, s.gloss, s.pos) for s in wordnet_synsets(tuple(pos)))


def wordnet_pairs(*, pos: tuple[str, ...] = WORDNET_POS, examples: bool = False) -> list[Pair]:
    """One ``Pair(lemma, gloss, pos)`` per WordNet synset (117,659 with all parts of speech), query = the
    synset's first lemma. ``examples=False`` keeps only the definition (drops the quoted usage examples,
    which often contain the lemma itself)."""
    for p in pos:
        expect(p in WORDNET_POS, "wordnet part of speech", p, f"one of {WORDNET_POS}")
    out = []
    for lemma, _, gloss, p in _wordnet_rows(tuple(pos)):
        gloss = gloss if examples else _definition(gloss)
        if gloss:
            out.append(Pair(lemma, gloss, p))
    return out


def _definition(gloss: str) -> str:
    """A WordNet gloss without its quoted usage examples."""
    return re.split(r'[;:]\s*"', gloss, maxsplit=1)[0].strip().rstrip(";:").strip()


def wordnet_synonym_gloss_pairs(*, pos: tuple[str, ...] = WORDNET_POS, examples: bool = False) -> list[Pair]:
    """``Pair(lemma, gloss)`` for every lemma of a synset *after the first* (the first is
    :func:`wordnet_pairs`' query): the same lemma -> definition task with the synonyms as queries."""
    out = []
    for _, lemmas, gloss, p in _wordnet_rows(tuple(pos)):
        gloss = gloss if examples else _definition(gloss)
        if gloss:
            out.extend(Pair(lemma, gloss, p) for lemma in lemmas[1:])
    return out


@functools.lru_cache(maxsize=1)
def kjv_verses() -> tuple[tuple[str, int, int, str], ...]:
    """``(book, chapter, verse, text)`` for the 31,102 verses of the King James Bible (``bible-kjv``)."""
    debian_files("bible-kjv")  # clear error when missing
    try:
        out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True,
                             encoding="latin-1", check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise KDistillError(f"running `bible` from package bible-kjv failed ({e}); expected it on PATH. "
                            "Fix: `sudo apt-get install bible-kjv`.") from None
    verses = []
    for line in out.splitlines():
        m = re.match(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$", line.strip())
        if m:
            verses.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    return tuple(verses)


def kjv_sentences(max_sentences: int | None = None, seed: int = 0) -> list[str]:
    """Verse texts (a random subset of ``max_sentences`` when given, deterministic in ``seed``)."""
    texts = [v[3] for v in kjv_verses()]
    if max_sentences is not None and max_sentences < len(texts):
        keep = np.random.default_rng(seed).permutation(len(texts))[:max_sentences]
        texts = [texts[i] for i in sorted(keep)]
    return texts


def kjv_pairs() -> list[Pair]:
    """Consecutive-verse pairs ``(verse, next verse in the same chapter)``: a harder, topical pair set."""
    v = kjv_verses()
    return [Pair(a[3], b[3], a[0]) for a, b in zip(v, v[1:]) if a[0] == b[0] and a[1] == b[1]]


def retrieval_split(pairs: list[Pair], *, num_eval: int = 2000, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """``(train, held_out)``: ``held_out`` has ``num_eval`` pairs with case-insensitively distinct queries
    and distinct candidates, drawn by a seeded shuffle; ``train`` holds the other pairs minus any that
    share a query or candidate text with ``held_out``. Deterministic in ``(pairs, num_eval, seed)``."""
    expect(num_eval >= 1, "num_eval", num_eval, "an integer >= 1")
    order = np.random.default_rng(seed).permutation(len(pairs))
    seen_q: set[str] = set()
    seen_c: set[str] = set()
    held: list[Pair] = []
    for i in order:
        p = pairs[int(i)]
        q, c = p.query.lower(), p.candidate.lower()
        if q in seen_q or c in seen_c:
            continue
        seen_q.add(q)
        seen_c.add(c)
        held.append(p)
        if len(held) == num_eval:
            break
    if len(held) < num_eval:
        raise KDistillError(f"retrieval_split: only {len(held)} pairs with distinct texts, expected num_eval="
                            f"{num_eval}. Lower num_eval.")
    train = [p for p in pairs if p.query.lower() not in seen_q and p.candidate.lower() not in seen_c]
    return train, held


def pair_texts(pairs: list[Pair]) -> list[str]:
    """Every query and candidate text once, in first-seen order (unsupervised distillation sentences)."""
    return list(dict.fromkeys(t for p in pairs for t in (p.query, p.candidate)))
