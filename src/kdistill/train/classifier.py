"""Training one classifier on in-memory examples: the loader, the optional one-pass teacher table, then
:func:`~kdistill.train.loop.fit`. The classification task and ``benchmarks/classic.py`` both train through
:func:`train_classifier`, so a benchmark row is what a recipe run gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..data.loaders import TensorDictDataset, make_loader
from ..methods.base import Method
from .loop import FitResult, fit


def train_classifier(model: nn.Module, method: Method, x_train: Tensor, y_train: Tensor, *, accelerator: Any,
                     batch_size: int, seed: int, teacher: nn.Module | None = None,
                     augment: Callable[..., Any] | None = None, teacher_table: bool = False,
                     target_probs: Tensor | None = None, batch_extra: dict[str, Tensor] | None = None,
                     teacher_targets: Callable[[dict[str, Any]], Any] | None = None,
                     sampler: Sampler[int] | None = None, **fit_kwargs: Any) -> FitResult:
    """Train ``model`` with ``method`` on ``(x_train, y_train)``.

    Each batch carries its examples' dataset positions (``index``: per-example memory banks, the teacher table).
    The teacher is passed on only when the method needs one. ``teacher_table``: when the inputs never change (no
    ``augment``) and the method is cacheable and reads no teacher features, one pass of the frozen teacher over
    ``x_train`` replaces a teacher forward at every step (the same values: the teacher is in eval mode).
    ``target_probs`` ``(N, C)``: soft labels every batch carries (``label_loss`` trains on them instead of the
    labels); ``batch_extra``: other per-example tensors a method reads from its batches, by name (e.g. the
    representation targets of a distilled set). ``teacher_targets``: the teacher's outputs of a batch, looked up
    by its ``index`` (a table computed beforehand, e.g. a GNN's outputs on the whole graph), instead of a teacher
    forward. ``sampler``: which examples each epoch draws (data selection's DDK draws by domain), instead of all of
    them shuffled. ``fit_kwargs`` go to :func:`~kdistill.train.loop.fit` (epochs, lr, evaluate, output_dir, ...)."""
    from ..teachers.cache import teacher_logits_table

    extra = dict(batch_extra or {})
    if target_probs is not None:
        extra["target_probs"] = target_probs
    loader = make_loader(TensorDictDataset(inputs=x_train, labels=y_train, index=torch.arange(len(y_train)), **extra),
                         batch_size, seed=seed, sampler=sampler)
    teacher = teacher if method.needs_teacher else None
    targets = teacher_targets if method.needs_teacher else None
    if targets is None and teacher is not None and teacher_table and augment is None and method.cacheable \
            and not method.teacher_layers:
        targets = teacher_logits_table(teacher, x_train)
    return fit(student=model, method=method, teacher=teacher, train_loader=loader, accelerator=accelerator,
               augment=augment, teacher_targets=targets, seed=seed, **fit_kwargs)
