"""Dataset distillation figures: every dataset-distillation method of the registry at 1 / 10 / 50 examples per class,
against a random real subset of the same size and the full training data, on two student architectures, over
seeds. Each (method, seed) is one run of the method's built-in recipe (``dataset_distillation/<method>``) through
:func:`kdistill.api.run`; the random-subset and full-data references are trained in the first method's run of a
seed (they do not depend on the method). Results are written after every run, so an interrupted benchmark resumes
where it stopped. Prints the JSON it writes.

    python benchmarks/dataset_distillation.py --seeds 0 1 2                      # MNIST-1D, every method
    python benchmarks/dataset_distillation.py --dataset fashion_mnist --methods kd_pruning dataset_quantization
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
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import kdistill.methods  # noqa: E402,F401  (fills the registry)
from kdistill.api import run  # noqa: E402
from kdistill.io import write_json_atomic  # noqa: E402
from kdistill.registry import METHODS  # noqa: E402

#: recipe overrides per data set (MNIST-1D is what the recipes describe)
DATASETS: dict[str, list[str]] = {
    "mnist1d": [],
    # 10,000 of the 60,000 training images (CPU budget), small 2-D CNNs; the teacher trains 10 epochs
    "fashion_mnist": [
        'data={"name": "fashion_mnist", "kwargs": {"num_train": 10000}}',
        'teacher={"model": {"name": "cnn", "kwargs": {"width": 16, "depth": 3}}, "train": {"epochs": 10, '
        '"batch_size": 128, "lr": 0.003, "weight_decay": 0.0001, "log_every": 1000}}',
        'distill_model={"name": "cnn", "kwargs": {"width": 16, "depth": 3}}',
        'students={"cnn": {"name": "cnn", "kwargs": {"width": 16, "depth": 3}}, '
        '"mlp": {"name": "mlp", "kwargs": {"width": 128, "depth": 2}}}',
        'full_train={"epochs": 5, "batch_size": 128, "lr": 0.003, "weight_decay": 0.0001, "log_every": 1000}',
    ],
}


def distilling_methods() -> list[str]:
    return [n for n, cls in METHODS.items() if getattr(cls, "distills_data", False)]


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """Mean and (sample) standard deviation over seeds of every (set, budget, student) accuracy."""
    acc: dict[tuple[str, int, str], list[float]] = {}
    full: dict[str, list[float]] = {}
    seconds: dict[tuple[str, int], list[float]] = {}
    for key, r in runs.items():
        method = key.split("/")[0]
        for row in r["results"]:
            acc.setdefault((method, row["per_class"], row["student"]), []).append(row["distilled"])
            if "random" in row:
                acc.setdefault(("random", row["per_class"], row["student"]), []).append(row["random"])
        for student, a in r.get("full_data", {}).items():
            full.setdefault(student, []).append(a)
        for k, s in r["distillation_seconds"].items():
            seconds.setdefault((method, int(k)), []).append(s)

    def stats(v: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}

    return {
        "accuracy": [{"set": m, "per_class": k, "student": s, **stats(v)} for (m, k, s), v in sorted(acc.items())],
        "full_data": {s: stats(v) for s, v in sorted(full.items())},
        "distillation_seconds": [{"method": m, "per_class": k, **stats(v)} for (m, k), v in sorted(seconds.items())],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="mnist1d")
    ap.add_argument("--methods", nargs="*", default=None, help="default: every dataset-distillation method")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--per-class", nargs="*", type=int, default=[1, 10, 50])
    ap.add_argument("--out", default="docs/dataset_distillation.json")
    ap.add_argument("--runs", default="runs/dataset_distillation_benchmark", help="run folders (sets, grids)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (run in chunks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods or distilling_methods()
    unknown = [m for m in methods if m not in distilling_methods()]
    if unknown:
        raise SystemExit(f"--methods: {unknown} are not dataset-distillation methods; expected some of "
                         f"{distilling_methods()}")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc.setdefault("datasets", {})
    entry = doc["datasets"].setdefault(args.dataset, {"runs": {}})
    entry["overrides"] = DATASETS[args.dataset]
    entry["per_class"] = args.per_class
    done = 0
    for seed in args.seeds:
        for i, method in enumerate(methods):
            key = f"{method}/seed{seed}"
            if key in entry["runs"]:
                continue
            if args.max_runs is not None and done >= args.max_runs:
                break
            references = not any(k.endswith(f"/seed{seed}") and r.get("full_data") for k, r in entry["runs"].items())
            overrides = [*DATASETS[args.dataset], f"seed={seed}", f"per_class={json.dumps(args.per_class)}"]
            if not references:
                overrides += ["full_train=null", "random_baseline=false"]
            t0, c0 = time.perf_counter(), time.process_time()
            report = run(f"dataset_distillation/{method}", output=Path(args.runs) / args.dataset / method /
                         f"seed{seed}", overrides=overrides, progress=False, quiet=True)
            entry["runs"][key] = {
                "results": [{"per_class": r["per_class"], "student": r["student"],
                             "distilled": r["distilled"]["accuracy"],
                             **({"random": r["random"]["accuracy"]} if "random" in r else {})}
                            for r in report["results"]],
                "full_data": {s: v["metrics"]["accuracy"] for s, v in report["full_data"].items()},
                "teacher_accuracy": report["teacher"]["metrics"]["accuracy"],
                "distillation_seconds": {k: v["seconds"] for k, v in report["distillation"].items()},
                "examples": {k: v["examples"] for k, v in report["distillation"].items()},
                "stored_vectors": {k: v["stored_vectors"] for k, v in report["distillation"].items()},
                "soft_labels": any(v["soft_labels"] for v in report["distillation"].values()),
                "wall_seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
            }
            done += 1
            print(f"{args.dataset} {key}: {entry['runs'][key]['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
            entry["summary"] = summarise(entry["runs"])
            _stamp(doc, args)
            write_json_atomic(out, doc)
    entry["summary"] = summarise(entry["runs"]) if entry["runs"] else {}
    _stamp(doc, args)
    write_json_atomic(out, doc)
    print(json.dumps(doc, indent=1))
    return doc


def _stamp(doc: dict[str, Any], args: argparse.Namespace) -> None:
    command = "python benchmarks/dataset_distillation.py " + " ".join(sys.argv[1:])
    doc["commands"] = [*[c for c in doc.get("commands", []) if c != command], command]
    doc["machine"] = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "torch": torch.__version__, "torch_threads": args.threads}


if __name__ == "__main__":
    main()
