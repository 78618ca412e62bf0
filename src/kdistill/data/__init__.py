"""Datasets, collators and samplers. ``labels == -100`` becomes a bool ``mask`` here, once."""

from .classification import (
    ClassificationData,
    EpochSampler,
    TensorDictDataset,
    debian_files,
    load_dataset,
    make_loader,
)

__all__ = ["ClassificationData", "EpochSampler", "TensorDictDataset", "debian_files", "load_dataset", "make_loader"]
