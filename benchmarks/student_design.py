"""Benchmark of student design before distillation on MNIST-1D: does the training-free DisWOT score rank candidate
students by their accuracy after distillation better than parameter count or FLOPs do, and at which student size
does distillation help most (the capacity gap)?

One ``kdistill design design/mnist1d --capacity-gap`` run (``kdistill.api.design``): the recipe's 24 candidates (MLP
widths 16-256 x depths 1-3, CNN widths 4-16 x depths 2-4) for the CNN teacher of ``classic/mnist1d`` (width 48,
depth 4, 50k parameters, 30 epochs; reused from the teacher cache when present), each scored without training, then
distilled (Hinton KD, T 4, alpha 0.9) and trained alone on labels for the same ``--steps`` optimizer steps of 128.
Derived here from its ``design.json``:

* Spearman rank correlation of each ranker (DisWOT, params, FLOPs) with the test accuracy after distillation, and
  with the gain of distillation over training alone;
* AutoDistil-lite under parameter budgets: the student ``kdistill design`` would pick (best validation accuracy among
  the ``--top-k`` candidates a ranker puts first within the budget) and its test accuracy, against the best of all
  candidates within the budget (what distilling every candidate finds);
* the capacity-gap summary (where the gain peaks, against the law's rule of thumb).

Several ``--seeds`` repeat it all (the seed sets the teacher, the candidates' initial weights, which DisWOT scores,
and the data order); the tables give the mean and standard deviation over seeds.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/student_design.py --seeds 0 1 --out docs/student_design.json
    python benchmarks/student_design.py --quick                       # a smoke run (numbers are meaningless)
    python benchmarks/student_design.py --markdown docs/student_design.json   # the tables of docs/data_and_students.md

Prints one JSON document (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from kdistill import api  # noqa: E402
from kdistill.students.design import rank_correlations  # noqa: E402

RANKERS = ("diswot", "params", "flops")  # each ranks higher-is-better-predicted first
#: rank correlations are also given for DisWOT's two terms alone (minus each distance: higher is better)
CORRELATED = ("diswot", "semantic", "relational", "params", "flops")


def correlations(cands: list[dict[str, Any]], target: str) -> dict[str, float | None]:
    """Spearman of each ranker in ``CORRELATED`` with ``target`` (``distilled`` accuracy or ``gain``)."""
    scores = {"diswot": [c["diswot"] for c in cands], "semantic": [-c["semantic_distance"] for c in cands],
              "relational": [-c["relational_distance"] for c in cands], "params": [c["params"] for c in cands],
              "flops": [c["flops"] for c in cands]}
    values = [c["distilled"]["test_accuracy"] - (c["alone"]["test_accuracy"] if target == "gain" else 0.0)
              for c in cands]
    return rank_correlations(scores, values)


def budget_picks(candidates: list[dict[str, Any]], *, budgets: list[int], top_k: int) -> list[dict[str, Any]]:
    """For each parameter budget: what each ranker's top-k (then the best validation accuracy among them, as
    ``kdistill design`` chooses) would have picked, and the oracle (the best of all candidates within the budget)."""
    out = []
    for budget in budgets:
        inside = [c for c in candidates if c["params"] <= budget]
        if not inside:
            continue
        row: dict[str, Any] = {"budget_params": budget, "candidates": len(inside)}
        best = max(inside, key=lambda c: (c["distilled"]["val_accuracy"], -c["latency_ms"]))
        row["oracle"] = {"name": best["name"], "params": best["params"],
                         "test_accuracy": best["distilled"]["test_accuracy"]}
        for ranker in RANKERS:
            top = sorted(inside, key=lambda c: (-c[ranker], c["name"]))[:top_k]
            pick = max(top, key=lambda c: (c["distilled"]["val_accuracy"], -c["latency_ms"]))
            row[ranker] = {"name": pick["name"], "params": pick["params"],
                           "test_accuracy": pick["distilled"]["test_accuracy"], "found_oracle": pick is best}
        out.append(row)
    return out


def summarise(design: dict[str, Any], *, budgets: list[int], top_k: int) -> dict[str, Any]:
    cands = [c for c in design["candidates"] if "distilled" in c]
    keep = ("name", "family", "params", "flops", "latency_ms", "diswot", "semantic_distance", "relational_distance",
            "rank_diswot")
    return {
        "teacher": design["teacher"],
        "candidates": [{**{k: c[k] for k in keep}, "distilled": c["distilled"]["test_accuracy"],
                        "distilled_val": c["distilled"]["val_accuracy"], "alone": c["alone"]["test_accuracy"]}
                       for c in sorted(cands, key=lambda c: c["rank_diswot"])],
        "rank_correlation": correlations(cands, "distilled"),
        "rank_correlation_gain": correlations(cands, "gain"),
        "rank_correlation_within_family": {
            f: correlations([c for c in cands if c["family"] == f], "distilled")
            for f in sorted({c["family"] for c in cands})},
        "budget_picks": budget_picks(cands, budgets=budgets, top_k=top_k),
        "capacity_gap": design["capacity_gap"],
    }


def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means and standard deviations over seeds: rank correlations, each candidate's accuracies and gain, and how
    often each ranker's budget pick was the best candidate within the budget."""
    seeds = sorted(runs)
    corr = {key: {r: _ms([runs[s][key][r] for s in seeds]) for r in CORRELATED}
            for key in ("rank_correlation", "rank_correlation_gain")}
    families = sorted(runs[seeds[0]]["rank_correlation_within_family"])
    corr["rank_correlation_within_family"] = {
        f: {r: _ms([runs[s]["rank_correlation_within_family"][f][r] for s in seeds]) for r in CORRELATED}
        for f in families}
    names = [row["name"] for row in runs[seeds[0]]["capacity_gap"]["rows"]]
    by = {s: {c["name"]: c for c in runs[s]["candidates"]} for s in seeds}
    rows = []
    for n in names:
        c0 = by[seeds[0]][n]
        rows.append({"name": n, "params": c0["params"], "flops": c0["flops"],
                     "ratio": c0["params"] / runs[seeds[0]]["teacher"]["params"],
                     "latency_ms": _ms([by[s][n]["latency_ms"] for s in seeds]),
                     "rank_diswot": _ms([by[s][n]["rank_diswot"] for s in seeds]),
                     "distilled": _ms([by[s][n]["distilled"] for s in seeds]),
                     "alone": _ms([by[s][n]["alone"] for s in seeds]),
                     "gain": _ms([by[s][n]["distilled"] - by[s][n]["alone"] for s in seeds])})
    picks = []
    for i, b in enumerate(runs[seeds[0]]["budget_picks"]):
        per = [runs[s]["budget_picks"][i] for s in seeds]
        picks.append({"budget_params": b["budget_params"], "candidates": b["candidates"],
                      "oracle": _ms([p["oracle"]["test_accuracy"] for p in per]),
                      **{r: {**_ms([p[r]["test_accuracy"] for p in per]),
                             "found_oracle": sum(p[r]["found_oracle"] for p in per)} for r in RANKERS}})
    best = max(rows, key=lambda r: r["gain"]["mean"])
    return {"seeds": seeds, **corr, "candidates": rows, "budget_picks": picks,
            "best_mean_gain": {"name": best["name"], "params": best["params"], "ratio": best["ratio"],
                               "gain": best["gain"]},
            "teacher_test_accuracy": _ms([runs[s]["teacher"]["test_accuracy"] for s in seeds]),
            "teacher_params": runs[seeds[0]]["teacher"]["params"]}


