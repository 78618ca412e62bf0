"""Language-model data: token blocks for next-token distillation, (prompt, continuation) pairs for
on-policy distillation, and top-k cache datasets. ``labels == -100`` becomes the bool ``mask`` here.

A batch is a dict of tensors::

    input_ids (B, L) long, attention_mask (B, L) long,
    labels (B, L) long   next token at each position, -100 where nothing is predicted
    mask (B, L) bool     labels != -100 (what the losses average over)
    prompt_length (B,)   only for prompt data: the continuation starts there (the same for a whole batch)

Blocks have a fixed length (texts are concatenated with an EOS between them and cut), so batches need
no padding and the token count per batch is constant.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import KDistillError
from .loaders import TensorDictDataset

#: the label of a position where nothing is predicted (the Hugging Face convention)
IGNORE_INDEX = -100


def label_mask(labels: Tensor) -> Tensor:
    """The bool ``mask`` (True = counts) of a ``labels`` tensor: the one place ``IGNORE_INDEX`` becomes a mask."""
    return labels != IGNORE_INDEX


def tokenize_texts(tokenizer: Any, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens)."""
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


class BlockPacker:
    """Packs token lists, fed one at a time, into ``block_length``-token blocks (an EOS after each list), up to
    ``max_blocks``; the tail that does not fill a block is dropped. Lets a caller stop reading its source as soon
    as :attr:`full`, and feed several packers (train, held-out) from one pass."""

    def __init__(self, block_length: int, *, eos_id: int | None, max_blocks: int | None = None) -> None:
        if block_length < 2:
            raise KDistillError(f"block_length: got {block_length}, expected >= 2 (a token and its successor).")
        self.block_length, self.eos_id, self.max_blocks = block_length, eos_id, max_blocks
        self.blocks: list[list[int]] = []
        self._buffer: list[int] = []

    @property
    def full(self) -> bool:
        return self.max_blocks is not None and len(self.blocks) >= self.max_blocks

    def add(self, ids: Sequence[int]) -> None:
        if self.full:
            return
        self._buffer.extend(ids)
        if self.eos_id is not None:
            self._buffer.append(self.eos_id)
        L = self.block_length
        while len(self._buffer) >= L and not self.full:
            self.blocks.append(self._buffer[:L])
            del self._buffer[:L]

    def tensor(self) -> Tensor:
        """The ``(N, block_length)`` blocks; refuses none at all."""
        if not self.blocks:
            raise KDistillError(f"pack_blocks: the texts hold fewer than {self.block_length} tokens; expected at "
                                "least one full block. Use more text or a shorter data.block_length.")
        return torch.tensor(self.blocks, dtype=torch.long)


def pack_blocks(token_lists: Iterable[Sequence[int]], block_length: int, *, eos_id: int | None,
                max_blocks: int | None = None) -> Tensor:
    """Concatenate token lists (EOS after each) and cut into ``(N, block_length)`` blocks; the tail is dropped.
    ``token_lists`` is consumed only until ``max_blocks`` blocks are full."""
    packer = BlockPacker(block_length, eos_id=eos_id, max_blocks=max_blocks)
    for ids in token_lists:
        packer.add(ids)
        if packer.full:
            break
    return packer.tensor()


