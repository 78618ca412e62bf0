"""The one training loop: plain PyTorch + Hugging Face Accelerate.

Read top to bottom: set-up (teacher frozen, method sized on a probe batch), preparation by Accelerate,
optional resume, then windows of ``grad_accum`` micro-batches -> one optimizer step. DDP / FSDP come from
Accelerate's launcher and config (``torchrun`` / ``accelerate launch``), never from code here.

Loss normalisation lives here and only here: a method returns *means over its micro-batch*; the loop
rescales each micro-batch by ``n_local * world_size / n_global`` where ``n`` counts examples (or
``batch["mask"]`` tokens) over the whole accumulation window and all ranks. DDP then averages
gradients over ranks, so the update equals that of one process on the concatenated batch, whatever the
split into micro-batches and processes.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import capture, unwrap
from ..errors import KDistillError, expect
from ..io import write_bytes_atomic
from ..methods.base import Method, ModelOutput, SetupInfo
from .checkpoint import (
    CheckpointManager,
    is_sharded,
    load_sharded_state,
    rng_state,
    set_rng_state,
    sharded_state,
)
from .optim import build_optimizer, build_scheduler

Batch = dict[str, Any]
Forward = Callable[[nn.Module, Batch], "Tensor | ModelOutput"]


def _cache_accelerate_probes() -> None:
    """Accelerate asks ``importlib`` whether the optional ``lomo_optim`` package exists inside every
    ``backward`` and ``optimizer.step`` (uncached: ~0.1 ms of file-system probes per call, a visible share
    of a small model's step). The answer cannot change within a process, so it is computed once."""
    import functools

    import accelerate.accelerator as acc_mod
    import accelerate.optimizer as opt_mod

    for mod in (acc_mod, opt_mod):
        fn = getattr(mod, "is_lomo_available", None)
        if fn is not None and not hasattr(fn, "cache_info"):
            mod.is_lomo_available = functools.cache(fn)


def make_accelerator(mixed_precision: str = "no", *, find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator``. Accelerate keeps process-wide state; when a later run in the same
    process asks for another precision, that state is reset (never the process group)."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    _cache_accelerate_probes()
    expect(mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", mixed_precision, "'no', 'bf16' or 'fp16'")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise KDistillError("mixed_precision: got 'fp16' on a machine without CUDA; expected 'bf16' or 'no' on CPU.")
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", None) not in (None, mixed_precision):
        AcceleratorState._reset_state()
        GradientState._reset_state()
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    # On a CPU-only machine Accelerate forms the gloo process group from torchrun's environment only when
    # told cpu=True; without it every process would silently train alone on all the data.
    # split_batches: a loader's batch_size is the global batch, divided across processes, so `--nproc 2` takes the
    # same number of steps of the same batches as one process (Accelerate's default gives each process a batch).
    cpu_fsdp = _cpu_fsdp_plugin()
    acc = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=kwargs, cpu=not torch.cuda.is_available(),
                      dataloader_config=DataLoaderConfiguration(split_batches=True))
    if cpu_fsdp is not None:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        # as Accelerate's own set-up does on GPUs (it copies the type into PartialState, read back by later calls)
        acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = cpu_fsdp
        os.environ["ACCELERATE_USE_FSDP"] = "true"
    _check_fsdp_took(acc)
    return acc


#: set to 1 to run an FSDP launch on CPU processes (gloo) instead of refusing it: slow, for checking an FSDP set-up
#: (recipes/accelerate/fsdp.yaml, hooks, checkpoints, the fused loss) on a machine without GPUs, as the tests do
CPU_FSDP_ENV = "KDISTILL_CPU_FSDP"


def _cpu_fsdp_plugin() -> Any:
    """Accelerate enables FSDP only for GPU-type processes. torch's FSDP2 (``fully_shard``) itself runs on gloo, so
    with ``KDISTILL_CPU_FSDP=1`` on a machine without CUDA an FSDP launch builds Accelerate's FSDP plugin from the
    launcher's ``FSDP_*`` variables (that is, from the launch config), lets Accelerate set up the CPU processes
    without it, and then switches its state to FSDP2: from there on (``prepare``, ``no_sync``, clipping,
    checkpoints) it is the code a GPU run executes. None when not asked for."""
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (wanted and os.environ.get(CPU_FSDP_ENV) == "1" and not torch.cuda.is_available()):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ...
    if plugin.fsdp_version != 2:
        raise KDistillError(f"{CPU_FSDP_ENV}=1: the launch config asks for FSDP version {plugin.fsdp_version}; "
                            "expected 2 (fully_shard runs on CPU processes, FSDP1 does not). Fix: fsdp_version: 2, "
                            "as in recipes/accelerate/fsdp.yaml.")
    os.environ["ACCELERATE_USE_FSDP"] = "false"  # Accelerate would otherwise look for GPUs
    return plugin


def _check_fsdp_took(accelerator: Any) -> None:
    """Accelerate turns FSDP on only for accelerator processes (CUDA and the like): launched with an FSDP config on
    CPUs it would silently train with DDP, every rank holding the whole model. Refuse instead (unless
    ``KDISTILL_CPU_FSDP=1`` switched FSDP2 on for CPU processes)."""
    from accelerate.utils import DistributedType

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and accelerator.distributed_type != DistributedType.FSDP:
        raise KDistillError(
            f"the launcher asked for FSDP (ACCELERATE_USE_FSDP=true), but Accelerate set up "
            f"{accelerator.distributed_type.value} on {accelerator.device.type}: it enables FSDP only on GPUs. Fix: "
            "launch on CUDA devices, or use the DDP config (recipes/accelerate/ddp.yaml) or `kdistill run --nproc N` "
            f"on CPUs (or set {CPU_FSDP_ENV}=1 to check the FSDP set-up on CPU processes, slowly).")


def _uses_fsdp2(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP and bool(getattr(accelerator, "is_fsdp2", False))


def _place_teacher(teacher: nn.Module, device: torch.device, *, sharded: bool) -> None:
    """Put the frozen teacher on ``device``. Under FSDP2 (``sharded``) every layer the teacher names in
    ``_no_split_modules`` (a Hugging Face model's decoder layers) is sharded across the ranks with ``fully_shard``,
    and then the teacher itself, which shards what lies outside those layers (embeddings, final norm, LM head; tied
    or not) as one more unit. Each unit is gathered only while it runs (inference only: no gradients, resharded
    after its forward), so no rank holds the whole teacher; the fused loss reads a gathered copy of the LM head
    (:func:`kdistill.teachers.lm.fused_head_output`). A teacher that names no layer classes is kept whole.
    Sharding happens before the move, so the full weights never reach the device."""
    names = set(getattr(teacher, "_no_split_modules", None) or []) if sharded else set()
    layers = [m for m in teacher.modules() if type(m).__name__ in names]
    if layers:
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer, reshard_after_forward=True)
        # set explicitly: FSDP2 would otherwise keep a root's parameters gathered after forward (for a backward
        # the teacher never runs)
        fully_shard(teacher, reshard_after_forward=True)
    teacher.to(device)


def end_distributed(exit_code: int | None = None) -> None:
    """Under torchrun, tear the process group down. With ``exit_code`` (a rank whose outputs are all written),
    also leave at once with that code, without the interpreter's exit-time cleanup: on a loaded machine a
    c10d/gloo background thread can still be joinable when its C++ destructor runs, and the rank then aborts
    with 'terminate called without an active exception' (3 of 12 two-rank runs of the DDP test worker with two
    busy cores; 0 of 24 when the worker leaves this way). Outside a process group this does nothing."""
    import logging
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        if exit_code is not None:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)


def join_torchrun() -> tuple[int, int, Callable[[], None] | None, torch.device]:
    """``(rank, world_size, barrier, device)`` of this process for work split across ranks outside the training
    loop (Accelerate sets up its own group there). Started by ``torchrun`` with ``WORLD_SIZE > 1``: joins the
    process group (NCCL on GPUs, gloo on CPUs) unless already joined, device ``cuda:<LOCAL_RANK>`` or the CPU,
    barrier ``torch.distributed.barrier``. Otherwise ``(0, 1, None, cuda:0 or cpu)``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return 0, 1, None, torch.device("cuda:0" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier, device


def default_forward(model: nn.Module, batch: Batch) -> Tensor:
    return model(batch["inputs"])


def as_output(out: Tensor | ModelOutput | Any) -> ModelOutput:
    if isinstance(out, ModelOutput):
        return out
    if isinstance(out, Tensor):
        return ModelOutput(logits=out)
    logits = getattr(out, "logits", None)  # Hugging Face ModelOutput
    if isinstance(logits, Tensor):
        return ModelOutput(logits=logits, extra={"model_output": out})
    raise KDistillError(f"a forward function returned {type(out).__name__}; "
                        "expected a Tensor of logits or a ModelOutput.")


def batch_count(batch: Batch) -> float:
    """How many things in a micro-batch the losses average over: mask entries, or examples."""
    mask = batch.get("mask")
    if isinstance(mask, Tensor):
        return float(mask.sum())
    for v in batch.values():
        if isinstance(v, Tensor) and v.ndim > 0:
            return float(v.shape[0])
    raise KDistillError("cannot count examples in a batch with no tensors; "
                        "expected e.g. {'inputs': ..., 'labels': ...}.")


class DistillStep(nn.Module):
    """Student + method as one module: what Accelerate wraps (DDP/FSDP) and what the optimizer sees,
    so method parameters (projectors, banks) are trained and synchronised like the student's."""

    def __init__(self, student: nn.Module, method: Method, student_forward: Forward) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self._forward = student_forward

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The student's layer classes to shard one by one (Hugging Face models list their decoder layers here):
        Accelerate's FSDP auto-wrap (``TRANSFORMER_BASED_WRAP`` without a class list) reads it from the module it
        prepares, which is this one."""
        return getattr(self.student, "_no_split_modules", None)

    def forward(self, batch: Batch, teacher_out: ModelOutput | None) -> dict[str, Tensor]:
        with capture(self.student, self.method.student_layers) as feats:
            out = as_output(self._forward(self.student, batch))
        out.features.update(feats)
        return self.method(out, teacher_out, batch)


@dataclass
class FitResult:
    student: nn.Module
    method: Method
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    #: ``<name>_share`` of every method metric ``<name>_seconds`` over all the steps this call trained (e.g. the
    #: share of step time an on-policy method spends generating)
    time_shares: dict[str, float] = field(default_factory=dict)


def _teacher_fn(teacher: nn.Module | None, method: Method, teacher_forward: Forward,
                teacher_targets: Callable[[Batch], ModelOutput] | None) -> Callable[[Batch], ModelOutput | None]:
    def run(batch: Batch) -> ModelOutput | None:
        if not method.needs_teacher:
            return None
        if teacher_targets is not None:  # offline cache / API teacher: never touches a model
            return teacher_targets(batch)
        with torch.no_grad(), capture(teacher, method.teacher_layers, detach=True) as feats:
            out = as_output(teacher_forward(teacher, batch))
        out.features.update(feats)
        return out

    return run


@torch.no_grad()
def probe(student: nn.Module, method: Method, batch: Batch, student_forward: Forward,
          teacher_fn: Callable[[Batch], ModelOutput | None], num_train: int | None, **extra: Any) -> SetupInfo:
    """One eval-mode forward to learn feature and logit shapes, so ``method.setup`` can size its modules."""
    was = student.training
    student.eval()
    with capture(student, method.student_layers) as feats:
        s = as_output(student_forward(student, batch))
    student.train(was)
    t = teacher_fn(batch)
    return SetupInfo(
        student_features={k: tuple(v.shape) for k, v in {**s.features, **feats}.items()},  # returned + hooked
        teacher_features={k: tuple(v.shape) for k, v in (t.features.items() if t else [])},
        num_classes=int(s.logits.shape[-1]) if s.logits is not None else None,
        num_train=num_train,
        student_logits=tuple(s.logits.shape) if s.logits is not None else None,
        teacher_logits=tuple(t.logits.shape) if t is not None and t.logits is not None else None,
        extra=dict(extra),
    )


def _non_finite(phase: str, step: int, losses: dict[str, Tensor]) -> KDistillError:
    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    return KDistillError(f"[{phase}] non-finite loss at step {step}: {terms}. Lower train.lr, check the inputs "
                         "for NaN/inf, or set train.max_grad_norm.")


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """On resume, drop log lines written after the checkpoint we restart from (they will be re-logged)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    write_bytes_atomic(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


def fit(
    *,
    student: nn.Module,
    method: Method,
    train_loader: torch.utils.data.DataLoader,
    accelerator: Any,
    teacher: nn.Module | None = None,
    student_forward: Forward | None = None,
    teacher_forward: Forward | None = None,
    teacher_targets: Callable[[Batch], ModelOutput] | None = None,
    augment: Callable[[Batch, np.random.Generator], Batch] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    phase: str = "student",
    progress: bool = True,
    seed: int = 0,
    epochs: int = 1,
    max_steps: int | None = None,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    step_size: int = 30,
    gamma: float = 0.1,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    eval_every: int = 0,
    log_every: int = 50,
    checkpoint_every: int = 0,
    tensorboard: bool = False,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> FitResult:
    """Train ``student`` (and ``method``'s own parameters) against ``teacher`` or ``teacher_targets``.

    ``eval_every`` / ``checkpoint_every`` count optimizer steps; 0 means "at the end of every epoch".
    With ``resume=True`` and a checkpoint under ``output_dir/checkpoints``, training continues from it and
    ends with the same weights as an uninterrupted run (same data order, RNG states and schedule).
    ``on_step(step, student)`` runs after every optimizer step (e.g. DDK's domain reweighting, which changes what a
    data sampler draws next); when it has ``state_dict()`` / ``load_state_dict()``, its state is checkpointed with the
    rest and restored on resume.
    """
    expect(grad_accum >= 1, "grad_accum", grad_accum, "an integer >= 1")
    expect(epochs >= 1, "epochs", epochs, "an integer >= 1")
    student_forward = student_forward or default_forward
    teacher_forward = teacher_forward or default_forward
    if method.needs_teacher and teacher is None and teacher_targets is None:
        raise KDistillError(f"method {type(method).__name__} needs a teacher, but neither a teacher model nor cached "
                            "teacher targets were given. Set `teacher:` in the recipe or use method `none`.")
    device = accelerator.device
    if teacher is not None:
        # Frozen for good: eval mode (dropout off, BN statistics fixed), no gradients, never optimised.
        teacher.eval().requires_grad_(False)
        _place_teacher(teacher, device, sharded=_uses_fsdp2(accelerator))
    method.resolve_layers(unwrap(student), unwrap(teacher) if teacher is not None else None)  # names to hook
    teacher_fn = _teacher_fn(teacher, method, teacher_forward, teacher_targets)
    _setup_method(student, method, train_loader, student_forward, teacher_fn, device)
    # FSDP2 shards the student in place; the caller gets back a whole copy built on this weightless skeleton
    skeleton = _meta_copy(student) if _uses_fsdp2(accelerator) else None
    step_module, opt, loader = _prepare(accelerator, DistillStep(student, method, student_forward), train_loader,
                                        optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    # on the wrapped optimizer: its `step` is what the loop calls (the scheduler marks it to check the call order)
    total_steps, sched = _schedule(getattr(opt, "optimizer", opt), len(loader), grad_accum=grad_accum,
                                   epochs=epochs, max_steps=max_steps, schedule=schedule,
                                   warmup_steps=warmup_steps, step_size=step_size, gamma=gamma)
    inner = accelerator.unwrap_model(step_module)
    aug_rng = np.random.default_rng([int(seed), accelerator.process_index, 7])
    out_dir = Path(output_dir) if output_dir is not None else None
    ckpt = CheckpointManager(out_dir / "checkpoints") if out_dir is not None else None
    pos = _Position()
    if resume and ckpt is not None and ckpt.latest() is not None:
        pos = _restore(ckpt, inner, opt, sched, aug_rng, len(loader), hook=on_step)
        if accelerator.is_main_process and out_dir is not None:
            _truncate_jsonl(out_dir / "metrics.jsonl", pos.step)
        accelerator.print(f"[{phase}] resumed at step {pos.step} (epoch {pos.epoch}, batch {pos.skip})")
    log = _Log(accelerator, phase, out_dir, tensorboard=tensorboard, progress=progress, total_steps=total_steps,
               done_steps=pos.step)
    t0 = time.perf_counter()
    # fp32: no autocast context at all (entering Accelerate's costs a few microseconds per call)
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else nullcontext
    check_finite = device.type == "cpu"  # a per-step check costs a host sync on accelerators
    backward, opt_step = _direct_calls(accelerator, opt)

    def do_eval(epoch: int) -> None:
        if evaluate is not None:
            with _root_gathered(step_module):
                pos.history.append({"step": pos.step, "epoch": epoch, **_evaluated(inner.student, evaluate)})
            log.eval_row(pos.history[-1])

    step_module.train()
    try:
        for epoch in range(pos.epoch, epochs):
            if pos.step >= total_steps:
                break
            n_in_epoch, window = pos.skip, []
            for batch in _epoch_batches(accelerator, loader, epoch, pos):
                window.append(batch)
                n_in_epoch += 1
                if len(window) < grad_accum and n_in_epoch < len(loader):
                    continue
                # ---- one optimizer step over the window --------------------------------------------
                t_step = time.perf_counter()
                terms = _window_step(window, accelerator, step_module, teacher_fn, augment, aug_rng, autocast,
                                     backward, check_finite=check_finite, phase=phase, step=pos.step)
                _optimizer_step(accelerator, step_module, opt, opt_step, sched, terms, max_grad_norm=max_grad_norm)
                window = []
                pos.step += 1
                log.add(terms, inner.method.pop_metrics(), seconds=time.perf_counter() - t_step)
                if on_step is not None:
                    on_step(pos.step, inner.student)

                # ---- log / eval / checkpoint --------------------------------------------------------
                last = pos.step >= total_steps
                if pos.step % max(1, log_every) == 0 or last:
                    log.write(pos.step, epoch, sched.get_last_lr()[0])
                end_of_epoch = n_in_epoch >= len(loader)
                if (eval_every and pos.step % eval_every == 0) or (not eval_every and end_of_epoch) or last:
                    do_eval(epoch)
                if ckpt is not None and ((checkpoint_every and pos.step % checkpoint_every == 0)
                                         or (not checkpoint_every and end_of_epoch) or last):
                    _save_checkpoint(accelerator, ckpt, inner, opt, sched, aug_rng, pos, epoch, n_in_epoch,
                                     elapsed=pos.elapsed + time.perf_counter() - t0, hook=on_step)
                log.progress(pos.step)
                if last:
                    break
    finally:
        log.close()
    if evaluate is not None and (not pos.history or pos.history[-1]["step"] != pos.step):
        do_eval(epochs - 1)
    seconds = pos.elapsed + time.perf_counter() - t0
    student_out = inner.student if skeleton is None else _whole_copy(skeleton, inner.student, device)
    return FitResult(student=student_out, method=inner.method, history=pos.history, steps=pos.step,
                     seconds=seconds, time_shares=log.time_shares())


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory), buffers copied as they are (some,
    like rotary frequencies, are not in the state dict). Ties between parameters are kept."""
    import copy

    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _whole_copy(skeleton: nn.Module, sharded: nn.Module, device: torch.device) -> nn.Module:
    """``skeleton`` (:func:`_meta_copy` of the student before FSDP2 sharded it) holding the trained weights of
    ``sharded``, whole, on ``device`` of every rank: an ordinary module for evaluation and export, as under DDP.
    Every rank must call it (the shards are all-gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    skeleton.load_state_dict(state, assign=True)
    if callable(getattr(skeleton, "tie_weights", None)):  # assign=True replaced tied parameters one by one
        skeleton.tie_weights()
    return skeleton.to(device)


@contextmanager
def _root_gathered(step_module: nn.Module) -> Any:
    """Under FSDP2, the root unit's own parameters (a Hugging Face model's embeddings, final norm, LM head) are
    gathered only by the root's forward; evaluation calls the student directly, so gather them around it (every
    rank evaluates). The layer units gather themselves in their own forward."""
    from torch.distributed.fsdp import FSDPModule

    if not (is_sharded(step_module) and isinstance(step_module, FSDPModule)):
        yield
        return
    step_module.unshard()
    try:
        yield
    finally:
        step_module.reshard()


def _schedule(opt: Any, batches_per_epoch: int, *, grad_accum: int, epochs: int, max_steps: int | None,
              **schedule: Any) -> tuple[int, Any]:
    """``(total optimizer steps, scheduler)``. The scheduler is stepped by the loop once per optimizer step (not
    prepared: Accelerate would step it once per process)."""
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    return total_steps, build_scheduler(opt, total_steps=total_steps, steps_per_epoch=steps_per_epoch, **schedule)


def _direct_calls(accelerator: Any, opt: Any) -> tuple[Callable[[Tensor], None], Callable[[], Any]]:
    """``(backward, optimizer step)`` for the per-step path. Accelerate's wrappers divide the loss by its
    gradient-accumulation steps (always 1 here: the loop accumulates itself, one more op forward and backward) and
    look for loss scalers, XLA and LOMO on every call (~0.1 ms per step together on a small model); where none of
    these applies, the loop calls ``loss.backward()`` and the wrapped optimizer's ``step`` itself, which is what
    the wrappers end up calling (DDP and FSDP hook into ``backward`` through the module, not the wrapper)."""
    from accelerate.utils import DistributedType

    plain = (getattr(accelerator, "scaler", None) is None and accelerator.gradient_accumulation_steps == 1
             and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM,
                                                      DistributedType.XLA))
    if not plain:
        return accelerator.backward, opt.step
    return Tensor.backward, getattr(opt, "optimizer", opt).step


def _optimizer_step(accelerator: Any, step_module: Any, opt: Any, opt_step: Callable[[], Any], sched: Any,
                    terms: dict[str, Tensor], *, max_grad_norm: float | None) -> None:
    """Clip (recording the norm in ``terms``), step the optimizer and the scheduler, clear the gradients."""
    if max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(step_module.parameters(), max_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded (DTensor) gradients is a DTensor too
            norm = norm.full_tensor()
        terms["grad_norm"] = norm.detach().float()
    opt_step()
    sched.step()
    # the wrapped optimizer's own zero_grad: Accelerate's wrapper inspects its signature on every call (~0.1 ms);
    # the loop accumulates gradients itself, so every call here ends a window and clearing is always wanted
    getattr(opt, "optimizer", opt).zero_grad(set_to_none=True)


def _save_checkpoint(accelerator: Any, ckpt: CheckpointManager, inner: DistillStep, opt: Any, sched: Any,
                     aug_rng: np.random.Generator, pos: _Position, epoch: int, batch_in_epoch: int, *,
                     elapsed: float, hook: Any = None) -> None:
    """Everything a resumed run needs to end with the same weights as an uninterrupted one. Under FSDP2 every rank
    writes its own shards of the model and optimizer state (``shards/``, :func:`sharded_state`); the main process
    writes the rest (scheduler, RNG states, position) and publishes the checkpoint."""
    state = {"scheduler": sched.state_dict(), "rng": rng_state(), "aug_rng": aug_rng.bit_generator.state,
             "step": pos.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "history": pos.history,
             "elapsed": elapsed}
    if callable(getattr(hook, "state_dict", None)):  # the on_step hook's own state (e.g. DDK's domain weights)
        state["on_step"] = hook.state_dict()
    if is_sharded(inner):
        ckpt.save(pos.step, state, shards=sharded_state(inner, opt), main=accelerator.is_main_process,
                  barrier=accelerator.wait_for_everyone)
        return
    if accelerator.is_main_process:
        ckpt.save(pos.step, {**state, "student": inner.student.state_dict(), "method": inner.method.state_dict(),
                             "optimizer": opt.state_dict()})
    accelerator.wait_for_everyone()


@dataclass
class _Position:
    """Where a run stands: optimizer steps done, the epoch and batch to continue from, and what a resumed run
    brings back (evaluation history, seconds trained, the RNG state to restore after the first batch)."""

    step: int = 0
    epoch: int = 0
    skip: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    resumed_rng: dict[str, Any] | None = None


def _setup_method(student: nn.Module, method: Method, train_loader: Any, student_forward: Forward,
                  teacher_fn: Callable[[Batch], ModelOutput | None], device: torch.device) -> None:
    """Size the method's own modules (projectors, banks) from one probe batch, before the optimizer exists."""
    student.to(device)
    probe_batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in next(iter(train_loader)).items()}
    info = probe(student, method, probe_batch, student_forward, teacher_fn, len(train_loader.dataset),
                 train_loader=train_loader, teacher_targets_fn=teacher_fn, device=device)
    method.setup(info)
    method.to(device)


def _prepare(accelerator: Any, step_module: DistillStep, train_loader: Any, **optim: Any) -> tuple[Any, Any, Any]:
    """The optimizer over ``student + method``, and Accelerate's prepared module, optimizer and loader."""
    opt = build_optimizer(step_module.parameters(), **optim)
    per_batch, world = train_loader.batch_size, accelerator.num_processes
    if world > 1 and per_batch is not None and per_batch % world:
        raise KDistillError(f"batch_size: got {per_batch} with {world} processes; expected a multiple of the "
                            "process count (batch_size is the global batch, split across the processes). Fix: "
                            f"train.batch_size={per_batch - per_batch % world or world}.")
    return accelerator.prepare(step_module, opt, train_loader)


def _restore(ckpt: CheckpointManager, inner: DistillStep, opt: Any, sched: Any, aug_rng: np.random.Generator,
             batches_per_epoch: int, *, hook: Any = None) -> _Position:
    """Load the newest checkpoint into the models, optimizer, scheduler and RNGs; return where to continue."""
    state = ckpt.load()
    sharded, written_sharded = is_sharded(inner), bool(state.get("sharded", False))
    if sharded != written_sharded:
        raise KDistillError(
            f"checkpoint {str(ckpt.latest())!r} was written by a run {'with' if written_sharded else 'without'} FSDP, "
            f"and this run is {'with' if sharded else 'without'} it; the model and optimizer states are stored "
            "differently. Fix: resume with the launcher config the run started with, or start over without --resume.")
    if sharded:  # every rank reads its own shards
        target = sharded_state(inner, opt)
        ckpt.load_shards(ckpt.latest(), target)
        load_sharded_state(inner, opt, target)
    else:
        inner.student.load_state_dict(state["student"])
        inner.method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if "on_step" in state and callable(getattr(hook, "load_state_dict", None)):
        hook.load_state_dict(state["on_step"])
    set_rng_state(state["rng"])
    aug_rng.bit_generator.state = state["aug_rng"]
    pos = _Position(step=int(state["step"]), epoch=int(state["epoch"]), skip=int(state["batch_in_epoch"]),
                    history=list(state["history"]), elapsed=float(state["elapsed"]), resumed_rng=state["rng"])
    if pos.skip >= batches_per_epoch:
        pos.epoch, pos.skip = pos.epoch + 1, 0
    return pos


def _epoch_batches(accelerator: Any, loader: Any, epoch: int, pos: _Position):
    """The epoch's batches, after the ``pos.skip`` a resumed run already trained on."""
    loader.set_epoch(epoch)
    it = accelerator.skip_first_batches(loader, pos.skip) if pos.skip else loader
    if pos.skip and pos.resumed_rng is not None:
        # Starting a DataLoader iteration (its first batch) draws from the global torch RNG. The uninterrupted
        # run drew for this epoch before the checkpoint: fetch the first batch, then restore, so dropout and
        # other random ops in the remaining steps see the same numbers.
        it = iter(it)
        first = next(it, None)
        set_rng_state(pos.resumed_rng)
        it = it if first is None else itertools.chain([first], it)
    pos.resumed_rng, pos.skip = None, 0
    return it


def _window_step(window: list[Batch], accelerator: Any, step_module: Any, teacher_fn: Callable, augment: Any,
                 aug_rng: np.random.Generator, autocast: Any, backward: Callable[[Tensor], None], *,
                 check_finite: bool, phase: str, step: int) -> dict[str, Tensor]:
    """Forward and backward of the micro-batches of one optimizer step, each scaled by its share of the
    window's examples (or tokens) over all ranks; returns the window's loss terms as detached tensors."""
    world, device = accelerator.num_processes, accelerator.device
    counts = [batch_count(b) for b in window]
    n_global = float(sum(counts))
    if world > 1:
        n_global = float(accelerator.reduce(torch.tensor(n_global, dtype=torch.float64, device=device), "sum"))
    n_global = max(n_global, 1.0)
    terms: dict[str, Tensor] = {}
    for i, mb in enumerate(window):
        if augment is not None:
            mb = augment(mb, aug_rng)
        t_out = teacher_fn(mb)
        sync = i == len(window) - 1  # only the last micro-batch all-reduces gradients
        with (nullcontext() if sync else accelerator.no_sync(step_module)), autocast():
            losses = step_module(mb, t_out)
            if not losses:
                raise KDistillError(f"method {type(accelerator.unwrap_model(step_module).method).__name__} "
                                    "returned no loss terms.")
            total = functools.reduce(operator.add, losses.values())  # sum() adds one more op: 0 + x
        if check_finite and not torch.isfinite(total):
            raise _non_finite(phase, step, losses)
        scale = counts[i] * world / n_global
        backward(total if scale == 1.0 else total * scale)
        # Detached tensors, not floats: no host sync per step (it would stall a GPU).
        w = counts[i] / max(sum(counts), 1.0)
        for k, v in (*losses.items(), ("loss", total)):
            v = v.detach() if w == 1.0 else w * v.detach()
            terms[k] = terms[k] + v if k in terms else v
    return terms


def _evaluated(student: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    was = student.training
    student.eval()
    with torch.no_grad():
        metrics = evaluate(student)
    student.train(was)
    return {k: float(v) for k, v in metrics.items()}


class _Log:
    """Running means of the loss terms between log steps, written to ``metrics.jsonl`` (main process), to
    TensorBoard and to the progress bar."""

    def __init__(self, accelerator: Any, phase: str, out_dir: Path | None, *, tensorboard: bool, progress: bool,
                 total_steps: int, done_steps: int) -> None:
        self.accelerator, self.phase = accelerator, phase
        self.path = out_dir / "metrics.jsonl" if out_dir is not None else None
        self.running: dict[str, Any] = {}  # sums of the float metrics since the last write
        self.tensors: dict[str, list[Tensor]] = {}  # the loss terms of every step since the last write
        self.steps = 0
        self.seconds: dict[str, float] = {}  # every *_seconds over the whole call, for FitResult.time_shares
        main = accelerator.is_main_process
        self.tb = None
        if tensorboard and main and out_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise KDistillError("train.tensorboard: true needs the `tensorboard` package; "
                                    "`pip install tensorboard` or set it to false.") from None
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        self.bar = None
        if progress and main:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{phase}[/]"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task_id = self.bar.add_task(phase, total=total_steps, completed=done_steps, info="")
            self.bar.start()

    def add(self, terms: dict[str, Tensor], metrics: dict[str, float], seconds: float = 0.0) -> None:
        """One optimizer step: its loss terms, the method's metrics and its wall time (``step_seconds``)."""
        for k, v in terms.items():  # kept per step and summed at write: no tensor op on the per-step path
            self.tensors.setdefault(k, []).append(v)
        for k, v in (*metrics.items(), ("step_seconds", seconds)):
            self.running[k] = self.running.get(k, 0.0) + v
            if k.endswith("_seconds"):
                self.seconds[k] = self.seconds.get(k, 0.0) + float(v)
        self.steps += 1

    @staticmethod
    def _ratio(sums: dict[str, Any]) -> dict[str, float]:
        """A method metric ``<name>_seconds`` (time spent inside the steps, e.g. ``generation_seconds``) is also
        written as ``<name>_share``: its sum over the steps divided by theirs (a ratio of sums, so a slow step
        weighs by its length)."""
        total = float(sums.get("step_seconds", 0.0))
        return {k[: -len("_seconds")] + "_share": float(v) / total for k, v in sums.items()
                if k.endswith("_seconds") and k != "step_seconds" and total > 0}

    def _shares(self) -> dict[str, float]:
        return self._ratio(self.running)

    def time_shares(self) -> dict[str, float]:
        return self._ratio(self.seconds)

    def write(self, step: int, epoch: int, lr: float) -> None:
        if not self.steps:
            return
        device = self.accelerator.device
        sums = {**self.running, **{k: torch.stack(v).sum() for k, v in self.tensors.items()}}
        values = {**{k: v / self.steps for k, v in sums.items()}, **self._shares()}
        keys = sorted(values)
        vals = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device) for k in keys])
        if not torch.isfinite(vals).all():  # on accelerators finiteness is checked here, not per step
            raise _non_finite(self.phase, step, {k: v for k, v in zip(keys, vals)})
        if self.accelerator.num_processes > 1:
            vals = self.accelerator.reduce(vals, "mean")
        row = {"phase": self.phase, "step": step, "epoch": epoch, "lr": lr,
               **{k: float(v) for k, v in zip(keys, vals.tolist())}}
        self.running, self.tensors, self.steps = {}, {}, 0
        if not self.accelerator.is_main_process:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{self.phase}/{k}", v, step)
        if self.bar is not None:
            self.bar.update(self.task_id, info=f"loss {row.get('loss', float('nan')):.4f}")

    def eval_row(self, row: dict[str, Any]) -> None:
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{self.phase}/eval_{k}", v, row["step"])

    def progress(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task_id, completed=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()
        self.bar = self.tb = None
