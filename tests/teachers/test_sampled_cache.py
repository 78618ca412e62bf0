"""Sampled teacher targets (Random-Sampling KD) in the LLM cache, and lazy shard verification.

Unbiasedness against the full forward KL (top-k is biased on the same case), the folding of draws, a cache round
trip and resume, manifest refusals between modes, training from sampled targets (3 steps, fused equals unfused), and
verification on first read: opening hashes nothing, a corrupt shard fails with its name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import kdistill.teachers.cache as cache_mod
from kdistill.config import ConfigError, load_config
from kdistill.data.lm import cache_dataset, pack_blocks
from kdistill.data.loaders import make_loader
from kdistill.errors import KDistillError
from kdistill.losses import logits as L
from kdistill.losses.topk import sample_weights, sampled_loss, teacher_sample, teacher_topk, topk_loss
from kdistill.methods.base import ModelOutput
from kdistill.methods.llm_kd import LLMKD
from kdistill.students.llm import fused_student_output, layer_subset_copy
from kdistill.teachers.cache import TopKCache, write_topk_cache
from kdistill.teachers.tiny import tiny_llama
from kdistill.train import fit, make_accelerator

V = 300


class ToyLM(nn.Module):
    def __init__(self, seed=0, sharpness=3.0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)
        self.sharpness = sharpness

    def forward(self, ids, attn):
        return self.head(torch.tanh(self.emb(ids).cumsum(1))) * self.sharpness


def _seqs(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _write(path, model, seqs, **kw):
    args = dict(k=32, kd_temperature=2.0, teacher_fingerprint="toy", tokenizer_hash="tok", vocab_size=V,
                shard_size=3, batch_size=2, mode="sampled")
    args.update(kw)
    return write_topk_cache(path, model, seqs, **args)


def _logits(shape, seed, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------------------ the estimator

@pytest.mark.parametrize(("kd_temperature", "proposal"), [(1.0, None), (2.0, None), (1.0, 2.0)])
def test_sampled_forward_kl_is_unbiased_and_topk_at_equal_bytes_is_not(kd_temperature, proposal):
    """The mean over R independent sampled targets approaches the full KL within its standard error, per token and
    overall; top-6 (the same bytes as 8 draws) stays a lower bound far outside that error."""
    tokens, vocab, draws, R = 48, 40, 8, 400
    t, s = _logits((tokens, vocab), 0), _logits((tokens, vocab), 1)
    full = L.forward_kl(s, t, kd_temperature=kd_temperature)
    g = torch.Generator().manual_seed(2)
    ids, counts, ratio, ent = teacher_sample(t.expand(R, tokens, vocab), samples=draws, kd_temperature=kd_temperature,
                                             proposal_temperature=proposal, generator=g)
    assert (ratio is None) == (proposal is None)
    est = sampled_loss(s.expand(R, tokens, vocab), ids, sample_weights(counts, ratio), ent,
                       kd_temperature=kd_temperature)  # (R, tokens): one sampled target per repeat
    z = (est.mean(0) - full) / (est.std(0) / math.sqrt(R))
    assert float(z.abs().max()) < 5.0, z
    per_repeat = est.mean(1)
    se = float(per_repeat.std() / math.sqrt(R))
    assert abs(float(per_repeat.mean() - full.mean())) < 4 * se
    topk = topk_loss(s, *teacher_topk(t, k=6, kd_temperature=kd_temperature), kd_temperature=kd_temperature)
    assert bool((topk <= full + 1e-5).all())  # a lower bound at every token ...
    assert float(full.mean() - topk.mean()) > 10 * se > 0  # ... whose bias dwarfs the sampled estimate's error


def test_sampled_loss_gradient_closed_form_and_unbiased():
    """d/dz of one sampled estimate is (W p_s - q) / T; averaged over draws it tends to the full KL's gradient."""
    T, draws, R = 2.0, 16, 2000
    t, s0 = _logits((6, 30), 3), _logits((6, 30), 4)
    ids, counts, _, ent = teacher_sample(t, samples=draws, kd_temperature=T, generator=torch.Generator().manual_seed(5))
    w = sample_weights(counts)
    s = s0.clone().requires_grad_(True)
    sampled_loss(s, ids, w, ent, kd_temperature=T).sum().backward()
    q = torch.zeros_like(s0).scatter_add_(-1, ids, w)
    assert torch.allclose(s.grad, (torch.softmax(s0 / T, -1) * w.sum(-1, keepdim=True) - q) / T, atol=1e-6)

    ids, counts, _, ent = teacher_sample(t.expand(R, 6, 30), samples=draws, kd_temperature=T,
                                         generator=torch.Generator().manual_seed(6))
    s = s0.clone().requires_grad_(True)
    sampled_loss(s.expand(R, 6, 30), ids, sample_weights(counts), ent, kd_temperature=T).mean(0).sum().backward()
    s_full = s0.clone().requires_grad_(True)
    L.forward_kl(s_full, t, kd_temperature=T).sum().backward()
    p = torch.softmax(t / T, -1)
    bound = 5 * torch.sqrt(p * (1 - p) / (R * draws)) / T + 1e-6  # 5 standard errors of the mean target
    assert bool(((s.grad - s_full.grad).abs() <= bound).all())


