"""Run by tests/train/test_distributed.py under `torchrun --nproc_per_node N` (and once with N=1).

Trains an MLP student with fitnet for a few steps with global batch ``B`` (split across the processes) and writes
the final student weights (rank 0) to ``OUT``. No batch norm / dropout: the update must not depend on how the
global batch is split across processes.
"""

import sys

import torch

from kdistill.data import TensorDictDataset, make_loader
from kdistill.io import save_state_dict_atomic
from kdistill.methods.fitnet import FitNet
from kdistill.models import build_mlp
from kdistill.train import end_distributed, fit, make_accelerator


def main(batch: int, out: str) -> None:
    acc = make_accelerator()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 12, generator=g), torch.randint(0, 4, (96,), generator=g)
    torch.manual_seed(1)
    teacher = build_mlp((12,), 4, width=32, depth=2)
    torch.manual_seed(2)
    student = build_mlp((12,), 4, width=8, depth=2)
    method = FitNet("blocks.1", "blocks.1", alpha=0.5)  # has its own projector: it must be synced too
    torch.manual_seed(3)
    res = fit(student=student, method=method, teacher=teacher, accelerator=acc,
              train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), batch, seed=0),
              epochs=2, optimizer="sgd", lr=0.1, momentum=0.0, schedule="constant", progress=False)
    if acc.is_main_process:
        state = {f"student.{k}": v for k, v in res.student.state_dict().items()}
        state.update({f"method.{k}": v for k, v in res.method.state_dict().items()})
        save_state_dict_atomic(out, state)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
    end_distributed(exit_code=0)  # as the CLI: no exit-time gloo teardown race
