"""Stored teacher generations for sequence-level distillation (Kim & Rush, 2016, "Sequence-Level
Knowledge Distillation"): the teacher completes every prompt once, the completions are kept on disk,
and the student is trained on (prompt + teacher completion).

Storage: a JSON-lines file, one record per prompt in prompt order::

    {"i": 0, "prompt_ids": [...], "completion_ids": [...]}

Prompts may differ in length; they are completed ``generation_batch_size`` at a time, left-padded with an
attention mask, KV cache on (:func:`generate_batch`). Completions have exactly ``max_new_tokens`` tokens (EOS
suppressed: text blocks), or with ``eos_id`` stop at the first EOS, which they keep (prompt rows: the student
learns where the teacher stops); a row that stops no longer counts, the others go on. Greedy completions equal
one-prompt-at-a-time ones token for token, and sampled ones draw each row's noise from its own ``(seed, i)``
generator (:class:`RowSampler`), so no completion depends on the batch size or on where a run was resumed.

Next to the file, ``<file>.meta.json`` records what produced it (teacher fingerprint, tokenizer hash, generation
settings, prompt hash). Each batch's records are appended in one write, flushed and fsynced before the next batch,
so a killed run loses at most the batch being written; a torn last line is detected and dropped on the next start,
which continues at the first missing prompt. Settings that differ from the stored ones are refused.
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


class RowSampler:
    """Sampling at ``sampling_temperature`` that is a function of each row alone: a Hugging Face logits processor
    (used with greedy decoding) adding to ``scores / T`` Gumbel noise drawn from a generator per row, seeded with
    ``(seed, prompt index)``. ``argmax(logits / T + Gumbel)`` is an exact sample of ``softmax(logits / T)`` (the
    Gumbel-max trick), and row ``i`` draws the same noise whether it is generated alone or in any batch, so a store
    does not depend on the batch size and a run resumed at any record continues as an uninterrupted one would."""

    def __init__(self, rows: Sequence[int], *, sampling_temperature: float, seed: int) -> None:
        self.rows, self.sampling_temperature, self.seed = list(rows), float(sampling_temperature), int(seed)
        self._gens: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._gens is None:
            self._gens = [torch.Generator(device=scores.device).manual_seed(self.seed * 1_000_003 + i)
                          for i in self.rows]
        noise = torch.stack([torch.empty(scores.shape[1], device=scores.device, dtype=torch.float32)
                             .exponential_(generator=g) for g in self._gens])
        # -log(Exp(1)) is Gumbel(0, 1); -inf scores (suppressed tokens) stay -inf
        return scores.float() / self.sampling_temperature - noise.clamp_min(1e-30).log()


def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   sampling_temperature: float = 0.0, seed: int = 0, rows: Sequence[int] | None = None,
                   pad_id: int | None = None, eos_id: int | None = None) -> list[list[int]]:
    """Completions of ``prompts`` (token id lists of any lengths) in one ``generate`` call: prompts left-padded
    with an attention mask (Hugging Face derives position ids from it, so a row's tokens are those it gets alone),
    KV cache on. Without ``eos_id`` each completion has exactly ``max_new_tokens`` tokens (EOS suppressed); with
    it, a row stops at its first ``eos_id`` (kept) while the others go on, and its padding is dropped.
    ``sampling_temperature = 0`` is greedy, else :class:`RowSampler` with the prompts' indices ``rows``."""
    from transformers import LogitsProcessorList

    rows = list(range(len(prompts))) if rows is None else list(rows)
    width = max(len(p) for p in prompts)
    fill = int(pad_id if pad_id is not None else eos_id if eos_id is not None else 0)
    dev = device_of(model)
    ids = torch.tensor([[fill] * (width - len(p)) + list(map(int, p)) for p in prompts], device=dev)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    kw: dict[str, Any] = {"do_sample": False, "use_cache": True}
    if eos_id is None:  # fixed-length completions: EOS suppressed
        kw["min_new_tokens"] = max_new_tokens
    else:
        kw["eos_token_id"] = int(eos_id)
    if sampling_temperature > 0:
        kw["logits_processor"] = LogitsProcessorList([RowSampler(rows, sampling_temperature=sampling_temperature,
                                                                 seed=seed)])
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, pad_token_id=fill, **kw)
    completions = []
    for c in out[:, width:].tolist():
        if eos_id is not None and int(eos_id) in c:
            c = c[: c.index(int(eos_id)) + 1]
        completions.append(c)
    return completions


