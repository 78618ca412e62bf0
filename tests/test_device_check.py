"""benchmarks/device_check.sh without a GPU: its dry run finds every command and flag (and notices a missing one),
a real run stops at once saying there is no CUDA device, and the report combines the steps' outputs."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def _report_module():
    spec = importlib.util.spec_from_file_location("device_check_report", ROOT / "benchmarks" / "device_check_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bash(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_finds_every_script_and_flag():
    r = _bash(SCRIPT, "--dry-run")
    assert r.returncode == 0, r.stderr
    steps = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [s["dry_run"] for s in steps] == ["device_check", "llm_throughput", "llm_memory"]
    assert all("--dtype bfloat16" in s["command"] for s in steps[1:])


def test_dry_run_reports_a_flag_a_script_does_not_have(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    shutil.copy(SCRIPT, bench)
    shutil.copy(ROOT / "benchmarks" / "device_check_report.py", bench)
    flags = {"device_check.py": ["--tokens", "--repeats", "--out"],
             "llm_throughput.py": ["--device", "--batch", "--length", "--rounds"],  # no --dtype
             "llm_memory.py": ["--device", "--dtype", "--vocab", "--tokens", "--variants", "--chunk-sweep", "--rounds",
                               "--out"]}
    for name, opts in flags.items():
        (bench / name).write_text("import argparse\nap = argparse.ArgumentParser()\n"
                                  + "".join(f"ap.add_argument({o!r}, nargs='*')\n" for o in opts) + "ap.parse_args()\n")
    r = _bash(bench / "device_check.sh", "--dry-run")
    assert r.returncode == 1
    assert "llm_throughput.py has no flag --dtype" in r.stderr and "llm_memory.py has no flag" not in r.stderr


def test_without_a_gpu_it_stops_at_once_and_says_why():
    r = _bash(SCRIPT)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and r.stdout == ""
    bad = _bash(SCRIPT, "--tokens")
    assert bad.returncode == 64 and "unknown argument '--tokens'" in bad.stderr


def _step(d: Path, name: str, rc: int, out: str = "", err: str = "", seconds: int = 3) -> None:
    (d / f"{name}.rc").write_text(f"{rc} {seconds}\n")
    (d / f"{name}.out").write_text(out)
    (d / f"{name}.err").write_text(err)


def test_report_combines_the_steps_and_flags_failures(tmp_path):
    combine = _report_module().combine
    (tmp_path / "device_check.json").write_text(json.dumps({"tests": {"returncode": 0, "counts": {"passed": 9}}}))
    _step(tmp_path, "device_check", 0)
    _step(tmp_path, "llm_throughput", 0, "warming up\n" + json.dumps({"kd_step_ms": 4.2}) + "\n")
    rows = [{"vocab": 49152, "tokens": 2048}, {"vocab": 131072, "tokens": 2048}]
    _step(tmp_path, "llm_memory", 0, "".join(json.dumps(r) + "\n[llm_memory] note\n" for r in rows))
    doc = combine(tmp_path)
    assert doc["ok"] and doc["llm_throughput"] == {"kd_step_ms": 4.2} and doc["llm_memory"] == rows
    assert doc["device_check"]["tests"]["counts"] == {"passed": 9}
    assert doc["steps"]["llm_memory"] == {"returncode": 0, "seconds": 3, "timed_out": False, "ok": True,
                                          "stderr_tail": ""}
    # a failed GPU test, a step past its time limit, a step that never ran: each is named, and the whole is not ok
    (tmp_path / "device_check.json").write_text(json.dumps({"tests": {"returncode": 1}}))
    _step(tmp_path, "llm_throughput", 124, err="Traceback ... stuck", seconds=120)
    (tmp_path / "llm_memory.rc").unlink()
    doc = combine(tmp_path)
    assert not doc["ok"]
    assert not doc["steps"]["device_check"]["ok"] and doc["steps"]["device_check"]["returncode"] == 0
    assert doc["steps"]["llm_throughput"]["timed_out"] and "stuck" in doc["steps"]["llm_throughput"]["stderr_tail"]
    assert doc["steps"]["llm_memory"]["stderr_tail"] == "not run" and doc["llm_memory"] is None
