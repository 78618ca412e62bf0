"""A real wheel install: built from this tree, installed into an empty folder, run from outside the repository."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kdistill.recipes import list_recipes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_ships_every_recipe_and_runs_one(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, text=True)
    (whl,) = wheels.glob("kdistill-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(whl).namelist() if n.endswith(".yaml")}
    launchers = {n for n in in_wheel if n.startswith("kdistill/recipes/accelerate/")}
    assert launchers == {"kdistill/recipes/accelerate/ddp.yaml", "kdistill/recipes/accelerate/fsdp.yaml"}
    assert len(in_wheel - launchers) == len(list_recipes()) >= 27
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
                   check=True, capture_output=True, text=True)
    # an unrelated recipes/ folder beside the working directory must not be picked up
    work = tmp_path / "elsewhere"
    (work / "recipes" / "llm").mkdir(parents=True)
    (work / "recipes" / "llm" / "unrelated.yaml").write_text("task: llm\n")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdistill.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import kdistill; print(kdistill.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(listed.stdout)["recipes"]) == list_recipes()
    run = cli("run", "llm/tiny", "--output", str(tmp_path / "run"), "--no-progress", "baseline=false")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == "llm" and report["student"]["steps"] == 3
