"""Atomic, pickle-free checkpoints.

Tensors go to safetensors, everything else (optimizer hyper-parameters, scheduler counters, RNG states
of Python and NumPy, loop position, history) to JSON. A checkpoint directory is written under a temporary
name, flushed, then renamed; ``latest.json`` (replaced atomically) points to the newest complete one, so a
``kill -9`` at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import KDistillError
from ..io import _fsync_dir, load_state_dict, save_state_dict_atomic, write_json_atomic

FORMAT_VERSION = 1


# -------------------------------------------------------------- nested state <-> (tensors, JSON skeleton)


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested structure by ``{"__tensor__": key}`` and collect them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, key: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[key] = o
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(o.items())]}
        if isinstance(o, (list, tuple)):
            return {"__list__" if isinstance(o, list) else "__tuple__":
                    [walk(v, f"{key}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, np.ndarray):
            tensors[key] = torch.from_numpy(o.astype(np.int64) if o.dtype.kind in "ui" else o.astype(np.float64))
            return {"__ndarray__": key, "dtype": o.dtype.str}
        if isinstance(o, (np.integer, np.floating)):
            return o.item()
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise KDistillError(f"checkpoint: cannot store a value of type {type(o).__name__} at {key!r}")

    return walk(obj, prefix or "s"), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__ndarray__" in o:
                return tensors[o["__ndarray__"]].numpy().astype(np.dtype(o["dtype"]))
            if "__dict__" in o:
                return {walk(k): walk(v) for k, v in o["__dict__"]}
            if "__list__" in o:
                return [walk(v) for v in o["__list__"]]
            if "__tuple__" in o:
                return tuple(walk(v) for v in o["__tuple__"])
        return o

    return walk(skeleton)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(legacy=False),
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---------------------------------------------------------------------------------- FSDP2 (sharded) state


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) holds some of ``module``'s parameters as DTensor shards: its state is then
    saved and loaded shard by shard by all ranks together (:func:`sharded_state`)."""
    if "torch.distributed.tensor" not in sys.modules:  # nothing can be sharded before DTensor is loaded
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def sharded_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` state dicts of a sharded model and its optimizer as DTensor shards (each
    rank's own part; the optimizer keyed by parameter name), for :meth:`CheckpointManager.save` ``shards=`` and
    :meth:`CheckpointManager.load_shards`. Every rank must call it. An optimizer that has not stepped yet gets its
    state initialised first, so a resumed run has every tensor to load into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer))}


def load_sharded_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Put :func:`sharded_state`-shaped ``state`` (as filled by :meth:`CheckpointManager.load_shards`) back into the
    sharded model and its optimizer. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"])


# -------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """``<root>/step-<n>/{state.safetensors, state.json}`` + ``<root>/latest.json``; keeps ``keep`` newest.

    Under FSDP2 a checkpoint also holds ``shards/``: every rank's own shards of the model and optimizer state,
    written by ``torch.distributed.checkpoint`` (one ``__<rank>_0.distcp`` file per rank and a ``.metadata`` index),
    so no rank ever holds the whole state; the directory is still renamed into place only once complete."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, state: dict[str, Any], *, shards: dict[str, Any] | None = None, main: bool = True,
             barrier: Any = None) -> Path:
        """Write ``state`` (tensors and JSON-able values) as checkpoint ``step``. With ``shards`` (a state dict of
        DTensor shards, :func:`sharded_state`) every rank calls this with its own shards and the same ``barrier``;
        ``main`` marks the one rank that writes ``state`` and publishes the checkpoint."""
        final = self.root / f"step-{step:09d}"
        if shards is not None:
            return self._save_sharded(step, state, shards, final, main=main, barrier=barrier)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".step-{step:09d}.", suffix=".tmp"))
        return self._publish(step, state, tmp, final)

    def _publish(self, step: int, state: dict[str, Any], tmp: Path, final: Path) -> Path:
        """Write ``state`` into the temporary folder ``tmp`` and rename it to ``final``; point latest.json at it."""
        skeleton, tensors = flatten_state(state)
        try:
            save_state_dict_atomic(tmp / "state.safetensors", tensors)
            write_json_atomic(tmp / "state.json", {"format_version": FORMAT_VERSION, "step": step, "state": skeleton})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json_atomic(self.root / "latest.json", {"step": step, "dir": final.name})
        self._prune(final.name)
        return final

    def _save_sharded(self, step: int, state: dict[str, Any], shards: dict[str, Any], final: Path, *, main: bool,
                      barrier: Any) -> Path:
        import torch.distributed.checkpoint as dcp

        if barrier is None:
            raise KDistillError("CheckpointManager.save(shards=...): expected a barrier (every rank writes its shards "
                                "into one folder, which the main rank then publishes).")
        tmp = self.root / f".step-{step:09d}.sharded.tmp"  # the same name on every rank
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        dcp.save(shards, checkpoint_id=str(tmp / "shards"))  # collective: returns once the index is written
        if main:
            self._publish(step, {**state, "sharded": True}, tmp, final)
        barrier()  # nobody goes on (or exits) before the checkpoint is in place
        return final

    @staticmethod
    def load_shards(path: Path, target: dict[str, Any]) -> None:
        """Fill ``target`` (:func:`sharded_state` of the model and optimizer being resumed) in place from checkpoint
        ``path``'s shards; every rank reads its own part. Every rank must call it."""
        import torch.distributed.checkpoint as dcp

        if not (path / "shards" / ".metadata").is_file():
            raise KDistillError(f"checkpoint {str(path)!r} has no complete shards/ folder (no shards/.metadata); "
                                "expected the sharded state an FSDP run writes. Fix: point latest.json at an earlier "
                                "step-* folder, or start over without --resume.")
        dcp.load(target, checkpoint_id=str(path / "shards"))

    def _prune(self, current: str) -> None:
        dirs = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for p in dirs[: max(0, len(dirs) - self.keep)]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step-*.tmp"):  # leftovers of a crash mid-save
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest.json"
        if not pointer.is_file():
            return None
        try:
            d = self.root / json.loads(pointer.read_text())["dir"]
        except (ValueError, KeyError, TypeError) as e:
            raise KDistillError(
                f"checkpoint pointer {str(pointer)!r} is unreadable ({type(e).__name__}: {e}); "
                f"expected the JSON kdistill writes ({{\"step\": N, \"dir\": \"step-...\"}}). "
                f"Fix: delete it and write {{\"step\": N, \"dir\": \"step-...\"}} naming one of the step-* folders "
                f"in {str(self.root)!r}, or run without --resume to start over.") from None
        return d if d.is_dir() else None

    def load(self, path: Path | None = None) -> dict[str, Any] | None:
        path = path or self.latest()
        if path is None:
            return None
        try:
            meta = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise KDistillError(
                f"checkpoint {str(path / 'state.json')!r} is unreadable or truncated ({type(e).__name__}: {e}). Fix: "
                f"delete the folder {str(path)!r} and point latest.json at an earlier step-* folder to resume from "
                "there, or run without --resume to start over.") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise KDistillError(f"checkpoint {str(path)!r} has format {meta.get('format_version')}, expected "
                                f"{FORMAT_VERSION}; it was written by another kdistill version. Start a fresh run.")
        tensors = load_state_dict(path / "state.safetensors")
        return unflatten_state(meta["state"], tensors)
