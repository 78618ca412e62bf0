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
from .classification import TensorDictDataset


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
    labels = torch.full_like(blocks, -100)
    labels[:, :-1] = blocks[:, 1:]
    if prompt_length:
        labels[:, : prompt_length - 1] = -100
    out = {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": labels, "mask": labels != -100}
    if prompt_length:
        out["prompt_length"] = torch.full((N,), prompt_length, dtype=torch.long)
    return out


def lm_dataset(blocks: Tensor, *, prompt_length: int = 0) -> TensorDictDataset:
    return TensorDictDataset(**lm_tensors(blocks, prompt_length=prompt_length))


def cache_dataset(cache: Any) -> TensorDictDataset:
    """All sequences of a :class:`kdistill.teachers.cache.TopKCache` as one dataset (inputs + targets)."""
    batch = cache.collate(list(cache))
    return TensorDictDataset(**batch)
