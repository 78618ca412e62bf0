"""``infer``: INFER, the inter-class feature compensator.

Zhang, Du, Liu & Zhou, "Breaking Class Barriers: Efficient Dataset Distillation via Inter-Class Feature
Compensator", ICLR 2025.

Class-specific synthesis (one synthetic example optimised for one label) spends the budget on duplicated
intra-class features. INFER instead takes real ("natural") examples and learns *universal feature compensators*
(UFCs): one additive perturbation ``u_k`` per group ``P_k`` of natural examples, one example of every class, shared
by all of them. ``u_k`` is optimised (Adam, cosine schedule, random shifts as augmentation) so that every
``x + u_k, x in P_k`` is classified as its own class by a frozen model while the batch's feature statistics match
that model's BatchNorm statistics::

    min_u  CE(f(x_i + u), y_i)  +  bn_weight * sum_l m_l * (||mu_l(batch) - mu_l||_2 + ||var_l(batch) - var_l||_2)

(``m_l = first_bn_multiplier`` for the first BatchNorm layer, 1 after;
:func:`kdistill.losses.distilled_data.bn_statistics_distance`). One compensator thus yields one new example per
class. The paper learns one compensator per group for each of M architectures; here the model pool is the run's
teacher (M = 1), and the budget is split as the paper does: ``n = max(1, floor(per_class / (M / C + 1)))``
natural examples per class and ``n`` compensators, giving ``2 n C`` training examples (the natural ones and the
compensated ones) stored as ``n C + n M`` tensors. At ``per_class = 1`` that is one stored vector over the budget.
Labels are the natural examples' own (hard); the paper's mixup-time label interpolation is a training
augmentation, not part of the set. BatchNorm matching needs a teacher with BatchNorm layers; without any, only the
classification term acts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.distilled import DistilledSet
from ..data.selection import per_class_random
from ..errors import expect
from ..losses.distilled_data import bn_statistics_distance
from ..registry import METHODS
from ._distill_data import DataDistillMethod, check_budget, require

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _shift(x: Tensor, jitter: int, generator: torch.Generator) -> Tensor:
    """Roll the last axis (and, for images, the last two) by a random offset in ``[0, jitter]``."""
    if jitter <= 0:
        return x
    dims = (-2, -1) if x.dim() >= 4 else (-1,)
    shifts = tuple(int(torch.randint(jitter + 1, (1,), generator=generator)) for _ in dims)
    return torch.roll(x, shifts=shifts, dims=dims)


@METHODS.register("infer")
class Infer(DataDistillMethod):
    """INFER (Breaking Class Barriers, 2025): universal feature compensators added to natural examples of every
    class."""

    def __init__(self, iterations: int = 150, lr: float = 0.1, bn_weight: float = 0.01,
                 first_bn_multiplier: float = 10.0, jitter: int = 2) -> None:
        super().__init__()
        expect(isinstance(iterations, int) and iterations >= 1, "infer iterations", iterations, "an integer >= 1")
        expect(lr > 0, "infer lr", lr, "a positive number")
        expect(bn_weight >= 0 and first_bn_multiplier >= 0, "infer bn_weight / first_bn_multiplier",
               (bn_weight, first_bn_multiplier), "non-negative numbers")
        expect(isinstance(jitter, int) and jitter >= 0, "infer jitter", jitter, "an integer >= 0")
        self.iterations, self.lr, self.bn_weight = int(iterations), float(lr), float(bn_weight)
        self.first_bn_multiplier, self.jitter = float(first_bn_multiplier), int(jitter)

    def distill_data(self, *, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
                     teacher: nn.Module | None, build_model: Callable[[], nn.Module], seed: int,
                     cache_dir: Path | None = None, cache_key: dict[str, Any] | None = None,
                     progress: bool = False) -> DistilledSet:
        check_budget("infer", per_class, labels, num_classes)
        teacher = require("infer", "a teacher (the model the compensators are learned against)", teacher)
        models = 1
        n = max(1, math.floor(per_class / (models / num_classes + 1)))
        g = torch.Generator().manual_seed(seed)
        by_class = per_class_random(labels, num_classes, n, generator=g)  # class c at [c n, (c + 1) n)
        natural = by_class.view(num_classes, n).T.reshape(-1)  # group-major: group k = the k-th of every class
        x_nat, y_nat = inputs[natural].float(), labels[natural]
        group = torch.arange(n).repeat_interleave(num_classes)
        comp = torch.zeros((n, *inputs.shape[1:]), requires_grad=True)
        opt = torch.optim.Adam([comp], lr=self.lr, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / self.iterations)))
        was, grad_flags = teacher.training, [p.requires_grad for p in teacher.parameters()]
        teacher.eval().requires_grad_(False)
        bns = [m for m in teacher.modules() if isinstance(m, _BN)]
        seen: list[Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0])) for m in bns]
        history = []
        try:
            for _ in range(self.iterations):
                seen.clear()
                x = _shift(x_nat + comp[group], self.jitter, g)
                ce = F.cross_entropy(teacher(x), y_nat)
                reg = x.new_zeros(())
                for layer, (bn, feats) in enumerate(zip(bns, seen)):
                    weight = self.first_bn_multiplier if layer == 0 else 1.0
                    # statistics per group (consecutive rows): a group is one batch of the paper
                    reg = reg + weight * bn_statistics_distance(feats, bn.running_mean, bn.running_var, groups=n).sum()
                loss = ce + self.bn_weight * reg / n
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history.append((float(ce.detach()), float(reg.detach()) / n))
        finally:
            for h in hooks:
                h.remove()
            teacher.train(was)
            for p, flag in zip(teacher.parameters(), grad_flags):
                p.requires_grad_(flag)
        compensated = (x_nat + comp[group]).detach()
        return DistilledSet(inputs=torch.cat([x_nat, compensated]), labels=torch.cat([y_nat, y_nat]),
                            tensors={"natural_indices": natural, "compensators": comp.detach().clone()},
                            meta={"natural_per_class": n, "compensators": n, "models": models,
                                  "stored_vectors": n * num_classes + n * models,
                                  "ce_first": history[0][0], "ce_last": history[-1][0],
                                  "bn_first": history[0][1], "bn_last": history[-1][1]})
