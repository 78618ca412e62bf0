"""`kdistill design` on llm recipes: DisWOT on a causal LM's hidden states and LM head, zero-shot KL, the budget, the
brief distillations through the llm task, the written recipe, the capacity gap."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from kdistill import api
from kdistill.config import load_config
from kdistill.errors import KDistillError
from kdistill.eval.diswot import diswot_distances, lm_diswot_features
from kdistill.eval.lm import zero_shot_kl
from kdistill.tasks.llm_design import frequent_next_tokens

V = 64


def _lm(seed: int, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


def _batch(seed: int = 0, pad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (4, 10), generator=g)
    attn = torch.ones_like(ids)
    if pad:
        attn[0, 7:] = 0
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1).masked_fill(attn == 0, -100)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def test_frequent_next_tokens_counts_labels_and_breaks_ties_by_id():
    b = {"labels": torch.tensor([[5, 5, 3, -100], [3, 7, 5, 9]])}
    assert frequent_next_tokens([b], 3).tolist() == [5, 3, 7]  # 5 x3, 3 x2, then 7 and 9 once: the lower id
    assert frequent_next_tokens([b], 10).tolist() == [5, 3, 7, 9]


def test_lm_diswot_is_zero_for_a_copy_of_the_teacher_and_positive_otherwise():
    teacher, batch = _lm(0), _batch()
    classes = frequent_next_tokens([batch], 16)
    t = lm_diswot_features(teacher, batch, classes)
    assert t.maps.shape == (4, 32, 10) and t.embed.shape == (4, 32) and t.head_weight.shape == (len(classes), 32)
    sem, rel = diswot_distances(lm_diswot_features(copy.deepcopy(teacher), batch, classes), t)
    assert float(sem) == pytest.approx(0.0, abs=1e-6) and float(rel) == pytest.approx(0.0, abs=1e-6)
    # a narrower student is comparable (width-free matrices) and further away
    sem, rel = diswot_distances(lm_diswot_features(_lm(1, hidden=16), batch, classes), t)
    assert float(sem) > 1e-3 and float(rel) > 1e-3


def test_lm_diswot_ignores_padding_positions():
    teacher, batch = _lm(0), _batch(pad=True)
    f = lm_diswot_features(teacher, batch, torch.arange(8))
    assert torch.all(f.maps[0, :, 7:] == 0)  # padding zeroed: no class activation there
    # the embedding is the mean over real tokens only: changing a padded token changes nothing
    other = {**batch, "input_ids": batch["input_ids"].clone()}
    other["input_ids"][0, 9] = (other["input_ids"][0, 9] + 1) % V
    assert torch.allclose(lm_diswot_features(teacher, other, torch.arange(8)).embed[0], f.embed[0], atol=1e-6)


def test_zero_shot_kl_is_zero_for_the_teacher_and_grows_with_the_difference():
    teacher, batches = _lm(0), [_batch(0), _batch(1, pad=True)]
    with torch.no_grad():
        t = [teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float() for b in batches]
    assert zero_shot_kl(teacher, batches, t) == pytest.approx(0.0, abs=1e-6)
    near = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert 0 < zero_shot_kl(near, batches, t) < zero_shot_kl(_lm(3), batches, t)


SPACE = {"layer_subset": {"num_layers": [1, 2, 4, 6]}, "pruned": {"target_params": [90000]}}


def _design(tmp_path, name, *extra, budget=None, capacity_gap=False, space=SPACE, top_k=2):
    over = [f"design={json.dumps({'space': space, 'top_k': top_k, 'steps': 2, 'score_batch_size': 4})}", *extra]
    return api.design("llm/tiny", output=tmp_path / name, budget=budget, capacity_gap=capacity_gap,
                      overrides=over, progress=False)


def test_llm_design_ranks_measures_distils_and_writes_the_recipe(tmp_path):
    r = _design(tmp_path, "a")
    d = json.loads((tmp_path / "a" / "design.json").read_text())
    assert d["complete"] is True  # (while running it holds the scores and finished runs, "complete": false)
    rows = {c["name"]: c for c in d["candidates"]}
    # the teacher has 4 layers: a 6-layer subset is set aside with the reason, a 4-layer copy is the teacher itself
    assert "expected an integer in [1, 4]" in rows["layer_subset_num_layers6"]["excluded"][0]
    top = rows["layer_subset_num_layers4"]
    assert top["rank"] == 1 and top["diswot"] == pytest.approx(0.0, abs=1e-6) and top["zero_shot_kl"] < 1e-6
    assert top["params"] == d["teacher"]["params"]
    # smaller students score worse without training; params, FLOPs and latency were measured for each
    assert rows["layer_subset_num_layers1"]["diswot"] < rows["layer_subset_num_layers2"]["diswot"] < 0
    assert all(c["flops"] > 0 and c["latency_ms"] > 0 for c in d["candidates"] if not c["excluded"])
    # the top 2 were distilled by the llm task, in their own folders, and the better one chosen
    assert r["distilled"] == 2 and r["within_budget"] == 4 and r["candidates"] == 5
    done = [c for c in d["candidates"] if "distilled" in c]
    assert [c["rank"] for c in done] == [1, 2]
    assert (tmp_path / "a" / "candidates" / done[0]["name"] / "report.json").exists()
    assert d["chosen"] == min(done, key=lambda c: c["distilled"]["perplexity"])["name"]
    assert (tmp_path / "a" / "pareto.png").stat().st_size > 1000
    # the recipe loads and carries the chosen student
    recipe = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    cfg = load_config(recipe)
    chosen = rows[d["chosen"]]
    assert cfg.student.kind == chosen["family"] and "design" not in recipe
    assert all(getattr(cfg.student, k) == v for k, v in chosen["kwargs"].items())
    # run again into the same folder (as after an interruption): finished candidates are reused, not retrained
    reports = {c["name"]: (tmp_path / "a" / "candidates" / c["name"] / "report.json") for c in done}
    stamps = {n: f.stat().st_mtime_ns for n, f in reports.items()}
    again = _design(tmp_path, "a")
    assert again["chosen"] == r["chosen"] and {n: f.stat().st_mtime_ns for n, f in reports.items()} == stamps
    # deterministic given the seed: the same scores and ranking again
    _design(tmp_path, "b", top_k=1)
    d2 = json.loads((tmp_path / "b" / "design.json").read_text())
    assert d2["ranking"] == d["ranking"]
    assert [c.get("diswot") for c in d2["candidates"]] == [c.get("diswot") for c in d["candidates"]]


def test_llm_design_budget_rank_by_and_capacity_gap(tmp_path):
    r = _design(tmp_path, "gap", "design.rank_by=zero_shot_kl", budget="params=150k", capacity_gap=True,
                space={"layer_subset": {"num_layers": [1, 2, 3, 4]}})
    d = json.loads((tmp_path / "gap" / "design.json").read_text())
    over = [c for c in d["candidates"] if c["excluded"]]
    assert [c["name"] for c in over] == ["layer_subset_num_layers4"] and "> 150,000" in over[0]["excluded"][0]
    kls = [next(c for c in d["candidates"] if c["name"] == n)["zero_shot_kl"] for n in d["ranking"]]
    assert kls == sorted(kls) and d["rank_by"] == "zero_shot_kl"
    assert r["distilled"] == 3  # capacity gap: every candidate within the budget, distilled and alone
    gap = d["capacity_gap"]
    assert len(gap["rows"]) == 3 and all("alone" in c for c in d["candidates"] if not c["excluded"])
    assert gap["teacher_accuracy"] < 0 and d["rank_correlation_gain"]["n"] == 3
    assert (tmp_path / "gap" / "capacity_gap.png").exists()


def test_llm_design_refusals(tmp_path):
    with pytest.raises(KDistillError, match="none of the 1 candidates.*> 1,000"):
        _design(tmp_path, "x", budget="params=1000", space={"layer_subset": {"num_layers": [2]}})
    with pytest.raises(KDistillError, match="design.space: candidate pruned.*no size"):
        load_config("llm/tiny", ['design={"space": {"pruned": {"calibration_batches": [2]}}}'])
    with pytest.raises(KDistillError, match="design.space"):
        load_config("llm/tiny", ['design={"space": {"layer_subset": {"num_layerz": [2]}}}'])


def test_an_interrupted_llm_design_leaves_its_progress_and_resumes(tmp_path, monkeypatch):
    import kdistill.tasks.llm_design as D

    real, calls = D.run_llm, []

    def interrupted(cfg, ctx):
        calls.append(ctx.output.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, ctx)

    monkeypatch.setattr(D, "run_llm", interrupted)
    space = {"layer_subset": {"num_layers": [1, 2]}}
    with pytest.raises(KeyboardInterrupt):
        _design(tmp_path, "p", space=space)
    d = json.loads((tmp_path / "p" / "design.json").read_text())
    assert d["complete"] is False and d["to_distil"] == 2
    assert [c["name"] for c in d["candidates"] if "distilled" in c] == [calls[0]]
    assert all("diswot" in c and "zero_shot_kl" in c for c in d["candidates"])
    # run again: the finished candidate is reused, only the other one is distilled
    calls.clear()
    monkeypatch.setattr(D, "run_llm", lambda cfg, ctx: calls.append(ctx.output.name) or real(cfg, ctx))
    _design(tmp_path, "p", space=space)
    assert len(calls) == 1 and json.loads((tmp_path / "p" / "design.json").read_text())["complete"] is True
