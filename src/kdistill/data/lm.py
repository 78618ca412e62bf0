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

from collections.abc import Iterable, Sequence
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


def pack_blocks(token_lists: Iterable[Sequence[int]], block_length: int, *, eos_id: int | None,
                max_blocks: int | None = None) -> Tensor:
    """Concatenate token lists (EOS after each) and cut into ``(N, block_length)`` blocks; the tail is dropped."""
    if block_length < 2:
        raise KDistillError(f"block_length: got {block_length}, expected >= 2 (a token and its successor).")
    stream: list[int] = []
    blocks: list[list[int]] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
        while len(stream) >= block_length:
            blocks.append(stream[:block_length])
            stream = stream[block_length:]
            if max_blocks is not None and len(blocks) >= max_blocks:
                return torch.tensor(blocks, dtype=torch.long)
    if not blocks:
        raise KDistillError(f"pack_blocks: the texts hold fewer than {block_length} tokens; expected at least one "
                            "full block. Use more text or a shorter data.block_length.")
    return torch.tensor(blocks, dtype=torch.long)


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


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
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
        full = _template_ids(tokenizer, messages, add_generation_prompt=False)
        train = torch.zeros(len(full), dtype=torch.bool)  # True where the token is part of an assistant reply
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_template_ids(tokenizer, messages[:i], add_generation_prompt=True))
            upto = _template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
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


def prompt_tensors(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, prompt_width: int, max_length: int,
                   where: str = "data") -> dict[str, Tensor]:
    """(prompt, completion) texts as ``(N, max_length)`` rows: the prompt left-padded to ``prompt_width`` tokens,
    then the completion and an EOS, cut to the row and right-padded. Labels cover the completion and its EOS (the
    student learns to stop), ``prompt_length`` is ``prompt_width`` for every row: the layout on-policy methods
    continue from (see :func:`kdistill.methods.gkd.continuation_batch`). A prompt longer than ``prompt_width`` is
    refused with its row."""
    if not 1 <= prompt_width < max_length:
        raise KDistillError(f"data.prompt_tokens: got {prompt_width}, expected 1 <= prompt_tokens < block_length "
                            f"({max_length}).")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    n = len(pairs)
    ids = torch.full((n, max_length), int(pad if pad is not None else 0), dtype=torch.long)
    attn = torch.zeros((n, max_length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(pairs):
        p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not p_ids or len(p_ids) > prompt_width:
            raise KDistillError(f"{where}, row {row + 1}: the prompt has {len(p_ids)} tokens, expected 1 to "
                                f"data.prompt_tokens = {prompt_width}. Fix: raise prompt_tokens (block_length "
                                f"{max_length} holds prompt and completion) or shorten the prompt.")
        c_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
        c_ids = c_ids[: max_length - prompt_width]
        ids[row, prompt_width - len(p_ids):prompt_width] = torch.tensor(p_ids)
        attn[row, prompt_width - len(p_ids):prompt_width] = 1
        ids[row, prompt_width:prompt_width + len(c_ids)] = torch.tensor(c_ids, dtype=torch.long)
        attn[row, prompt_width:prompt_width + len(c_ids)] = 1
    labels = torch.full_like(ids, IGNORE_INDEX)
    counts = attn[:, 1:].bool()
    counts[:, : prompt_width - 1] = False  # the prompt is context, not a target
    labels[:, :-1] = torch.where(counts, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": label_mask(labels),
            "prompt_length": torch.full((n,), prompt_width, dtype=torch.long)}
