"""Stored teacher generations (sequence-level KD): deterministic, resumable, torn-line recovery, refusal."""

from __future__ import annotations

import json

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.teachers.generations import generate_store
from kdistill.teachers.tiny import tiny_llama

V = 50


@pytest.fixture(scope="module")
def model():
    return tiny_llama(V, num_layers=1, seed=0)


def _prompts(n=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, V, (4,), generator=g).tolist() for _ in range(n)]


def test_resume_equals_uninterrupted_and_torn_line(tmp_path, model):
    prompts = _prompts()
    full = generate_store(tmp_path / "a.jsonl", model, prompts, max_new_tokens=6, sampling_temperature=1.3, seed=1)
    assert len(full) == 5 and all(len(r["completion_ids"]) == 6 for r in full)
    assert all(r["prompt_ids"] == p for r, p in zip(full, prompts))
    part = generate_store(tmp_path / "b.jsonl", model, prompts, max_new_tokens=6, sampling_temperature=1.3, seed=1,
                          stop_after=2)
    assert len(part) == 2
    with open(tmp_path / "b.jsonl", "ab") as f:   # a crash in the middle of writing record 2
        f.write(b'{"i": 2, "prompt_ids": [1, 2')
    again = generate_store(tmp_path / "b.jsonl", model, prompts, max_new_tokens=6, sampling_temperature=1.3, seed=1)
    assert again == full
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == full


def test_greedy_is_deterministic_and_settings_mismatch_refused(tmp_path, model):
    prompts = _prompts(3)
    a = generate_store(tmp_path / "g.jsonl", model, prompts, max_new_tokens=4)
    b = generate_store(tmp_path / "h.jsonl", model, prompts, max_new_tokens=4)
    assert a == b
    with pytest.raises(KDistillError, match="max_new_tokens"):
        generate_store(tmp_path / "g.jsonl", model, prompts, max_new_tokens=5)
    with pytest.raises(KDistillError, match="prompts_hash"):
        generate_store(tmp_path / "g.jsonl", model, _prompts(4), max_new_tokens=4)


def test_eos_stops_completions_of_prompts_of_different_lengths(tmp_path, model):
    prompts = [[5, 6], [7, 8, 9, 10], [11]]
    fixed = generate_store(tmp_path / "f.jsonl", model, prompts, max_new_tokens=6)
    eos = fixed[1]["completion_ids"][2]  # a token greedy decoding emits third after prompt 1
    recs = generate_store(tmp_path / "e.jsonl", model, prompts, max_new_tokens=6, eos_id=eos)
    assert [r["prompt_ids"] for r in recs] == prompts
    for r in recs:
        c = r["completion_ids"]
        assert (c[-1] == eos and eos not in c[:-1]) or len(c) == 6  # stops at its first EOS, else at the limit
    assert len(recs[1]["completion_ids"]) <= 3 and recs[1]["completion_ids"][-1] == eos
    # the stopping rule is part of the store's identity
    with pytest.raises(KDistillError, match="eos_id"):
        generate_store(tmp_path / "e.jsonl", model, prompts, max_new_tokens=6)


# ------------------------------------------------------------------------------------------ batched generation

@pytest.fixture(scope="module")
def lively():
    """A tiny Llama with large weights, so that greedy continuations vary with the prompt and the step."""
    m = tiny_llama(V, num_layers=2, seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m


def _ragged(n=7):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 7, (n,), generator=g)]


def _one_at_a_time(model, prompts, new, eos=None):
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        kw = {"eos_token_id": eos} if eos is not None else {"min_new_tokens": new}
        c = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                           pad_token_id=0, **kw)[0, len(p):].tolist()
        out.append(c[: c.index(eos) + 1] if eos is not None and eos in c else c)
    return out


def test_batched_greedy_equals_one_prompt_at_a_time(tmp_path, lively):
    prompts = _ragged()
    assert len({len(p) for p in prompts}) > 2  # left padding of different widths in one batch
    reference = _one_at_a_time(lively, prompts, 8)
    assert len({tuple(c) for c in reference}) > 2 and any(len(set(c)) > 2 for c in reference)  # not degenerate
    for bs in (1, 3, 7):
        recs = generate_store(tmp_path / f"b{bs}.jsonl", lively, prompts, max_new_tokens=8, generation_batch_size=bs)
        assert [r["completion_ids"] for r in recs] == reference, bs
        assert [r["prompt_ids"] for r in recs] == prompts


def test_batched_eos_stops_each_row_and_matches_unbatched(tmp_path, lively):
    prompts = _ragged()
    free = _one_at_a_time(lively, prompts, 8)
    eos = free[0][2]  # a token some rows emit early, others late or never
    reference = _one_at_a_time(lively, prompts, 8, eos=eos)
    lengths = {len(c) for c in reference}
    assert len(lengths) > 1  # rows stop at different steps
    recs = generate_store(tmp_path / "e.jsonl", lively, prompts, max_new_tokens=8, eos_id=eos, pad_id=0,
                          generation_batch_size=4)
    assert [r["completion_ids"] for r in recs] == reference
    for r in recs:  # nothing after the first EOS: no padding is stored
        c = r["completion_ids"]
        assert (c[-1] == eos and eos not in c[:-1]) or (len(c) == 8 and eos not in c)


def test_sampling_does_not_depend_on_batch_size_and_resumes_mid_batch(tmp_path, lively):
    prompts = _ragged(9)
    kw = dict(max_new_tokens=6, sampling_temperature=1.5, seed=4)
    one = generate_store(tmp_path / "one.jsonl", lively, prompts, generation_batch_size=1, **kw)
    four = generate_store(tmp_path / "four.jsonl", lively, prompts, generation_batch_size=4, **kw)
    assert one == four
    other_seed = generate_store(tmp_path / "s.jsonl", lively, prompts, generation_batch_size=4,
                                **{**kw, "seed": 5})
    assert other_seed != one
    # interrupted after 5 records (inside the second batch of 4), resumed with another batch size
    part = generate_store(tmp_path / "r.jsonl", lively, prompts, generation_batch_size=4, stop_after=5, **kw)
    assert len(part) == 5 and part == one[:5]
    with open(tmp_path / "r.jsonl", "ab") as f:   # and a torn record 5
        f.write(b'{"i": 5, "prompt_ids": [3')
    resumed = generate_store(tmp_path / "r.jsonl", lively, prompts, generation_batch_size=3, **kw)
    assert resumed == one
    assert [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()] == one


def test_generation_batch_size_and_empty_prompt_refused(tmp_path, model):
    with pytest.raises(KDistillError, match="generation_batch_size"):
        generate_store(tmp_path / "x.jsonl", model, _prompts(2), max_new_tokens=2, generation_batch_size=0)
    with pytest.raises(KDistillError, match="empty"):
        generate_store(tmp_path / "y.jsonl", model, [[3], []], max_new_tokens=2)