def lm_tensors(blocks: Tensor, *, prompt_length: int = 0) -> dict[str, Tensor]:
    """Tensors of a next-token dataset over fixed-length blocks. With ``prompt_length > 0`` only the
    continuation (tokens after the prompt) counts: the (prompt, continuation) format of on-policy KD."""
    N, L = blocks.shape
    if not 0 <= prompt_length < L:
        raise KDistillError(f"prompt_length: got {prompt_length}, expected in [0, {L - 1}] (block length {L}).")
    labels = torch.full_like(blocks, IGNORE_INDEX)
    labels[:, :-1] = blocks[:, 1:]
    if prompt_length:
        labels[:, : prompt_length - 1] = IGNORE_INDEX
    out = {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": labels, "mask": label_mask(labels)}
    if prompt_length:
        out["prompt_length"] = torch.full((N,), prompt_length, dtype=torch.long)
    return out


def lm_dataset(blocks: Tensor, *, prompt_length: int = 0) -> TensorDictDataset:
    return TensorDictDataset(**lm_tensors(blocks, prompt_length=prompt_length))


def cache_dataset(cache: Any) -> TensorDictDataset:
    """All sequences of a :class:`kdistill.teachers.cache.TopKCache` as one dataset (inputs + targets)."""
    batch = cache.collate(list(cache))
    return TensorDictDataset(**batch)


def template_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # a BatchEncoding in recent transformers
        out = out["input_ids"]
    return list(out)


def check_conversation(messages: Any, where: str) -> list[dict[str, str]]:
    """``messages`` as OpenAI-style turns ``[{role, content}, ...]`` with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise KDistillError(f"{where}: got {type(messages).__name__}, expected a non-empty list of "
                            '{"role": ..., "content": ...} turns.')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise KDistillError(f"{where}, turn {j + 1}: got {str(m)[:80]!r}, expected an object with string "
                                "'role' and 'content'.")
    if not any(m["role"] == "assistant" for m in messages):
        raise KDistillError(f"{where}: the conversation has no assistant turn; expected at least one (the loss is on "
                            "assistant tokens). Fix: drop the row or add the reply.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_tensors(tokenizer: Any, conversations: Sequence[list[dict[str, str]]], *, max_length: int,
                 where: str = "data") -> dict[str, Tensor]:
    """Conversations formatted with the tokenizer's chat template, right-padded to ``max_length``; ``labels``
    (and so ``mask``) only on the assistant turns' tokens, so the losses train the replies, never the prompts.

    An assistant turn's tokens are the difference between the template of the turns before it (with the
    generation prompt) and the template including it; a template that does not extend its own prefixes this
    way is refused. A conversation cut by ``max_length`` before its first assistant token is refused too."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise KDistillError("data.messages_column: the tokenizer has no chat template; expected a chat model's "
                            "tokenizer (tokenizer.chat_template). Fix: use text_column, or a tokenizer with one.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(conversations)
    ids = torch.full((n, max_length), int(pad if pad is not None else 0), dtype=torch.long)
    attn = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
    for row, messages in enumerate(conversations):
        full = template_ids(tokenizer, messages, add_generation_prompt=False)
        train = torch.zeros(len(full), dtype=torch.bool)  # True where the token is part of an assistant reply
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(template_ids(tokenizer, messages[:i], add_generation_prompt=True))
            upto = template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if full[: len(upto)] != upto or start > len(upto):
                raise KDistillError(f"{where}, row {row + 1}: the chat template does not extend its own prefixes "
                                    "(the tokens of the first turns change when a turn is added), so the assistant "
                                    "tokens cannot be told apart. Fix: use a tokenizer whose template appends turns.")
            train[start:len(upto)] = True
        length = min(len(full), max_length)
        seq = torch.tensor(full[:length], dtype=torch.long)
        ids[row, :length], attn[row, :length] = seq, 1
        targets = train[1:length].clone()  # position t predicts token t + 1
        labels[row, : length - 1] = torch.where(targets, seq[1:], torch.full_like(seq[1:], IGNORE_INDEX))
        if not bool(targets.any()):
            raise KDistillError(f"{where}, row {row + 1}: nothing of the assistant's reply fits in data.block_length "
                                f"= {max_length} tokens (the conversation has {len(full)}). Fix: raise block_length "
                                "or shorten the conversation.")
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": label_mask(labels)}


def _check_prompt_width(prompt_width: int, max_length: int) -> None:
    if not 1 <= prompt_width < max_length:
        raise KDistillError(f"data.prompt_tokens: got {prompt_width}, expected 1 <= prompt_tokens < block_length "
                            f"({max_length}).")


