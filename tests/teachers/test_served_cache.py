"""A teacher scored over HTTP: `kdistill cache` with `teacher.endpoint` writes the same verified top-k cache as the
local model; training opens it by probe (no weights) and refuses a server whose model changed."""

from __future__ import annotations

import httpx
import pytest
import torch

from kdistill.config import load_config
from kdistill.errors import KDistillError
from kdistill.teachers.api import APITeacher, EndpointScorer
from kdistill.teachers.cache import TopKCache, model_fingerprint, open_topk_cache, tokenizer_hash, write_topk_cache
from kdistill.teachers.serve import ServerHandle, create_app, load_served_lm

TEXTS = ["a dog barks at the cat and the cat runs to the oak tree", "bread is a food made from flour and water",
         "cheese is a food made from milk and salt", "the fern is a green plant without flowers"] * 6


def recipe(h, tiny_lm_dir, tmp_path, **cache):
    return {"task": "llm", "name": "served",
            "teacher": {"endpoint": h.base_url, "model": "tiny-llama", "tokenizer": str(tiny_lm_dir)},
            "student": {"pretrained": str(tiny_lm_dir)},
            "data": {"name": "texts", "texts": TEXTS, "block_length": 12, "train_tokens": 120, "eval_tokens": 24,
                     "eval_fraction": 0.2},
            "cache": {"dir": str(tmp_path / "cache"), "k": 8, "shard_size": 3, **cache},
            "train": {"epochs": 1, "batch_size": 4, "max_steps": 2}, "baseline": False,
            "eval": {"batch_size": 4, "generations": 1, "max_new_tokens": 3, "agreement_k": 8}}


def completions(h):
    return httpx.get(h.base_url + "/stats").json()["by_path"].get("/v1/completions", 0)


def test_served_cache_equals_local_cache_and_training_opens_it(serve, tiny_lm_dir, tmp_path):
    from kdistill.tasks.llm import write_cache

    h = serve()
    cfg = load_config(recipe(h, tiny_lm_dir, tmp_path))
    root = write_cache(cfg, progress=False)
    served = TopKCache(root)
    assert served.manifest["teacher_fingerprint"] == "endpoint:tiny-llama" and served.k == 8
    assert served.manifest["teacher_probe"]["logprobs"] and not (root / "responses.sqlite").exists()
    lm, tok, _ = load_served_lm(str(tiny_lm_dir))
    blocks = [it["input_ids"][: int(it["lengths"])].tolist() for it in served]
    write_topk_cache(tmp_path / "local", lambda i, a: lm(input_ids=i, attention_mask=a).logits, blocks, k=8,
                     kd_temperature=1.0, teacher_fingerprint=model_fingerprint(lm), tokenizer_hash=tokenizer_hash(tok),
                     vocab_size=int(lm.config.vocab_size), shard_size=3)
    local = TopKCache(tmp_path / "local")
    assert len(local) == len(served) >= 4
    for a, b in zip(served, local, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["topk_indices"], b["topk_indices"])
        assert torch.allclose(a["topk_logprobs"].float(), b["topk_logprobs"].float(), atol=2e-3)  # fp16 storage
        assert torch.allclose(a["log_residual"], b["log_residual"], atol=1e-3)

    # training opens the cache through the probe (no teacher weights) and trains from it
    from kdistill.api import run

    report = run(cfg.model_dump(mode="json"), output=tmp_path / "run", quiet=True, progress=False)
    assert report["teacher"]["params"] == 0 and report["student"]["steps"] == 2
    assert report["teacher"]["metrics"]["perplexity"] > 1


