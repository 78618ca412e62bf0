"""What a run folder holds, and when a run may use it.

``kdistill run`` writes ``<output>/config.json`` (the validated config) before anything trains. On the next run
into the same folder:

* ``--resume`` with the same config continues; with a different one it is refused, naming the keys that differ
  (old and new value), because continuing would label one config's weights with another's name;
* ``--resume`` with nothing to resume says so and starts fresh;
* without ``--resume`` the folder is emptied first (its earlier run would otherwise leave a stale teacher or
  student beside the new one), but only if it holds a kdistill run; a folder of other files is refused.

Fields that do not change the result (``name``, ``description``) are left out of the comparison.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import KDistillError
from .io import write_json_atomic

CONFIG_FILE = "config.json"
#: files and folders a kdistill run writes at the top of its output folder (any one marks a run folder)
RUN_MARKERS = ("config.json", "report.json", "work", "student", "teacher", "baseline")
_NOT_RESULT = ("name", "description")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["train.lr: 0.003 -> 0.1", ...]`` for every dotted key whose value differs (result fields only)."""
    a = {k: v for k, v in _flatten(old).items() if k.split(".")[0] not in _NOT_RESULT}
    b = {k: v for k, v in _flatten(new).items() if k.split(".")[0] not in _NOT_RESULT}

    def show(v: Any) -> str:
        s = json.dumps(v, default=str)
        return s if len(s) <= 60 else s[:57] + "..."

    missing = object()
    return [f"{k}: {show(a.get(k)) if k in a else '(absent)'} -> {show(b.get(k)) if k in b else '(absent)'}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_run_folder(output: str | Path, config: dict[str, Any], *, resume: bool,
                       normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> str:
    """Check ``output`` against ``config`` (a JSON-able dump of the validated config), clear it for a fresh run,
    record the config, and return what happened: ``"fresh"``, ``"resumed"``, ``"replaced"`` or
    ``"nothing to resume"``. Raises :class:`KDistillError` when the folder cannot be used.

    ``normalize`` re-validates the recorded config with today's schema before the comparison, so a run started
    before a field was added resumes when the new field holds its default (an old config it cannot validate is
    compared as recorded)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise KDistillError(f"output {str(out)!r} is a file; expected a folder for the run. "
                            "Fix: choose another --output.")
    present = out.is_dir() and any(out.iterdir())
    is_run = present and any((out / m).exists() for m in RUN_MARKERS)
    if present and not is_run:
        raise KDistillError(f"output folder {str(out)!r} is not empty and holds no kdistill run; expected a new or "
                            "empty folder, or one written by kdistill. Fix: choose another --output.")
    old = _read_config(out / CONFIG_FILE) if is_run else None
    status = "fresh"
    if resume:
        if not is_run:
            status = "nothing to resume"
        elif old is None:
            raise KDistillError(f"--resume: {str(out / CONFIG_FILE)!r} is missing or unreadable, so the run in "
                                f"{str(out)!r} cannot be checked against this config. Fix: run without --resume to "
                                "start over in this folder, or choose another --output.")
        else:
            if normalize is not None:
                try:
                    old = normalize(old)
                except Exception:  # noqa: BLE001 -- a field since removed or renamed: compare as recorded
                    pass
            diff = config_differences(old, config)
            if diff:
                raise KDistillError(
                    f"--resume: the run in {str(out)!r} was started with another config; continuing would label its "
                    f"results with this one. Differences: {'; '.join(diff[:12])}"
                    + (f" (+{len(diff) - 12} more)" if len(diff) > 12 else "")
                    + ". Fix: resume with the same recipe and overrides, drop --resume to start over in this folder, "
                    "or choose another --output.")
            return "resumed"
    elif is_run:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        status = "replaced"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CONFIG_FILE, config)
    return status
