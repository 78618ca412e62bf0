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
from .lm import IGNORE_INDEX, BlockPacker, context_ids, label_mask, lm_tensors, pad_id_of

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
    bad = [name for name, on in (("data.stream", stream), ("cache", cache), ("data.sequence_kd", sequence_kd),
                                 ("data.prompt_tokens on text blocks", prompt_tokens > 0 and layout == "text"))
           if on]
    if bad:
        raise KDistillError(f"teacher and student use different tokenizers, and the recipe sets {', '.join(bad)}; "
                            "expected texts packed into blocks, chat conversations (data.messages_column) or prompt "
                            "rows (data.prompt_column), read from files or a built-in corpus (not streamed) and "
                            "trained from the live teacher. Cross-tokenizer runs align the two tokenisations of each "
                            "text, which is not implemented for streams, top-k caches, stored generations or prompts "
                            "cut from text blocks yet. Fix: remove them, or give the student the teacher's tokenizer.")


def cross_tensors(student_tokenizer: Any, teacher_tokenizer: Any, train_items: Sequence[Any],
                  eval_items: Sequence[Any], *, block_length: int, train_tokens: int, eval_tokens: int,
                  layout: str = "text", prompt_tokens: int = 0
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """``(training tensors, teacher held-out tensors, student held-out tensors)`` of a cross-tokenizer run.

    Texts (``layout="text"``): the aligned blocks of :func:`cross_blocks` (within ``train_tokens`` student tokens),
    and the held-out texts packed by each tokenizer alone with ``target_chars`` (:func:`char_text_blocks`: each model
    is scored on its own tokens, bits per character compares them). Chat conversations and prompt rows: the aligned
    rows of :func:`cross_rows`, and the two sides of the held-out rows (each model scored on the same replies in its
    own tokens and format, ``target_chars`` included)."""
    if layout != "text":
        kw = dict(layout=layout, block_length=block_length, prompt_tokens=prompt_tokens)
        held = cross_rows(student_tokenizer, teacher_tokenizer, eval_items, **kw, where="data (validation split)")
        train = cross_rows(student_tokenizer, teacher_tokenizer, train_items, **kw, where="data (train split)")
        return train, side_of(held, "teacher"), side_of(held, "student")
    train = cross_blocks(student_tokenizer, teacher_tokenizer, train_items, block_length=block_length,
                         max_blocks=max(1, train_tokens // block_length))
    held = [char_text_blocks(t, eval_items, block_length=block_length, tokens=eval_tokens)
            for t in (teacher_tokenizer, student_tokenizer)]
    return train, held[0], held[1]


# ------------------------------------------------------------------------------------ chat and prompt rows

def _contexts_and_replies(items: Sequence[Any], layout: str, where: str) -> list[tuple[int, Any, str]]:
    """``(row, context, reply)`` of every training target: a prompt row's prompt (text or chat turns) and its
    completion; for a conversation, each assistant turn with the turns before it as its context."""
    if layout not in ("chat", "prompts"):
        raise KDistillError(f"{where}: got layout {layout!r}, expected 'chat' or 'prompts' (texts are packed by "
                            "cross_blocks).")
    out = []
    for row, item in enumerate(items):
        if layout == "prompts":
            prompt, completion = item
            out.append((row, prompt, completion))
            continue
        for i, m in enumerate(item):
            if m["role"] == "assistant":
                out.append((row, item[:i], m["content"]))
    return out


def _context_ids(tokenizer: Any, context: Any, *, width: int, where: str) -> list[int]:
    """A context's tokens in this tokenizer's own format (:func:`kdistill.data.lm.context_ids`); an empty context,
    or one longer than ``width`` tokens, is refused."""
    ids = context_ids(tokenizer, context, where=where)
    if not 1 <= len(ids) <= width:
        raise KDistillError(f"{where}: the context has {len(ids)} tokens, expected 1 to {width} (data.prompt_tokens "
                            "for prompt rows, block_length - 1 for chats). Fix: raise that limit or shorten the "
                            "context.")
    return ids


def cross_rows(student_tokenizer: Any, teacher_tokenizer: Any, items: Sequence[Any], *, layout: str,
               block_length: int, prompt_tokens: int = 0, where: str = "data") -> dict[str, Tensor]:
    """Aligned rows of chat conversations (``layout="chat"``: one row per assistant turn, the turns before it as
    context) or (prompt, completion) rows (``"prompts"``), ``(N, block_length)`` each, with the keys of
    :func:`cross_blocks` plus ``target_chars`` / ``teacher_target_chars`` (characters of the token each position
    predicts), ``teacher_labels`` and ``teacher_offset`` ``(N,)``: the teacher's context minus the student's, in
    tokens (methods that pair positions in order, as ULD does, shift the teacher by it: :func:`shift_positions`).

    Each side formats the context its own way (its chat template, or the prompt's tokens), then the reply's tokens
    and its EOS; only the reply is aligned (its text is the same on both sides) and trained on. The reply's first
    group is predicted by each side's last context token, which has read the whole context. A reply is cut at the
    last shared token boundary that fits ``block_length`` on both sides. A context longer than ``prompt_tokens``
    (prompt rows) or ``block_length - 1`` tokens (chat) on either side, or a reply of which nothing fits, is refused
    with its row."""
    _require_fast(student_tokenizer, "student")
    _require_fast(teacher_tokenizer, "teacher")
    L = int(block_length)
    width = prompt_tokens if layout == "prompts" else L - 1
    rows: list[_Row] = []
    for row, context, reply in _contexts_and_replies(items, layout, where):
        at = f"{where}, row {row + 1}"
        cs = _context_ids(student_tokenizer, context, width=width, where=f"{at} (student)")
        ct = _context_ids(teacher_tokenizer, context, width=width, where=f"{at} (teacher)")
        S, T = _text_tokens(student_tokenizer, reply, 0), _text_tokens(teacher_tokenizer, reply, 0)
        groups = [g for g in align_spans([e for _, e in S], [e for _, e in T])
                  if len(cs) + g[1] <= L and len(ct) + g[3] <= L]
        if not groups:
            raise KDistillError(f"{at}: nothing of the reply fits in data.block_length = {L} tokens after the context "
                                f"({len(cs)} student / {len(ct)} teacher tokens). Fix: raise block_length or shorten "
                                "the context.")
        rows.append((cs, S[:groups[-1][1]], ct, T[:groups[-1][3]], groups))
    if not rows:
        raise KDistillError(f"{where}: no reply to train on; expected prompt rows or conversations with an "
                            "assistant turn.")
    return _row_tensors(rows, L, pad_student=pad_id_of(student_tokenizer), pad_teacher=pad_id_of(teacher_tokenizer))


#: one aligned row: student context ids, student reply (id, end) tokens, the same for the teacher, the reply's groups
_Row = tuple[list[int], list[tuple[int, int]], list[int], list[tuple[int, int]], list[tuple[int, int, int, int]]]


def _row_tensors(rows: list[_Row], L: int, *, pad_student: int, pad_teacher: int) -> dict[str, Tensor]:
    n = len(rows)
    out = {k: torch.full((n, L), pad, dtype=torch.long) for k, pad in (("input_ids", pad_student),
                                                                       ("teacher_input_ids", pad_teacher))}
    for k in ("attention_mask", "teacher_attention_mask", "target_chars", "teacher_target_chars"):
        out[k] = torch.zeros((n, L), dtype=torch.long)
    for k in ("student_group", "teacher_group", "group_student_start", "group_teacher_start"):
        out[k] = torch.full((n, L), -1, dtype=torch.long)
    out["group_exact"] = torch.zeros((n, L), dtype=torch.bool)
    labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
    teacher_labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
    for r, (cs, S, ct, T, groups) in enumerate(rows):
        for ctx, reply, ids, attn, lab, chars in ((cs, S, "input_ids", "attention_mask", labels, "target_chars"),
                                                  (ct, T, "teacher_input_ids", "teacher_attention_mask",
                                                   teacher_labels, "teacher_target_chars")):
            reply_ids = [i for i, _ in reply]
            seq = torch.tensor(ctx + reply_ids, dtype=torch.long)
            out[ids][r, :len(seq)], out[attn][r, :len(seq)] = seq, 1
            c = len(ctx)
            lab[r, c - 1:c - 1 + len(reply)] = torch.tensor(reply_ids, dtype=torch.long)
            ends = [e for _, e in reply]
            out[chars][r, c - 1:c - 1 + len(reply)] = torch.tensor([e - p for e, p in zip(ends, [0, *ends[:-1]])])
        for g, (s0, s1, t0, t1) in enumerate(groups):
            s0, s1, t0, t1 = s0 + len(cs), s1 + len(cs), t0 + len(ct), t1 + len(ct)
            out["group_student_start"][r, g], out["group_teacher_start"][r, g] = s0 - 1, t0 - 1
            out["group_exact"][r, g] = s1 - s0 == 1 and t1 - t0 == 1
            out["student_group"][r, s0 - 1:s1 - 1] = g
            out["teacher_group"][r, t0 - 1:t1 - 1] = g
    out.update(labels=labels, mask=label_mask(labels), teacher_labels=teacher_labels,
               teacher_mask=label_mask(teacher_labels),
               teacher_offset=torch.tensor([len(r[2]) - len(r[0]) for r in rows], dtype=torch.long))
    return out


def shift_positions(x: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, valid)`` with ``y[b, p] = x[b, p + offset[b]]`` along the position axis (dim 1; any trailing axes) and
    ``valid[b, p]`` False where ``p + offset[b]`` falls outside the row (``y`` repeats an edge value there). Pairs a
    cross-tokenizer row's i-th reply position on the student side with the teacher's (``teacher_offset``: how many
    more context tokens the teacher's side has)."""
    B, L = x.shape[:2]
    pos = torch.arange(L, device=x.device).unsqueeze(0) + offset.to(x.device).long().unsqueeze(1)
    valid = (pos >= 0) & (pos < L)
    idx = pos.clamp(0, L - 1)
    y = x.gather(1, idx.view(B, L, *([1] * (x.dim() - 2))).expand(B, L, *x.shape[2:]))
    return y, valid


def side_of(tensors: Mapping[str, Tensor], side: str) -> dict[str, Tensor]:
    """One model's LM tensors (``input_ids``, ``attention_mask``, ``labels``, ``mask``, ``target_chars``) from
    aligned rows (:func:`cross_rows`): ``"student"`` or ``"teacher"``, e.g. to score each on its own tokens."""
    if side == "student":
        keys = {k: k for k in ("input_ids", "attention_mask", "labels", "mask", "target_chars")}
    elif side == "teacher":
        keys = {k: f"teacher_{k}" for k in ("input_ids", "attention_mask", "labels", "mask", "target_chars")}
    else:
        raise KDistillError(f"side_of: got side {side!r}, expected 'student' or 'teacher'.")
    return {k: tensors[v] for k, v in keys.items()}
