"""The llm task end to end on the CI recipe (tiny random Llama teacher, tokenizer trained on Genesis 1):
teacher-logit KD with baseline and export, top-k cache write + train-from-cache + refusal, and on-policy GKD."""

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


def test_tiny_recipe_runs_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True)
    assert r["task"] == "llm" and r["method"] == "llm_kd"
    for name in ("teacher", "student", "baseline"):
        assert math.isfinite(r[name]["metrics"]["perplexity"]) and r[name]["params"] > 0
    assert r["student"]["params"] < r["teacher"]["params"] and r["student"]["steps"] == 3
    assert 0.0 <= r["agreement"]["top1_agreement"] <= 1.0 and r["agreement"]["kl_teacher_student_topk"] >= 0
    assert len(r["generations"]) == 2 and {"teacher", "student", "baseline"} <= set(r["generations"][0])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["student"]["metrics"] == r["student"]["metrics"]
    assert "Generations" in (tmp_path / "run" / "report.md").read_text()
    # `kdistill eval` on the run recomputes the student's held-out perplexity from the saved config and folder
    ev = api.evaluate(tmp_path / "run")
    assert ev["task"] == "llm" and ev["metrics"]["perplexity"] == pytest.approx(r["student"]["metrics"]["perplexity"])
    # plain Hugging Face loading of the exported student, no kdistill needed
    res = api.export(tmp_path / "run", tmp_path / "export")
    assert res["format"] == "huggingface" and res["max_abs_logit_diff"] <= 1e-5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = torch.tensor([tok("And God said")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == len(tok)
    assert not any("method" in k for k in model.state_dict())


def test_cache_then_train_without_teacher_and_refuse_mismatch(tmp_path):
    cache_dir = tmp_path / "cache"
    info = api.cache("llm/tiny", output=cache_dir, progress=False)
    assert info["k"] == 32 and info["kd_temperature"] == 2.0 and info["bytes_per_token"] > 0
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["teacher"] == "tiny/float32"
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=[f"cache.dir={cache_dir}", "baseline=false"])
    assert r["data"]["cache"] == str(cache_dir) and math.isfinite(r["student"]["metrics"]["perplexity"])
    # a run at another temperature must not silently use these targets
    with pytest.raises(KDistillError, match="kd_temperature: cache has 2.0, run expects 1.0"):
        api.run("llm/tiny", output=tmp_path / "run2", progress=False, quiet=True,
                overrides=[f"cache.dir={cache_dir}", "baseline=false", "method.kwargs.kd_temperature=1.0"])
    with pytest.raises(KDistillError, match="kdistill cache"):
        api.run("llm/tiny", output=tmp_path / "run3", progress=False, quiet=True,
                overrides=[f"cache.dir={tmp_path / 'missing'}", "baseline=false"])
    # targets of another teacher (same name, tokenizer and data, other weights) are refused
    with pytest.raises(KDistillError, match="teacher_fingerprint"):
        api.run("llm/tiny", output=tmp_path / "run4", progress=False, quiet=True,
                overrides=[f"cache.dir={cache_dir}", "baseline=false", "teacher.tiny_layers=6"])


def test_gkd_on_policy_end_to_end(tmp_path):
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["method={name: gkd, kwargs: {lmbda: 1.0, beta: 0.5, kd_temperature: 1.0, "
                           "sampling_temperature: 1.2}}", "data.prompt_tokens=8", "baseline=false"])
    assert r["method"] == "gkd" and r["student"]["steps"] == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "work" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["on_policy"] == 1.0 for row in rows) and all(math.isfinite(row["gkd"]) for row in rows)
    assert 0 < r["student"]["time_shares"]["generation_share"] < 1  # reported, not only logged


def test_config_errors():
    with pytest.raises(ConfigError, match="prompt_tokens"):
        load_config("llm/tiny", ["method={name: gkd}"])
    with pytest.raises(ConfigError, match="not cacheable"):
        load_config("llm/tiny", ["method={name: gkd}", "data.prompt_tokens=4", "cache.dir=/tmp/x"])
    with pytest.raises(ConfigError, match="Did you mean"):
        load_config("llm/tiny", ["student.num_layer=3"])


