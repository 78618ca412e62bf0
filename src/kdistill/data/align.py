"""Cross-tokenizer data: every text tokenised by the student's and the teacher's tokenizer, aligned by characters.

**Spans.** A token's span is ``(end of the previous token, its own end]`` in characters, from the ``end`` of the
fast tokenizers' ``return_offsets_mapping`` (ends only: some tokenizers trim the leading space from a token's
start offset, and the spans must tile the text). The last token of a text ends at the text's end. The EOS after
each text is one virtual character, so both EOS tokens cover the same span.

**Blocks** (:func:`cross_blocks`). The texts are concatenated, EOS after each, on both sides. Each block is the
longest run of whole tokens from the previous cut that holds at most ``block_length`` tokens *on each side* and
ends at a character where *both* tokenisations end a token; so both sides of a block cover exactly the same text.
Blocks are right-padded to ``block_length``; the remainder that fills no block is dropped. A stretch of more than
``block_length`` tokens with no shared boundary is refused (raise ``block_length``).

**Alignment** (:func:`align_spans`). The characters where both tokenisations end a token cut a block into
*groups*; a group holds ``n_s >= 1`` student and ``n_t >= 1`` teacher tokens covering the same characters. A
group with ``n_s = n_t = 1`` is an *exact* match: the student token and the teacher token cover the same span.
The positions that predict a group's first token (student position ``s0 - 1``, teacher position ``t0 - 1``) read
the same text, so their next-token distributions are comparable. The block's first group has no predicting
position and is left out.

**Vocabulary map** (:func:`vocab_map`): pairs ``(student id, teacher id)`` whose tokens decode to the same string
(strings produced by several ids on one side, partial UTF-8 bytes and special tokens are left out; the two EOS
tokens are paired). Computed once per run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import KDistillError
from .lm import IGNORE_INDEX, BlockPacker, label_mask, lm_tensors, pad_id_of

#: batch keys of the teacher's side of a cross-tokenizer batch (read by the teacher forward)
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask")


def _require_fast(tokenizer: Any, who: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise KDistillError(f"{who} tokenizer: got a slow {type(tokenizer).__name__}; expected a fast tokenizer "
                            "(character offsets, return_offsets_mapping), which cross-tokenizer alignment needs. "
                            "Fix: load it with AutoTokenizer.from_pretrained(..., use_fast=True) and save it again.")


def token_ends(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """``(ids, ends)`` of ``text`` (no special tokens): each token's end character, non-decreasing, the last one
    ``len(text)``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    ends, top = [], 0
    for _, e in enc["offset_mapping"]:
        top = max(top, int(e))
        ends.append(top)
    if ends:
        ends[-1] = len(text)
    return ids, ends


