"""Task ``diffusion``: the toy datasets, the recipe schema, a whole run of the tiny recipe (teacher, evaluator, student,
report, grids), resume, the cached teacher, ``kdistill sample`` and export of the student."""

from __future__ import annotations

import json

import pytest
import torch

import kdistill
from kdistill.config import load_config
from kdistill.data.generative import load_generative
from kdistill.errors import KDistillError

FAST = ["train.max_steps=3", "teacher.train.max_steps=40", "eval.samples=64", "eval.teacher_steps=8",
        "eval.latency_repeats=1"]


def test_toy_datasets():
    ring = load_generative("ring", num_samples=400, modes=4, radius=2.0, std=0.05)
    assert ring.sample_shape == (2,) and ring.num_classes == 4 and len(ring.y_train) + len(ring.y_test) == 400
    angle = torch.atan2(ring.x_train[:, 1], ring.x_train[:, 0])  # class c sits at angle 2 pi c / 4
    expect = 2 * torch.pi * ring.y_train / 4
    assert float(torch.remainder(angle - expect + torch.pi, 2 * torch.pi).sub(torch.pi).abs().max()) < 0.2
    moons = load_generative("two_moons", num_samples=200)
    assert moons.num_classes == 2
    torch.testing.assert_close(torch.cat([moons.x_train, moons.x_test]).std(0, unbiased=False), torch.ones(2),
                               atol=1e-4, rtol=0)


@pytest.mark.resources
def test_fashion_mnist_in_signed_range():
    d = load_generative("fashion_mnist", num_train=500)
    assert d.image and d.sample_shape == (1, 28, 28) and len(d.y_train) == 500
    assert float(d.x_train.min()) == -1.0 and float(d.x_train.max()) == 1.0


@pytest.mark.parametrize("override,match", [
    ("train.max_steps=null", "max_steps"),
    ("guidance_scale=0.5", "guidance_scale"),
    ("eval.steps=[]", "eval.steps"),
    ("data.kwargs.modez=3", "modes"),
    ("variants.teacher_x.method=denoising", "reserved"),
])
def test_recipe_schema_errors(override, match):
    with pytest.raises((KDistillError, ValueError), match=match):
        load_config("diffusion/tiny", [override])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion") / "run"
    report = kdistill.run("diffusion/tiny", output=out, overrides=FAST + ["method=denoising"], progress=False,
                          quiet=True)
    return out, report


def test_tiny_run_report_rows_and_grids(tiny_run):
    out, report = tiny_run
    assert report["task"] == "diffusion" and report["method"] == "denoising"
    t = report["teacher"]
    assert t["steps"] == 8 and set(t["by_steps"]) == {"1", "2", "4"}
    assert report["baseline"]["by_steps"] == t["by_steps"]
    s = report["student"]
    assert s["sampler"] == "ddim" and s["train_steps"] == 3 and set(s["by_steps"]) == {"1", "2", "4"}
    for m in [t["metrics"], *t["by_steps"].values(), *s["by_steps"].values()]:
        assert m["fid"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 0 <= m["accuracy"] <= 1
        assert m["ms_per_sample"] > 0
    assert "mse_to_teacher" not in t["metrics"] and "mse_to_teacher" in s["metrics"]
    # more teacher steps: closer to the reference teacher's samples from the same noise
    mse = [t["by_steps"][n]["mse_to_teacher"] for n in ("1", "2", "4")]
    assert mse[2] < mse[0]
    for tag in ("teacher_8_steps", "teacher_1_steps", "student_4_steps"):
        assert (out / "samples" / f"{tag}.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Samples by step count" in md and "samples/student_1_steps.png" in md
    saved = json.loads((out / "student" / "model.json").read_text())
    assert saved["sampler"] == "ddim" and saved["schedule"] == {"num_timesteps": 1000, "kind": "cosine"}


def test_resume_after_the_end_reuses_every_phase(tiny_run):
    out, report = tiny_run
    again = kdistill.run("diffusion/tiny", output=out, overrides=FAST + ["method=denoising"], resume=True,
                         progress=False, quiet=True)
    assert again["teacher"]["source"].startswith("reused")
    assert again["student"]["by_steps"]["1"]["fid"] == pytest.approx(report["student"]["by_steps"]["1"]["fid"])


def test_sample_command_and_export(tiny_run, tmp_path):
    out, _ = tiny_run
    res = kdistill.sample(out, n=16, steps=2, out=tmp_path / "s.png")
    assert res["sampler"] == "ddim" and res["steps"] == 2 and (tmp_path / "s.png").stat().st_size > 1000
    t = kdistill.sample(out, n=8, steps=3, model="teacher", out=tmp_path / "t.png")
    assert t["sampler"] == "ddim"
    with pytest.raises(KDistillError, match="no model 'nope'"):
        kdistill.sample(out, model="nope")
    with pytest.raises(KDistillError, match="not a diffusion run"):
        kdistill.sample(tmp_path)
    exp = kdistill.export(out, tmp_path / "exported")
    assert exp["max_abs_diff"] == 0.0
    assert json.loads((tmp_path / "exported" / "model.json").read_text())["sampler"] == "ddim"


def test_sample_cli(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from kdistill.cli import app

    out, _ = tiny_run
    r = CliRunner().invoke(app, ["sample", str(out), "--n", "8", "--steps", "1", "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n"] == 8 and (tmp_path / "c.png").is_file()


def test_students_of_two_seeds_share_one_cached_teacher(tmp_path):
    # a teacher setting no other test uses, so this test's first run trains it
    over = FAST + ["method=denoising", "teacher.reuse=true", "eval.steps=[1]", "teacher.train.lr=0.00291"]
    first = kdistill.run("diffusion/tiny", output=tmp_path / "a", overrides=over, progress=False, quiet=True)
    second = kdistill.run("diffusion/tiny", output=tmp_path / "b", overrides=over + ["seed=1"], progress=False,
                          quiet=True)
    assert first["teacher"]["source"] == "trained" and second["teacher"]["source"].startswith("reused (cache")
    assert first["teacher"]["params"] == second["teacher"]["params"]
