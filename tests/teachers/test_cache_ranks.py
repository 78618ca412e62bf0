"""The top-k cache written by several processes: ranks write disjoint shards and rank 0 merges one manifest; the
cache equals a one-process cache byte for byte (top-k and sampled), an interrupted multi-process write resumes with
any process count and repeats nothing, and `kdistill cache --nproc 2` (torchrun, gloo) equals `kdistill cache`."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from kdistill import api
from kdistill.errors import KDistillError
from kdistill.teachers.cache import TopKCache, model_fingerprint, write_topk_cache

from .test_llm_cache import ToyLM, _seqs

V = 300


def _args(model, **kw):
    args = dict(k=8, kd_temperature=2.0, teacher_fingerprint=model_fingerprint(model), tokenizer_hash="tok",
                vocab_size=V, shard_size=2, batch_size=2)
    args.update(kw)
    return args


def _shards(path):
    """{shard file: sha256} from the manifest, and the files on disk (no rank lists, no temporary files)."""
    manifest = json.loads((path / "manifest.json").read_text())
    return ({e["file"]: e["sha256"] for e in manifest["shards"]}, manifest["complete"],
            sorted(p.name for p in path.iterdir()))


def _ranks(world, path, teacher_fn, seqs, barrier=None, **kw):
    """``world`` threads standing in for torchrun's processes (same arguments, own rank, a shared barrier)."""
    barrier = barrier or threading.Barrier(world, timeout=60).wait
    errors = []

    def work(rank):
        try:
            write_topk_cache(path, teacher_fn, seqs, rank=rank, world_size=world, barrier=barrier, **kw)
        except BaseException as e:  # noqa: BLE001 -- handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _dies_after_writing():
    """A barrier for 2 ranks that passes the one before the writes and fails the one after (the job was killed
    before rank 0 merged the rank lists)."""
    passed, lock, calls = threading.Barrier(2, timeout=60), threading.Lock(), []

    def barrier():
        with lock:
            calls.append(1)
            late = len(calls) > 2
        if late:
            raise RuntimeError("killed")
        passed.wait()

    return barrier


@pytest.mark.parametrize("mode", ["topk", "sampled"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_write_the_same_cache_as_one_process(tmp_path, mode, world):
    model, seqs = ToyLM(), _seqs(11)
    kw = _args(model, mode=mode, k=12 if mode == "sampled" else 8)
    write_topk_cache(tmp_path / "one", model, seqs, **kw)
    calls = []
    lock = threading.Lock()

    def counted(ids, attn):
        with lock:
            calls.append(threading.current_thread().name)
        return model(ids, attn)

    assert _ranks(world, tmp_path / "many", counted, seqs, **kw) == []
    one, many = _shards(tmp_path / "one"), _shards(tmp_path / "many")
    assert many == one and many[1] and len(many[0]) == 6  # same files, same bytes, complete, nothing left over
    assert len(calls) == 6 and len(set(calls)) == world  # each batch once, and every rank did some
    c = TopKCache(tmp_path / "many")
    assert len(c) == 11 and c.mode == mode


def test_interrupted_multi_process_write_resumes_with_any_process_count(tmp_path):
    model, seqs = ToyLM(), _seqs(11)
    kw = _args(model)
    write_topk_cache(tmp_path / "one", model, seqs, **kw)

    # 2 ranks write one shard each, then the job dies before rank 0 merges: the shards are listed only in the ranks'
    # own lists, which the next writer takes in
    errors = _ranks(2, tmp_path / "c", model, seqs, barrier=_dies_after_writing(), stop_after_shards=1, **kw)
    assert len(errors) == 2
    files = _shards(tmp_path / "c")[2]
    assert "manifest.rank-0.json" in files and "manifest.rank-1.json" in files
    with pytest.raises(KDistillError, match="incomplete"):
        TopKCache(tmp_path / "c")

    # one process resumes: it computes only the 4 shards nobody wrote (6 - 2) and removes the rank lists
    batches = []
    write_topk_cache(tmp_path / "c", lambda i, a: batches.append(i.shape[0]) or model(i, a), seqs, **kw)
    assert sum(batches) == 11 - 4  # sequences of shards 2..5: nothing written before is computed again
    assert _shards(tmp_path / "c") == _shards(tmp_path / "one")

    # 3 ranks resume a one-process partial cache (2 shards done): each missing shard written once
    write_topk_cache(tmp_path / "d", model, seqs, stop_after_shards=2, **kw)
    batches.clear()
    lock = threading.Lock()

    def counted(ids, attn):
        with lock:
            batches.append(ids.shape[0])
        return model(ids, attn)

    assert _ranks(3, tmp_path / "d", counted, seqs, **kw) == []
    assert sum(batches) == 11 - 4
    assert _shards(tmp_path / "d") == _shards(tmp_path / "one")


def test_a_rank_list_naming_a_broken_shard_is_not_trusted(tmp_path):
    model, seqs = ToyLM(), _seqs(8)
    kw = _args(model)
    write_topk_cache(tmp_path / "one", model, seqs, **kw)
    _ranks(2, tmp_path / "c", model, seqs, barrier=_dies_after_writing(), stop_after_shards=1, **kw)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    batches = []
    write_topk_cache(tmp_path / "c", lambda i, a: batches.append(i.shape[0]) or model(i, a), seqs, **kw)
    assert sum(batches) == 8 - 2  # shard 1 was rewritten, shard 0 kept
    assert _shards(tmp_path / "c") == _shards(tmp_path / "one")


def test_bad_rank_arguments_are_refused(tmp_path):
    model, seqs = ToyLM(), _seqs(4)
    with pytest.raises(KDistillError, match="rank 2 of world_size 2"):
        write_topk_cache(tmp_path / "c", model, seqs, rank=2, world_size=2, barrier=lambda: None, **_args(model))
    with pytest.raises(KDistillError, match="needs a barrier"):
        write_topk_cache(tmp_path / "c", model, seqs, rank=0, world_size=2, **_args(model))
    with pytest.raises(KDistillError, match="nproc 0"):
        api.cache("llm/tiny", output=tmp_path / "x", nproc=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_kdistill_cache_nproc_2_equals_one_process(tmp_path, monkeypatch):
    # CPU processes (gloo) even on a GPU machine; one thread each on the 2-core CI machine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in [k for k in os.environ if k in ("LOCAL_RANK", "RANK", "WORLD_SIZE")]:
        monkeypatch.delenv(k)
    one = api.cache("llm/tiny", overrides=[f"cache.dir={tmp_path / 'one'}", "cache.shard_size=2"], progress=False)
    two = api.cache("llm/tiny", overrides=[f"cache.dir={tmp_path / 'two'}", "cache.shard_size=2"], progress=False,
                    nproc=2)
    assert one == {**two, "cache": str(tmp_path / "one")}
    a, b = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert a == b and len(a[0]) >= 4 and a[1]
    assert torch.equal(TopKCache(tmp_path / "two")[3]["topk_logprobs"], TopKCache(tmp_path / "one")[3]["topk_logprobs"])