def context_ids(tokenizer: Any, context: str | list[dict[str, str]], *, where: str) -> list[int]:
    """The tokens of what a model continues from: chat turns (``[{role, content}, ...]``) through the tokenizer's
    chat template with its generation prompt, or a text as plain tokens (no special tokens)."""
    if isinstance(context, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise KDistillError(f"{where}: the prompt is a list of chat turns and the tokenizer has no chat template; "
                                "expected a chat model's tokenizer. Fix: use such a tokenizer, or give the prompt as "
                                "text.")
        return template_ids(tokenizer, context, add_generation_prompt=True)
    return list(tokenizer(context, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]], *, prompt_width: int,
               where: str = "data") -> list[list[int]]:
    """Token ids of each prompt: a text (no special tokens), or chat turns (``[{role, content}, ...]``) formatted
    with the tokenizer's chat template and its generation prompt, so a chat model continues as the assistant. A
    prompt that is empty or longer than ``prompt_width`` tokens is refused with its row."""
    out = []
    for row, prompt in enumerate(prompts):
        ids = context_ids(tokenizer, prompt, where=f"{where}, row {row + 1}")
        if not ids or len(ids) > prompt_width:
            raise KDistillError(f"{where}, row {row + 1}: the prompt has {len(ids)} tokens, expected 1 to "
                                f"data.prompt_tokens = {prompt_width}. Fix: raise prompt_tokens (block_length "
                                "holds prompt and completion) or shorten the prompt.")
        out.append(ids)
    return out


def prompt_tensors(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, prompt_width: int, max_length: int,
                   where: str = "data") -> dict[str, Tensor]:
    """(prompt, completion) texts as ``(N, max_length)`` rows: the prompt left-padded to ``prompt_width`` tokens,
    then the completion and an EOS, cut to the row and right-padded. Labels cover the completion and its EOS (the
    student learns to stop), ``prompt_length`` is ``prompt_width`` for every row: the layout on-policy methods
    continue from (see :func:`kdistill.methods.gkd.continuation_batch`). A prompt longer than ``prompt_width`` is
    refused with its row."""
    _check_prompt_width(prompt_width, max_length)
    eos = tokenizer.eos_token_id
    p_ids = prompt_ids(tokenizer, [p for p, _ in pairs], prompt_width=prompt_width, where=where)
    c_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
             for _, c in pairs]
    return prompt_id_tensors(list(zip(p_ids, c_ids)), prompt_width=prompt_width, max_length=max_length,
                             pad_id=pad_id_of(tokenizer))


