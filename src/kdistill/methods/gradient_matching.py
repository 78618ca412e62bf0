"""``gradient_matching``: dataset condensation by matching gradients (DC).

Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021.

Learnable synthetic examples, ``per_class`` of every class (initialised from random real ones), are optimised so
that a network's gradient on them matches its gradient on real data of the same class, layer by layer::

    D(S, T) = sum_c sum_layers sum_o [1 - cos(grad_theta CE(f(S_c)), grad_theta CE(f(T_c)))]_o

(``o`` runs over a layer's output units; biases are left out, see
:func:`kdistill.losses.distilled_data.gradient_match_distance`). Every iteration starts a freshly initialised
network; ``outer_loop`` times it updates the synthetic set (SGD with momentum 0.5, as in the paper) and, in
between, trains the network ``inner_loop`` steps on the synthetic set, so the matching covers the early part of
training. BatchNorm layers are frozen at the statistics of a mixed-class real batch during matching (as DC does
for its BatchNorm networks), so per-class batches are normalised alike. The set keeps hard labels; a student
trains on it with cross-entropy. Use it for very small budgets (1-10 examples per class), where real examples are
least representative, and train on it the architecture it was matched on: its gains do not carry over to others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.distilled import DistilledSet
from ..data.selection import per_class_random
from ..errors import expect
from ..losses.distilled_data import gradient_match_distance
from ..registry import METHODS
from ._distill_data import DataDistillMethod, build_checked, check_budget

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def _freeze_batch_norm(net: nn.Module, real: Tensor) -> None:
    """Set every BatchNorm layer's statistics to those of a mixed-class real batch and freeze them (eval mode), so
    the per-class real and synthetic batches are normalised alike (single-class batch statistics would make every
    class look centred)."""
    bns = [m for m in net.modules() if isinstance(m, _BN)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    net.train()
    net(real)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
        m.eval()


@METHODS.register("gradient_matching")
class GradientMatching(DataDistillMethod):
    """Dataset condensation with gradient matching (DC, 2021): synthetic examples whose layer-wise gradients match
    real ones."""

    def __init__(self, iterations: int = 20, outer_loop: int = 5, inner_loop: int = 5, lr_data: float = 0.05,
                 lr_net: float = 0.01, batch_real: int = 64) -> None:
        super().__init__()
        for name, v in (("iterations", iterations), ("outer_loop", outer_loop), ("batch_real", batch_real)):
            expect(isinstance(v, int) and v >= 1, f"gradient_matching {name}", v, "an integer >= 1")
        expect(isinstance(inner_loop, int) and inner_loop >= 0, "gradient_matching inner_loop", inner_loop,
               "an integer >= 0")
        expect(lr_data > 0 and lr_net > 0, "gradient_matching lr_data / lr_net", (lr_data, lr_net),
               "positive numbers")
        self.iterations, self.outer_loop, self.inner_loop = int(iterations), int(outer_loop), int(inner_loop)
        self.lr_data, self.lr_net, self.batch_real = float(lr_data), float(lr_net), int(batch_real)

    def distill_data(self, *, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
                     teacher: nn.Module | None, build_model: Callable[[], nn.Module], seed: int,
                     cache_dir: Path | None = None, cache_key: dict[str, Any] | None = None,
                     progress: bool = False) -> DistilledSet:
        check_budget("gradient_matching", per_class, labels, num_classes)
        g = torch.Generator().manual_seed(seed)
        init = per_class_random(labels, num_classes, per_class, generator=g)
        x_syn = inputs[init].detach().clone().float().requires_grad_(True)
        y_syn = labels[init].clone()
        by_class = [(labels == c).nonzero().squeeze(1) for c in range(num_classes)]
        syn_rows = [(y_syn == c).nonzero().squeeze(1) for c in range(num_classes)]
        opt_x = torch.optim.SGD([x_syn], lr=self.lr_data, momentum=0.5)
        history = []
        for it in range(self.iterations):
            torch.manual_seed(seed * 1_000_003 + it)  # a fresh network per iteration, reproducibly
            net = build_checked(build_model, "gradient_matching")
            net.train()
            params = [p for p in net.parameters() if p.requires_grad]
            opt_net = torch.optim.SGD(params, lr=self.lr_net)
            for ol in range(self.outer_loop):
                _freeze_batch_norm(net, inputs[torch.randperm(len(inputs), generator=g)[: self.batch_real * 2]])
                match = x_syn.new_zeros(())
                for c in range(num_classes):
                    real = by_class[c][torch.randperm(len(by_class[c]), generator=g)[: self.batch_real]]
                    g_real = torch.autograd.grad(F.cross_entropy(net(inputs[real]), labels[real]), params)
                    rows = syn_rows[c]
                    g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn[rows]), y_syn[rows]), params,
                                                create_graph=True)
                    for gs, gr in zip(g_syn, g_real):
                        match = match + gradient_match_distance(gs, gr.detach()).sum()
                opt_x.zero_grad(set_to_none=True)
                (x_syn.grad,) = torch.autograd.grad(match, x_syn)
                opt_x.step()
                history.append(float(match.detach()))
                if ol == self.outer_loop - 1:
                    break
                net.train()
                x_fixed = x_syn.detach()
                for _ in range(self.inner_loop):  # train the network on the current synthetic set
                    opt_net.zero_grad(set_to_none=True)
                    F.cross_entropy(net(x_fixed), y_syn).backward()
                    opt_net.step()
            if progress and (it + 1) % max(1, self.iterations // 5) == 0:
                print(f"[gradient_matching] iteration {it + 1}/{self.iterations}: matching distance "
                      f"{history[-1]:.4f}", flush=True)
        return DistilledSet(inputs=x_syn.detach().clone(), labels=y_syn,
                            tensors={"init_indices": init},
                            meta={"matching_distance_first": history[0], "matching_distance_last": history[-1]})
