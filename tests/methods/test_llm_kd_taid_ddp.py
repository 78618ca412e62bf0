"""TAID's adaptive t must be the same on every rank: its update uses the loss averaged over ranks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_taid_ddp_worker.py")


@pytest.mark.distributed
def test_taid_t_is_identical_across_ranks(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2] / "src")}
    out = tmp_path / "state"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(WORKER), str(out)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(f"{out}.rank0")["taid_state"]
    b = load_file(f"{out}.rank1")["taid_state"]
    assert torch.equal(a, b)
    assert a[1] == 4 and a[0] > 0.4  # four updates happened and t moved up from t_start
