"""Vocabulary checks between a teacher and a student language model, done before any training.

Token-level losses compare ``p_teacher[v]`` with ``p_student[v]`` entry by entry, which is only meaningful
when index ``v`` is the same token for both. :func:`check_vocab` decides:

* **same tokenizer, same number of logit rows** -> token-level losses, nothing to do;
* **same tokenizer, padded logit rows** (e.g. 49152 vs 49280, models pad their embedding matrices to a
  multiple of 64/128) -> accepted only when the tokenizer can never produce an id in the extra rows
  (``len(tokenizer) <= min(rows)``); :meth:`VocabAlignment.align` then pads the narrower logits with
  ``-inf`` columns and sets every row the tokenizer cannot produce to ``-inf`` on both sides, so they
  carry probability 0 (the losses are exact and NaN-free on ``-inf``, see ``tests/losses``);
* **different tokenizers** -> accepted when the training method compares distributions across tokenizers
  (``cross_tokenizer=True``: ``cross_tokenizer_kd``, or ``llm_kd`` with ``loss: uld``); the run then tokenises
  every text twice and aligns the two (:mod:`kdistill.data.align`) and the logits are passed on untouched.
  Otherwise one error that names those two routes.

Unlike tools that silently truncate mismatched vocabularies, nothing here changes a distribution without
checking that the dropped rows are unreachable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import KDistillError


@dataclass(frozen=True)
class VocabAlignment:
    """How to make teacher and student logits comparable entry by entry."""

    tokenizer_size: int      # ids the (teacher's) tokenizer can produce: [0, tokenizer_size)
    student_rows: int
    teacher_rows: int
    cross: bool = False      # different tokenizers: compared by a cross-tokenizer method, never entry by entry
    student_tokenizer_size: int | None = None

    @property
    def width(self) -> int:
        return max(self.student_rows, self.teacher_rows)

    @property
    def is_identity(self) -> bool:
        return not self.cross and self.student_rows == self.teacher_rows == self.tokenizer_size

    def _fit(self, logits: Tensor, name: str, rows: int) -> Tensor:
        if logits.shape[-1] != rows:
            raise KDistillError(f"{name} logits have {logits.shape[-1]} rows, expected {rows} as checked by "
                                "check_vocab(). Pass the logits of the models that were checked.")
        if self.is_identity or self.cross:
            return logits
        out = logits
        if rows < self.width:
            out = torch.cat([out, out.new_full((*out.shape[:-1], self.width - rows), -math.inf)], -1)
        if self.tokenizer_size < self.width:
            keep = torch.arange(self.width, device=out.device) < self.tokenizer_size
            out = out.masked_fill(~keep, -math.inf)
        return out

    def align_student(self, student_logits: Tensor) -> Tensor:
        return self._fit(student_logits, "student", self.student_rows)

    def align_teacher(self, teacher_logits: Tensor) -> Tensor:
        return self._fit(teacher_logits, "teacher", self.teacher_rows)

    def align(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Both logits padded to the same width, rows the tokenizer never produces set to ``-inf``."""
        return (self._fit(student_logits, "student", self.student_rows),
                self._fit(teacher_logits, "teacher", self.teacher_rows))


