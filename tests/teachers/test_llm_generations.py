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
