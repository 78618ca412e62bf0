"""``vqgraph``: an MLP student that matches a GNN's soft labels and its soft assignments to a codebook of
structure-aware node tokens.

Yang, Wu, Wang, Qi, Wu, Liu & Yang, 2024, "VQGraph: Rethinking Graph Representation Space for Bridging GNNs and
MLPs" (ICLR).

Two stages. :meth:`VQGraph.fit_graph` (before the student trains) learns the tokens: a VQ-VAE over the frozen
GNN's node representations ``h_v`` -- an encoder ``z_v = W h_v``, a codebook of ``num_codes`` entries
(:class:`kdistill.modules.codebook.VectorQuantizer`, straight-through), and two decoders from the quantised
``z_v`` that reconstruct the node's features (``||D z_v - x_v||^2``) and the adjacency (``sigmoid(<z_u, z_v>)``
against edges and as many random non-edges) -- so a token stands for a kind of local structure, not only a class.
Then the student learns from the frozen tokens::

    L = (1 - alpha) * CE_{V_L} + alpha * T^2 * KL(p_t || p_s) + code_weight * KL(r_t || r_s)

where ``r(v) = softmax(-||z_v - e_k||^2 / code_temperature)`` is the soft assignment of a node to the ``K`` codes:
for the teacher from its encoding, for the student from a linear projection of its own representation
(``student_layer``, by default the MLP's ``embed``) into the code space. The code term gives the MLP far more
targets per node than the class distribution (which of ``K`` local structures the node resembles), and like GLNN
it trains on every node seen during training. Use it where GLNN leaves a gap to the GNN.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..data.lm import label_mask
from ..errors import KDistillError, expect
from ..losses.features import hint_mse
from ..losses.graph import link_bce
from ..losses.logits import cross_entropy, forward_kl
from ..losses.reduce import kd_scale, masked_mean
from ..modules.codebook import VectorQuantizer
from ..registry import METHODS
from .base import Method, ModelOutput, SetupInfo, require_teacher


@METHODS.register("vqgraph")
class VQGraph(Method):
    """Soft labels + soft code assignments from a VQ-VAE codebook learned over the GNN teacher's representations
    (``teacher_layer``); see the module docstring. Defaults (``alpha = 1``, ``code_weight = 0.1``) are what the
    validation nodes of the WordNet benchmark preferred (``docs/graphs.md``): a code term of weight 1 there pulled
    the student away from the soft labels and lowered validation accuracy."""

    trains_on_unlabelled = True

    def __init__(self, alpha: float = 1.0, code_weight: float = 0.1, kd_temperature: float = 1.0,
                 code_temperature: float = 1.0, num_codes: int = 256, code_dim: int = 32, vq_steps: int = 300,
                 vq_lr: float = 5e-3, vq_batch_size: int = 1024, commitment: float = 0.25,
                 feature_weight: float = 1.0, edge_weight: float = 1.0, restart_every: int = 50,
                 student_layer: str = "embed", teacher_layer: str = "embed") -> None:
        super().__init__()
        expect(0.0 <= alpha <= 1.0, "vqgraph alpha", alpha, "a number in [0, 1] (weight of the soft-label term)")
        expect(code_weight >= 0, "vqgraph code_weight", code_weight, "a number >= 0")
        expect(kd_temperature > 0, "vqgraph kd_temperature", kd_temperature, "a positive number")
        expect(code_temperature > 0, "vqgraph code_temperature", code_temperature, "a positive number")
        expect(num_codes >= 2, "vqgraph num_codes", num_codes, "an integer >= 2")
        expect(code_dim >= 1, "vqgraph code_dim", code_dim, "an integer >= 1")
        expect(vq_steps >= 1 and vq_batch_size >= 1 and restart_every >= 1, "vqgraph vq_steps / vq_batch_size / "
               "restart_every", (vq_steps, vq_batch_size, restart_every), "integers >= 1")
        expect(vq_lr > 0 and commitment >= 0 and feature_weight >= 0 and edge_weight >= 0,
               "vqgraph vq_lr / commitment / feature_weight / edge_weight",
               (vq_lr, commitment, feature_weight, edge_weight), "a positive learning rate and weights >= 0")
        self.alpha, self.code_weight = float(alpha), float(code_weight)
        self.kd_temperature, self.code_temperature = float(kd_temperature), float(code_temperature)
        self.num_codes, self.code_dim = int(num_codes), int(code_dim)
        self.vq_steps, self.vq_lr, self.vq_batch_size = int(vq_steps), float(vq_lr), int(vq_batch_size)
        self.commitment, self.feature_weight, self.edge_weight = float(commitment), float(feature_weight), \
            float(edge_weight)
        self.restart_every = int(restart_every)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.encoder: nn.Module | None = None
        self.quantizer: VectorQuantizer | None = None
        self.projector: nn.Module | None = None

    @property
    def teacher_divergence_term(self) -> str | None:
        return "kd"

    def fit_graph(self, *, teacher_features: dict[str, Tensor], node_features: Tensor, edge_index: Tensor,
                  seed: int) -> dict[str, Any]:
        """Train the VQ-VAE over the teacher's representations of the training nodes (then frozen)."""
        name = self.teacher_layers[0]
        if name not in teacher_features:
            raise KDistillError(f"vqgraph: no teacher features {name!r} (got {sorted(teacher_features)}); expected "
                                "the teacher's representation under teacher_layer.")
        h, x = teacher_features[name].detach().float().flatten(1), node_features.detach().float()
        n = len(h)
        expect(n >= self.num_codes, "vqgraph num_codes", self.num_codes,
               f"at most the number of training nodes ({n})", "Lower num_codes.")
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        encoder = nn.Linear(h.shape[1], self.code_dim)
        quantizer = VectorQuantizer(self.code_dim, self.num_codes)
        feature_decoder = nn.Linear(self.code_dim, x.shape[1])
        with torch.no_grad():
            sub = torch.randperm(n, generator=g)[:20_000]
            quantizer.init_kmeans(encoder(h[sub]), iters=10, seed=int(seed))
        opt = torch.optim.Adam([*encoder.parameters(), *quantizer.parameters(), *feature_decoder.parameters()],
                               lr=self.vq_lr)
        counts = torch.zeros(self.num_codes)
        num_edges, b = edge_index.shape[1], self.vq_batch_size
        last: dict[str, float] = {}
        for step in range(self.vq_steps):
            nodes = torch.randint(n, (b,), generator=g)
            if num_edges and self.edge_weight > 0:
                pos = edge_index[:, torch.randint(num_edges, (b,), generator=g)]
                neg = torch.randint(n, (2, b), generator=g)
                nodes = torch.cat([nodes, pos[0], pos[1], neg[0], neg[1]])
            z = encoder(h[nodes])
            q, codes, codebook_term, commitment_term = quantizer(z)
            feature = hint_mse(feature_decoder(q[:b]), x[nodes[:b]]).mean()
            loss = self.feature_weight * feature + codebook_term.mean() + self.commitment * commitment_term.mean()
            edge = torch.zeros(())
            if len(nodes) > b:
                ends = q[b:].reshape(4, b, -1)
                target = torch.cat([torch.ones(b), torch.zeros(b)])
                edge = link_bce(torch.cat([ends[0], ends[2]]), torch.cat([ends[1], ends[3]]), target).mean()
                loss = loss + self.edge_weight * edge
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            counts += torch.bincount(codes, minlength=self.num_codes).float()
            if (step + 1) % self.restart_every == 0 and step + 1 < self.vq_steps:
                quantizer.restart_dead(z, counts, generator=g)
                counts.zero_()
            last = {"feature_loss": float(feature.detach()), "edge_loss": float(edge.detach()),
                    "commitment": float(commitment_term.detach().mean())}
        opt.zero_grad(set_to_none=True)
        encoder.requires_grad_(False)  # frozen: the student matches fixed tokens
        quantizer.requires_grad_(False)
        self.encoder, self.quantizer = encoder, quantizer
        with torch.no_grad():
            all_codes = quantizer.assign(encoder(h))
            assign = torch.softmax(quantizer.soft_logits(encoder(h[:4096]), code_temperature=self.code_temperature), -1)
        entropy = float(-(assign * assign.clamp_min(1e-12).log()).sum(-1).mean())
        return {"num_codes": self.num_codes, **{f"codes_{k}": v for k, v in
                                               VectorQuantizer.usage(all_codes, self.num_codes).items()},
                "teacher_assignment_entropy": entropy, **last, "steps": self.vq_steps,
                "seconds": time.perf_counter() - t0}

    def setup(self, info: SetupInfo) -> None:
        if self.quantizer is None:
            raise KDistillError("vqgraph: no codebook: it is learned from a GNN teacher on a graph (Method.fit_graph), "
                                "which only task `graph` runs. Use vqgraph in a `task: graph` recipe, or another "
                                "method here.")
        shape = info.student_features.get(self.student_layers[0])
        if shape is None:
            raise KDistillError(f"vqgraph: the student has no features {self.student_layers[0]!r} (got "
                                f"{sorted(info.student_features)}); expected the layer named by student_layer.")
        width = 1
        for d in shape[1:]:
            width *= int(d)
        self.projector = nn.Linear(width, self.code_dim)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("vqgraph", teacher)
        if self.quantizer is None or self.encoder is None or self.projector is None:
            raise KDistillError("vqgraph: called before fit_graph() and setup(); run it in a `task: graph` recipe.")
        t = self.kd_temperature
        with torch.no_grad():
            t_codes = self.quantizer.soft_logits(self.encoder(teacher.features[self.teacher_layers[0]].flatten(1)),
                                                 code_temperature=self.code_temperature)
        s_codes = self.quantizer.soft_logits(self.projector(student.features[self.student_layers[0]].flatten(1)),
                                             code_temperature=self.code_temperature)
        out = {"kd": self.alpha * kd_scale(t) * masked_mean(forward_kl(student.logits, teacher.logits,
                                                                       kd_temperature=t)),
               "code": self.code_weight * masked_mean(forward_kl(s_codes, t_codes))}
        if self.alpha < 1.0:
            labels = batch["labels"]
            out["ce"] = (1.0 - self.alpha) * masked_mean(cross_entropy(student.logits, labels), label_mask(labels))
        return out
