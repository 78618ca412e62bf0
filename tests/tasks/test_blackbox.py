import json
import os
import socket

import pytest

from kdistill.config import load_config
from kdistill.errors import ConfigError, KDistillError
from kdistill.tasks.base import RunContext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def recipe(**teacher):
    return {"task": "blackbox", "name": "t", "pipeline": "label",
            "teacher": {"model": "tiny-llama", **teacher},
            "data": {"name": "wordnet_supersense",
                     "kwargs": {"classes": ["animal", "plant"], "per_class_train": 4, "per_class_val": 2,
                                "per_class_test": 4}},
            "label": {"max_tokens": 2}, "student": {"epochs": 2}}


def test_recipe_validates_and_rejects_keys_in_config():
    cfg = load_config("blackbox/wordnet_supersense")
    assert cfg.task == "blackbox" and cfg.teacher.model == "smollm2-135m" and cfg.teacher.api_key_env is None
    for token in ("sk-live-0123456789", "hf_abcdefghijklmnopqrstuvwxyz123456"):  # refused when the recipe loads
        with pytest.raises(ConfigError, match="not an environment-variable name") as err:
            load_config("blackbox/wordnet_supersense", [f"teacher.api_key_env={token}"])
        assert token not in str(err.value)
    with pytest.raises(ConfigError, match="Did you mean 'model'"):
        load_config("blackbox/wordnet_supersense", ["teacher.modle=x"])


def test_unreachable_teacher_fails_before_any_work(tmp_path):
    from kdistill.tasks.blackbox import run_blackbox

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = load_config(recipe(base_url=f"http://127.0.0.1:{port}/v1", timeout=2))
    with pytest.raises(KDistillError, match="unreachable"):
        run_blackbox(cfg, RunContext(output=tmp_path / "run"))
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.resources
def test_label_task_end_to_end_with_launched_tiny_server(tmp_path, tiny_lm_dir):
    """teacher.launch starts `kdistill serve <dir>` in-process; report.json has the contract's keys; a rerun
    answers everything from the store (no request sent)."""
    from kdistill.tasks.blackbox import run_blackbox

    cfg2 = load_config(recipe(model=str(tiny_lm_dir), launch=True))
    rep = run_blackbox(cfg2, RunContext(output=tmp_path / "run"))
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["task"] == "blackbox" and on_disk["method"] == "label"
    for k in ("recipe", "seed", "teacher", "student", "wall_seconds"):
        assert k in on_disk
    assert rep["teacher"]["counts"]["texts"] == 8 and rep["teacher"]["cost"]["requests_sent"] == 8
    assert rep["teacher"]["store"]["rows"] == 8
    again = run_blackbox(cfg2, RunContext(output=tmp_path / "run"))
    assert again["teacher"]["cost"]["requests_sent"] == 0 and again["teacher"]["cost"]["cached"] == 8
