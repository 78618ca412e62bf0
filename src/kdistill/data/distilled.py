"""A distilled data set as a file: a few (synthetic or selected) examples that train a model almost as well as
the data they came from.

The file is one ``.safetensors`` (written atomically): ``inputs`` ``(N, *input_shape)`` float32, ``labels``
``(N,)`` int64, optionally ``soft_labels`` ``(N, C)`` (a teacher's probabilities), per-example extras
``per_example.<name>`` (e.g. ``targets``: representation targets) and other tensors ``extra.<name>`` (e.g. the
indices of selected real examples, learned compensators), with JSON metadata (the method, the budget, the source
data spec, the class names). Load it with :func:`load_distilled_set` in any training code, or train a classifier on
it with the ``distilled`` dataset (``data: {name: distilled, kwargs: {path: .../distilled.safetensors}}``), which
takes validation and test splits from the data the set was distilled from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import KDistillError
from ..registry import DATASETS
from .classification import ClassificationData, load_dataset

FORMAT = "kdistill-distilled-set"
VERSION = 1


@dataclass
class DistilledSet:
    """A distilled training set. ``per_example`` tensors go into every training batch under their name (one row
    per example); ``tensors`` are stored alongside (anything else a method keeps, e.g. compensators)."""

    inputs: Tensor
    labels: Tensor
    soft_labels: Tensor | None = None
    per_example: dict[str, Tensor] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if self.labels.dim() != 1 or len(self.labels) != n:
            raise KDistillError(f"distilled set: {n} inputs and labels of shape {tuple(self.labels.shape)}; expected "
                                f"({n},) class ids, one per input.")
        if self.soft_labels is not None and (self.soft_labels.dim() != 2 or len(self.soft_labels) != n):
            raise KDistillError(f"distilled set: soft_labels of shape {tuple(self.soft_labels.shape)}; expected "
                                f"({n}, num_classes) probabilities.")
        for name, t in self.per_example.items():
            if len(t) != n:
                raise KDistillError(f"distilled set: per-example tensor {name!r} has {len(t)} rows, expected {n}.")

    def __len__(self) -> int:
        return len(self.labels)


def save_distilled_set(path: str | Path, data: DistilledSet) -> Path:
    """Write ``data`` to ``path`` (``.safetensors``), atomically."""
    from ..io import save_state_dict_atomic

    path = Path(path)
    if path.suffix != ".safetensors":
        raise KDistillError(f"distilled set path: got {str(path)!r}, expected a file name ending in .safetensors.")
    tensors = {"inputs": data.inputs.float(), "labels": data.labels.long()}
    if data.soft_labels is not None:
        tensors["soft_labels"] = data.soft_labels.float()
    tensors.update({f"per_example.{k}": v for k, v in data.per_example.items()})
    tensors.update({f"extra.{k}": v for k, v in data.tensors.items()})
    save_state_dict_atomic(path, tensors, metadata={"format": FORMAT, "version": str(VERSION),
                                                    "meta": json.dumps(data.meta, sort_keys=True, default=str)})
    return path


def load_distilled_set(path: str | Path) -> DistilledSet:
    """Read a file written by :func:`save_distilled_set`; one clear error for anything else."""
    from safetensors import safe_open

    from ..io import load_state_dict

    path = Path(path)
    tensors = load_state_dict(path)  # a missing or truncated file raises here, with the fix
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    if header.get("format") != FORMAT or "inputs" not in tensors or "labels" not in tensors:
        raise KDistillError(f"{path}: not a distilled data set (format {header.get('format')!r}, tensors "
                            f"{sorted(tensors)[:6]}); expected a file written by the dataset_distillation task "
                            "(save_distilled_set).")
    if int(header.get("version", 0)) > VERSION:
        raise KDistillError(f"{path}: distilled-set format version {header['version']}, newer than this kdistill "
                            f"reads ({VERSION}). Fix: upgrade kdistill.")
    return DistilledSet(
        inputs=tensors["inputs"], labels=tensors["labels"], soft_labels=tensors.get("soft_labels"),
        per_example={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("per_example.")},
        tensors={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("extra.")},
        meta=json.loads(header.get("meta", "{}")))


@DATASETS.register("distilled")
def distilled(path: str, data: dict[str, Any] | None = None) -> ClassificationData:
    """A distilled set (``path``: the ``distilled.safetensors`` a ``dataset_distillation`` run wrote) as the training
    split; validation and test come from the data it was distilled from (recorded in the file), or from ``data``
    (``{name: ..., kwargs: {...}}``) when given. Hard labels only: soft labels and other per-example tensors are
    read by :func:`load_distilled_set`."""
    if not path:
        raise KDistillError("data.kwargs.path: empty; expected the distilled set's file, e.g. "
                            "runs/<name>/per_class_10/distilled.safetensors.")
    ds = load_distilled_set(path)
    source = data or ds.meta.get("data")
    if not isinstance(source, dict) or "name" not in source:
        raise KDistillError(f"{path}: records no source data to validate and test on; expected data: {{name: ..., "
                            "kwargs: ...}} under the distilled dataset's kwargs.")
    base = load_dataset(source["name"], **source.get("kwargs", {}))
    if tuple(base.input_shape) != tuple(ds.inputs.shape[1:]) or int(ds.labels.max()) >= base.num_classes:
        raise KDistillError(f"{path}: inputs of shape {tuple(ds.inputs.shape[1:])} with labels up to "
                            f"{int(ds.labels.max())}, but the evaluation data {source['name']!r} has inputs "
                            f"{tuple(base.input_shape)} and {base.num_classes} classes; expected the data the set was "
                            "distilled from.")
    return ClassificationData("distilled", ds.inputs.float(), ds.labels.long(), base.x_val, base.y_val, base.x_test,
                              base.y_test, base.num_classes, base.class_names)


def plot_distilled_grid(inputs: Tensor, labels: Tensor, path: str | Path, *, class_names: list[str] | None = None,
                        max_per_class: int = 10, title: str = "") -> Path:
    """A PNG of up to ``max_per_class`` examples of every class, one row per class: images ``(C, H, W)`` with C = 1
    or 3 as pictures, 1-D inputs (``(L,)``, ``(1, L)``: signals such as MNIST-1D; also a tabular row's feature
    profile) and multi-channel sequences ``(C, L)`` as line plots."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_bytes_atomic

    x, y = inputs.detach().float().cpu(), labels.cpu()
    classes = sorted(set(y.tolist()))
    if not classes:
        raise KDistillError("plot_distilled_grid: the set is empty; expected at least one example.")
    rows = [(c, (y == c).nonzero().squeeze(1)[:max_per_class]) for c in classes]
    cols = max(len(idx) for _, idx in rows)
    names = class_names or [str(c) for c in range(max(classes) + 1)]
    image = x.dim() == 4 and x.shape[1] in (1, 3)
    fig, axes = plt.subplots(len(rows), cols, figsize=(max(4.0, 1.3 * cols + 0.8), 1.0 * len(rows) + 0.6), dpi=90,
                             squeeze=False)
    for r, (c, idx) in enumerate(rows):
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(idx):
                ax.axis("off")
                continue
            v = x[idx[k]]
            if image:
                pic = v.permute(1, 2, 0).numpy()
                pic = (pic - pic.min()) / max(float(pic.max() - pic.min()), 1e-8)
                ax.imshow(pic.squeeze(-1) if pic.shape[-1] == 1 else pic, cmap="gray" if pic.shape[-1] == 1 else None)
            else:
                v = v.reshape(-1, v.shape[-1]) if v.dim() >= 2 else v[None]
                for ch in v:
                    ax.plot(ch.numpy(), lw=0.9)
            if k == 0:
                ax.set_ylabel(names[c] if c < len(names) else str(c), fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    write_bytes_atomic(path, buf.getvalue())
    return path
