"""Streamed text corpora (data.stream): lazy row reading, a deterministic hash split, early stop once the token
budgets are packed, and the same blocks for `kdistill cache` and training."""

from __future__ import annotations

import json
import math

import pytest

from kdistill import api
from kdistill.config import load_config
from kdistill.data.files import held_out_row, iter_rows
from kdistill.data.lm import TextStream, pack_blocks
from kdistill.errors import ConfigError, KDistillError
from kdistill.teachers.tiny import train_tokenizer

WORDS = "in the beginning god created the heaven and the earth light darkness waters firmament day night".split()


def _texts(n):
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_texts(200), vocab_size=300)


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_reading_stops_once_the_budgets_are_packed(tmp_path, tok):
    path = _write_jsonl(tmp_path / "big.jsonl", _texts(20_000))
    s = TextStream(files=str(path), eval_fraction=0.1)
    train, held = s.blocks(tok, block_length=16, train_tokens=16 * 40, eval_tokens=16 * 4, chunk=64)
    assert train.shape == (40, 16) and held.shape == (4, 16)
    assert s.rows_read < 1_000  # of 20,000 rows: reading stopped soon after the budgets were full
    again = TextStream(files=str(path), eval_fraction=0.1)
    t2, h2 = again.blocks(tok, block_length=16, train_tokens=16 * 40, eval_tokens=16 * 4, chunk=64)
    assert t2.equal(train) and h2.equal(held) and again.rows_read == s.rows_read
    # eval only (`kdistill eval`): the same held-out blocks, no training blocks
    none, h3 = TextStream(files=str(path), eval_fraction=0.1).blocks(tok, block_length=16, train_tokens=None,
                                                                     eval_tokens=16 * 4)
    assert none is None and h3.equal(held)


def test_the_split_is_deterministic_and_matches_packing_in_memory(tmp_path, tok):
    texts = _texts(3_000)
    path = _write_jsonl(tmp_path / "c.jsonl", texts)
    s = TextStream(files=str(path), eval_fraction=0.2, seed=0)
    held, train = list(s.texts("validation")), list(s.texts("train"))
    assert held == list(TextStream(files=str(path), eval_fraction=0.2).texts("validation"))
    assert sorted(held + train) == sorted(texts) and not set(held) & set(train)
    assert abs(len(held) / len(texts) - 0.2) < 0.03
    assert held == [t for i, t in enumerate(texts) if held_out_row(i, fraction=0.2, seed=0)]
    assert held != list(TextStream(files=str(path), eval_fraction=0.2, seed=1).texts("validation"))
    # the blocks are those of packing the split's texts in memory
    b_train, b_held = s.blocks(tok, block_length=16, train_tokens=16 * 30, eval_tokens=16 * 5)
    ids = lambda ts: [tok(t, add_special_tokens=False)["input_ids"] for t in ts]  # noqa: E731
    assert b_train.equal(pack_blocks(ids(train), 16, eos_id=tok.eos_token_id, max_blocks=30))
    assert b_held.equal(pack_blocks(ids(held), 16, eos_id=tok.eos_token_id, max_blocks=5))


def test_formats_validation_file_and_refusals(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(3_000)
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=500)
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "t.csv").write_text("text\n" + "\n".join(texts) + "\n")
    for name in ("t.parquet", "t.txt", "t.csv"):
        rows = iter_rows([tmp_path / name])
        assert next(rows)["text"] == texts[0] and next(rows)["text"] == texts[1]  # lazy: a generator
        assert list(TextStream(files=str(tmp_path / name), eval_fraction=0.1).texts("validation")) == \
            [t for i, t in enumerate(texts) if held_out_row(i, fraction=0.1)]
    val = _write_jsonl(tmp_path / "val.jsonl", texts[:50])
    s = TextStream(files={"train": str(tmp_path / "t.txt"), "validation": str(val)})
    train, held = s.blocks(tok, block_length=16, train_tokens=16 * 8, eval_tokens=16 * 2, chunk=16)
    assert list(s.texts("validation")) == texts[:50] and s.rows_read < 200
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(KDistillError, match="cannot be streamed"):
        list(iter_rows([tmp_path / "a.json"]))
    with pytest.raises(KDistillError, match="Did you mean 'text'"):
        next(TextStream(files=str(tmp_path / "t.parquet"), text_column="txt").texts("train"))
    with pytest.raises(ConfigError, match="data.stream"):
        load_config("llm/tiny", [f"data={{files: {val}, prompt_column: p, completion_column: c, prompt_tokens: 4, "
                                 "stream: true}"])
    with pytest.raises(ConfigError, match="data.stream"):
        load_config("llm/tiny", ["data.stream=true"])  # the recipe's inline texts: nothing to stream


def test_cache_and_training_read_the_same_stream(tmp_path, monkeypatch):
    """`kdistill cache` and `kdistill run` pack the same blocks from a stream; training accepts the cache, and
    `kdistill eval` recomputes the held-out perplexity from the stream."""
    import yaml
    from transformers import AutoTokenizer

    from kdistill.recipes import find_recipe
    from kdistill.teachers.cache import TopKCache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _write_jsonl(tmp_path / "corpus.jsonl", _texts(3_000))
    recipe = yaml.safe_load(find_recipe("llm/tiny").read_text())
    recipe["data"] = {"files": str(path), "text_column": "text", "stream": True, "block_length": 32,
                      "train_tokens": 640, "eval_tokens": 128, "eval_fraction": 0.1}
    recipe["baseline"] = False
    info = api.cache(recipe, output=tmp_path / "cache", progress=False)
    r = api.run(recipe, output=tmp_path / "run", progress=False, quiet=True,
                overrides=[f"cache.dir={tmp_path / 'cache'}"])
    assert r["data"]["stream"] is True and r["data"]["train_tokens"] == 640 and info["sequences"] == 20
    assert math.isfinite(r["student"]["metrics"]["perplexity"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    blocks, _ = TextStream(files=str(path), eval_fraction=0.1).blocks(tok, block_length=32, train_tokens=640,
                                                                      eval_tokens=128)
    cache = TopKCache(tmp_path / "cache")
    assert cache.collate(list(cache))["input_ids"].equal(blocks)
    ev = api.evaluate(tmp_path / "run")
    assert ev["metrics"]["perplexity"] == pytest.approx(r["student"]["metrics"]["perplexity"])
