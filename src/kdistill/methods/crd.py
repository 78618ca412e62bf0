"""``crd``: Contrastive Representation Distillation with a memory bank.

Tian, Krishnan & Isola, 2020, "Contrastive Representation Distillation" (ICLR).

Student and teacher penultimate embeddings go through small learned heads ``g_s``, ``g_t`` (Linear to
``embed_dim`` then L2 normalisation, both owned by the method; the teacher backbone stays frozen). Each
student embedding must pick out the teacher embedding of the *same input* among the teacher embeddings
of the batch and negatives drawn from a memory bank (see ``memory`` below), and symmetrically:

    L_crd = mean_i [ -log softmax_j(<g_s(s_i), k_j> / tau)_i ]  with keys k = [g_t(t_batch); bank_t]
          + the same with the roles of student and teacher swapped (keys [g_s(s_batch); bank_s])
    L = crd_weight * L_crd + kd_weight * T^2 * KL(p_t || p_s) + ce_weight * CE(z_s, y)

Memory (``memory``): ``"index"`` is the paper's per-sample bank: one momentum-averaged entry per
training example (``bank[i] <- normalize(m bank[i] + (1 - m) z_i)``, m = ``momentum``), indexed by
``batch["index"]`` (the classification runner provides it), from which ``num_negatives`` entries are drawn
uniformly at each step (an example's own entry is excluded from its negatives). ``"fifo"`` is a
MoCo-style queue of the last ``min(bank_size, num_train)`` embeddings and needs no indices. ``"auto"``
(default) uses the index bank when the batch carries ``index`` and the training-set size is known,
else the queue. Approximation, stated plainly: the loss is the InfoNCE form of CRD's objective, not its
NCE bound with the constant Z. Defaults follow the paper: embed_dim 128, tau 0.07, momentum 0.5,
crd_weight 0.8 together with KD (kd_weight 1, T 4). When to use: any pair of architectures; captures
structure that per-dimension losses miss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses.relations import contrastive_nce
from ..modules.banks import FifoQueue
from ..registry import METHODS
from ._zoo import feature, flat_size, kd_and_ce_terms, non_negative, positive, row_mask, select_rows
from .base import Method, ModelOutput, SetupInfo, require_teacher


class _IndexBank(nn.Module):
    """One momentum-averaged, L2-normalised entry per training example (CRD's memory)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("items", F.normalize(torch.randn(size, dim), dim=1))

    def sample(self, k: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, self.items.shape[0], (k,), device=self.items.device)
        return self.items[ids], ids

    @torch.no_grad()
    def update(self, ids: Tensor, z: Tensor, momentum: float) -> None:
        ids = ids.to(self.items.device).long()
        self.items[ids] = F.normalize(momentum * self.items[ids] + (1.0 - momentum) * z.detach().to(self.items.dtype),
                                      dim=1)


@METHODS.register("crd")
class CRD(Method):
    """Symmetric InfoNCE between projected student / teacher embeddings with memory-bank negatives."""

    def __init__(self, student_layer: str = "embed", teacher_layer: str = "embed", embed_dim: int = 128,
                 nce_temperature: float = 0.07, bank_size: int = 4096, crd_weight: float = 0.8,
                 kd_weight: float = 1.0, kd_temperature: float = 4.0, ce_weight: float = 1.0, memory: str = "auto",
                 num_negatives: int = 4096, momentum: float = 0.5) -> None:
        super().__init__()
        from ..errors import expect

        expect(memory in ("auto", "index", "fifo"), "crd memory", memory, "'auto', 'index' or 'fifo'")
        expect(0.0 <= momentum < 1.0, "crd momentum", momentum, "a number in [0, 1)")
        positive("crd", num_negatives=num_negatives)
        self.memory, self.num_negatives, self.momentum = memory, int(num_negatives), float(momentum)
        self.student_index_bank: _IndexBank | None = None
        self.teacher_index_bank: _IndexBank | None = None
        positive("crd", embed_dim=embed_dim, nce_temperature=nce_temperature, kd_temperature=kd_temperature)
        non_negative("crd", bank_size=bank_size, crd_weight=crd_weight, kd_weight=kd_weight, ce_weight=ce_weight)
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.embed_dim, self.nce_temperature, self.bank_size = int(embed_dim), float(nce_temperature), int(bank_size)
        self.crd_weight, self.kd_weight = float(crd_weight), float(kd_weight)
        self.kd_temperature, self.ce_weight = float(kd_temperature), float(ce_weight)
        self.student_head: nn.Module | None = None
        self.teacher_head: nn.Module | None = None

    def setup(self, info: SetupInfo) -> None:
        s_dim = flat_size(info.student_features[self.student_layers[0]])
        t_dim = flat_size(info.teacher_features[self.teacher_layers[0]])
        self.student_head = nn.Linear(s_dim, self.embed_dim)
        self.teacher_head = nn.Linear(t_dim, self.embed_dim)
        size = self.bank_size if info.num_train is None else min(self.bank_size, int(info.num_train))
        self.student_bank = FifoQueue(size, self.embed_dim)
        self.teacher_bank = FifoQueue(size, self.embed_dim)
        if self.memory != "fifo" and info.num_train:
            self.student_index_bank = _IndexBank(int(info.num_train), self.embed_dim)
            self.teacher_index_bank = _IndexBank(int(info.num_train), self.embed_dim)
        elif self.memory == "index":
            from ..errors import KDistillError

            raise KDistillError("crd memory='index': got no training-set size (SetupInfo.num_train); expected the "
                                "loop to provide it. Use memory='fifo' otherwise.")

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("crd", teacher)
        if self.student_head is None or self.teacher_head is None:
            raise RuntimeError("crd: setup() was not called, so the embedding heads do not exist yet")
        mask = row_mask(batch)
        s = select_rows(feature(student, self.student_layers[0], "student", "crd"), mask).flatten(1)
        t = select_rows(feature(teacher, self.teacher_layers[0], "teacher", "crd"), mask).flatten(1).detach()
        zs = F.normalize(self.student_head(s.float()), dim=1)
        zt = F.normalize(self.teacher_head(t.float()), dim=1)
        index = batch.get("index")
        if self.memory == "index" and index is None:
            from ..errors import KDistillError

            raise KDistillError("crd memory='index': the batch has no 'index' (dataset positions); expected the "
                                "runner to add it, or use memory='auto' / 'fifo'.")
        tau = self.nce_temperature
        if index is not None and self.teacher_index_bank is not None and self.student_index_bank is not None:
            ids = select_rows(index, mask).long()
            k = min(self.num_negatives, max(1, self.teacher_index_bank.items.shape[0] - 1))
            neg_t, nid_t = self.teacher_index_bank.sample(k)
            neg_s, nid_s = self.student_index_bank.sample(k)
            ids_d = ids.to(nid_t.device)
            loss = (contrastive_nce(zs, zt, neg_t, nce_temperature=tau, exclude=ids_d[:, None] == nid_t[None]).mean()
                    + contrastive_nce(zt, zs, neg_s, nce_temperature=tau, exclude=ids_d[:, None] == nid_s[None]).mean())
            if self.training:
                self.teacher_index_bank.update(ids, zt, self.momentum)
                self.student_index_bank.update(ids, zs, self.momentum)
        else:
            loss = (contrastive_nce(zs, zt, self.teacher_bank.get(), nce_temperature=tau).mean()
                    + contrastive_nce(zt, zs, self.student_bank.get(), nce_temperature=tau).mean())
            if self.training and self.bank_size > 0:
                self.teacher_bank.push(zt)
                self.student_bank.push(zs)
        out = {"crd": self.crd_weight * loss}
        out.update(kd_and_ce_terms(student, teacher, batch, kd_weight=self.kd_weight,
                                   kd_temperature=self.kd_temperature, ce_weight=self.ce_weight, mask=mask))
        return out
