"""Run by tests/train/test_fsdp.py: under ``accelerate launch --config_file <the shipped fsdp.yaml>`` with 2 CPU
processes, or as one plain process (no launcher, no FSDP) for the reference.

    python _fsdp_worker.py OUT_DIR [crash_at STEP | resume]

Accelerate 1.15 turns FSDP on only for GPU-type processes: on CPUs ``kdistill.train.make_accelerator`` refuses an
FSDP launch rather than silently running DDP, unless ``KDISTILL_CPU_FSDP=1`` (set by the test) asks it to switch
FSDP2 on for CPU processes: it builds Accelerate's FSDP plugin from the launcher's ``FSDP_*`` variables (that is,
from fsdp.yaml) and switches the accelerator's state to FSDP. From there on -- ``prepare`` (auto-wrap by
``_no_split_modules``, the optimizer's parameter swap), ``no_sync``, ``clip_grad_norm_``, the loop's checkpoints and
resume -- it is the code a GPU run executes.

Trains a small student (two ``Block`` layers, listed in ``_no_split_modules`` like a Hugging Face model's decoder
layers) with fitnet (hooks a Block; owns a projector) and AdamW, 2 micro-batches per step, gradient clipping, for 6
optimizer steps with a checkpoint every 2; rank 0 writes the final student and method weights to
``OUT_DIR/weights.safetensors`` and what it saw to ``OUT_DIR/info.json``.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from kdistill.data import TensorDictDataset, make_loader
from kdistill.io import save_state_dict_atomic
from kdistill.methods.fitnet import FitNet
from kdistill.models import build_mlp
from kdistill.train import end_distributed, fit, make_accelerator


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.relu(self.linear(x))


class Student(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(12, 8), Block(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


class Interrupted(Exception):
    pass


def accelerator():
    acc = make_accelerator()
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        assert acc.is_fsdp2, "fsdp.yaml should ask for FSDP2"
    return acc


def full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors of a possibly sharded module (every rank calls this: DTensor shards are all-gathered)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in
            module.state_dict().items()}


def main(out: Path, mode: str, arg: int | None) -> None:
    acc = accelerator()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 12, generator=g), torch.randint(0, 4, (96,), generator=g)
    torch.manual_seed(1)
    teacher = build_mlp((12,), 4, width=16, depth=2)
    torch.manual_seed(2)
    student = Student()
    method = FitNet("blocks.1", "blocks.1", alpha=0.5)
    initial = {k: v.clone() for k, v in student.state_dict().items()}

    def on_step(step: int, _student: nn.Module) -> None:
        if mode == "crash_at" and step == arg:
            raise Interrupted(step)

    if mode == "resume":
        torch.manual_seed(12345)  # a resumed process starts from other global RNG state
    try:
        res = fit(student=student, method=method, teacher=teacher, accelerator=acc,
                  train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16, seed=0), epochs=2, grad_accum=2,
                  optimizer="adamw", lr=0.02, schedule="cosine", warmup_steps=1, max_grad_norm=0.5, progress=False,
                  output_dir=out / "run", checkpoint_every=2, resume=mode == "resume", on_step=on_step, seed=0)
    except Interrupted as e:
        if acc.is_main_process:
            (out / "info.json").write_text(json.dumps({"crashed_at": e.args[0]}))
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # FSDP2 sharded `student` in place; fit hands back a whole copy of it (an ordinary module, as under DDP)
    units = sorted(n for n, m in student.named_modules() if isinstance(m, FSDPModule))
    local = {k: v.to_local().numel() for k, v in student.state_dict().items() if isinstance(v, DTensor)}
    returned_whole = not any(isinstance(v, DTensor) for v in res.student.state_dict().values()) and \
        not isinstance(res.student, FSDPModule)
    state = {f"student.{k}": v for k, v in full(res.student).items()}
    state.update({f"method.{k}": v for k, v in full(res.method).items()})
    if acc.is_main_process:
        save_state_dict_atomic(out / "weights.safetensors", state)
        (out / "info.json").write_text(json.dumps({
            "world": acc.num_processes, "distributed_type": str(acc.distributed_type), "fsdp_units": units,
            "local_numel": local, "full_numel": {k[len("student."):]: v.numel() for k, v in state.items()
                                                 if k.startswith("student.")},
            "steps": res.steps, "returned_whole": returned_whole,
            "moved": max(float((state[f"student.{k}"] - v).abs().max()) for k, v in initial.items())}))
    acc.wait_for_everyone()


if __name__ == "__main__":
    out_dir, mode = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "full")
    main(out_dir, mode, int(sys.argv[3]) if len(sys.argv) > 3 else None)
    end_distributed(exit_code=0)