def test_sequence_level_kd_trains_on_stored_teacher_generations(tmp_path):
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["data.prompt_tokens=8", "data.sequence_kd={sampling_temperature: 0.0}",
                           "method={name: none}", "baseline=false"])
    info = r["data"]["sequence_kd"]
    store = tmp_path / "run" / "teacher_generations.jsonl"
    assert info["store"] == str(store) and info["sequences"] == 1024 // 32
    recs = [json.loads(x) for x in store.read_text().splitlines()]
    assert len(recs) == info["sequences"] and all(len(x["prompt_ids"]) == 8 and len(x["completion_ids"]) == 24
                                                  for x in recs)
    from kdistill.eval.metrics import repetition  # the report says how much the stored completions loop

    want = repetition([x["completion_ids"] for x in recs], span=8, n=4)
    assert (info["repeating_completions"], info["distinct_4grams"]) == (want["repeating"], want["distinct_ngrams"])
    assert math.isfinite(r["student"]["metrics"]["perplexity"])
    with pytest.raises(ConfigError, match="sequence_kd"):
        load_config("llm/tiny", ["data.sequence_kd={sampling_temperature: 0.0}"])


def test_fused_llm_kd_runs_in_the_task(tmp_path):
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["method.kwargs.fused=true", "baseline=false"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "work" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(row["kd"]) for row in rows)
    assert math.isfinite(r["student"]["metrics"]["perplexity"])


@pytest.mark.gpu
def test_tiny_recipe_on_cuda_in_bf16(tmp_path):
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["train.mixed_precision=bf16", "baseline=false"])
    assert math.isfinite(r["student"]["metrics"]["perplexity"]) and r["student"]["steps"] == 3


@pytest.mark.gpu
def test_on_policy_gkd_on_cuda(tmp_path):
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True,
                overrides=["method={name: gkd, kwargs: {lmbda: 1.0, beta: 0.5}}", "data.prompt_tokens=8",
                           "baseline=false"])
    assert r["method"] == "gkd" and math.isfinite(r["student"]["metrics"]["perplexity"])


def test_two_teachers_are_distilled_from_their_mixture(tmp_path):
    import yaml

    from kdistill.recipes import find_recipe

    recipe = yaml.safe_load(find_recipe("llm/tiny").read_text())
    one = recipe.pop("teacher")
    recipe.update(teachers=[one, {**one, "tiny_layers": 3}], teacher_weights=[3, 1], baseline=False)
    r = api.run(recipe, output=tmp_path / "run", progress=False, quiet=True)
    t = r["teacher"]
    assert t["model"] == ["tiny", "tiny"] and t["weights"] == pytest.approx([0.75, 0.25])
    assert len(t["members"]) == 2 and t["params"] == sum(m["params"] for m in t["members"])
    assert all(math.isfinite(m["metrics"]["perplexity"]) for m in t["members"])
    assert r["student"]["steps"] == 3 and len(r["generations"]) == 2
    with pytest.raises(KDistillError, match="not both"):
        api.run({**recipe, "teacher": one}, output=tmp_path / "r2", progress=False, quiet=True)


