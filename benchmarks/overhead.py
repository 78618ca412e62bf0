"""Overhead of kdistill's loop for a Hinton-KD step, measured within one process.

(a) student_step_ms : a plain PyTorch training step of the student (forward, cross-entropy, backward, AdamW);
    student_step_fused_adamw_ms is the same step with torch's fused AdamW, the optimizer kdistill builds
(b) teacher_forward_ms : the teacher's forward pass under no_grad on the same batch
(c) kd_step_ms : one optimizer step of `kdistill.train.fit` with `hinton_kd` (teacher forward, student
    forward, loss, backward, step, data loading and logging included). Measured as the difference of
    two fit() runs of different length divided by the difference in steps, so one-off set-up cost cancels.
overhead_ratio = c / (a + b): 1.0 means the loop adds nothing to the unavoidable work. Target <= 1.05.
(h) handwritten_kd_step_ms : the same KD step written by hand in plain PyTorch, for reference:
    handwritten_ratio = h / (a + b) is what KD costs over (a) + (b) without any framework, and
    loop_vs_handwritten = c / h is what kdistill's loop adds over that.
--batch-size scales the step (the default recipe's 128 is a sub-millisecond step on 2 cores, where fixed
per-step Python costs weigh most).

Models and batch size are those of the default recipe (recipes/classic/mnist1d.yaml).
Usage: python benchmarks/overhead.py [--repeats 5] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kdistill.config import load_config
from kdistill.data import TensorDictDataset, load_dataset, make_loader
from kdistill.methods.hinton_kd import HintonKD
from kdistill.registry import MODELS
from kdistill.train import fit, make_accelerator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipe", default="classic/mnist1d")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.batch_size")
    args = ap.parse_args()
    cfg = load_config(args.recipe)
    data = load_dataset(cfg.data.name, **cfg.data.kwargs)
    bs = args.batch_size or cfg.train.batch_size
    build = lambda spec: MODELS.get(spec.name)(data.input_shape, data.num_classes, **spec.kwargs)  # noqa: E731
    torch.manual_seed(0)
    teacher = build(cfg.teacher.model).eval().requires_grad_(False)
    ds = TensorDictDataset(inputs=data.x_train, labels=data.y_train)
    acc = make_accelerator()

    def batches(n: int):
        """n batches of the training loader, starting a new epoch whenever one runs out."""
        epoch, it = 0, iter(make_loader(ds, bs, seed=0))
        for _ in range(n):
            try:
                yield next(it)
            except StopIteration:
                epoch += 1
                it = iter(make_loader(ds, bs, seed=epoch))
                yield next(it)

    def plain_student_steps(n: int, fused: bool | None = None) -> list[float]:
        student = build(cfg.student)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, fused=fused)
        times, src = [], batches(n)
        for _ in range(n):
            t = time.perf_counter()
            b = next(src)
            loss = F.cross_entropy(student(b["inputs"]), b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append((time.perf_counter() - t) * 1e3)
        return times

    def teacher_forwards(n: int) -> list[float]:
        times = []
        for b in batches(n):
            t = time.perf_counter()
            with torch.no_grad():
                teacher(b["inputs"])
            times.append((time.perf_counter() - t) * 1e3)
        return times

    def handwritten_kd_steps(n: int) -> list[float]:
        """The same Hinton-KD step written by hand in plain PyTorch (no kdistill, no Accelerate)."""
        student = build(cfg.student)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr)
        kw = cfg.variants["kd_plain"].method.kwargs if "kd_plain" in cfg.variants else {}
        T, alpha = kw.get("kd_temperature", 4.0), kw.get("alpha", 0.9)
        times, src = [], batches(n)
        for _ in range(n):
            t = time.perf_counter()
            b = next(src)
            with torch.no_grad():
                t_logits = teacher(b["inputs"])
            s_logits = student(b["inputs"])
            kd = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                          reduction="batchmean") * T * T
            loss = alpha * kd + (1 - alpha) * F.cross_entropy(s_logits, b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append((time.perf_counter() - t) * 1e3)
        return times

    def kd_fit(n: int) -> float:
        student = build(cfg.student)
        t = time.perf_counter()
        fit(student=student, method=HintonKD(**cfg.variants["kd_plain"].method.kwargs) if "kd_plain" in cfg.variants
            else HintonKD(), teacher=teacher, train_loader=make_loader(ds, bs, seed=0), accelerator=acc,
            epochs=10_000, max_steps=n, progress=False, log_every=50, lr=cfg.train.lr)
        return time.perf_counter() - t

    short, long_ = 20, 20 + args.steps
    a, af, b, c, h = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved so that machine noise hits all of them alike
        a.append(statistics.median(plain_student_steps(args.steps)))
        af.append(statistics.median(plain_student_steps(args.steps, fused=True)))
        b.append(statistics.median(teacher_forwards(args.steps)))
        h.append(statistics.median(handwritten_kd_steps(args.steps)))
        c.append((kd_fit(long_) - kd_fit(short)) * 1e3 / (long_ - short))
    res = {
        "recipe": args.recipe, "batch_size": bs, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "student_step_ms": statistics.median(a), "teacher_forward_ms": statistics.median(b),
        "kd_step_ms": statistics.median(c),
    }
    res["handwritten_kd_step_ms"] = statistics.median(h)
    res["overhead_ratio"] = res["kd_step_ms"] / (res["student_step_ms"] + res["teacher_forward_ms"])
    # the same ratio for a minimal hand-written KD step: what any KD step costs over (a) + (b) on this model
    res["handwritten_ratio"] = res["handwritten_kd_step_ms"] / (res["student_step_ms"] + res["teacher_forward_ms"])
    res["loop_vs_handwritten"] = res["kd_step_ms"] / res["handwritten_kd_step_ms"]
    # kdistill's AdamW is torch's fused kernel where the parameters allow it; (a) with that optimizer too, so
    # the ratio can be read without the optimizer's share of the gain
    res["student_step_fused_adamw_ms"] = statistics.median(af)
    res["overhead_ratio_fused_student"] = res["kd_step_ms"] / (res["student_step_fused_adamw_ms"]
                                                               + res["teacher_forward_ms"])
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
