"""The public API. Each CLI subcommand calls exactly one of these functions with the same arguments."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import load_config
from .errors import KDistillError
from .recipes import list_recipes
from .registry import DATASETS, METHODS, MODELS, SELECTORS, TASKS

#: the metric each task's summary table shows (the report holds them all)
_SUMMARY_METRIC = {"classification": "accuracy", "tabular": "accuracy", "blackbox": "accuracy",
                   "llm": "perplexity", "embedding": "recall_at_1", "dataset_distillation": "accuracy"}


def _print_summary(report: dict[str, Any], output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from .eval.report import comparison_rows, verdicts

    metric = _SUMMARY_METRIC.get(report.get("task", ""))
    console = Console(width=max(110, Console().width))
    teacher, student = report.get("teacher") or {}, report.get("student") or {}
    if metric is None or metric not in teacher.get("metrics", {}) or metric not in student.get("metrics", {}):
        console.print(f"report written to {output / 'report.json'}")
        return
    rows = comparison_rows(report, metric)
    timed = all(r["latency_ms"] == r["latency_ms"] and r["latency_ms"] is not None for r in rows)
    table = Table(title=f"kdistill: {report['recipe']} (seed {report['seed']}, {report.get('wall_seconds', 0):.0f} s)")
    cols = ["model", metric.replace("_", " "), "params"]
    cols += ([f"ms/batch of {report.get('latency_batch_size', '')}", "compression", "speed-up"] if timed
             else ["compression"])
    cols.append("vs baseline")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        g = r["gain_vs_baseline"]
        gain = "" if g != g else (f"{g * 100:+.1f} pts" if metric != "perplexity" else f"{g:+.2f}")
        cells = [r["name"], f"{r[metric]:.4f}", f"{r['params']:,}" if r["params"] else ""]
        cells += [f"{r['latency_ms']:.3f}", f"{r['compression']:.1f}x", f"{r['speedup']:.1f}x"] if timed \
            else [f"{r['compression']:.1f}x"]
        table.add_row(*cells, gain)
    console.print(table)
    if metric == "accuracy":
        for v in verdicts(rows):
            console.print(f"  - {v}")
    extra = ", ".join(str(output / f) for f in ("report.md", "curves.png") if (output / f).exists())
    console.print(f"report: {output / 'report.json'}" + (f", {extra}" if extra else ""))


def run(recipe: str | Path | dict | None = None, *, output: str | Path | None = None, seed: int | None = None,
        resume: bool = False, overrides: Sequence[str] = (), progress: bool = True, nproc: int = 1,
        quiet: bool = False) -> dict[str, Any]:
    """Run a recipe (default: the built-in ``classic/mnist1d``) and return its report.

    ``overrides`` are ``key=value`` strings (``train.epochs=5``, ``method=dkd``); ``nproc > 1`` relaunches
    the same run under ``torchrun --nproc_per_node nproc`` (CPU: gloo; GPU: NCCL).
    """
    overrides = list(overrides) + ([f"seed={seed}"] if seed is not None else [])
    cfg = load_config(recipe, overrides)
    out = Path(output) if output is not None else Path("runs") / cfg.name
    # The run folder is checked and claimed once: here, or by the process that launched these ranks.
    if os.environ.get(_LAUNCHED_ENV) != "1" and int(os.environ.get("RANK", "0")) == 0:
        from .rundir import prepare_run_folder

        status = prepare_run_folder(out, cfg.model_dump(mode="json"), resume=resume,
                                    normalize=lambda old: type(cfg).model_validate(old).model_dump(mode="json"))
        if status == "nothing to resume" and not quiet:
            print(f"--resume: {out} holds no run to resume; starting a fresh run there.", file=sys.stderr)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(recipe, out, overrides, resume, nproc, progress)
    from .tasks.base import RunContext

    task = TASKS.get(getattr(cfg, "task", "classification"))
    with quiet_hub_progress(not progress):
        report = task.run(cfg, RunContext(output=out, resume=resume, progress=progress))
    if not quiet and int(os.environ.get("RANK", "0")) == 0:
        _print_summary(report, out)
    return report


#: set for the ranks that :func:`_launch` starts: the launcher has claimed the run folder, and a rank that hits a
#: user error (a :class:`KDistillError`) writes it to ``$KDISTILL_ERROR_FILE.<rank>`` and exits 0, so the launcher
#: reports it once instead of every rank printing it and torchrun adding a ChildFailedError traceback.
_LAUNCHED_ENV, _ERROR_FILE_ENV = "KDISTILL_LAUNCHED", "KDISTILL_ERROR_FILE"


def hand_error_to_launcher(error: Exception) -> bool:
    """In a rank started by :func:`_launch`: record ``error`` for the launcher and return True (the rank should
    then exit quietly with code 0). Elsewhere return False."""
    path = os.environ.get(_ERROR_FILE_ENV)
    if os.environ.get(_LAUNCHED_ENV) != "1" or not path:
        return False
    Path(f"{path}.{os.environ.get('RANK', '0')}").write_text(str(error))
    return True


@contextmanager
def quiet_hub_progress(quiet: bool = True) -> Iterator[None]:
    """Within the block, hide the Hugging Face loading bars (``Loading weights``, downloads), as ``--no-progress``
    promises; afterwards restore what was set before (an API call must not silence later ones)."""
    if not quiet:
        yield
        return
    from huggingface_hub import utils as hub_utils  # imported first: it reads the variable below at import

    env_before = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is imported inside the block
    hub_utils.disable_progress_bars()
    tf_was_enabled = not hub_was_disabled  # transformers, if imported inside the block, starts disabled
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        tf_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if env_before is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env_before
        if not hub_was_disabled:
            hub_utils.enable_progress_bars()
        if tf_was_enabled and "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


def _launch(recipe: Any, out: Path, overrides: Sequence[str], resume: bool, nproc: int,
            progress: bool = True) -> dict[str, Any]:
    if not isinstance(recipe, (str, Path, type(None))):
        raise KDistillError("run(nproc > 1) needs a recipe path or name, not a dict (it relaunches the CLI).")
    args = ["run"] + ([str(recipe)] if recipe is not None else []) + ["--output", str(out)]
    args += (["--resume"] if resume else []) + ([] if progress else ["--no-progress"]) + list(overrides)
    _torchrun(args, nproc, "run", "(add --resume to continue)")
    return json.loads((out / "report.json").read_text())


def _torchrun(cli_args: Sequence[str], nproc: int, command: str, again: str) -> None:
    """``kdistill <cli_args>`` under ``torchrun --nproc_per_node nproc``; a rank's user error is raised here once."""
    import tempfile

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "kdistill.cli", *cli_args]
    with tempfile.TemporaryDirectory(prefix="kdistill-launch-") as tmp:
        errors = Path(tmp) / "error"
        proc = subprocess.run(cmd, env={**os.environ, _LAUNCHED_ENV: "1", _ERROR_FILE_ENV: str(errors)})
        reported = sorted(Path(tmp).glob("error.*"))
        if reported:
            raise KDistillError(reported[0].read_text())
    if proc.returncode != 0:
        raise KDistillError(f"{command} --nproc {nproc}: torchrun exited with code {proc.returncode}; a process "
                            f"failed (its messages are above). Fix what they report, then run again {again}.")


