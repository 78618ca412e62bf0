"""Plumbing shared by every part of kdistill, one copy each: atomic file writes (a crash leaves the old file
or the new one, never a torn one), safetensors IO, the cache folder and seeding."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from .errors import KDistillError


def cache_root() -> Path:
    """Where teachers, teacher targets and token vectors are cached: ``$KDISTILL_CACHE`` or
    ``~/.cache/kdistill``."""
    return Path(os.environ.get("KDISTILL_CACHE", Path.home() / ".cache" / "kdistill"))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(src: str | Path, dst: str | Path) -> None:
    """Copy the finished folder ``src`` to ``dst`` (e.g. a trained teacher into the cache) so that ``dst`` is never
    seen half-written: copy into a temporary sibling, remove an older ``dst``, rename."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_state_dict_atomic(path: str | Path, tensors: dict[str, torch.Tensor],
                           metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written atomically (serialised in memory, then :func:`write_bytes_atomic`)."""
    clean = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}  # shared storage is cloned
    write_bytes_atomic(path, save(clean, metadata=metadata))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise KDistillError(f"weights file {str(path)!r} does not exist; "
                            "expected a .safetensors file written by kdistill.")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on truncation
        raise KDistillError(f"weights file {str(path)!r} is unreadable or truncated ({e}). "
                            "Delete it and re-run, or resume from an earlier checkpoint.") from None
