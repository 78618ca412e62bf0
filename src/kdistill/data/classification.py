"""Offline classification datasets (built locally or read from installed packages) and loaders."""

from __future__ import annotations

import gzip
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import KDistillError, expect
from ..registry import DATASETS


@dataclass
class ClassificationData:
    """Train / validation / test tensors. ``x_*`` float32 features, or int64 ``(N, 2, L)`` token ids and attention
    masks for text; ``y_*`` int64 class ids."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test),
                "num_classes": self.num_classes, "input_shape": list(self.input_shape)}


def _split_val(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    expect(0.0 < val_fraction < 0.5, "val_fraction", val_fraction, "a number in (0, 0.5)")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n_val = max(1, int(round(len(y) * val_fraction)))
    return x[idx[n_val:]], y[idx[n_val:]], x[idx[:n_val]], y[idx[:n_val]]


def _standardise(x_train: np.ndarray, *others: np.ndarray, per_feature: bool = True):
    axis = 0 if per_feature else None
    mean = x_train.mean(axis=axis, keepdims=per_feature)
    std = x_train.std(axis=axis, keepdims=per_feature) + 1e-6
    return [(a - mean) / std for a in (x_train, *others)]


def _pack(name, x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes, class_names=()) -> ClassificationData:
    kind = torch.long if np.asarray(x_tr).dtype.kind in "iu" else torch.float32  # token ids stay integers
    f = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=kind)  # noqa: E731
    i = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return ClassificationData(name, f(x_tr), i(y_tr), f(x_va), i(y_va), f(x_te), i(y_te), int(num_classes),
                              list(class_names))


@DATASETS.register("mnist1d")
def mnist1d(num_samples: int = 10000, val_fraction: float = 0.1, data_seed: int = 42) -> ClassificationData:
    """MNIST-1D (Greydanus, 2020): procedural 1-D digits of length 40, generated locally and
    deterministically by the ``mnist1d`` package (80/20 train/test, then ``val_fraction`` of train)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(data_seed)
    d = make_dataset(args)  # builds locally; never the download path
    x_tr, y_tr, x_va, y_va = _split_val(d["x"], d["y"], val_fraction, data_seed)
    x_tr, x_va, x_te = _standardise(x_tr, x_va, d["x_test"], per_feature=False)
    return _pack("mnist1d", x_tr, y_tr, x_va, y_va, x_te, d["y_test"], 10, [str(i) for i in range(10)])


def _sklearn(name: str, loader, test_fraction: float, val_fraction: float, data_seed: int) -> ClassificationData:
    from sklearn.model_selection import train_test_split

    bunch = loader()
    x, y = bunch.data.astype(np.float32), bunch.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=data_seed, stratify=y)
    x_tr, y_tr, x_va, y_va = _split_val(x_tr, y_tr, val_fraction, data_seed)
    x_tr, x_va, x_te = _standardise(x_tr, x_va, x_te)
    names = [str(n) for n in getattr(bunch, "target_names", range(int(y.max()) + 1))]
    return _pack(name, x_tr, y_tr, x_va, y_va, x_te, y_te, int(y.max()) + 1, names)


@DATASETS.register("digits")
def digits(test_fraction: float = 0.25, val_fraction: float = 0.15, data_seed: int = 42) -> ClassificationData:
    """scikit-learn 8x8 digits (1,797 images, 10 classes), standardised per pixel."""
    from sklearn.datasets import load_digits

    return _sklearn("digits", load_digits, test_fraction, val_fraction, data_seed)


@DATASETS.register("iris")
def iris(test_fraction: float = 0.3, val_fraction: float = 0.15, data_seed: int = 42) -> ClassificationData:
    """scikit-learn iris (150 rows, 4 features, 3 classes)."""
    from sklearn.datasets import load_iris

    return _sklearn("iris", load_iris, test_fraction, val_fraction, data_seed)


@DATASETS.register("wine")
def wine(test_fraction: float = 0.3, val_fraction: float = 0.15, data_seed: int = 42) -> ClassificationData:
    """scikit-learn wine (178 rows, 13 features, 3 classes)."""
    from sklearn.datasets import load_wine

    return _sklearn("wine", load_wine, test_fraction, val_fraction, data_seed)


@DATASETS.register("breast_cancer")
def breast_cancer(test_fraction: float = 0.25, val_fraction: float = 0.15, data_seed: int = 42) -> ClassificationData:
    """scikit-learn breast cancer Wisconsin (569 rows, 30 features, 2 classes)."""
    from sklearn.datasets import load_breast_cancer

    return _sklearn("breast_cancer", load_breast_cancer, test_fraction, val_fraction, data_seed)


def debian_files(package: str) -> list[str]:
    """Files installed by a Debian package (``dpkg -L``); a clear error when it is missing."""
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        raise KDistillError(
            f"Debian package {package!r} is not installed; expected it for this dataset. "
            f"Fix: `sudo apt-get install {package}` (the Makefile does this)."
        ) from None
    return out.split()


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]


