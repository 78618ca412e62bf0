"""Offline classification datasets (built locally or read from installed packages) and loaders."""

from __future__ import annotations

import gzip
import os
import subprocess
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import KDistillError, expect
from ..registry import DATASETS


@dataclass
class ClassificationData:
    """Train / validation / test tensors. ``x_*`` float32 features, float32 ``(N, C, H, W)`` images, or int64
    ``(N, 2, L)`` token ids and attention masks for text; ``y_*`` int64 class ids."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    #: the domain of each training example (your files' ``domain_column``), for domain-aware selection (DDK)
    train_domains: list[str] | None = None

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
def fashion_mnist(num_train: int | None = None, val_fraction: float = 0.1, data_seed: int = 42,
                  pixels: str = "standardised") -> ClassificationData:
    """Fashion-MNIST (Xiao et al., 2017) from Debian's ``dataset-fashion-mnist``: 28x28 grey images,
    10 classes; ``num_train`` keeps a random subset of the 60k training images (CPU budgets). ``pixels``:
    ``"standardised"`` (zero mean, unit variance over the training pixels) or ``"signed"`` (``[-1, 1]``, the range
    diffusion models generate in)."""
    expect(pixels in ("standardised", "signed"), "pixels", pixels, "'standardised' or 'signed'")
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
    if pixels == "standardised":
        x_tr, x_va, x_te = _standardise(x_tr, x_va, x_te, per_feature=False)
    else:
        x_tr, x_va, x_te = (a * 2.0 - 1.0 for a in (x_tr, x_va, x_te))
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


#: file suffixes read as arrays (images) rather than as rows of a table
ARRAY_SUFFIXES = (".npy", ".npz")
_LAYOUTS = ("auto", "HWC", "CHW")


def _array_files(files: Any) -> bool:
    """True when ``data.files`` names only ``.npy`` / ``.npz`` files; refuses a mix with table files."""
    if files is None:
        return False
    specs = list(files.values()) if isinstance(files, dict) else [files]
    items = [str(i) for spec in specs for i in ([spec] if isinstance(spec, (str, os.PathLike)) else spec)]
    kinds = {i.lower().endswith(ARRAY_SUFFIXES) for i in items}
    if len(kinds) > 1:
        raise KDistillError(f"data.files: got {items}, which mixes array files (.npy, .npz) with table files; "
                            "expected one kind. Fix: convert the tables to arrays or the arrays to a table column.")
    return kinds == {True}


def _load_arrays(path: Any) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` (by name) or a ``.npy`` (as ``{"": array}``), never unpickling anything."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise KDistillError(f"{path}: holds Python objects (an object array), which kdistill never unpickles; "
                                "expected numeric images and numeric or string labels. Fix: save labels as "
                                "np.array(labels, dtype=str) and images as a numeric array.") from None
        raise KDistillError(f"{path}: cannot be read as a NumPy file ({e}); expected a file written by np.save / "
                            "np.savez.") from None
    except OSError as e:
        raise KDistillError(f"{path}: cannot be read as a NumPy file ({e}); expected a file written by np.save / "
                            "np.savez.") from None


def _array_rows(files: Any, label_files: Any, image_column: str, label_column: str,
                validation_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    """``{split: rows}`` (a row is ``{image_column: image, label_column: label}``) from ``.npz`` files holding
    both arrays by name, or ``.npy`` image files paired with ``label_files``. Splits not given as files are cut
    from train by :func:`kdistill.data.files.split_rows` (seeded, as for tables)."""
    from .files import SPLITS, require_columns, resolve_files, split_rows

    by_split = files if isinstance(files, dict) else {"train": files}
    if any(k not in SPLITS for k in by_split) or "train" not in by_split:
        raise KDistillError(f"data.files: got splits {sorted(by_split)}, expected 'train' and optionally "
                            "'validation' and 'test'.")
    npy = any(str(p).lower().endswith(".npy") for spec in by_split.values()
              for p in ([spec] if isinstance(spec, (str, os.PathLike)) else spec))
    if npy and label_files is None:
        raise KDistillError("data.files: .npy files hold images only; got no data.label_files. Fix: add "
                            "label_files (the labels as .npy, in the same layout as files, e.g. {train: "
                            "y_train.npy}), or save images and labels together with np.savez(path, image=x, "
                            "label=y).")
    if not npy and label_files is not None:
        raise KDistillError("data.label_files: given with .npz files, which name their label array themselves; "
                            "expected label_files only with .npy images. Fix: remove label_files and set "
                            "data.label_column to the label array's name.")
    labels_by_split: dict[str, Any] = {}
    if npy:
        labels_by_split = label_files if isinstance(label_files, dict) else {"train": label_files}
        if sorted(labels_by_split) != sorted(by_split):
            raise KDistillError(f"data.label_files: got splits {sorted(labels_by_split)}, expected the splits of "
                                f"data.files ({sorted(by_split)}).")
    given: dict[str, list[dict[str, Any]]] = {}
    for split, spec in by_split.items():
        paths = resolve_files(spec)
        pairs: list[tuple[Any, dict[str, np.ndarray]]] = []
        if npy:
            label_paths = resolve_files(labels_by_split[split])
            if len(label_paths) != len(paths):
                raise KDistillError(f"data.label_files ({split}): got {len(label_paths)} label files for "
                                    f"{len(paths)} image files; expected one each, in the same (sorted) order.")
            for p, lp in zip(paths, label_paths):
                pairs.append((p, {image_column: _load_arrays(p)[""], label_column: _load_arrays(lp)[""]}))
        else:
            for p in paths:
                arrays = _load_arrays(p)
                if "" in arrays:  # a .npy among .npz paths (a glob)
                    raise KDistillError(f"{p}: a .npy file among .npz files; expected one kind.")
                require_columns([arrays], [image_column, label_column], where=f"{p} (arrays)")
                pairs.append((p, arrays))
        rows: list[dict[str, Any]] = []
        for p, arrays in pairs:
            x, y = arrays[image_column], arrays[label_column]
            if y.ndim != 1 or x.ndim < 1 or len(x) != len(y):
                raise KDistillError(f"{p}: images of shape {x.shape} and labels of shape {y.shape}; expected N images "
                                    "(N, ...) and N labels (N,). Fix: y.reshape(-1), or drop the extra images.")
            labels = y.tolist()
            rows += [{image_column: x[i], label_column: labels[i]} for i in range(len(y))]
        if not rows:
            raise KDistillError(f"data ({split} split): the arrays hold no images; expected at least one.")
        given[split] = rows
    fractions = {"validation": validation_fraction, "test": test_fraction}
    missing = [k for k in ("validation", "test") if k not in given and fractions[k] > 0]
    if missing:
        given = {**given, **split_rows(given["train"], validation_fraction=validation_fraction,
                                       test_fraction=test_fraction, seed=seed, need=missing)}
    return given


def _one_image(value: Any, where: str) -> np.ndarray:
    """One row's image as a numeric array of 2 or 3 dimensions, or one clear error."""
    if isinstance(value, dict) or isinstance(value, (str, bytes)):
        got = "an encoded image (a dict with bytes / path)" if isinstance(value, dict) else \
            f"a {type(value).__name__} ({str(value)[:40]!r})"
        raise KDistillError(f"{where}: got {got}, expected the image as an array of numbers (H x W, H x W x C or "
                            "C x H x W). Fix: decode the images to arrays first, e.g. np.asarray(PIL.Image.open(f)).")
    try:
        a = np.asarray(value)
    except ValueError:
        a = None
    if a is None or a.dtype == object:
        raise KDistillError(f"{where}: the nested lists have rows of different lengths or non-numbers inside; "
                            "expected a rectangular array of numbers (H x W, H x W x C or C x H x W). Fix the image.")
    if a.dtype.kind not in "biuf":
        raise KDistillError(f"{where}: got values of type {a.dtype} (e.g. {a.flat[0]!r}), expected numbers "
                            "(integers or floats). Fix: store pixel values, not texts.")
    if a.ndim not in (2, 3):
        raise KDistillError(f"{where}: got an array of shape {a.shape}, expected one image: H x W (grey), "
                            "H x W x C or C x H x W. Fix: one image per row (a batch belongs in several rows).")
    return a


