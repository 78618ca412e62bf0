"""Every method module is imported here so that the registry is always full."""

from . import (  # noqa: F401  (imported for their registrations)
    adaptive_fusion,
    alpha_divergence,
    attention_transfer,
    crd,
    cross_tokenizer_kd,
    dist,
    dkd,
    embedding_kd,
    ensemble,
    fitnet,
    gkd,
    gt_guided_self_distillation,
    hinton_kd,
    lelp,
    llm_kd,
    logit_standardization,
    minilm,
    nd_loss,
    none,
    ofa,
    pkt,
    rkd,
    similarity_preserving,
    sinkhorn_kd,
    token_relation_graph,
)
from .base import Method, ModelOutput, SetupInfo, label_loss

__all__ = ["Method", "ModelOutput", "SetupInfo", "label_loss"]
