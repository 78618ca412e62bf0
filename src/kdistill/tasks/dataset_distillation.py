"""Task ``dataset_distillation``: compress a training set into a few synthetic or selected examples per class, save
them as a file any training can load, and measure what they are worth: students of one or more architectures
trained on the distilled set, on a random real subset of the same size and on the full data.

The method builds the set through its :meth:`~kdistill.methods.base.Method.distill_data` hook (gradient or
trajectory matching, teacher-scored pruning, quantization bins, compensators, ...); its forward is the loss a
student trains on that set with. A teacher (trained here and cached by fingerprint, like the classification
task's) is always trained: methods that read one get it, and the report shows it as the reference model.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator

from ..config import ALONE, MethodSpec, StrictModel, TrainSpec
from ..data.classification import load_dataset
from ..data.distilled import load_distilled_set, plot_distilled_grid, save_distilled_set
from ..data.selection import check_per_class, per_class_random
from ..eval.distillation import distillation_report_md, train_on_set
from ..eval.metrics import agreement, classification_metrics, model_latency_ms
from ..eval.report import write_report
from ..io import cache_root, seed_everything
from ..models.classifiers import count_params, predict_logits
from ..registry import METHODS, TASKS
from ..train.loop import make_accelerator
from .base import RunContext, Task
from .classification import DataSpec, EvalSpec, ModelSpec, TeacherSpec, _build, _get_teacher


def _distilling_methods() -> list[str]:
    return [n for n, cls in METHODS.items() if getattr(cls, "distills_data", False)]


class DatasetDistillationConfig(StrictModel):
    task: Literal["dataset_distillation"] = "dataset_distillation"
    name: str = "dataset_distillation"
    description: str = ""
    seed: int = 0
    data: DataSpec
    teacher: TeacherSpec
    distill_model: ModelSpec  # the network synthetic data is matched on (gradient / trajectory matching, pools)
    method: MethodSpec
    per_class: list[int] = [1, 10, 50]
    students: dict[str, ModelSpec]  # evaluation architectures; the first is the report's main student
    train: TrainSpec = TrainSpec(epochs=1000, max_steps=300, batch_size=256, lr=0.01, log_every=1000)
    full_train: TrainSpec | None = TrainSpec(epochs=30, batch_size=128, lr=0.003, log_every=1000)
    random_baseline: bool = True
    grid: bool = True
    eval: EvalSpec = EvalSpec()

    @field_validator("per_class")
    @classmethod
    def _budgets(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v) or len(set(v)) != len(v):
            raise ValueError("expected a non-empty list of distinct budgets >= 1 (examples per class), e.g. "
                             "[1, 10, 50]")
        return v

    @field_validator("students")
    @classmethod
    def _students(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if not v:
            raise ValueError("expected at least one student architecture, e.g. {mlp: {name: mlp}, cnn: {name: cnn}}")
        for name in v:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"student name {name!r} is not snake_case; pick e.g. 'cnn_small'")
        return v

    @model_validator(mode="after")
    def _method(self) -> DatasetDistillationConfig:
        if not getattr(self.method.method_class, "distills_data", False):
            raise ValueError(f"method {self.method.name!r} trains a student but builds no data set; expected a "
                             f"dataset-distillation method: one of {', '.join(_distilling_methods())}")
        return self


def run_dataset_distillation(cfg: DatasetDistillationConfig, ctx: RunContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    ctx.output.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data.name, **cfg.data.kwargs)
    for k in cfg.per_class:  # a budget larger than a class, or a model that cannot be built, fails now, not after
        check_per_class(data.y_train, data.num_classes, k)  # the teacher trained
    for spec in [cfg.distill_model, *cfg.students.values()]:
        _build(spec, data)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    # the classification task's teacher (trained once per data / model / settings / seed, cached by fingerprint)
    run_view = SimpleNamespace(data=cfg.data, seed=cfg.seed, teacher_cache=False)
    teacher, teacher_hist, teacher_secs, teacher_source = _get_teacher(run_view, cfg.teacher, "teacher", data,
                                                                       accelerator, ctx)
    teacher.eval()
    method = cfg.method.build()
    alone = METHODS.get(ALONE)()
    fit_kwargs = cfg.train.model_dump(exclude={"batch_size", "mixed_precision"})
    fit_kwargs["progress"] = False
    test = {"x_test": data.x_test, "y_test": data.y_test, "accelerator": accelerator, "seed": cfg.seed}

    def builder(spec: ModelSpec):
        return lambda: _build(spec, data)

    results, distillation, main = [], {}, {}
    for k in cfg.per_class:
        kdir = ctx.output / f"per_class_{k}"
        path = kdir / "distilled.safetensors"
        t0 = time.perf_counter()
        if ctx.resume and path.is_file():
            ds = load_distilled_set(path)
        else:
            seed_everything(cfg.seed)
            ds = method.distill_data(inputs=data.x_train, labels=data.y_train, num_classes=data.num_classes,
                                     per_class=k, teacher=teacher, build_model=builder(cfg.distill_model),
                                     seed=cfg.seed, cache_dir=cache_root(),
                                     cache_key={"data": cfg.data.model_dump(), "model": cfg.distill_model.model_dump()},
                                     progress=ctx.progress)
            ds.meta.update({"method": cfg.method.model_dump(), "per_class": k, "data": cfg.data.model_dump(),
                            "class_names": data.class_names, "seed": cfg.seed, "recipe": cfg.name,
                            "seconds": time.perf_counter() - t0})
            if accelerator.is_main_process:
                save_distilled_set(path, ds)
        entry = {"file": str(path.relative_to(ctx.output)), "examples": len(ds), "seconds": ds.meta["seconds"],
                 "stored_vectors": int(ds.meta.get("stored_vectors", len(ds))),
                 "soft_labels": ds.soft_labels is not None, "meta": ds.meta}
        if cfg.grid and accelerator.is_main_process:
            plot_distilled_grid(ds.inputs, ds.labels, kdir / "grid.png", class_names=data.class_names,
                                title=f"{cfg.method.name}: {k} per class ({len(ds)} examples)")
            entry["grid"] = str((kdir / "grid.png").relative_to(ctx.output))
        distillation[str(k)] = entry
        rand = per_class_random(data.y_train, data.num_classes, k, generator=torch.Generator().manual_seed(cfg.seed)) \
            if cfg.random_baseline else None
        for sname, sspec in cfg.students.items():
            got = train_on_set(builder(sspec), method, ds.inputs, ds.labels, batch_size=cfg.train.batch_size,
                               soft_labels=ds.soft_labels, per_example=ds.per_example, **test, **fit_kwargs)
            row = {"per_class": k, "student": sname, "examples": len(ds), "distilled": got["metrics"],
                   "distilled_train_seconds": got["train_seconds"]}
            if rand is not None:
                base = train_on_set(builder(sspec), alone, data.x_train[rand], data.y_train[rand],
                                    batch_size=cfg.train.batch_size, **test, **fit_kwargs)
                row["random"] = base["metrics"]
            if not main:  # the first budget and the first architecture: the report's main student
                main = {"k": k, "name": sname, "got": got, "random": row.get("random")}
            results.append(row)

    full_data = {}
    if cfg.full_train is not None:
        full_kwargs = {**cfg.full_train.model_dump(exclude={"batch_size", "mixed_precision"}), "progress": False}
        for sname, sspec in cfg.students.items():
            got = train_on_set(builder(sspec), alone, data.x_train, data.y_train,
                               batch_size=cfg.full_train.batch_size, **test, **full_kwargs)
            full_data[sname] = {"metrics": got["metrics"], "examples": len(data.y_train),
                                "train_seconds": got["train_seconds"]}

    t_logits = predict_logits(teacher, data.x_test)
    lat_x = data.x_test[: cfg.eval.latency_batch_size]
    student = main["got"]["model"]
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": "dataset_distillation", "method": cfg.method.name, "seed": cfg.seed,
        "data": data.summary(), "distill_model": cfg.distill_model.model_dump(),
        "teacher": {"params": count_params(teacher), "metrics": classification_metrics(t_logits, data.y_test),
                    "latency_ms": model_latency_ms(teacher, lat_x, cfg.eval.latency_repeats),
                    "source": teacher_source, "train_seconds": teacher_secs, "model": cfg.teacher.model.model_dump()},
        "student": {"params": main["got"]["params"], "metrics": main["got"]["metrics"],
                    "latency_ms": model_latency_ms(student, lat_x, cfg.eval.latency_repeats),
                    "architecture": main["name"], "per_class": main["k"],
                    "model": cfg.students[main["name"]].model_dump()},
        "agreement": agreement(predict_logits(student, data.x_test), t_logits),
        "variants": {}, "results": results, "full_data": full_data, "distillation": distillation,
    }
    if main["random"] is not None:
        report["baseline"] = {"params": main["got"]["params"], "metrics": main["random"],
                              "what": f"{main['name']} on a random real subset of {main['k']} per class"}
    report["latency_batch_size"] = int(lat_x.shape[0])
    report["wall_seconds"] = time.perf_counter() - t_start
    if accelerator.is_main_process:
        write_report(report, ctx.output, curves={"teacher": teacher_hist} if teacher_hist else None,
                     extra_md=distillation_report_md(report))
    return report


TASKS.register("dataset_distillation")(Task(
    "dataset_distillation", DatasetDistillationConfig, run_dataset_distillation,
    "training set -> a few distilled examples per class (file + grid), scored vs random real subsets and full data"))
