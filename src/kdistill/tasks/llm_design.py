"""``kdistill design`` for ``llm`` recipes: which student to distil a causal LM into.

The candidates are ``student:`` sections (``design.space``: ``{kind: {field: [values]}}``, e.g. layer subsets of
several depths and pruned students of several sizes), built from the recipe's teacher exactly as ``kdistill run``
builds its student. Each is measured here (parameters; FLOPs and latency of one forward over a batch of
``eval.batch_size`` training blocks), set aside when over the budget, then scored without training on the same
scoring blocks:

* **DisWOT** (Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR 2023)
  through :func:`kdistill.eval.diswot.lm_diswot_features`: the semantic matrix over the ``design.classes`` most
  frequent next tokens and the relational matrix of the sequences' mean hidden states;
* **zero-shot KL**: KL(teacher || candidate) per token before any training, the signal depth- and width-pruning
  papers read (ShortGPT, Minitron) for students that start from the teacher's weights.

The ``top_k`` by ``design.rank_by`` (with ``capacity_gap``: all, each also trained alone with cross-entropy) are
distilled for ``design.steps`` steps by the ``llm`` task itself, with the recipe's method, data and cache, each in
``candidates/<name>`` (a design run again after an interruption reuses every candidate that finished with the same
settings). Quality is held-out perplexity (the llm task has one held-out split, so the choice and the
figure read the same text; classification designs choose on validation and report test). The capacity gap's
"accuracy" is ``-ln(perplexity)``, the negative held-out cross-entropy in nats, so gains are nats saved.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.lm import IGNORE_INDEX, corpus_texts, held_out_tensors, lm_dataset
from ..data.loaders import TensorDictDataset
from ..errors import KDistillError
from ..eval.lm import zero_shot_kl
from ..eval.metrics import model_flops, model_latency_ms
from ..io import seed_everything, write_json_atomic
from ..models.classifiers import count_params
from ..rundir import CONFIG_FILE, prepare_run_folder
from .base import RunContext
from .llm import LLMConfig, LMDesignSpec, LMStudentSpec, _corpus, _student, _teacher, run_llm


def _score_blocks(dataset: TensorDictDataset, *, batches: int, batch_size: int, seed: int) -> list[dict[str, Tensor]]:
    """``batches`` batches of training blocks, rows drawn at random with ``seed`` (the same for every candidate)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(dataset), generator=g)[: batches * batch_size]
    keys = ("input_ids", "attention_mask", "labels")
    return [{k: dataset.tensors[k][idx] for k in keys} for idx in rows.split(batch_size) if len(idx) >= 2]


def frequent_next_tokens(batches: list[dict[str, Tensor]], k: int) -> Tensor:
    """The ``k`` most frequent next tokens (labels) of ``batches``, most frequent first (ties: lower id first)."""
    labels = torch.cat([b["labels"][b["labels"] != IGNORE_INDEX] for b in batches])
    ids, counts = labels.unique(return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-int(counts[i]), int(ids[i])))
    return ids[order[:k]]


