"""Stored teacher generations for sequence-level distillation (Kim & Rush, 2016, "Sequence-Level
Knowledge Distillation"): the teacher completes every prompt once, the completions are kept on disk,
and the student is trained on (prompt + teacher completion).

Storage: a JSON-lines file, one record per prompt in prompt order::

    {"i": 0, "prompt_ids": [...], "completion_ids": [...]}

Prompts may differ in length (each is completed on its own, unpadded). Completions have exactly
``max_new_tokens`` tokens (EOS suppressed: text blocks), or with ``eos_id`` stop at the first EOS, which they
keep (prompt rows: the student learns where the teacher stops).

next to a ``<file>.meta.json`` with what produced it (teacher fingerprint, tokenizer hash, generation
settings, prompt hash). Each record is appended, flushed and fsynced before the next prompt, so a killed
run loses at most the record being written; a torn last line is detected and dropped on the next start,
which continues after the last complete record. Settings that differ from the stored ones are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import device_of
from ..errors import KDistillError
from ..io import write_bytes_atomic, write_json_atomic


def _prompts_hash(prompts: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(list(map(int, p))).encode())
    return h.hexdigest()


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Complete records in order; a torn trailing line (crash mid-write) is removed from the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records: list[dict[str, Any]] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec.get("i") != len(records):
            raise KDistillError(f"generation store {str(path)!r}: record {len(records)} has index {rec.get('i')!r}; "
                                "expected consecutive indices. The file was edited or mixed; delete it and re-run.")
        records.append(rec)
    keep = b"\n".join(json.dumps(r).encode() for r in records) + (b"\n" if records else b"")
    if keep != raw:
        write_bytes_atomic(path, keep)
    return records


@torch.no_grad()
def generate_store(path: str | Path, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   sampling_temperature: float = 0.0, seed: int = 0, teacher_fingerprint: str = "",
                   tokenizer_hash: str = "", pad_id: int | None = None, eos_id: int | None = None,
                   stop_after: int | None = None) -> list[dict[str, Any]]:
    """Complete ``prompts`` (token id lists) with ``model`` and store them at ``path``; resumes.

    ``sampling_temperature = 0`` is greedy decoding; otherwise sampling at that temperature, seeded per
    prompt with ``(seed, i)`` so a resumed run produces the same completions as an uninterrupted one.
    Without ``eos_id`` exactly ``max_new_tokens`` tokens are generated per prompt (EOS suppressed until then);
    with it, generation stops after the first ``eos_id`` (kept) or at ``max_new_tokens``. Returns all records.
    ``stop_after`` stops after that many new records (tests: simulated interruption).
    """
    if max_new_tokens < 1:
        raise KDistillError(f"max_new_tokens: got {max_new_tokens}, expected >= 1.")
    if sampling_temperature < 0:
        raise KDistillError(f"sampling_temperature: got {sampling_temperature}, expected >= 0 (0 = greedy).")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "teacher_fingerprint": teacher_fingerprint, "tokenizer_hash": tokenizer_hash,
            "max_new_tokens": int(max_new_tokens), "sampling_temperature": float(sampling_temperature),
            "seed": int(seed), "num_prompts": len(prompts), "prompts_hash": _prompts_hash(prompts),
            "eos_id": None if eos_id is None else int(eos_id)}
    meta_path = p.with_name(p.name + ".meta.json")
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diffs = [f"{k}: stored {old.get(k)!r}, run wants {v!r}" for k, v in meta.items() if old.get(k) != v]
        if diffs:
            raise KDistillError(f"generation store {str(p)!r} was made differently: " + "; ".join(diffs)
                                + ". Fix: use another store path (or delete this one).")
    else:
        if p.exists():
            p.unlink()  # records without their meta cannot be trusted
        write_json_atomic(meta_path, meta)
    records = _read_records(p)
    was = model.training
    model.eval()
    written = 0
    try:
        with open(p, "ab") as f:
            for i in range(len(records), len(prompts)):
                if stop_after is not None and written >= stop_after:
                    break
                ids = torch.tensor([list(map(int, prompts[i]))], device=device_of(model))
                kw: dict[str, Any] = {"do_sample": False}
                if eos_id is None:  # fixed-length completions: EOS suppressed
                    kw["min_new_tokens"] = max_new_tokens
                else:
                    kw["eos_token_id"] = int(eos_id)
                if sampling_temperature > 0:
                    kw.update(do_sample=True, temperature=sampling_temperature, top_k=0, top_p=1.0)
                with torch.random.fork_rng(devices=[]):  # per-prompt seed; the caller's RNG is untouched
                    torch.manual_seed(seed * 1_000_003 + i)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kw)
                completion = out[0, ids.shape[1]:].tolist()
                if eos_id is not None and int(eos_id) in completion:
                    completion = completion[: completion.index(int(eos_id)) + 1]
                rec = {"i": i, "prompt_ids": ids[0].tolist(), "completion_ids": completion}
                f.write(json.dumps(rec).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
                records.append(rec)
                written += 1
    finally:
        model.train(was)
    return records


def complete_prompts(path: str | Path, teacher: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, stop_at_eos: bool, sampling_temperature: float = 0.0, seed: int = 0
                     ) -> list[dict[str, Any]]:
    """:func:`generate_store` for a teacher and its tokenizer: the store is tied to both (fingerprint, tokenizer
    hash); ``stop_at_eos`` ends each completion at the tokenizer's EOS."""
    from . import cache

    if stop_at_eos and tokenizer.eos_token_id is None:
        raise KDistillError("sequence_kd: the tokenizer has no EOS token, so completions of prompt rows cannot "
                            "stop; expected a tokenizer with eos_token. Fix: use such a tokenizer, or text data.")
    return generate_store(path, teacher, prompts, max_new_tokens=max_new_tokens,
                          sampling_temperature=sampling_temperature, seed=seed,
                          teacher_fingerprint=cache.model_fingerprint(teacher),
                          tokenizer_hash=cache.tokenizer_hash(tokenizer),
                          pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id if stop_at_eos else None)
