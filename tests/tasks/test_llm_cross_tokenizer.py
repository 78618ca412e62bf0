"""The llm task with a student that has its own tokenizer: a tiny teacher (BPE of 300 tokens) and a smaller_config
student with a BPE of 420 tokens trained on the same corpus, distilled with cross_tokenizer_kd and with llm_kd + uld;
saved with its own tokenizer, re-evaluated by `kdistill eval`, bits per character in the report; config errors."""

from __future__ import annotations

import math

import pytest

from kdistill import api
from kdistill.config import load_config
from kdistill.errors import ConfigError

OWN = "student={kind: smaller_config, config: {num_hidden_layers: 2}, tokenizer: {train_bpe: {vocab_size: 420}}}"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("recipe, overrides", [
    ("llm/tiny_cross_tokenizer", []),  # cross_tokenizer_kd
    ("llm/tiny", [OWN, "method={name: llm_kd, kwargs: {loss: uld, alpha: 0.5}}"]),
], ids=["aligned", "uld"])
def test_student_with_its_own_tokenizer_end_to_end(tmp_path, recipe, overrides):
    from transformers import AutoTokenizer

    r = api.run(recipe, output=tmp_path / "run", progress=False, quiet=True, overrides=[*overrides, "baseline=false"])
    assert r["vocab"]["cross_tokenizer"] and r["vocab"]["tokenizer_size"] == 300
    assert r["vocab"]["student_tokenizer_size"] == r["vocab"]["student_rows"] == 420
    for name in ("teacher", "student"):
        m = r[name]["metrics"]
        assert math.isfinite(m["perplexity"]) and 0 < m["bits_per_char"] < 20
    assert r["student"]["steps"] == 3 and r["agreement"] == {} and len(r["generations"]) == 2
    assert "bits/char" in (tmp_path / "run" / "report.md").read_text()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert len(tok) == 420  # the student's own tokenizer, not the teacher's
    ev = api.evaluate(tmp_path / "run")
    assert ev["metrics"]["perplexity"] == pytest.approx(r["student"]["metrics"]["perplexity"])
    assert ev["metrics"]["bits_per_char"] == pytest.approx(r["student"]["metrics"]["bits_per_char"])


def test_own_tokenizer_config_errors():
    with pytest.raises(ConfigError, match="cross_tokenizer_kd"):  # a method that compares entry by entry
        load_config("llm/tiny", [OWN])
    with pytest.raises(ConfigError, match="kind 'smaller_config'"):
        load_config("llm/tiny", ["student.tokenizer={train_bpe: {vocab_size: 400}}"])
    with pytest.raises(ConfigError, match="data.prompt_tokens"):
        load_config("llm/tiny", [OWN, "method={name: cross_tokenizer_kd}", "data.prompt_tokens=8"])
    with pytest.raises(ConfigError, match=">= 259"):
        load_config("llm/tiny", [OWN.replace("420", "100"), "method={name: cross_tokenizer_kd}"])
    cfg = load_config("llm/tiny", [OWN, "method={name: cross_tokenizer_kd}"])
    assert cfg.student.tokenizer_kwargs() == {"train_bpe_vocab_size": 420}


@pytest.mark.parametrize("layout, method", [
    ("prompts", "{name: cross_tokenizer_kd, kwargs: {ce_weight: 0.5}}"),
    ("chat", "{name: llm_kd, kwargs: {loss: uld, alpha: 0.5}}"),
])
def test_own_tokenizer_on_prompt_rows_and_chats(tmp_path, layout, method):
    """Prompt rows and chat conversations with a student that has its own tokenizer: each side formats the context
    its own way, the replies are aligned by characters and trained on; both models are scored on the same replies."""
    import json

    import yaml

    from kdistill.recipes import find_recipe

    verses = yaml.safe_load(find_recipe("llm/tiny_cross_tokenizer").read_text())["data"]["texts"]
    pairs = [(" ".join(v.split()[:3]), " " + " ".join(v.split()[3:12])) for v in verses]
    if layout == "prompts":
        rows = [{"prompt": p, "completion": c} for p, c in pairs]
        data = "{files: %s, prompt_column: prompt, completion_column: completion, prompt_tokens: 24, "
    else:
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]}
                for p, c in pairs]
        data = "{files: %s, messages_column: messages, "
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"method={method}", "data=" + data % (tmp_path / "rows.jsonl") + "block_length: 96, "
                 "eval_fraction: 0.15}", "baseline=false"]
    r = api.run("llm/tiny_cross_tokenizer", output=tmp_path / "run", progress=False, quiet=True, overrides=overrides)
    assert r["vocab"]["cross_tokenizer"] and r["data"]["format"] == layout and r["student"]["steps"] == 3
    for name in ("teacher", "student"):
        m = r[name]["metrics"]
        assert math.isfinite(m["perplexity"]) and 0 < m["bits_per_char"] < 20
    log = (tmp_path / "run" / "work" / "student" / "metrics.jsonl").read_text()
    assert ("exact_share" in log) == (layout == "prompts")
