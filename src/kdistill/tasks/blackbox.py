"""Task ``blackbox``: distil from a teacher reachable only through an OpenAI-compatible API.

Pipelines (``pipeline:``): ``label`` (TAIL-style labelling + student classifier), ``performance_guided``
(PGKD rounds on top of ``label``), ``rationales`` (Distilling Step-by-Step, a tiny LM student) and
``generate_and_filter`` (Symbolic KD). ``data``: your texts (``files`` or ``hf_dataset``, ``text_column``,
``label_names``, optional gold ``label_column``) or the built-in ``wordnet_supersense``. Every teacher answer
is kept in ``<output>/responses.sqlite`` (or ``teacher.store``), so re-running a killed job re-sends nothing
already answered.
``teacher.launch: true`` starts ``kdistill serve <teacher.model>`` in-process on a free loopback port.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from ..blackbox.data import TextData, check_label_names, text_files, wordnet_supersense
from ..blackbox.label import LABEL_INSTRUCTION
from ..blackbox.rationales import RationaleStudent
from ..config import DEFAULT_SELECTORS, FileSource, SelectionSpec, StrictModel, check_kwargs
from ..errors import KDistillError
from ..registry import TASKS
from .base import RunContext, Task

DATA_LOADERS = {"wordnet_supersense": wordnet_supersense}
#: pipelines that cannot run without gold labels, and why
NEEDS_GOLD = {"performance_guided": "every round picks the classes the student gets wrong on the labelled "
                                    "validation split"}


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


#: the fields of your own data (``data: {files: ..., label_names: [...]}``), the keyword arguments of ``text_files``
_FILE_FIELDS = ("files", "format", "hf_dataset", "text_column", "label_names", "label_column",
                "validation_fraction", "test_fraction", "data_seed")


class DataSpec(FileSource):
    """``wordnet_supersense`` (built in, with ``kwargs``), or your own texts: ``files`` (a path, a glob, a list or
    ``{train, validation, test}``) or ``hf_dataset``, a ``text_column``, the ``label_names`` the teacher chooses
    from and optionally a ``label_column`` of gold labels (strings among ``label_names``), used only to evaluate.
    Held-out splits not given as files are cut from the rows (``validation_fraction``, ``test_fraction``,
    seeded by ``data_seed``); without gold labels no validation split is cut and the teacher also labels the test
    split, which the student is then compared with (``teacher_agreement``)."""

    name: Literal["wordnet_supersense", "files"] = "wordnet_supersense"
    kwargs: dict[str, Any] = {}
    text_column: str = "text"
    label_names: list[str] | None = None
    label_column: str | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    data_seed: int = 0
    selection: SelectionSpec | None = None

    @field_validator("label_names")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        try:
            return check_label_names(v)
        except KDistillError as e:  # the config layer names the field and the value already
            raise ValueError(str(e).removeprefix(f"data.label_names: got {v!r}, ").removeprefix("data.label_names: ")) \
                from None

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.name == "files":
            if self.kwargs:
                raise ValueError(f"data.kwargs {self.kwargs} are for the built-in wordnet_supersense; your own data "
                                 f"takes its fields directly under data ({', '.join(_FILE_FIELDS)}). Move them up "
                                 "or remove data.kwargs")
            if self.label_names is None:
                raise ValueError("your own data needs data.label_names, the categories the teacher chooses from "
                                 "(e.g. label_names: [positive, negative]); add them")
            for name, frac in (("validation_fraction", self.validation_fraction),
                               ("test_fraction", self.test_fraction)):
                if not 0.0 <= frac < 0.5:
                    raise ValueError(f"data.{name} must be in [0, 0.5) (got {frac!r})")
            return self
        own = sorted(f for f in self.model_fields_set if f in _FILE_FIELDS)
        if own:
            raise ValueError(f"data.name 'wordnet_supersense' is the built-in data set; {', '.join(own)} describe "
                             "your own data. Remove data.name (a data section with files or hf_dataset reads your "
                             "files) or remove those fields")
        check_kwargs("dataset", self.name, DATA_LOADERS[self.name], self.kwargs)
        return self

    def has_gold(self) -> bool:
        return self.name != "files" or self.label_column is not None

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`kdistill.blackbox.data.text_files` (your own data)."""
        return {f: getattr(self, f) for f in _FILE_FIELDS}


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