def test_changed_served_model_is_refused(serve, tiny_lm_dir, tmp_path):
    from kdistill.tasks.llm import _served, write_cache

    h = serve()
    cfg = load_config(recipe(h, tiny_lm_dir, tmp_path))
    write_cache(cfg, progress=False)
    lm, tok, name = load_served_lm(str(tiny_lm_dir))
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with ServerHandle(create_app(lm, tok, name), "127.0.0.1", 0) as other:
        cfg2 = load_config(recipe(other, tiny_lm_dir, tmp_path))
        scorer, tok2 = _served(cfg2)
        blocks = torch.stack([it["input_ids"][: int(it["lengths"])].long() for it in TopKCache(cfg.cache.dir)])
        with pytest.raises(KDistillError, match="another teacher than the one served now.*log-probs"):
            open_topk_cache(cfg.cache.dir, tokenizer=tok2, train_blocks=blocks, endpoint=scorer, k=8,
                            dtype="float16", identity={"kd_temperature": 1.0, "teacher": "endpoint:tiny-llama"})
        with pytest.raises(KDistillError, match="another served teacher"):  # nor resumed into
            write_cache(cfg2, progress=False)


def test_resume_after_partial_write_sends_only_the_rest(serve, tiny_lm_dir, tmp_path):
    h = serve(record_requests=True)
    lm, tok, _ = load_served_lm(str(tiny_lm_dir))
    blocks = [tok(t)["input_ids"][:10] for t in TEXTS[:4]] + [tok(TEXTS[0])["input_ids"][2:12]]
    store = tmp_path / "c" / "responses.sqlite"

    def scorer():
        return EndpointScorer(APITeacher(h.base_url, "tiny-llama", store=str(store), concurrency=3),
                              vocab_size=len(tok), end_id=tok.eos_token_id)

    args = dict(k=4, kd_temperature=1.0, teacher_fingerprint="endpoint:tiny-llama",
                tokenizer_hash=tokenizer_hash(tok), vocab_size=len(tok), shard_size=2)
    s1 = scorer()
    probe = s1.probe(tok, k=4)
    write_topk_cache(tmp_path / "c", None, blocks, topk_fn=s1.topk, teacher_probe=probe, stop_after_shards=1, **args)
    assert completions(h) == 1 + 2  # the probe and the first shard's two blocks
    with pytest.raises(KDistillError, match="incomplete"):
        TopKCache(tmp_path / "c")
    s2 = scorer()
    write_topk_cache(tmp_path / "c", None, blocks, topk_fn=s2.topk, teacher_probe=s2.probe(tok, k=4), **args)
    assert completions(h) == 3 + 3  # the probe's answer is in the store; only the three blocks not yet cached
    assert len(TopKCache(tmp_path / "c")) == 5
    # answers are durable: the same shards again from the store send nothing
    s3 = scorer()
    s3.topk(blocks, 4)
    assert completions(h) == 6 and s3.teacher.cost()["cached"] == 5


def test_k_above_the_server_cap_is_a_clear_error(serve, tiny_lm_dir, tmp_path):
    from kdistill.tasks.llm import write_cache

    h = serve()
    with pytest.raises(KDistillError, match=r"refuses 32 top log-probs.*cache\.k"):
        write_cache(load_config(recipe(h, tiny_lm_dir, tmp_path, k=32)), progress=False)
    assert not list((tmp_path / "cache").glob("shard-*"))


def test_served_teacher_config_refusals(serve, tiny_lm_dir, tmp_path):
    h = serve()
    base = recipe(h, tiny_lm_dir, tmp_path)
    with pytest.raises(Exception, match="kdistill cache RECIPE"):
        load_config({**base, "cache": None})
    with pytest.raises(Exception, match="kd_temperature 2.0 with a served teacher"):
        load_config({**base, "method": {"name": "llm_kd", "kwargs": {"kd_temperature": 2.0}}})
    with pytest.raises(Exception, match="pretrained"):
        load_config({**base, "student": {"kind": "layer_subset", "num_layers": 1}})
    with pytest.raises(Exception, match="goes with teacher.endpoint"):
        load_config({**base, "teacher": {"name": "tiny", "model": "x"}})
    with pytest.raises(Exception, match="looks like a secret"):
        load_config({**base, "teacher": {**base["teacher"], "api_key_env": "sk-" + "a1B2" * 8}})
