"""The embedding task's students by name: each builder takes the teacher and the training texts (``corpus``) and
its own keyword arguments from the recipe (checked against these signatures when the config loads).

* ``layer_subset`` - :func:`~kdistill.students.encoders.layer_subset` (``layers``, ...);
* ``narrow`` - :func:`~kdistill.students.encoders.narrow_encoder` (``hidden_size``, ``num_layers``, ...);
* ``static`` - :func:`~kdistill.students.static.build_static` (``dim``, ``weighting``, ``projection``, ...);
* ``pretrained`` - your own encoder (``path``: a sentence-transformers / Hugging Face folder, a zoo name, or
  online a hub id).
"""

from __future__ import annotations

from collections.abc import Sequence

from .encoders import SentenceEncoder, layer_subset, load_sentence_encoder, narrow_encoder
from .static import build_static


def build_layer_subset(teacher: SentenceEncoder, *, corpus: Sequence[str], layers: list[int],
                       freeze_embeddings: bool = False, dropout: float | None = None) -> SentenceEncoder:
    return layer_subset(teacher, layers, freeze_embeddings=freeze_embeddings, dropout=dropout)


def build_narrow(teacher: SentenceEncoder, *, corpus: Sequence[str], hidden_size: int, num_layers: int,
                 num_heads: int | None = None, intermediate_size: int | None = None, init: str = "teacher",
                 seed: int = 0, dropout: float | None = None) -> SentenceEncoder:
    return narrow_encoder(teacher, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          intermediate_size=intermediate_size, init=init, seed=seed, dropout=dropout)


def build_pretrained(teacher: SentenceEncoder, *, corpus: Sequence[str], path: str) -> SentenceEncoder:
    return load_sentence_encoder(path)


STUDENTS = {"layer_subset": build_layer_subset, "narrow": build_narrow, "static": build_static,
            "pretrained": build_pretrained}
