"""Loaders: a dataset of aligned tensors fetched a batch at a time, deterministic epoch samplers, and
:func:`make_loader`. Every task builds its loaders here."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from ..errors import KDistillError, expect


class TensorDictDataset(torch.utils.data.Dataset):
    """A dataset of aligned tensors that fetches whole batches at once (``__getitems__``): one
    fancy-index per batch instead of one Python call per example."""

    def __init__(self, **tensors: Tensor) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise KDistillError(f"TensorDictDataset: tensors have different lengths {lengths}; expected equal.")
        self.tensors = tensors
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


def _identity(batch: Any) -> Any:
    return batch


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on ``(seed, epoch)``: identical on every rank and
    after a resume, so the data order of a run is a pure function of its seed."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class NeighbourGroupSampler(EpochSampler):
    """An epoch order in which consecutive runs of ``group`` rows are neighbours: rows are visited as anchors
    in a ``(seed, epoch)`` permutation, and each anchor not yet drawn is followed by up to ``group - 1`` of its
    ``neighbours`` (``(N, k)`` indices, nearest first) not yet drawn. Every row appears exactly once per
    epoch, so a loader cutting this order into batches of ``B`` rows gives batches made of ``B / group``
    neighbourhoods (plus partial groups late in the epoch, when neighbours run out) instead of ``B``
    unrelated rows: in-batch ranking losses then see hard negatives (near ties), not only easy ones."""

    def __init__(self, neighbours: Tensor, group: int, seed: int) -> None:
        expect(neighbours.dim() == 2 and len(neighbours) >= 1, "neighbours", tuple(neighbours.shape),
               "an (N, k) tensor of row indices")
        expect(int(group) >= 1, "neighbour group", group, "an integer >= 1 (1 = plain shuffling)")
        super().__init__(len(neighbours), seed, True)
        self.neighbours, self.group = neighbours.long().cpu(), int(group)

    def __iter__(self):
        if self.group == 1:
            return super().__iter__()
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        nb = self.neighbours.tolist()
        used = bytearray(self.n)
        order: list[int] = []
        for a in perm:
            if used[a]:
                continue
            used[a] = 1
            order.append(a)
            taken = 1
            for j in nb[a]:
                if taken >= self.group:
                    break
                if not used[j]:
                    used[j] = 1
                    order.append(j)
                    taken += 1
        return iter(order)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                drop_last: bool = False, sampler: Sampler[int] | None = None) -> DataLoader:
    """A DataLoader over a :class:`TensorDictDataset` with a deterministic epoch sampler (``sampler`` replaces
    the default :class:`EpochSampler`; it must cover the dataset and have ``set_epoch``, unless it declares
    ``subset = True``: a sampler that draws part of the dataset per epoch, such as data selection's DomainSampler)."""
    expect(batch_size >= 1, "batch_size", batch_size, "an integer >= 1")
    if sampler is not None and not getattr(sampler, "subset", False):
        expect(len(sampler) == len(dataset), "sampler length", len(sampler), f"the dataset size {len(dataset)}")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler or EpochSampler(len(dataset), seed, shuffle),
                      collate_fn=_identity, drop_last=drop_last)
