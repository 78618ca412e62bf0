"""Teacher hacking on a test-sized setting: offline distillation on a small fixed prompt set vs diverse prompts
vs on-policy distillation (the setting of On Teacher Hacking in Language Model Distillation, Tiapkin et al., 2025).

1. Teacher: a tiny Llama (``--teacher-layers`` x ``--teacher-hidden``, byte-level BPE of 1,024 tokens trained on the
   texts) trained briefly with cross-entropy on King James Bible text (``--teacher-tokens``): an imperfect model of
   the text, as every teacher is. It is one ``kdistill run`` (method ``none``), its student folder the teacher.
2. Three students (2 layers, hidden 64, fresh weights) distilled from it for the same ``--steps`` optimizer steps
   of ``--blocks`` blocks each, with the teacher-hacking proxy (KL to the teacher on training blocks) and the golden
   metric (held-out KJV perplexity: the true text, which the teacher only approximates) logged every
   ``--eval-every`` steps:

   * ``offline_small``: forward KL on the same ``--blocks`` blocks for every step (a small fixed prompt set, many
     epochs);
   * ``offline_diverse``: forward KL on fresh blocks at every step (one epoch over ``steps x blocks`` blocks);
   * ``on_policy``: GKD with lambda = 1 (the student writes the continuation of each block's first
     ``--prompt-tokens`` tokens, the teacher scores it) on the same small prompt set as ``offline_small``.

Each student's run reports the audit of :mod:`kdistill.eval.audit` (``report.json`` ``audits.teacher_hacking``);
this script prints, per setting, whether it was flagged and where, the golden metric at its best and at the end,
the proxy at the golden metric's best and at the end, and the wall time, as one JSON document. ``--figure PNG``
also draws the proxy and golden curves of the three settings side by side. Runs on one CPU thread in a few minutes::

    python benchmarks/teacher_hacking.py --out runs/teacher_hacking --figure docs/llm_audit_teacher_hacking.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _data(args: argparse.Namespace, train_tokens: int) -> dict[str, Any]:
    return {"name": "kjv", "block_length": args.block_length, "train_tokens": train_tokens,
            "eval_tokens": args.eval_tokens, "eval_fraction": 0.05}


def _eval(args: argparse.Namespace, enabled: bool = True) -> dict[str, Any]:
    audit = {"enabled": False}
    if enabled:
        audit = {"enabled": True, "extraction_samples": 32, "proxy_blocks": args.blocks,
                 "prefix_tokens": args.prompt_tokens, "continuation_tokens": args.block_length - args.prompt_tokens}
    return {"batch_size": 16, "agreement_k": 64, "generations": 0, "audit": audit}


def teacher_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The teacher: a random tiny Llama copied whole (layer_subset of all its layers) and trained with CE alone."""
    return {"task": "llm", "name": "teacher_hacking_teacher", "seed": args.seed,
            "teacher": {"name": "tiny", "tiny_vocab_size": 1024, "tiny_layers": args.teacher_layers,
                        "tiny_hidden_size": args.teacher_hidden},
            "student": {"kind": "layer_subset", "num_layers": args.teacher_layers},
            "data": _data(args, args.teacher_tokens), "method": {"name": "none"}, "baseline": False,
            "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "schedule": "cosine", "warmup_steps": 20,
                      "log_every": 50},
            "eval": _eval(args, enabled=False)}


def student_recipe(args: argparse.Namespace, setting: str, teacher_dir: Path) -> dict[str, Any]:
    small = args.blocks * args.block_length
    diverse = setting == "offline_diverse"
    data = {**_data(args, small * args.steps if diverse else small), "prompt_tokens": args.prompt_tokens}
    if setting == "on_policy":  # the student samples every continuation, the teacher scores it
        method = {"name": "gkd", "kwargs": {"lmbda": 1.0, "beta": 0.0, "kd_temperature": 1.0,
                                            "sampling_temperature": 1.0}}
    else:  # the teacher samples each prompt's continuation once; the student learns its distributions on them
        method = {"name": "llm_kd", "kwargs": {"loss": "forward_kl", "kd_temperature": 1.0}}
        data["sequence_kd"] = {"sampling_temperature": 1.0}
    return {"task": "llm", "name": f"teacher_hacking_{setting}", "seed": args.seed,
            "teacher": {"name": str(teacher_dir)},
            "student": {"kind": "smaller_config",
                        "config": {"num_hidden_layers": args.student_layers, "hidden_size": args.student_hidden,
                                   "intermediate_size": 2 * args.student_hidden, "num_attention_heads": 4,
                                   "num_key_value_heads": 4}},
            "data": data, "method": method, "baseline": False,
            "train": {"epochs": 1 if diverse else args.steps, "max_steps": args.steps, "batch_size": args.blocks,
                      "lr": args.lr, "schedule": "constant", "eval_every": args.eval_every, "log_every": 10},
            "eval": _eval(args)}


SETTINGS = ("offline_small", "offline_diverse", "on_policy")


def summary(report: dict[str, Any], seconds: float) -> dict[str, Any]:
    th = report["audits"]["teacher_hacking"]
    keys = ("flagged", "step", "golden_best", "peak_step", "golden_peak", "proxy_at_best", "proxy_at_peak",
            "recovered", "episode_end", "golden_last", "proxy_last", "reason")
    return {**{k: th[k] for k in keys if k in th}, "evaluations": th["evaluations"],
            "held_out_perplexity": report["student"]["metrics"]["perplexity"],
            "teacher_perplexity": report["teacher"]["metrics"]["perplexity"],
            "extraction_rate": report["audits"]["memorization"]["student"]["extraction_rate"],
            "seconds": round(seconds, 1), "curve": th.get("curve", [])}


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), dpi=110)
    for ax, (name, r) in zip(axes, results.items()):
        steps = [p["step"] for p in r["curve"]]
        ax.plot(steps, [p["perplexity"] for p in r["curve"]], color="tab:red", marker=".")
        ax.set_ylabel("golden: held-out perplexity", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(steps, [p["train_kl_topk"] for p in r["curve"]], color="tab:blue", marker=".")
        ax2.set_ylabel("proxy: KL to teacher on training blocks", color="tab:blue")
        if r["flagged"]:
            ax.axvline(r["step"], color="k", ls="--", lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{name}: " + (f"flagged at step {r['step']}" if r["flagged"] else "not flagged"), fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/teacher_hacking")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-length", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--teacher-tokens", type=int, default=300_000)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=8, help="blocks per step; the small fixed prompt set's size")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--figure", default=None, help="PNG of the three settings' curves")
    args = ap.parse_args()

    import torch

    from kdistill import api
    from kdistill.config import load_config

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    recipe = teacher_recipe(args)
    done = out / "teacher" / "report.json"
    if not done.exists() or json.loads((out / "teacher" / "config.json").read_text()) != \
            load_config(recipe).model_dump(mode="json"):  # a teacher of these settings is reused
        api.run(recipe, output=out / "teacher", progress=False, quiet=True)
    teacher_dir = out / "teacher" / "student"
    teacher_seconds = time.perf_counter() - t0
    results = {}
    for setting in args.settings:
        t = time.perf_counter()
        report = api.run(student_recipe(args, setting, teacher_dir), output=out / setting, progress=False,
                         quiet=True)
        results[setting] = summary(report, time.perf_counter() - t)
    if args.figure:
        figure(results, Path(args.figure))
    doc = {"command": " ".join(["python", "benchmarks/teacher_hacking.py", *sys.argv[1:]]),
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "figure")},
           "teacher_seconds": round(teacher_seconds, 1), "results": results,
           "total_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
