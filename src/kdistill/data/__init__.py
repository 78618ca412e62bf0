"""Datasets, collators and samplers. ``labels == -100`` becomes a bool ``mask`` here, once."""

from . import (  # noqa: F401,E402  (imported for their registrations)
    distilled,  # the "distilled" dataset: a distilled set as training data
    hard_augment,  # the "hard_augment" augmentation
)
from .classification import ClassificationData, debian_files, load_dataset
from .loaders import EpochSampler, NeighbourGroupSampler, TensorDictDataset, make_loader

__all__ = ["ClassificationData", "EpochSampler", "NeighbourGroupSampler", "TensorDictDataset", "debian_files",
           "load_dataset", "make_loader"]
