"""Diffusion step-distillation benchmark (issue 23): every diffusion method on Fashion-MNIST, 1/2/4 sampling steps.

Runs the recipe ``diffusion/<method>`` of every registered diffusion distillation method (a method that overrides
``Method.prepare_diffusion`` and needs a teacher), ``diffusion/vsd_snoopi`` (VSD with SNOOPI's random-scale
guidance) and ``diffusion/denoising`` (the no-teacher control: the same steps on the data alone), once per seed,
through the task runner. Every run shares one teacher
(the recipes' teacher: a class-conditional UNet trained once and reused from the cache), one evaluator classifier and
the same student budget, and starts its student from the teacher's weights. The seed draws the student's noise and
timesteps and the evaluation noises; the teacher's rows (50 DDIM steps, the reference, and 1/2/4 steps, the naive
baseline) are computed once per seed and cached.

Per row and step count: the FID-like Fréchet distance on the evaluator's features, improved precision and recall,
the class accuracy of the samples, the distance to the reference teacher's samples from the same noise and the
sampling time per sample. Prints one JSON object (``--out`` also writes ``results.json`` and ``table.md`` there):
the runs, and the mean and sample standard deviation over the seeds. Resumable: a finished (method, seed) run is
read back, an interrupted one resumes from its last checkpoint.

    nohup python benchmarks/diffusion.py --out runs/diffusion_bench &              # every method, seeds 0 1 2
    python benchmarks/diffusion.py --out runs/diffusion_bench --methods boot --seeds 0 --set train.max_steps=50
    python benchmarks/diffusion.py --out runs/diffusion_bench --table-only         # aggregate what has finished
    python benchmarks/diffusion.py --out runs/diffusion_toy --recipe diffusion/tiny --set train.max_steps=400  # 2-D
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kdistill import api  # noqa: E402
from kdistill.config import load_config  # noqa: E402
from kdistill.methods.base import Method  # noqa: E402
from kdistill.registry import METHODS  # noqa: E402

#: rows beyond one per method: recipes that run a method with an option worth its own row
EXTRA_ROWS = ("vsd_snoopi", "denoising")
METRICS = ("fid", "precision", "recall", "accuracy", "mse_to_teacher", "ms_per_sample")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def diffusion_methods() -> list[str]:
    """Every registered method that distils a diffusion teacher (it prepares for the diffusion task and reads one)."""
    out = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.needs_teacher and cls.prepare_diffusion is not Method.prepare_diffusion:
            out.append(name)
    return out


def _method_overrides(row: str) -> list[str]:
    """The method (and its keyword arguments) of recipe ``diffusion/<row>``, as overrides of another recipe."""
    spec = load_config(f"diffusion/{row}").method
    return [f"method={spec.name}"] + [f"method.kwargs.{k}={json.dumps(v)}" for k, v in spec.kwargs.items()]


def one_run(row: str, seed: int, runs: Path, overrides: list[str], recipe: str) -> dict[str, Any]:
    out = runs / f"{row}_seed{seed}"
    if (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
    else:
        t0 = time.perf_counter()
        # a shared recipe (e.g. diffusion/tiny) runs each row's method with the kwargs of the row's own recipe
        extra = [] if "{method}" in recipe else _method_overrides(row)
        report = api.run(recipe.format(method=row), output=out, resume=out.exists(),
                         overrides=[f"seed={seed}", *extra, *overrides], progress=False, quiet=True)
        log(f"{row} seed {seed}: {time.perf_counter() - t0:.0f} s")
    s = report["student"]
    return {"method": row, "seed": seed, "teacher": report["teacher"], "baseline": report["baseline"],
            "student": {"by_steps": s["by_steps"], "sampler": s["sampler"], "train_seconds": s["train_seconds"],
                        "train_steps": s["train_steps"], "params": s["params"]},
            "evaluator": report["evaluator"], "wall_seconds": report["wall_seconds"]}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every metric, per (row, steps): the teacher's rows once per seed (the same for every
    method of that seed), each method's student rows."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(name: str, steps: str, metrics: dict[str, float], seed: int, seen: set) -> None:
        if (name, steps, seed) in seen:
            return
        seen.add((name, steps, seed))
        for k in METRICS:
            if k in metrics:
                table.setdefault(name, {}).setdefault(steps, {}).setdefault(k, []).append(metrics[k])

    seen: set = set()
    for r in rows:
        t = r["teacher"]
        add("teacher (reference)", str(t["steps"]), t["metrics"], r["seed"], seen)
        for n, m in t["by_steps"].items():
            add("teacher (naive)", n, m, r["seed"], seen)
        for n, m in r["student"]["by_steps"].items():
            add(r["method"], n, m, r["seed"], seen)
    return {name: {n: {k: _mean_std(v) for k, v in ms.items()} for n, ms in by.items()} for name, by in table.items()}


def markdown(summary: dict[str, Any]) -> str:
    def cell(m: dict[str, Any], k: str, digits: int) -> str:
        if k not in m:
            return "—"
        mean = f"{m[k]['mean']:.{digits}f}"
        return f"{mean} ± {m[k]['std']:.{digits}f}" if m[k]["n"] > 1 else mean

    lines = ["| model | steps | seeds | FID-like | precision | recall | class accuracy | MSE to teacher "
             "| ms / sample |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, by in summary.items():
        for n in sorted(by, key=int):
            m = by[n]
            lines.append(f"| {name} | {n} | {m['fid']['n']} | {cell(m, 'fid', 3)} | {cell(m, 'precision', 3)} | "
                         f"{cell(m, 'recall', 3)} | {cell(m, 'accuracy', 3)} | {cell(m, 'mse_to_teacher', 4)} | "
                         f"{cell(m, 'ms_per_sample', 2)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs, results.json and table.md")
    ap.add_argument("--methods", nargs="*", default=None,
                    help="rows (recipe names under diffusion/); default: every diffusion distillation method and "
                         + ", ".join(EXTRA_ROWS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--recipe", default="diffusion/{method}",
                    help="recipe per method ({method} is replaced), or one recipe every method runs on")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides for every run (key=value)")
    ap.add_argument("--table-only", action="store_true", help="aggregate the finished runs; train nothing")
    args = ap.parse_args()
    methods = args.methods or [*diffusion_methods(), *EXTRA_ROWS]
    runs = args.out / "runs"
    rows = []
    for seed in args.seeds:  # seed-major: every method gets its first seed before any gets a second
        for method in methods:
            done = (runs / f"{method}_seed{seed}" / "report.json").is_file()
            if args.table_only and not done:
                continue
            rows.append(one_run(method, seed, runs, args.set, args.recipe))
    summary = summarise(rows)
    result = {"benchmark": "diffusion step distillation", "recipe": args.recipe, "overrides": args.set,
              "seeds": args.seeds, "methods": methods, "summary": summary, "runs": rows,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    text = json.dumps(result, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(text)
    (args.out / "table.md").write_text(markdown(summary) + "\n")


if __name__ == "__main__":
    main()
