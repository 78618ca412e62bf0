"""Student-only artefacts for classifier models: ``model.safetensors`` + ``model.json``.

``model.json`` names the registered model family and its keyword arguments, so a student can be rebuilt
without kdistill's run config and without unpickling anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KDistillError
from ..io import load_state_dict, save_state_dict_atomic, write_json_atomic
from ..models.classifiers import count_params
from ..registry import MODELS

FORMAT = "kdistill-classifier/1"


def save_classifier(directory: str | Path, model: nn.Module, *, model_name: str, model_kwargs: dict[str, Any],
                    input_shape: tuple[int, ...], num_classes: int, extra: dict[str, Any] | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_state_dict_atomic(d / "model.safetensors", model.state_dict(), metadata={"format": FORMAT})
    if hasattr(model, "save_hf"):  # a Hugging Face classifier: also a plain folder that transformers loads
        model.save_hf(d / "hf", class_names=(extra or {}).get("class_names"))
    write_json_atomic(d / "model.json", {
        "format": FORMAT, "model": model_name, "kwargs": model_kwargs, "input_shape": list(input_shape),
        "num_classes": int(num_classes), "params": count_params(model), **(extra or {}),
    })
    return d


def read_meta(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    meta_path = d / "model.json"
    if not meta_path.is_file():
        raise KDistillError(f"{str(d)!r} has no model.json; expected a model folder written by kdistill "
                            "(e.g. <run>/student or the output of `kdistill export`).")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise KDistillError(f"{str(meta_path)!r}: format {meta.get('format')!r}, expected {FORMAT!r}.")
    return meta


def load_classifier(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    meta = read_meta(directory)
    model = MODELS.get(meta["model"])(tuple(meta["input_shape"]), meta["num_classes"], **meta["kwargs"])
    model.load_state_dict(load_state_dict(Path(directory) / "model.safetensors"))
    return model.eval(), meta


def export_classifier(source: str | Path, out: str | Path, example: torch.Tensor | None = None) -> dict[str, Any]:
    """Copy the student (weights + config only, no method parameters) to ``out``, reload it and compare
    outputs with the source on ``example`` inputs (random ones if none). Returns the check's figures."""
    model, meta = load_classifier(source)
    extra = {k: v for k, v in meta.items()
             if k not in ("format", "model", "kwargs", "input_shape", "num_classes", "params")}
    save_classifier(out, model, model_name=meta["model"], model_kwargs=meta["kwargs"],
                    input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"], extra=extra)
    reloaded, _ = load_classifier(out)
    if example is None and hasattr(model, "example_inputs"):  # token ids, (z, t, y) of a denoiser: not one Gaussian
        example = model.example_inputs(16, int(meta["input_shape"][-1]))
    if example is None:
        example = torch.randn(16, *meta["input_shape"], generator=torch.Generator().manual_seed(0))
    call = (lambda m: m(*example)) if isinstance(example, tuple) else (lambda m: m(example))  # noqa: E731
    with torch.no_grad():
        diff = float((call(model) - call(reloaded)).abs().max())
    if diff > 1e-6:
        raise KDistillError(f"export check failed: reloaded model differs from the source by {diff:.3g} (expected 0).")
    return {"out": str(out), "max_abs_diff": diff, "params": meta["params"],
            "files": sorted(p.name for p in Path(out).iterdir())}
