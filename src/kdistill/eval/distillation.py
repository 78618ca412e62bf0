"""Scoring a distilled data set: train a fresh student on it and measure it on held-out data, and the markdown
table of the ``dataset_distillation`` report (distilled set vs a random real subset of the same size vs the full
data, for every budget and student architecture)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..io import seed_everything
from ..methods.base import Method
from ..models.classifiers import count_params, predict_logits
from ..train.classifier import train_classifier
from .metrics import classification_metrics


def train_on_set(build: Callable[[], nn.Module], method: Method, inputs: Tensor, labels: Tensor, *,
                 x_test: Tensor, y_test: Tensor, accelerator: Any, seed: int, batch_size: int,
                 soft_labels: Tensor | None = None, per_example: dict[str, Tensor] | None = None,
                 **fit_kwargs: Any) -> dict[str, Any]:
    """A student from ``build()`` (seeded, so every set trains the same initial weights) trained by
    :func:`~kdistill.train.classifier.train_classifier` with ``method`` on ``(inputs, labels)`` (plus the set's
    soft labels and per-example tensors), then scored on ``(x_test, y_test)``. Returns ``{"model", "params",
    "metrics", "train_seconds", "steps"}``."""
    seed_everything(seed)
    model = build()
    res = train_classifier(model, method, inputs, labels, accelerator=accelerator, batch_size=batch_size, seed=seed,
                           target_probs=soft_labels, batch_extra=per_example, **fit_kwargs)
    metrics = classification_metrics(predict_logits(res.student, x_test), y_test)
    return {"model": res.student, "params": count_params(res.student), "metrics": metrics,
            "train_seconds": res.seconds, "steps": res.steps}


def _pct(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def distillation_report_md(report: dict[str, Any]) -> str:
    """The report's grid: test accuracy (%) of every student architecture trained on the distilled set, on a random
    real subset of the same size and on the full training data, per budget; then the sets' sizes and times."""
    rows = report.get("results", [])
    full = report.get("full_data", {})
    lines = ["## Distilled set vs random real subset vs full data (test accuracy, %)", "",
             f"method `{report['method']}`; distilled on `{report.get('distill_model', {}).get('name', '?')}`; "
             f"every student trained with the same settings on each set.", "",
             "| examples per class | student | distilled | random real | full data | distilled - random |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        d, rnd = r["distilled"]["accuracy"], (r.get("random") or {}).get("accuracy")
        f = (full.get(r["student"]) or {}).get("metrics", {}).get("accuracy")
        gap = f"{100 * (d - rnd):+.1f}" if rnd is not None else ""
        lines.append(f"| {r['per_class']} | {r['student']} | {_pct(d)} | {_pct(rnd)} | {_pct(f)} | {gap} |")
    lines += ["", "| examples per class | training examples | stored vectors | soft labels | distillation seconds "
              "| file |", "|---:|---:|---:|---|---:|---|"]
    for k, d in sorted(report.get("distillation", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} | {d['examples']} | {d['stored_vectors']} | {'yes' if d['soft_labels'] else 'no'} | "
                     f"{d['seconds']:.1f} | `{d['file']}` |")
    return "\n".join(lines)
