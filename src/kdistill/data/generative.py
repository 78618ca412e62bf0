"""Datasets for generative models (task ``diffusion``): labelled samples in the range the model generates in.

Loaders are registered in :data:`GENERATIVE` by name: ``fashion_mnist`` (28x28 grey images in ``[-1, 1]``, from
Debian's ``dataset-fashion-mnist``) and two 2-D toys for fast tests and closed-form checks, ``two_moons`` (2 classes)
and ``ring`` (a mixture of ``modes`` Gaussians on a circle, one class per mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import expect
from ..registry import Registry

GENERATIVE: Registry[Any] = Registry("generative dataset")


@dataclass
class GenerativeData:
    """Train / test samples ``(N, *sample_shape)`` float32 and their class ids ``(N,)``; ``image``: whether samples
    are images (grids in reports, a classifier's features for the distances) or points (scatter plots, raw
    coordinates)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    image: bool = False

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "train": len(self.y_train), "test": len(self.y_test),
                "num_classes": self.num_classes, "sample_shape": list(self.sample_shape)}


@GENERATIVE.register("fashion_mnist")
def fashion_mnist(num_train: int | None = None, data_seed: int = 42) -> GenerativeData:
    """Fashion-MNIST in ``[-1, 1]``: the 60k training images (``num_train``: a random subset), the 10k test images."""
    from .classification import fashion_mnist as load

    d = load(num_train=num_train, val_fraction=0.1, data_seed=data_seed, pixels="signed")
    return GenerativeData("fashion_mnist", torch.cat([d.x_train, d.x_val]), torch.cat([d.y_train, d.y_val]),
                          d.x_test, d.y_test, d.num_classes, d.class_names, image=True)


def _toy(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, test_fraction: float,
         seed: int) -> GenerativeData:
    idx = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(len(y) * test_fraction)))
    x = torch.as_tensor(x[idx], dtype=torch.float32)
    y = torch.as_tensor(y[idx], dtype=torch.long)
    return GenerativeData(name, x[n_test:], y[n_test:], x[:n_test], y[:n_test], num_classes,
                          [f"class_{i}" for i in range(num_classes)])


@GENERATIVE.register("two_moons")
def two_moons(num_samples: int = 4000, noise: float = 0.08, test_fraction: float = 0.25,
              data_seed: int = 42) -> GenerativeData:
    """scikit-learn's two interleaving half circles, one class each, centred and scaled to unit variance."""
    from sklearn.datasets import make_moons

    expect(num_samples >= 8, "num_samples", num_samples, "an integer >= 8")
    x, y = make_moons(n_samples=num_samples, noise=noise, random_state=data_seed)
    x = (x - x.mean(0)) / x.std(0)
    return _toy("two_moons", x, y, 2, test_fraction, data_seed)


@GENERATIVE.register("ring")
def ring(num_samples: int = 4000, modes: int = 8, radius: float = 1.5, std: float = 0.1, test_fraction: float = 0.25,
         data_seed: int = 42) -> GenerativeData:
    """A mixture of ``modes`` equal Gaussians (``std``) evenly spaced on a circle of ``radius``; class = mode."""
    expect(modes >= 2, "modes", modes, "an integer >= 2")
    rng = np.random.default_rng(data_seed)
    y = rng.integers(0, modes, num_samples)
    angle = 2 * math.pi * y / modes
    x = np.stack([np.cos(angle), np.sin(angle)], 1) * radius + rng.normal(0, std, (num_samples, 2))
    return _toy("ring", x, y, modes, test_fraction, data_seed)


def load_generative(name: str, **kwargs: Any) -> GenerativeData:
    return GENERATIVE.get(name)(**kwargs)