def test_teacher_sample_folds_draws_and_padding_is_harmless():
    t = _logits((5, 20), 7)
    t[0] = -1e4
    t[0, 3] = 50.0  # a certain teacher: every draw is token 3
    ids, counts, ratio, ent = teacher_sample(t, samples=12, generator=torch.Generator().manual_seed(0))
    assert ratio is None and ids.shape == counts.shape == (5, 12)
    assert counts.sum(-1).tolist() == [12] * 5
    assert ids[0, 0] == 3 and counts[0, 0] == 12 and not counts[0, 1:].any() and not ids[0, 1:].any()
    for r in range(5):
        d = int((counts[r] > 0).sum())
        assert bool((ids[r, 1:d] > ids[r, : d - 1]).all())  # distinct, ascending; padding after them
    assert torch.allclose(ent, L.entropy(t), atol=1e-6)
    # a student that rules out the padding id 0 (logit -inf) where the teacher never draws it: finite loss and grad
    s = _logits((1, 20), 8)
    s[0, 0] = -math.inf
    s.requires_grad_(True)
    out = sampled_loss(s, ids[:1], sample_weights(counts[:1]), ent[:1])
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    for bad in (0, 256):
        with pytest.raises(KDistillError, match="samples"):
            teacher_sample(t, samples=bad)
    with pytest.raises(KDistillError, match="forward_kl"):
        sampled_loss(s, ids[:1], sample_weights(counts[:1]), divergence="reverse_kl")


# --------------------------------------------------------------------------------------------- the cache

def test_round_trip_resume_and_size(tmp_path):
    model, seqs = ToyLM(), _seqs()
    root = _write(tmp_path / "c", model, seqs)
    cache = TopKCache(root, expect={"mode": "sampled", "k": 32, "kd_temperature": 2.0})
    assert cache.mode == "sampled" and len(cache) == 10 and cache.tokens() == sum(map(len, seqs))
    assert "sample_log_ratio" not in cache[0]  # the proposal is the targets' distribution: counts suffice
    batch = cache.collate(list(cache))
    total_ll, total_h = 0.0, 0.0
    for i, s in enumerate(seqs):
        n = len(s)
        assert batch["input_ids"][i, :n].tolist() == s
        with torch.no_grad():
            lp = L.log_probs(model(torch.tensor([s]), None)[0], 2.0)
        w, ids = batch["sample_weights"][i, :n], batch["sample_indices"][i, :n]
        assert torch.allclose(w.sum(-1), torch.ones(n)) and not w[n:].any()
        assert bool((w * 32 == (w * 32).round()).all())  # counts / N
        h = -(lp.exp() * lp).sum(-1)
        assert torch.allclose(batch["teacher_entropy"][i, :n], h, rtol=2e-3, atol=1e-3)  # fp16 storage
        total_ll += float((w * lp.gather(-1, ids)).sum())
        total_h += float(h.sum())
    assert abs(total_ll + total_h) < 0.05 * total_h  # E[sum_j w_j log p(i_j)] = -H: the draws follow the teacher
    # the size target: <= 100 bytes per token at N = 32 draws (shards large enough to amortise their headers)
    big = TopKCache(_write(tmp_path / "big", model, [list(range(i, i + 64)) for i in range(32)], shard_size=16))
    nd = torch.stack([(it["sample_counts"] > 0).sum(-1) for it in big]).float()
    assert big.bytes_per_token() <= 100 and big.bytes_per_token() >= 7 + 3 * float(nd.mean()), big.bytes_per_token()
    # deterministic per shard: an interrupted and resumed cache equals an uninterrupted one
    _write(tmp_path / "r", model, seqs, stop_after_shards=2)
    _write(tmp_path / "r", model, seqs)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (root, tmp_path / "r"))
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]
    assert a["mode"] == "sampled" and a["proposal_temperature"] == 2.0 and a["sample_seed"] == 0
    # another proposal temperature stores the importance ratios; the weights stay unbiased (sum 1 on average)
    hot = TopKCache(_write(tmp_path / "p", model, seqs, proposal_temperature=4.0))
    hb = hot.collate(list(hot))
    assert "sample_log_ratio" in hot[0] and hb["sample_weights"].shape[:2] == hb["input_ids"].shape
    valid = hb["attention_mask"].bool()
    assert abs(float(hb["sample_weights"].sum(-1)[valid].mean()) - 1.0) < 0.15


