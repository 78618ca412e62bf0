"""Graph distillation benchmark (issue 22): a GNN teacher vs MLP students on WordNet, transductive and inductive.

Runs the recipe ``graph/wordnet_vqgraph`` (15,000 WordNet noun synsets, 25 supersense classes; 10% of the
nodes labelled for training, 10% validation, 20% test, half of the test nodes hidden with their edges while training)
through the task runner, once per teacher kind (``gcn``, ``sage``) and seed. Every run trains the teacher and
three MLP students of the same size and budget: alone on the labels (``mlp``), with GLNN and with VQGraph. The seed
draws the node split and the initial weights (the node subset and its features are the same for every seed).

Per run and model: test accuracy on the transductive test nodes (visible with their edges during training) and on
the inductive ones (hidden, restored for the GNN at test time), the validation accuracy of the last epoch (the
numbers the recipe's hyperparameters were chosen on), and the latency of 1,000 test nodes (median of 20): the MLP
on their features, the GNN including the fetch of their 2-hop neighbourhood. Prints one JSON object (``--out``
also writes it) with the runs and the mean and sample standard deviation over the seeds.

    python benchmarks/graph.py --out docs/graphs.json                # GCN and GraphSAGE teachers, seeds 0 1 2
    python benchmarks/graph.py --teachers gcn --seeds 0 --set train.epochs=5    # a quick look
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

MODELS = {"teacher": "teacher", "mlp": "baseline", "glnn": "glnn", "vqgraph": "student"}
SETTINGS = ("transductive", "inductive")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _last_val(folder: Path) -> float | None:
    path = folder / "history.json"
    if not path.is_file():
        return None
    hist = json.loads(path.read_text())["history"]
    return hist[-1]["accuracy"] if hist else None


def one_run(recipe: str, kind: str, seed: int, runs: Path, overrides: list[str]) -> dict[str, Any]:
    out = runs / f"{kind}_seed{seed}"
    t0 = time.perf_counter()
    report = api.run(recipe, output=out, overrides=[f"teacher.model.kind={kind}", f"seed={seed}", *overrides],
                     progress=False, quiet=True)
    row: dict[str, Any] = {"teacher": kind, "seed": seed, "wall_seconds": time.perf_counter() - t0,
                           "teacher_source": report["teacher"]["source"], "data": report["data"], "models": {}}
    for name, key in MODELS.items():
        entry = report[key] if key in ("teacher", "baseline", "student") else report["variants"][key]
        m = entry["metrics"]
        row["models"][name] = {"transductive": m.get("accuracy_transductive"),
                               "inductive": m.get("accuracy_inductive"), "all_test": m["accuracy"],
                               "val_last": _last_val(out / key), "train_seconds": entry.get("train_seconds")}
        if entry.get("graph_fit"):
            row["models"][name]["graph_fit"] = entry["graph_fit"]
    row["latency"] = {"nodes": report["latency_nodes"], "gnn_with_fetch_ms": report["teacher"]["latency_ms"],
                      "fetch_ms": report["teacher"]["latency_fetch_ms"], "mlp_ms": report["student"]["latency_ms"],
                      "speedup": report["teacher"]["latency_ms"] / report["student"]["latency_ms"]}
    return row


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in sorted({r["teacher"] for r in rows}):
        mine = [r for r in rows if r["teacher"] == kind]
        acc = {name: {s: _mean_std([r["models"][name][s] for r in mine]) for s in (*SETTINGS, "val_last")}
               for name in MODELS}
        gap = {name: {s: _mean_std([r["models"][name][s] - r["models"]["mlp"][s] for r in mine]) for s in SETTINGS}
               for name in ("glnn", "vqgraph")}
        lat = {k: _mean_std([r["latency"][k] for r in mine]) for k in ("gnn_with_fetch_ms", "fetch_ms", "mlp_ms",
                                                                        "speedup")}
        out[kind] = {"accuracy": acc, "gain_over_mlp": gap, "latency": lat,
                     "wall_seconds": sum(r["wall_seconds"] for r in mine)}
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| teacher | model | transductive | inductive |", "|---|---|---:|---:|"]
    for kind, s in summary.items():
        for name in MODELS:
            cells = [f"{s['accuracy'][name][k]['mean']:.4f} ± {s['accuracy'][name][k]['std']:.4f}" for k in SETTINGS]
            lines.append(f"| {kind} | {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="graph/wordnet_vqgraph")
    p.add_argument("--teachers", nargs="+", default=["gcn", "sage"], choices=["gcn", "sage"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine; latency is measured with it)")
    p.add_argument("--runs", type=Path, default=Path("runs/graph_benchmark"), help="where the run folders go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every run (e.g. train.epochs=5)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for kind in args.teachers:
        for seed in args.seeds:
            log(f"{kind} seed {seed}")
            rows.append(one_run(args.recipe, kind, seed, args.runs, args.overrides))
            m = rows[-1]["models"]
            log("  " + ", ".join(f"{n} {m[n]['transductive']:.4f}/{m[n]['inductive']:.4f}" for n in MODELS)
                + f" (transductive/inductive), {rows[-1]['wall_seconds']:.0f} s")
    summary = summarise(rows)
    result = {"benchmark": "graph", "recipe": args.recipe, "overrides": args.overrides, "seeds": args.seeds,
              "threads": args.threads, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                   "torch": torch.__version__},
              "command": "python benchmarks/graph.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "wall_seconds": time.perf_counter() - t0, "summary": summary, "table": markdown(summary), "runs": rows}
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
