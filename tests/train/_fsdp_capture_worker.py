"""Run by tests/train/test_fsdp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo).

    python _fsdp_capture_worker.py OUT_JSON

Shards a copy of the test student with FSDP2 (``fully_shard`` per Block, then the root, as Accelerate does) and
another with FSDP1 (``FullyShardedDataParallel`` auto-wrapping each Block), then captures layers by the names of the
unwrapped model. Rank 0 writes, per kind, what ``unwrap`` returned, the largest difference of each captured feature
from the unsharded model's, the hooks capture left behind, and the close matches a misspelt name gets.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from _fsdp_worker import Block, Student
from torch import nn

from kdistill.capture import capture, resolve_modules, unwrap
from kdistill.errors import UnknownNameError

NAMES = ["blocks.1", "blocks.1.linear", "head"]


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def shard(model: nn.Module, kind: str) -> nn.Module:
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                                    device_id=torch.device("cpu"))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    ref = Student()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))  # the same on every rank
    with torch.no_grad(), capture(ref, NAMES) as expected:
        ref(x)
    report = {}
    for kind in ("fsdp2", "fsdp1"):
        model = shard(copy.deepcopy(ref), kind)
        hooks_before = n_hooks(model)  # FSDP2 registers forward hooks of its own
        with torch.no_grad(), capture(model, NAMES) as feats:
            model(x)
        try:
            resolve_modules(model, ["blocks.1.lineer"])
            close = None
        except UnknownNameError as e:
            close = str(e)
        report[kind] = {
            "outer": type(model).__name__, "unwrapped": type(unwrap(model)).__name__,
            "resolved": {n: type(m).__name__ for n, m in resolve_modules(model, NAMES).items()},
            "max_diff": {n: float((feats[n] - expected[n]).abs().max()) for n in NAMES},
            "hooks_left": n_hooks(model) - hooks_before,
            "unknown_name_error": close,
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    from kdistill.train import end_distributed

    end_distributed(exit_code=0)
