"""A tiny 1-D transformer classifier (token-sequence teacher / student for classic KD on sequences such
as MNIST-1D).

The input ``(B, L)`` (or ``(B, C, L)``) is cut into non-overlapping patches of ``patch_size`` samples, each
linearly embedded into a token (``tokens``), plus a learned position embedding. ``blocks.<i>`` are
pre-norm transformer encoder layers whose outputs are token sequences ``(B, T, D)`` (hookable by
token-level methods such as ``token_relation_graph``); ``embed`` is the mean-pooled, layer-normed
``(B, D)`` penultimate feature and ``head`` the linear classifier, as in the MLP / CNN families.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import expect
from ..registry import MODELS


class Transformer1D(nn.Module):
    """Patch tokens -> ``depth`` encoder layers -> mean pool -> ``embed`` -> ``head``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, dim: int = 32, depth: int = 2, heads: int = 4,
                 patch_size: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        shape = tuple(int(d) for d in input_shape)
        expect(len(shape) in (1, 2), "transformer1d input_shape", shape, "(L,) or (C, L)",
               "Use `cnn` for images.")
        channels, length = (1, shape[0]) if len(shape) == 1 else shape
        expect(patch_size >= 1 and length % patch_size == 0, "transformer1d patch_size", patch_size,
               f"a divisor of the sequence length {length}")
        expect(dim % heads == 0, "transformer1d dim", dim, f"a multiple of heads={heads}")
        expect(depth >= 1, "transformer1d depth", depth, "an integer >= 1")
        self.channels, self.length, self.patch_size = channels, length, int(patch_size)
        self.num_tokens = length // patch_size
        self.tokens = nn.Linear(channels * patch_size, dim)
        self.position = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.embed = nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = x.reshape(b, self.channels, self.num_tokens, self.patch_size).permute(0, 2, 1, 3).flatten(2)
        h = self.tokens(x) + self.position
        h = self.blocks(h)
        return self.head(self.embed(self.norm(h).mean(1)))


@MODELS.register("transformer1d")
def build_transformer1d(input_shape: Sequence[int], num_classes: int, dim: int = 32, depth: int = 2, heads: int = 4,
                        patch_size: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0) -> Transformer1D:
    """Tiny 1-D (ViT-style) transformer over patches of a sequence; ``blocks.<i>`` give ``(B, T, D)`` tokens."""
    return Transformer1D(input_shape, num_classes, dim=dim, depth=depth, heads=heads, patch_size=patch_size,
                         mlp_ratio=mlp_ratio, dropout=dropout)
