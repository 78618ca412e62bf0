"""The CLI end to end on a tiny recipe: run, resume after kill -9, list, eval, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdistill.cli import app
from kdistill.io import load_state_dict

TINY = """
name: tiny_digits
task: classification
seed: 3
data: {name: digits}
teacher:
  model: {name: mlp, kwargs: {width: 64, depth: 2}}
  train: {epochs: 4, batch_size: 64, lr: 0.003, log_every: 5}
student: {name: mlp, kwargs: {width: 16, depth: 1}}
method: {name: hinton_kd, kwargs: {kd_temperature: 2.0, alpha: 0.9}}
augment: {name: mixup, kwargs: {alpha: 0.4}}
train: {epochs: EPOCHS, batch_size: 32, lr: 0.003, log_every: 5, checkpoint_every: 4, eval_every: 8}
variants:
  plain: {method: {name: hinton_kd}}
eval: {latency_repeats: 3}
"""

runner = CliRunner()


def write_recipe(tmp_path: Path, epochs: int = 3) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.replace("EPOCHS", str(epochs)))
    return p


def test_list_shows_methods_models_datasets_recipes():
    r = runner.invoke(app, ["list", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {"none", "hinton_kd", "fitnet"} <= set(d["methods"])
    assert {"mlp", "cnn"} <= set(d["models"]) and {"mnist1d", "digits", "fashion_mnist"} <= set(d["datasets"])
    assert "classic/mnist1d" in d["recipes"]


def test_run_eval_export(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", str(recipe), "--output", str(out), "--no-progress", "train.lr=0.004"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    for key in ("recipe", "task", "method", "seed", "teacher", "student", "baseline", "variants", "agreement",
                "wall_seconds"):
        assert key in rep
    assert rep["seed"] == 3 and rep["method"] == "hinton_kd" and "plain" in rep["variants"]
    for who in ("teacher", "student"):
        assert rep[who]["params"] > 0 and rep[who]["latency_ms"] > 0 and 0 <= rep[who]["metrics"]["accuracy"] <= 1
    assert 0 <= rep["agreement"]["top1_agreement"] <= 1
    assert (out / "report.md").read_text().count("|") > 10 and (out / "curves.png").stat().st_size > 1000
    assert "teacher" in r.output and "baseline" in r.output  # the comparison table was printed

    r = runner.invoke(app, ["eval", str(out)])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["metrics"]["accuracy"] == pytest.approx(rep["student"]["metrics"]["accuracy"])

    r = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "exported")])
    assert r.exit_code == 0, r.output
    ex = json.loads(r.output)
    assert ex["max_abs_diff"] == 0.0
    exported = load_state_dict(tmp_path / "exported" / "model.safetensors")
    original = load_state_dict(out / "student" / "model.safetensors")
    assert exported.keys() == original.keys() and not any("projector" in k or "method" in k for k in exported)


def test_bad_input_gives_clear_error(tmp_path):
    recipe = write_recipe(tmp_path)
    r = runner.invoke(app, ["run", str(recipe), "--output", str(tmp_path / "x"), "method.kwargs.temprature=3"])
    assert r.exit_code == 2 and "kd_temperature" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path)])
    assert r.exit_code == 2 and "model.json" in r.output


@pytest.mark.slow
def test_resume_after_kill_9_matches_uninterrupted(tmp_path):
    recipe = write_recipe(tmp_path, epochs=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdistill.cli", "run", str(recipe), "--no-progress"]
    ref = subprocess.run(cmd + ["--output", str(tmp_path / "ref")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--output", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # kill in the middle of the main student phase, after at least one checkpoint exists
    while time.time() < deadline and not (out / "work" / "student" / "checkpoints" / "latest.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists(), "the run finished before it could be killed; make it longer"

    res = subprocess.run(cmd + ["--output", str(out), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a = json.loads((tmp_path / "ref" / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    for who in ("student", "baseline"):
        assert a[who]["metrics"] == b[who]["metrics"], who
    assert a["variants"]["plain"]["metrics"] == b["variants"]["plain"]["metrics"]
    for phase in ("student", "baseline", "plain", "teacher"):
        wa = load_state_dict(tmp_path / "ref" / phase / "model.safetensors")
        wb = load_state_dict(out / phase / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), phase


@pytest.mark.distributed
@pytest.mark.slow
def test_run_with_nproc_2_uses_torchrun(tmp_path):
    recipe = write_recipe(tmp_path, epochs=1)
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "kdistill.cli", "run", str(recipe), "--output", str(out), "--nproc", "2",
                        "--no-progress"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["student"]["metrics"]["accuracy"] > 0
    # the metrics log was written once (by rank 0), each step once
    steps = [json.loads(ln)["step"] for ln in (out / "work" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    # batch_size is the global batch: one process takes the same steps and reaches the same result (the two runs
    # differ only in the mixup draws, which are per process, and in how the last partial batch is split)
    one = runner.invoke(app, ["run", str(recipe), "--output", str(tmp_path / "one"), "--no-progress"])
    assert one.exit_code == 0, one.output
    ref = json.loads((tmp_path / "one" / "report.json").read_text())
    def steps(run: Path) -> int:
        return json.loads((run / "student" / "history.json").read_text())["steps"]

    assert steps(out) == steps(tmp_path / "one")
    for who in ("student", "baseline"):
        assert abs(rep[who]["metrics"]["accuracy"] - ref[who]["metrics"]["accuracy"]) < 0.04, who


@pytest.mark.distributed
@pytest.mark.slow
def test_a_user_error_under_nproc_2_is_reported_once_without_a_traceback(tmp_path):
    """The ranks hand a user error to the launcher, which prints it once (no per-rank copies, no torchrun
    ChildFailedError traceback)."""
    recipe = write_recipe(tmp_path, epochs=1)
    r = subprocess.run([sys.executable, "-m", "kdistill.cli", "run", str(recipe), "--output", str(tmp_path / "ddp"),
                        "--nproc", "2", "--no-progress", "train.batch_size=33", "teacher.train.batch_size=33"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.count("batch_size: got 33 with 2 processes") == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
