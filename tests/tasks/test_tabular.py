"""The ``tabular`` task: a scikit-learn teacher distilled into an MLP, end to end on a tiny budget."""

import json

import pytest

import kdistill.tasks  # noqa: F401
from kdistill.config import load_config
from kdistill.errors import ConfigError


def test_recipe_rejects_feature_methods_and_unknown_estimators():
    with pytest.raises(ConfigError, match="no layers"):
        load_config("classic/tabular_wine", ["method=rkd"])
    with pytest.raises(ConfigError, match="hist_gradient_boosting"):
        load_config("classic/tabular_wine", ["teacher.estimator=hist_gradient_boost"])


def test_tabular_run_reports_teacher_baseline_and_students(tmp_path, monkeypatch):
    from kdistill.api import run

    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    report = run("classic/tabular_wine", output=tmp_path / "run", progress=False, quiet=True,
                 overrides=["train.epochs=1", "train.max_steps=3", "teacher.kwargs.max_iter=20",
                            "eval.latency_repeats=2"])
    assert report["task"] == "tabular"
    assert report["teacher"]["metrics"]["accuracy"] > 0.8  # gradient boosting on wine
    for key in ("baseline", "student"):
        assert 0.0 <= report[key]["metrics"]["accuracy"] <= 1.0
    assert "kd_mixup" in report["variants"]
    assert report["teacher"]["params"] > 0  # tree nodes
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["student"]["metrics"] == report["student"]["metrics"]
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
