"""Every method module is imported here so that the registry is always full."""

from . import (  # noqa: F401
    adaptive_fusion,  # noqa: F401  (classic zoo)
    alpha_divergence,  # noqa: F401  (classic zoo)
    attention_transfer,  # noqa: F401  (classic zoo)
    crd,  # noqa: F401  (classic zoo)
    dist,  # noqa: F401  (classic zoo)
    dkd,  # noqa: F401  (classic zoo)
    embedding_kd,  # noqa: F401  (embedding distillation)
    ensemble,  # noqa: F401  (classic zoo)
    fitnet,
    gkd,  # noqa: F401  (LLM distillation, on-policy)
    gt_guided_self_distillation,  # noqa: F401  (classic zoo)
    hinton_kd,
    lelp,  # noqa: F401  (classic zoo)
    llm_kd,  # noqa: F401  (LLM distillation)
    logit_standardization,  # noqa: F401  (classic zoo)
    nd_loss,  # noqa: F401  (classic zoo)
    none,
    ofa,  # noqa: F401  (classic zoo)
    pkt,  # noqa: F401  (classic zoo)
    rkd,  # noqa: F401  (classic zoo)
    similarity_preserving,  # noqa: F401  (classic zoo)
    sinkhorn_kd,  # noqa: F401  (classic zoo)
    token_relation_graph,  # noqa: F401  (classic zoo)
)
from .base import Method, ModelOutput, SetupInfo, label_loss

__all__ = ["Method", "ModelOutput", "SetupInfo", "label_loss"]