@torch.no_grad()
def generate_store(path: str | Path, model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   sampling_temperature: float = 0.0, seed: int = 0, teacher_fingerprint: str = "",
                   tokenizer_hash: str = "", pad_id: int | None = None, eos_id: int | None = None,
                   generation_batch_size: int = 16, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Complete ``prompts`` (token id lists) with ``model`` and store them at ``path``; resumes.

    Prompts are completed ``generation_batch_size`` at a time (:func:`generate_batch`); the result does not depend
    on that size. ``sampling_temperature = 0`` is greedy decoding; otherwise sampling at that temperature, seeded
    per prompt with ``(seed, i)`` (:class:`RowSampler`), so a resumed run produces the same completions as an
    uninterrupted one. Without ``eos_id`` exactly ``max_new_tokens`` tokens are generated per prompt (EOS suppressed
    until then); with it, generation stops after the first ``eos_id`` (kept) or at ``max_new_tokens``. Returns all
    records. ``stop_after`` stops after that many new records (tests: simulated interruption).
    """
    if max_new_tokens < 1:
        raise KDistillError(f"max_new_tokens: got {max_new_tokens}, expected >= 1.")
    if sampling_temperature < 0:
        raise KDistillError(f"sampling_temperature: got {sampling_temperature}, expected >= 0 (0 = greedy).")
    if not isinstance(generation_batch_size, int) or generation_batch_size < 1:
        raise KDistillError(f"generation_batch_size: got {generation_batch_size!r}, expected an integer >= 1 "
                            "(prompts completed per generate call). Fix: e.g. 16; lower it if memory runs out.")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise KDistillError(f"generate_store: prompt {empty[0]} is empty; expected at least one token per prompt. "
                            "Fix: drop empty prompts.")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "teacher_fingerprint": teacher_fingerprint, "tokenizer_hash": tokenizer_hash,
            "max_new_tokens": int(max_new_tokens), "sampling_temperature": float(sampling_temperature),
            "seed": int(seed), "num_prompts": len(prompts), "prompts_hash": _prompts_hash(prompts),
            "eos_id": None if eos_id is None else int(eos_id),
            # how samples are drawn (greedy stores have none): stores sampled before per-row seeds are refused
            "sampler": "gumbel_max_per_row" if sampling_temperature > 0 else None}
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
    end = len(prompts) if stop_after is None else min(len(prompts), len(records) + int(stop_after))
    was = model.training
    model.eval()
    try:
        with open(p, "ab") as f:
            for lo in range(len(records), end, generation_batch_size):
                rows = list(range(lo, min(lo + generation_batch_size, end)))
                batch = [list(map(int, prompts[i])) for i in rows]
                completions = generate_batch(model, batch, max_new_tokens=max_new_tokens,
                                             sampling_temperature=sampling_temperature, seed=seed, rows=rows,
                                             pad_id=pad_id, eos_id=eos_id)
                new = [{"i": i, "prompt_ids": ids, "completion_ids": c} for i, ids, c in zip(rows, batch, completions)]
                # the whole batch in one write, then fsync; a crash can only tear the tail, which the next start
                # drops (each record depends on its own prompt and seed only, so resuming at any record is exact)
                f.write(b"".join(json.dumps(r).encode() + b"\n" for r in new))
                f.flush()
                os.fsync(f.fileno())
                records.extend(new)
    finally:
        model.train(was)
    return records


def complete_prompts(path: str | Path, teacher: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, stop_at_eos: bool, sampling_temperature: float = 0.0, seed: int = 0,
                     generation_batch_size: int = 16) -> list[dict[str, Any]]:
    """:func:`generate_store` for a teacher and its tokenizer: the store is tied to both (fingerprint, tokenizer
    hash); ``stop_at_eos`` ends each completion at the tokenizer's EOS."""
    from . import cache

    if stop_at_eos and tokenizer.eos_token_id is None:
        raise KDistillError("sequence_kd: the tokenizer has no EOS token, so completions of prompt rows cannot "
                            "stop; expected a tokenizer with eos_token. Fix: use such a tokenizer, or text data.")
    return generate_store(path, teacher, prompts, max_new_tokens=max_new_tokens,
                          sampling_temperature=sampling_temperature, seed=seed,
                          generation_batch_size=generation_batch_size,
                          teacher_fingerprint=cache.model_fingerprint(teacher),
                          tokenizer_hash=cache.tokenizer_hash(tokenizer),
                          pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id if stop_at_eos else None)