def evaluate(checkpoint: str | Path) -> dict[str, Any]:
    """Evaluate a saved student on the held-out data of the run that trained it.

    ``checkpoint`` is a run folder or its ``student`` folder. Classification and tabular runs: test metrics
    (and agreement with the run's teacher); llm runs: held-out perplexity on the recipe's held-out texts;
    embedding runs: retrieval metrics on the recipe's test pairs."""
    from .data.classification import load_dataset
    from .eval.metrics import agreement, classification_metrics
    from .exporters.classifier import load_classifier, read_meta
    from .models.classifiers import predict_logits

    p = Path(checkpoint)
    if not p.exists():
        raise KDistillError(f"eval: {str(p)!r} does not exist; expected a run folder (e.g. runs/mnist1d_default) "
                            "or its student folder.")
    if (p / "student" / "model.json").is_file():
        p = p / "student"
    if not (p / "model.json").is_file():
        run_dir = p if (p / "config.json").is_file() and (p / "student").is_dir() else p.parent
        with quiet_hub_progress():  # the result is the output; loading bars would only interleave with it
            return _evaluate_run(run_dir, p)
    meta = read_meta(p)
    if "data" not in meta:
        raise KDistillError(f"{str(p)!r}: model.json names no dataset; evaluate it with your own data.")
    model, _ = load_classifier(p)
    data = load_dataset(meta["data"]["name"], **meta["data"].get("kwargs", {}))
    logits = predict_logits(model, data.x_test)
    result: dict[str, Any] = {"checkpoint": str(p), "data": meta["data"]["name"],
                              "metrics": classification_metrics(logits, data.y_test), "params": meta["params"]}
    teacher_dir = p.parent / "teacher"
    if teacher_dir != p and (teacher_dir / "model.json").is_file():
        teacher, _ = load_classifier(teacher_dir)
        result["agreement"] = agreement(logits, predict_logits(teacher, data.x_test))
    return result