def _rows(model_or_rows: Any) -> int:
    if isinstance(model_or_rows, int):
        return model_or_rows
    get = getattr(model_or_rows, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    cfg = getattr(model_or_rows, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    raise KDistillError(f"check_vocab: cannot tell how many logit rows a {type(model_or_rows).__name__} has; "
                        "expected a Hugging Face causal LM or an int.")


def _tok_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)                    # transformers: base vocabulary + added tokens
    except TypeError:
        return int(tokenizer.get_vocab_size(with_added_tokens=True))  # tokenizers.Tokenizer


def cross_tokenizer_error(teacher_size: int | None = None, student_size: int | None = None) -> KDistillError:
    """The error for different tokenizers under a method that compares logits entry by entry: the routes that work."""
    sizes = f" (teacher {teacher_size} tokens, student {student_size} tokens)" if teacher_size is not None else ""
    return KDistillError(
        f"teacher and student use different tokenizers{sizes}, and the method compares their logits entry by "
        "entry, which would pair unrelated tokens. Expected a cross-tokenizer method. Fix: `method: {name: "
        "cross_tokenizer_kd}` (tokens aligned by character spans: KL on the shared vocabulary, chain probabilities "
        "and ULD where the tokenisations differ) or `method: {name: llm_kd, kwargs: {loss: uld}}` (ULD on "
        "positions paired in order), on a text corpus; or give the student the teacher's tokenizer (remove "
        "student.tokenizer; layer_subset and smaller_config students share it).")


def check_vocab(teacher: Any, student: Any, teacher_tokenizer: Any,
                student_tokenizer: Any | None = None, *, cross_tokenizer: bool = False,
                fused_head: bool = False) -> VocabAlignment:
    """Check that teacher and student can be compared token by token; return how to align their logits.

    ``teacher`` / ``student``: models (the LM head's rows are counted) or row counts. ``student_tokenizer``
    ``None`` means the student reuses the teacher's tokenizer. Different tokenizers are accepted with
    ``cross_tokenizer`` (the method compares distributions across vocabularies; the result has ``cross=True``).
    ``fused_head`` (the method reads hidden states and LM heads, never logits, so nothing can be padded or aligned)
    accepts only identical vocabularies. Raises :class:`KDistillError` otherwise.
    """
    plan = _vocab_plan(teacher, student, teacher_tokenizer, student_tokenizer, cross_tokenizer=cross_tokenizer)
    if fused_head and not plan.is_identity:
        raise KDistillError(
            f"the method reads the student's hidden states and LM head (a fused head), and the vocabularies differ "
            f"(teacher {plan.teacher_rows} rows, student {plan.student_rows}, tokenizer {plan.tokenizer_size}"
            f"{', different tokenizers' if plan.cross else ''}); expected identical teacher and student "
            "vocabularies (no padded rows). Fix: configure the method without the fused head.")
    return plan


def _vocab_plan(teacher: Any, student: Any, teacher_tokenizer: Any, student_tokenizer: Any | None, *,
                cross_tokenizer: bool) -> VocabAlignment:
    from .cache import tokenizer_hash

    t_rows, s_rows = _rows(teacher), _rows(student)
    if student_tokenizer is not None and student_tokenizer is not teacher_tokenizer:
        if tokenizer_hash(student_tokenizer) != tokenizer_hash(teacher_tokenizer):
            t_size, s_size = _tok_size(teacher_tokenizer), _tok_size(student_tokenizer)
            if not cross_tokenizer:
                raise cross_tokenizer_error(t_size, s_size)
            for who, size, rows in (("teacher", t_size, t_rows), ("student", s_size, s_rows)):
                if size > rows:
                    raise KDistillError(f"the {who}'s tokenizer produces ids up to {size - 1}, but its LM head has "
                                        f"only {rows} rows. Expected the LM head to cover every token id. Fix: "
                                        f"model.resize_token_embeddings({size}) before distilling.")
            return VocabAlignment(tokenizer_size=t_size, student_rows=s_rows, teacher_rows=t_rows, cross=True,
                                  student_tokenizer_size=s_size)
    size = _tok_size(teacher_tokenizer)
    if size > min(t_rows, s_rows):
        who = "student" if s_rows < t_rows else "teacher"
        raise KDistillError(
            f"the tokenizer produces ids up to {size - 1}, but the {who}'s LM head has only "
            f"{min(t_rows, s_rows)} rows. "
            f"Expected both models to cover every token id. Fix: resize the {who}'s embeddings "
            f"(model.resize_token_embeddings({size})) before distilling.")
    return VocabAlignment(tokenizer_size=size, student_rows=s_rows, teacher_rows=t_rows)