def pad_id_of(tokenizer: Any) -> int:
    """The id padding is written with: the pad token, else EOS, else 0 (padding never counts: attention 0)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def prompt_id_tensors(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, prompt_width: int, max_length: int,
                      pad_id: int) -> dict[str, Tensor]:
    """The rows of :func:`prompt_tensors` from token ids: ``(prompt ids, completion ids)`` pairs, the completion
    taken as given (with its EOS if it has one) and cut to ``max_length - prompt_width`` tokens."""
    _check_prompt_width(prompt_width, max_length)
    n = len(pairs)
    ids = torch.full((n, max_length), int(pad_id), dtype=torch.long)
    attn = torch.zeros((n, max_length), dtype=torch.long)
    for row, (p_ids, c_ids) in enumerate(pairs):
        if not 1 <= len(p_ids) <= prompt_width:
            raise KDistillError(f"prompt_id_tensors: row {row + 1} has a prompt of {len(p_ids)} tokens, expected 1 to "
                                f"prompt_width = {prompt_width}.")
        c_ids = list(c_ids)[: max_length - prompt_width]
        ids[row, prompt_width - len(p_ids):prompt_width] = torch.tensor(list(p_ids), dtype=torch.long)
        attn[row, prompt_width - len(p_ids):prompt_width] = 1
        ids[row, prompt_width:prompt_width + len(c_ids)] = torch.tensor(c_ids, dtype=torch.long)
        attn[row, prompt_width:prompt_width + len(c_ids)] = 1
    labels = torch.full_like(ids, IGNORE_INDEX)
    counts = attn[:, 1:].bool()
    counts[:, : prompt_width - 1] = False  # the prompt is context, not a target
    labels[:, :-1] = torch.where(counts, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": label_mask(labels),
            "prompt_length": torch.full((n,), prompt_width, dtype=torch.long)}


# ------------------------------------------------------------------------------------------- corpora

#: what the items of a corpus are: plain texts (packed into blocks), chat conversations, (prompt, completion) rows
LAYOUTS = ("text", "chat", "prompts")


def lm_corpus(*, name: str, texts: Sequence[str] = (), files: Any = None, format: str = "auto",
              hf_dataset: Mapping[str, Any] | None = None, text_column: str = "text",
              messages_column: str | None = None, prompt_column: str | None = None,
              completion_column: str | None = None, eval_fraction: float = 0.05) -> tuple[list[Any], list[Any]]:
    """``(train items, held-out items)``: texts, conversations (``messages_column``) or ``(prompt, completion)``
    tuples (``prompt_column`` + ``completion_column``). ``name``: ``kjv`` (the King James Bible), ``wordnet``
    (WordNet glosses, ``"lemma: gloss"``, in a fixed shuffled order so every part of speech is in both parts),
    ``texts`` (the given strings) or ``files`` (``files`` / ``hf_dataset``). For the built-in corpora the held-out
    part is the *end* of the corpus (never shuffled in); for files, a ``validation`` file or a seeded
    ``eval_fraction`` of the rows."""
    if name == "files":
        return _file_corpus(files=files, format=format, hf_dataset=hf_dataset, text_column=text_column,
                            messages_column=messages_column, prompt_column=prompt_column,
                            completion_column=completion_column, eval_fraction=eval_fraction)
    if name == "kjv":
        from .text import kjv_verses

        items = [v[3] for v in kjv_verses()]
    elif name == "wordnet":
        items = wordnet_texts()
    elif name == "texts":
        items = list(texts)
    else:
        raise KDistillError(f"data.name: got {name!r}, expected one of kjv, wordnet, texts, files.")
    n_eval = max(1, int(round(len(items) * eval_fraction)))
    if n_eval >= len(items):
        raise KDistillError(f"data: {len(items)} texts leave nothing to train on with eval_fraction "
                            f"{eval_fraction}; expected more texts or a smaller fraction.")
    return items[:-n_eval], items[-n_eval:]


def wordnet_texts() -> list[str]:
    """Every WordNet synset as one text, ``"lemma: gloss"`` (definition and usage examples; a text shared by
    several synsets once), in an order shuffled once with seed 0: a second text domain (dictionary prose) for the
    models trained on the KJV."""
    import numpy as np

    from .text import wordnet_pairs

    texts = list(dict.fromkeys(f"{p.query}: {p.candidate}" for p in wordnet_pairs(examples=True)))
    return [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]


def shift_texts(*, name: str, texts: Sequence[str] = (), files: Any = None, format: str = "auto",
                hf_dataset: Mapping[str, Any] | None = None, text_column: str = "text") -> list[str]:
    """The texts of a shifted domain (the llm task's ``eval.shift``): the held-out part of a built-in corpus
    (``wordnet``, ``kjv``), or every given text (``texts``) or row of ``text_column`` (``files`` / ``hf_dataset``)."""
    if name == "texts":
        if not texts:
            raise KDistillError("eval.shift: name 'texts' needs a non-empty texts list.")
        return list(texts)
    train, held = lm_corpus(name=name, files=files, format=format, hf_dataset=hf_dataset, text_column=text_column)
    return list(held) if name in ("kjv", "wordnet") else list(train) + list(held)


#: the text every canary starts with; the random digits after it are the secret
CANARY_PREFIX = "my secret number is"


def canary_texts(*, count: int, length: int, seed: int = 0) -> list[str]:
    """``count`` canaries (The Secret Sharer, Carlini et al., 2019): ``"my secret number is d d ... d"`` with
    ``length`` random digits each (seeded, distinct), the format :func:`kdistill.eval.audit.canary_exposure`
    draws its candidates from."""
    if count < 1 or length < 1 or 10 ** length < 2 * count:
        raise KDistillError(f"canaries: got count {count}, length {length}; expected count >= 1 and length >= 1 "
                            "with room for distinct secrets (10**length >= 2 * count).")
    rng = torch.Generator().manual_seed(int(seed))
    out: list[str] = []
    while len(out) < count:
        text = canary_text(torch.randint(0, 10, (length,), generator=rng).tolist())
        if text not in out:
            out.append(text)
    return out


def canary_text(digits: Sequence[int]) -> str:
    """The canary of a digit sequence."""
    return f"{CANARY_PREFIX} {' '.join(str(int(d)) for d in digits)}"


def insert_canaries(items: Sequence[str], *, count: int, repeats: int, length: int, seed: int = 0) -> list[str]:
    """``items`` with each of :func:`canary_texts` inserted ``repeats`` times at seeded random positions (the
    other items keep their order)."""
    if repeats < 1:
        raise KDistillError(f"canaries.repeats: got {repeats}, expected an integer >= 1.")
    canaries = canary_texts(count=count, length=length, seed=seed)
    out = list(items)
    rng = torch.Generator().manual_seed(int(seed) + 1)
    for text in canaries * repeats:
        out.insert(int(torch.randint(0, len(out) + 1, (1,), generator=rng)), text)
    return out


def _file_corpus(*, files: Any, format: str, hf_dataset: Mapping[str, Any] | None, text_column: str,
                 messages_column: str | None, prompt_column: str | None, completion_column: str | None,
                 eval_fraction: float) -> tuple[list[Any], list[Any]]:
    from .files import load_rows

    column = messages_column or prompt_column or text_column
    rows = load_rows(files=files, format=format, hf_dataset=hf_dataset, validation_fraction=eval_fraction,
                     test_fraction=0.0, seed=0, columns=[column, completion_column])
    out = []
    for split in ("train", "validation"):
        items = []
        for i, row in enumerate(rows[split], start=1):
            where = f"data ({split} split), row {i}, column {column!r}"
            if prompt_column is not None:
                prompt, completion = row[prompt_column], row[completion_column]
                if not isinstance(prompt, (str, list)) or not isinstance(completion, str):
                    raise KDistillError(f"{where}: got prompt {prompt!r} and completion {completion!r}, expected two "
                                        "texts (or chat turns [{role, content}, ...] as the prompt).")
                if isinstance(prompt, list):  # chat turns, formatted by the chat template (prompt_ids)
                    prompt = _prompt_turns(prompt, where)
                items.append((prompt, completion))
            elif messages_column is not None:
                items.append(check_conversation(row[column], where))
            else:
                items.append(_text_of(row[column], where))
        out.append(items)
    return out[0], out[1]


def _prompt_turns(turns: list[Any], where: str) -> list[dict[str, str]]:
    """A prompt given as chat turns: ``[{role, content}, ...]``, not ending with an assistant turn (the completion
    is the assistant's reply)."""
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise KDistillError(f"{where}, prompt turn {j + 1}: got {str(m)[:80]!r}, expected an object with string "
                                "'role' and 'content'.")
    if not turns or turns[-1]["role"] == "assistant":
        raise KDistillError(f"{where}: got prompt turns ending with {turns[-1]['role'] if turns else 'nothing'!r}, "
                            "expected at least one turn, the last not the assistant's (the completion column holds "
                            "the reply). Fix: move the reply to the completion column.")
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def _text_of(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise KDistillError(f"{where}: got {type(value).__name__}, expected a text string. For chat "
                            "conversations set data.messages_column instead of text_column.")
    return value


def corpus_texts(items: Iterable[Any]) -> Iterable[str]:
    """Plain texts of corpus items (a conversation's turns and a prompt row's two texts are joined), e.g. to train
    a tiny tokenizer on. Lazy for a lazy ``items``."""
    def text(x: Any) -> str:
        if isinstance(x, str):
            return x
        if isinstance(x, tuple):
            return " ".join(text(part) for part in x)
        return "\n".join(m["content"] for m in x)

    return (text(x) for x in items)


def row_tensors(tokenizer: Any, items: Sequence[Any], *, layout: str, block_length: int, prompt_tokens: int,
                where: str) -> dict[str, Tensor]:
    """Padded LM tensors of chat conversations (``layout="chat"``) or (prompt, completion) rows (``"prompts"``),
    labels on what the student learns (the replies / completions)."""
    if layout == "chat":
        return chat_tensors(tokenizer, items, max_length=block_length, where=where)
    if layout == "prompts":
        return prompt_tensors(tokenizer, items, prompt_width=prompt_tokens, max_length=block_length, where=where)
    raise KDistillError(f"row_tensors: got layout {layout!r}, expected 'chat' or 'prompts' (text is packed into "
                        "blocks by text_blocks).")


def text_blocks(tokenizer: Any, texts: Iterable[str], *, block_length: int, tokens: int) -> Tensor:
    """``block_length``-token blocks of ``texts`` (EOS between texts) within a budget of ``tokens`` (at least one
    block); ``texts`` is read only until the budget is full."""
    return pack_blocks((list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts), block_length,
                       eos_id=tokenizer.eos_token_id, max_blocks=max(1, tokens // block_length))


def token_blocks(tokenizer: Any, train_texts: Iterable[str], eval_texts: Iterable[str], *, block_length: int,
                 train_tokens: int, eval_tokens: int) -> tuple[Tensor, Tensor]:
    """(training blocks, held-out blocks) of ``block_length`` tokens, within the token budgets."""
    return (text_blocks(tokenizer, train_texts, block_length=block_length, tokens=train_tokens),
            text_blocks(tokenizer, eval_texts, block_length=block_length, tokens=eval_tokens))


def held_out_tensors(tokenizer: Any, train_items: Sequence[Any] | None, eval_items: Sequence[Any], *, layout: str,
                     block_length: int, prompt_tokens: int = 0, train_tokens: int = 0, eval_tokens: int,
                     stream: TextStream | None = None, chars: bool = False
                     ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor] | None]:
    """``(train_blocks, eval_tensors, train_tensors)``: packed blocks of text (``train_tensors`` None), or for chat
    and prompt rows no blocks and padded rows. ``train_items`` None builds the held-out tensors alone. With a
    ``stream`` (text only) the blocks come from it and the items are not used. ``chars`` (packed text from items,
    fast tokenizers): the held-out tensors also hold ``target_chars`` (the same blocks; see
    :func:`kdistill.data.align.char_text_blocks`), for bits per character."""
    if layout != "text":
        train_t = (row_tensors(tokenizer, train_items, layout=layout, block_length=block_length,
                               prompt_tokens=prompt_tokens, where="data (train split)")
                   if train_items is not None else None)
        return None, row_tensors(tokenizer, eval_items, layout=layout, block_length=block_length,
                                 prompt_tokens=prompt_tokens, where="data (validation split)"), train_t
    if stream is not None:
        train_blocks, eval_blocks = stream.blocks(tokenizer, block_length=block_length, eval_tokens=eval_tokens,
                                                  train_tokens=train_tokens if train_items is not None else None)
        return train_blocks, lm_tensors(eval_blocks), None
    if chars and getattr(tokenizer, "is_fast", False):
        from .align import char_text_blocks

        held = char_text_blocks(tokenizer, eval_items, block_length=block_length, tokens=eval_tokens)
        train_blocks = (text_blocks(tokenizer, train_items, block_length=block_length, tokens=train_tokens)
                        if train_items is not None else None)
        return train_blocks, held, None
    if train_items is None:
        return None, lm_tensors(text_blocks(tokenizer, eval_items, block_length=block_length,
                                            tokens=eval_tokens)), None
    train_blocks, eval_blocks = token_blocks(tokenizer, train_items, eval_items, block_length=block_length,
                                             train_tokens=train_tokens, eval_tokens=eval_tokens)
    return train_blocks, lm_tensors(eval_blocks), None


# ----------------------------------------------------------------------------------------- streaming

class TextStream:
    """The ``text_column`` of large files, read as a stream: rows are never all in memory, and reading stops as
    soon as the token budgets are packed (see :meth:`blocks`).

    Held-out rows: a ``validation`` file (``files: {train: ..., validation: ...}``), else every row whose hash
    of ``(seed, row index)`` falls below ``eval_fraction`` (:func:`kdistill.data.files.held_out_row`): the same
    rows on every read, without knowing the row count. ``rows_read`` counts the rows taken from the files."""

    def __init__(self, *, files: Any, format: str = "auto", text_column: str = "text", eval_fraction: float = 0.05,
                 seed: int = 0, base: Any = None) -> None:
        from .files import resolve_files

        if isinstance(files, Mapping):
            unknown = [k for k in files if k not in ("train", "validation")]
            if unknown or "train" not in files:
                raise KDistillError(f"data.files: got splits {sorted(files)}, expected 'train' and optionally "
                                    "'validation' (a streamed corpus has no test split).")
            self._train = resolve_files(files["train"], base=base)
            self._validation = resolve_files(files["validation"], base=base) if "validation" in files else None
        else:
            self._train, self._validation = resolve_files(files, base=base), None
        if self._validation is None and not 0.0 < eval_fraction < 0.5:
            raise KDistillError(f"data.eval_fraction: got {eval_fraction!r}, expected a number in (0, 0.5) (the "
                                "share of streamed rows held out), or a validation file in data.files.")
        self.format, self.text_column, self.eval_fraction, self.seed = format, text_column, eval_fraction, seed
        self.rows_read = 0

    def _texts(self, paths: list[Any], split: str) -> Iterator[str]:
        from .files import iter_rows, require_columns

        for i, row in enumerate(iter_rows(paths, format=self.format), start=1):
            self.rows_read += 1
            if self.text_column not in row:
                require_columns([row], [self.text_column], where=f"data ({split} split)")
            yield _text_of(row[self.text_column], f"data ({split} split), row {i}, column {self.text_column!r}")

    def _split_texts(self) -> Iterator[tuple[bool, str]]:
        """``(held_out, text)`` of the training files' rows, in order."""
        from .files import held_out_row

        for i, text in enumerate(self._texts(self._train, "train")):
            yield held_out_row(i, fraction=self.eval_fraction, seed=self.seed), text

    def texts(self, split: str) -> Iterator[str]:
        """The texts of ``split`` (``train`` or ``validation``), lazily."""
        if split not in ("train", "validation"):
            raise KDistillError(f"TextStream.texts: got split {split!r}, expected 'train' or 'validation'.")
        held = split == "validation"
        if self._validation is not None:
            yield from (self._texts(self._validation, split) if held else self._texts(self._train, split))
            return
        yield from (text for out, text in self._split_texts() if out == held)

    def blocks(self, tokenizer: Any, *, block_length: int, train_tokens: int | None, eval_tokens: int,
               chunk: int = 256) -> tuple[Tensor | None, Tensor]:
        """``(training blocks, held-out blocks)`` packed from the stream until both budgets (at least one block
        each) are full, then reading stops; ``train_tokens`` None packs the held-out blocks alone. Texts are
        tokenised ``chunk`` at a time, so at most ``chunk - 1`` rows are read past the budgets. The same files and
        settings give the same blocks on every call."""
        eos = tokenizer.eos_token_id
        train = (BlockPacker(block_length, eos_id=eos, max_blocks=max(1, train_tokens // block_length))
                 if train_tokens is not None else None)
        held = BlockPacker(block_length, eos_id=eos, max_blocks=max(1, eval_tokens // block_length))

        def feed(pairs: Iterator[tuple[BlockPacker | None, str]], packers: list[BlockPacker]) -> None:
            """Pack ``pairs`` until every one of ``packers`` is full (or the pairs end)."""
            while not all(p.full for p in packers):
                batch = list(itertools.islice(pairs, chunk))
                if not batch:
                    return
                keep = [(p, t) for p, t in batch if p is not None and not p.full]
                if keep:
                    ids = tokenizer([t for _, t in keep], add_special_tokens=False)["input_ids"]
                    for (packer, _), one in zip(keep, ids):
                        packer.add(one)

        if self._validation is not None:
            if train is not None:
                feed(((train, t) for t in self.texts("train")), [train])
            feed(((held, t) for t in self.texts("validation")), [held])
        else:
            feed((((held if out else train), t) for out, t in self._split_texts()),
                 [held] + ([train] if train is not None else []))
        if train is not None and not train.blocks:
            raise KDistillError(f"data.stream: the training rows hold fewer than {block_length} tokens; expected at "
                                "least one full block. Use more text or a shorter data.block_length.")
        if not held.blocks:
            raise KDistillError(f"data.stream: the held-out rows hold fewer than {block_length} tokens; expected at "
                                "least one full block. Raise data.eval_fraction, give a validation file, or shorten "
                                "data.block_length.")
        return (train.tensor() if train is not None else None), held.tensor()


def text_stream(*, files: Any, format: str = "auto", text_column: str = "text", eval_fraction: float = 0.05,
                seed: int = 0) -> TextStream:
    """A :class:`TextStream` over ``files`` (a path, glob, list, or ``{train, validation}``)."""
    return TextStream(files=files, format=format, text_column=text_column, eval_fraction=eval_fraction, seed=seed)
