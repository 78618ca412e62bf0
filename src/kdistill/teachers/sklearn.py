"""Tabular teachers: any scikit-learn estimator with ``predict_proba`` (gradient boosting, random forests,
logistic regression, ...) as a frozen teacher for a neural student.

:class:`SklearnTeacher` is an ``nn.Module`` without parameters whose ``forward(x)`` returns *logits*
``log(clip(predict_proba(x), min_prob))`` as a float32 tensor on ``x``'s device, laid out over all
``num_classes`` classes (classes the estimator never saw get ``log(min_prob)``). It can therefore be
passed to :func:`kdistill.train.loop.fit` as ``teacher=`` like any torch model: every logit-based
method (``hinton_kd``, ``dkd``, ``dist``, ...) works unchanged, and with a loop-level augmentation
(``mixup``) the estimator labels the mixed inputs on the fly. Feature-based methods do not apply (the
estimator has no hookable layers). Logits are clipped (``min_prob``, default 1e-6) so that methods that
standardise or correlate logits never see ``-inf``; softmax of the returned logits equals the
renormalised clipped probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect, unknown_name

ESTIMATORS: dict[str, Callable[..., Any]] = {}


def _estimators() -> dict[str, Callable[..., Any]]:
    if not ESTIMATORS:
        from sklearn.ensemble import (
            ExtraTreesClassifier,
            GradientBoostingClassifier,
            HistGradientBoostingClassifier,
            RandomForestClassifier,
        )
        from sklearn.linear_model import LogisticRegression

        ESTIMATORS.update({
            "hist_gradient_boosting": HistGradientBoostingClassifier,
            "gradient_boosting": GradientBoostingClassifier,
            "random_forest": RandomForestClassifier,
            "extra_trees": ExtraTreesClassifier,
            "logistic_regression": LogisticRegression,
        })
    return ESTIMATORS


class SklearnTeacher(nn.Module):
    """Wrap a *fitted* estimator with ``predict_proba`` so that ``teacher(x) -> (B, num_classes)`` logits."""

    def __init__(self, estimator: Any, num_classes: int, *, min_prob: float = 1e-6) -> None:
        super().__init__()
        if not callable(getattr(estimator, "predict_proba", None)):
            raise KDistillError(
                f"sklearn teacher: got a {type(estimator).__name__} without predict_proba; expected a classifier "
                "that outputs probabilities (e.g. HistGradientBoostingClassifier, RandomForestClassifier, or "
                "SVC(probability=True)).")
        classes = getattr(estimator, "classes_", None)
        if classes is None:
            raise KDistillError(f"sklearn teacher: the {type(estimator).__name__} is not fitted (no classes_); "
                                "call estimator.fit(x_train, y_train) first or use fit_sklearn_teacher().")
        classes = np.asarray(classes)
        expect(np.issubdtype(classes.dtype, np.integer) and classes.min() >= 0 and classes.max() < num_classes,
               "sklearn teacher classes_", classes.tolist(), f"integer class ids in [0, {num_classes - 1}]",
               "Fit the estimator on integer labels 0..C-1 (as kdistill's datasets provide).")
        expect(0 < min_prob < 1.0 / num_classes, "sklearn teacher min_prob", min_prob,
               f"a number in (0, 1/{num_classes})")
        self.estimator = estimator
        self.num_classes = int(num_classes)
        self.min_prob = float(min_prob)
        self.columns = classes.astype(np.int64)

    def probabilities(self, x: Tensor | np.ndarray) -> np.ndarray:
        """``(B, num_classes)`` float64 probabilities (unseen classes 0)."""
        arr = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
        arr = arr.reshape(len(arr), -1)
        proba = np.asarray(self.estimator.predict_proba(arr), dtype=np.float64)
        full = np.zeros((len(arr), self.num_classes), dtype=np.float64)
        full[:, self.columns] = proba
        return full

    def forward(self, x: Tensor) -> Tensor:
        p = np.clip(self.probabilities(x), self.min_prob, 1.0)
        p = p / p.sum(1, keepdims=True)
        return torch.from_numpy(np.log(p)).float().to(x.device)


def fit_sklearn_teacher(name: str, x_train: Tensor, y_train: Tensor, num_classes: int, *, seed: int = 0,
                        min_prob: float = 1e-6, **kwargs: Any) -> SklearnTeacher:
    """Fit a named estimator (``hist_gradient_boosting``, ``gradient_boosting``, ``random_forest``,
    ``extra_trees``, ``logistic_regression``) on the training split and wrap it as a teacher."""
    table = _estimators()
    if name not in table:
        raise unknown_name("sklearn estimator", name, table, "Or wrap your own fitted estimator with SklearnTeacher.")
    cls = table[name]
    import inspect

    if "random_state" in inspect.signature(cls).parameters:
        kwargs.setdefault("random_state", seed)
    try:
        est = cls(**kwargs)
    except TypeError as e:
        raise KDistillError(f"sklearn estimator {name!r} rejected its kwargs {kwargs}: {e}") from None
    x = x_train.detach().float().cpu().numpy().reshape(len(x_train), -1)
    est.fit(x, y_train.detach().cpu().numpy())
    return SklearnTeacher(est, num_classes, min_prob=min_prob)


def estimator_size(estimator: Any) -> int:
    """A size for reports: total tree nodes for tree ensembles, number of coefficients for linear models
    (0 when unknown). Not comparable one-to-one with neural parameters; reports label it."""
    total = 0
    for group in getattr(estimator, "_predictors", []) or []:  # HistGradientBoosting: per-iteration trees
        for pred in group:
            total += len(getattr(pred, "nodes", ()))
    trees = getattr(estimator, "estimators_", None)
    if trees is not None:
        for t in np.asarray(trees, dtype=object).ravel():
            tree = getattr(t, "tree_", None)
            total += int(tree.node_count) if tree is not None else 0
    coef = getattr(estimator, "coef_", None)
    if coef is not None:
        total += int(np.size(coef)) + int(np.size(getattr(estimator, "intercept_", 0)))
    return total
