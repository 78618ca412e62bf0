"""``hard_augment``: augmentations chosen where teacher and student disagree most.

Inspired by HARD (Nix et al., 2023, "HARD: Hard Augmentations for Robust Distillation"), which trains an
augmentation model to produce inputs on which teacher and student disagree while the teacher stays
reliable, so distillation spends its budget where the student has not yet learned the teacher's
function. This module implements the *selection* form of that idea without a learned generator:

    for each example, draw ``num_candidates`` random label-preserving augmentations (noise, shift,
    amplitude scale, masking of a window), evaluate teacher and student on all of them (no gradients,
    both in eval mode) and keep, per example, the candidate with the largest KL(p_teacher || p_student)
    at ``kd_temperature``.

The kept inputs then go through the normal teacher and student forwards of the loop, so any method
(``hinton_kd``, ``dkd``, ...) distils on them. ``prob`` applies it to that fraction of batches; the rest
pass unchanged. Augmentation parameters come from the loop's checkpointed ``rng``, so resume is exact.

Unlike ``mixup``, this augmentation needs the two models: call ``augment.bind(student=..., teacher=...)``
before training (a runner does this once per phase); using it unbound raises with that fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect
from ..losses.logits import forward_kl
from ..registry import AUGMENTS

OPS = ("noise", "shift", "scale", "mask")


def _augment(x: Tensor, op: str, rng: np.random.Generator, strength: float) -> Tensor:
    """One random label-preserving transform of a batch ``(B, ...)`` (per-example parameters)."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    length = flat.shape[1]
    if op == "noise":
        std = flat.std(1, keepdim=True).clamp_min(1e-6)
        noise = torch.as_tensor(rng.standard_normal(flat.shape), dtype=x.dtype, device=x.device)
        out = flat + strength * 0.5 * std * noise
    elif op == "scale":
        s = torch.as_tensor(rng.uniform(1 - 0.5 * strength, 1 + 0.5 * strength, (b, 1)), dtype=x.dtype, device=x.device)
        out = flat * s
    elif op == "shift":
        # roll along the last axis of the original layout by up to strength * 25% of its length
        last = x.shape[-1]
        max_shift = max(1, int(round(0.25 * strength * last)))
        shifts = rng.integers(-max_shift, max_shift + 1, b)
        idx = (torch.arange(last, device=x.device).unsqueeze(0)
               - torch.as_tensor(shifts, device=x.device).unsqueeze(1)) % last
        idx = idx.view(b, *([1] * (x.dim() - 2)), last).expand_as(x)
        return torch.gather(x, -1, idx)
    elif op == "mask":
        width = max(1, int(round(0.25 * strength * length)))
        starts = rng.integers(0, max(1, length - width + 1), b)
        pos = torch.arange(length, device=x.device).unsqueeze(0)
        st = torch.as_tensor(starts, device=x.device).unsqueeze(1)
        keep = ~((pos >= st) & (pos < st + width))
        out = flat * keep.to(x.dtype)
    else:  # pragma: no cover - guarded in __init__
        raise KDistillError(f"hard_augment op {op!r}")
    return out.reshape(x.shape)


@AUGMENTS.register("hard_augment")
class HardAugment:
    """Per example, the candidate augmentation with the largest teacher-student KL (see module doc)."""

    def __init__(self, num_candidates: int = 4, ops: list[str] | tuple[str, ...] = OPS, strength: float = 1.0,
                 kd_temperature: float = 1.0, prob: float = 1.0, keep_original: bool = True,
                 num_classes: int | None = None) -> None:
        expect(num_candidates >= 1, "hard_augment num_candidates", num_candidates, "an integer >= 1")
        ops = [ops] if isinstance(ops, str) else list(ops)
        bad = [o for o in ops if o not in OPS]
        expect(not bad and len(ops) > 0, "hard_augment ops", ops, f"a non-empty list drawn from {list(OPS)}")
        expect(strength > 0, "hard_augment strength", strength, "a positive number")
        expect(kd_temperature > 0, "hard_augment kd_temperature", kd_temperature, "a positive number")
        expect(0.0 <= prob <= 1.0, "hard_augment prob", prob, "a number in [0, 1]")
        self.num_candidates, self.ops, self.strength = int(num_candidates), ops, float(strength)
        self.kd_temperature, self.prob, self.keep_original = float(kd_temperature), float(prob), bool(keep_original)
        self.num_classes = num_classes
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None

    def bind(self, *, student: nn.Module, teacher: nn.Module) -> HardAugment:
        """Give the augmentation the two models it compares (call once before training)."""
        self.student, self.teacher = student, teacher
        return self

    @torch.no_grad()
    def disagreement(self, x: Tensor) -> Tensor:
        """KL(p_teacher || p_student) per example on inputs ``x`` (both models in eval mode)."""
        modes = (self.student.training, self.teacher.training)
        self.student.eval()
        self.teacher.eval()  # batch-norm must not see the candidate batch's statistics
        try:
            s, t = self.student(x), self.teacher(x)
        finally:
            self.student.train(modes[0])
            self.teacher.train(modes[1])
        return forward_kl(s.float(), t.float(), kd_temperature=self.kd_temperature)

    def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self.student is None or self.teacher is None:
            raise KDistillError(
                "hard_augment: got no models; expected augment.bind(student=..., teacher=...) before training "
                "(it compares the two on candidate augmentations).")
        if self.prob < 1.0 and rng.random() >= self.prob:
            return batch
        x = batch["inputs"]
        candidates = [x] if self.keep_original else []
        for _ in range(self.num_candidates):
            op = self.ops[int(rng.integers(len(self.ops)))]
            candidates.append(_augment(x, op, rng, self.strength))
        scores = torch.stack([self.disagreement(c) for c in candidates])  # (K, B)
        best = scores.argmax(0)  # (B,)
        stacked = torch.stack(candidates)  # (K, B, ...)
        chosen = stacked[best, torch.arange(x.shape[0], device=x.device)]
        out = dict(batch)
        out["inputs"] = chosen
        out["hard_disagreement"] = float(scores.max(0).values.mean())
        return out
