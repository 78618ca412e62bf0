"""FSDP2 on CPU (gloo): `fit` under the shipped Accelerate fsdp.yaml with 2 processes gives the same update as one
process on the whole batch, its checkpoints resume to the same weights as an uninterrupted run, and hooks resolve by
the unwrapped model's names under FSDP1 and FSDP2. KDISTILL_CPU_FSDP=1 switches FSDP2 on for the CPU processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.errors import KDistillError
from kdistill.recipes import launcher_config
from kdistill.train import make_accelerator
from kdistill.train.checkpoint import CheckpointManager
from kdistill.train.loop import CPU_FSDP_ENV

HERE = Path(__file__).parent
WORKER, CAPTURE_WORKER = HERE / "_fsdp_worker.py", HERE / "_fsdp_capture_worker.py"
LLM_WORKER = HERE / "_fsdp_llm_worker.py"
SHAPES = {"blocks.0.linear.weight": (8, 12), "blocks.0.linear.bias": (8,), "blocks.1.linear.weight": (8, 8),
          "blocks.1.linear.bias": (8,), "head.weight": (4, 8), "head.bias": (4,)}


def _env() -> dict[str, str]:
    # CPU processes (gloo) even on a GPU machine: this is the CPU check of FSDP
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src"), "CUDA_VISIBLE_DEVICES": ""}
    for k in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_")) or k in ("LOCAL_RANK", "RANK", "WORLD_SIZE")]:
        del env[k]
    env[CPU_FSDP_ENV] = "1"  # FSDP2 on CPU processes (make_accelerator refuses an FSDP launch on CPUs otherwise)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


def _fsdp(out: Path, *args: str, check: bool = True, worker: Path = WORKER) -> subprocess.CompletedProcess:
    """The worker under `accelerate launch` with the shipped fsdp.yaml, 2 processes."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [_bin("accelerate"), "launch", "--config_file", str(launcher_config("fsdp")), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(worker), str(out), *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 or not check, r.stderr[-4000:]
    return r


