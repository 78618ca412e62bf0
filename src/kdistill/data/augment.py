"""Loop-level input augmentations usable with any method.

An augmentation is called as ``augment(batch, rng) -> batch`` on each micro-batch *before* the teacher
and student forwards, so the teacher labels exactly the inputs the student sees ("consistent
teaching", Beyer et al., 2022). ``rng`` is a ``numpy.random.Generator`` owned and checkpointed by the
loop, so a resumed run draws the same augmentations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import expect
from ..registry import AUGMENTS


@AUGMENTS.register("mixup")
class Mixup:
    """mixup (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization") as a KD augmentation.

    ``x = lam * x_i + (1 - lam) * x_perm(i)`` with ``lam ~ Beta(alpha, alpha)`` per batch. The label
    target becomes the same mix of one-hot labels (``batch["target_probs"]``), used by the label term;
    the teacher term sees the teacher's prediction on the mixed input. With a KD method this is
    function matching on mixed inputs ("Knowledge distillation: A good teacher is patient and
    consistent", Beyer et al., 2022; "Understanding the Role of Mixup in Knowledge Distillation", 2022).
    ``prob`` applies it to that fraction of batches.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, num_classes: int | None = None) -> None:
        expect(alpha > 0, "mixup alpha", alpha, "a positive number (Beta(alpha, alpha) concentration)")
        expect(0.0 <= prob <= 1.0, "mixup prob", prob, "a number in [0, 1]")
        self.alpha, self.prob, self.num_classes = float(alpha), float(prob), num_classes

    def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self.prob < 1.0 and rng.random() >= self.prob:
            return batch
        x, y = batch["inputs"], batch["labels"]
        lam = float(rng.beta(self.alpha, self.alpha))
        perm = torch.as_tensor(rng.permutation(len(y)), device=x.device)
        out = dict(batch)
        out["inputs"] = lam * x + (1.0 - lam) * x[perm]
        n = self.num_classes or int(y.max()) + 1
        onehot = F.one_hot(y.long(), n).float()
        out["target_probs"] = lam * onehot + (1.0 - lam) * onehot[perm]
        out["mix_lambda"] = lam
        return out


def build_augment(name: str | None, num_classes: int | None = None, **kwargs: Any):
    if name is None:
        return None
    cls = AUGMENTS.get(name)
    import inspect

    if "num_classes" in inspect.signature(cls).parameters:
        kwargs.setdefault("num_classes", num_classes)
    return cls(**kwargs)
