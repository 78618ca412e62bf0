"""Small helpers shared by the classic-KD zoo methods (not a method; no registration)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import KDistillError, expect


def row_mask(batch: dict[str, Any]) -> Tensor | None:
    """The batch's per-example mask ``(B,)`` (True = counts), or None."""
    mask = batch.get("mask")
    if mask is not None and mask.dim() != 1:
        raise KDistillError(
            f"batch['mask']: got shape {tuple(mask.shape)}, expected (B,) for a classification method."
        )
    return mask


def select_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Keep the rows that count, so batch-relation losses never see padding rows."""
    return x if mask is None else x[mask]


def feature(out: Any, layer: str, who: str, method: str) -> Tensor:
    """``out.features[layer]`` with an error that says how to fix a missing hook."""
    try:
        return out.features[layer]
    except KeyError:
        raise KDistillError(
            f"{method}: {who} features for layer {layer!r} were not captured (got {sorted(out.features)}); "
            f"expected the loop to hook the method's {who}_layers. Check the layer name."
        ) from None


def non_negative(method: str, **weights: float) -> None:
    for name, value in weights.items():
        expect(value >= 0, f"{method} {name}", value, "a non-negative number")


def positive(method: str, **values: float) -> None:
    for name, value in values.items():
        expect(value > 0, f"{method} {name}", value, "a positive number")


def labels_of(batch: dict[str, Any], method: str, num_classes: int | None = None) -> Tensor:
    """The batch's class ids ``(B,)``. Rows that count (``batch['mask']`` True, or every row without a mask) must
    hold ids in ``[0, num_classes)``: a ``-100`` there is an error, never silently class 0. Rows that do not
    count get id 0 as a placeholder, so per-row losses stay defined; the reduction drops them."""
    labels = batch.get("labels")
    if labels is None:
        raise KDistillError(f"{method}: batch has no 'labels'; this method needs the ground-truth class ids.")
    mask = row_mask(batch)
    counted = labels if mask is None else labels[mask]
    if counted.numel():
        lo, hi = int(counted.min()), int(counted.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            top = f"{num_classes - 1}" if num_classes is not None else "C - 1"
            raise KDistillError(
                f"{method}: labels of the rows that count are in [{lo}, {hi}], expected class ids in [0, {top}]. "
                "A label of -100 marks a row to ignore: give the batch a bool 'mask' with False on that row "
                "(the data layer does this), or drop the row.")
    return labels if mask is None else labels.masked_fill(~mask, 0)


def skipped(x: Tensor) -> Tensor:
    """A zero loss that still depends on ``x`` (so DDP sees every parameter used) for batches too small for
    a relation loss, e.g. a last batch of one example."""
    return x.float().sum() * 0.0


def teacher_pass(extra: dict[str, Any], layer: str, method: str):
    """Yield ``(teacher_features_of_layer (B, D) float64 on CPU, labels (B,))`` over the whole training
    loader, using the loop's teacher function (``SetupInfo.extra['train_loader']`` and
    ``['teacher_targets_fn']``; ``['device']`` when the teacher is not on CPU). Rows whose label is negative
    or whose mask is False are dropped."""
    import torch

    loader, teacher_fn = extra.get("train_loader"), extra.get("teacher_targets_fn")
    if loader is None or teacher_fn is None:
        raise KDistillError(
            f"{method} setup: SetupInfo.extra has no 'train_loader' / 'teacher_targets_fn'; expected the training "
            "loop (kdistill.train.loop.fit) to provide them for the one pass over the training set this method needs.")
    device = extra.get("device")
    with torch.no_grad():
        for batch in loader:
            if device is not None:
                batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            out = teacher_fn(batch)
            feats = feature(out, layer, "teacher", method).flatten(1).double().cpu()
            labels = batch["labels"].cpu()
            keep = labels >= 0
            if batch.get("mask") is not None:
                keep = keep & batch["mask"].cpu()
            yield feats[keep], labels[keep], (out.logits[keep.to(out.logits.device)].float().cpu()
                                              if out.logits is not None else None)


def kd_and_ce_terms(student: Any, teacher: Any, batch: dict[str, Any], *, kd_weight: float, kd_temperature: float,
                    ce_weight: float, mask: Tensor | None) -> dict[str, Tensor]:
    """The optional Hinton-KD (``T^2``-scaled) and label cross-entropy terms that feature methods add."""
    from ..losses.logits import forward_kl
    from ..losses.reduce import kd_scale, masked_mean
    from .base import label_loss

    out: dict[str, Tensor] = {}
    if kd_weight > 0:
        t = kd_temperature
        out["kd"] = kd_weight * kd_scale(t) * masked_mean(forward_kl(student.logits, teacher.logits, kd_temperature=t),
                                                          mask)
    if ce_weight > 0:
        out["ce"] = ce_weight * label_loss(student.logits, batch)
    return out


def flat_size(shape: tuple[int, ...]) -> int:
    """Number of features per example of a ``(B, ...)`` shape."""
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n
