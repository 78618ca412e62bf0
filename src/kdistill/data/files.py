"""Your own data: rows read from files (CSV, TSV, JSON lines, JSON, Parquet, plain text) or a Hugging Face
dataset, checked once, split once.

Every task reads its user data through :func:`load_rows`, which returns ``{"train": rows, "validation": rows,
"test": rows}`` (a row is a ``dict`` of column -> value) and refuses, with the file, the row or the column and
the fix, what would otherwise fail later: a missing or misspelt column (with close matches and the columns
found), an empty file, rows with different columns, an unreadable or unsupported file, a hub id while offline.
Splits that are not given as files are cut from the training rows by a seeded shuffle
(``validation_fraction``, ``test_fraction``), so a run and its ``kdistill eval`` see the same rows.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import KDistillError, close_matches

Row = dict[str, Any]
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "txt")
_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".parquet": "parquet", ".txt": "txt"}
SPLITS = ("train", "validation", "test")


def resolve_files(spec: str | Sequence[str], *, base: Path | None = None) -> list[Path]:
    """Paths for a path, a glob or a list of them (relative paths against ``base`` or the working folder)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[Path] = []
    for item in items:
        pattern = str(item) if base is None or Path(item).is_absolute() else str(base / item)
        hits = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else ([pattern] if Path(pattern).exists() else [])
        if not hits:
            raise KDistillError(f"data.files: {str(item)!r} matches no file (looked in {os.getcwd()!r}); expected "
                                "a path, a glob such as data/*.jsonl, or a list of them. Fix the path.")
        out += [Path(h) for h in hits]
    return out


def file_format(path: Path, format: str = "auto") -> str:
    if format != "auto":
        if format not in FORMATS:
            raise KDistillError(f"data.format: got {format!r}, expected one of auto, {', '.join(FORMATS)}.")
        return format
    fmt = _BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise KDistillError(f"data.files: cannot tell the format of {str(path)!r} from its extension; expected one of "
                            f"{', '.join(sorted(_BY_SUFFIX))}. Fix: rename it or set data.format "
                            f"({', '.join(FORMATS)}).")
    return fmt


def _read_one(path: Path, fmt: str) -> list[Row]:
    try:
        if fmt in ("csv", "tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
                rows = []
                for i, r in enumerate(reader, start=2):
                    if None in r or any(v is None for v in r.values()):
                        raise KDistillError(f"{path}: line {i} has another number of fields than the header "
                                            f"({len(reader.fieldnames or [])}); expected the same number on every "
                                            "line. Fix the line (quote fields that contain the delimiter).")
                    rows.append(dict(r))
                return rows
        if fmt == "jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise KDistillError(f"{path}: line {i} is not valid JSON ({e.msg}); expected one JSON object "
                                            "a line. Fix or remove the line.") from None
            return rows
        if fmt == "json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, Mapping) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise KDistillError(f"{path}: got a JSON {type(data).__name__}, expected a list of objects (or "
                                    '{"data": [...]}). For one object a line, name the file .jsonl.')
            return data
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise KDistillError("data.files: reading Parquet needs pyarrow; `pip install 'kdistill[data]'`.") \
                    from None
            return pq.read_table(path).to_pylist()
        with open(path, encoding="utf-8") as f:  # txt: one text a line
            return [{"text": line.rstrip("\n")} for line in f if line.strip()]
    except KDistillError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KDistillError(f"{path}: cannot be read as {fmt} ({type(e).__name__}: {e}); expected a UTF-8 {fmt} "
                            "file. Fix: check the file, or set data.format.") from None


def read_rows(paths: Iterable[Path], *, format: str = "auto") -> list[Row]:
    """All rows of ``paths`` in order, each a dict; every row must be an object with the columns of the first."""
    rows: list[Row] = []
    first: tuple[Path, frozenset[str]] | None = None
    for path in paths:
        got = _read_one(path, file_format(path, format))
        if not got:
            raise KDistillError(f"{path}: the file holds no rows; expected at least one. Fix: remove it from "
                                "data.files or fill it.")
        for i, row in enumerate(got, start=1):
            first = _check_row(path, i, row, first)
        rows += [dict(r) for r in got]
    return rows