def align_spans(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Groups ``(s0, s1, t0, t1)``: student tokens ``[s0, s1)`` and teacher tokens ``[t0, t1)`` cover the same
    characters, cut at every character where both tokenisations end a token (``*_ends``: token end characters in
    the same coordinates, non-decreasing). Tokens after the last shared end belong to no group."""
    groups, i, j, s0, t0 = [], 0, 0, 0, 0
    while i < len(student_ends) and j < len(teacher_ends):
        if student_ends[i] == teacher_ends[j]:
            i, j = i + 1, j + 1
            groups.append((s0, i, t0, j))
            s0, t0 = i, j
        elif student_ends[i] < teacher_ends[j]:
            i += 1
        else:
            j += 1
    return groups


def _text_tokens(tokenizer: Any, text: str, base: int) -> list[tuple[int, int]]:
    """``(id, end)`` of the tokens of ``text`` starting at character ``base``, then EOS (one virtual character)."""
    ids, ends = token_ends(tokenizer, text)
    out = [(i, base + e) for i, e in zip(ids, ends)]
    if tokenizer.eos_token_id is not None:
        out.append((int(tokenizer.eos_token_id), base + len(text) + 1))
    return out


def _cut(S: list[tuple[int, int]], T: list[tuple[int, int]], L: int) -> tuple[int, int] | None:
    """``(n_student, n_teacher)`` tokens of the longest prefix ending at a shared boundary with <= L tokens a side;
    None when the buffers hold no more than that (the tail) -- raises when no shared boundary fits."""
    i = j = 0
    last = None
    while i < len(S) and j < len(T):
        if S[i][1] == T[j][1]:
            if i + 1 > L or j + 1 > L:
                break
            i, j = i + 1, j + 1
            last = (i, j)
        elif S[i][1] < T[j][1]:
            i += 1
        else:
            j += 1
        if i > L or j > L:
            break
    else:
        return None  # ran out of tokens before either side was full: the tail
    if last is None:
        raise KDistillError(f"cross-tokenizer blocks: got a stretch of more than block_length = {L} tokens in which "
                            "the two tokenizers share no token boundary; expected a shared boundary within every "
                            "block. Fix: raise data.block_length.")
    return last


def cross_blocks(student_tokenizer: Any, teacher_tokenizer: Any, texts: Iterable[str], *, block_length: int,
                 max_blocks: int) -> dict[str, Tensor]:
    """Training tensors of a cross-tokenizer run (see the module docstring), ``(N, block_length)`` each:

    * student side: ``input_ids``, ``attention_mask``, ``labels``, ``mask`` (as :func:`kdistill.data.lm.lm_tensors`);
    * teacher side: ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_mask`` (positions with a next
      teacher token);
    * alignment, per group ``g`` (at most ``block_length`` groups): ``group_student_start`` / ``group_teacher_start``
      (the positions predicting the group's first token, -1 where there is no group ``g``), ``group_exact`` (one
      token each side); per position: ``student_group`` / ``teacher_group`` (the group of the token predicted there,
      -1 for none).

    ``texts`` is read only until ``max_blocks`` blocks are full."""
    _require_fast(student_tokenizer, "student")
    _require_fast(teacher_tokenizer, "teacher")
    L = int(block_length)
    if L < 2:
        raise KDistillError(f"block_length: got {block_length}, expected >= 2 (a token and its successor).")
    texts = iter(texts)
    S: list[tuple[int, int]] = []
    T: list[tuple[int, int]] = []
    blocks: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = []
    more, base = True, 0
    while len(blocks) < max_blocks:
        while more and (len(S) <= L or len(T) <= L):
            text = next(texts, None)
            if text is None:
                more = False
                break
            S.extend(_text_tokens(student_tokenizer, text, base))
            T.extend(_text_tokens(teacher_tokenizer, text, base))
            base += len(text) + 1
        cut = _cut(S, T, L)
        if cut is None:
            break
        blocks.append((S[:cut[0]], T[:cut[1]]))
        del S[:cut[0]], T[:cut[1]]
    if not blocks:
        raise KDistillError(f"cross-tokenizer blocks: the texts hold fewer than block_length = {L} tokens on one "
                            "side; expected at least one full block. Use more text or a shorter data.block_length.")
    return _block_tensors(blocks, L, pad_student=pad_id_of(student_tokenizer), pad_teacher=pad_id_of(teacher_tokenizer))


def _block_tensors(blocks: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]], L: int, *, pad_student: int,
                   pad_teacher: int) -> dict[str, Tensor]:
    n = len(blocks)
    out = {k: torch.full((n, L), pad, dtype=torch.long) for k, pad in (("input_ids", pad_student),
                                                                       ("teacher_input_ids", pad_teacher))}
    for k in ("attention_mask", "teacher_attention_mask"):
        out[k] = torch.zeros((n, L), dtype=torch.long)
    for k in ("student_group", "teacher_group", "group_student_start", "group_teacher_start"):
        out[k] = torch.full((n, L), -1, dtype=torch.long)
    out["group_exact"] = torch.zeros((n, L), dtype=torch.bool)
    labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
    teacher_mask = torch.zeros((n, L), dtype=torch.bool)
    for r, (s, t) in enumerate(blocks):
        s_ids, t_ids = torch.tensor([x for x, _ in s]), torch.tensor([x for x, _ in t])
        out["input_ids"][r, :len(s)], out["attention_mask"][r, :len(s)] = s_ids, 1
        out["teacher_input_ids"][r, :len(t)], out["teacher_attention_mask"][r, :len(t)] = t_ids, 1
        labels[r, :len(s) - 1] = s_ids[1:]
        teacher_mask[r, :len(t) - 1] = True
        for g, (s0, s1, t0, t1) in enumerate(align_spans([e for _, e in s], [e for _, e in t])[1:]):
            out["group_student_start"][r, g], out["group_teacher_start"][r, g] = s0 - 1, t0 - 1
            out["group_exact"][r, g] = s1 - s0 == 1 and t1 - t0 == 1
            out["student_group"][r, s0 - 1:s1 - 1] = g
            out["teacher_group"][r, t0 - 1:t1 - 1] = g
    out.update(labels=labels, mask=label_mask(labels), teacher_mask=teacher_mask)
    return out


def teacher_view(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """What the teacher reads of a batch: its own tokens in a cross-tokenizer batch, else the batch itself."""
    if TEACHER_KEYS[0] in batch:
        return {"input_ids": batch[TEACHER_KEYS[0]], "attention_mask": batch[TEACHER_KEYS[1]]}
    return batch


# ------------------------------------------------------------------------------------------ vocabularies

def token_strings(tokenizer: Any) -> dict[str, int]:
    """``{string: id}`` of the ids that decode, alone, to a string no other id decodes to (special tokens and
    partial UTF-8 bytes left out). Each id is decoded after an anchor token (``"a"``), so a word-start marker
    (``Ġ`` / ``▁``) comes out as the space it stands for, as it would inside a text."""
    n = len(tokenizer)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    if len(anchor) == 1:
        prefix = tokenizer.decode(anchor, **kw)
        decoded = [s[len(prefix):] if s.startswith(prefix) else None
                   for s in tokenizer.batch_decode([[anchor[0], i] for i in range(n)], **kw)]
    else:
        decoded = tokenizer.batch_decode([[i] for i in range(n)], **kw)
    seen: dict[str, int] = {}
    dup: set[str] = set()
    for i, s in enumerate(decoded):
        if i in specials or not s or "\ufffd" in s:
            continue
        if s in seen:
            dup.add(s)
        seen[s] = i
    return {s: i for s, i in seen.items() if s not in dup}


def vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[Tensor, Tensor]:
    """``(student_ids, teacher_ids)``: the token pairs that decode to the same string (see
    :func:`token_strings`), plus the two EOS tokens; sorted by student id."""
    s, t = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
    pairs = {s[k]: t[k] for k in s.keys() & t.keys()}
    se, te = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if se is not None and te is not None:
        pairs = {a: b for a, b in pairs.items() if b != te}
        pairs[int(se)] = int(te)
    keys = sorted(pairs)
    return torch.tensor(keys, dtype=torch.long), torch.tensor([pairs[k] for k in keys], dtype=torch.long)


# ------------------------------------------------------------------------------------ held-out characters

def char_text_blocks(tokenizer: Any, texts: Iterable[str], *, block_length: int, tokens: int) -> dict[str, Tensor]:
    """The held-out tensors of :func:`kdistill.data.lm.text_blocks` (the same blocks) plus ``target_chars``: the
    number of characters of the token predicted at each position (EOS: 1), so that bits per character -- the
    figure comparable across tokenizers -- can be computed beside perplexity."""
    _require_fast(tokenizer, "the")
    eos = tokenizer.eos_token_id
    ids = BlockPacker(block_length, eos_id=eos, max_blocks=max(1, tokens // block_length))
    chars = BlockPacker(block_length, eos_id=None if eos is None else 1, max_blocks=ids.max_blocks)
    for text in texts:
        one, ends = token_ends(tokenizer, text)
        ids.add(one)
        chars.add([e - p for e, p in zip(ends, [0, *ends[:-1]])])
        if ids.full:
            break
    out = lm_tensors(ids.tensor())
    counts = chars.tensor()
    target = torch.zeros_like(counts)
    target[:, :-1] = counts[:, 1:]
    out["target_chars"] = target
    return out


def check_cross_data(*, layout: str, stream: bool, cache: bool, sequence_kd: bool, prompt_tokens: int) -> None:
    """Refuse the data settings a cross-tokenizer run does not support yet (one error naming them)."""
    bad = [name for name, on in (("data.messages_column / data.prompt_column", layout != "text"),
                                 ("data.stream", stream), ("cache", cache), ("data.sequence_kd", sequence_kd),
                                 ("data.prompt_tokens", prompt_tokens > 0)) if on]
    if bad:
        raise KDistillError(f"teacher and student use different tokenizers, and the recipe sets {', '.join(bad)}; "
                            "expected a text corpus packed into blocks (data.name kjv / texts, or files with a "
                            "text_column, not streamed), trained from the live teacher. Cross-tokenizer runs align "
                            "the two tokenisations of each text, which is not implemented for chat or prompt rows, "
                            "streams, top-k caches or stored generations yet. Fix: remove them, or give the student "
                            "the teacher's tokenizer.")


def cross_tensors(student_tokenizer: Any, teacher_tokenizer: Any, train_texts: Sequence[str],
                  eval_texts: Sequence[str], *, block_length: int, train_tokens: int, eval_tokens: int
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """``(training tensors, teacher held-out tensors, student held-out tensors)`` of a cross-tokenizer run: the
    aligned blocks of :func:`cross_blocks` (within ``train_tokens`` student tokens), and the held-out texts packed by
    each tokenizer alone with ``target_chars`` (:func:`char_text_blocks`: each model is scored on its own tokens,
    bits per character compares them)."""
    train = cross_blocks(student_tokenizer, teacher_tokenizer, train_texts, block_length=block_length,
                         max_blocks=max(1, train_tokens // block_length))
    held = [char_text_blocks(t, eval_texts, block_length=block_length, tokens=eval_tokens)
            for t in (teacher_tokenizer, student_tokenizer)]
    return train, held[0], held[1]
