"""The run report: ``report.json`` (schema of DESIGN.md), ``report.md`` and ``curves.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import write_bytes_atomic, write_json_atomic


def _fmt(v: Any, nd: int = 4) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{nd}f}"
    return str(v)


# metrics where lower is better: the gain over the baseline is the reduction, the verdict a relative change
LOWER_IS_BETTER = frozenset({"perplexity", "loss", "mse", "kl", "fid"})


def comparison_rows(report: dict[str, Any], metric: str = "accuracy") -> list[dict[str, Any]]:
    """One row per model: teacher, baseline, the main student and each variant, with compression and
    speed-up relative to the teacher and the gain over the baseline (``baseline - m`` for metrics in
    ``LOWER_IS_BETTER``, so a positive gain is always an improvement)."""
    teacher = report["teacher"]
    rows = [{"name": "teacher", **teacher}]
    if report.get("baseline"):
        rows.append({"name": "baseline", **report["baseline"]})
    aug = (report["student"].get("augment") or {}).get("name")
    rows.append({"name": f"student: {report['method']}" + (f" + {aug}" if aug else ""), **report["student"]})
    for name, v in report.get("variants", {}).items():
        rows.append({"name": name, **v})
    base = report.get("baseline", {}).get("metrics", {}).get(metric)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    out = []
    for r in rows:
        m = r.get("metrics", {}).get(metric, float("nan"))
        params = r.get("params", report["student"].get("params"))
        lat = r.get("latency_ms", report["student"].get("latency_ms"))
        t_lat = teacher.get("latency_ms")
        out.append({
            "name": r["name"], metric: m, "params": params, "latency_ms": lat,
            "compression": teacher["params"] / params if params and teacher.get("params") else float("nan"),
            "speedup": t_lat / lat if lat and t_lat else float("nan"),
            "gain_vs_baseline": sign * (m - base) if base is not None and r["name"] not in ("teacher",) and
            not r["name"].startswith("baseline") else float("nan"),
            "baseline_value": base,
        })
    return out


def markdown_table(rows: list[dict[str, Any]], metric: str = "accuracy") -> str:
    gain_col = "reduction vs baseline" if metric in LOWER_IS_BETTER else "gain vs baseline"
    head = f"| model | {metric} | params | latency ms/batch | compression x | speed-up x | {gain_col} |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = r["gain_vs_baseline"]
        lines.append(
            f"| {r['name']} | {_fmt(r[metric])} | {r['params']:,} | {_fmt(r['latency_ms'], 3)} | "
            f"{_fmt(r['compression'], 1)} | {_fmt(r['speedup'], 1)} | "
            f"{'' if isinstance(gain, float) and math.isnan(gain) else f'{gain:+.4f}'} |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], metric: str = "accuracy", tol: float = 0.005) -> list[str]:
    """Plain sentences saying which distilled students beat the baseline and which did not."""
    out = []
    for r in rows:
        g = r["gain_vs_baseline"]
        if isinstance(g, float) and math.isnan(g):
            continue
        if metric in LOWER_IS_BETTER:  # relative change: perplexities are not fractions
            base = r["baseline_value"]
            rel = g / base if base else float("nan")
            if rel > tol:
                out.append(f"{r['name']}: {metric} {r[metric]:.4f}, {100 * rel:.1f}% lower than the baseline's "
                           f"{base:.4f}.")
            else:
                out.append(f"{r['name']}: no real gain over the baseline ({metric} {r[metric]:.4f} vs "
                           f"{base:.4f}, {100 * rel:+.1f}% lower).")
        elif g > tol:
            out.append(f"{r['name']}: {metric} {r[metric]:.4f}, {g * 100:+.1f} points over the baseline.")
        else:
            out.append(f"{r['name']}: no real gain over the baseline ({g * 100:+.1f} points).")
    return out


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path, metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, hist in curves.items():
        pts = [(h["step"], h[metric]) for h in hist if metric in h]
        if pts:
            ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 40 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Learning curves")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def write_report(report: dict[str, Any], output: Path, *, curves: dict[str, list[dict[str, Any]]] | None = None,
                 metric: str = "accuracy", extra_md: str = "") -> dict[str, Path]:
    """Write report.json, report.md and (with curves) curves.png into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "report.json", "md": output / "report.md"}
    write_json_atomic(paths["json"], report)
    rows = comparison_rows(report, metric)
    md = [f"# kdistill report: {report['recipe']}", "",
          f"task `{report['task']}`, method `{report['method']}`, seed {report['seed']}, "
          f"wall time {report['wall_seconds']:.1f} s", "", markdown_table(rows, metric), ""]
    v = verdicts(rows, metric)
    if v:
        md += ["## What distillation bought", ""] + [f"- {s}" for s in v] + [""]
    if report.get("agreement"):
        md += ["## Teacher agreement (test set)", ""]
        md += [f"- {k}: {_fmt(val)}" for k, val in report["agreement"].items()] + [""]
    if curves:
        paths["png"] = output / "curves.png"
        plot_curves(curves, paths["png"], metric)
        md += ["![learning curves](curves.png)", ""]
    if extra_md:
        md += [extra_md, ""]
    write_bytes_atomic(paths["md"], "\n".join(md).encode())
    return paths
