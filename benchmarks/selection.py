"""Benchmark of data selection before distillation: each strategy against a uniform random subset of the same size
(and the full data), at several budgets and seeds, through the task runners (``kdistill.api.run``).

Settings (cheap on purpose: 2 shared CPU cores):

* ``classification``: MNIST-1D (10,000 samples), a CNN teacher (width 48, depth 4, 20 epochs, trained on the whole
  training split, once per seed) distilled into an MLP student (width 128, depth 2) with Hinton KD (T 4, alpha 0.9)
  on the selected examples only, for the same number of optimizer steps at every budget (compute-matched, like
  MiniPLM's token budgets). Strategies: ``pcoreset`` (k-center in the teacher's probability space), ``kd3``
  (teacher-student disagreement on augmented views, proxy student trained on a 20% seed), ``rad`` (RAD's robust
  query distribution; the budget is the number of examples whose teacher outputs the student may use), ``random``.
* ``llm``: the King James Bible; a small Llama teacher (hidden 128, 4 layers, a 1,024-token BPE) trained here with
  cross-entropy, distilled (token-level forward KL) into a smaller one (hidden 64, 2 layers) on the selected
  128-token blocks, same steps at every budget. Strategies: ``miniplm`` (the reference: the student's
  architecture trained on a random 10% of the pool), ``ddk`` (the KJV's books, reweighted every 16 steps),
  ``random``. Metric: held-out perplexity (the last 5% of the KJV).
* ``smollm2``: the recipe ``selection/smollm2_kjv_miniplm`` at its own scale: SmolLM2-135M-Instruct's top-32 targets
  (``--cache``, written once with ``kdistill cache``) distilled with forward KL into its 6-of-30-layer copy on the
  selected 128-token blocks of the recipe's 150,000-token KJV pool (Genesis to Numbers), 147 steps of 8 blocks at
  every budget (one epoch of the whole pool). Strategies: ``miniplm`` (the teacher's log-likelihood read from the
  cache; the reference: the student's architecture trained on 10% of the pool), ``ddk`` (the pool's books,
  reweighted every 16 steps), ``random``. Metric: held-out perplexity.
* ``blackbox``: the recipe ``selection/wordnet_supersense_rad``: SmolLM2-135M, served here behind the OpenAI-
  compatible API, labels WordNet noun glosses into five supersenses (300 training glosses per seed); a TF-IDF + MLP
  student learns its soft labels. The budget is the number of glosses sent to the teacher. Strategies: ``rad``
  (20% random seed, then RAD's robust distribution over a proxy's margins), ``pcoreset`` (k-center over a proxy's
  probabilities from the same seed), ``random``. Metric: the student's test accuracy against WordNet's labels. All
  runs share one response store (``<work>/blackbox_responses.sqlite``): the teacher is deterministic (greedy), so
  a gloss is sent once across strategies and budgets.

    nice -n 5 python benchmarks/selection.py --out docs/selection.json        # about 30 min of CPU
    python benchmarks/selection.py --parts classification --seeds 0 --quick   # a smoke run

Rows are kept in ``<out>.rows.jsonl`` as they finish, so an interrupted run continues where it stopped. Prints one
JSON document (and writes it to ``--out``).
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

FRACTIONS = (0.1, 0.25, 0.5)
METHODS = {"classification": ("random", "pcoreset", "kd3", "rad"), "llm": ("random", "miniplm", "ddk"),
           "smollm2": ("random", "miniplm", "ddk"), "blackbox": ("random", "pcoreset", "rad")}
METRIC = {"classification": ("accuracy", "higher"), "llm": ("perplexity", "lower"), "smollm2": ("perplexity", "lower"),
          "blackbox": ("accuracy", "higher")}
PARTS = tuple(METHODS)
BLACKBOX_RECIPE = "selection/wordnet_supersense_rad"
SMOLLM2_RECIPE = "selection/smollm2_kjv_miniplm"
#: one epoch of the recipe's 1,171 training blocks at batch 8: every budget trains for as many steps
SMOLLM2_STEPS = 147


def classification_recipe(seed: int, quick: bool) -> dict[str, Any]:
    return {
        "name": "selection_mnist1d", "task": "classification", "seed": seed,
        "data": {"name": "mnist1d", "kwargs": {"num_samples": 4000 if quick else 10000}},
        "teacher": {"model": {"name": "cnn", "kwargs": {"width": 48, "depth": 4}},
                    "train": {"epochs": 3 if quick else 20, "batch_size": 128, "lr": 0.003, "weight_decay": 1e-4,
                              "log_every": 10**6}},
        "student": {"name": "mlp", "kwargs": {"width": 128, "depth": 2}},
        "method": {"name": "hinton_kd", "kwargs": {"kd_temperature": 4.0, "alpha": 0.9}},
        "train": {"epochs": 10**4, "max_steps": 100 if quick else 1200, "batch_size": 128, "lr": 0.003,
                  "weight_decay": 1e-4, "log_every": 10**6},
        "baseline": False, "eval": {"latency_repeats": 1},
    }


#: the first 4,096 128-token blocks of the KJV (Genesis into the poetry books) to train on; held out: its last 5%
LLM_DATA = {"name": "kjv", "block_length": 128, "train_tokens": 524_288, "eval_tokens": 16_384}


def llm_teacher(work: Path, quick: bool) -> tuple[str, dict[str, Any]]:
    """Train (once) the small KJV teacher: a fresh Llama with a BPE trained on the texts, cross-entropy only."""
    folder = work / "llm_teacher"
    recipe = {
        "name": "selection_kjv_teacher", "task": "llm", "seed": 0,
        "teacher": {"name": "tiny", "tiny_vocab_size": 1024, "tiny_layers": 1, "tiny_hidden_size": 32},
        "student": {"kind": "smaller_config",
                    "config": {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384,
                               "num_attention_heads": 4, "num_key_value_heads": 4}},
        "data": LLM_DATA, "method": "none", "baseline": False,
        "train": {"epochs": 2, "max_steps": 40 if quick else 1500, "batch_size": 16, "lr": 0.003,
                  "warmup_steps": 50, "log_every": 10**6},
        "eval": {"batch_size": 16, "generations": 1, "audit": {"enabled": False}},
    }
    if not (folder / "report.json").is_file():
        api.run(recipe, output=folder, progress=False, quiet=True)
    report = json.loads((folder / "report.json").read_text())
    return str(folder / "student"), {"perplexity": report["student"]["metrics"]["perplexity"],
                                      "params": report["student"]["params"], "steps": recipe["train"]["max_steps"]}


def llm_recipe(seed: int, teacher: str, quick: bool) -> dict[str, Any]:
    return {
        "name": "selection_kjv", "task": "llm", "seed": seed,
        "teacher": {"name": teacher},
        "student": {"kind": "smaller_config",
                    "config": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 192,
                               "num_attention_heads": 4, "num_key_value_heads": 4}},
        "data": dict(LLM_DATA), "method": {"name": "llm_kd", "kwargs": {"loss": "forward_kl"}}, "baseline": False,
        "train": {"epochs": 10**4, "max_steps": 20 if quick else 256, "batch_size": 16, "lr": 0.003,
                  "log_every": 10**6},
        "eval": {"batch_size": 16, "generations": 1, "agreement_k": 16, "audit": {"enabled": False}},
    }


#: DDK's domains are the books: the 4,096 training blocks run from Genesis into 1 Chronicles, so of the KJV's
#: divisions only law and history are in the pool, too few to reweight
SELECTION_OPTIONS = {"ddk": {"groups": "book", "every": 16, "heldout_per_domain": 8},
                     "miniplm": {"reference_fraction": 0.1, "reference_epochs": 3}}


def blackbox_overrides(method: str | None, fraction: float | None, seed: int, work: Path, quick: bool,
                       threads: int) -> list[str]:
    """``key=value`` overrides of :data:`BLACKBOX_RECIPE` for one row: the strategy at a fraction of the pool
    (``method=None``: every training gloss), no request cap, the shared response store."""
    sel = None if method is None else {"method": method, "fraction": fraction}
    o: dict[str, Any] = {"seed": seed, "data.selection": sel, "teacher.max_requests": None,
                         "teacher.store": str(work / "blackbox_responses.sqlite"), "teacher.serve_threads": threads,
                         "label.variants": False}
    if quick:
        o["data.kwargs.per_class_train"] = 12
        o["data.kwargs.per_class_test"] = 10
        o["student.epochs"] = 5
    return [f"{k}={json.dumps(v)}" for k, v in o.items()]


def smollm2_overrides(method: str | None, fraction: float | None, seed: int, cache: Path | None,
                      quick: bool) -> list[str]:
    """``key=value`` overrides of :data:`SMOLLM2_RECIPE` for one row: the strategy at a fraction of the pool
    (``method=None``: every block), the same optimizer steps at every budget, the top-k cache, no baseline or audit."""
    sel = None if method is None else {"method": method, "fraction": fraction, **SELECTION_OPTIONS.get(method, {})}
    o: dict[str, Any] = {"seed": seed, "data.selection": sel, "baseline": False, "train.epochs": 10**4,
                         "train.max_steps": 4 if quick else SMOLLM2_STEPS, "eval.generations": 1,
                         "eval.audit": {"enabled": False}}
    if quick:  # a smaller pool than the cache's: the teacher runs
        o["data.train_tokens"] = 16_384
        o["cache"] = None
    elif cache is not None:
        o["cache.dir"] = str(cache)
    return [f"{k}={json.dumps(v)}" for k, v in o.items()]


def run_row(part: str, method: str | None, fraction: float | None, seed: int, work: Path, quick: bool,
            teacher: str | None = None, threads: int = 1, cache: Path | None = None) -> dict[str, Any]:
    name = f"{part}_{method or 'full'}_{fraction or 1.0}_{seed}"
    t0 = time.perf_counter()
    if part == "blackbox":
        rep = api.run(BLACKBOX_RECIPE, output=work / name, progress=False, quiet=True,
                      overrides=blackbox_overrides(method, fraction, seed, work, quick, threads))
    elif part == "smollm2":
        rep = api.run(SMOLLM2_RECIPE, output=work / name, progress=False, quiet=True,
                      overrides=smollm2_overrides(method, fraction, seed, cache, quick))
    else:
        recipe = classification_recipe(seed, quick) if part == "classification" else llm_recipe(seed, teacher, quick)
        if method is not None:
            recipe["data"]["selection"] = {"method": method, "fraction": fraction,
                                           **SELECTION_OPTIONS.get(method, {})}
        rep = api.run(recipe, output=work / name, progress=False, quiet=True)
    metric = METRIC[part][0]
    row = {"part": part, "method": method or "full", "fraction": fraction or 1.0, "seed": seed,
           metric: rep["student"]["metrics"][metric], "teacher": rep["teacher"]["metrics"].get(metric),
           "seconds": time.perf_counter() - t0}
    if part == "blackbox":  # the same student on the gold labels of the same texts
        row["gold_labels"] = rep.get("baseline", {}).get("metrics", {}).get("accuracy")
    sel = rep.get("selection")
    if sel:
        row["selection"] = {k: sel[k] for k in ("budget", "pool", "mean_score_kept", "cover_radius",
                                                "estimated_teacher_error", "initial_weights", "domains")
                            if k in sel}
        if "student_reweighting" in sel:
            row["selection"]["final_weights"] = sel["student_reweighting"][-1]["weights"]
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std per (part, method, fraction), and each strategy's paired difference with random (same seed)."""
    out: dict[str, Any] = {}
    for part in sorted({r["part"] for r in rows}):
        metric, better = METRIC[part]
        mine = [r for r in rows if r["part"] == part]
        table: dict[str, Any] = {}
        for method in sorted({r["method"] for r in mine}):
            for frac in sorted({r["fraction"] for r in mine if r["method"] == method}):
                vals = [r[metric] for r in mine if r["method"] == method and r["fraction"] == frac]
                cell: dict[str, Any] = {"mean": statistics.mean(vals),
                                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
                gold = [r["gold_labels"] for r in mine if r["method"] == method and r["fraction"] == frac
                        and r.get("gold_labels") is not None]
                if gold:  # black box: the same student on the gold labels of the same texts
                    cell["gold_labels"] = statistics.mean(gold)
                if method not in ("random", "full"):
                    diffs = []
                    for r in mine:
                        if r["method"] == method and r["fraction"] == frac:
                            base = [b for b in mine if b["method"] == "random" and b["fraction"] == frac
                                    and b["seed"] == r["seed"]]
                            if base:
                                d = r[metric] - base[0][metric]
                                diffs.append(d if better == "higher" else -d)
                    if diffs:
                        cell["gain_vs_random"] = statistics.mean(diffs)
                        cell["gain_vs_random_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                        cell["wins_vs_random"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
                table.setdefault(method, {})[str(frac)] = cell
        # the teacher's metric on the whole pool (a black-box teacher's accuracy on a subset is the subset's)
        full = [r for r in mine if r["method"] == "full"]
        teacher = [r["teacher"] for r in (full or mine) if r.get("teacher") is not None]
        out[part] = {"metric": metric, "better": better, "cells": table,
                     "teacher": statistics.mean(teacher) if teacher else None}
    return out


def markdown(doc: dict[str, Any]) -> str:
    """The summary as the tables of docs/selection.md: mean ± std per budget, and the paired gain over random."""
    lines = []
    for part, res in doc["summary"].items():
        metric, better = res["metric"], res["better"]
        cells = res["cells"]
        fracs = sorted({float(f) for m in cells.values() for f in m if float(f) < 1.0})
        lines.append(f"**{part}** ({metric}, {better} is better; teacher {res['teacher']:.4g}"
                     + (f"; all the data: {cells['full']['1.0']['mean']:.4g} ± {cells['full']['1.0']['std']:.2g}"
                        if "full" in cells else "") + ")\n")
        lines.append("| strategy | " + " | ".join(f"{f:.0%} of the data" for f in fracs) + " |")
        lines.append("|---|" + "---|" * len(fracs))
        for method in [m for m in METHODS[part] if m in cells]:  # random first
            row = []
            for f in fracs:
                c = cells[method].get(str(f))
                if c is None:
                    row.append("")
                    continue
                txt = f"{c['mean']:.4g} ± {c['std']:.2g}"
                if "gold_labels" in c:
                    txt += f" [gold labels {c['gold_labels']:.3g}]"
                if "gain_vs_random" in c:
                    txt += f" ({c['gain_vs_random']:+.3g} vs random, better in {c['wins_vs_random']})"
                row.append(txt)
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["classification", "llm"], choices=list(PARTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--llm-seeds", nargs="+", type=int, default=None,
                    help="seeds of the llm and smollm2 parts (default --seeds)")
    ap.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdistill-selection"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="smollm2: the top-32 cache of selection/smollm2_kjv_miniplm (default: the recipe's cache.dir)")
    ap.add_argument("--quick", action="store_true", help="tiny settings (plumbing only; numbers are meaningless)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="print the tables of a finished JSON and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = (args.out.with_suffix(".rows.jsonl") if args.out else args.work / "rows.jsonl")
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    done = {(r["part"], r["method"], r["fraction"], r["seed"]) for r in rows}
    t_start = time.perf_counter()
    extra: dict[str, Any] = {}
    for part in args.parts:
        teacher = None
        if part == "llm":
            teacher, extra["llm_teacher"] = llm_teacher(args.work, args.quick)
        seeds = args.llm_seeds if part in ("llm", "smollm2") and args.llm_seeds else args.seeds
        todo = [(None, None, s) for s in seeds]
        todo += [(m, f, s) for f in args.fractions for s in seeds for m in METHODS[part]]
        for method, frac, seed in todo:
            key = (part, method or "full", frac or 1.0, seed)
            if key in done:
                continue
            row = run_row(part, method, frac, seed, args.work, args.quick, teacher, args.threads, args.cache)
            rows.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), file=sys.stderr, flush=True)
    doc = {"settings": {"parts": args.parts, "seeds": args.seeds, "llm_seeds": args.llm_seeds or args.seeds,
                        "fractions": args.fractions, "quick": args.quick, "threads": args.threads,
                        "classification": classification_recipe(0, args.quick), "llm": llm_recipe(0, "<teacher>",
                                                                                                  args.quick),
                        "selection_options": SELECTION_OPTIONS},
           **extra, "summary": summarise(rows), "rows": rows, "wall_seconds_this_call": time.perf_counter() - t_start}
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
