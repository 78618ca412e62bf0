"""The run folder: --resume continues only the same config, a fresh run replaces an earlier one, other folders
are left alone."""

import json

import pytest
from typer.testing import CliRunner

from kdistill.cli import app
from kdistill.errors import KDistillError
from kdistill.rundir import config_differences, prepare_run_folder

CFG = {"name": "a", "description": "x", "method": {"name": "hinton_kd", "kwargs": {"kd_temperature": 4.0}},
       "train": {"lr": 0.003, "epochs": 3}}


def _changed(**train):
    return {**CFG, "method": {"name": "dkd", "kwargs": {}}, "train": {**CFG["train"], **train}}


def test_differences_name_each_changed_result_key_but_not_name_or_description():
    new = {**_changed(lr=0.1), "name": "b", "description": "y"}
    diff = config_differences(CFG, new)
    assert diff == ['method.kwargs.kd_temperature: 4.0 -> (absent)', 'method.name: "hinton_kd" -> "dkd"',
                    "train.lr: 0.003 -> 0.1"]
    assert config_differences(CFG, {**CFG, "name": "other"}) == []


def test_resume_refuses_another_config_and_continues_the_same(tmp_path):
    out = tmp_path / "run"
    assert prepare_run_folder(out, CFG, resume=False) == "fresh"
    (out / "work").mkdir()
    (out / "work" / "ckpt").write_text("state")
    assert prepare_run_folder(out, CFG, resume=True) == "resumed"
    assert (out / "work" / "ckpt").read_text() == "state"
    with pytest.raises(KDistillError, match=r'method.name: "hinton_kd" -> "dkd".*train.lr: 0.003 -> 0.1'):
        prepare_run_folder(out, _changed(lr=0.1), resume=True)
    assert (out / "work" / "ckpt").exists()  # nothing was touched


def test_resume_accepts_a_field_added_since_at_its_default_but_not_at_another_value(tmp_path):
    out = tmp_path / "run"
    prepare_run_folder(out, CFG, resume=False)
    (out / "work").mkdir()
    with_default = {**CFG, "eval": {"shift": None}}  # a field today's schema has and the recorded config lacks

    def normalize(old):
        return {"eval": {"shift": None}, **old}

    assert prepare_run_folder(out, with_default, resume=True, normalize=normalize) == "resumed"
    with pytest.raises(KDistillError, match=r'eval.shift.name: \(absent\) -> "wordnet"'):
        prepare_run_folder(out, {**CFG, "eval": {"shift": {"name": "wordnet"}}}, resume=True, normalize=normalize)
    with pytest.raises(KDistillError, match=r"eval.shift: \(absent\) -> null"):  # no normalizer: compared as recorded
        prepare_run_folder(out, with_default, resume=True)


def test_resume_of_a_real_recipe_config_recorded_before_a_field_existed(tmp_path):
    from kdistill.config import load_config

    cfg = load_config("llm/tiny")
    new = cfg.model_dump(mode="json")
    old = {**new, "eval": {k: v for k, v in new["eval"].items() if k != "shift"}}  # as a version without eval.shift
    out = tmp_path / "run"
    prepare_run_folder(out, old, resume=False)
    (out / "work").mkdir()

    def normalize(recorded):  # what api.run passes: today's schema fills the missing field with its default
        return type(cfg).model_validate(recorded).model_dump(mode="json")

    assert prepare_run_folder(out, new, resume=True, normalize=normalize) == "resumed"
    with pytest.raises(KDistillError, match="another config"):
        prepare_run_folder(out, {**new, "seed": 5}, resume=True, normalize=normalize)


def test_resume_without_a_run_says_so_and_a_fresh_run_replaces_an_old_one(tmp_path):
    out = tmp_path / "run"
    assert prepare_run_folder(out, CFG, resume=True) == "nothing to resume"
    (out / "teacher").mkdir()
    (out / "teacher" / "model.json").write_text("{}")
    assert prepare_run_folder(out, _changed(lr=0.1), resume=False) == "replaced"
    assert not (out / "teacher").exists()  # no stale teacher beside the new run
    assert json.loads((out / "config.json").read_text())["method"]["name"] == "dkd"


def test_folders_that_hold_no_run_are_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(KDistillError, match="holds no kdistill run"):
        prepare_run_folder(tmp_path, CFG, resume=False)
    assert (tmp_path / "mine.txt").read_text() == "precious"
    broken = tmp_path / "broken"
    (broken / "work").mkdir(parents=True)
    with pytest.raises(KDistillError, match="config.json' is missing or unreadable"):
        prepare_run_folder(broken, CFG, resume=True)


@pytest.mark.slow
def test_cli_resume_with_changed_overrides_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
name: tiny_digits
task: classification
data: {name: digits}
teacher:
  model: {name: mlp, kwargs: {width: 32, depth: 1}}
  train: {epochs: 1, batch_size: 64, lr: 0.003}
student: {name: mlp, kwargs: {width: 8, depth: 1}}
method: {name: hinton_kd}
train: {epochs: 1, batch_size: 64, lr: 0.003}
eval: {latency_repeats: 1}
""")
    runner = CliRunner()
    out = tmp_path / "b"
    assert runner.invoke(app, ["run", str(recipe), "-o", str(out), "--no-progress"]).exit_code == 0
    r = runner.invoke(app, ["run", str(recipe), "-o", str(out), "--no-progress", "--resume", "method=dkd",
                            "train.lr=0.1"])
    assert r.exit_code == 2
    assert 'method.name: "hinton_kd" -> "dkd"' in r.output and "train.lr: 0.003 -> 0.1" in r.output
    assert json.loads((out / "report.json").read_text())["method"] == "hinton_kd"
    again = runner.invoke(app, ["run", str(recipe), "-o", str(out), "--no-progress", "--resume"])
    assert again.exit_code == 0, again.output
