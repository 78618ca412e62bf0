"""2 processes must give the same update as 1 process with the same global batch_size (CPU, gloo, torchrun)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _torchrun() -> str:
    return shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _run(nproc: int, batch: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2] / "src")}
    env.pop("LOCAL_RANK", None)
    cmd = [_torchrun, "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(batch), str(out)]
    cmd[0] = _torchrun()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(out))


@pytest.mark.distributed
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    one = _run(1, 16, tmp_path / "one.safetensors")
    two = _run(2, 16, tmp_path / "two.safetensors")  # batch_size is global: 8 a process
    assert one.keys() == two.keys() and any(k.startswith("method.") for k in one)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), f"{k}: max diff {(one[k] - two[k]).abs().max()}"
    # and the comparison is not vacuous: a different global batch gives different weights
    other = _run(1, 8, tmp_path / "other.safetensors")
    assert any(not torch.allclose(one[k], other[k], atol=1e-5) for k in one)