def _images(rows: dict[str, list[dict[str, Any]]], column: str, *, layout: str,
            scale: float) -> dict[str, np.ndarray]:
    """``(N, C, H, W)`` float32 images per split from a column of arrays or nested lists: H x W is one grey
    channel, H x W x C and C x H x W are told apart by ``layout`` (``auto``: the axis of at most 4 is the
    channels one); every image must have the first one's shape. Values are divided by ``scale``."""
    layout = str(layout).upper() if str(layout).lower() != "auto" else "auto"
    if layout not in _LAYOUTS:
        raise KDistillError(f"data.image_layout: got {layout!r}, expected one of {', '.join(_LAYOUTS)} (channels "
                            "last, H x W x C, or first, C x H x W).")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise KDistillError(f"data.image_scale: got {scale!r}, expected a positive number that pixel values are "
                            "divided by (255 for 8-bit images, 1 for values already in [0, 1]).")
    first: tuple[tuple[int, ...], str] | None = None
    out = {}
    for split, part in rows.items():
        arrays = []
        for i, row in enumerate(part, start=1):
            where = f"data ({split} split), row {i}, column {column!r}"
            a = _one_image(row[column], where)
            if first is None:
                first = (a.shape, where)
            elif a.shape != first[0]:
                raise KDistillError(f"{where}: an image of shape {a.shape}; expected every image to have the shape "
                                    f"of the first, {first[0]} ({first[1]}). Fix: resize (or crop) the images to one "
                                    "size before distilling.")
            arrays.append(a)
        x = np.stack(arrays).astype(np.float32)
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise KDistillError(f"data ({split} split), row {int(np.argmax(bad)) + 1}, column {column!r}: the image "
                                "holds NaN or infinite values; expected finite numbers. Fix or drop the image.")
        out[split] = x / np.float32(scale)
    assert first is not None
    shape = first[0]
    if len(shape) == 2:
        return {k: v[:, None] for k, v in out.items()}
    if layout == "auto":
        if shape[2] <= 4 < shape[0]:
            layout = "HWC"
        elif shape[0] <= 4 < shape[2]:
            layout = "CHW"
        else:
            raise KDistillError(f"data.image_column {column!r}: images of shape {shape}, which could be H x W x C or "
                                "C x H x W; expected one of the two to be told. Fix: set data.image_layout: HWC "
                                "(channels last) or CHW (channels first).")
    if layout == "HWC":
        return {k: np.ascontiguousarray(v.transpose(0, 3, 1, 2)) for k, v in out.items()}
    return out


