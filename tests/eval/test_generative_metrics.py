"""Fréchet distance and improved precision / recall against closed forms; sample grids."""

import numpy as np
import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.eval.generative import frechet_distance, precision_recall, sample_grid_png


def test_frechet_distance_identities():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    # a zero-mean set against itself scaled by 2: tr(S + 4S - 2 * 2S) = tr(S), plus the mean term (4 - 1)... exact:
    a0 = a - a.mean(0)
    assert frechet_distance(a0, 2 * a0) == pytest.approx(float(np.trace(np.cov(a0, rowvar=False))), rel=1e-6)


def test_frechet_distance_of_gaussians_approaches_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(200_000, 1))
    b = rng.normal(1.0, 2.0, size=(200_000, 1))
    # (mu_a - mu_b)^2 + s_a^2 + s_b^2 - 2 s_a s_b = 1 + 1 + 4 - 4 = 2
    assert frechet_distance(a, b) == pytest.approx(2.0, abs=0.03)
    with pytest.raises(KDistillError, match="width"):
        frechet_distance(a[:10], np.zeros((10, 2)))


def test_precision_recall_extremes_and_mode_collapse():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 2, generator=g) * 0.1 + torch.tensor([c, 0.0]) for c in (0.0, 5.0)])
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(real, real + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    # every generated sample sits in one of the two real modes: faithful (precision ~1) but half the data uncovered
    collapsed = precision_recall(real, torch.randn(200, 2, generator=g) * 0.1)
    assert collapsed["precision"] > 0.9 and 0.4 < collapsed["recall"] < 0.6
    with pytest.raises(KDistillError, match="more than k"):
        precision_recall(real[:3], real[:3], k=3)


def test_sample_grid_png_images_and_points(tmp_path):
    x = torch.rand(20, 1, 6, 6) * 2 - 1
    y = torch.arange(20) % 4
    p = sample_grid_png(x, y, tmp_path / "g.png", class_names=["a", "b", "c", "d"], per_class=5)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = sample_grid_png(torch.randn(30, 2), torch.arange(30) % 3, tmp_path / "p.png", image=False)
    assert q.stat().st_size > 1000
