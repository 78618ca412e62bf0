"""The one causal-LM loader (teachers/lm.py): zoo names, folders, hub ids, and one-line errors for each
way a name can be wrong -- never a transformers traceback, never a network stall."""

import importlib
import json
import shutil

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.teachers import lm
from kdistill.teachers.lm import load_causal_lm


@pytest.fixture
def no_transformers_load(monkeypatch):
    """Fail the test if transformers is asked to load anything: these errors must come before it."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("transformers was asked to load a model")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", boom)


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("name", ["smolm2-135m", "smollm2-135", "SmolLM2-135M", "smollm2"])
def test_misspelt_zoo_name_names_the_close_match(no_transformers_load, name):
    with pytest.raises(KDistillError) as e:
        load_causal_lm(name)
    msg = one_line(e)
    assert repr(name) in msg and "Did you mean 'smollm2-135m'" in msg


def test_misspelt_zoo_name_is_refused_online_without_the_network(no_transformers_load, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub about a typo"))
    with pytest.raises(KDistillError, match="Did you mean 'smollm2-135m'"):
        load_causal_lm("smolm2-135m")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_id_offline_is_one_line_naming_the_variable(no_transformers_load, monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    with pytest.raises(KDistillError) as e:
        load_causal_lm("someone-else/no-such-model")
    msg = one_line(e)
    assert "no zoo model or folder" in msg and var in msg and "network" in msg


def test_not_a_folder_and_not_a_hub_id(no_transformers_load, tmp_path):
    with pytest.raises(KDistillError, match="no such folder"):
        load_causal_lm(str(tmp_path / "missing" / "model"))


def test_wrong_zoo_kind_and_dtype(no_transformers_load):
    with pytest.raises(KDistillError, match="causal-lm"):
        load_causal_lm("minilm-l6")
    with pytest.raises(KDistillError, match="dtype"):
        load_causal_lm("smollm2-135m", dtype="float64")


def test_pickle_only_folder_is_refused(no_transformers_load, tiny_lm_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    for f in tiny_lm_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, d / f.name)
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(KDistillError) as e:
        load_causal_lm(str(d))
    msg = one_line(e)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "save_pretrained" in msg


def test_folder_without_config_or_weights(no_transformers_load, tmp_path):
    with pytest.raises(KDistillError, match="config.json"):
        load_causal_lm(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(KDistillError, match="no weights"):
        load_causal_lm(str(tmp_path))


def test_saved_folder_loads(tiny_lm_dir):
    from kdistill.teachers.lm import served_name

    model, tok = load_causal_lm(str(tiny_lm_dir))
    assert not model.training and tok.pad_token_id is not None
    assert served_name(str(tiny_lm_dir)) == "tiny-llama" and served_name("smollm2-135m") == "smollm2-135m"


# ---- online: the hub's answers become one line (stubbed; the tests never reach the network)


def _online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def _hub_error(cls, status):
    http = importlib.import_module(cls.__mro__[2].__module__.split(".")[0])  # the hub library's HTTP client
    resp = http.Response(status, request=http.Request("GET", "https://huggingface.co/api/models/a/b"))
    return cls(f"{status} error", response=resp)


def test_missing_hub_repo_online_is_one_line(no_transformers_load, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    _online(monkeypatch)

    def info(self, repo_id, **k):
        raise _hub_error(RepositoryNotFoundError, 404)

    monkeypatch.setattr(HfApi, "model_info", info)
    with pytest.raises(KDistillError) as e:
        load_causal_lm("someone-else/no-such-model")
    assert "no hub repo" in one_line(e)


def test_unreachable_hub_is_one_line_at_once(no_transformers_load, monkeypatch):
    from huggingface_hub import HfApi

    _online(monkeypatch)

    def info(self, repo_id, **k):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", info)
    with pytest.raises(KDistillError) as e:
        load_causal_lm("someone-else/a-model")
    msg = one_line(e)
    assert "unreachable" in msg and "HF_HUB_OFFLINE" in msg


def test_pickle_only_hub_repo_is_refused(no_transformers_load, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoSibling

    _online(monkeypatch)

    class Info:
        siblings = [RepoSibling("config.json"), RepoSibling("pytorch_model.bin")]

    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **k: Info())
    with pytest.raises(KDistillError) as e:
        load_causal_lm("someone-else/old-model")
    assert "safetensors" in one_line(e)


def test_transformers_oserror_on_a_hub_id_becomes_one_line(monkeypatch):
    import transformers
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoSibling

    _online(monkeypatch)

    class Info:
        siblings = [RepoSibling("config.json"), RepoSibling("model.safetensors")]

    def fail(*a, **k):
        raise OSError("someone-else/a-model is not a local folder and is not a valid model identifier\nmore\nlines")

    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **k: Info())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(KDistillError) as e:
        load_causal_lm("someone-else/a-model")
    msg = one_line(e)
    assert "OSError" in msg and "not a valid model identifier" in msg and "more" not in msg


def test_offline_var_parsing(monkeypatch):
    _online(monkeypatch)
    assert lm.offline_var() is None
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert lm.offline_var() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert lm.offline_var() == "HF_HUB_OFFLINE"


def test_llm_task_teacher_uses_the_one_loader(no_transformers_load):
    """The llm task's teacher goes through the same loader, so the same typo gives the same one line."""
    from kdistill.teachers.lm import load_lm_teacher

    with pytest.raises(KDistillError, match="Did you mean 'smollm2-135m'"):
        load_lm_teacher("smolm2-135m", dtype="float32", seed=0, tokenizer_texts=[])


def test_cached_hub_id_still_loads_offline(tiny_lm_dir, tmp_path):
    """Offline refuses hub ids that are not cached, but one already in the hub cache still loads."""
    import os
    import subprocess
    import sys

    snap = tmp_path / "hub" / "models--someone-else--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_lm_dir, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from kdistill.teachers.lm import load_causal_lm\n"
            "m, t = load_causal_lm('someone-else/tiny')\n"
            "print(type(m).__name__)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "LlamaForCausalLM" in r.stdout, r.stderr[-2000:]
