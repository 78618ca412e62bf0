"""DisWOT: rank candidate students for a teacher without training them.

Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training" (CVPR 2023). On a few
batches, an *untrained* candidate is compared with the trained teacher through two matrices that do not depend on
either network's width, so any two architectures can be compared:

* **semantic**: ``row_normalize(G G^T)``, ``(K, K)``, where ``G`` holds the class activation maps of the batch,
  ``G[k, (b, s)] = ReLU(sum_c W[k, c] A[b, c, s])`` -- ``A`` the features the linear classifier ``head`` (weight
  ``W``, ``(K, C)``) reads, before global average pooling when the model pools (``s``: positions). For a pooled
  linear head this is Grad-CAM (the gradient of logit ``k`` with respect to ``A[b, c, s]`` is ``W[k, c] / S``, the
  same at every position); without positions ``G[k, b] = ReLU(W_k . f_b)``.
* **relational**: ``row_normalize(F F^T)``, ``(B, B)``, the sample-similarity Gram matrix of the penultimate
  features ``F`` (the input of ``head``), as in similarity-preserving KD.

Both use :func:`kdistill.losses.relations.similarity_gram`. The score is ``-(||M_sem,s - M_sem,t||_F +
||M_rel,s - M_rel,t||_F)``, averaged over the batches: higher is better, 0 (the maximum) when the candidate's
matrices equal the teacher's. The paper initialises candidates randomly and does not train them; so does
:func:`score_candidates` (each candidate is built right after seeding, the same initial weights a later training run
starts from).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..capture import device_of
from ..errors import KDistillError, expect
from ..io import seed_everything
from ..losses.relations import similarity_gram


class DisWOTFeatures(NamedTuple):
    """What the two matrices of one model on one batch are computed from."""

    maps: Tensor  # (B, C, *S) the features before global pooling, or (B, C) without positions
    embed: Tensor  # (B, C) the input of ``head``
    head_weight: Tensor  # (K, C)


def class_activation(maps: Tensor, head_weight: Tensor) -> Tensor:
    """``(B, C, *S)`` (or ``(B, C)``) features and a ``(K, C)`` linear-head weight -> ``(K, B * S)`` float32 class
    activation maps ``ReLU(sum_c W[k, c] A[b, c, s])``, one row per class."""
    expect(maps.dim() >= 2 and head_weight.dim() == 2 and maps.shape[1] == head_weight.shape[1],
           "class_activation shapes", (tuple(maps.shape), tuple(head_weight.shape)),
           "maps (B, C, ...) and a head weight (K, C) with the same C")
    a = maps.float().flatten(2) if maps.dim() > 2 else maps.float().unsqueeze(-1)  # (B, C, S)
    g = torch.einsum("kc,bcs->kbs", head_weight.float(), a).clamp_min(0.0)
    return g.reshape(g.shape[0], -1)


def semantic_matrix(maps: Tensor, head_weight: Tensor) -> Tensor:
    """``(K, K)``: the row-normalised Gram matrix of the class activation maps (class-to-class similarity)."""
    return similarity_gram(class_activation(maps, head_weight))


def diswot_distances(student: DisWOTFeatures, teacher: DisWOTFeatures) -> tuple[Tensor, Tensor]:
    """``(semantic, relational)`` distances of one batch, scalar float32 tensors: Frobenius norms of the differences
    of the two models' semantic ``(K, K)`` and relational ``(B, B)`` matrices. Zero when the features are equal
    (or differ by a positive scale)."""
    if student.embed.shape[0] != teacher.embed.shape[0]:
        raise KDistillError(f"diswot: student batch {student.embed.shape[0]} vs teacher batch "
                            f"{teacher.embed.shape[0]}; expected the same examples in the same order.")
    if student.head_weight.shape[0] != teacher.head_weight.shape[0]:
        raise KDistillError(f"diswot: the student has {student.head_weight.shape[0]} classes, the teacher "
                            f"{teacher.head_weight.shape[0]}; expected the same classes.")
    sem = (semantic_matrix(student.maps, student.head_weight)
           - semantic_matrix(teacher.maps, teacher.head_weight)).norm()
    rel = (similarity_gram(student.embed) - similarity_gram(teacher.embed)).norm()
    return sem, rel


@torch.no_grad()
def diswot_features(model: nn.Module, x: Tensor) -> DisWOTFeatures:
    """Run ``model`` (in eval mode, restored afterwards) on ``x`` and read the input of its linear ``head`` and, when
    it has a global-pooling ``pool`` module whose input carries ``head``'s channels on dim 1, the map before it."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise KDistillError(f"diswot: got a {type(model).__name__} without a linear classifier named `head`; "
                            "expected a model whose logits are head(features) (every registry classifier: mlp, cnn, "
                            "transformer1d). Fix: name the last nn.Linear of your factory model `head`.")
    store: dict[str, Tensor] = {}
    pool = getattr(model, "pool", None)
    handles = [head.register_forward_pre_hook(lambda _m, args: store.__setitem__("embed", args[0]))]
    if isinstance(pool, nn.Module):
        handles.append(pool.register_forward_pre_hook(lambda _m, args: store.__setitem__("maps", args[0])))
    was = model.training
    model.eval()
    try:
        model(x.to(device_of(model)))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    embed = store["embed"].float().flatten(1).cpu()
    maps = store.get("maps")
    if maps is None or maps.dim() < 3 or maps.shape[1] != head.in_features:
        maps = embed
    return DisWOTFeatures(maps.float().cpu(), embed, head.weight.detach().float().cpu())


