"""Pure loss functions: ``fn(student_x, teacher_x, *, hyper=...) -> unreduced Tensor``."""

from .chunked import chunked, fused_linear_loss
from .embeddings import cosine, embedding_mse, listwise_kl, margin_mse, token_cosine  # noqa: E402
from .features import hint_mse
from .logits import (
    TAIDSchedule,
    cross_entropy,
    entropy,
    forward_kl,
    generalized_jsd,
    kl_from_log_probs,
    log_probs,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    taid,
    token_selective,
    tvd,
    uld,
)
from .reduce import masked_mean, masked_sum
from .topk import sampled_loss, teacher_sample, teacher_topk, topk_loss

__all__ = [
    "cross_entropy", "forward_kl", "generalized_jsd", "hint_mse", "kl_from_log_probs", "log_probs",
    "masked_mean", "masked_sum", "reverse_kl", "soft_cross_entropy",
    "TAIDSchedule", "entropy", "skew_kl", "skew_reverse_kl", "taid", "token_selective", "tvd", "uld",
    "chunked", "fused_linear_loss", "teacher_topk", "topk_loss", "teacher_sample", "sampled_loss",
]
__all__ += ["cosine", "embedding_mse", "listwise_kl", "margin_mse", "token_cosine"]
