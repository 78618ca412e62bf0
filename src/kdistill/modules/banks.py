"""Memory banks that methods own: fixed-size FIFO queues of past embeddings (MoCo-style; He et al., 2020,
"Momentum Contrast for Unsupervised Visual Representation Learning"). Buffers, so checkpoints carry them and a
resumed run continues with the same queue."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FifoQueue(nn.Module):
    """FIFO queue of the last ``size`` rows of width ``dim``; :meth:`get` returns the filled part (oldest
    slots are overwritten first once full)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("items", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def get(self) -> Tensor:
        return self.items[: int(self.filled)]

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        size = self.items.shape[0]
        x = x.detach()[-size:]
        idx = (int(self.ptr) + torch.arange(len(x), device=x.device)) % size
        self.items[idx] = x.to(self.items.dtype)
        self.ptr.fill_((int(self.ptr) + len(x)) % size)
        self.filled.fill_(min(int(self.filled) + len(x), size))