def test_the_mixture_is_the_weighted_mean_of_next_token_distributions():
    from kdistill.teachers.mixture import LMTeacherMixture
    from kdistill.teachers.tiny import tiny_llama

    a, b = tiny_llama(40, num_layers=1, seed=0), tiny_llama(40, num_layers=2, seed=1)
    mix = LMTeacherMixture([a, b], [1.0, 3.0]).eval()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = torch.softmax(mix(input_ids=ids).logits, -1)
        want = 0.25 * torch.softmax(a(input_ids=ids).logits, -1) + 0.75 * torch.softmax(b(input_ids=ids).logits, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert mix.generate(ids[:, :2], max_new_tokens=3).shape == (2, 5)


def test_prompt_and_completion_rows_on_policy(tmp_path):
    """(prompt, completion) rows: prompts of different lengths left-padded to data.prompt_tokens, completions
    (and their EOS) trained on; gkd continues the real prompts and stops at EOS."""
    import yaml

    from kdistill.data.lm import prompt_tensors
    from kdistill.recipes import find_recipe
    from kdistill.teachers.tiny import train_tokenizer

    words = "the light the earth the waters the firmament the evening the morning heaven day night".split()
    rows = [{"prompt": " ".join(words[i % 5: i % 5 + 1 + i % 3]), "completion": " ".join(words[i % 7: i % 7 + 4])}
            for i in range(40)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load(find_recipe("llm/tiny").read_text())
    recipe["data"] = {"files": str(tmp_path / "pc.jsonl"), "prompt_column": "prompt", "completion_column": "completion",
                      "prompt_tokens": 8, "block_length": 24, "eval_fraction": 0.1}
    recipe["method"] = {"name": "gkd", "kwargs": {"lmbda": 0.5, "beta": 0.5}}
    r = api.run(recipe, output=tmp_path / "run", progress=False, quiet=True)
    assert r["data"]["format"] == "prompts" and r["student"]["steps"] == 3 and "baseline" in r
    assert math.isfinite(r["student"]["metrics"]["perplexity"])
    assert r["generations"][0]["prompt"] in {x["prompt"] for x in rows}  # generation starts from a real prompt

    tok = train_tokenizer([f"{x['prompt']} {x['completion']}" for x in rows], vocab_size=300)
    t = prompt_tensors(tok, [("the light", "the earth")], prompt_width=6, max_length=12)
    n = len(tok("the light", add_special_tokens=False)["input_ids"])
    assert t["attention_mask"][0, : 6 - n].sum() == 0 and t["attention_mask"][0, 6 - n: 6].all()
    trained = tok.decode(t["labels"][0][t["mask"][0]])
    assert trained.startswith("the earth") and trained.endswith("</s>") and "light" not in trained
    with pytest.raises(KDistillError, match="row 1: the prompt has"):
        prompt_tensors(tok, [("the light the earth the waters the firmament", "x")], prompt_width=2, max_length=12)


def test_sequence_level_kd_on_prompt_rows(tmp_path):
    """(prompt, completion) rows + sequence_kd: the teacher completes each training prompt once (up to EOS or
    block_length - prompt_tokens tokens), the student trains on prompt + teacher completion with the loss on the
    completion only; a second run reuses the store."""
    import yaml

    from kdistill.data.lm import prompt_id_tensors
    from kdistill.recipes import find_recipe

    words = "the light the earth the waters the firmament the evening the morning heaven day night".split()
    rows = [{"prompt": " ".join(words[i % 5: i % 5 + 1 + i % 3]), "completion": " ".join(words[i % 7: i % 7 + 4])}
            for i in range(40)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load(find_recipe("llm/tiny").read_text())
    store = tmp_path / "gens.jsonl"
    recipe["data"] = {"files": str(tmp_path / "pc.jsonl"), "prompt_column": "prompt", "completion_column": "completion",
                      "prompt_tokens": 8, "block_length": 24, "eval_fraction": 0.1,
                      "sequence_kd": {"store": str(store)}}
    recipe["train"]["max_steps"] = 2
    r = api.run(recipe, output=tmp_path / "run", progress=False, quiet=True)
    info = r["data"]["sequence_kd"]
    assert r["data"]["format"] == "prompts" and "baseline" in r and math.isfinite(r["student"]["metrics"]["perplexity"])
    assert info["store"] == str(store) and info["sequences"] == 36  # one per training prompt (40 rows, 4 held out)
    recs = [json.loads(x) for x in store.read_text().splitlines()]
    assert len(recs) == 36 and info["ended_at_eos"] == sum(x["completion_ids"][-1] == 2 for x in recs)
    assert {len(x["prompt_ids"]) for x in recs} != {8}  # the prompts themselves, unpadded, of several lengths
    for x in recs:  # each completion ends at its first EOS (id 2) or at block_length - prompt_tokens tokens
        c = x["completion_ids"]
        assert 1 <= len(c) <= 16 and 2 not in c[:-1] and (c[-1] == 2 or len(c) == 16)
    t = prompt_id_tensors([(x["prompt_ids"], x["completion_ids"]) for x in recs], prompt_width=8, max_length=24,
                          pad_id=0)
    for i, x in enumerate(recs):  # labels: the completion tokens only (no prompt, no padding)
        n = len(x["completion_ids"])
        assert t["mask"][i].nonzero().flatten().tolist() == list(range(7, 7 + n))
        assert t["labels"][i][t["mask"][i]].tolist() == x["completion_ids"]
        assert t["attention_mask"][i, : 8 - len(x["prompt_ids"])].sum() == 0
    # a second run finds every completion in the store and generates nothing
    before = store.stat().st_mtime_ns
    r2 = api.run({**recipe, "baseline": False}, output=tmp_path / "run2", progress=False, quiet=True)
    assert store.stat().st_mtime_ns == before and r2["data"]["sequence_kd"]["sequences"] == 36


def test_chat_turn_prompts_are_formatted_with_the_chat_template(tmp_path):
    """A prompt column holding chat turns: each prompt is the chat template of its turns with the generation prompt
    (what the student continues on-policy), the completion the assistant's reply; bad turns are refused."""
    import yaml

    from kdistill.data.lm import _file_corpus, prompt_ids
    from kdistill.recipes import find_recipe
    from kdistill.teachers.tiny import train_tokenizer

    words = "the light the earth the waters the firmament the evening the morning heaven day night".split()
    rows = [{"prompt": [{"role": "user", "content": " ".join(words[i % 5: i % 5 + 2])}],
             "completion": " ".join(words[i % 7: i % 7 + 3])} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([" ".join(words)] * 4, vocab_size=300)
    turns = rows[0]["prompt"]
    want = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    got = prompt_ids(tok, [turns, "the light"], prompt_width=64)
    assert tok.decode(got[0]) == want and got[1] == tok("the light", add_special_tokens=False)["input_ids"]
    with pytest.raises(KDistillError, match="the last not the assistant"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}],
                                                        "completion": "y"}) + "\n")
        _file_corpus(files=str(tmp_path / "bad.jsonl"), format="auto", hf_dataset=None, text_column="text",
                     messages_column=None, prompt_column="prompt", completion_column="completion", eval_fraction=0.0)
    recipe = yaml.safe_load(find_recipe("llm/tiny").read_text())
    recipe["data"] = {"files": str(tmp_path / "chat.jsonl"), "prompt_column": "prompt",
                      "completion_column": "completion", "prompt_tokens": 20, "block_length": 32,
                      "eval_fraction": 0.1}
    recipe["method"] = {"name": "gkd", "kwargs": {"lmbda": 1.0}}
    r = api.run({**recipe, "baseline": False}, output=tmp_path / "run", progress=False, quiet=True)
    assert r["student"]["steps"] == 3 and math.isfinite(r["student"]["metrics"]["perplexity"])
    assert r["generations"][0]["prompt"].startswith(want[:5])  # held-out generations start from the template
    log = [json.loads(x) for x in (tmp_path / "run" / "work" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["generation_share"] < 1 for row in log)


@pytest.mark.gpu
def test_fused_teacher_head_recipe_on_cuda_in_bf16(tmp_path):
    """llm_kd fused: true in bf16 on the GPU (the loss reads both models' hidden states and heads), against the
    same run with the eager loss: the same perplexity up to bf16 rounding."""
    runs = {}
    for fused in ("true", "false"):
        r = api.run("llm/tiny", output=tmp_path / fused, progress=False, quiet=True,
                    overrides=[f"method.kwargs.fused={fused}", "train.mixed_precision=bf16", "baseline=false"])
        runs[fused] = r["student"]["metrics"]["perplexity"]
    assert math.isfinite(runs["true"]) and abs(runs["true"] / runs["false"] - 1) < 0.05
