"""``trajectory_matching``: dataset distillation by matching training trajectories (MTT).

Cazenavette, Wang, Torralba, Efros & Zhu, "Dataset Distillation by Matching Training Trajectories", CVPR 2022.

First, ``num_experts`` expert networks are trained on the real data with plain SGD for ``expert_epochs`` epochs,
their parameters recorded after every epoch (the expert trajectories; cached by a fingerprint of the data, the
distillation architecture, the seed and these settings, so every budget and later run reuses them). Then, per
iteration, a random expert and start epoch ``t < max_start_epoch`` are drawn, a student network starts from
``theta*_t`` and takes ``syn_steps`` differentiable SGD steps on the synthetic set, and the synthetic examples (and
the student's learning rate, as in the paper) are updated to reduce::

    L = ||theta_hat_{t+N} - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

with ``M = expert_epochs_per_match`` expert epochs (:func:`kdistill.losses.distilled_data.trajectory_match_loss`).
Long-range matching follows the training dynamics over many steps, which gradient matching (one step at a time)
cannot. Hard labels; the set is used with cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.distilled import DistilledSet
from ..data.selection import per_class_random
from ..errors import KDistillError, expect
from ..io import load_state_dict, save_state_dict_atomic
from ..losses.distilled_data import trajectory_match_loss
from ..registry import METHODS
from ._distill_data import (
    DataDistillMethod,
    FlatParams,
    build_checked,
    cache_file,
    check_budget,
    train_expert,
    unrolled_sgd,
)


@METHODS.register("trajectory_matching")
class TrajectoryMatching(DataDistillMethod):
    """Dataset distillation by matching training trajectories (MTT, 2022): a student trained a few steps on the
    synthetic set must land where an expert trained on real data landed."""

    def __init__(self, iterations: int = 60, syn_steps: int = 10, expert_epochs_per_match: int = 2,
                 max_start_epoch: int = 5, num_experts: int = 3, expert_epochs: int = 8, expert_lr: float = 0.01,
                 expert_batch_size: int = 256, lr_data: float = 10.0, lr_lr: float = 1e-5, syn_lr: float = 0.01,
                 batch_syn: int | None = 100, learn_lr: bool = True) -> None:
        super().__init__()
        for name, v in (("iterations", iterations), ("syn_steps", syn_steps), ("num_experts", num_experts),
                        ("expert_epochs", expert_epochs), ("expert_epochs_per_match", expert_epochs_per_match),
                        ("max_start_epoch", max_start_epoch), ("expert_batch_size", expert_batch_size)):
            expect(isinstance(v, int) and v >= 1, f"{self.registry_name} {name}", v, "an integer >= 1")
        if max_start_epoch + expert_epochs_per_match > expert_epochs:
            raise KDistillError(f"{self.registry_name}: max_start_epoch {max_start_epoch} + expert_epochs_per_match "
                                f"{expert_epochs_per_match} exceeds expert_epochs {expert_epochs}; expected the "
                                "matched segment to lie inside the recorded trajectory. Fix: raise expert_epochs or "
                                "lower max_start_epoch.")
        expect(expert_lr > 0 and lr_data > 0 and syn_lr > 0 and lr_lr >= 0, f"{self.registry_name} learning rates",
               (expert_lr, lr_data, syn_lr, lr_lr), "positive numbers (lr_lr >= 0)")
        expect(batch_syn is None or (isinstance(batch_syn, int) and batch_syn >= 1), f"{self.registry_name} batch_syn",
               batch_syn, "an integer >= 1, or null for the whole synthetic set")
        self.iterations, self.syn_steps = int(iterations), int(syn_steps)
        self.match_epochs, self.max_start_epoch = int(expert_epochs_per_match), int(max_start_epoch)
        self.num_experts, self.expert_epochs = int(num_experts), int(expert_epochs)
        self.expert_lr, self.expert_batch_size = float(expert_lr), int(expert_batch_size)
        self.lr_data, self.lr_lr, self.syn_lr = float(lr_data), float(lr_lr), float(syn_lr)
        self.batch_syn, self.learn_lr = batch_syn, bool(learn_lr)

    registry_name = "trajectory_matching"
    expert_sam_rho = 0.0  # plain SGD experts; the flat-trajectory variant sets a radius
    synthetic_ema = 0.0  # no averaging of the synthetic set; the flat-trajectory variant averages

    def expert_identity(self) -> dict[str, Any]:
        return {"kind": "expert_trajectories", "num_experts": self.num_experts, "epochs": self.expert_epochs,
                "lr": self.expert_lr, "batch_size": self.expert_batch_size, "sam_rho": self.expert_sam_rho,
                "format": 1}

    def experts(self, inputs: Tensor, labels: Tensor, build_model: Callable[[], nn.Module], seed: int,
                cache_dir: Path | None, cache_key: dict[str, Any] | None, progress: bool) -> list[Tensor]:
        """The expert trajectories ``[(expert_epochs + 1, P)] * num_experts``, from the cache when one matches."""
        path = cache_file(cache_dir, "experts", {**(cache_key or {}), **self.expert_identity(), "seed": seed}) \
            if cache_key is not None else None
        if path is not None and path.is_file():
            stored = load_state_dict(path)
            return [stored[f"expert_{i}"] for i in range(self.num_experts)]
        out = []
        g = torch.Generator().manual_seed(seed + 7919)
        for i in range(self.num_experts):
            torch.manual_seed(seed * 7919 + i)
            net = FlatParams(build_checked(build_model, self.registry_name))
            out.append(train_expert(net, inputs, labels, epochs=self.expert_epochs, lr=self.expert_lr,
                                    batch_size=self.expert_batch_size, generator=g, sam_rho=self.expert_sam_rho))
            if progress:
                print(f"[{self.registry_name}] expert {i + 1}/{self.num_experts} trained", flush=True)
        if path is not None:
            save_state_dict_atomic(path, {f"expert_{i}": t for i, t in enumerate(out)})
        return out

    def distill_data(self, *, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
                     teacher: nn.Module | None, build_model: Callable[[], nn.Module], seed: int,
                     cache_dir: Path | None = None, cache_key: dict[str, Any] | None = None,
                     progress: bool = False) -> DistilledSet:
        check_budget(self.registry_name, per_class, labels, num_classes)
        trajectories = self.experts(inputs, labels, build_model, seed, cache_dir, cache_key, progress)
        g = torch.Generator().manual_seed(seed)
        init = per_class_random(labels, num_classes, per_class, generator=g)
        x_syn = inputs[init].detach().clone().float().requires_grad_(True)
        y_syn = labels[init].clone()
        syn_lr = torch.tensor(self.syn_lr, requires_grad=self.learn_lr)
        opt_x = torch.optim.SGD([x_syn], lr=self.lr_data, momentum=0.5)
        opt_lr = torch.optim.SGD([syn_lr], lr=self.lr_lr, momentum=0.5) if self.learn_lr else None
        torch.manual_seed(seed)
        net = FlatParams(build_checked(build_model, self.registry_name))
        net.model.train()
        if trajectories[0].shape[1] != net.numel:
            raise KDistillError(f"{self.registry_name}: cached expert trajectories hold {trajectories[0].shape[1]} "
                                f"parameters, the distillation model {net.numel}; expected the same network. Fix: "
                                "delete the experts cache folder (KDISTILL_CACHE/experts).")
        ema = x_syn.detach().clone() if self.synthetic_ema > 0 else None
        history = []
        for it in range(self.iterations):
            e = int(torch.randint(len(trajectories), (1,), generator=g))
            t = int(torch.randint(self.max_start_epoch, (1,), generator=g))
            start, target = trajectories[e][t], trajectories[e][t + self.match_epochs]
            theta = unrolled_sgd(net, start, x_syn, y_syn, steps=self.syn_steps, lr=syn_lr,
                                  batch_size=self.batch_syn, generator=g)
            loss = trajectory_match_loss(theta, target, start)
            wrt = [x_syn, syn_lr] if self.learn_lr else [x_syn]
            grads = torch.autograd.grad(loss, wrt)
            opt_x.zero_grad(set_to_none=True)
            x_syn.grad = grads[0]
            opt_x.step()
            if opt_lr is not None:
                opt_lr.zero_grad(set_to_none=True)
                syn_lr.grad = grads[1]
                opt_lr.step()
                with torch.no_grad():
                    syn_lr.clamp_(min=1e-6)
            if ema is not None:
                with torch.no_grad():
                    ema.mul_(self.synthetic_ema).add_(x_syn.detach(), alpha=1.0 - self.synthetic_ema)
            history.append(float(loss.detach()))
            if progress and (it + 1) % max(1, self.iterations // 5) == 0:
                print(f"[{self.registry_name}] iteration {it + 1}/{self.iterations}: matching loss "
                      f"{sum(history[-10:]) / len(history[-10:]):.4f}", flush=True)
        final = ema if ema is not None else x_syn.detach().clone()
        tail = max(1, len(history) // 10)
        return DistilledSet(inputs=final, labels=y_syn, tensors={"init_indices": init},
                            meta={"matching_loss_first": sum(history[:tail]) / tail,
                                  "matching_loss_last": sum(history[-tail:]) / tail,
                                  "learned_lr": float(syn_lr.detach())})
