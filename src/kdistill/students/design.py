"""Student design before distillation (``kdistill design``): the pieces the task's design runner wires together.

* the search space -> candidates (:func:`candidates`), the budget (:func:`parse_budget`, :func:`over_budget`);
* AutoDistil-lite -- Xu et al., "AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large
  Language Models" (2022): AutoDistil trains one weight-sharing super-network and reads candidates' quality off it;
  here candidates are ranked without training (DisWOT, :mod:`kdistill.eval.diswot`), the top few are distilled
  briefly with the recipe's method, and the trade-off between their accuracy and the latency measured on this
  machine is the Pareto front (:func:`pareto_front`, :func:`plot_pareto`);
* how well a ranking predicts the accuracy after distillation (:func:`rank_correlations`, Spearman);
* the capacity gap -- Zhang et al., "Towards the Law of Capacity Gap in Distilling Language Models" (2023): across
  student sizes, what distillation adds over the same student trained alone, where that gain peaks, and how the
  peak compares with the law's rule of thumb (the optimal teacher is about 2.5 times the student)
  (:func:`capacity_gap_summary`, :func:`plot_capacity_gap`).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import KDistillError, close_matches
from ..eval.retrieval import spearman
from ..io import write_bytes_atomic

#: what ``--budget`` limits: a candidate's parameter count, and its latency per batch measured here (ms)
BUDGET_KEYS = ("params", "latency_ms")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}
_BUDGET_HELP = ("expected params=N (at most N parameters; 50000, 50k and 1.5M are accepted), latency_ms=X (at most X "
                "milliseconds per batch, measured on this machine), or both separated by a comma. Fix: e.g. --budget "
                "params=50k or --budget latency_ms=0.5 or --budget params=50k,latency_ms=0.5")


def parse_budget(text: str | None) -> dict[str, float]:
    """``"params=50k,latency_ms=0.5"`` -> ``{"params": 50000.0, "latency_ms": 0.5}``; ``None`` -> ``{}`` (no limit).
    A malformed string raises one ``KDistillError`` that names what was received and how to write it."""
    if text is None:
        return {}
    out: dict[str, float] = {}
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise KDistillError(f"--budget: got {text!r}, {_BUDGET_HELP}")
    for part in parts:
        key, sep, raw = (s.strip() for s in part.partition("="))
        if not sep or not key or not raw:
            raise KDistillError(f"--budget: got {text!r} (the part {part!r} is not KEY=VALUE), {_BUDGET_HELP}")
        if key not in BUDGET_KEYS:
            near = close_matches(key, BUDGET_KEYS)
            hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise KDistillError(f"--budget: got {text!r}, whose key {key!r} is not a budget.{hint} {_BUDGET_HELP}")
        if key in out:
            raise KDistillError(f"--budget: got {text!r}, which sets {key!r} twice, {_BUDGET_HELP}")
        scale = _SUFFIX.get(raw[-1].lower(), 1.0) if key == "params" else 1.0
        try:
            value = float(raw[:-1] if scale != 1.0 else raw) * scale
        except ValueError:
            value = float("nan")
        if not (value > 0 and math.isfinite(value)):
            raise KDistillError(f"--budget: got {text!r}, whose {key} value {raw!r} is not a positive number, "
                                f"{_BUDGET_HELP}")
        out[key] = value
    return out


@dataclass(frozen=True)
class Candidate:
    """One student of the search space: a model family and its keyword arguments."""

    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "_".join([self.family, *(f"{k}{v}" for k, v in self.kwargs.items())])


def candidates(space: Mapping[str, Mapping[str, Sequence[Any]]]) -> list[Candidate]:
    """Every combination of every family's argument values, in the space's order (families, then arguments)."""
    out: list[Candidate] = []
    for family, args in space.items():
        keys = list(args)
        for values in itertools.product(*(list(args[k]) for k in keys)):
            out.append(Candidate(family, dict(zip(keys, values))))
    return out


def over_budget(*, params: int, latency_ms: float, budget: Mapping[str, float]) -> list[str]:
    """What ``params`` / ``latency_ms`` exceed in ``budget`` (readable reasons; empty when it fits)."""
    reasons = []
    if "params" in budget and params > budget["params"]:
        reasons.append(f"{params:,} params > {budget['params']:,.0f}")
    if "latency_ms" in budget and latency_ms > budget["latency_ms"]:
        reasons.append(f"{latency_ms:.3f} ms > {budget['latency_ms']:g} ms")
    return reasons


def pareto_front(latency: Sequence[float], quality: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (latency as low or lower and quality as high or higher, one
    of them strictly), sorted by latency."""
    n = len(latency)
    if len(quality) != n:
        raise KDistillError(f"pareto_front: got {n} latencies and {len(quality)} qualities; expected one of each "
                            "per candidate")
    front = [i for i in range(n)
             if not any(latency[j] <= latency[i] and quality[j] >= quality[i]
                        and (latency[j] < latency[i] or quality[j] > quality[i]) for j in range(n))]
    return sorted(front, key=lambda i: (latency[i], -quality[i]))