def _check_instruction(v: str | None, needed: tuple[str, ...]) -> str | None:
    missing = [p for p in needed if "{" + p + "}" not in (v or "{" + p + "}")]
    if missing:
        raise ValueError(f"the instruction must contain the placeholder(s) {', '.join('{' + p + '}' for p in missing)}")
    return v


class PerformanceGuidedSpec(StrictModel):
    """``instruction``: the request for new examples of a class (placeholders ``{labels}``, ``{label}``,
    ``{examples}``, ``{n}``); None = a request for dictionary entries on the built-in data, for texts in the
    style of the misclassified ones on yours."""

    rounds: int = 2
    patience: int = 1
    classes_per_round: int = 3
    examples_shown: int = 3
    new_per_request: int = 4
    requests_per_class: int = 2
    max_tokens: int = 160
    temperature: float = 0.7
    instruction: str | None = None

    @field_validator("instruction")
    @classmethod
    def _fields(cls, v: str | None) -> str | None:
        return _check_instruction(v, ("label", "n"))


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
    """``instruction``: the request for one example of a class (placeholders ``{label}``, ``{labels}``,
    ``{examples}`` = the first ``examples_shown`` training texts); None = a dictionary entry on the built-in
    data, a text in the style of the shown training texts on yours."""

    per_class: int = 20
    critic: Literal["teacher", "none"] = "teacher"
    min_confidence: float = 0.0
    max_tokens: int = 48
    temperature: float = 1.0
    examples_shown: int = 3
    instruction: str | None = None

    @field_validator("instruction")
    @classmethod
    def _fields(cls, v: str | None) -> str | None:
        return _check_instruction(v, ("label",))


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

    @model_validator(mode="after")
    def _gold_labels(self) -> BlackboxConfig:
        if self.pipeline in NEEDS_GOLD and not self.data.has_gold():
            raise ValueError(f"pipeline {self.pipeline!r} needs gold labels ({NEEDS_GOLD[self.pipeline]}), and data "
                             "has no label_column. Fix: set data.label_column to a column of gold labels (strings "
                             "among data.label_names), or use pipeline label, rationales or generate_and_filter, "
                             "which work without gold labels")
        return self


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


#: the ``teacher`` fields that are keyword arguments of :class:`kdistill.teachers.api.APITeacher`
_CLIENT_FIELDS = {"api_key_env", "concurrency", "timeout", "max_retries", "max_requests", "max_tokens_budget"}


