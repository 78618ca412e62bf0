"""Pure loss functions: ``fn(student_x, teacher_x, *, hyper=...) -> unreduced Tensor``."""

from .features import hint_mse
from .logits import (
    cross_entropy,
    forward_kl,
    generalized_jsd,
    kl_from_log_probs,
    log_probs,
    reverse_kl,
    soft_cross_entropy,
)
from .reduce import masked_mean, masked_sum

__all__ = [
    "cross_entropy", "forward_kl", "generalized_jsd", "hint_mse", "kl_from_log_probs", "log_probs",
    "masked_mean", "masked_sum", "reverse_kl", "soft_cross_entropy",
]