def rank_correlations(scores: Mapping[str, Sequence[float]], target: Sequence[float]) -> dict[str, float | None]:
    """Spearman rank correlation of each named score with ``target`` (``None`` with fewer than three points)."""
    out: dict[str, float | None] = {}
    for name, s in scores.items():
        if len(s) != len(target):
            raise KDistillError(f"rank_correlations: {name!r} has {len(s)} values, the target {len(target)}")
        out[name] = spearman(torch.tensor(list(s), dtype=torch.float64), torch.tensor(list(target),
                                                                                      dtype=torch.float64)) \
            if len(target) >= 3 else None
    return out


def capacity_gap_summary(rows: Sequence[Mapping[str, Any]], *, teacher_params: int, teacher_accuracy: float,
                         law_fraction: float) -> dict[str, Any]:
    """Where distillation helps most across student sizes.

    ``rows``: one per student, with ``name``, ``params``, ``distilled`` and ``alone`` (accuracies of the same student
    distilled and trained alone on labels). Returns every row with its ``ratio`` (student / teacher params),
    ``gain`` (distilled - alone) and ``gap_to_teacher`` (teacher - distilled); the student with the largest gain;
    a quadratic fit of the gain against log10(params) and its peak (``None`` unless the fit is concave with the peak
    inside the swept range); and the candidate nearest (in log size) to ``law_fraction`` x the teacher's size."""
    if not rows:
        raise KDistillError("capacity gap: no student was trained; expected at least one candidate in the budget")
    table = sorted(({"name": r["name"], "params": int(r["params"]), "ratio": int(r["params"]) / teacher_params,
                     "distilled": float(r["distilled"]), "alone": float(r["alone"]),
                     "gain": float(r["distilled"]) - float(r["alone"]),
                     "gap_to_teacher": teacher_accuracy - float(r["distilled"])} for r in rows),
                   key=lambda r: (r["params"], r["name"]))
    best = max(table, key=lambda r: (r["gain"], -r["params"]))
    law_params = law_fraction * teacher_params
    nearest = min(table, key=lambda r: abs(math.log(r["params"] / law_params)))
    fit: dict[str, Any] = {"coefficients": None, "peak_params": None}
    logs = [math.log10(r["params"]) for r in table]
    if len({round(v, 9) for v in logs}) >= 3:
        import numpy as np

        a, b, c = (float(v) for v in np.polyfit(logs, [r["gain"] for r in table], 2))
        fit["coefficients"] = [a, b, c]
        if a < 0 and min(logs) <= -b / (2 * a) <= max(logs):
            fit["peak_params"] = float(10 ** (-b / (2 * a)))
            fit["peak_ratio"] = fit["peak_params"] / teacher_params
    return {"teacher_params": int(teacher_params), "teacher_accuracy": float(teacher_accuracy), "rows": table,
            "best_gain": {k: best[k] for k in ("name", "params", "ratio", "gain", "distilled", "alone")},
            "fit": fit, "law_fraction": law_fraction, "law_params": law_params,
            "law_nearest": {k: nearest[k] for k in ("name", "params", "ratio", "gain")}}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot_pareto(path: Path, points: Sequence[Mapping[str, Any]], front: Sequence[str], chosen: str | None, *,
                teacher: Mapping[str, float] | None = None,
                ylabel: str = "validation accuracy after brief distillation", lower_is_better: bool = False) -> None:
    """Accuracy after brief distillation against measured latency: every distilled candidate, the front joined
    by a line, the chosen one circled (``points``: ``name``, ``latency_ms``, ``accuracy``, ``family``; with
    ``lower_is_better`` the ``accuracy`` values are a loss such as perplexity, drawn on an inverted log axis so that
    better is up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    for family in sorted({p["family"] for p in points}):
        sel = [p for p in points if p["family"] == family]
        ax.scatter([p["latency_ms"] for p in sel], [p["accuracy"] for p in sel], label=family, alpha=0.8)
    on = sorted((p for p in points if p["name"] in set(front)), key=lambda p: p["latency_ms"])
    if on:
        ax.plot([p["latency_ms"] for p in on], [p["accuracy"] for p in on], "k--", lw=1, label="Pareto front")
    for p in points:
        ax.annotate(p["name"], (p["latency_ms"], p["accuracy"]), fontsize=6, alpha=0.7)
        if p["name"] == chosen:
            ax.scatter([p["latency_ms"]], [p["accuracy"]], s=160, facecolors="none", edgecolors="red",
                       label=f"chosen: {chosen}")
    if teacher:
        ax.axhline(teacher["accuracy"], color="grey", lw=0.8, ls=":", label="teacher")
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    if lower_is_better:
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("latency per batch on this machine (ms, log)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Student design: {'perplexity' if lower_is_better else 'accuracy'} against latency")
    _save(fig, path)


def plot_capacity_gap(path: Path, summary: Mapping[str, Any], *, ylabel: str = "test accuracy") -> None:
    """Distilled and alone accuracy against student size (log), the teacher's line, and the gain on a second axis,
    with the law's predicted size marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    x = [r["params"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    ax.scatter(x, [r["distilled"] for r in rows], label="distilled", marker="o")
    ax.scatter(x, [r["alone"] for r in rows], label="trained alone", marker="x")
    ax.axhline(summary["teacher_accuracy"], color="grey", lw=0.8, ls=":", label="teacher")
    ax.axvline(summary["law_params"], color="purple", lw=0.8, ls="--",
               label=f"law: {summary['law_fraction']:g} x teacher")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters (log)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    gain = ax.twinx()
    gain.plot(x, [r["gain"] for r in rows], "g.", alpha=0.6)
    coef = summary["fit"]["coefficients"]
    if coef:
        lo, hi = math.log10(min(x)), math.log10(max(x))
        grid = [lo + (hi - lo) * i / 50 for i in range(51)]
        gain.plot([10 ** g for g in grid], [coef[0] * g * g + coef[1] * g + coef[2] for g in grid], "g-", lw=1)
    gain.axhline(0.0, color="g", lw=0.6, alpha=0.5)
    gain.set_ylabel(f"gain of distillation (distilled - alone, {ylabel})", color="g")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Capacity gap: what distillation adds, by student size")
    _save(fig, path)


def write_design(output: Path, *, recipe: dict[str, Any], head: str, design: dict[str, Any], seconds: float,
                 candidates: int, within_budget: int, distilled: int, capacity_gap: bool) -> dict[str, Any]:
    """Write ``recipe.yaml`` (``head`` comment + the recipe with the chosen student) and ``design.json`` (``design``
    with ``wall_seconds``) atomically into ``output``; return the summary ``kdistill design`` prints."""
    import yaml

    from ..io import write_json_atomic

    write_bytes_atomic(output / "recipe.yaml", (head + yaml.safe_dump(recipe, sort_keys=False)).encode())
    design["wall_seconds"] = seconds
    write_json_atomic(output / "design.json", design)
    return {"output": str(output), "recipe": str(output / "recipe.yaml"), "chosen": design["chosen"],
            "candidates": candidates, "within_budget": within_budget, "distilled": distilled,
            "pareto_front": design["pareto_front"], "rank_correlation": design["rank_correlation"],
            **({"capacity_gap": design["capacity_gap"]["best_gain"]} if capacity_gap else {})}
