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

from pydantic import field_validator, model_validator

from ..config import DEFAULT_METHODS, AugmentSpec, MethodSpec, StrictModel, TrainSpec
from ..data.classification import load_dataset
from ..eval.report import write_report
from ..io import seed_everything
from ..registry import TASKS
from ..teachers.sklearn import _estimators, estimator_size, fit_sklearn_teacher
from ..train.loop import make_accelerator
from .base import RunContext, Task
from .classification import DataSpec, EvalSpec, ModelSpec, VariantSpec, build_report, train_students


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
    method = spec.build()
    if method.teacher_layers:
        raise ValueError(f"method {spec.name!r} needs teacher features {list(method.teacher_layers)}, but a "
                         "scikit-learn teacher has no layers; pick a method that reads only the teacher's "
                         f"predictions, e.g. {DEFAULT_METHODS['tabular']}")


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
    data = load_dataset(cfg.data.name, **cfg.data.kwargs)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    teacher = fit_sklearn_teacher(cfg.teacher.estimator, data.x_train, data.y_train, data.num_classes, seed=cfg.seed,
                                  min_prob=cfg.teacher.min_prob, **cfg.teacher.kwargs)
    teacher_secs = time.perf_counter() - t0

    trained = train_students(cfg, data, teacher, accelerator, ctx)
    teacher_entry = {"params": estimator_size(teacher.estimator), "params_kind": "tree nodes or coefficients",
                     "model": cfg.teacher.model_dump(), "source": "fitted", "train_seconds": teacher_secs}
    report, curves = build_report(cfg, data, "tabular", teacher, teacher_entry, trained, t_start)
    if accelerator.is_main_process:
        write_report(report, ctx.output, curves=curves)
    return report


TASKS.register("tabular")(Task("tabular", TabularConfig, run_tabular,
                               "scikit-learn teacher (predict_proba) -> neural student, with baseline and variants"))
