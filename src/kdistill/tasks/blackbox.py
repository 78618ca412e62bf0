"""Task ``blackbox``: distil from a teacher reachable only through an OpenAI-compatible API.

Pipelines (``pipeline:``): ``label`` (TAIL-style labelling + student classifier), ``performance_guided``
(PGKD rounds on top of ``label``), ``rationales`` (Distilling Step-by-Step, a tiny LM student) and
``generate_and_filter`` (Symbolic KD). Every teacher answer is kept in ``<output>/responses.sqlite``
(or ``teacher.store``), so re-running a killed job re-sends nothing already answered.
``teacher.launch: true`` starts ``kdistill serve <teacher.model>`` in-process on a free loopback port.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from ..blackbox.data import wordnet_supersense
from ..blackbox.label import LABEL_INSTRUCTION
from ..blackbox.rationales import RationaleStudent
from ..config import StrictModel, check_kwargs
from ..errors import KDistillError
from ..registry import TASKS
from .base import RunContext, Task

DATA_LOADERS = {"wordnet_supersense": wordnet_supersense}


class TeacherSpec(StrictModel):
    """Where the teacher is. The API key is read from the environment variable ``api_key_env``."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str
    api_key_env: str | None = None
    launch: bool = False
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 4
    max_requests: int | None = None
    max_tokens_budget: int | None = None
    store: str | None = None
    serve_max_batch_size: int = 8
    serve_threads: int | None = None

    @field_validator("api_key_env")
    @classmethod
    def _not_a_key(cls, v: str | None) -> str | None:
        from ..teachers.api import check_api_key_env  # the one rule for what may be given as a variable name

        try:
            return check_api_key_env(v, "api_key_env")
        except KDistillError as e:  # the config layer prefixes the field name already
            raise ValueError(str(e).removeprefix("api_key_env: ")) from None

    @field_validator("concurrency")
    @classmethod
    def _conc(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (got {v})")
        return v


class DataSpec(StrictModel):
    name: Literal["wordnet_supersense"] = "wordnet_supersense"
    kwargs: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        check_kwargs("dataset", self.name, DATA_LOADERS[self.name], self.kwargs)
        return self


class LabelSpec(StrictModel):
    endpoint: Literal["chat", "completions"] = "chat"
    instruction: str = LABEL_INSTRUCTION
    max_tokens: int = 6
    temperature: float = 0.0
    top_logprobs: int = 10
    use_logprobs: bool = True
    min_label_mass: float = 0.1
    targets: Literal["soft", "argmax", "parsed"] = "soft"
    variants: bool = True
    extra: dict[str, Any] = {}

    @field_validator("instruction")
    @classmethod
    def _fields(cls, v: str) -> str:
        if "{text}" not in v or "{labels}" not in v:
            raise ValueError("the instruction must contain the placeholders {text} and {labels}")
        return v


class StudentSpec(StrictModel):
    """The TF-IDF + MLP text classifier (``blackbox.student.TextStudent``)."""

    max_features: int = 4000
    width: int = 64
    depth: int = 1
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64


class PerformanceGuidedSpec(StrictModel):
    rounds: int = 2
    patience: int = 1
    classes_per_round: int = 3
    examples_shown: int = 3
    new_per_request: int = 4
    requests_per_class: int = 2
    max_tokens: int = 160
    temperature: float = 0.7


class RationalesSpec(StrictModel):
    max_tokens: int = 48
    temperature: float = 0.0
    label_only_baseline: bool = True
    student: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> RationalesSpec:
        check_kwargs("rationale student", "tiny_llama", RationaleStudent.__init__, self.student,
                     provided=("class_names",))
        return self


class GenerateAndFilterSpec(StrictModel):
    per_class: int = 20
    critic: Literal["teacher", "none"] = "teacher"
    min_confidence: float = 0.0
    max_tokens: int = 48
    temperature: float = 1.0


class BlackboxConfig(StrictModel):
    task: Literal["blackbox"] = "blackbox"
    name: str = "blackbox"
    description: str = ""
    seed: int = 0
    pipeline: Literal["label", "performance_guided", "rationales", "generate_and_filter"] = "label"
    teacher: TeacherSpec
    data: DataSpec = DataSpec()
    label: LabelSpec = LabelSpec()
    student: StudentSpec = StudentSpec()
    performance_guided: PerformanceGuidedSpec = PerformanceGuidedSpec()
    rationales: RationalesSpec = RationalesSpec()
    generate_and_filter: GenerateAndFilterSpec = GenerateAndFilterSpec()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def run_pipeline(cfg: BlackboxConfig, output: Path, *, base_url: str | None = None,
                 model_name: str | None = None) -> dict[str, Any]:
    """Run ``cfg.pipeline`` against the teacher (``base_url`` / ``model_name`` override the recipe's, e.g.
    for a server launched in-process)."""
    from ..blackbox.generate_and_filter import generate_and_filter
    from ..blackbox.label import run_label_pipeline
    from ..blackbox.performance_guided import performance_guided
    from ..blackbox.rationales import rationales
    from ..teachers.api import APITeacher
    from ..teachers.store import ResponseStore

    tc = cfg.teacher
    store = ResponseStore(tc.store or output / "responses.sqlite")
    teacher = APITeacher(base_url or tc.base_url, model_name or tc.model, api_key_env=tc.api_key_env, store=store,
                         concurrency=tc.concurrency, timeout=tc.timeout, max_retries=tc.max_retries,
                         max_requests=tc.max_requests, max_tokens_budget=tc.max_tokens_budget)
    teacher.preflight()  # missing key / unreachable endpoint / unknown model: one clear error, no work done
    data = DATA_LOADERS[cfg.data.name](data_seed=cfg.seed, **cfg.data.kwargs) \
        if "data_seed" not in cfg.data.kwargs else DATA_LOADERS[cfg.data.name](**cfg.data.kwargs)
    label_kwargs = cfg.label.model_dump(exclude={"targets", "variants"})
    student_kwargs = cfg.student.model_dump()
    p = cfg.pipeline
    if p == "label":
        frag = run_label_pipeline(data, teacher, label_kwargs=label_kwargs, student_kwargs=student_kwargs,
                                  targets=cfg.label.targets, variants=cfg.label.variants, seed=cfg.seed)
        frag.pop("label_result")
    elif p == "performance_guided":
        first = run_label_pipeline(data, teacher, label_kwargs=label_kwargs, student_kwargs=student_kwargs,
                                   targets=cfg.label.targets, variants=False, baseline=True, seed=cfg.seed)
        keep, targets = first["label_result"].targets(len(data.class_names), cfg.label.targets)
        frag = performance_guided(data, teacher, init_texts=[data.train_texts[i] for i in keep],
                                  init_targets=targets, student_kwargs=student_kwargs, seed=cfg.seed,
                                  **cfg.performance_guided.model_dump())
        frag["teacher"]["metrics"] = first["teacher"]["metrics"]
        frag["teacher"]["label_counts"] = first["teacher"]["counts"]
        frag["baseline"] = first.get("baseline", {})
        frag["variants"] = {"label_only": {"metrics": first["student"]["metrics"]}}
    elif p == "rationales":
        r = cfg.rationales
        frag = rationales(data, teacher, max_tokens=r.max_tokens, temperature=r.temperature,
                          student_kwargs=r.student, label_only_baseline=r.label_only_baseline, seed=cfg.seed)
    else:
        frag = generate_and_filter(data, teacher, label_kwargs=label_kwargs, student_kwargs=student_kwargs,
                                   seed=cfg.seed, **cfg.generate_and_filter.model_dump())
    frag.setdefault("teacher", {})["cost"] = teacher.cost()
    frag["teacher"]["store"] = store.stats()
    frag["data"] = data.summary()
    return frag


def run_blackbox(cfg: BlackboxConfig, ctx: RunContext) -> dict[str, Any]:
    t0 = time.monotonic()
    out = Path(ctx.output)
    out.mkdir(parents=True, exist_ok=True)
    handle = None
    base_url = model_name = None
    try:
        if cfg.teacher.launch:
            from ..teachers.serve import serve

            handle = serve(cfg.teacher.model, host="127.0.0.1", port=0, api_key_env=cfg.teacher.api_key_env,
                           max_batch_size=cfg.teacher.serve_max_batch_size, threads=cfg.teacher.serve_threads,
                           background=True)
            base_url, model_name = handle.base_url, handle.model_name
        frag = run_pipeline(cfg, out, base_url=base_url, model_name=model_name)
    finally:
        if handle is not None:
            handle.stop()
    params = handle.app.state.num_params if handle is not None else None  # unknown behind a remote API
    report = {"recipe": cfg.name, "task": "blackbox", "method": cfg.pipeline, "seed": cfg.seed,
              "teacher": {"model": cfg.teacher.model, "params": params, **frag.pop("teacher", {})},
              "student": frag.pop("student", {}), "wall_seconds": time.monotonic() - t0, **frag}
    report = _json_safe(report)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    return report


TASKS.register("blackbox")(Task("blackbox", BlackboxConfig, run_blackbox,
                                "API teacher (OpenAI-compatible) -> labels / rationales / synthetic data -> student"))
