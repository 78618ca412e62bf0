"""The llm task with pruned and LoRA students on the CI recipe (tiny random Llama teacher): end to end, export,
and the refusals at config / run start."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdistill import api
from kdistill.config import load_config
from kdistill.errors import ConfigError, KDistillError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_pruned_student_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    # the recipe's num_layers: 2 is kept (depth by Block Influence), the width shrinks to the target
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["student.kind=pruned", "student.target_params=80000", "student.calibration_batches=2"])
    assert r["student"]["steps"] == 3 and r["baseline"]["params"] == r["student"]["params"]
    assert 0.97 * 80000 <= r["student"]["params"] <= 80000
    assert all(math.isfinite(r[n]["metrics"]["perplexity"]) for n in ("student", "baseline"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size < 64 and model.config.head_dim == 16
    res = api.export(tmp_path / "run", tmp_path / "export")
    assert res["max_abs_logit_diff"] <= 1e-5 and res["params"] == r["student"]["params"]


def test_lora_student_end_to_end_saves_a_merged_plain_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from kdistill.students.llm import layer_subset_copy
    from kdistill.teachers.lm import load_lm_teacher

    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["student.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}",
                           "baseline=false", "train.lr=0.05"])
    assert r["student"]["steps"] == 3 and math.isfinite(r["student"]["metrics"]["perplexity"])
    folder = tmp_path / "run" / "student"
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in k for k in model.state_dict())
    # the initial student (same teacher, same copy) differs exactly where adapters were merged
    cfg = load_config("llm/tiny")
    teacher, _ = load_lm_teacher("tiny", seed=cfg.seed, tokenizer_texts=cfg.data.texts, tiny_vocab_size=300,
                                 tiny_layers=4, tiny_hidden_size=64)
    start = layer_subset_copy(teacher, num_layers=2).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]) != any(t in k for t in ("q_proj", "v_proj", "up_proj")), k
    res = api.export(tmp_path / "run", tmp_path / "export")
    assert res["format"] == "huggingface" and res["max_abs_logit_diff"] <= 1e-5
    ev = api.evaluate(tmp_path / "run")
    assert ev["metrics"]["perplexity"] == pytest.approx(r["student"]["metrics"]["perplexity"], rel=1e-4)


def test_lora_on_lm_head_with_the_fused_head_is_refused_at_run_start(tmp_path):
    with pytest.raises(KDistillError, match="fused head"):
        api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["student.lora={target_modules: [q_proj, lm_head]}", "method.kwargs.fused=true"])
    assert not (tmp_path / "run" / "work").exists()  # nothing trained


def test_student_config_errors():
    with pytest.raises(ConfigError, match="belong to kind 'pruned'"):
        load_config("llm/tiny", ["student.heads=2"])
    with pytest.raises(ConfigError, match="got no size"):
        load_config("llm/tiny", ["student={kind: pruned}"])
    with pytest.raises(ConfigError, match="keep_layers"):
        load_config("llm/tiny", ["student={kind: pruned, keep_layers: [0, 1], heads: 2}"])
    with pytest.raises(ConfigError, match="Did you mean"):
        load_config("llm/tiny", ["student.lora={rank: 4}"])
    cfg = load_config("llm/tiny", ["student={kind: pruned, heads: 2}"])
    assert cfg.student.num_layers is None and cfg.student.prune_kwargs()["heads"] == 2
    assert json.dumps(cfg.student.model_dump())  # plain data
