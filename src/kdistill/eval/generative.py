"""Sample-quality measures for generative students (task ``diffusion``), computed on features of a fixed encoder.

* :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., "GANs
  Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", 2017). On the features of a
  classifier trained here rather than Inception's, so it is "FID-like": comparable across rows of one table, not
  with published FIDs.
* :func:`precision_recall`: Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative
  Models" (2019): precision is the share of generated samples inside the real data's k-NN balls (fidelity), recall
  the share of real samples inside the generated samples' balls (coverage).
* :func:`sample_grid_png`: a grid of images (one row per class), or a scatter plot of 2-D samples by class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import expect


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two ``(N, D)`` feature sets, in float64. The trace
    of the matrix square root is the sum of square roots of the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric,
    so no complex round-off)."""
    a = np.asarray(features_a, dtype=np.float64).reshape(len(features_a), -1)
    b = np.asarray(features_b, dtype=np.float64).reshape(len(features_b), -1)
    expect(len(a) >= 2 and len(b) >= 2, "feature sets", (len(a), len(b)), "at least 2 samples each")
    expect(a.shape[1] == b.shape[1], "feature widths", (a.shape[1], b.shape[1]), "the same width")
    mu_a, s_a = _moments(a)
    mu_b, s_b = _moments(b)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    root_trace = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root_trace)


def _knn_radius(x: Tensor, k: int) -> Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 0th neighbour is the point itself


def _coverage(points: Tensor, centres: Tensor, radius: Tensor, chunk: int = 1024) -> float:
    inside = []
    for i in range(0, len(points), chunk):
        inside.append((torch.cdist(points[i:i + chunk], centres) <= radius[None]).any(1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall of ``fake`` against ``real`` ``(N, D)`` features with ``k``-NN balls."""
    real, fake = torch.as_tensor(real).double().flatten(1), torch.as_tensor(fake).double().flatten(1)
    expect(len(real) > k and len(fake) > k, "sample counts", (len(real), len(fake)), f"more than k={k} each")
    return {"precision": _coverage(fake, real, _knn_radius(real, k)),
            "recall": _coverage(real, fake, _knn_radius(fake, k))}


def sample_grid_png(samples: Tensor, labels: Tensor, path: str | Path, *, class_names: list[str] | None = None,
                    title: str = "", image: bool = True, per_class: int = 8) -> Path:
    """Write ``samples`` as a PNG: images in a grid with one row per class (``per_class`` columns, pixels in
    ``[-1, 1]``), or 2-D points coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_bytes_atomic

    path = Path(path)
    s = samples.detach().float().cpu()
    y = labels.detach().cpu()
    classes = sorted(int(c) for c in y.unique())
    if image:
        rows = []
        for c in classes:
            imgs = s[y == c][:per_class]
            pad = torch.full((per_class - len(imgs), *s.shape[1:]), -1.0)
            rows.append(torch.cat([imgs, pad]))
        grid = torch.stack(rows)  # (C, per_class, ch, H, W)
        n_r, n_c, ch, h, w = grid.shape
        canvas = grid.permute(0, 3, 1, 4, 2).reshape(n_r * h, n_c * w, ch).clamp(-1, 1).add(1).div(2).numpy()
        fig, ax = plt.subplots(figsize=(n_c * 0.6 + 1.2, n_r * 0.6 + 0.5))
        ax.imshow(canvas.squeeze(-1) if ch == 1 else canvas, cmap="gray" if ch == 1 else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([h * (i + 0.5) for i in range(n_r)])
        ax.set_yticklabels([class_names[c] if class_names else str(c) for c in classes], fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(4, 4))
        pts = s.reshape(len(s), -1).numpy()
        ax.scatter(pts[:, 0], pts[:, 1], c=y.numpy(), s=3, cmap="tab10")
        ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())
    return path
