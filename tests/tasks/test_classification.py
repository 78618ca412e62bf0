
import pytest
import torch

from kdistill import run
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.io import load_state_dict

RECIPE = {
    "name": "tiny", "task": "classification", "seed": 1,
    "data": {"name": "wine"},
    "teacher": {"model": {"name": "mlp", "kwargs": {"width": 32}},
                "train": {"epochs": 8, "batch_size": 16, "lr": 0.01}},
    "student": {"name": "mlp", "kwargs": {"width": 4, "depth": 1}},
    "method": {"name": "hinton_kd", "kwargs": {"kd_temperature": 2.0}},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.01},
    "eval": {"latency_repeats": 2},
}


def test_teacher_logit_cache_gives_the_same_student(tmp_path):
    a = run(RECIPE, output=tmp_path / "cached", progress=False, quiet=True)
    b = run({**RECIPE, "teacher_cache": False}, output=tmp_path / "live", progress=False, quiet=True)
    wa = load_state_dict(tmp_path / "cached" / "student" / "model.safetensors")
    wb = load_state_dict(tmp_path / "live" / "student" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert a["student"]["metrics"]["accuracy"] == pytest.approx(b["student"]["metrics"]["accuracy"], abs=0.02)


def test_teacher_is_reused_by_fingerprint_and_retrained_when_settings_change(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    first = run(RECIPE, output=tmp_path / "one", progress=False, quiet=True)
    second = run(RECIPE, output=tmp_path / "two", progress=False, quiet=True)
    assert first["teacher"]["source"] == "trained"
    assert second["teacher"]["source"].startswith("reused")
    assert first["teacher"]["metrics"] == second["teacher"]["metrics"]
    changed = run({**RECIPE, "teacher": {**RECIPE["teacher"], "train": {"epochs": 2, "batch_size": 16}}},
                  output=tmp_path / "three", progress=False, quiet=True)
    assert changed["teacher"]["source"] == "trained"


def test_baseline_and_students_start_from_the_same_weights(tmp_path):
    rep = run({**RECIPE, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-9}}, output=tmp_path, progress=False,
              quiet=True)
    a = load_state_dict(tmp_path / "baseline" / "model.safetensors")
    b = load_state_dict(tmp_path / "student" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # lr ~ 0: both stay at the shared init
    assert rep["baseline"]["params"] == rep["student"]["params"]


def test_reserved_variant_name_is_rejected():
    with pytest.raises(ConfigError, match="reserved"):
        load_config({**RECIPE, "variants": {"baseline": {"method": "hinton_kd"}}})


def test_hard_augment_is_bound_by_the_runner(tmp_path):
    rep = run({**RECIPE, "augment": {"name": "hard_augment", "kwargs": {"num_candidates": 2}}, "baseline": False,
               "train": {"epochs": 1, "batch_size": 16, "lr": 0.01}}, output=tmp_path, progress=False, quiet=True)
    assert rep["student"]["augment"]["name"] == "hard_augment"
    assert 0 <= rep["student"]["metrics"]["accuracy"] <= 1


@pytest.mark.gpu
def test_classification_run_on_cuda(tmp_path, monkeypatch):
    """Teacher, baseline and students train on the GPU; evaluation and latency follow the weights there."""
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    report = run({**RECIPE, "variants": {"feat": {"method": {"name": "fitnet", "kwargs": {
        "student_layer": "blocks.0", "teacher_layer": "blocks.1"}}}}}, output=tmp_path / "run", progress=False,
        quiet=True)
    for who in ("teacher", "student", "baseline"):
        assert 0.0 <= report[who]["metrics"]["accuracy"] <= 1.0
    assert report["student"]["latency_ms"] > 0 and "feat" in report["variants"]


def test_two_teachers_are_distilled_from_their_weighted_mixture(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    two = {k: v for k, v in RECIPE.items() if k != "teacher"}
    two["teachers"] = [RECIPE["teacher"], {**RECIPE["teacher"], "model": {"name": "mlp", "kwargs": {"width": 16}}}]
    two["teacher_weights"] = [2.0, 1.0]
    rep = run(two, output=tmp_path / "run", progress=False, quiet=True)
    members = rep["teacher"]["members"]
    assert len(members) == 2 and rep["teacher"]["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert rep["teacher"]["params"] == sum(m["params"] for m in members)
    assert (tmp_path / "run" / "teacher_0").is_dir() and (tmp_path / "run" / "teacher_1").is_dir()
    with pytest.raises(ConfigError, match="exactly one of `teacher:`"):
        load_config({**two, "teacher": RECIPE["teacher"]})
    with pytest.raises(ConfigError, match="teacher_weights"):
        load_config({**two, "teacher_weights": [1.0]})
    with pytest.raises(ConfigError, match="reads teacher features"):
        load_config({**two, "method": {"name": "fitnet", "kwargs": {"student_layer": "blocks.0",
                                                                    "teacher_layer": "blocks.0"}}})