def _check_row(path: Path, i: int, row: Any, first: tuple[Path, frozenset[str]] | None
               ) -> tuple[Path, frozenset[str]]:
    """Row ``i`` of ``path`` is an object with the columns of the first row read (``first``: its file and columns,
    None for the first row); returns ``first``."""
    if not isinstance(row, Mapping):
        raise KDistillError(f"{path}: row {i} is a {type(row).__name__}, expected an object of column: value.")
    keys = frozenset(row)
    if first is None:
        return path, keys
    if keys != first[1]:
        missing, extra = sorted(first[1] - keys), sorted(keys - first[1])
        raise KDistillError(f"{path}: row {i} has other columns than row 1 of {first[0]} (missing "
                            f"{missing or 'none'}, extra {extra or 'none'}); expected every row to have the "
                            "same columns. Fix the rows, or split the files by schema.")
    return first


def require_columns(rows: Sequence[Row], columns: Iterable[str | None], *, where: str) -> None:
    """Every named column exists in the rows (checked on the first row: all rows share its columns)."""
    have = sorted(rows[0]) if rows else []
    for col in columns:
        if col is None or col in have:
            continue
        m = close_matches(col, have)
        hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
        raise KDistillError(f"{where}: column {col!r} is not in the data.{hint} Columns found: {', '.join(have)}. "
                            "Fix the column name in the recipe.")


