"""Datasets, collators and samplers. ``labels == -100`` becomes a bool ``mask`` here, once."""

from . import hard_augment  # noqa: F401,E402  (registers the "hard_augment" augmentation)
from .classification import ClassificationData, debian_files, load_dataset
from .loaders import EpochSampler, NeighbourGroupSampler, TensorDictDataset, make_loader

__all__ = ["ClassificationData", "EpochSampler", "NeighbourGroupSampler", "TensorDictDataset", "debian_files",
           "load_dataset", "make_loader"]
