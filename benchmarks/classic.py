"""Benchmark of the classic-KD method zoo: every method x several seeds, mean ± std of test accuracy.

Settings (``--setting``): ``mnist1d_mlp`` (default) — MNIST-1D, a CNN teacher (width 64, depth 4) trained
per seed, distilled into a small MLP student (width 128, depth 2), 100 epochs; ``mnist1d_cnn`` — the same
teacher into a small CNN (width 16, depth 3), 30 epochs; ``fashion_cnn`` — Fashion-MNIST (4,000 of the training
images; the full 10,000-image test set), a CNN teacher (width 32, depth 4, 15 epochs) into a small CNN
(width 16, depth 3), 10 epochs, lr 3e-3. In every setting
the same student trained alone is the baseline. Every method uses the
hyper-parameters of its recipe ``recipes/classic/<method>.yaml`` (taken from the papers; nothing is tuned
on the test split) and the same training budget. Methods that need what an MLP student does not have
are run on the student that fits them and marked so: ``attention_transfer`` (conv feature maps) on a
small CNN student, ``token_relation_graph`` (token sequences) between two ``transformer1d`` models.
``gt_guided_self_distillation`` uses the seed's baseline student as its teacher (self-distillation).
With ``--mixup both`` every method is also run on teacher-labelled mixup inputs ("consistent teaching").
Wall time per epoch is reported relative to the baseline of the same student. ``--tabular`` adds the
scikit-learn teacher experiment (HistGradientBoosting -> MLP on breast_cancer / wine / digits).

    python benchmarks/classic.py --quick                 # a few minutes on 2 CPU cores
    python benchmarks/classic.py --out docs/classic.json # the full run (hours on CPU)
    python benchmarks/classic.py --setting fashion_cnn --out docs/classic_fashion.json

Prints one JSON document (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import kdistill.methods  # noqa: E402,F401
import kdistill.models  # noqa: E402,F401
from kdistill.data import load_dataset  # noqa: E402
from kdistill.data.augment import build_augment  # noqa: E402
from kdistill.eval.metrics import accuracy  # noqa: E402
from kdistill.models.classifiers import predict_logits  # noqa: E402
from kdistill.registry import METHODS, MODELS  # noqa: E402
from kdistill.train.classifier import train_classifier  # noqa: E402
from kdistill.train.loop import make_accelerator  # noqa: E402

ZOO = ["hinton_kd", "dkd", "dist", "logit_standardization", "alpha_divergence", "sinkhorn_kd", "attention_transfer",
       "rkd", "pkt", "similarity_preserving", "nd_loss", "crd", "ofa", "gt_guided_self_distillation", "ensemble",
       "lelp", "adaptive_fusion", "token_relation_graph"]
TEACHER = ("cnn", {"width": 64, "depth": 4})
STUDENTS = {"mlp": ("mlp", {"width": 128, "depth": 2}), "cnn_small": ("cnn", {"width": 16, "depth": 3}),
            "transformer1d": ("transformer1d", {"dim": 32, "depth": 2, "heads": 4, "patch_size": 4})}
SEQ_TEACHER = ("transformer1d", {"dim": 64, "depth": 4, "heads": 4, "patch_size": 4})


# Benchmark settings. ``student`` is the default student; ``student_for`` overrides it per method (a method
# that needs what the default student lacks); ``skip`` lists methods that have no meaning in the setting.
SETTINGS: dict[str, dict[str, Any]] = {
    "mnist1d_mlp": {"dataset": ("mnist1d", {"num_samples": 10000}), "teacher": TEACHER, "teacher_lr": 3e-3,
                    "student": "mlp", "student_for": {"attention_transfer": "cnn_small",
                                                      "token_relation_graph": "transformer1d"},
                    "skip": [], "epochs": 100, "teacher_epochs": 30, "lr": 2e-3},
    "mnist1d_cnn": {"dataset": ("mnist1d", {"num_samples": 10000}), "teacher": TEACHER, "teacher_lr": 3e-3,
                    "student": "cnn_small", "student_for": {}, "skip": ["token_relation_graph"],
                    "epochs": 30, "teacher_epochs": 30, "lr": 2e-3},
    "fashion_cnn": {"dataset": ("fashion_mnist", {"num_train": 4000}), "teacher": ("cnn", {"width": 32, "depth": 4}),
                    "teacher_lr": 3e-3, "student": "cnn_small", "student_for": {}, "skip": ["token_relation_graph"],
                    "epochs": 10, "teacher_epochs": 15, "lr": 3e-3},
}


def method_kwargs(name: str) -> dict[str, Any]:
    if name == "hinton_kd":
        return {"kd_temperature": 4.0, "alpha": 0.9}
    recipe = yaml.safe_load((ROOT / "recipes" / "classic" / f"{name}.yaml").read_text())
    return dict(recipe["method"].get("kwargs", {}))


def student_for(name: str, setting: str = "mnist1d_mlp") -> str:
    cfg = SETTINGS[setting]
    return cfg["student_for"].get(name, cfg["student"])


def train(model_spec, method_name: str, kwargs: dict, teacher, data, *, seed: int, epochs: int, lr: float,
          batch_size: int, mixup: bool) -> tuple[float, float, torch.nn.Module, float]:
    torch.manual_seed(seed)
    model = MODELS.get(model_spec[0])(data.input_shape, data.num_classes, **model_spec[1])
    method = METHODS.get(method_name)(**kwargs)
    augment = build_augment("mixup", data.num_classes, alpha=1.0) if mixup else None
    # the classification task's training function (teacher forwards at every step, as the published rows had)
    res = train_classifier(model, method, data.x_train, data.y_train, accelerator=make_accelerator("no"),
                           batch_size=batch_size, seed=seed, teacher=teacher, augment=augment, progress=False,
                           epochs=epochs, lr=lr, weight_decay=1e-4, log_every=10_000)
    acc = accuracy(predict_logits(res.student, data.x_test), data.y_test)
    val = accuracy(predict_logits(res.student, data.x_val), data.y_val)  # for choosing settings, never the test split
    return acc, res.seconds / epochs, res.student, val


def load_partial(paths: list[Path], seeds: list[int], rerun: set[str]) -> tuple[dict, dict]:
    """Measurements of interrupted runs (their ``.partial.json``; several files, e.g. one per seed run in
    parallel, are merged), minus the methods named in ``rerun``. A (row, seed) measured twice keeps the first.

    Rows written before per-seed bookkeeping existed hold their seeds in run order (``seeds[:n]``).
    """
    kept: dict[str, dict[str, list]] = {}
    teacher_acc: dict[str, dict[int, float]] = {"cnn": {}, "transformer1d": {}}
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            rows = saved["rows"]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--resume {path}: cannot read a partial benchmark file ({e}); expected the "
                             "<out>.partial.json that an interrupted run leaves.") from e
        file_seeds = saved.get("seeds", seeds)
        for key, r in rows.items():
            if key[: key.index("[")] in rerun:
                continue
            r_seeds = r.get("seeds", file_seeds[: len(r["acc"])])
            dst = kept.setdefault(key, {"acc": [], "sec": [], "seeds": []})
            for a, t, sd in zip(r["acc"], r["sec"], r_seeds):
                if sd not in dst["seeds"]:
                    dst["acc"].append(a)
                    dst["sec"].append(t)
                    dst["seeds"].append(sd)
        for name, values in saved.get("teacher_test_accuracy", {}).items():
            t_seeds = saved.get("teacher_seeds", {}).get(name, file_seeds[: len(values)])
            for sd, v in zip(t_seeds, values):
                teacher_acc.setdefault(name, {}).setdefault(sd, v)
    for r in kept.values():  # seed order, so mean/std do not depend on which file came first
        order = sorted(range(len(r["seeds"])), key=lambda i: r["seeds"][i])
        for k in ("acc", "sec", "seeds"):
            r[k] = [r[k][i] for i in order]
    return kept, teacher_acc


def summary(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run_setting(args) -> dict[str, Any]:
    setting = SETTINGS[args.setting]
    data = load_dataset(setting["dataset"][0], **setting["dataset"][1])
    teacher_spec, default_student = setting["teacher"], setting["student"]
    n_steps = -(-len(data.y_train) // args.batch_size) * args.epochs
    variants = [False, True] if args.mixup == "both" else [False]
    rows: dict[str, dict[str, list[float]]] = {}
    teacher_acc: dict[str, dict[int, float]] = {"cnn": {}, "transformer1d": {}}  # name -> seed -> accuracy
    if args.resume is not None:
        rows, teacher_acc = load_partial(args.resume, args.seeds, set(args.rerun or ()))
        print(f"resuming from {args.resume}: {sum(len(r['seeds']) for r in rows.values())} measurements kept",
              file=sys.stderr, flush=True)

    def done(key: str, seed: int) -> bool:
        return seed in rows.get(key, {}).get("seeds", [])

    def add(key: str, acc: float, sec: float, seed: int, val: float) -> None:
        r = rows.setdefault(key, {"acc": [], "sec": [], "seeds": [], "val": []})
        r.setdefault("val", []).append(val)
        r["acc"].append(acc)
        r["sec"].append(sec)
        r["seeds"].append(seed)
        if args.out is not None:  # a long run that is interrupted still leaves every finished measurement
            partial = args.out.with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial.with_suffix(".tmp")
            tmp.write_text(json.dumps({
                "partial": True, "seeds": args.seeds, "rows": rows,
                "teacher_test_accuracy": {n: [v[k] for k in sorted(v)] for n, v in teacher_acc.items()},
                "teacher_seeds": {n: sorted(v) for n, v in teacher_acc.items()}}))
            tmp.replace(partial)

    sfx = [" +mixup" if m else "" for m in variants]
    for seed in args.seeds:
        wanted = [f"baseline[{st}]{x}" for st in {student_for(m, args.setting) for m in args.methods}
                  | {default_student} for x in sfx]
        wanted += [f"{m}[{student_for(m, args.setting)}]{x}" for m in args.methods for x in sfx]
        if all(done(k, seed) for k in wanted):  # a resumed run that already has this seed: no teacher needed
            continue
        teachers = {}
        torch.manual_seed(1000 + seed)
        teachers["cnn"] = train(teacher_spec, "none", {}, None, data, seed=1000 + seed, epochs=args.teacher_epochs,
                                lr=setting["teacher_lr"], batch_size=args.batch_size, mixup=False)[2].eval()
        teacher_acc["cnn"].setdefault(seed, accuracy(predict_logits(teachers["cnn"], data.x_test), data.y_test))
        needed_students = {student_for(m, args.setting) for m in args.methods} | {default_student}
        baselines = {}
        for st in sorted(needed_students):
            for mix in variants:
                key = f"baseline[{st}]" + (" +mixup" if mix else "")
                # the plain mlp baseline is gt_guided_self_distillation's teacher: retrained (same seed, same
                # weights) when a resumed run already has its measurement
                if done(key, seed) and (mix or st != default_student
                                        or "gt_guided_self_distillation" not in args.methods):
                    continue
                acc, sec, model, val = train(STUDENTS[st], "none", {}, None, data, seed=seed, epochs=args.epochs,
                                             lr=args.lr, batch_size=args.batch_size, mixup=mix)
                if not done(key, seed):
                    add(key, acc, sec, seed, val)
                if not mix:
                    baselines[st] = model.eval()
        if "token_relation_graph" in args.methods and not all(
                done("token_relation_graph[transformer1d]" + sfx, seed)
                for sfx in [" +mixup" if m else "" for m in variants]):
            teachers["transformer1d"] = train(SEQ_TEACHER, "none", {}, None, data, seed=1000 + seed,
                                              epochs=args.teacher_epochs, lr=1e-3, batch_size=args.batch_size,
                                              mixup=False)[2].eval()
            teacher_acc["transformer1d"].setdefault(
                seed, accuracy(predict_logits(teachers["transformer1d"], data.x_test), data.y_test))
        for name in args.methods:
            st = student_for(name, args.setting)
            kwargs = {**method_kwargs(name), **setting.get("method_kwargs", {}).get(name, {}),
                      **args.overrides.get(name, {})}
            if name == "dkd" and "warmup_steps" not in setting.get("method_kwargs", {}).get(name, {}):
                kwargs["warmup_steps"] = int(0.2 * n_steps)  # the recipe's 20 % of training, at this budget
            teacher = {"gt_guided_self_distillation": baselines[default_student],
                       "token_relation_graph": teachers.get("transformer1d")}.get(name, teachers["cnn"])
            # --sweep: one row per value, labelled "name{key=value}[student]" (kept out of the summary table)
            for label, extra in args.sweep.get(name, [("", {})]):
                for mix in variants:
                    key = f"{name}{label}[{st}]" + (" +mixup" if mix else "")
                    if done(key, seed):
                        continue
                    t0 = time.perf_counter()
                    acc, sec, _, val = train(STUDENTS[st], name, {**kwargs, **extra}, teacher, data, seed=seed,
                                             epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, mixup=mix)
                    add(key, acc, sec, seed, val)
                    print(f"seed {seed} {key}: acc {acc:.4f} val {val:.4f} ({time.perf_counter() - t0:.1f} s)",
                          file=sys.stderr, flush=True)

    results = {}
    for key, r in rows.items():
        st = key[key.index("[") + 1: key.index("]")]
        base_key = f"baseline[{st}]" + (" +mixup" if key.endswith("+mixup") else "")
        base_sec = statistics.fmean(rows[base_key]["sec"])
        results[key] = {"test_accuracy": summary(r["acc"]), "seeds": r.get("seeds"),
                        **({"val_accuracy": summary(r["val"])} if r.get("val") else {}),
                        "seconds_per_epoch": statistics.fmean(r["sec"]),
                        "time_vs_baseline": statistics.fmean(r["sec"]) / base_sec if base_sec > 0 else float("nan")}
    return {"teacher_test_accuracy": {k: summary([v[sd] for sd in sorted(v)]) for k, v in teacher_acc.items() if v},
            "results": results}


def run_tabular(args) -> dict[str, Any]:
    from kdistill.teachers.sklearn import fit_sklearn_teacher

    out = {}
    for name in ("breast_cancer", "wine", "digits"):
        data = load_dataset(name)
        accs: dict[str, list[float]] = {"teacher": [], "baseline": [], "distilled": [], "distilled +mixup": []}
        for seed in args.seeds:
            teacher = fit_sklearn_teacher("hist_gradient_boosting", data.x_train, data.y_train, data.num_classes,
                                          seed=seed)
            accs["teacher"].append(accuracy(teacher(data.x_test), data.y_test))
            spec = ("mlp", {"width": 64, "depth": 2})
            for key, method, kw, mix in (("baseline", "none", {}, False),
                                         ("distilled", "hinton_kd", {"kd_temperature": 2.0, "alpha": 0.5}, False),
                                         ("distilled +mixup", "hinton_kd", {"kd_temperature": 2.0, "alpha": 1.0},
                                          True)):
                acc, _, _, _ = train(spec, method, kw, teacher, data, seed=seed, epochs=args.tabular_epochs, lr=3e-3,
                                     batch_size=32, mixup=mix)
                accs[key].append(acc)
        out[name] = {k: summary(v) for k, v in accs.items()}
    return out


def summary_markdown(reports: list[dict[str, Any]]) -> str:
    """One row per method, two columns per setting (plain, + teacher-labelled mixup): the change in mean test
    accuracy against the *plain* baseline of the same student (the student as a user would train it), in
    points; ``*`` where the change exceeds twice the larger standard deviation of the two (n >= 2 seeds); the
    student is named where a method ran on another one than the setting's."""
    heads, cols = [], []
    for rep in reports:
        for variant in ("", " +mixup"):
            heads.append(f"{rep['setting']}{variant or ' plain'}")
            cols.append((rep["results"]["results"], variant, rep["config"]["student"]))
    methods = [m for m in ZOO if any(k.startswith(m + "[") for rep in reports for k in rep["results"]["results"])]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    base_line = ["baseline (student alone), accuracy"]
    for res, variant, student in cols:
        b = res.get(f"baseline[{student}]{variant}", {}).get("test_accuracy")
        base_line.append(f"{b['mean']:.4f}" if b else "")
    lines.append("| " + " | ".join(base_line) + " |")
    for m in methods:
        cells = [f"`{m}`"]
        for res, variant, student in cols:
            key = next((k for k in res if k.startswith(m + "[") and
                        (k.endswith(" +mixup") if variant else not k.endswith("+mixup"))), None)
            if key is None:
                cells.append("—")
                continue
            st = key[key.index("[") + 1: key.index("]")]
            a, b = res[key]["test_accuracy"], res[f"baseline[{st}]"]["test_accuracy"]
            d = (a["mean"] - b["mean"]) * 100
            sure = len(a["values"]) > 1 and abs(d) > 200 * max(a["std"], b["std"])
            cells.append(f"{d:+.1f}{'*' if sure else ''}" + ("" if st == student else f" ({st})"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    """One setting's results as a Markdown table (mean ± std over seeds), best first within each student."""
    cfg, res = report["config"], report["results"]["results"]
    lines = [f"{report['setting']}: {cfg['dataset'][0]} {cfg['dataset'][1]}, seeds {cfg['seeds']}, "
             f"{cfg['epochs']} student epochs, teacher {cfg['teacher'][0]} {cfg['teacher'][1]} "
             f"({cfg['teacher_epochs']} epochs)" + (" — quick mode" if report.get("quick") else ""), ""]
    for name, s in report["results"]["teacher_test_accuracy"].items():
        lines.append(f"- teacher {name}: {s['mean']:.4f} ± {s['std']:.4f}")
    lines += ["", "| method [student] | seeds | test accuracy (mean ± std) | vs baseline | time/epoch vs baseline |",
              "|---|---:|---|---:|---:|"]

    def base_of(key: str) -> dict[str, Any]:
        st = key[key.index("[") + 1: key.index("]")]
        return res[f"baseline[{st}]" + (" +mixup" if key.endswith("+mixup") else "")]

    for key in sorted(res, key=lambda k: (k[k.index("["):], -res[k]["test_accuracy"]["mean"])):
        a, b = res[key]["test_accuracy"], base_of(key)["test_accuracy"]
        lines.append(f"| {key} | {len(a['values'])} | {a['mean']:.4f} ± {a['std']:.4f} | "
                     f"{(a['mean'] - b['mean']) * 100:+.1f} pts | "
                     f"{res[key]['time_vs_baseline']:.2f}x |")
    return "\n".join(lines) + "\n"


def merge_reports(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report per setting: a later file's rows (e.g. a rerun of some methods) replace an earlier file's rows
    of the same key, except the baselines (the first file's unchanged rows were measured against its own); the
    later file's teacher figures, baselines and method settings are kept beside them under ``reruns``."""
    merged: dict[str, dict[str, Any]] = {}
    for rep in reports:
        have = merged.get(rep["setting"])
        if have is None:
            merged[rep["setting"]] = json.loads(json.dumps(rep))
            continue
        # the first file's baselines stay: they are what its unchanged rows were measured against
        have["results"]["results"].update({k: v for k, v in rep["results"]["results"].items()
                                           if not k.startswith("baseline[")})
        have.setdefault("reruns", []).append({"rows": sorted(rep["results"]["results"]),
                                              "baselines": {k: v for k, v in rep["results"]["results"].items()
                                                            if k.startswith("baseline[")},
                                              "teacher_test_accuracy": rep["results"]["teacher_test_accuracy"],
                                              "method_kwargs": rep["config"].get("method_kwargs", {})})
    return list(merged.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="mnist1d_mlp",
                   help="data, teacher and student: MNIST-1D -> MLP (and the methods' own students), "
                        "MNIST-1D -> small CNN, Fashion-MNIST -> tiny CNN")
    p.add_argument("--quick", action="store_true", help="reduced run: less data, fewer epochs, plain only")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, choices=ZOO)
    p.add_argument("--mixup", choices=["none", "both"], default=None)
    p.add_argument("--tabular", action="store_true", help="also run the scikit-learn teacher experiment")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", type=Path, nargs="+", default=None,
                   help="keep the measurements of interrupted runs' <out>.partial.json files (merged) and run only "
                        "the rest")
    p.add_argument("--rerun", nargs="+", default=None, help="with --resume: methods to measure again (code changed)")
    p.add_argument("--set", dest="overrides_raw", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override one method hyper-parameter (repeatable), e.g. dkd.beta=2 (a YAML value)")
    p.add_argument("--sweep", dest="sweep_raw", action="append", default=[], metavar="METHOD.KEY=V1,V2,...",
                   help="run METHOD once per value (rows 'METHOD{KEY=V}'); choose on val_accuracy, never the "
                        "test split")
    p.add_argument("--markdown", type=Path, default=None, help="also write the results table as Markdown")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="only render --markdown from saved JSON files (several: per-setting tables + a summary)")
    args = p.parse_args(argv)
    def method_value(flag: str, item: str) -> tuple[str, str, str]:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        if not value or method not in ZOO or not name:
            p.error(f"{flag} {item!r}: expected METHOD.KEY=VALUE[,VALUE...] with METHOD one of the zoo, "
                    "e.g. dkd.beta=2")
        return method, name, value

    args.overrides, args.sweep = {}, {}
    for item in args.overrides_raw:
        method, name, value = method_value("--set", item)
        args.overrides.setdefault(method, {})[name] = yaml.safe_load(value)
    for item in args.sweep_raw:
        method, name, values = method_value("--sweep", item)
        args.sweep[method] = [(f"{{{name}={v}}}", {name: yaml.safe_load(v)}) for v in values.split(",")]
    if args.from_json is not None:
        reports = merge_reports([json.loads(Path(f).read_text()) for f in args.from_json])
        text = "\n".join(markdown(r) for r in reports)
        if len(reports) > 1:
            text = summary_markdown(reports) + "\n" + text
        if args.markdown is not None:
            args.markdown.write_text(text)
        print(text)
        return {"reports": reports}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setting = SETTINGS[args.setting]
    args.seeds = args.seeds or [0, 1, 2]
    args.methods = [m for m in (args.methods or ZOO) if m not in setting["skip"]]
    args.epochs, args.teacher_epochs, args.lr = setting["epochs"], setting["teacher_epochs"], setting["lr"]
    args.batch_size, args.tabular_epochs = 128, 200
    args.mixup = args.mixup or ("none" if args.quick else "both")
    if args.quick:  # a few minutes: less data, fewer epochs, plain only
        size_key = "num_samples" if setting["dataset"][0] == "mnist1d" else "num_train"
        setting = {**setting, "dataset": (setting["dataset"][0], {**setting["dataset"][1], size_key: 2000})}
        SETTINGS[args.setting] = setting
        args.epochs, args.teacher_epochs, args.tabular_epochs = 5, 8, 20
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "classic", "quick": bool(args.quick), "setting": args.setting,
        "config": {"dataset": setting["dataset"], "seeds": args.seeds, "epochs": args.epochs,
                   "teacher_epochs": args.teacher_epochs, "teacher": list(setting["teacher"]),
                   "student": setting["student"], "students": STUDENTS, "batch_size": args.batch_size,
                   "lr": args.lr, "mixup": args.mixup, "torch": torch.__version__,
                   "method_kwargs": {m: {**setting.get("method_kwargs", {}).get(m, {}), **args.overrides.get(m, {})}
                                     for m in args.methods
                                     if setting.get("method_kwargs", {}).get(m) or args.overrides.get(m)},
                   "threads": torch.get_num_threads()},
        "results": run_setting(args),
    }
    if args.tabular:
        report["tabular"] = run_tabular(args)
    report["wall_seconds"] = time.perf_counter() - t0
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    if args.markdown is not None:
        args.markdown.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