@DATASETS.register("fashion_mnist")
def fashion_mnist(num_train: int | None = None, val_fraction: float = 0.1, data_seed: int = 42) -> ClassificationData:
    """Fashion-MNIST (Xiao et al., 2017) from Debian's ``dataset-fashion-mnist``: 28x28 grey images,
    10 classes; ``num_train`` keeps a random subset of the 60k training images (CPU budgets)."""
    files = {os.path.basename(f): f for f in debian_files("dataset-fashion-mnist") if f.endswith("-ubyte.gz")}

    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(files[name], "rb") as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=offset)

    x = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    y = idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64)
    x_te = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    y_te = idx("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64)
    if num_train is not None:
        keep = np.random.default_rng(data_seed).permutation(len(y))[: int(num_train)]
        x, y = x[keep], y[keep]
    x_tr, y_tr, x_va, y_va = _split_val(x, y, val_fraction, data_seed)
    x_tr, x_va, x_te = _standardise(x_tr, x_va, x_te, per_feature=False)
    return _pack("fashion_mnist", x_tr, y_tr, x_va, y_va, x_te, y_te, 10, FASHION_CLASSES)


def _label_ids(values_by_split: dict[str, list[Any]], column: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Label values -> class ids, once for every split. Integers (or integer strings, as CSV gives them) keep
    their numeric order; other values are sorted as strings. Returns (ids per split, class names)."""
    every = [v for vals in values_by_split.values() for v in vals]
    for v in every:
        if v is None or isinstance(v, (bool, list, dict)) or (isinstance(v, float) and not v.is_integer()):
            raise KDistillError(f"data.label_column {column!r}: got a label {v!r}, expected class names (strings) "
                                "or integer class ids.")
    kinds = {"string" if isinstance(v, str) else "integer" for v in every}
    if len(kinds) > 1:
        raise KDistillError(f"data.label_column {column!r}: labels mix strings and numbers; expected one type. "
                            "Fix the data so every label is a class name, or every label an integer id.")

    def as_int(v: Any) -> int | None:
        text = str(int(v) if isinstance(v, float) else v).strip()
        return int(text) if text.lstrip("-").isdigit() else None

    numeric = all(as_int(v) is not None for v in every)
    norm = as_int if numeric else str
    values = sorted({norm(v) for v in every})
    key = {v: i for i, v in enumerate(values)}
    ids = {s: np.array([key[norm(v)] for v in vals], dtype=np.int64) for s, vals in values_by_split.items()}
    return ids, [str(v) for v in values]


def _tokenized(tokenizer: str, rows: dict[str, list[dict[str, Any]]], column: str,
               max_length: int) -> dict[str, np.ndarray]:
    """``(N, 2, max_length)`` int64 arrays (token ids, attention mask) of a text column, per split."""
    from ..models.hf import load_tokenizer

    tok = load_tokenizer(tokenizer)
    out = {}
    for split, part in rows.items():
        texts = []
        for i, row in enumerate(part, start=1):
            if not isinstance(row[column], str):
                raise KDistillError(f"data ({split} split), row {i}, column {column!r}: got {row[column]!r}, expected "
                                    "a text.")
            texts.append(row[column])
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        out[split] = np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)
    return out


@DATASETS.register("files")
def table_files(files: Any = None, label_column: str = "label", feature_columns: list[str] | None = None,
                text_column: str | None = None, tokenizer: str | None = None, max_length: int = 128,
                format: str = "auto", hf_dataset: dict[str, Any] | None = None, validation_fraction: float = 0.1,
                test_fraction: float = 0.1, data_seed: int = 0, standardise: bool = True) -> ClassificationData:
    """Your own table (``data.files``: CSV, TSV, JSON lines, JSON, Parquet; or ``data.hf_dataset``) with a
    ``label_column`` of class names or ids, and either numeric ``feature_columns`` (default: every column but
    the label; standardised with the training split's statistics) or a ``text_column`` tokenized by
    ``tokenizer`` (a Hugging Face folder or hub id; by default the recipe's ``hf`` model's) to ``max_length``
    tokens, giving ``(2, max_length)`` inputs (ids, attention mask) for ``hf`` models. Held-out splits not given
    as files are cut from the training rows (seeded); class names are kept (``kdistill eval`` uses them)."""
    from .files import load_rows

    if text_column is not None and (feature_columns or tokenizer is None):
        raise KDistillError("data.text_column: got " + ("feature_columns too" if feature_columns else "no tokenizer")
                            + "; expected a text column alone, with a tokenizer (data.tokenizer, or an hf teacher or "
                            "student whose folder carries one).")
    rows = load_rows(files=files, format=format, hf_dataset=hf_dataset, validation_fraction=validation_fraction,
                     test_fraction=test_fraction, seed=data_seed,
                     columns=[label_column, text_column, *(feature_columns or [])])
    ids, names = _label_ids({s: [r[label_column] for r in part] for s, part in rows.items()}, label_column)
    if text_column is not None:
        x = _tokenized(tokenizer, rows, text_column, max_length)
        return _pack("files", x["train"], ids["train"], x["validation"], ids["validation"], x["test"], ids["test"],
                     len(names), names)
    features = list(feature_columns) if feature_columns else [c for c in rows["train"][0] if c != label_column]
    if not features:
        raise KDistillError(f"data: no feature columns besides the label {label_column!r}; expected numeric "
                            "feature columns (data.feature_columns).")
    xs = {}
    for split, part in rows.items():
        x = np.empty((len(part), len(features)), dtype=np.float32)
        for i, row in enumerate(part):
            for j, col in enumerate(features):
                try:
                    x[i, j] = float(row[col])
                except (TypeError, ValueError):
                    raise KDistillError(
                        f"data ({split} split), row {i + 1}, column {col!r}: got {row[col]!r}, expected a number. "
                        "Fix: name only numeric columns in data.feature_columns (text needs a text model).") from None
        xs[split] = x
    x_tr, x_va, x_te = xs["train"], xs["validation"], xs["test"]
    if standardise:
        x_tr, x_va, x_te = _standardise(x_tr, x_va, x_te)
    return _pack("files", x_tr, ids["train"], x_va, ids["validation"], x_te, ids["test"], len(names), names)


def load_dataset(name: str, **kwargs: Any) -> ClassificationData:
    return DATASETS.get(name)(**kwargs)