def _plain(out: Path, *args: str, worker: Path = WORKER) -> subprocess.CompletedProcess:
    """The worker as one ordinary process (no launcher, no FSDP)."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(worker), str(out), *args], env=_env(), capture_output=True, text=True,
                          timeout=240)


def _info(out: Path) -> dict:
    return json.loads((out / "info.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    r = _plain(root / "plain")
    assert r.returncode == 0, r.stderr[-4000:]
    _fsdp(root / "fsdp")
    return root


@pytest.mark.distributed
def test_fsdp_two_processes_equal_one_process_on_the_whole_batch(runs):
    info = _info(runs / "fsdp")
    assert info["world"] == 2 and info["distributed_type"] == "DistributedType.FSDP" and info["steps"] == 6
    # TRANSFORMER_BASED_WRAP found the student's _no_split_modules through DistillStep: each Block is its own unit
    assert info["fsdp_units"] == ["blocks.0", "blocks.1"]
    # every parameter really is split in two (dimension 0 of every tensor here is even)
    assert info["full_numel"] == {k: torch.Size(s).numel() for k, s in SHAPES.items()}
    assert info["local_numel"] == {k: n // 2 for k, n in info["full_numel"].items()}
    assert info["returned_whole"]  # fit returns an ordinary module holding the whole trained weights
    one = load_file(str(runs / "plain" / "weights.safetensors"))
    two = load_file(str(runs / "fsdp" / "weights.safetensors"))
    assert one.keys() == two.keys() and any(k.startswith("method.") for k in one)  # fitnet's projector too
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), f"{k}: max diff {(one[k] - two[k]).abs().max()}"
    # and the comparison is not vacuous: training moved the weights well beyond the tolerance
    assert _info(runs / "plain")["moved"] > 1e-2 and info["moved"] > 1e-2

@pytest.mark.distributed
def test_fsdp_checkpoint_resumes_to_the_uninterrupted_weights(runs, tmp_path):
    part = tmp_path / "part"
    _fsdp(part, "crash_at", "3")
    assert _info(part) == {"crashed_at": 3}
    ckpt = CheckpointManager(part / "run" / "checkpoints")
    assert ckpt.latest().name == "step-000000002"
    state = ckpt.load()
    # each rank wrote its own shards (torch.distributed.checkpoint); the main process only the rest
    assert state["sharded"] is True and state["step"] == 2 and state["batch_in_epoch"] == 4
    assert not any(k in state for k in ("student", "method", "optimizer"))
    shards = ckpt.latest() / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    # the whole model and AdamW state are indexed, by parameter name (fitnet's projector too)
    for k, shape in SHAPES.items():
        assert tuple(meta[f"model.student.{k}"].size) == shape
        assert tuple(meta[f"optimizer.state.student.{k}.exp_avg"].size) == shape
    assert any(k.startswith("model.method.") for k in meta)
    # no leftovers of the temporary folder
    assert not list((part / "run" / "checkpoints").glob(".step-*"))
    # a run without FSDP refuses this checkpoint (its optimizer state is stored another way) and says why
    refused = _plain(part, "resume")
    assert refused.returncode != 0 and "written by a run with FSDP" in refused.stderr
    _fsdp(part, "resume")
    assert _info(part)["steps"] == 6
    resumed = load_file(str(part / "weights.safetensors"))
    full = load_file(str(runs / "fsdp" / "weights.safetensors"))
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.allclose(resumed[k], full[k], atol=1e-6, rtol=0), f"{k}: {(resumed[k] - full[k]).abs().max()}"


@pytest.mark.distributed
def test_hooks_resolve_by_name_under_fsdp1_and_fsdp2(tmp_path):
    out = tmp_path / "capture.json"
    cmd = [_bin("torchrun"), "--standalone", "--nproc_per_node=2", str(CAPTURE_WORKER), str(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(out.read_text())
    # FSDP2 keeps the object (its class becomes a subclass); FSDP1 wraps it and unwrap strips the wrapper
    assert report["fsdp2"]["outer"] == report["fsdp2"]["unwrapped"] == "FSDPStudent"
    assert report["fsdp1"]["outer"] == "FullyShardedDataParallel" and report["fsdp1"]["unwrapped"] == "Student"
    # FSDP1 names its auto-wrapped layers `blocks.1._fsdp_wrapped_module.linear`; the plain names still resolve,
    # to the wrapped modules themselves
    assert report["fsdp1"]["resolved"] == {"blocks.1": "Block", "blocks.1.linear": "Linear", "head": "Linear"}
    assert report["fsdp2"]["resolved"] == {"blocks.1": "FSDPBlock", "blocks.1.linear": "Linear", "head": "Linear"}
    for kind in ("fsdp1", "fsdp2"):
        assert all(d < 1e-6 for d in report[kind]["max_diff"].values()), (kind, report[kind]["max_diff"])
        assert report[kind]["hooks_left"] == 0
        err = report[kind]["unknown_name_error"]
        assert "Did you mean 'blocks.1.linear'" in err and "_fsdp_wrapped_module" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="Accelerate enables FSDP on GPUs")
def test_an_fsdp_launch_on_cpus_is_refused_not_run_as_ddp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv(CPU_FSDP_ENV, raising=False)
    with pytest.raises(KDistillError, match="enables FSDP only on GPUs") as e:
        make_accelerator()
    assert "ddp.yaml" in str(e.value) and CPU_FSDP_ENV in str(e.value)


@pytest.mark.distributed
def test_llm_fused_head_under_fsdp_shards_the_teacher_and_equals_one_process(tmp_path):
    r = _plain(tmp_path / "plain", worker=LLM_WORKER)
    assert r.returncode == 0, r.stderr[-4000:]
    _fsdp(tmp_path / "fsdp", worker=LLM_WORKER)
    plain, info = _info(tmp_path / "plain"), _info(tmp_path / "fsdp")
    assert info["world"] == 2 and info["steps"] == plain["steps"] == 4
    # every teacher tensor is split in two on each rank: decoder layers, and at the root the embeddings, final norm
    # and LM head, which the fused loss reads through a gathered copy
    assert info["teacher_sharded"] == {k: n // 2 for k, n in info["teacher_full"].items()}
    assert not info["teacher_head_is_plain"]
    assert plain["teacher_sharded"] == {} and "lm_head.weight" in info["student_sharded"]
    # the student (tied embeddings, fused forward KL on both models' hidden states + LM heads) trains as on one
    # process over the whole batch
    one = load_file(str(tmp_path / "plain" / "weights.safetensors"))
    two = load_file(str(tmp_path / "fsdp" / "weights.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-5), f"{k}: max diff {(one[k] - two[k]).abs().max()}"
    assert plain["moved"] > 1e-2


@pytest.mark.distributed
@pytest.mark.slow
def test_kdistill_run_llm_under_fsdp_equals_one_process(tmp_path):
    """The whole llm task under the shipped fsdp.yaml (2 CPU processes): evaluation during and after training, the
    report and the saved student, from a run whose student and teacher layers were sharded."""
    cmd = [_bin("accelerate"), "launch", "--config_file", str(launcher_config("fsdp")), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "kdistill.cli", "run", "llm/tiny", "--output",
           str(tmp_path / "fsdp"), "--no-progress", "train.eval_every=2"]
    env = {**_env(), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([sys.executable, "-m", "kdistill.cli", "run", "llm/tiny", "--output", str(tmp_path / "one"),
                        "--no-progress", "train.eval_every=2"], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "fsdp"))
    for row in ("baseline", "student"):
        a, b = one[row]["metrics"]["perplexity"], two[row]["metrics"]["perplexity"]
        assert abs(a - b) <= 1e-4 * a, (row, a, b)
    w1 = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "fsdp" / "student" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5), f"{k}: {(w1[k] - w2[k]).abs().max()}"
