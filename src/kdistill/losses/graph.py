"""Losses of graph distillation (pure functions, unreduced; reduce with ``masked_mean``).

* :func:`code_logits`: a node's similarity to every codebook entry, ``-||z - e_k||^2 / code_temperature``; its
  softmax is the node's soft code assignment (VQGraph's soft token assignment), and :func:`forward_kl` of two such
  logit tensors compares a student's and a teacher's assignments.
* :func:`vq_terms`: the two VQ-VAE terms (van den Oord et al., 2017, "Neural Discrete Representation Learning"):
  the codebook term ``||sg(z) - e||^2`` moves the chosen entries to the encodings, the commitment term
  ``||z - sg(e)||^2`` keeps the encodings near their entries.
* :func:`link_bce`: adjacency reconstruction, binary cross-entropy of ``sigmoid(<z_u, z_v> / sqrt(D))`` against
  whether ``(u, v)`` is an edge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError


def code_logits(z: Tensor, codebook: Tensor, *, code_temperature: float = 1.0) -> Tensor:
    """``(N, K)``: ``-||z_i - e_k||^2 / code_temperature`` for encodings ``z`` ``(N, D)`` and a codebook ``(K, D)``,
    in fp32. Its softmax over ``K`` is the soft assignment of each row to the codes."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise KDistillError(f"code_logits: encodings {tuple(z.shape)} and codebook {tuple(codebook.shape)}; expected "
                            "(N, D) and (K, D) of the same width D. Project the encodings to the codebook width.")
    if not code_temperature > 0:
        raise KDistillError(f"code_temperature: got {code_temperature!r}, expected a positive number.")
    z, e = z.float(), codebook.float()
    d2 = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.T + e.pow(2).sum(1)
    return -d2.clamp_min(0) / code_temperature


def vq_terms(z: Tensor, quantized: Tensor) -> tuple[Tensor, Tensor]:
    """``(codebook, commitment)``, each ``(N,)``: ``||sg(z) - e||^2`` (gradient to the codebook entries ``e =
    quantized``) and ``||z - sg(e)||^2`` (gradient to the encoder), summed over the feature axis."""
    if z.shape != quantized.shape:
        raise KDistillError(f"vq_terms: encodings {tuple(z.shape)} and their codebook entries "
                            f"{tuple(quantized.shape)}; expected the same shape.")
    z, q = z.float(), quantized.float()
    return (z.detach() - q).pow(2).sum(-1), (z - q.detach()).pow(2).sum(-1)


def link_bce(z_src: Tensor, z_dst: Tensor, target: Tensor) -> Tensor:
    """``(E,)`` binary cross-entropy of the edge probability ``sigmoid(<z_src, z_dst> / sqrt(D))`` against
    ``target`` (1 for an edge, 0 for a sampled non-edge)."""
    if z_src.shape != z_dst.shape or target.shape != z_src.shape[:1]:
        raise KDistillError(f"link_bce: endpoints {tuple(z_src.shape)} / {tuple(z_dst.shape)} and targets "
                            f"{tuple(target.shape)}; expected (E, D), (E, D) and (E,).")
    score = (z_src.float() * z_dst.float()).sum(-1) / math.sqrt(z_src.shape[-1])
    return F.binary_cross_entropy_with_logits(score, target.float(), reduction="none")


def soft_assignment(z: Tensor, codebook: Tensor, *, code_temperature: float = 1.0) -> Tensor:
    """``(N, K)`` soft code assignments: the softmax of :func:`code_logits` (rows sum to 1)."""
    return torch.softmax(code_logits(z, codebook, code_temperature=code_temperature), dim=-1)
