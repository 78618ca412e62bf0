"""Top-k teacher cache: round trip, resume, corruption detection, manifest checks, size budget."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdistill.errors import KDistillError
from kdistill.losses.topk import teacher_topk
from kdistill.teachers.cache import TopKCache, model_fingerprint, tokenizer_hash, write_topk_cache

V = 300


class ToyLM(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)

    def forward(self, ids, attn):
        return self.head(torch.tanh(self.emb(ids).cumsum(1)))


def _seqs(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _write(path, model, seqs, fingerprint_of=None, **kw):
    fp = model_fingerprint(fingerprint_of if fingerprint_of is not None else model)
    args = dict(k=8, kd_temperature=2.0, teacher_fingerprint=fp, tokenizer_hash="tok",
                vocab_size=V, shard_size=3, batch_size=2)
    args.update(kw)
    return write_topk_cache(path, model, seqs, **args)


def test_round_trip_matches_teacher(tmp_path):
    model, seqs = ToyLM(), _seqs()
    _write(tmp_path / "c", model, seqs)
    cache = TopKCache(tmp_path / "c", expect={"teacher_fingerprint": model_fingerprint(model), "k": 8})
    assert len(cache) == 10 and cache.k == 8 and cache.kd_temperature == 2.0
    assert cache.tokens() == sum(map(len, seqs))
    item = cache[4]
    n = int(item["lengths"])
    assert item["input_ids"][:n].tolist() == seqs[4]
    with torch.no_grad():
        logits = model(torch.tensor([seqs[4]]), None)[0]
    lp, idx, res = teacher_topk(logits, k=8, kd_temperature=2.0)
    assert torch.equal(item["topk_indices"][:n].long(), idx)
    assert torch.allclose(item["topk_logprobs"][:n].float(), lp, atol=2e-3)  # fp16 storage
    assert torch.allclose(item["log_residual"][:n], res, atol=1e-6)
    assert item["topk_indices"].dtype == torch.uint16
    batch = TopKCache.collate([cache[0], cache[1]])
    assert batch["topk_indices"].dtype == torch.int64
    assert batch["mask"].sum() == sum(len(s) - 1 for s in seqs[:2])
    L = batch["input_ids"].shape[1]
    assert batch["topk_logprobs"].shape == (2, L, 8)


def test_resume_after_interruption_gives_the_same_cache(tmp_path):
    model, seqs = ToyLM(), _seqs()
    _write(tmp_path / "once", model, seqs)
    _write(tmp_path / "twice", model, seqs, stop_after_shards=2)
    partial = json.loads((tmp_path / "twice" / "manifest.json").read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"]
    with pytest.raises(KDistillError, match="incomplete"):
        TopKCache(tmp_path / "twice")
    calls = []
    _write(tmp_path / "twice", lambda i, a: calls.append(i.shape[0]) or model(i, a), seqs, fingerprint_of=model)
    assert sum(calls) == 10 - 6  # only the two missing shards (4 sequences) were computed
    a = json.loads((tmp_path / "once" / "manifest.json").read_text())
    b = json.loads((tmp_path / "twice" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert b["complete"] and len(b["shards"]) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_detected_and_repaired(tmp_path, damage):
    model, seqs = ToyLM(), _seqs()
    root = _write(tmp_path / "c", model, seqs)
    shard = root / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(KDistillError, match="shard-00001.safetensors.*(truncated|corrupt).*kdistill cache"):
        list(TopKCache(root))  # a truncated shard fails on open (its size), a flipped byte on its first read
    calls = []
    _write(root, lambda i, a: calls.append(i.shape[0]) or model(i, a), seqs, fingerprint_of=model)
    assert sum(calls) == 3  # only the broken shard was recomputed
    assert len(TopKCache(root)) == 10


def test_mismatched_manifest_is_refused(tmp_path):
    model, seqs = ToyLM(), _seqs()
    root = _write(tmp_path / "c", model, seqs)
    with pytest.raises(KDistillError, match="k: cache has 8, run expects 16"):
        _write(root, model, seqs, k=16)
    with pytest.raises(KDistillError, match="teacher_fingerprint"):
        _write(root, ToyLM(seed=1), seqs)
    with pytest.raises(KDistillError, match="data_hash"):
        _write(root, model, _seqs(seed=5))
    with pytest.raises(KDistillError, match="kd_temperature: cache has 2.0, run expects 1.0"):
        TopKCache(root, expect={"kd_temperature": 1.0})
    with pytest.raises(KDistillError, match="tokenizer_hash"):
        TopKCache(root, expect={"tokenizer_hash": "other"})
    with pytest.raises(KDistillError, match="kdistill cache CONFIG"):
        TopKCache(tmp_path / "nothing")


def test_bytes_per_token_budget(tmp_path):
    model = ToyLM()
    seqs = [list(range(i, i + 64)) for i in range(0, 32)]
    root = _write(tmp_path / "c", model, seqs, k=32, shard_size=16)
    cache = TopKCache(root)
    bpt = cache.bytes_on_disk() / cache.tokens()
    assert bpt <= 150, bpt


def test_fingerprints():
    a, b = ToyLM(0), ToyLM(0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.head.bias[3] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models
    t1 = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t2 = Tokenizer(models.WordLevel({"a": 0, "c": 1, "[UNK]": 2}, unk_token="[UNK]"))
    assert tokenizer_hash(t1) != tokenizer_hash(t2)
    assert tokenizer_hash(t1) == tokenizer_hash(Tokenizer.from_str(t1.to_str()))


def test_bad_arguments(tmp_path):
    model, seqs = ToyLM(), _seqs()
    with pytest.raises(KDistillError, match="dtype"):
        _write(tmp_path / "a", model, seqs, dtype="int8")
    with pytest.raises(KDistillError, match="max_length"):
        _write(tmp_path / "b", model, seqs, max_length=4)
    with pytest.raises(KDistillError, match="logits of shape"):
        _write(tmp_path / "c", lambda i, a: model(i, a)[:, :-1], seqs, fingerprint_of=model)


def test_fingerprint_does_not_depend_on_reduction_order() -> None:
    """A cache written with one thread count (or on a GPU) must open with another: the fingerprint's per-tensor
    checksum is exact, where a float sum changes with the order of additions."""
    from kdistill.teachers.cache import _checksum

    torch.manual_seed(0)
    t = torch.randn(100_003) * torch.logspace(-6, 6, 100_003)
    assert float(t.sum()) != float(t.flip(0).sum())  # a float sum does depend on the order
    assert _checksum(t) == _checksum(t.flip(0).flip(0)) == _checksum(t.clone())
    assert _checksum(t) == _checksum(t.reshape(-1, 1).flip(0).reshape(-1).flip(0))
    # the checksum is the exact sum of the words, order-free: compare with a shuffled copy of the words
    words = t.view(torch.int32).to(torch.int64)
    assert _checksum(t) == int(words[torch.randperm(len(words))].sum()) % (1 << 64)
    u = t.clone()
    u[7] = torch.nextafter(u[7], torch.tensor(float("inf")))  # one ulp of one value
    assert _checksum(u) != _checksum(t)
    m = torch.nn.Linear(300, 300)
    with torch.no_grad():
        m.weight.mul_(torch.logspace(-6, 6, 300))
    before = model_fingerprint(m)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert model_fingerprint(m) == before
    finally:
        torch.set_num_threads(n)
