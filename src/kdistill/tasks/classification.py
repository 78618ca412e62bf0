"""Task ``classification``: a teacher classifier distilled into a student, compared with the same
student trained alone (the baseline) and with other distilled variants, on one data split."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator

from .. import __version__
from ..config import (
    ALONE,
    DEFAULT_METHODS,
    DEFAULT_SELECTORS,
    AugmentSpec,
    DesignSpec,
    MethodSpec,
    NamedSpec,
    SelectionSpec,
    StrictModel,
    TrainSpec,
    check_kwargs,
)
from ..data.augment import build_augment
from ..data.classification import ClassificationData, load_dataset
from ..data.selection import Selection, pool_fingerprint, select_training_subset, write_subset
from ..errors import KDistillError, close_matches
from ..eval.metrics import agreement, classification_metrics, model_flops, model_latency_ms
from ..eval.report import write_report
from ..exporters.classifier import load_classifier, save_classifier
from ..io import cache_root, load_state_dict, publish_dir, seed_everything, write_json_atomic
from ..models.classifiers import count_params, predict_logits
from ..registry import DATASETS, MODELS, TASKS
from ..train.classifier import train_classifier
from ..train.loop import make_accelerator
from .base import RunContext, Task

#: the fields of your own data (``data: {files: ..., label_column: ...}``), read by the ``files`` dataset
_FILE_FIELDS = ("files", "hf_dataset", "format", "label_column", "feature_columns", "text_column", "tokenizer",
                "max_length", "validation_fraction", "test_fraction", "data_seed", "standardise", "image_column",
                "label_files", "image_layout", "image_scale", "domain_column")


class DataSpec(NamedSpec):
    """A dataset from ``DATASETS`` (``kdistill list``) and its keyword arguments, or your own table:
    ``{files: ..., label_column: ..., feature_columns: [...]}`` (or ``hf_dataset: {path: ...}``), which is the
    ``files`` dataset with those keyword arguments."""

    @model_validator(mode="before")
    @classmethod
    def _own_data(cls, v: Any) -> Any:
        if isinstance(v, dict) and ("files" in v or "hf_dataset" in v) and "name" not in v:
            rest = {k: x for k, x in v.items() if k not in _FILE_FIELDS}
            for key in rest:
                if key != "kwargs" and key not in cls.model_fields:
                    near = close_matches(str(key), _FILE_FIELDS)
                    raise ValueError(f"data.{key}: unknown field of your own data."
                                     + (f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else "")
                                     + f" Expected some of: {', '.join(_FILE_FIELDS)}.")
            return {"name": "files", "kwargs": {k: x for k, x in v.items() if k in _FILE_FIELDS}, **rest}
        return v

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        check_kwargs("dataset", self.name, DATASETS.get(self.name), self.kwargs)
        return self


class ClassificationDataSpec(DataSpec):
    """:class:`DataSpec` plus ``selection``: distil on a chosen part of the training split
    (:class:`~kdistill.config.SelectionSpec`); the teacher still trains on all of it."""

    selection: SelectionSpec | None = None

    @model_validator(mode="after")
    def _domains(self) -> ClassificationDataSpec:
        """``data.selection.domain_column`` is the files' ``domain_column`` (one place, so every later read of
        ``data.kwargs`` -- ``kdistill eval``, a distilled set's source -- keeps the column out of the features)."""
        sel = self.selection
        if sel is not None and sel.groups is not None:
            raise ValueError(f"data.selection.groups: got {sel.groups!r}; built-in classification datasets have no "
                             "domain groups. Fix: give your own files with a column naming each row's domain, as "
                             "data.selection.domain_column.")
        if sel is None or sel.domain_column is None:
            return self
        if self.name != "files":
            raise ValueError(f"data.selection.domain_column: got {sel.domain_column!r} with data.name {self.name!r}; "
                             "expected your own files (data.files or data.hf_dataset), whose column names each row's "
                             "domain.")
        given = self.kwargs.get("domain_column")
        if given is not None and given != sel.domain_column:
            raise ValueError(f"data.domain_column {given!r} and data.selection.domain_column {sel.domain_column!r}: "
                             "expected one domain column. Fix: give it once.")
        self.kwargs["domain_column"] = sel.domain_column  # in place: assignment would validate this model again
        return self