def _evaluate_run(run_dir: Path, given: Path) -> dict[str, Any]:
    """``kdistill eval`` for the runs whose student is not a kdistill classifier folder (llm, embedding)."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file() or not (run_dir / "student").is_dir():
        raise KDistillError(f"eval: {str(given)!r} is neither a classifier folder (model.json) nor a run folder "
                            "(config.json + student/); expected the output folder of `kdistill run` or its student "
                            "folder. Supported tasks: classification, tabular, llm, embedding.")
    cfg = load_config(json.loads(cfg_path.read_text()))
    task = getattr(cfg, "task", "classification")
    student_dir = run_dir / "student"
    if task == "llm":
        from .data.lm import held_out_tensors, lm_corpus
        from .eval.lm import lm_metrics
        from .teachers.lm import load_causal_lm

        model, tok = load_causal_lm(str(student_dir))
        stream = cfg.data.text_stream() if cfg.data.stream else None
        eval_items = [] if stream is not None else lm_corpus(**cfg.data.corpus_kwargs())[1]
        held = held_out_tensors(tok, None, eval_items, stream=stream, chars=True,  # held-out alone, + bits/char
                                **cfg.data.tensor_kwargs())[1]
        metrics = lm_metrics(model, held, batch_size=cfg.eval.batch_size)
        return {"checkpoint": str(student_dir), "task": task, "metrics": metrics,
                "params": sum(p.numel() for p in model.parameters()), "held_out_tokens": int(held["mask"].sum())}
    if task == "embedding":
        from .data.pairs import load_embedding_data
        from .eval.retrieval import evaluate_encoder, evaluate_texts
        from .exporters.sentence_transformers import load_student
        from .students.encoders import load_teacher_encoder

        student = load_student(student_dir)
        data = load_embedding_data(**cfg.data.load_kwargs())
        bs = cfg.eval.batch_size
        if not data.labelled:  # unlabelled texts: agreement with the teacher on the held-out texts
            t_emb = load_teacher_encoder(cfg.teacher).encode(data.test_texts, bs)
            metrics = evaluate_texts(student, data.test_texts, teacher_embeddings=t_emb, batch_size=bs)
            return {"checkpoint": str(student_dir), "task": task, "metrics": metrics,
                    "test_texts": len(data.test_texts)}
        test = data.test
        metrics = evaluate_encoder(student, [q.query for q in test], [q.candidate for q in test],
                                   distractors=data.test_negatives, batch_size=bs)
        return {"checkpoint": str(student_dir), "task": task, "metrics": metrics, "test_pairs": len(test)}
    raise KDistillError(f"eval: the run in {str(run_dir)!r} is a {task!r} run; `kdistill eval` supports "
                        "classification, tabular, llm and embedding runs. Its report.json holds the run's figures.")


def audit(run_dir: str | Path, *, samples: int = 64) -> dict[str, Any]:
    """Audit a finished run and write ``audit.json``, ``audit.md`` (and ``audit_teacher_hacking.png``) into it.

    llm runs: teacher hacking (the proxy and held-out perplexity the run logged), memorisation (extraction rate of
    ``samples`` training sequences for teacher, baseline and student; canary exposure when the run inserted
    canaries) and interpolation vs extrapolation (held-out vs a shifted domain: the run's ``eval.shift``, else
    WordNet glosses). Classification runs: teacher-student agreement on training inputs, mixup inputs (inside the
    data's hull) and noise-shifted inputs. See :mod:`kdistill.eval.audit`."""
    from .errors import expect
    from .eval.audit import write_audit

    p = Path(run_dir)
    if not (p / "config.json").is_file() or not (p / "report.json").is_file():
        raise KDistillError(f"audit: {str(p)!r} is not a finished run folder; expected the output folder of `kdistill "
                            "run` holding config.json and report.json (e.g. runs/smollm2_kjv). Fix: pass that folder, "
                            "or let the run finish (it writes report.json last).")
    expect(isinstance(samples, int) and samples >= 1, "audit samples", samples, "an integer >= 1")
    cfg = load_config(json.loads((p / "config.json").read_text()))
    task = getattr(cfg, "task", "classification")
    with quiet_hub_progress():
        if task == "llm":
            from .tasks.llm import audit_run

            result = audit_run(cfg, p, samples=samples)
        elif task in ("classification", "tabular"):
            result = _audit_classifier(p, samples=samples)
        else:
            raise KDistillError(f"audit: the run in {str(p)!r} is a {task!r} run; `kdistill audit` supports llm, "
                                "classification and tabular runs.")
    write_audit(result, p, title=str(getattr(cfg, "name", p.name)))
    return result


def _audit_classifier(run_dir: Path, *, samples: int) -> dict[str, Any]:
    """Interpolation vs extrapolation of a classifier run: agreement of its saved student and teacher."""
    import torch

    from .data.classification import load_dataset
    from .eval.audit import hull_agreement
    from .exporters.classifier import load_classifier, read_meta
    from .models.classifiers import predict_logits

    folders = [run_dir / "teacher", run_dir / "student"]
    if not all((f / "model.json").is_file() for f in folders):
        raise KDistillError(f"audit: {str(run_dir)!r} lacks a saved teacher or student classifier (teacher/model.json, "
                            "student/model.json); expected a run that trained or saved its teacher. Its report.json "
                            "holds the run's agreement on the test set.")
    (teacher, _), (student, _) = (load_classifier(f) for f in folders)
    meta = read_meta(folders[1])
    data = load_dataset(meta["data"]["name"], **meta["data"].get("kwargs", {}))
    x = torch.as_tensor(data.x_train, dtype=torch.float32)
    agreement = hull_agreement(lambda xb: predict_logits(teacher, xb), lambda xb: predict_logits(student, xb), x,
                               samples=max(samples, 1024))
    return {"extrapolation": {"student": agreement},
            "note": "agreement of student and teacher top-1 predictions on training inputs, mixup of two training "
                    "inputs (inside the data's hull) and training inputs plus Gaussian noise of one per-feature "
                    "standard deviation (outside it)"}


def export(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Export the student only (no method parameters) to ``out`` and check that it reloads identically."""
    from .exporters.classifier import export_classifier

    p = Path(checkpoint)
    from .exporters.sentence_transformers import export_embedding, is_st_folder

    if is_st_folder(p) or is_st_folder(p / "student"):  # an embedding run: sentence-transformers folder
        return export_embedding(p if is_st_folder(p) else p / "student", out)
    from .exporters.lm import export_lm, is_lm_folder

    if is_lm_folder(p) or is_lm_folder(p / "student"):  # an llm run: Hugging Face folder + tokenizer
        return export_lm(p if is_lm_folder(p) else p / "student", out)
    if (p / "student" / "model.json").is_file():
        p = p / "student"
    return export_classifier(p, out)


def sample(run_dir: str | Path, *, n: int = 64, steps: int = 1, model: str = "student", seed: int = 0,
           out: str | Path | None = None, labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Draw ``n`` samples in ``steps`` network evaluations from a diffusion run's ``model`` (``student``, a variant's
    name, or ``teacher``: sampled with DDIM and the run's guidance) and write them as a grid PNG (``out``, default
    ``<run>/samples/sample_<model>_<steps>_steps.png``). The student samples with the sampler its method declared
    (recorded in its ``model.json``), with the run's guidance built in. ``labels``: the classes to draw (default:
    every class in turn)."""
    import torch

    from .eval.generative import sample_grid_png
    from .eval.metrics import latency_ms
    from .exporters.classifier import load_classifier
    from .models.diffusion import DiffusionSchedule, guided
    from .models.diffusion import sample as draw

    p = Path(run_dir)
    cfg_path, mdir = p / "config.json", p / model
    if not cfg_path.is_file() or json.loads(cfg_path.read_text()).get("task") != "diffusion":
        raise KDistillError(f"sample: {str(p)!r} is not a diffusion run folder; expected the output folder of "
                            "`kdistill run` on a diffusion recipe (e.g. runs/diffusion_fashion).")
    if not (mdir / "model.json").is_file():
        have = sorted(d.name for d in p.iterdir() if (d / "model.json").is_file() and d.name != "evaluator")
        raise KDistillError(f"sample: the run has no model {model!r}; expected one of {have}.")
    from .errors import expect

    expect(isinstance(n, int) and n >= 1, "n", n, "an integer >= 1")
    cfg = json.loads(cfg_path.read_text())
    net, meta = load_classifier(mdir)
    net.eval()
    schedule = DiffusionSchedule(**meta["schedule"])
    num_classes = int(meta["num_classes"])
    if meta.get("role") == "teacher":
        scale, sampler = float(cfg.get("guidance_scale", 1.0)), "ddim"
        call = lambda z, t, y: guided(net, z, t, y, scale, num_classes)  # noqa: E731
    else:
        sampler, call = meta["sampler"], net
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *meta["input_shape"]), generator=g)
    y = torch.tensor(list(labels), dtype=torch.long) if labels is not None else torch.arange(n) % num_classes
    expect(len(y) == n and bool(((y >= 0) & (y < num_classes)).all()), "labels", list(y.tolist()),
           f"{n} class ids in [0, {num_classes})")
    x = draw(call, schedule, sampler=sampler, steps=steps, noise=noise, labels=y, generator=g)
    ms = latency_ms(lambda: draw(call, schedule, sampler=sampler, steps=steps, noise=noise, labels=y), repeats=3,
                    warmup=1)
    dest = Path(out) if out is not None else p / "samples" / f"sample_{model}_{steps}_steps.png"
    image = len(meta["input_shape"]) == 3
    sample_grid_png(x, y, dest, class_names=meta.get("class_names"), image=image, title=f"{model}, {steps} steps",
                    per_class=max(1, -(-n // num_classes)))
    return {"out": str(dest), "model": model, "sampler": sampler, "steps": steps, "n": n,
            "ms_per_sample": ms / n}


def cache(recipe: str | Path | dict, *, output: str | Path | None = None, overrides: Sequence[str] = (),
          progress: bool = True, nproc: int = 1) -> dict[str, Any]:
    """Run an ``llm`` recipe's teacher once over its training data and store the top-k targets (sharded
    safetensors + manifest) in ``output`` (default: the recipe's ``cache.dir``). Resumable: run it again
    after an interruption. Train from it with ``cache.dir=<output>``. ``nproc > 1`` runs the teacher in that many
    processes under ``torchrun`` (one GPU each where there are GPUs), each writing its own shards; the cache equals
    a one-process cache byte for byte."""
    from .tasks.llm import write_cache

    cfg = load_config(recipe, overrides)
    if getattr(cfg, "task", None) != "llm":
        raise KDistillError(f"cache: recipe task is {getattr(cfg, 'task', None)!r}; expected an 'llm' recipe "
                            "(top-k caches are for language-model teachers).")
    if not (isinstance(nproc, int) and nproc >= 1):
        raise KDistillError(f"cache: got nproc {nproc!r}, expected an integer >= 1 (processes to run the teacher in).")
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        if not isinstance(recipe, (str, Path)):
            raise KDistillError("cache(nproc > 1) needs a recipe path or name, not a dict (it relaunches the CLI).")
        out = output if output is not None else getattr(cfg.cache, "dir", None)
        if out is None:
            raise KDistillError("cache: the recipe has no `cache:` section and no --output was given; expected one "
                                "of them to name the cache directory.")
        _torchrun(["cache", str(recipe), "--output", str(out), *([] if progress else ["--no-progress"]),
                   *overrides], nproc, "cache", "(it resumes where it stopped)")
        root = Path(out)
    else:
        root = write_cache(cfg, Path(output) if output is not None else None, progress=progress)
    from .teachers.cache import TopKCache

    c = TopKCache(root)
    return {"cache": str(root), "sequences": len(c), "tokens": c.tokens(), "bytes": c.bytes_on_disk(),
            "bytes_per_token": c.bytes_per_token(), "mode": c.mode, "k": c.k, "kd_temperature": c.kd_temperature}


def select(recipe: str | Path | dict, *, output: str | Path, overrides: Sequence[str] = (),
           progress: bool = True) -> dict[str, Any]:
    """Choose the training subset of a recipe's ``data.selection`` (without one: the task's default strategy --
    MiniPLM for llm recipes, PCoreSet for classification, RAD for black-box ones -- at 50%) and write it to
    ``output``: ``subset.jsonl`` (every pool example's index, score, whether it was kept) and ``selection.json``.
    A recipe reuses it with ``data.selection.subset=<output>``. Supported tasks: classification, llm, blackbox."""
    cfg = load_config(recipe, overrides)
    run = _task_hook(cfg, "select", "data selection")
    with quiet_hub_progress(not progress):
        return run(cfg, Path(output), progress)


def _task_hook(cfg: Any, hook: str, what: str) -> Any:
    """The recipe's task's ``hook`` (``Task.select`` / ``Task.design``), or one error naming the tasks that have it."""
    task = TASKS.get(getattr(cfg, "task", "classification"))
    fn = getattr(task, hook)
    if fn is None:
        able = [n for n, t in TASKS.items() if getattr(t, hook) is not None]
        raise KDistillError(f"{hook}: the recipe's task is {task.name!r}, which has no {what}; expected a recipe of "
                            f"one of: {', '.join(able)}.")
    return fn


def design(recipe: str | Path | dict, *, output: str | Path, budget: str | None = None, capacity_gap: bool = False,
           overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Size and shape the student before distilling (docs/data_and_students.md): the candidates of the recipe's
    ``design.space`` within ``budget`` (``"params=N"``, ``"latency_ms=X"`` or both, comma-separated; ``None``: no
    limit), ranked without training (DisWOT), the best few distilled briefly with the recipe's method; writes
    ``design.json`` (every candidate's params, FLOPs, latency, scores), ``pareto.png`` and ``recipe.yaml`` (the
    recipe with the chosen student) to ``output``. ``capacity_gap``: every candidate is distilled and trained alone,
    and ``capacity_gap.png`` shows where distillation helps most. Supported tasks: classification, llm."""
    from .students.design import parse_budget

    limits = parse_budget(budget)  # a malformed budget fails before anything loads
    cfg = load_config(recipe, overrides)
    run = _task_hook(cfg, "design", "student search")
    with quiet_hub_progress(not progress):
        return run(cfg, Path(output), budget=limits, capacity_gap=capacity_gap, progress=progress)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_tokens_limit: int = 512, max_prompt_tokens: int = 2048, max_request_bytes: int = 1_000_000,
          max_batch_size: int = 8, threads: int | None = None) -> None:
    """Serve a local causal LM (zoo name such as ``smollm2-135m`` or a saved model folder) over an
    OpenAI-compatible HTTP API (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``). Blocks.

    Every option (``port`` 1..65535, the ``max_*`` limits and ``threads`` >= 1, ``api_key_env`` a variable
    name) is checked, and the port bound, before the model loads; a bad one raises ``KDistillError``."""
    from .teachers.serve import serve as _serve

    _serve(model, host=host, port=port, api_key_env=api_key_env, max_tokens_limit=max_tokens_limit,
           max_prompt_tokens=max_prompt_tokens, max_request_bytes=max_request_bytes, max_batch_size=max_batch_size,
           threads=threads)


def _doc(obj: Any) -> str:
    """The summary paragraph of ``obj``'s docstring (up to the first blank line) on one line; '' if none."""
    doc = (inspect.getdoc(obj) or "").strip()
    return " ".join(doc.split("\n\n", 1)[0].split()).replace("``", "`")


def list_methods() -> list[str]:
    from . import methods  # noqa: F401

    return METHODS.names()


def list_all() -> dict[str, dict[str, str]]:
    """Everything registered: methods, loop-level augmentations, models, datasets, tasks and built-in recipes
    (name -> description on one line: a docstring's summary paragraph, a task's or a recipe's ``description``)."""
    import yaml

    from . import data, methods, tasks  # noqa: F401  (importing registers every entry)
    from .data import selection  # noqa: F401  (the selection methods)
    from .recipes import find_recipe
    from .registry import AUGMENTS

    def recipe_description(name: str) -> str:
        try:
            spec = yaml.safe_load(find_recipe(name).read_text())
        except (OSError, yaml.YAMLError) as e:
            return f"(unreadable: {type(e).__name__})"
        return " ".join(str(spec.get("description", "")).split()) if isinstance(spec, dict) else ""

    return {
        "methods": {n: _doc(c) for n, c in METHODS.items()},
        "augmentations": {n: _doc(c) for n, c in AUGMENTS.items()},
        "models": {n: _doc(c) for n, c in MODELS.items()},
        "datasets": {n: _doc(c) for n, c in DATASETS.items()},
        "tasks": {n: t.description for n, t in TASKS.items()},
        "selection methods": {n: _doc(f) for n, f in SELECTORS.items()},
        "recipes": {n: recipe_description(n) for n in list_recipes()},
    }
