"""Task ``tabular``: a scikit-learn teacher (any estimator with ``predict_proba``, e.g. gradient boosting)
distilled into a small neural student, compared with the same student trained alone.

The teacher is fitted on the training split at the start of the run (cheap and deterministic for a given
``seed``, so a resumed run refits the identical teacher). It is wrapped by
:class:`kdistill.teachers.sklearn.SklearnTeacher`, a parameter-free module returning logits, and then
trained against exactly like a torch teacher, with the classification task's own training phases and
report. Only logit-based methods apply (an estimator has no hookable layers); a method that names
teacher layers is rejected when the recipe loads.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator

from ..config import AugmentSpec, MethodSpec, StrictModel, TrainSpec
from ..data.classification import load_dataset
from ..eval.metrics import agreement, classification_metrics, model_latency_ms
from ..eval.report import write_report
from ..models.classifiers import count_params, predict_logits
from ..registry import METHODS, TASKS
from ..teachers.sklearn import _estimators, estimator_size, fit_sklearn_teacher
from ..train.checkpoint import write_json_atomic
from ..train.loop import make_accelerator
from .base import RunContext, Task
from .classification import DataSpec, EvalSpec, ModelSpec, VariantSpec, _train_phase, seed_everything


class SklearnTeacherSpec(StrictModel):
    """``estimator``: one of ``hist_gradient_boosting``, ``gradient_boosting``, ``random_forest``,
    ``extra_trees``, ``logistic_regression``; ``kwargs`` go to its constructor."""

    estimator: str = "hist_gradient_boosting"
    kwargs: dict[str, Any] = {}
    min_prob: float = 1e-6

    @field_validator("estimator")
    @classmethod
    def _known(cls, v: str) -> str:
        known = _estimators()
        if v not in known:
            from ..errors import close_matches

            m = close_matches(v, known)
            hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
            raise ValueError(f"unknown estimator {v!r}.{hint} Expected one of: {', '.join(sorted(known))}.")
        return v


def _logit_only(spec: MethodSpec) -> None:
    method = METHODS.get(spec.name)(**spec.kwargs)
    if method.teacher_layers:
        raise ValueError(f"method {spec.name!r} needs teacher features {list(method.teacher_layers)}, but a "
                         "scikit-learn teacher has no layers; pick a logit-based method (hinton_kd, dkd, dist, "
                         "logit_standardization, alpha_divergence, sinkhorn_kd, ensemble, ofa, ...)")


class TabularConfig(StrictModel):
    task: Literal["tabular"] = "tabular"
    name: str = "tabular"
    description: str = ""
    seed: int = 0
    data: DataSpec
    teacher: SklearnTeacherSpec = SklearnTeacherSpec()
    student: ModelSpec
    method: MethodSpec = MethodSpec()
    augment: AugmentSpec | None = None
    train: TrainSpec = TrainSpec()
    baseline: bool = True
    variants: dict[str, VariantSpec] = {}
    eval: EvalSpec = EvalSpec()
    teacher_cache: bool = True  # predict the teacher's logits once when the inputs are fixed (no augment)

    @model_validator(mode="after")
    def _check(self) -> TabularConfig:
        _logit_only(self.method)
        for name, v in self.variants.items():
            if name in ("teacher", "baseline", "student", "work") or not name.replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r} is reserved or not snake_case; pick e.g. 'kd_plain'")
            _logit_only(v.method)
        return self


def run_tabular(cfg: TabularConfig, ctx: RunContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    ctx.output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.output / "config.json", cfg.model_dump())
    data = load_dataset(cfg.data.name, **cfg.data.kwargs)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    teacher = fit_sklearn_teacher(cfg.teacher.estimator, data.x_train, data.y_train, data.num_classes, seed=cfg.seed,
                                  min_prob=cfg.teacher.min_prob, **cfg.teacher.kwargs)
    teacher_secs = time.perf_counter() - t0

    phases: list[tuple[str, MethodSpec, AugmentSpec | None]] = []
    if cfg.baseline:
        phases.append(("baseline", MethodSpec(name="none"), None))
    phases.append(("student", cfg.method, cfg.augment))
    phases += [(n, v.method, v.augment) for n, v in cfg.variants.items()]
    trained: dict[str, tuple[torch.nn.Module, list[dict], float]] = {}
    for name, mspec, aspec in phases:
        needs_teacher = METHODS.get(mspec.name).needs_teacher
        trained[name] = _train_phase(name, cfg=cfg, data=data, model_spec=cfg.student, train=cfg.train,
                                     method_spec=mspec, augment_spec=aspec,
                                     teacher=teacher if needs_teacher else None, accelerator=accelerator, ctx=ctx,
                                     extra_meta={"method": mspec.model_dump(),
                                                 "augment": aspec.model_dump() if aspec else None})

    t_logits = teacher(data.x_test)
    lat_x = data.x_test[: cfg.eval.latency_batch_size]
    student_model = trained["student"][0]

    def entry(model: torch.nn.Module, secs: float) -> dict[str, Any]:
        logits = predict_logits(model, data.x_test)
        return {"params": count_params(model), "metrics": classification_metrics(logits, data.y_test),
                "train_seconds": secs, "agreement": agreement(logits, t_logits)}

    teacher_entry = {"params": estimator_size(teacher.estimator), "params_kind": "tree nodes or coefficients",
                     "metrics": classification_metrics(t_logits, data.y_test),
                     "latency_ms": model_latency_ms(teacher, lat_x, cfg.eval.latency_repeats),
                     "model": cfg.teacher.model_dump(), "source": "fitted", "train_seconds": teacher_secs}
    student_entry = {**entry(student_model, trained["student"][2]),
                     "latency_ms": model_latency_ms(student_model, lat_x, cfg.eval.latency_repeats),
                     "model": cfg.student.model_dump(), "augment": cfg.augment.model_dump() if cfg.augment else None}
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": "tabular", "method": cfg.method.name, "seed": cfg.seed,
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
    if accelerator.is_main_process:
        write_report(report, ctx.output, curves=curves)
    return report


TASKS.register("tabular")(Task("tabular", TabularConfig, run_tabular,
                               "scikit-learn teacher (predict_proba) -> neural student, with baseline and variants"))