class ModelSpec(NamedSpec):
    """A model family from ``MODELS``; ``input_shape`` and ``num_classes`` come from the data. Your own module:
    ``{factory: "package.module:function", kwargs: {...}}`` (the ``factory`` model); a Hugging Face classifier:
    ``{hf: PATH_OR_ID}`` (the ``hf`` model: a sequence classifier for text data, an image classifier for images;
    ``kwargs: {trust_remote_code: true}`` for a model with its own code)."""

    @model_validator(mode="before")
    @classmethod
    def _own_model(cls, v: Any) -> Any:
        if isinstance(v, dict) and "factory" in v and "name" not in v:
            rest = {k: x for k, x in v.items() if k not in ("factory", "kwargs")}
            return {"name": "factory", "kwargs": {"factory": v["factory"], "kwargs": v.get("kwargs", {})}, **rest}
        if isinstance(v, dict) and "hf" in v and "name" not in v:
            rest = {k: x for k, x in v.items() if k not in ("hf", "kwargs")}
            return {"name": "hf", "kwargs": {**v.get("kwargs", {}), "path": v["hf"]}, **rest}
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        check_kwargs("model", self.name, MODELS.get(self.name), self.kwargs, provided=("input_shape", "num_classes"))
        return self


class TeacherSpec(StrictModel):
    """The teacher: trained here (and cached by fingerprint) unless ``checkpoint`` names a model folder or a
    ``.safetensors`` state dict for ``model``, or ``train: null`` uses a pretrained ``model`` as it is (e.g. your
    fine-tuned ``{hf: PATH}`` classifier)."""

    model: ModelSpec
    train: TrainSpec | None = TrainSpec()
    checkpoint: str | None = None
    reuse: bool = True

    @model_validator(mode="after")
    def _given(self) -> TeacherSpec:
        if self.train is None and self.checkpoint is None and "path" not in self.model.kwargs:
            raise ValueError("teacher.train: null uses the teacher as it is, which needs trained weights: a "
                             "pretrained model ({hf: PATH}) or a checkpoint. Otherwise give train settings.")
        return self


class VariantSpec(StrictModel):
    """Another distilled student of the same run (same architecture, data and training budget)."""

    method: MethodSpec
    augment: AugmentSpec | None = None


class EvalSpec(StrictModel):
    latency_batch_size: int = 256
    latency_repeats: int = 30


class ClassificationConfig(StrictModel):
    task: Literal["classification"] = "classification"
    name: str = "classification"
    description: str = ""
    seed: int = 0
    data: ClassificationDataSpec
    teacher: TeacherSpec | None = None
    teachers: list[TeacherSpec] = []
    teacher_weights: list[float] | None = None
    student: ModelSpec
    method: MethodSpec = MethodSpec()
    augment: AugmentSpec | None = None
    train: TrainSpec = TrainSpec()
    baseline: bool = True
    variants: dict[str, VariantSpec] = {}
    teacher_cache: bool = True  # precompute teacher logits once when inputs are fixed and only logits are used
    eval: EvalSpec = EvalSpec()
    design: DesignSpec | None = None  # `kdistill design`: the student search space (default: DesignSpec())

    @model_validator(mode="after")
    def _text(self) -> ClassificationConfig:
        if self.data.name != "files" or self.data.kwargs.get("text_column") is None:
            return self
        if self.augment is not None or any(v.augment is not None for v in self.variants.values()):
            raise ValueError("augment: mixes or perturbs input vectors, which token ids are not; remove augment "
                             "for text data (data.text_column)")
        if self.data.kwargs.get("tokenizer") is None:
            paths = [s.model.kwargs["path"] for s in (self.teachers or [self.teacher]) if s.model.name == "hf"]
            paths += [self.student.kwargs["path"]] if self.student.name == "hf" else []
            if not paths:
                raise ValueError("data.text_column needs a tokenizer: set data.tokenizer, or use an hf teacher or "
                                 "student ({hf: PATH}) whose folder carries one")
            self.data.kwargs["tokenizer"] = paths[0]
        return self

    @model_validator(mode="after")
    def _teachers(self) -> ClassificationConfig:
        if (self.teacher is None) == (not self.teachers):
            raise ValueError("expected exactly one of `teacher:` (one model) and `teachers:` (a list, distilled "
                             "from the weighted mean of their predicted distributions)")
        if self.teacher_weights is not None:
            if len(self.teacher_weights) != len(self.teachers) or any(not w > 0 for w in self.teacher_weights):
                raise ValueError(f"teacher_weights: got {self.teacher_weights}, expected {len(self.teachers)} "
                                 "positive numbers, one per entry of `teachers:`")
        if len(self.teachers) > 1:
            for spec in [self.method, *(v.method for v in self.variants.values())]:
                if spec.build().teacher_layers:
                    raise ValueError(f"method {spec.name!r} reads teacher features, which several teachers do not "
                                     "share; with `teachers:` use a method on the teachers' predictions (e.g. "
                                     f"{DEFAULT_METHODS['classification']})")
        return self

    @model_validator(mode="after")
    def _no_data_distillation(self) -> ClassificationConfig:
        for spec in [self.method, *(v.method for v in self.variants.values())]:
            if getattr(spec.method_class, "distills_data", False):
                raise ValueError(f"method {spec.name!r} distils a training set, which this task does not build; "
                                 "expected a method that trains a student. Fix: run it with task: "
                                 "dataset_distillation, or train on a set it wrote with data: {name: distilled, "
                                 "kwargs: {path: .../distilled.safetensors}}")
        return self

    @model_validator(mode="after")
    def _names(self) -> ClassificationConfig:
        for name in self.variants:
            if name in ("baseline", "student", "work") or name.startswith("teacher") \
                    or not name.replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r} is reserved or not snake_case; pick e.g. 'kd_plain'")
        return self


