"""The public API. Each CLI subcommand calls exactly one of these functions with the same arguments."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import load_config
from .errors import KDistillError
from .recipes import list_recipes
from .registry import DATASETS, METHODS, MODELS, TASKS


def _print_summary(report: dict[str, Any], output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from .eval.report import comparison_rows, verdicts

    if report.get("task") != "classification":
        Console().print(f"report written to {output / 'report.json'}")
        return
    rows = comparison_rows(report)
    table = Table(title=f"kdistill: {report['recipe']} (seed {report['seed']}, {report['wall_seconds']:.0f} s)")
    for col in ("model", "test acc", "params", f"ms/batch of {report.get('latency_batch_size', '')}",
                "compression", "speed-up", "vs baseline"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        g = r["gain_vs_baseline"]
        table.add_row(r["name"], f"{r['accuracy']:.4f}", f"{r['params']:,}", f"{r['latency_ms']:.3f}",
                      f"{r['compression']:.1f}x", f"{r['speedup']:.1f}x", "" if g != g else f"{g * 100:+.1f} pts")
    console = Console(width=max(110, Console().width))
    console.print(table)
    for v in verdicts(rows):
        console.print(f"  - {v}")
    console.print(f"report: {output / 'report.json'}, {output / 'report.md'}, {output / 'curves.png'}")


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
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(recipe, out, overrides, resume, nproc)
    from .tasks.base import RunContext

    task = TASKS.get(getattr(cfg, "task", "classification"))
    report = task.run(cfg, RunContext(output=out, resume=resume, progress=progress))
    if not quiet and int(os.environ.get("RANK", "0")) == 0:
        _print_summary(report, out)
    return report


def _launch(recipe: Any, out: Path, overrides: Sequence[str], resume: bool, nproc: int) -> dict[str, Any]:
    if not isinstance(recipe, (str, Path, type(None))):
        raise KDistillError("run(nproc > 1) needs a recipe path or name, not a dict (it relaunches the CLI).")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "kdistill.cli", "run"]
    cmd += ([str(recipe)] if recipe is not None else []) + ["--output", str(out)] + (["--resume"] if resume else [])
    cmd += list(overrides)
    subprocess.run(cmd, check=True)
    return json.loads((out / "report.json").read_text())


def evaluate(checkpoint: str | Path) -> dict[str, Any]:
    """Evaluate a saved classifier (a model folder such as ``<run>/student``, or a run folder) on the test
    split of the data it was trained on."""
    from .data.classification import load_dataset
    from .eval.metrics import agreement, classification_metrics
    from .exporters.classifier import load_classifier, read_meta
    from .models.classifiers import predict_logits

    p = Path(checkpoint)
    if (p / "student" / "model.json").is_file():
        p = p / "student"
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


def cache(recipe: str | Path | dict, *, output: str | Path | None = None, overrides: Sequence[str] = (),
          progress: bool = True) -> dict[str, Any]:
    """Run an ``llm`` recipe's teacher once over its training data and store the top-k targets (sharded
    safetensors + manifest) in ``output`` (default: the recipe's ``cache.dir``). Resumable: run it again
    after an interruption. Train from it with ``cache.dir=<output>``."""
    from .tasks.llm import write_cache

    cfg = load_config(recipe, overrides)
    if getattr(cfg, "task", None) != "llm":
        raise KDistillError(f"cache: recipe task is {getattr(cfg, 'task', None)!r}; expected an 'llm' recipe "
                            "(top-k caches are for language-model teachers).")
    root = write_cache(cfg, Path(output) if output is not None else None, progress=progress)
    from .teachers.cache import TopKCache

    c = TopKCache(root)
    return {"cache": str(root), "sequences": len(c), "tokens": c.tokens(), "bytes": c.bytes_on_disk(),
            "bytes_per_token": c.bytes_on_disk() / max(1, c.tokens()), "k": c.k, "kd_temperature": c.kd_temperature}


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_tokens_limit: int = 512, max_prompt_tokens: int = 2048, max_request_bytes: int = 1_000_000,
          max_batch_size: int = 8, threads: int | None = None) -> None:
    """Serve a local causal LM (zoo name such as ``smollm2-135m`` or a saved model folder) over an
    OpenAI-compatible HTTP API (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``). Blocks."""
    from .teachers.serve import serve as _serve

    _serve(model, host=host, port=port, api_key_env=api_key_env, max_tokens_limit=max_tokens_limit,
           max_prompt_tokens=max_prompt_tokens, max_request_bytes=max_request_bytes, max_batch_size=max_batch_size,
           threads=threads)


def _doc(obj: Any) -> str:
    return (inspect.getdoc(obj) or "").strip().splitlines()[0] if inspect.getdoc(obj) else ""


def list_methods() -> list[str]:
    from . import methods  # noqa: F401

    return METHODS.names()


def list_all() -> dict[str, dict[str, str]]:
    """Everything registered: methods, models, datasets, tasks, recipes (name -> one-line description)."""
    from . import methods, tasks  # noqa: F401
    from .data import augment, classification  # noqa: F401

    return {
        "methods": {n: _doc(c) for n, c in METHODS.items()},
        "models": {n: _doc(c) for n, c in MODELS.items()},
        "datasets": {n: _doc(c) for n, c in DATASETS.items()},
        "tasks": {n: t.description for n, t in TASKS.items()},
        "recipes": {n: "" for n in list_recipes()},
    }