def _hf_rows(path: str, name: str | None, split: str | None) -> dict[str, list[Row]]:
    try:
        import datasets
    except ImportError:
        raise KDistillError("data.hf_dataset needs the `datasets` library; `pip install 'kdistill[data]'`.") from None
    if Path(path).exists():
        ds = datasets.load_from_disk(path)
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise KDistillError(f"data.hf_dataset.path: {path!r} is no folder here, and hub ids need the network "
                                "(HF_HUB_OFFLINE is set). Fix: give a folder written by Dataset.save_to_disk, or run "
                                "online.")
        try:
            ds = datasets.load_dataset(path, name, split=split)
        except Exception as e:  # the hub's many error types: one line
            raise KDistillError(f"data.hf_dataset: loading {path!r} failed ({type(e).__name__}: {e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        names = {"validation": ("validation", "valid", "dev"), "test": ("test",), "train": ("train",)}
        out = {}
        for key, aliases in names.items():
            hit = next((a for a in aliases if a in ds), None)
            if hit is not None and (split is None or key == "train" or split == hit):
                out[key] = ds[hit].to_list()
        if split is not None and split in ds and "train" not in out:
            out["train"] = ds[split].to_list()
        if "train" not in out:
            raise KDistillError(f"data.hf_dataset: {path!r} has splits {sorted(ds)}; expected a 'train' split (or "
                                "name the one to train on with split:).")
        return out
    return {"train": ds.to_list()}


def split_rows(rows: list[Row], *, validation_fraction: float, test_fraction: float, seed: int,
               need: Sequence[str] = ("validation", "test")) -> dict[str, list[Row]]:
    """A seeded shuffle of ``rows`` cut into train and the ``need`` ed held-out splits."""
    for name, frac in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 0.5:
            raise KDistillError(f"data.{name}: got {frac!r}, expected a number in [0, 0.5).")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    sizes = {"test": round(len(rows) * test_fraction) if "test" in need else 0,
             "validation": round(len(rows) * validation_fraction) if "validation" in need else 0}
    for k in need:
        sizes[k] = max(1, sizes[k])
    if sum(sizes.values()) >= len(rows):
        raise KDistillError(f"data: {len(rows)} rows leave nothing to train on after the held-out splits "
                            f"({sizes}); expected more rows or smaller validation_fraction / test_fraction.")
    out, start = {}, 0
    for k in ("test", "validation"):
        out[k] = [rows[i] for i in order[start:start + sizes[k]]]
        start += sizes[k]
    out["train"] = [rows[i] for i in order[start:]]
    return {k: v for k, v in out.items() if v or k == "train"}


def load_rows(*, files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None, format: str = "auto",
              hf_dataset: Mapping[str, Any] | None = None, validation_fraction: float = 0.1,
              test_fraction: float = 0.1, seed: int = 0, columns: Iterable[str | None] = (),
              base: Path | None = None) -> dict[str, list[Row]]:
    """``{"train", "validation", "test"}`` rows from ``files`` (one source, or ``{split: source}``) or a Hugging
    Face dataset (``{"path", "name", "split"}``). Splits not given are cut from train (seeded); a fraction of 0
    leaves that split out. ``columns`` must exist in every split."""
    if (files is None) == (hf_dataset is None):
        raise KDistillError("data: expected exactly one of data.files and data.hf_dataset.")
    if hf_dataset is not None:
        given = _hf_rows(str(hf_dataset["path"]), hf_dataset.get("name"), hf_dataset.get("split"))
    elif isinstance(files, Mapping):
        unknown = [k for k in files if k not in SPLITS]
        if unknown or "train" not in files:
            raise KDistillError(f"data.files: got splits {sorted(files)}, expected 'train' and optionally "
                                "'validation' and 'test'.")
        given = {k: read_rows(resolve_files(v, base=base), format=format) for k, v in files.items()}
    else:
        given = {"train": read_rows(resolve_files(files, base=base), format=format)}
    fractions = {"validation": validation_fraction, "test": test_fraction}
    missing = [k for k in ("validation", "test") if k not in given and fractions[k] > 0]  # 0: no such split
    if missing:
        cut = split_rows(given["train"], validation_fraction=validation_fraction, test_fraction=test_fraction,
                         seed=seed, need=missing)
        given = {**given, **cut}
    for split, rows in given.items():
        if not rows:
            raise KDistillError(f"data: the {split} split is empty; expected rows in every split.")
        require_columns(rows, columns, where=f"data ({split} split)")
    return given


# ------------------------------------------------------------------------------------------ streaming

def _stream_one(path: Path, fmt: str) -> Iterator[Row]:
    """Rows of one file, read as a stream: line by line (csv, tsv, jsonl, txt) or by Parquet record batches."""
    if fmt == "json":
        raise KDistillError(f"{path}: a JSON array is read whole, so it cannot be streamed (data.stream: true); "
                            "expected one JSON object a line. Fix: convert it to JSON lines (.jsonl), or remove "
                            "data.stream.")
    if fmt in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            for i, r in enumerate(reader, start=2):
                if None in r or any(v is None for v in r.values()):
                    raise KDistillError(f"{path}: line {i} has another number of fields than the header "
                                        f"({len(reader.fieldnames or [])}); expected the same number on every "
                                        "line. Fix the line (quote fields that contain the delimiter).")
                yield dict(r)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise KDistillError(f"{path}: line {i} is not valid JSON ({e.msg}); expected one JSON object "
                                        "a line. Fix or remove the line.") from None
    elif fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise KDistillError("data.files: reading Parquet needs pyarrow; `pip install 'kdistill[data]'`.") \
                from None
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:  # txt: one text a line
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield {"text": line.rstrip("\n")}


def iter_rows(paths: Iterable[Path], *, format: str = "auto") -> Iterator[Row]:
    """The rows of ``paths`` in order, like :func:`read_rows` but lazily: a file is read only as far as the
    caller iterates, and no more than one Parquet record batch is held at a time. JSON arrays are refused (they
    are read whole); every row must be an object with the columns of the first row."""
    first: tuple[Path, frozenset[str]] | None = None
    for path in paths:
        fmt = file_format(path, format)
        count = 0
        try:
            for count, row in enumerate(_stream_one(path, fmt), start=1):
                first = _check_row(path, count, row, first)
                yield dict(row)
        except KDistillError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise KDistillError(f"{path}: cannot be read as {fmt} ({type(e).__name__}: {e}); expected a UTF-8 {fmt} "
                                "file. Fix: check the file, or set data.format.") from None
        if count == 0:
            raise KDistillError(f"{path}: the file holds no rows; expected at least one. Fix: remove it from "
                                "data.files or fill it.")


def held_out_row(index: int, *, fraction: float, seed: int = 0) -> bool:
    """Whether row ``index`` of a stream is held out: a hash of ``(seed, index)`` read as a number in [0, 1) is
    below ``fraction``. Deterministic, needs no row count, and each row's fate is independent of the others."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction
