"""``self_supervised_distillation``: self-supervised dataset distillation by kernel ridge regression on
representation targets (KRR-ST).

Lee, Lee, Ko, Kawaguchi, Lee & Hwang, "Self-Supervised Dataset Distillation for Transfer Learning", ICLR 2024.

The distilled set is not labelled with classes but with *representations*: synthetic inputs ``X_s`` and learnable
target vectors ``Y_s``, optimised so that kernel ridge regression from a network's features of ``X_s`` to ``Y_s``
predicts the target model's representations of real data::

    min_{X_s, Y_s}  || K(X_r, X_s) (K(X_s, X_s) + lambda I)^-1 Y_s  -  g*(X_r) ||^2

(:func:`kdistill.losses.distilled_data.kernel_ridge_predictions`; ``K`` = the linear kernel on the features of a
network from a small pool, each trained on ``(X_s, Y_s)`` by regression for a few steps after every outer step and
re-initialised after ``max_age`` steps). Matching representations instead of labels makes the set a pre-training
set: a model pre-trained on it transfers to other tasks. ``Y_s`` starts from the target model's representations of
the real examples ``X_s`` starts from.

Where it applies and where not: the paper's target ``g*`` is a self-supervised encoder (Barlow Twins) and its use
is pre-training for transfer to *other* data. No self-supervised encoder ships offline here, so ``g*`` is the run's
teacher at ``target_layer`` (its penultimate features: supervised, which leaks class information into the
targets), and the evaluation is the same task: a student trains on ``X_s`` with cross-entropy on the classes the
synthetic examples started from plus ``target_weight`` times the regression of its ``feature_layer`` features
(through a learned linear projector) onto ``Y_s``. The transfer setting it was designed for is not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import capture
from ..data.distilled import DistilledSet
from ..data.selection import per_class_random
from ..errors import KDistillError, expect
from ..losses.distilled_data import kernel_ridge_predictions
from ..losses.features import hint_mse
from ..losses.reduce import masked_mean
from ..modules.projectors import FeatureProjector
from ..registry import METHODS
from ._distill_data import DataDistillMethod, build_checked, check_budget, layer_features, require
from .base import ModelOutput, SetupInfo, label_loss


def _features(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    with capture(model, [layer]) as feats:
        model(x)
    return feats[layer].flatten(1)


@METHODS.register("self_supervised_distillation")
class SelfSupervisedDistillation(DataDistillMethod):
    """Self-supervised dataset distillation (KRR-ST, 2024): synthetic inputs and representation targets learned
    through kernel ridge regression."""

    def __init__(self, iterations: int = 200, lr_data: float = 0.01, lr_targets: float = 0.01,
                 lr_model: float = 0.01, batch_real: int = 256, ridge: float = 1e-3, pool_size: int = 3,
                 max_age: int = 40, inner_steps: int = 1, target_layer: str = "embed", feature_layer: str = "embed",
                 target_weight: float = 1.0) -> None:
        super().__init__()
        for name, v in (("iterations", iterations), ("batch_real", batch_real), ("pool_size", pool_size),
                        ("max_age", max_age)):
            expect(isinstance(v, int) and v >= 1, f"self_supervised_distillation {name}", v, "an integer >= 1")
        expect(isinstance(inner_steps, int) and inner_steps >= 0, "self_supervised_distillation inner_steps",
               inner_steps, "an integer >= 0")
        expect(lr_data > 0 and lr_targets >= 0 and lr_model > 0 and ridge > 0,
               "self_supervised_distillation lr_data / lr_targets / lr_model / ridge",
               (lr_data, lr_targets, lr_model, ridge), "positive numbers (lr_targets may be 0: fixed targets)")
        expect(target_weight >= 0, "self_supervised_distillation target_weight", target_weight, "a number >= 0")
        self.iterations, self.lr_data, self.lr_targets, self.lr_model = int(iterations), float(lr_data), \
            float(lr_targets), float(lr_model)
        self.batch_real, self.ridge, self.pool_size, self.max_age = int(batch_real), float(ridge), int(pool_size), \
            int(max_age)
        self.inner_steps, self.target_layer, self.feature_layer = int(inner_steps), target_layer, feature_layer
        self.target_weight = float(target_weight)
        self.student_layers = (feature_layer,) if target_weight > 0 else ()
        self.projector: FeatureProjector | None = None

    # ------------------------------------------------------------------------------------------ building the set

    def _new_member(self, build_model: Callable[[], nn.Module], x: Tensor, dim: int) -> dict[str, Any]:
        model = build_checked(build_model, "self_supervised_distillation")
        model.train()
        with torch.no_grad():
            width = _features(model, x[:2], self.feature_layer).shape[1]
        head = nn.Linear(width, dim)
        opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=self.lr_model)
        return {"model": model, "head": head, "opt": opt, "age": 0}

    def distill_data(self, *, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
                     teacher: nn.Module | None, build_model: Callable[[], nn.Module], seed: int,
                     cache_dir: Path | None = None, cache_key: dict[str, Any] | None = None,
                     progress: bool = False) -> DistilledSet:
        check_budget("self_supervised_distillation", per_class, labels, num_classes)
        teacher = require("self_supervised_distillation", "a teacher (the target representations)", teacher)
        targets = layer_features(teacher, inputs, self.target_layer)  # g*(x) for every real example, fixed
        g = torch.Generator().manual_seed(seed)
        init = per_class_random(labels, num_classes, per_class, generator=g)
        x_syn = inputs[init].detach().clone().float().requires_grad_(True)
        y_syn = targets[init].clone().requires_grad_(self.lr_targets > 0)
        groups = [{"params": [x_syn], "lr": self.lr_data}]
        if self.lr_targets > 0:
            groups.append({"params": [y_syn], "lr": self.lr_targets})
        opt = torch.optim.Adam(groups)
        torch.manual_seed(seed)
        pool = [self._new_member(build_model, inputs, targets.shape[1]) for _ in range(self.pool_size)]
        history = []
        for it in range(self.iterations):
            member = pool[it % self.pool_size]
            model = member["model"]
            real = torch.randperm(len(inputs), generator=g)[: self.batch_real]
            phi_s = _features(model, x_syn, self.feature_layer)
            with torch.no_grad():
                phi_r = _features(model, inputs[real], self.feature_layer)
            pred = kernel_ridge_predictions(phi_r, phi_s, y_syn, ridge=self.ridge)
            loss = F.mse_loss(pred, targets[real])
            opt.zero_grad(set_to_none=True)
            wrt = [x_syn, y_syn] if self.lr_targets > 0 else [x_syn]
            grads = torch.autograd.grad(loss, wrt)
            for t, gr in zip(wrt, grads):
                t.grad = gr
            opt.step()
            history.append(float(loss.detach()))
            # the pool member learns the current synthetic set by regression, then ages out
            xs, ys = x_syn.detach(), y_syn.detach()
            for _ in range(self.inner_steps):
                member["opt"].zero_grad(set_to_none=True)
                F.mse_loss(member["head"](_features(model, xs, self.feature_layer)), ys).backward()
                member["opt"].step()
            member["age"] += 1
            if member["age"] >= self.max_age:
                pool[it % self.pool_size] = self._new_member(build_model, inputs, targets.shape[1])
            if progress and (it + 1) % max(1, self.iterations // 5) == 0:
                print(f"[self_supervised_distillation] iteration {it + 1}/{self.iterations}: KRR loss "
                      f"{sum(history[-10:]) / len(history[-10:]):.4f}", flush=True)
        tail = max(1, len(history) // 10)
        return DistilledSet(inputs=x_syn.detach().clone(), labels=labels[init].clone(),
                            per_example={"targets": y_syn.detach().clone()}, tensors={"init_indices": init},
                            meta={"krr_loss_first": sum(history[:tail]) / tail,
                                  "krr_loss_last": sum(history[-tail:]) / tail,
                                  "target_layer": self.target_layer, "target_dim": int(targets.shape[1])})

    # ------------------------------------------------------------------------------------------ training on it

    def setup(self, info: SetupInfo) -> None:
        if self.target_weight == 0:
            return
        dataset = getattr(info.extra.get("train_loader"), "dataset", None)
        targets = getattr(dataset, "tensors", {}).get("targets")
        if targets is None:
            raise KDistillError("self_supervised_distillation: the training batches carry no 'targets'; expected the "
                                "set this method distilled (its per-example representation targets). Fix: train on "
                                "that set, or set target_weight: 0 to train on its labels only.")
        self.projector = FeatureProjector(info.student_features[self.feature_layer], (1, int(targets.shape[1])))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        out = {"ce": label_loss(student.logits, batch)}
        if self.target_weight > 0:
            if self.projector is None:
                raise RuntimeError("self_supervised_distillation: setup() was not called, so the projector does not "
                                   "exist yet")
            feats = self.projector(student.features[self.feature_layer])
            out["targets"] = self.target_weight * masked_mean(hint_mse(feats, batch["targets"]), batch.get("mask"))
        return out
