"""Classification metrics, teacher agreement, CPU latency, and how much generated sequences repeat themselves."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import device_of
from ..losses.logits import forward_kl


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """``accuracy`` and mean cross-entropy ``loss``."""
    return {"accuracy": accuracy(logits, labels), "loss": float(F.cross_entropy(logits.float(), labels))}


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> dict[str, float]:
    """Top-1 agreement and mean held-out KL(teacher || student) at T = 1."""
    return {
        "top1_agreement": float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()),
        "kl_teacher_student": float(forward_kl(student_logits, teacher_logits).mean()),
    }


def repetition(sequences: Sequence[Sequence[int]], *, span: int = 8, n: int = 4) -> dict[str, float]:
    """How much generated token sequences repeat themselves: ``repeating``, the share of sequences in which some
    ``span``-token window occurs twice (a decoding loop), and ``distinct_ngrams``, the share of distinct ``n``-grams
    among all the ``n``-grams of all the sequences (1.0: none repeats). Sequences shorter than a window count as
    not repeating and add no n-grams."""
    if span < 1 or n < 1:
        raise ValueError(f"repetition: span={span}, n={n}; expected positive window lengths.")
    looping, total, seen = 0, 0, set()
    for seq in sequences:
        s = tuple(int(t) for t in seq)
        windows = [s[i:i + span] for i in range(len(s) - span + 1)]
        looping += len(set(windows)) < len(windows)
        grams = [s[i:i + n] for i in range(len(s) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return {"repeating": looping / len(sequences) if len(sequences) else 0.0,
            "distinct_ngrams": len(seen) / total if total else 1.0}


@torch.no_grad()
def latency_ms(fn: Callable[[], object], *, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls. On a CUDA device the clock
    stops after the queued kernels finish (a synchronisation), not when they are launched."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(times))


def model_latency_ms(model: nn.Module, example: Tensor, repeats: int = 30) -> float:
    was = model.training
    model.eval()
    try:
        example = example.to(device_of(model))
        return latency_ms(lambda: model(example), repeats=repeats)
    finally:
        model.train(was)


@torch.no_grad()
def model_flops(model: nn.Module, example: Tensor) -> int:
    """Floating-point operations of one forward pass of ``model`` (eval mode) on ``example`` (a batch: pass one row
    for a per-example figure), counted by ``torch.utils.flop_counter``: matrix products and convolutions, two per
    multiply-add; element-wise work (activations, normalisation, pooling) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example.to(device_of(model)))
        return int(counter.get_total_flops())
    finally:
        model.train(was)