def _finished_run(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a finished run in ``folder`` made with exactly ``config``, else None."""
    import json

    try:
        if json.loads((folder / CONFIG_FILE).read_text()) == json.loads(json.dumps(config)):
            return json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def design_llm(cfg: LLMConfig, output: Path, *, budget: dict[str, float], capacity_gap: bool = False,
               progress: bool = True) -> dict[str, Any]:
    """``kdistill design`` for an llm recipe (see the module docstring). Writes ``design.json``, ``pareto.png``,
    ``recipe.yaml`` (the recipe with the student of the lowest held-out perplexity after brief distillation) and,
    with ``capacity_gap``, ``capacity_gap.png`` into ``output``; the brief runs are in ``output/candidates``. While it
    runs, ``design.json`` holds the scores and the brief runs finished so far (``"complete": false``)."""
    from ..eval.diswot import diswot_distances, lm_diswot_features
    from ..students import design
    from ..students.pruning import calibration_batches
    from ..teachers.lm import has_lm_head
    from ..teachers.vocab import check_vocab

    t_start = time.perf_counter()
    spec = cfg.design or LMDesignSpec()
    if cfg.teacher.endpoint or cfg.teachers:
        raise KDistillError("design: the recipe's teacher is a served endpoint or a mixture; expected one teacher "
                            "with local weights (candidates are built from it, and the training-free scores read "
                            "its hidden states). Fix: design with `teacher: {name: ...}`, then use the chosen student "
                            "in your recipe.")
    output.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    train_items, eval_items, stream = _corpus(cfg)
    teacher, tok = _teacher(cfg, corpus_texts(train_items))
    teacher.eval().requires_grad_(False)
    if not has_lm_head(teacher):
        raise KDistillError(f"design: got a {type(teacher).__name__} teacher; expected a Hugging Face causal LM with "
                            "a linear LM head.")
    train_blocks, _, train_t = held_out_tensors(tok, train_items, eval_items, stream=stream,
                                                **cfg.data.tensor_kwargs())
    base_set = TensorDictDataset(**train_t) if train_t is not None else lm_dataset(train_blocks)
    batches = _score_blocks(base_set, batches=spec.score_batches, batch_size=spec.score_batch_size, seed=cfg.seed)
    if not batches:
        raise KDistillError(f"design: {len(base_set)} training block(s); expected at least 2 to score candidates on. "
                            "Fix: more data.train_tokens.")
    classes = frequent_next_tokens(batches, spec.classes)
    t_feats = [lm_diswot_features(teacher, b, classes) for b in batches]
    with torch.no_grad():
        t_logits = [teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                    for b in batches]
    lat_x = base_set.tensors["input_ids"][: cfg.eval.batch_size]
    calib = calibration_batches(base_set, num_batches=cfg.student.calibration_batches,
                                batch_size=cfg.train.batch_size)

    def student_spec(cand: design.Candidate) -> LMStudentSpec:
        keep = cfg.student.model_dump(include={"calibration_batches"})
        return LMStudentSpec(kind=cand.family, **{**keep, **cand.kwargs})

    rows: list[dict[str, Any]] = []
    for cand in design.candidates(spec.space):
        s_spec = student_spec(cand)
        row: dict[str, Any] = {"name": cand.name, "family": cand.family, "kwargs": cand.kwargs}
        try:  # the same initial weights kdistill run would start from
            model, own_tok = _student(cfg.model_copy(update={"student": s_spec}), teacher,
                                      calib if s_spec.kind == "pruned" else None)
            check_vocab(teacher, model, tok, own_tok)
        except KDistillError as e:  # e.g. more layers than the teacher has, another tokenizer
            rows.append({**row, "excluded": [str(e).split(". Fix")[0]]})
            continue
        model.eval()
        row.update(params=count_params(model), flops=model_flops(model, lat_x[:1]),
                   latency_ms=model_latency_ms(model, lat_x, spec.latency_repeats))
        row["excluded"] = design.over_budget(params=row["params"], latency_ms=row["latency_ms"], budget=budget)
        if not row["excluded"]:
            sems, rels = zip(*(diswot_distances(lm_diswot_features(model, b, classes), t)
                               for b, t in zip(batches, t_feats)))
            sem, rel = float(torch.stack(sems).mean()), float(torch.stack(rels).mean())
            row.update(diswot=-(sem + rel), semantic_distance=sem, relational_distance=rel,
                       zero_shot_kl=zero_shot_kl(model, batches, t_logits))
        rows.append(row)
        del model
    eligible = [r for r in rows if not r["excluded"]]
    if not eligible:
        sized = [r for r in rows if "params" in r]
        smallest = (f" (the smallest, {min(sized, key=lambda r: r['params'])['name']}, has "
                    f"{min(r['params'] for r in sized):,} params)") if sized else ""
        raise KDistillError(f"design: none of the {len(rows)} candidates of design.space fits: got budget "
                            f"{budget}{smallest}; reasons: {'; '.join(r['excluded'][0] for r in rows)}. Fix: raise "
                            "--budget, or add smaller students to design.space.")
    if spec.rank_by == "diswot":
        eligible.sort(key=lambda r: (-r["diswot"], r["params"], r["name"]))
    else:
        eligible.sort(key=lambda r: (r["zero_shot_kl"], r["params"], r["name"]))
    for i, r in enumerate(eligible):
        r["rank"] = i + 1

    to_train = eligible if capacity_gap or spec.top_k == 0 else eligible[: spec.top_k]
    brief = cfg.train.model_copy(update={"max_steps": spec.steps, "epochs": 10**6})
    teacher_ppl = None

    def progress_file() -> None:  # the scores and the brief runs so far, readable while a long design runs
        write_json_atomic(output / "design.json", {
            "recipe": cfg.name, "task": "llm", "complete": False, "budget": budget, "design": spec.model_dump(),
            "rank_by": spec.rank_by, "ranking": [r["name"] for r in eligible], "to_distil": len(to_train),
            "candidates": eligible + [r for r in rows if r["excluded"]]})

    progress_file()
    for r in to_train:
        run_cfg = cfg.model_copy(update={"student": student_spec(design.Candidate(r["family"], r["kwargs"])),
                                         "train": brief, "baseline": capacity_gap, "design": None})
        cdir, want = output / "candidates" / r["name"], run_cfg.model_dump(mode="json")
        report = _finished_run(cdir, want)  # a design run again (after an interruption) reuses finished candidates
        if report is None:
            prepare_run_folder(cdir, want, resume=False)  # clears the folder, records the config
            report = run_llm(run_cfg, RunContext(cdir, False, progress))
        teacher_ppl = report["teacher"]["metrics"]["perplexity"]
        r["distilled"] = {"perplexity": report["student"]["metrics"]["perplexity"],
                          "train_seconds": report["student"].get("train_seconds")}
        if capacity_gap:
            r["alone"] = {"perplexity": report["baseline"]["metrics"]["perplexity"],
                          "train_seconds": report["baseline"].get("train_seconds")}
        progress_file()

    done = [r for r in eligible if "distilled" in r]
    ppl = [r["distilled"]["perplexity"] for r in done]
    front = [done[i]["name"] for i in design.pareto_front([r["latency_ms"] for r in done], [-p for p in ppl])]
    chosen = min(done, key=lambda r: (r["distilled"]["perplexity"], r["latency_ms"]))
    teacher_entry = {"params": count_params(teacher), "flops": model_flops(teacher, lat_x[:1]),
                     "latency_ms": model_latency_ms(teacher, lat_x, spec.latency_repeats),
                     "perplexity": teacher_ppl}
    target = [-p for p in ppl]  # higher is better, as for accuracy
    scores = {"diswot": [r["diswot"] for r in done], "zero_shot_kl": [-r["zero_shot_kl"] for r in done],
              "params": [r["params"] for r in done], "flops": [r["flops"] for r in done]}
    out: dict[str, Any] = {
        "recipe": cfg.name, "task": "llm", "complete": True, "method": cfg.method.name, "seed": cfg.seed,
        "budget": budget,
        "design": spec.model_dump(), "teacher": teacher_entry, "latency_batch": list(lat_x.shape),
        "score_blocks": int(sum(len(b["input_ids"]) for b in batches)), "classes": int(len(classes)),
        "candidates": eligible + [r for r in rows if r["excluded"]], "rank_by": spec.rank_by,
        "ranking": [r["name"] for r in eligible], "pareto_front": front, "chosen": chosen["name"],
        "rank_correlation": {"target": "minus held-out perplexity after distillation (zero_shot_kl negated: "
                                       "lower KL ranks higher)", "n": len(done),
                             **design.rank_correlations(scores, target)},
    }
    if capacity_gap:
        nats = [{"name": r["name"], "params": r["params"], "distilled": -math.log(r["distilled"]["perplexity"]),
                 "alone": -math.log(r["alone"]["perplexity"])} for r in done]
        out["rank_correlation_gain"] = {"target": "nats saved by distillation over training alone", "n": len(done),
                                        **design.rank_correlations(scores,
                                                                   [x["distilled"] - x["alone"] for x in nats])}
        out["capacity_gap"] = design.capacity_gap_summary(nats, teacher_params=teacher_entry["params"],
                                                          teacher_accuracy=-math.log(teacher_ppl),
                                                          law_fraction=spec.law_fraction)
        design.plot_capacity_gap(output / "capacity_gap.png", out["capacity_gap"],
                                 ylabel="-ln(held-out perplexity)")
    design.plot_pareto(output / "pareto.png",
                       [{"name": r["name"], "family": r["family"], "latency_ms": r["latency_ms"],
                         "accuracy": r["distilled"]["perplexity"]} for r in done], front, chosen["name"],
                       teacher={"accuracy": teacher_ppl}, ylabel="held-out perplexity after brief distillation",
                       lower_is_better=True)
    recipe = {**cfg.model_dump(mode="json", exclude_unset=True),
              "student": student_spec(design.Candidate(chosen["family"], chosen["kwargs"])).model_dump(
                  mode="json", exclude_unset=True)}
    recipe.pop("design", None)
    head = (f"# kdistill design: the student {chosen['name']} ({chosen['params']:,} params, "
            f"{chosen['latency_ms']:.1f} ms per batch of {lat_x.shape[0]} x {lat_x.shape[1]} tokens here, held-out "
            f"perplexity {chosen['distilled']['perplexity']:.2f} after {spec.steps} steps); see design.json\n")
    return design.write_design(output, recipe=recipe, head=head, design=out, seconds=time.perf_counter() - t_start,
                               candidates=len(rows), within_budget=len(eligible), distilled=len(done),
                               capacity_gap=capacity_gap)
