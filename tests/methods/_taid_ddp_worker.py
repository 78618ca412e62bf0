"""Run by tests/methods/test_llm_kd_taid_ddp.py under `torchrun --nproc_per_node 2`.

Each rank feeds llm_kd (loss taid) a different micro-batch (so a different local loss) for a few steps,
then writes its TAID state (t, step, momentum, previous loss) to OUT.rank<r>.
"""

import sys

import torch
import torch.distributed as dist

from kdistill.io import save_state_dict_atomic
from kdistill.methods.base import ModelOutput
from kdistill.methods.llm_kd import LLMKD
from kdistill.train.loop import end_distributed


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    m = LLMKD(loss="taid", loss_kwargs={"total_steps": 10}).train()
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(4):
        s = torch.randn(2, 5, 11, generator=g, requires_grad=True)
        t = torch.randn(2, 5, 11, generator=g) * (1 + rank)
        batch = {"labels": torch.zeros(2, 5, dtype=torch.long), "mask": torch.ones(2, 5, dtype=torch.bool)}
        sum(m(ModelOutput(s), ModelOutput(t), batch).values()).backward()
    save_state_dict_atomic(f"{out}.rank{rank}", {"taid_state": m.taid_state.clone()})


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(exit_code=0)  # as the CLI: no exit-time gloo teardown race
