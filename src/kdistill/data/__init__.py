"""Datasets, collators and samplers. ``labels == -100`` becomes a bool ``mask`` here, once."""

from .classification import (
    ClassificationData,
    EpochSampler,
    NeighbourGroupSampler,
    TensorDictDataset,
    debian_files,
    load_dataset,
    make_loader,
)
from . import hard_augment  # noqa: F401,E402  (registers the "hard_augment" augmentation)

__all__ = ["ClassificationData", "EpochSampler", "NeighbourGroupSampler", "TensorDictDataset", "debian_files", "load_dataset", "make_loader"]
