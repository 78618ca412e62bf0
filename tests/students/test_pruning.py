"""Structured pruning (Minitron width, ShortGPT depth) of tiny Llamas: equality with hand-pruned references,
importance ranks dead units last, save/load round trip, target_params, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kdistill.errors import KDistillError
from kdistill.students.pruning import (
    PrunePlan,
    apply_plan,
    calibration_batches,
    compute_importance,
    make_plan,
    prune_lm,
    sizes_for_target,
)
from kdistill.teachers.tiny import tiny_llama

V = 97


def gqa_llama(seed: int = 0) -> LlamaForCausalLM:
    """hidden 48, 4 query heads of head_dim 16 in 2 KV groups, intermediate 80, 3 layers, untied: every axis has
    its own size, so a reference can slice "every dimension of size 48" without ambiguity."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so slicing them matters
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (3, 12), generator=g)
        attn = torch.ones_like(ids)
        attn[0, :4] = 0  # left padding on one row: not counted
        out.append({"input_ids": ids, "attention_mask": attn})
    return out


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_width_pruning_equals_zeroing_the_removed_heads_and_channels():
    """Removing query heads / whole KV groups / MLP channels = zeroing their o_proj / down_proj columns."""
    m = gqa_llama()
    ids = batches(1)[0]["input_ids"]
    d, hidden = 16, list(range(48))
    for heads, kv in (([[0, 3], [1, 2], [1, 3]], [[0, 1]] * 3),          # one query head per group, all groups kept
                      ([[2, 3], [0, 1], [2, 3]], [[1], [0], [1]])):      # whole KV groups removed
        channels = [[c for c in range(80) if c % (3 + j) != 0] for j in range(3)]
        channels = [c[:50] for c in channels]
        plan = PrunePlan(layers=[0, 1, 2], heads=heads, kv_heads=kv, channels=channels, hidden=hidden)
        pruned = apply_plan(m, plan)
        assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, len(kv[0]))
        assert pruned.config.intermediate_size == 50 and pruned.config.head_dim == 16
        ref = gqa_llama()
        with torch.no_grad():
            for j, layer in enumerate(ref.model.layers):
                for h in set(range(4)) - set(heads[j]):
                    layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
                layer.mlp.down_proj.weight[:, sorted(set(range(80)) - set(channels[j]))] = 0
        torch.testing.assert_close(logits(pruned, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_hidden_and_depth_pruning_equal_a_hand_sliced_model():
    m = gqa_llama()
    ids = batches(1)[0]["input_ids"]
    E = [i for i in range(48) if i % 4 != 1]  # 36 channels
    plan = PrunePlan(layers=[0, 2], heads=[[0, 1, 2, 3]] * 2, kv_heads=[[0, 1]] * 2, channels=[list(range(80))] * 2,
                     hidden=E)
    pruned = apply_plan(m, plan)
    # reference: every dimension of size 48 sliced to E, layer 1 dropped, loaded into a model built by hand
    cfg = LlamaConfig(**{**m.config.to_dict(), "hidden_size": 36, "num_hidden_layers": 2, "head_dim": 16})
    ref = LlamaForCausalLM(cfg).eval()
    state = {}
    for k, w in m.state_dict().items():
        if k.startswith("model.layers.1."):
            continue
        k = k.replace("model.layers.2.", "model.layers.1.")
        for dim in range(w.dim()):
            if w.shape[dim] == 48:
                w = w.index_select(dim, torch.tensor(E))
        state[k] = w
    ref.load_state_dict(state, strict=True)
    torch.testing.assert_close(logits(pruned, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    assert pruned.config.hidden_size == 36 and pruned.config.num_hidden_layers == 2


def test_importance_ranks_dead_units_last():
    m = tiny_llama(V, num_layers=4, seed=0)  # plain multi-head attention, 4 heads of 16, intermediate 128
    with torch.no_grad():
        m.model.layers[0].self_attn.v_proj.weight[16:32] = 0      # head 1 of layer 0 outputs nothing
        m.model.layers[1].mlp.gate_proj.weight[5] = 0             # MLP channel 5 of layer 1 is silu(0) * up = 0
        for norm in [m.model.norm] + [n for layer in m.model.layers
                                      for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight[7] = 0                                    # hidden channel 7 never leaves a norm
        m.model.layers[2].self_attn.o_proj.weight.zero_()         # block 2 is the identity
        m.model.layers[2].mlp.down_proj.weight.zero_()
    imp = compute_importance(m, batches())
    assert int(imp.heads[0].argmin()) == 1 and float(imp.heads[0, 1]) == 0.0
    assert int(imp.channels[1].argmin()) == 5 and float(imp.channels[1, 5]) == 0.0
    assert int(imp.hidden.argmin()) == 7 and float(imp.hidden[7]) == 0.0
    assert int(imp.blocks.argmin()) == 2 and float(imp.blocks[2]) < 1e-5 < float(imp.blocks.sort().values[1])
    plan = make_plan(m, imp, num_layers=3, heads=3, intermediate_size=127, hidden_size=63)
    assert plan.layers == [0, 1, 3] and 1 not in plan.heads[0] and 5 not in plan.channels[1] and 7 not in plan.hidden
    assert all(len(h) == 3 for h in plan.heads) and plan.kv_heads == plan.heads  # MHA: K and V go with the query


def test_importance_ignores_masked_tokens():
    m = tiny_llama(V, num_layers=2, seed=0)
    b = batches(1)[0]
    other = {"input_ids": b["input_ids"].clone(), "attention_mask": b["attention_mask"]}
    other["input_ids"][0, :4] = (other["input_ids"][0, :4] + 1) % V  # change only masked (left-padded) tokens
    a, c = compute_importance(m, [b]), compute_importance(m, [other])
    torch.testing.assert_close(a.channels, c.channels)
    torch.testing.assert_close(a.blocks, c.blocks)


def test_pruned_model_round_trips_save_pretrained(tmp_path):
    m = gqa_llama()
    pruned = prune_lm(m, batches(), num_layers=2, heads=2, intermediate_size=40, hidden_size=30)
    c = pruned.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size,
            c.head_dim) == (2, 2, 2, 40, 30, 16)
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = batches(1, seed=1)[0]["input_ids"]
    assert torch.equal(logits(again, ids), logits(pruned, ids))
    assert m.config.hidden_size == 48 and m.model.layers[0].mlp.up_proj.weight.shape == (80, 48)  # source untouched


def test_tied_embeddings_stay_tied():
    m = tiny_llama(V, num_layers=2, seed=0)
    pruned = prune_lm(m, batches(), hidden_size=40)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    assert pruned.model.embed_tokens.weight.shape == (V, 40)


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_target_params_is_reached_from_below(fraction):
    m = tiny_llama(V, num_layers=4, seed=0)
    full = sum(p.numel() for p in m.parameters())
    target = int(full * fraction)
    pruned = prune_lm(m, batches(), target_params=target)
    n = sum(p.numel() for p in pruned.parameters())
    assert 0.97 * target <= n <= target
    assert pruned.config.num_hidden_layers == 4  # depth only when asked
    fixed = sizes_for_target(m, int(full * 0.3), num_layers=2, heads=2)  # given axes stay as given
    assert fixed["num_layers"] == 2 and fixed["heads"] == 2


def test_errors():
    m = gqa_llama()
    with pytest.raises(KDistillError, match=r"expected one of \[2, 4\]"):  # 4 heads in 2 groups of 2: 3 is invalid
        prune_lm(m, batches(), heads=3)
    with pytest.raises(KDistillError, match="no size"):
        prune_lm(m, batches())
    with pytest.raises(KDistillError, match=r"in \[1, 48\]"):
        prune_lm(m, batches(), hidden_size=64)
    with pytest.raises(KDistillError, match="expected fewer than"):
        prune_lm(m, batches(), target_params=10**9)
    with pytest.raises(KDistillError, match="expected an integer >="):
        prune_lm(m, batches(), target_params=10)
    with pytest.raises(KDistillError, match="no counted tokens"):
        compute_importance(m, [])
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(KDistillError, match="model_type 'gpt2'.*layer_subset"):
        prune_lm(gpt2, batches(), heads=1)


def test_calibration_batches_spread_over_the_data():
    from kdistill.data.loaders import TensorDictDataset

    ds = TensorDictDataset(input_ids=torch.arange(40).reshape(20, 2),
                           attention_mask=torch.ones(20, 2, dtype=torch.long))
    out = calibration_batches(ds, num_batches=2, batch_size=3)
    assert [b["input_ids"].shape for b in out] == [(3, 2), (3, 2)]
    assert out[0]["input_ids"][:, 0].tolist() == [0, 6, 12] and out[1]["input_ids"][-1, 0].tolist() == 32
    assert len(calibration_batches(ds, num_batches=50, batch_size=4)) == 5  # never more rows than the data has


def test_importance_is_measured_once_per_calibration_set(monkeypatch):
    import kdistill.students.pruning as pruning

    calls = []
    real = pruning.compute_importance
    monkeypatch.setattr(pruning, "compute_importance", lambda m, b: calls.append(1) or real(m, b))
    m = gqa_llama()
    first = prune_lm(m, batches(), hidden_size=40)
    again = prune_lm(m, batches(), hidden_size=40)  # the probe, then each phase: the same rows
    assert len(calls) == 1
    ids = torch.randint(0, m.config.vocab_size, (1, 6))
    assert torch.equal(logits(first, ids), logits(again, ids))
    prune_lm(m, batches(seed=1), hidden_size=40)  # other rows: measured again
    assert len(calls) == 2
    assert not any("importance" in k for k in m.state_dict())  # the memo is no weight of the teacher
