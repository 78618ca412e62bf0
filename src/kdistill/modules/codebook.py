"""A VQ-VAE codebook (van den Oord, Vinyals & Kavukcuoglu, 2017, "Neural Discrete Representation Learning"):
``K`` entries of width ``D``; an encoding is replaced by its nearest entry, with the straight-through gradient.

Storage, nearest-entry search and the k-means initialisation are those of
:class:`kdistill.modules.quantization.ProductQuantizer` with one subspace (a product quantiser with ``M = 1`` is
a plain vector quantiser); this module adds what a VQ-VAE trains with: the straight-through output, the codebook
and commitment terms (:func:`kdistill.losses.graph.vq_terms`), soft assignments, usage statistics and the
re-seeding of entries no encoding chose (dead codes), which keeps every entry in use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..losses.graph import code_logits, vq_terms
from .quantization import ProductQuantizer


class VectorQuantizer(nn.Module):
    """``num_codes`` entries of width ``dim``.

    ``forward(z) -> (quantized, codes, codebook_term, commitment_term)``: ``quantized`` ``(N, D)`` has the entries'
    values and ``z``'s gradient (straight-through), ``codes`` ``(N,)`` the chosen entries, the terms ``(N,)``
    unreduced."""

    def __init__(self, dim: int, num_codes: int = 512) -> None:
        super().__init__()
        self.pq = ProductQuantizer(int(dim), 1, int(num_codes))
        self.dim, self.num_codes = int(dim), int(num_codes)

    @property
    def codebook(self) -> Tensor:
        """``(K, D)``."""
        return self.pq.codebooks[0]

    def assign(self, z: Tensor) -> Tensor:
        """``(N,)`` index of each row's nearest entry."""
        return self.pq.assign(z)[:, 0]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        codes = self.assign(z)
        q = self.codebook[codes]
        codebook_term, commitment_term = vq_terms(z, q)
        quantized = z + (q - z).detach()  # values of q, gradient of z
        return quantized, codes, codebook_term, commitment_term

    def soft_logits(self, z: Tensor, *, code_temperature: float = 1.0) -> Tensor:
        """``(N, K)`` logits of the soft assignment (:func:`kdistill.losses.graph.code_logits`)."""
        return code_logits(z, self.codebook, code_temperature=code_temperature)

    @torch.no_grad()
    def init_kmeans(self, z: Tensor, *, iters: int = 10, seed: int = 0) -> VectorQuantizer:
        """k-means entries from encodings ``z`` (at least ``num_codes`` rows)."""
        self.pq.init_kmeans(z.detach().float(), iters=iters, seed=seed)
        return self

    @torch.no_grad()
    def restart_dead(self, z: Tensor, counts: Tensor, *, generator: torch.Generator | None = None) -> int:
        """Move every entry with ``counts == 0`` (no encoding chose it since the last restart) onto a random row of
        ``z``; returns how many moved."""
        dead = torch.nonzero(counts == 0).flatten()
        if len(dead) and len(z):
            pick = torch.randint(len(z), (len(dead),), generator=generator)
            self.pq.codebooks.data[0, dead] = z.detach().float()[pick.to(z.device)]
        return int(len(dead))

    @staticmethod
    def usage(codes: Tensor, num_codes: int) -> dict[str, float]:
        """``used``: share of the entries chosen at least once; ``perplexity``: ``exp`` of the entropy of the code
        histogram (``num_codes`` when every entry is chosen equally often)."""
        counts = torch.bincount(codes.flatten(), minlength=num_codes).float()
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"used": float((counts > 0).float().mean()), "perplexity": float(math.exp(float(entropy)))}
