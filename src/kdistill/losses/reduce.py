"""Reductions: the one place where masks turn unreduced losses into scalars."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KDistillError


def _check(values: Tensor, mask: Tensor | None) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise KDistillError(
            f"mask dtype: got {mask.dtype}, expected torch.bool (True = counts). "
            "Convert with `mask = labels != -100` or `mask.bool()`."
        )
    if mask.shape != values.shape:
        try:
            mask = mask.expand_as(values)
        except RuntimeError:
            raise KDistillError(
                f"mask shape: got {tuple(mask.shape)}, expected {tuple(values.shape)} "
                "(the shape of the unreduced loss)."
            ) from None
    return mask


def masked_sum(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is True, in fp32. Masked positions never propagate NaN/inf."""
    values = values.float()
    mask = _check(values, mask)
    if mask is None:
        return values.sum()
    return torch.where(mask, values, values.new_zeros(())).sum()


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is True.

    An all-masked input returns 0 (with a zero gradient), never NaN.
    """
    values = values.float()
    mask = _check(values, mask)
    if mask is None:
        return values.mean() if values.numel() else values.new_zeros(())
    count = mask.sum().clamp_min(1)
    return masked_sum(values, mask) / count


def kd_scale(kd_temperature: float, *, power: int = 2) -> float:
    """The factor ``kd_temperature ** power`` that keeps a distillation term's gradient scale independent of
    the temperature (Hinton et al., 2015: gradients of a softened KL shrink like ``1 / T^2``). The power is a
    property of the divergence: :data:`kdistill.losses.logits.TEMPERATURE_POWER` (2 for the KL family, 1 for
    ``tvd`` / ``uld``). Every method applies its temperature scaling through this one function."""
    if not kd_temperature > 0:
        raise KDistillError(f"kd_temperature: got {kd_temperature!r}, expected a positive number.")
    if power not in (0, 1, 2):
        raise KDistillError(f"kd_scale power: got {power!r}, expected 0, 1 or 2 (see TEMPERATURE_POWER).")
    return float(kd_temperature) ** power