def test_modes_refuse_each_other_with_the_fix(tmp_path):
    model, seqs = ToyLM(), _seqs()
    root = _write(tmp_path / "c", model, seqs)
    with pytest.raises(KDistillError, match=r"holds 'sampled'.*expected 'topk'.*cache.mode: sampled"):
        TopKCache(root, expect={"mode": "topk", "k": 32})
    with pytest.raises(KDistillError, match=r"holds 'sampled'.*expected 'topk'.*new --output"):
        _write(root, model, seqs, mode="topk")
    with pytest.raises(KDistillError, match="proposal_temperature: cache has 2.0, run expects 1.0"):
        TopKCache(root, expect={"mode": "sampled", "proposal_temperature": 1.0})
    top = _write(tmp_path / "t", model, seqs, mode="topk", k=8)
    with pytest.raises(KDistillError, match=r"holds 'topk'.*expected 'sampled'"):
        TopKCache(top, expect={"mode": "sampled"})
    with pytest.raises(KDistillError, match="mode: got 'random'"):
        _write(tmp_path / "x", model, seqs, mode="random")
    with pytest.raises(KDistillError, match="1, 255"):
        _write(tmp_path / "x", model, seqs, k=300)
    with pytest.raises(KDistillError, match="needs cache.mode: sampled"):
        _write(tmp_path / "x", model, seqs, mode="topk", proposal_temperature=2.0)
    with pytest.raises(KDistillError, match="served teacher"):
        write_topk_cache(tmp_path / "x", None, seqs, k=8, kd_temperature=1.0, teacher_fingerprint="e",
                         tokenizer_hash="t", vocab_size=V, mode="sampled", topk_fn=lambda s, k: [])
    # at config load: a method whose loss sampling would bias, and a proposal temperature without sampling
    with pytest.raises(ConfigError, match="forward_kl"):
        load_config("llm/tiny", ["cache={dir: /tmp/x, mode: sampled}"])
    fkl = ["method.kwargs.loss=forward_kl", "method.kwargs.loss_kwargs={}"]
    assert load_config("llm/tiny", ["cache={dir: /tmp/x, mode: sampled, k: 24}", *fkl]).cache.mode == "sampled"
    with pytest.raises(ConfigError, match="proposal_temperature"):
        load_config("llm/tiny", ["cache={dir: /tmp/x, proposal_temperature: 2.0}", *fkl])


# ------------------------------------------------------------------------------------- lazy verification

def _count_hashes(monkeypatch):
    calls = []
    real_bytes, real_file = cache_mod._sha256_bytes, cache_mod._sha256_file
    monkeypatch.setattr(cache_mod, "_sha256_bytes", lambda data: calls.append("bytes") or real_bytes(data))
    monkeypatch.setattr(cache_mod, "_sha256_file", lambda path: calls.append("file") or real_file(path))
    return calls


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_opening_hashes_no_shard_and_each_is_hashed_once(tmp_path, monkeypatch, mode):
    root = _write(tmp_path / "c", ToyLM(), _seqs(), mode=mode, k=8)  # 4 shards
    calls = _count_hashes(monkeypatch)
    cache = TopKCache(root, max_loaded_shards=1)
    assert calls == [] and cache.tokens() == sum(map(len, _seqs())) and calls == []
    cache[0], cache[1]
    assert calls == ["bytes"]  # one shard read, hashed once
    first = cache.collate(list(cache))
    assert calls == ["bytes"] * 4
    again = cache.collate(list(cache))  # re-read (only one shard stays loaded) but not re-hashed
    assert calls == ["bytes"] * 4
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_corrupt_shard_fails_with_its_name_on_first_read(tmp_path):
    root = _write(tmp_path / "c", ToyLM(), _seqs())
    shard = root / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    cache = TopKCache(root)  # opening reads no shard
    assert cache[0]["input_ids"].shape[0] > 0  # shard 0 is intact
    with pytest.raises(KDistillError, match=r"shard-00002.safetensors.*corrupt.*kdistill cache"):
        cache[6]
    with pytest.raises(KDistillError, match=r"shard-00002.safetensors.*corrupt"):
        cache_dataset(TopKCache(root))  # the training read path
    (root / "shard-00001.safetensors").unlink()
    with pytest.raises(KDistillError, match=r"shard-00001.safetensors.*missing"):
        TopKCache(root)  # a missing or resized shard still fails on open (a stat, no read)