@DATASETS.register("files")
def table_files(files: Any = None, label_column: str = "label", feature_columns: list[str] | None = None,
                text_column: str | None = None, tokenizer: str | None = None, max_length: int = 128,
                format: str = "auto", hf_dataset: dict[str, Any] | None = None, validation_fraction: float = 0.1,
                test_fraction: float = 0.1, data_seed: int = 0, standardise: bool = True,
                image_column: str | None = None, label_files: Any = None, image_layout: str = "auto",
                image_scale: float = 1.0, domain_column: str | None = None) -> ClassificationData:
    """Your own table (``data.files``: CSV, TSV, JSON lines, JSON, Parquet; or ``data.hf_dataset``) with a
    ``label_column`` of class names or ids, and either numeric ``feature_columns`` (default: every column but
    the label; standardised with the training split's statistics) or a ``text_column`` tokenized by
    ``tokenizer`` (a Hugging Face folder or hub id; by default the recipe's ``hf`` model's) to ``max_length``
    tokens, giving ``(2, max_length)`` inputs (ids, attention mask) for ``hf`` models, or images.

    Images: an ``image_column`` of arrays (nested lists in JSON lines / Parquet), or ``.npz`` files holding the
    ``image_column`` (default ``image``) and ``label_column`` arrays (``N x ...`` and ``N``), or ``.npy`` image
    files with ``label_files`` (``.npy`` labels, the same layout as ``files``). An image is H x W (grey),
    H x W x C or C x H x W (``image_layout``: ``auto``, ``HWC``, ``CHW``); every model gets ``(C, H, W)`` float32
    values divided by ``image_scale`` (255 turns 8-bit pixels into [0, 1], which ``hf`` image models expect), not
    standardised. Held-out splits not given as files are cut from the training rows (seeded); class names are
    kept (``kdistill eval`` uses them).

    ``domain_column``: a column naming each row's domain (a source, a site, a language), never a feature; the
    training rows' domains are kept in ``train_domains`` for domain-aware selection (DDK, ``data.selection``). The
    held-out splits need not have it."""
    from .files import load_rows, require_columns

    arrays = _array_files(files)
    images = image_column is not None or arrays or label_files is not None
    if text_column is not None and (feature_columns or tokenizer is None or images):
        raise KDistillError("data.text_column: got " + ("feature_columns too" if feature_columns else "images too"
                                                        if images else "no tokenizer")
                            + "; expected a text column alone, with a tokenizer (data.tokenizer, or an hf teacher or "
                            "student whose folder carries one).")
    if images and feature_columns:
        raise KDistillError(f"data.feature_columns: got {feature_columns} with images (data.image_column or "
                            ".npy / .npz files); expected one kind of input. Fix: remove feature_columns.")
    if label_files is not None and not arrays:
        raise KDistillError("data.label_files: labels as .npy files go with .npy image files in data.files; got "
                            "other files. Fix: remove label_files (a table names its label_column).")
    if domain_column is not None and (arrays or label_files is not None):
        raise KDistillError(f"data.domain_column {domain_column!r}: domains are read from a table column; .npy / "
                            ".npz array files have no columns. Fix: give a table (CSV, JSON lines, Parquet) with an "
                            "image_column and the domain column, or remove domain_column.")
    if domain_column is not None and domain_column in (feature_columns or []):
        raise KDistillError(f"data.domain_column {domain_column!r} is also in data.feature_columns; expected the "
                            "domain to be a label of the row, not a feature. Fix: remove it from feature_columns.")
    if arrays:
        image_column = image_column or "image"
        rows = _array_rows(files, label_files, image_column, label_column, validation_fraction, test_fraction,
                           data_seed)
    else:
        rows = load_rows(files=files, format=format, hf_dataset=hf_dataset, validation_fraction=validation_fraction,
                         test_fraction=test_fraction, seed=data_seed,
                         columns=[label_column, text_column, image_column, *(feature_columns or [])])
    domains = None
    if domain_column is not None:
        require_columns(rows["train"], [domain_column], where="data (train split)")
        domains = [str(r[domain_column]) for r in rows["train"]]
    ids, names = _label_ids({s: [r[label_column] for r in part] for s, part in rows.items()}, label_column)
    if image_column is not None:
        x = _images(rows, image_column, layout=image_layout, scale=image_scale)
        return replace(_pack("files", x["train"], ids["train"], x["validation"], ids["validation"], x["test"],
                             ids["test"], len(names), names), train_domains=domains)
    if text_column is not None:
        x = _tokenized(tokenizer, rows, text_column, max_length)
        return replace(_pack("files", x["train"], ids["train"], x["validation"], ids["validation"], x["test"],
                             ids["test"], len(names), names), train_domains=domains)
    features = (list(feature_columns) if feature_columns
                else [c for c in rows["train"][0] if c not in (label_column, domain_column)])
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
                        "Fix: name only numeric columns in data.feature_columns (text needs a text model, images "
                        "data.image_column).") from None
        xs[split] = x
    x_tr, x_va, x_te = xs["train"], xs["validation"], xs["test"]
    if standardise:
        x_tr, x_va, x_te = _standardise(x_tr, x_va, x_te)
    return replace(_pack("files", x_tr, ids["train"], x_va, ids["validation"], x_te, ids["test"], len(names), names),
                   train_domains=domains)


def load_dataset(name: str, **kwargs: Any) -> ClassificationData:
    return DATASETS.get(name)(**kwargs)