def teacher_specs(cfg: Any) -> list[TeacherSpec]:
    """The run's teachers: ``[cfg.teacher]`` or ``cfg.teachers``."""
    return list(cfg.teachers) or [cfg.teacher]


def _model_identity(spec: ModelSpec) -> dict[str, Any]:
    """The model spec, plus size and time of every file of a local ``path`` it builds from (a changed folder
    is another teacher)."""
    out = spec.model_dump()
    path = spec.kwargs.get("path")
    if isinstance(path, str) and Path(path).is_dir():
        out["files"] = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in Path(path).iterdir()
                              if f.is_file())
    return out


def teacher_fingerprint(*, data: dict[str, Any], model: dict[str, Any], train: dict[str, Any], seed: int) -> str:
    blob = json.dumps({"data": data, "model": model, "train": train, "seed": seed,
                       "torch": torch.__version__.split("+")[0], "kdistill": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build(spec: ModelSpec, data: ClassificationData) -> torch.nn.Module:
    model = MODELS.get(spec.name)(data.input_shape, data.num_classes, **spec.kwargs)
    if hasattr(model, "check_inputs"):  # e.g. an hf image model refuses pixels outside [0, 1], before training
        model.check_inputs(data.x_train)
    return model


def _phase_done(d: Path) -> bool:
    return (d / "model.json").is_file() and (d / "model.safetensors").is_file() and (d / "history.json").is_file()


def _initial_model(seed: int, model_spec: ModelSpec, data: ClassificationData) -> torch.nn.Module:
    """The model a phase starts from: every student of a seed starts from the same initial weights (and DDK's first
    comparison uses those too)."""
    seed_everything(seed)
    return _build(model_spec, data)


def _train_phase(name: str, *, cfg: ClassificationConfig, data: ClassificationData, model_spec: ModelSpec,
                 train: TrainSpec, method_spec: MethodSpec, augment_spec: AugmentSpec | None,
                 teacher: torch.nn.Module | None, accelerator: Any, ctx: RunContext,
                 extra_meta: dict[str, Any] | None = None, schedule: tuple[Any, Any] | None = None
                 ) -> tuple[torch.nn.Module, list[dict], float]:
    """Train one model (or reload it when a resumed run already finished this phase). ``schedule``: the
    ``(sampler, on_step)`` that draws its training examples (DDK), else every example each epoch."""
    pdir, work = ctx.output / name, ctx.output / "work" / name
    if ctx.resume and _phase_done(pdir):
        model, _ = load_classifier(pdir)
        hist = json.loads((pdir / "history.json").read_text())
        return model, hist["history"], hist["seconds"]
    if not ctx.resume and work.exists():
        shutil.rmtree(work)  # a fresh run never continues from stale checkpoints
    model = _initial_model(cfg.seed, model_spec, data)
    method = method_spec.build()
    augment = build_augment(augment_spec.name, data.num_classes, **augment_spec.kwargs) if augment_spec else None
    if augment is not None and hasattr(augment, "bind") and teacher is not None:
        augment.bind(student=model, teacher=teacher)  # model-aware augmentations (hard_augment) score candidates
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return classification_metrics(predict_logits(m, data.x_val), data.y_val)

    res = train_classifier(model, method, data.x_train, data.y_train, accelerator=accelerator,
                           batch_size=train.batch_size, seed=cfg.seed, teacher=teacher, augment=augment,
                           teacher_table=cfg.teacher_cache, evaluate=evaluate, output_dir=work, resume=ctx.resume,
                           phase=name, progress=ctx.progress,
                           sampler=schedule[0] if schedule else None, on_step=schedule[1] if schedule else None,
                           **train.model_dump(exclude={"batch_size", "mixed_precision"}))
    if accelerator.is_main_process:
        save_classifier(pdir, res.student, model_name=model_spec.name, model_kwargs=model_spec.kwargs,
                        input_shape=data.input_shape, num_classes=data.num_classes,
                        extra={"data": cfg.data.model_dump(), "phase": name, "class_names": data.class_names,
                               **(extra_meta or {})})
        write_json_atomic(pdir / "history.json", {"history": res.history, "seconds": res.seconds, "steps": res.steps})
    accelerator.wait_for_everyone()
    return res.student, res.history, res.seconds


def _get_teacher(cfg: ClassificationConfig, spec: TeacherSpec, folder: str, data: ClassificationData,
                 accelerator: Any, ctx: RunContext):
    if spec.checkpoint:
        p = Path(spec.checkpoint)
        if p.is_dir():
            model, _ = load_classifier(p)
        else:
            model = _build(spec.model, data)
            model.load_state_dict(load_state_dict(p))
        return model, [], 0.0, "checkpoint"
    if spec.train is None:  # a pretrained teacher, used as it is
        model = _build(spec.model, data)
        if hasattr(model, "match_labels"):
            model.match_labels(data.class_names)
        return model, [], 0.0, "given"
    fp = teacher_fingerprint(data=cfg.data.model_dump(exclude={"selection"}), model=_model_identity(spec.model),
                             train=spec.train.model_dump(), seed=cfg.seed)
    tdir, cached = ctx.output / folder, cache_root() / "teachers" / fp
    if _phase_done(tdir) and json.loads((tdir / "model.json").read_text()).get("fingerprint") == fp \
            and (ctx.resume or spec.reuse):
        model, _ = load_classifier(tdir)
        h = json.loads((tdir / "history.json").read_text())
        return model, h["history"], h["seconds"], "reused (run folder)"
    if spec.reuse and _phase_done(cached):
        model, _ = load_classifier(cached)
        if accelerator.is_main_process:
            shutil.copytree(cached, tdir, dirs_exist_ok=True)
        h = json.loads((cached / "history.json").read_text())
        return model, h["history"], h["seconds"], f"reused (cache {fp})"
    model, hist, secs = _train_phase(folder, cfg=cfg, data=data, model_spec=spec.model, train=spec.train,
                                     method_spec=MethodSpec(name=ALONE), augment_spec=None, teacher=None,
                                     accelerator=accelerator, ctx=RunContext(ctx.output, False, ctx.progress),
                                     extra_meta={"fingerprint": fp})
    if spec.reuse and accelerator.is_main_process:
        publish_dir(tdir, cached)
    return model, hist, secs, "trained"


def run_classification(cfg: ClassificationConfig, ctx: RunContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    ctx.output.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data.name, **cfg.data.kwargs)
    probe = _build(cfg.student, data)  # a student that cannot be built fails now, not after the teacher trained
    tokenizer = cfg.data.kwargs.get("tokenizer")
    if tokenizer and hasattr(probe, "check_tokenizer"):
        probe.check_tokenizer(tokenizer)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    specs = teacher_specs(cfg)
    got, (teacher, teacher_hist, teacher_secs, teacher_source) = _teachers(cfg, data, accelerator, ctx, tokenizer)

    selection, schedule, reweighting = None, None, {}
    if cfg.data.selection is not None:  # the teacher saw the whole training split; the students see the subset
        selection, inputs = _select(cfg, cfg.data.selection, data, teacher, accelerator,
                                    ctx.output / "work" / "selection")
        if selection.schedule is None:
            data = replace(data, x_train=data.x_train[selection.indices], y_train=data.y_train[selection.indices],
                           train_domains=None)
        else:  # DDK: every phase draws from the pool by domain weights that follow its own student

            def schedule(phase: str) -> tuple[Any, Any]:
                reweighting[phase] = selection.schedule(inputs["example_losses"])
                return reweighting[phase]
    trained = train_students(cfg, data, teacher, accelerator, ctx, schedule=schedule)
    teacher_entry = {"params": count_params(teacher), "source": teacher_source, "train_seconds": teacher_secs,
                     "model": specs[0].model.model_dump() if len(specs) == 1 else [s.model.model_dump() for s in specs]}
    if len(got) > 1:
        teacher_entry["members"] = [
            {"model": s.model.model_dump(), "params": count_params(g[0]),
             "metrics": classification_metrics(predict_logits(g[0], data.x_test), data.y_test)}
            for s, g in zip(specs, got)]
        teacher_entry["weights"] = teacher.weights.tolist()
    report, curves = build_report(cfg, data, "classification", teacher, teacher_entry, trained, t_start)
    if selection is not None:
        report["selection"] = {**selection.summary(),
                               **{f"{n}_reweighting": hook.history for n, (_, hook) in reweighting.items()}}
    curves = {"teacher": teacher_hist, **curves}
    if accelerator.is_main_process:
        write_report(report, ctx.output, curves=curves)
    return report


def _teachers(cfg: ClassificationConfig, data: ClassificationData, accelerator: Any, ctx: RunContext,
              tokenizer: str | None) -> tuple[list[Any], tuple[torch.nn.Module, list[dict], float, str]]:
    """Every teacher of the run (trained, reused or loaded), and ``(teacher, history, seconds, source)`` of the one
    the students learn from (a mixture when there are several), in eval mode."""
    specs = teacher_specs(cfg)
    got = [_get_teacher(cfg, spec, "teacher" if len(specs) == 1 else f"teacher_{i}", data, accelerator, ctx)
           for i, spec in enumerate(specs)]
    for model, *_ in got:
        if tokenizer and hasattr(model, "check_tokenizer"):
            model.check_tokenizer(tokenizer)
    if len(got) == 1:
        teacher, teacher_hist, teacher_secs, teacher_source = got[0]
    else:
        from ..teachers.mixture import TeacherMixture

        teacher = TeacherMixture([g[0] for g in got], weights=cfg.teacher_weights)
        teacher_hist, teacher_secs = got[0][1], sum(g[2] for g in got)
        teacher_source = ", ".join(g[3] for g in got)
    teacher.eval()
    return got, (teacher, teacher_hist, teacher_secs, teacher_source)


def _select(cfg: ClassificationConfig, spec: SelectionSpec, data: ClassificationData, teacher: torch.nn.Module,
            accelerator: Any, work: Path) -> tuple[Selection, dict[str, Any]]:
    """The training subset of ``spec`` and the inputs it was chosen with (``pool``: the pool's fingerprint). A proxy
    student (the recipe's student and method, the recipe's training settings) is trained on a seed slice when a
    strategy asks for one; the initial student (DDK's first comparison) is built as every phase builds it."""
    from ..train.selection import classifier_inputs

    def train_proxy(indices: torch.Tensor) -> torch.nn.Module:
        seed_data = replace(data, x_train=data.x_train[indices], y_train=data.y_train[indices])
        return _train_phase("proxy", cfg=cfg, data=seed_data, model_spec=cfg.student, train=cfg.train,
                            method_spec=cfg.method, augment_spec=None,
                            teacher=teacher if cfg.method.method_class.needs_teacher else None,
                            accelerator=accelerator, ctx=RunContext(work, False, False))[0]

    pool = pool_fingerprint(data.x_train, data.y_train)
    inputs = classifier_inputs(teacher=teacher, x=data.x_train, y=data.y_train, train_proxy=train_proxy,
                               initial_student=lambda: _initial_model(cfg.seed, cfg.student, data),
                               domains=data.train_domains)
    return (select_training_subset(**spec.entry_kwargs(), n=len(data.y_train), seed=cfg.seed, pool=pool, **inputs),
            {**inputs, "pool": pool})


def select_classification(cfg: ClassificationConfig, output: Path, progress: bool = True) -> dict[str, Any]:
    """``kdistill select``: the teacher (trained or reused as a run would), then the subset of ``data.selection``
    (default: PCoreSet at 50%) written to ``output`` (:func:`kdistill.data.selection.write_subset`)."""
    data = load_dataset(cfg.data.name, **cfg.data.kwargs)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    ctx = RunContext(output / "work", False, progress)
    _, (teacher, *_) = _teachers(cfg, data, accelerator, ctx, cfg.data.kwargs.get("tokenizer"))
    spec = cfg.data.selection or SelectionSpec(method=DEFAULT_SELECTORS["classification"])
    selection, inputs = _select(cfg, spec, data, teacher, accelerator, ctx.output / "selection")
    pool = inputs["pool"]
    names = data.class_names
    write_subset(output, selection, pool=pool,
                 describe=lambda i: f"label {names[int(data.y_train[i])] if names else int(data.y_train[i])}")
    return {"output": str(output), **selection.summary()}


Trained = dict[str, tuple[torch.nn.Module, list[dict], float]]


def train_students(cfg: Any, data: ClassificationData, teacher: torch.nn.Module, accelerator: Any,
                   ctx: RunContext, schedule: Callable[[str], tuple[Any, Any]] | None = None) -> Trained:
    """Train the baseline (if asked), the main student and every variant: same data, seed and budget.
    ``schedule(phase)``: ``(sampler, on_step)`` of a selection that redraws the training examples as the phase's
    student learns (DDK), else every phase trains on all of ``data``."""
    phases: list[tuple[str, MethodSpec, AugmentSpec | None]] = []
    if cfg.baseline:
        phases.append(("baseline", MethodSpec(name=ALONE), None))
    phases.append(("student", cfg.method, cfg.augment))
    phases += [(n, v.method, v.augment) for n, v in cfg.variants.items()]
    trained: Trained = {}
    for name, mspec, aspec in phases:
        needs_teacher = mspec.method_class.needs_teacher
        trained[name] = _train_phase(name, cfg=cfg, data=data, model_spec=cfg.student, train=cfg.train,
                                     method_spec=mspec, augment_spec=aspec,
                                     teacher=teacher if needs_teacher else None, accelerator=accelerator, ctx=ctx,
                                     extra_meta={"method": mspec.model_dump(),
                                                 "augment": aspec.model_dump() if aspec else None},
                                     schedule=schedule(name) if schedule is not None else None)
    return trained


def build_report(cfg: Any, data: ClassificationData, task: str, teacher: torch.nn.Module,
                 teacher_entry: dict[str, Any], trained: Trained, t_start: float
                 ) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """Evaluate teacher and students on the test split (never used for any choice) and assemble the report
    in DESIGN.md's schema, plus the students' learning curves."""
    t_logits = predict_logits(teacher, data.x_test)
    lat_x = data.x_test[: cfg.eval.latency_batch_size]
    student_model = trained["student"][0]

    def entry(model: torch.nn.Module, secs: float) -> dict[str, Any]:
        logits = predict_logits(model, data.x_test)
        return {"params": count_params(model), "metrics": classification_metrics(logits, data.y_test),
                "train_seconds": secs, "agreement": agreement(logits, t_logits)}

    teacher_entry = {**teacher_entry, "metrics": classification_metrics(t_logits, data.y_test),
                     "latency_ms": model_latency_ms(teacher, lat_x, cfg.eval.latency_repeats)}
    student_entry = {**entry(student_model, trained["student"][2]),
                     "latency_ms": model_latency_ms(student_model, lat_x, cfg.eval.latency_repeats),
                     "model": cfg.student.model_dump(), "augment": cfg.augment.model_dump() if cfg.augment else None}
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": task, "method": cfg.method.name, "seed": cfg.seed,
        "data": data.summary(), "teacher": teacher_entry, "student": student_entry,
        "agreement": student_entry["agreement"], "variants": {},
    }
    if cfg.baseline:
        report["baseline"] = entry(*[trained["baseline"][i] for i in (0, 2)])
    for name, v in cfg.variants.items():
        report["variants"][name] = {**entry(trained[name][0], trained[name][2]), "method": v.method.model_dump(),
                                    "augment": v.augment.model_dump() if v.augment else None}
    report["latency_batch_size"] = int(lat_x.shape[0])
    report["wall_seconds"] = time.perf_counter() - t_start
    curves = {("student: " + cfg.method.name + (f" + {cfg.augment.name}" if cfg.augment else "")
               if n == "student" else n): trained[n][1] for n in trained}
    return report, curves


def design_classification(cfg: ClassificationConfig, output: Path, *, budget: dict[str, float],
                          capacity_gap: bool = False, progress: bool = True) -> dict[str, Any]:
    """``kdistill design``: every candidate of ``design.space`` (:mod:`kdistill.students.design`) built and measured
    (params, FLOPs, latency per batch here), those over ``budget`` set aside, the rest ranked without training by
    DisWOT (:mod:`kdistill.eval.diswot`); the ``design.top_k`` best (with ``capacity_gap``: all, each also trained
    alone on labels) distilled for ``design.steps`` steps with the recipe's method. Writes ``design.json``,
    ``pareto.png``, ``recipe.yaml`` (the recipe with the most accurate distilled student, by validation accuracy)
    and, with ``capacity_gap``, ``capacity_gap.png`` into ``output``."""

    from ..eval.diswot import score_candidates
    from ..students import design

    t_start = time.perf_counter()
    spec = cfg.design or DesignSpec()
    data = load_dataset(cfg.data.name, **cfg.data.kwargs)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    _, (teacher, *_) = _teachers(cfg, data, accelerator, RunContext(output / "work", False, progress),
                                 cfg.data.kwargs.get("tokenizer"))
    lat_x, one = data.x_train[: cfg.eval.latency_batch_size], data.x_train[:1]
    hooked = cfg.method.build().student_layers

    def accuracy_of(model: torch.nn.Module) -> dict[str, float]:
        return {"val_accuracy": classification_metrics(predict_logits(model, data.x_val), data.y_val)["accuracy"],
                "test_accuracy": classification_metrics(predict_logits(model, data.x_test), data.y_test)["accuracy"]}

    rows: list[dict[str, Any]] = []
    for cand in design.candidates(spec.space):
        seed_everything(cfg.seed)
        model = _build(ModelSpec(name=cand.family, kwargs=cand.kwargs), data)
        row = {"name": cand.name, "family": cand.family, "kwargs": cand.kwargs, "params": count_params(model),
               "flops": model_flops(model, one), "latency_ms": model_latency_ms(model, lat_x, cfg.eval.latency_repeats)}
        missing = [n for n in hooked if n not in dict(model.named_modules())]
        row["excluded"] = design.over_budget(params=row["params"], latency_ms=row["latency_ms"], budget=budget) + (
            [f"no layer {', '.join(missing)} for the method to read"] if missing else [])
        rows.append(row)
    eligible = [r for r in rows if not r["excluded"]]
    if not eligible:
        small = min(rows, key=lambda r: r["params"])
        raise KDistillError(f"design: none of the {len(rows)} candidates of design.space fits: got budget {budget} "
                            f"(the smallest, {small['name']}, has {small['params']:,} params and runs a batch in "
                            f"{small['latency_ms']:.3f} ms: {'; '.join(small['excluded'])}); expected at least one "
                            "candidate within it. Fix: raise --budget, or add smaller widths / depths to design.space.")

    g = torch.Generator().manual_seed(cfg.seed)  # the same examples for every candidate
    picked = torch.randperm(len(data.y_train), generator=g)[: spec.score_batches * spec.score_batch_size]
    batches = [data.x_train[i] for i in picked.split(spec.score_batch_size) if len(i) >= 2]
    builders = {r["name"]: (lambda r=r: _build(ModelSpec(name=r["family"], kwargs=r["kwargs"]), data))
                for r in eligible}
    for name, score in score_candidates(builders, teacher, batches, seed=cfg.seed).items():
        next(r for r in eligible if r["name"] == name).update(score)
    eligible.sort(key=lambda r: (-r["diswot"], r["params"], r["name"]))
    for i, r in enumerate(eligible):
        r["rank_diswot"] = i + 1

    brief = cfg.train.model_copy(update={"max_steps": spec.steps, "epochs": 10**6})
    to_train = eligible if capacity_gap or spec.top_k == 0 else eligible[: spec.top_k]
    needs_teacher = cfg.method.method_class.needs_teacher
    phases = [("distilled", cfg.method, cfg.augment)] + ([("alone", MethodSpec(name=ALONE), None)] if capacity_gap
                                                         else [])
    for r in to_train:
        for phase, mspec, aspec in phases:
            model, _, secs = _train_phase(
                f"candidates/{r['name']}/{phase}", cfg=cfg, data=data,
                model_spec=ModelSpec(name=r["family"], kwargs=r["kwargs"]), train=brief, method_spec=mspec,
                augment_spec=aspec, teacher=teacher if phase == "distilled" and needs_teacher else None,
                accelerator=accelerator, ctx=RunContext(output, False, progress),
                extra_meta={"method": mspec.model_dump(), "design": r["name"]})
            r[phase] = {**accuracy_of(model), "train_seconds": secs}

    done = [r for r in eligible if "distilled" in r]
    front = [done[i]["name"] for i in design.pareto_front([r["latency_ms"] for r in done],
                                                          [r["distilled"]["val_accuracy"] for r in done])]
    chosen = max(done, key=lambda r: (r["distilled"]["val_accuracy"], -r["latency_ms"]))
    teacher_entry = {"params": count_params(teacher), "flops": model_flops(teacher, one),
                     "latency_ms": model_latency_ms(teacher, lat_x, cfg.eval.latency_repeats), **accuracy_of(teacher)}
    target = [r["distilled"]["test_accuracy"] for r in done]
    scores = {"diswot": [r["diswot"] for r in done], "params": [r["params"] for r in done],
              "flops": [r["flops"] for r in done]}
    out: dict[str, Any] = {
        "recipe": cfg.name, "task": "classification", "method": cfg.method.name, "seed": cfg.seed,
        "budget": budget, "design": spec.model_dump(), "teacher": teacher_entry,
        "latency_batch_size": int(lat_x.shape[0]), "score_examples": int(sum(len(b) for b in batches)),
        "candidates": eligible + [r for r in rows if r["excluded"]],
        "ranking": [r["name"] for r in eligible], "pareto_front": front, "chosen": chosen["name"],
        "rank_correlation": {"target": "test accuracy after distillation", "n": len(done),
                             **design.rank_correlations(scores, target)},
    }
    if capacity_gap:
        out["rank_correlation_gain"] = {
            "target": "distilled minus alone test accuracy", "n": len(done),
            **design.rank_correlations(scores, [r["distilled"]["test_accuracy"] - r["alone"]["test_accuracy"]
                                                for r in done])}
        out["capacity_gap"] = design.capacity_gap_summary(
            [{"name": r["name"], "params": r["params"], "distilled": r["distilled"]["test_accuracy"],
              "alone": r["alone"]["test_accuracy"]} for r in done],
            teacher_params=teacher_entry["params"], teacher_accuracy=teacher_entry["test_accuracy"],
            law_fraction=spec.law_fraction)
        design.plot_capacity_gap(output / "capacity_gap.png", out["capacity_gap"])
    design.plot_pareto(output / "pareto.png",
                       [{"name": r["name"], "family": r["family"], "latency_ms": r["latency_ms"],
                         "accuracy": r["distilled"]["val_accuracy"]} for r in done], front, chosen["name"],
                       teacher={"accuracy": teacher_entry["val_accuracy"]})
    recipe = {**cfg.model_dump(mode="json", exclude_unset=True),
              "student": {"name": chosen["family"], "kwargs": chosen["kwargs"]}}
    head = (f"# kdistill design: the student {chosen['name']} ({chosen['params']:,} params, "
            f"{chosen['latency_ms']:.3f} ms per batch of {int(lat_x.shape[0])} here, validation accuracy "
            f"{chosen['distilled']['val_accuracy']:.4f} after {spec.steps} steps); see design.json\n")
    return design.write_design(output, recipe=recipe, head=head, design=out, seconds=time.perf_counter() - t_start,
                               candidates=len(rows), within_budget=len(eligible), distilled=len(done),
                               capacity_gap=capacity_gap)


TASKS.register("classification")(Task("classification", ClassificationConfig, run_classification,
                                      "teacher classifier -> student classifier, with baseline and variants",
                                      select=select_classification, design=design_classification))