# ------------------------------------------------------------------------------- training from the targets

TV = 64


def _tiny():
    teacher = tiny_llama(TV, num_layers=4, seed=0)
    return teacher, layer_subset_copy(teacher, num_layers=2)


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_three_steps_from_sampled_cache_and_fused_equals_unfused(tmp_path):
    teacher, student = _tiny()
    g = torch.Generator().manual_seed(0)
    blocks = pack_blocks([torch.randint(3, TV, (40,), generator=g).tolist() for _ in range(12)], 16, eos_id=2)
    root = write_topk_cache(tmp_path / "cache", lambda i, a: _forward(teacher, {"input_ids": i, "attention_mask": a}),
                            blocks.tolist(), k=24, kd_temperature=2.0, teacher_fingerprint="t", tokenizer_hash="t",
                            vocab_size=TV, shard_size=5, mode="sampled")
    cache = TopKCache(root, expect={"mode": "sampled", "k": 24, "kd_temperature": 2.0})
    data = cache_dataset(cache)
    batch = cache.collate([cache[i] for i in range(4)])
    targets = cache.targets(batch)
    assert set(targets.extra) == {"sample_indices", "sample_weights", "teacher_entropy", "kd_temperature"}

    student.train()
    m = LLMKD(loss="forward_kl", kd_temperature=2.0, alpha=0.5)
    out = m(ModelOutput(_forward(student, batch)), targets, batch)
    sum(out.values()).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(gr).all() for gr in grads.values())
    assert any(float(gr.abs().sum()) > 0 for n, gr in grads.items() if "embed" in n)  # reaches the input layer
    student.zero_grad()
    fused = LLMKD(loss="forward_kl", kd_temperature=2.0, alpha=0.5, fused=True, chunk_size=7)(
        fused_student_output(student, batch), targets, batch)
    sum(fused.values()).backward()
    for k in out:
        assert torch.allclose(out[k], fused[k], atol=1e-5), k
    for n, p in student.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-4), n
    with pytest.raises(KDistillError, match="forward_kl"):
        LLMKD(loss="reverse_kl", kd_temperature=2.0)(ModelOutput(_forward(student, batch)), targets, batch)

    student.zero_grad()
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    res = fit(student=student, method=LLMKD(loss="forward_kl", kd_temperature=2.0, chunk_size=16),
              teacher_targets=cache.targets, train_loader=make_loader(data, 4, seed=0),
              accelerator=make_accelerator(), student_forward=_forward, max_steps=3, epochs=1, progress=False,
              log_every=1, lr=1e-2, output_dir=tmp_path / "run")
    assert res.steps == 3
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["kd"]) for r in rows)


def test_recipe_writes_and_trains_from_a_sampled_cache(tmp_path):
    """`kdistill cache` and `kdistill run` with `cache.mode: sampled`: the run opens the cache (refusing a top-k
    request for it) and trains from it through the same path as top-k targets."""
    from kdistill import api

    over = ["method.kwargs.loss=forward_kl", "method.kwargs.loss_kwargs={}", "baseline=false"]
    sampled = [f"cache={{dir: {tmp_path / 'c'}, mode: sampled, k: 24}}"]
    info = api.cache("llm/tiny", overrides=sampled + over, progress=False)
    assert info["mode"] == "sampled" and info["k"] == 24 and 0 < info["bytes_per_token"]
    r = api.run("llm/tiny", output=tmp_path / "run", progress=False, quiet=True, overrides=sampled + over)
    assert r["data"]["cache"] == str(tmp_path / "c") and math.isfinite(r["student"]["metrics"]["perplexity"])
    with pytest.raises(KDistillError, match=r"holds 'sampled'.*cache.mode: sampled"):
        api.run("llm/tiny", output=tmp_path / "run2", progress=False, quiet=True,
                overrides=[f"cache.dir={tmp_path / 'c'}", *over])