def run_pipeline(pipeline: str, data: TextData, teacher: Any, *, seed: int = 0,
                 label_kwargs: dict[str, Any] | None = None, targets: str = "soft", variants: bool = True,
                 student_kwargs: dict[str, Any] | None = None,
                 pipeline_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one black-box ``pipeline`` on ``data`` with an :class:`~kdistill.teachers.api.APITeacher`.
    ``label_kwargs`` go to :func:`~kdistill.blackbox.label.label` (every pipeline that labels texts),
    ``student_kwargs`` to the TF-IDF student, ``pipeline_kwargs`` to the pipeline's own function. Data without
    gold labels first gets the teacher's labels of its test split as the reference (``teacher_agreement``)."""
    from ..blackbox.generate_and_filter import generate_and_filter
    from ..blackbox.label import run_label_pipeline, teacher_reference
    from ..blackbox.performance_guided import performance_guided
    from ..blackbox.rationales import rationales

    label_kwargs, student_kwargs = dict(label_kwargs or {}), dict(student_kwargs or {})
    extra = dict(pipeline_kwargs or {})
    if pipeline in NEEDS_GOLD and not data.has_gold:
        raise KDistillError(f"pipeline {pipeline!r}: got data without gold labels, expected gold labels "
                            f"({NEEDS_GOLD[pipeline]}). Fix: set data.label_column, or use another pipeline.")
    data = teacher_reference(data, teacher, label_kwargs=label_kwargs, seed=seed)
    if pipeline == "label":
        frag = run_label_pipeline(data, teacher, label_kwargs=label_kwargs, student_kwargs=student_kwargs,
                                  targets=targets, variants=variants, seed=seed)
        frag.pop("label_result")
    elif pipeline == "performance_guided":
        first = run_label_pipeline(data, teacher, label_kwargs=label_kwargs, student_kwargs=student_kwargs,
                                   targets=targets, variants=False, baseline=True, seed=seed)
        keep, init_targets = first["label_result"].targets(len(data.class_names), targets)
        frag = performance_guided(data, teacher, init_texts=[data.train_texts[i] for i in keep],
                                  init_targets=init_targets, student_kwargs=student_kwargs, seed=seed, **extra)
        frag["teacher"]["metrics"] = first["teacher"]["metrics"]
        frag["teacher"]["label_counts"] = first["teacher"]["counts"]
        frag["baseline"] = first.get("baseline", {})
        frag["variants"] = {"label_only": {"metrics": first["student"]["metrics"]}}
    elif pipeline == "rationales":
        frag = rationales(data, teacher, seed=seed, **extra)
    elif pipeline == "generate_and_filter":
        frag = generate_and_filter(data, teacher, label_kwargs=label_kwargs, student_kwargs=student_kwargs,
                                   seed=seed, **extra)
    else:
        raise KDistillError(f"pipeline: got {pipeline!r}, expected one of label, performance_guided, rationales, "
                            "generate_and_filter.")
    frag.setdefault("teacher", {})["cost"] = teacher.cost()
    frag["data"] = data.summary()
    return frag


def run_blackbox(cfg: BlackboxConfig, ctx: RunContext) -> dict[str, Any]:
    from ..blackbox import generate_and_filter as gf
    from ..blackbox import performance_guided as pg

    t0 = time.monotonic()
    out = Path(ctx.output)
    out.mkdir(parents=True, exist_ok=True)
    data = _data(cfg)  # the data first: a mistake in your files fails before a teacher loads or a request is sent
    # the pipeline's own keyword arguments: its section, with the default request for this kind of data
    builtin = cfg.data.name != "files"
    spg, sgf, sr = cfg.performance_guided, cfg.generate_and_filter, cfg.rationales
    pipeline_kwargs = {
        "label": {},
        "performance_guided": {**spg.model_dump(exclude={"instruction"}), "instruction": spg.instruction or (
            pg.HARD_EXAMPLE_INSTRUCTION if builtin else pg.TEXT_HARD_EXAMPLE_INSTRUCTION)},
        "generate_and_filter": {**sgf.model_dump(exclude={"instruction"}), "instruction": sgf.instruction or (
            gf.GENERATE_INSTRUCTION if builtin else gf.TEXT_GENERATE_INSTRUCTION)},
        "rationales": {"max_tokens": sr.max_tokens, "temperature": sr.temperature, "student_kwargs": sr.student,
                       "label_only_baseline": sr.label_only_baseline},
    }[cfg.pipeline]
    tc = cfg.teacher
    selection = None
    with _teacher_client(cfg, out) as (teacher, store, handle):
        if cfg.data.selection is not None:  # query only the chosen training texts (budget: teacher.max_requests)
            selection, _ = _select(cfg, cfg.data.selection, data, teacher)
            data = replace(data, train_texts=[data.train_texts[i] for i in selection.indices.tolist()],
                           train_labels=None if data.train_labels is None
                           else [data.train_labels[i] for i in selection.indices.tolist()])
        frag = run_pipeline(cfg.pipeline, data, teacher, seed=cfg.seed,
                            label_kwargs=cfg.label.model_dump(exclude={"targets", "variants"}),
                            targets=cfg.label.targets, variants=cfg.label.variants,
                            student_kwargs=cfg.student.model_dump(),
                            pipeline_kwargs=pipeline_kwargs)
        frag["teacher"]["store"] = store.stats()
    if selection is not None:
        frag["selection"] = selection.summary()
    params = handle.app.state.num_params if handle is not None else None  # unknown behind a remote API
    report = {"recipe": cfg.name, "task": "blackbox", "method": cfg.pipeline, "seed": cfg.seed,
              "teacher": {"model": tc.model, "params": params, **frag.pop("teacher", {})},
              "student": frag.pop("student", {}), "wall_seconds": time.monotonic() - t0, **frag}
    report = _json_safe(report)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    return report


def _data(cfg: BlackboxConfig) -> TextData:
    if cfg.data.name == "files":
        return text_files(**cfg.data.loader_kwargs())
    return DATA_LOADERS[cfg.data.name](**{"data_seed": cfg.seed, **cfg.data.kwargs})


@contextmanager
def _teacher_client(cfg: BlackboxConfig, out: Path) -> Iterator[tuple[Any, Any, Any]]:
    """``(APITeacher, its response store, the launched server or None)``, checked by a preflight request; a server
    started for ``teacher.launch`` stops when the block ends."""
    from ..teachers.api import APITeacher
    from ..teachers.store import ResponseStore

    tc = cfg.teacher
    handle = None
    base_url, model_name = tc.base_url, tc.model
    try:
        if tc.launch:
            from ..teachers.serve import serve

            handle = serve(tc.model, host="127.0.0.1", port=0, api_key_env=tc.api_key_env,
                           max_batch_size=tc.serve_max_batch_size, threads=tc.serve_threads, background=True)
            base_url, model_name = handle.base_url, handle.model_name
        store = ResponseStore(tc.store or out / "responses.sqlite")
        teacher = APITeacher(base_url, model_name, store=store, **tc.model_dump(include=_CLIENT_FIELDS))
        teacher.preflight()  # missing key / unreachable endpoint / unknown model: one clear error, no work done
        yield teacher, store, handle
    finally:
        if handle is not None:
            handle.stop()


def _select(cfg: BlackboxConfig, spec: SelectionSpec, data: TextData, teacher: Any) -> tuple[Any, str]:
    """The training texts to query, and the pool's fingerprint. The budget is ``spec.budget``, else
    ``teacher.max_requests`` when set (unless a fraction is given), else the fraction."""
    from ..data.selection import pool_fingerprint, select_training_subset
    from ..train.selection import text_inputs

    n = len(data.train_texts)
    kwargs = spec.entry_kwargs()
    if kwargs["budget"] is None and cfg.teacher.max_requests and "fraction" not in spec.model_fields_set:
        kwargs.update(budget=min(cfg.teacher.max_requests, n), fraction=None)
    inputs = text_inputs(texts=data.train_texts, class_names=data.class_names, teacher=teacher,
                         label_kwargs=cfg.label.model_dump(exclude={"targets", "variants"}),
                         student_kwargs=cfg.student.model_dump(), seed=cfg.seed)
    pool = pool_fingerprint(data.train_texts)
    return select_training_subset(**kwargs, n=n, seed=cfg.seed, pool=pool, **inputs), pool


def select_blackbox(cfg: BlackboxConfig, output: Path, progress: bool = True) -> dict[str, Any]:
    """``kdistill select`` for a black-box recipe: the texts to send to the teacher (default: Robust Active
    Distillation, budget ``teacher.max_requests`` or 50%), written to ``output``. The seed queries' answers stay in
    the response store (``teacher.store``, default ``output/responses.sqlite``): point the run's ``teacher.store``
    there and they are not sent again."""
    from ..data.selection import write_subset

    output.mkdir(parents=True, exist_ok=True)
    data = _data(cfg)
    spec = cfg.data.selection or SelectionSpec(method=DEFAULT_SELECTORS["blackbox"])
    with _teacher_client(cfg, output) as (teacher, store, _):
        selection, pool = _select(cfg, spec, data, teacher)
        cost = teacher.cost()
    write_subset(output, selection, pool=pool, describe=lambda i: data.train_texts[i][:80])
    return {"output": str(output), "teacher_cost": cost, **selection.summary()}


TASKS.register("blackbox")(Task("blackbox", BlackboxConfig, run_blackbox,
                                "API teacher (OpenAI-compatible) -> labels / rationales / synthetic data -> student",
                                select=select_blackbox))