def markdown(doc: dict[str, Any]) -> str:
    s, a = doc["settings"], doc["aggregate"]
    n = len(a["seeds"])
    pm = lambda m, nd=3: f"{m['mean']:.{nd}f} ± {m['std']:.{nd}f}"  # noqa: E731
    lines = [f"Teacher: {a['teacher_params']:,} parameters, test accuracy {pm(a['teacher_test_accuracy'], 4)}; every "
             f"student {s['steps']} optimizer steps of 128; seeds {', '.join(map(str, a['seeds']))} (mean ± std over "
             f"{n}); latency per batch of {s['latency_batch_size']} on this machine (one thread, shared CPU).", "",
             "| ranker | Spearman vs test accuracy after distillation (all 24) | within MLPs | within CNNs | "
             "Spearman vs gain over training alone |", "|---|---|---|---|---|"]
    fam = a["rank_correlation_within_family"]
    for r in CORRELATED:
        lines.append(f"| {r} | {pm(a['rank_correlation'][r])} | {pm(fam['mlp'][r]) if 'mlp' in fam else ''} | "
                     f"{pm(fam['cnn'][r]) if 'cnn' in fam else ''} | {pm(a['rank_correlation_gain'][r])} |")
    k = s["top_k"]
    lines += ["", f"| params budget | candidates | best of all | DisWOT top-{k} | params top-{k} | FLOPs top-{k} |",
              "|---|---|---|---|---|---|"]
    for b in a["budget_picks"]:
        cells = [f"{b['budget_params']:,}", str(b["candidates"]), pm(b["oracle"], 4)]
        cells += [f"{pm(b[r], 4)} (best in {b[r]['found_oracle']}/{n})" for r in RANKERS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| student | params | / teacher | DisWOT rank | distilled | alone | gain (points) |",
              "|---|---|---|---|---|---|---|"]
    for r in a["candidates"]:
        g = r["gain"]
        lines.append(f"| {r['name']} | {r['params']:,} | {r['ratio']:.3f} | {r['rank_diswot']['mean']:.1f} | "
                     f"{pm(r['distilled'], 4)} | {pm(r['alone'], 4)} | {g['mean'] * 100:+.1f} ± {g['std'] * 100:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="design/mnist1d")
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps of every student (distilled and alone)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--top-k", type=int, default=4, help="candidates a ranker sends to brief distillation")
    ap.add_argument("--budgets", nargs="+", type=int, default=[5_000, 20_000, 60_000], help="parameter budgets")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdistill-student-design"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny settings (plumbing only; numbers are meaningless)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="print the tables of a finished JSON and exit")
    ap.add_argument("--reuse", action="store_true", help="summarise the design.json a previous run left in --work "
                                                         "(same settings) instead of running again")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    overrides = [f"design.steps={steps}"]
    if args.quick:
        overrides += ["data.kwargs.num_samples=2000", "teacher.train.epochs=2",
                      "design.space={mlp: {width: [16, 64], depth: [1, 2]}, cnn: {width: [4], depth: [2]}}"]
    t0 = time.perf_counter()
    runs: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        folder = args.work / f"seed{seed}"
        if not (args.reuse and (folder / "design.json").is_file()):
            api.design(args.recipe, output=folder, capacity_gap=True, overrides=[*overrides, f"seed={seed}"],
                       progress=False)
        design = json.loads((folder / "design.json").read_text())
        if design["design"]["steps"] != steps or design["seed"] != seed:
            raise SystemExit(f"{folder}: design.json has steps {design['design']['steps']}, seed {design['seed']}; "
                             f"expected {steps}, {seed}. Drop --reuse or point --work elsewhere.")
        runs[seed] = {**summarise(design, budgets=args.budgets, top_k=args.top_k),
                      "wall_seconds": design["wall_seconds"]}
        print(f"seed {seed}: {design['wall_seconds']:.0f} s", file=sys.stderr)
    doc = {"settings": {"recipe": args.recipe, "steps": steps, "seeds": args.seeds, "top_k": args.top_k,
                        "budgets": args.budgets, "threads": args.threads, "quick": args.quick,
                        "latency_batch_size": design["latency_batch_size"],
                        "score_examples": design["score_examples"], "method": design["method"],
                        "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/student_design.py "
                                   f"--steps {steps} --seeds {' '.join(map(str, args.seeds))} "
                                   "--out docs/student_design.json"},
           "aggregate": aggregate(runs), "runs": {str(s): r for s, r in runs.items()},
           "wall_seconds": sum(r["wall_seconds"] for r in runs.values()) if args.reuse
           else time.perf_counter() - t0}
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