def diswot_score(student: nn.Module, batches: Sequence[Tensor], teacher_features: Sequence[DisWOTFeatures]
                 ) -> dict[str, float]:
    """``{"diswot", "semantic_distance", "relational_distance"}`` of ``student`` against the teacher's features on
    the same ``batches`` (means over the batches; ``diswot = -(semantic + relational)``, higher is better)."""
    expect(len(batches) == len(teacher_features) and len(batches) > 0, "diswot batches",
           (len(batches), len(teacher_features)), "one teacher feature set per batch, at least one batch")
    sems, rels = [], []
    for x, t in zip(batches, teacher_features):
        sem, rel = diswot_distances(diswot_features(student, x), t)
        sems.append(float(sem))
        rels.append(float(rel))
    sem, rel = sum(sems) / len(sems), sum(rels) / len(rels)
    return {"diswot": -(sem + rel), "semantic_distance": sem, "relational_distance": rel}


def score_candidates(builders: Mapping[str, Callable[[], nn.Module]], teacher: nn.Module, batches: Sequence[Tensor],
                     *, seed: int) -> dict[str, dict[str, float]]:
    """DisWOT scores of untrained candidates: each is built right after ``seed_everything(seed)`` (so the scores,
    and the ranking, are a function of the seed), then scored against ``teacher`` on ``batches``."""
    teacher_features = [diswot_features(teacher, x) for x in batches]
    out: dict[str, dict[str, float]] = {}
    for name, build in builders.items():
        seed_everything(seed)
        out[name] = diswot_score(build(), batches, teacher_features)
    return out


# ------------------------------------------------------------------------------------------------ language models

@torch.no_grad()
def lm_diswot_features(model: nn.Module, batch: Mapping[str, Tensor], classes: Tensor) -> DisWOTFeatures:
    """DisWOT's inputs for a Hugging Face causal LM on a batch of token blocks (an adaptation: the paper scores image
    classifiers). The LM head is the classifier and the next tokens its classes, restricted to ``classes`` (the
    ``K`` most frequent next tokens of the scoring text: the full ``(V, V)`` semantic matrix would have 49,152^2
    entries for SmolLM2); the maps are the final hidden states the head reads, one position per token (padding
    zeroed), and the embedding their mean over the real tokens. Both matrices stay width-free, so a pruned, layer
    subset or fresh student is compared with its teacher as an image student is."""
    from ..teachers.lm import has_lm_head

    if not has_lm_head(model):
        raise KDistillError(f"diswot: got a {type(model).__name__}; expected a Hugging Face causal LM with a linear "
                            "LM head (get_output_embeddings) on base_model.")
    was = model.training
    model.eval()
    try:
        dev = device_of(model)
        mask = batch["attention_mask"].to(dev)
        hidden = model.base_model(input_ids=batch["input_ids"].to(dev), attention_mask=mask).last_hidden_state
    finally:
        model.train(was)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    hidden = (hidden * m).float()
    embed = hidden.sum(1) / m.sum(1).clamp_min(1.0).float()
    weight = model.get_output_embeddings().weight.detach()[classes.to(dev)]
    return DisWOTFeatures(hidden.transpose(1, 2).cpu(), embed.cpu(), weight.float().cpu())
