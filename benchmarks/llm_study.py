"""Which LLM distillation objective pays: every objective on one student, one data set and one token budget.

Each row is one ``kdistill run`` of the ``llm/smollm2_kjv`` recipe (SmolLM2-135M teacher -> its 6-of-30-layer
copy, King James Bible text) with only the method (and what the method needs) changed; every row trains the same
student from the same initial weights on the same ``--tokens`` training tokens, with the same optimizer, schedule
and seed. Rows that can learn from cached top-k teacher log-probs share one cache (``--cache``, written once by
``kdistill cache llm/smollm2_kjv``); sequence-level KD and GKD run the teacher live. ``forward_kl_sampled`` is
forward KL from an unbiased sampled cache of the same data instead (``--sampled-cache``, written by ``kdistill cache
llm/smollm2_kjv cache.mode=sampled cache.k=32``).

Resumable by (row, seed): a finished run has ``OUT/<row>/seed<s>/report.json`` and is not run again; an
interrupted one continues from its last checkpoint (``--resume``). Each run's output goes to
``OUT/<row>/seed<s>.log``. Run it in the background::

    nohup python benchmarks/llm_study.py --out runs/llm_study --cache runs/smollm2_kjv_cache > study.log 2>&1 &

``--extra-seeds 1 --top 3`` then adds seed 1 for cross-entropy and for the three rows with the lowest held-out
perplexity at seed 0 (chosen from the results at that moment). ``--table-only`` runs nothing and rewrites the
results. Output: ``OUT/results.json`` (one record per finished (row, seed), and per row mean and std over seeds),
``OUT/table.md`` and the same JSON on stdout.

Columns per run, read from the run's ``report.json`` and, when ``kdistill audit`` has been run on it,
``audit.json``: held-out perplexity, top-1 agreement and top-k KL(teacher || student) on the held-out text,
perplexity on a second domain the student never trains on (WordNet glosses, from the audit), training tokens,
training seconds and the median seconds per logged step (the figure to compare: it ignores pauses and
evaluations), and for on-policy rows the share of step time spent generating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = "llm/smollm2_kjv"
PROMPT_TOKENS = 32  # prompt of each 128-token block that sequence-level KD and GKD continue
SAMPLED_DRAWS = 32  # teacher draws per token of the sampled cache (--sampled-cache)


def _kd(loss: str, alpha: float = 1.0, **loss_kwargs: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"loss": loss, "kd_temperature": 1.0, "alpha": alpha, "chunk_size": 256}
    if loss_kwargs:
        kw["loss_kwargs"] = loss_kwargs
    return {"method": {"name": "llm_kd", "kwargs": kw}}


# The pruned student (Minitron-style width pruning of the teacher, students/pruning.py) at the layer subset's
# parameter count: its own cross-entropy baseline and forward KL.
PRUNED = {"kind": "pruned", "target_params": 49_552_704}
# MiniLMv2 Q/K/V relations of teacher layer 24 on the student's last layer, added to forward KL (needs the live
# teacher's attention projections, so no cache): the llm/smollm2_minilm recipe's method.
MINILM = {"name": "minilm", "kwargs": {"relations": ["qq", "kk", "vv"], "relation_heads": 9, "weight": 1.0,
                                       "teacher_layer": 24, "student_layer": -1,
                                       "output_method": _kd("forward_kl")["method"]}}

# row -> overrides of the recipe, in the order they run. ``cache: None`` = the row cannot use cached top-k targets.
ROWS: dict[str, dict[str, Any]] = {
    "cross_entropy": {"method": {"name": "none"}, "cache": None},
    "forward_kl": _kd("forward_kl"),
    # the same row from an unbiased sampled cache (Random-Sampling KD) of 32 draws per token, a third of the bytes
    "forward_kl_sampled": {**_kd("forward_kl"), "cache": "sampled"},
    "pruned_cross_entropy": {"student": PRUNED, "method": {"name": "none"}, "cache": None},
    "pruned_forward_kl": {"student": PRUNED, **_kd("forward_kl")},
    "pruned_forward_kl_sampled": {"student": PRUNED, **_kd("forward_kl"), "cache": "sampled"},
    "reverse_kl": _kd("reverse_kl"),
    "jsd_0.5": _kd("generalized_jsd", beta=0.5),
    "skew_kl_0.1": _kd("skew_kl", skew=0.1),
    "skew_reverse_kl_0.1": _kd("skew_reverse_kl", skew=0.1),
    "tvd": _kd("tvd"),
    "taid": _kd("taid"),
    "token_selective": _kd("token_selective"),
    "forward_kl+ce_0.5": _kd("forward_kl", alpha=0.5),
    # the two levers that each took the layer subset ~20% below cross-entropy, together
    "forward_kl_sampled+ce_0.5": {**_kd("forward_kl", alpha=0.5), "cache": "sampled"},
    "minilm+forward_kl": {"method": MINILM, "cache": None},
    "sequence_kd": {"method": {"name": "none"}, "cache": None, "data.prompt_tokens": PROMPT_TOKENS,
                    "data.sequence_kd": {"sampling_temperature": 0.0}},
    "gkd_0.5": {"method": {"name": "gkd", "kwargs": {"lmbda": 0.5, "beta": 0.5}}, "cache": None,
                "data.prompt_tokens": PROMPT_TOKENS},
    "gkd_1.0": {"method": {"name": "gkd", "kwargs": {"lmbda": 1.0, "beta": 0.5}}, "cache": None,
                "data.prompt_tokens": PROMPT_TOKENS},
}
BASELINE_ROW = "cross_entropy"
# rows whose cross-entropy baseline is another row (a different student)
BASELINE_OF = {"pruned_forward_kl": "pruned_cross_entropy", "pruned_forward_kl_sampled": "pruned_cross_entropy"}


def overrides(row: str, *, seed: int, tokens: int, cache: str | None, eval_every: int,
              student: dict[str, Any] | None, sampled_cache: str | None = None) -> list[str]:
    """``key=value`` overrides of one (row, seed): values as JSON (a YAML flow value)."""
    o: dict[str, Any] = {"seed": seed, "baseline": False, "data.train_tokens": tokens,
                         "train.eval_every": eval_every, "train.checkpoint_every": eval_every}
    if cache:  # the shared top-k cache (the recipe's own default is a sampled one)
        o.update({"cache.dir": cache, "cache.mode": "topk"})
    if student:
        o["student"] = student
    row_o = dict(ROWS[row])
    if row_o.get("cache") == "sampled":
        if not sampled_cache:
            raise SystemExit(f"row {row}: needs --sampled-cache (kdistill cache {RECIPE} --output DIR "
                             f"cache.mode=sampled cache.k={SAMPLED_DRAWS})")
        del row_o["cache"]
        o.update({"cache.dir": sampled_cache, "cache.mode": "sampled", "cache.k": SAMPLED_DRAWS})
    o.update(row_o)
    return [f"{k}={json.dumps(v)}" for k, v in o.items()]


def run_one(out: Path, row: str, seed: int, args: argparse.Namespace) -> None:
    d = out / row / f"seed{seed}"
    if (d / "report.json").exists():
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kdistill", "run", args.recipe,
           *overrides(row, seed=seed, tokens=args.tokens, cache=args.cache, eval_every=args.eval_every,
                      student=json.loads(args.student) if args.student else None,
                      sampled_cache=args.sampled_cache),
           "-o", str(d), "--no-progress"]
    if (d / "config.json").exists():  # started before: keep what it wrote (checkpoints, stored generations)
        cmd.append("--resume")
    t0 = time.time()
    with open(d.parent / f"{d.name}.log", "a") as log:  # beside the run: kdistill wants an empty folder
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    print(json.dumps({"row": row, "seed": seed, "rc": rc, "seconds": round(time.time() - t0, 1)}), flush=True)


def record(d: Path) -> dict[str, Any] | None:
    if not (d / "report.json").exists():
        return None
    r = json.loads((d / "report.json").read_text())
    s = r["student"]
    rec = {"perplexity": s["metrics"]["perplexity"], "top1_agreement": s["agreement"].get("top1_agreement"),
           "kl_teacher_student_topk": s["agreement"].get("kl_teacher_student_topk"),
           "train_tokens": r["data"]["train_tokens"], "steps": s["steps"], "train_seconds": s["train_seconds"],
           "generation_share": s.get("time_shares", {}).get("generation_share"),
           "teacher_perplexity": r["teacher"]["metrics"]["perplexity"]}
    log = d / "work" / "student" / "metrics.jsonl"  # median step time: robust to pauses and to a shared machine
    steps = [json.loads(line).get("step_seconds") for line in log.read_text().splitlines()] if log.exists() else []
    rec["step_seconds_median"] = statistics.median([x for x in steps if x is not None] or [float("nan")])
    audit = d / "audit.json"
    if audit.exists():
        a = json.loads(audit.read_text())
        shift = a.get("shift", {}).get("student", {})
        rec["shift_perplexity"] = shift.get("perplexity")
        rec["teacher_shift_perplexity"] = a.get("shift", {}).get("teacher", {}).get("perplexity")
        rec["teacher_hacking"] = a.get("teacher_hacking", {}).get("flagged")
        rec["extraction_rate"] = a.get("memorization", {}).get("student", {}).get("extraction_rate")
    return rec


def _mean_std(xs: list[float]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None}


def collect(out: Path) -> dict[str, Any]:
    runs, rows = [], {}
    for row in ROWS:
        recs = []
        for d in sorted((out / row).glob("seed*")) if (out / row).exists() else []:
            rec = record(d)
            if rec is not None:
                recs.append({"row": row, "seed": int(d.name[4:]), **rec})
        runs += recs
        if recs:
            rows[row] = {"seeds": [r["seed"] for r in recs],
                         **{k: _mean_std([r.get(k) for r in recs])
                            for k in ("perplexity", "shift_perplexity", "top1_agreement", "kl_teacher_student_topk",
                                      "train_seconds", "step_seconds_median", "generation_share",
                                      "extraction_rate")},
                         "train_tokens": recs[0]["train_tokens"]}
    teacher = next((r["teacher_perplexity"] for r in runs), None)
    for k, r in rows.items():
        base = rows.get(BASELINE_OF.get(k, BASELINE_ROW), {}).get("perplexity", {}).get("mean")
        p = r["perplexity"]["mean"]
        r["vs_cross_entropy"] = None if base is None else p / base - 1.0
        r["vs_teacher"] = None if teacher is None else p / teacher
    return {"recipe": RECIPE, "teacher_perplexity": teacher, "rows": rows, "runs": runs}


def table(res: dict[str, Any]) -> str:
    def ms(x: dict[str, Any], fmt: str) -> str:
        if x["mean"] is None:
            return "—"
        return format(x["mean"], fmt) + ("" if x["std"] is None else " ± " + format(x["std"], fmt))

    lines = ["| row | seeds | held-out ppl | vs CE | × teacher | shifted ppl | top-1 agr. | KL(t‖s) | tokens | "
             "s/step (median) | gen. share |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = sorted(res["rows"], key=lambda k: res["rows"][k]["perplexity"]["mean"])
    for k in order:
        r = res["rows"][k]
        vs = "—" if r["vs_cross_entropy"] is None else f"{100 * r['vs_cross_entropy']:+.1f}%"
        lines.append(f"| {k} | {','.join(map(str, r['seeds']))} | {ms(r['perplexity'], '.1f')} | {vs} | "
                     f"{r['vs_teacher']:.2f} | {ms(r['shift_perplexity'], '.1f')} | {ms(r['top1_agreement'], '.3f')} | "
                     f"{ms(r['kl_teacher_student_topk'], '.3f')} | {r['train_tokens']:,} | "
                     f"{ms(r['step_seconds_median'], '.2f')} | {ms(r['generation_share'], '.2f')} |")
    return "\n".join(lines) + "\n"


def write(out: Path) -> dict[str, Any]:
    res = collect(out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "results.json")
    (out / "table.md").write_text(table(res))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/llm_study"))
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--cache", default=None, help="top-k cache folder shared by the cacheable rows")
    p.add_argument("--sampled-cache", default=None,
                   help=f"sampled cache ({SAMPLED_DRAWS} draws per token) of the same data, for forward_kl_sampled")
    p.add_argument("--tokens", type=int, default=150_000, help="training tokens of every row")
    p.add_argument("--eval-every", type=int, default=30, help="steps between held-out evaluations/checkpoints")
    p.add_argument("--student", default=None, help="JSON student section replacing the recipe's")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows, in this order")
    p.add_argument("--seeds", default="0")
    p.add_argument("--extra-seeds", default="", help="seeds added for cross-entropy and the --top best rows")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            p.error(f"--rows: unknown row {r!r}; expected some of {', '.join(ROWS)}")
    need_sampled = [r for r in rows if ROWS[r].get("cache") == "sampled"]
    if need_sampled and not args.sampled_cache and not args.table_only:
        p.error(f"rows {', '.join(need_sampled)} need --sampled-cache DIR (write it once with `kdistill cache "
                f"{RECIPE} --output DIR cache.mode=sampled cache.k={SAMPLED_DRAWS}`), or leave them out with --rows")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            for row in rows:
                run_one(args.out, row, seed, args)
                write(args.out)
        extra = [int(s) for s in args.extra_seeds.split(",") if s]
        if extra:
            done = collect(args.out)["rows"]
            best = sorted((k for k in done if k != BASELINE_ROW and k not in BASELINE_OF.values()),
                          key=lambda k: done[k]["perplexity"]["mean"])
            for seed in extra:
                for row in [BASELINE_ROW, *best[: args.top]]:
                    run_one(args.out, row, seed, args)
                    write(args.out)
    print(json.dumps(write(args.out)["rows"], indent=1))


if __name__ == "__main__":
    main()
