"""``dataset_quantization``: Dataset Quantization (DQ).

Zhou, Wang, Gu, Peng, Lian, Zhang, You & Feng, "Dataset Quantization", ICCV 2023.

Instead of synthesising examples, DQ selects real ones so that the selection stays diverse at every budget. The
data (here: every class on its own, so the budget per class is exact) is split into ``num_bins`` non-overlapping
bins by a greedy submodular rule on feature vectors: bin ``n`` is filled from what earlier bins left, each step
adding the example with the largest gain ``sum_{p in S} ||f(p) - f(x)||^2 - sum_{p in R \\ S} ||f(p) - f(x)||^2``
(:func:`kdistill.data.selection.dq_bins`). The set is then sampled uniformly across the bins
(:func:`kdistill.data.selection.sample_across_bins`), ``per_class / num_bins`` from each: early bins contribute
representative examples, late bins the unusual ones a single greedy coreset would never reach.

Features ``f``: the teacher's ``feature_layer`` (default ``embed``, the penultimate features; the paper uses a
pre-trained image encoder), or the raw inputs with ``feature_layer: null``. The paper's second stage (dropping
uninformative image patches and reconstructing them with a masked auto-encoder at training time) is for natural
images and needs an MAE; it does not apply to 1-D signals or tabular rows and is not implemented. Hard labels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.distilled import DistilledSet
from ..data.selection import dq_bins, sample_across_bins
from ..errors import expect
from ..registry import METHODS
from ._distill_data import DataDistillMethod, check_budget, layer_features, require


@METHODS.register("dataset_quantization")
class DatasetQuantization(DataDistillMethod):
    """Dataset Quantization (2023): submodular bins over features, then uniform sampling across the bins."""

    def __init__(self, num_bins: int = 10, feature_layer: str | None = "embed") -> None:
        super().__init__()
        expect(isinstance(num_bins, int) and num_bins >= 1, "dataset_quantization num_bins", num_bins,
               "an integer >= 1")
        self.num_bins, self.feature_layer = int(num_bins), feature_layer

    def distill_data(self, *, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
                     teacher: nn.Module | None, build_model: Callable[[], nn.Module], seed: int,
                     cache_dir: Path | None = None, cache_key: dict[str, Any] | None = None,
                     progress: bool = False) -> DistilledSet:
        check_budget("dataset_quantization", per_class, labels, num_classes)
        if self.feature_layer is None:
            feats = inputs.flatten(1).float()
        else:
            teacher = require("dataset_quantization", "a teacher (its features)", teacher)
            feats = layer_features(teacher, inputs, self.feature_layer)
        g = torch.Generator().manual_seed(seed)
        kept, bin_of = [], torch.full((len(labels),), -1, dtype=torch.long)
        for c in range(num_classes):
            rows = (labels == c).nonzero().squeeze(1)
            expect(len(rows) >= per_class, f"dataset_quantization: examples of class {c}", len(rows),
                   f"at least per_class = {per_class}", "Lower per_class.")
            bins = dq_bins(feats[rows], min(self.num_bins, len(rows)))
            for b, idx in enumerate(bins):
                bin_of[rows[idx]] = b
            kept.append(rows[sample_across_bins(bins, per_class, generator=g)])
        kept_t = torch.cat(kept).sort().values
        return DistilledSet(inputs=inputs[kept_t].detach().clone().float(), labels=labels[kept_t].clone(),
                            tensors={"source_indices": kept_t, "bin_of_kept": bin_of[kept_t]},
                            meta={"num_bins": self.num_bins, "feature_layer": self.feature_layer})
