"""Every offline teacher target kdistill keeps, in one module:

* :func:`teacher_logits_table` -- a classifier teacher's logits over fixed training inputs, computed once and
  looked up by example index (in memory, for a run);
* :func:`cached_embeddings` -- a sentence encoder's embeddings of a text list, on disk by teacher fingerprint
  and text hash (reused across runs and students);
* the language-model cache below: per-token top-k log-probs, sharded, verified, resumable.

Layout of a cache directory::

    manifest.json              what was cached and by whom (see below); rewritten atomically
    shard-00000.safetensors    sequences [0, S)
    shard-00001.safetensors    sequences [S, 2S) ...

Each shard holds, for ``n`` sequences padded to length ``L``:

=================  ============  =========================================================================
``input_ids``      (n, L) int32  the token ids the teacher saw (training reads its data from the cache)
``lengths``        (n,) int32    number of real tokens per sequence
``topk_logprobs``  (n, L, k)     teacher log-probs at temperature ``kd_temperature``, fp16 by default
``topk_indices``   (n, L, k)     their vocabulary ids: uint16 when ``vocab_size <= 65536``, else int32
``log_residual``   (n, L) fp32   log of the teacher's probability mass outside the top k (exact)
=================  ============  =========================================================================

At ``k = 32`` with fp16 log-probs and uint16 indices a token costs ``32 * (2 + 2) + 4 + 4 = 136`` bytes
(plus the safetensors header, amortised over the shard).

The manifest records ``format_version``, ``teacher_fingerprint`` (and ``teacher_probe`` for a served teacher),
``tokenizer_hash``, ``k``,
``kd_temperature``, ``dtype``, ``index_dtype``, ``vocab_size``, ``max_length``, ``shard_size``,
``num_sequences``, ``data_hash`` and a shard index (file, first sequence, count, bytes, sha256).

Safety:

* **atomic**: a shard is written to a temporary file, fsynced and renamed; the manifest entry is added
  only after the rename (also atomically). A crash leaves either a complete listed shard or nothing.
* **resumable**: writing again into the same directory with the same settings verifies the listed shards
  and computes only the missing ones (no shard lost, none duplicated).
* **verified**: opening a cache checks every shard's size and SHA-256; a truncated or corrupt shard is
  reported by name with the fix (re-run ``kdistill cache``: it rewrites only the broken shard).
* **refused on mismatch**: a manifest whose teacher, tokenizer, k, temperature or data differ from the
  run raises with the differing fields.

A teacher served over HTTP (:class:`kdistill.teachers.api.EndpointScorer`) is written through ``topk_fn``
instead of ``teacher_fn``: the server returns top-k log-probs at temperature 1 (never logits), the residual is
``log(1 - sum of the top k)``. Its ``teacher_fingerprint`` is ``endpoint:<model name>`` and the manifest also
holds ``teacher_probe``: the served model's log-probs of a fixed probe text, compared within a tolerance (not
hashed: any rounding grid flips for values near its edges) when the cache is resumed or opened, so a server
whose model changed is refused without the teacher's weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..data.lm import IGNORE_INDEX, label_mask
from ..errors import KDistillError
from ..io import cache_root, load_state_dict, save_state_dict_atomic, write_json_atomic
from ..losses.topk import teacher_topk

# ------------------------------------------------------------------------------ classifier logits, embeddings


def teacher_logits_table(teacher: nn.Module, inputs: Tensor) -> Callable[[dict[str, Any]], Any]:
    """``teacher_targets`` for :func:`kdistill.train.loop.fit` when the inputs never change and the method reads
    only logits: one pass of the frozen teacher over ``inputs`` (the same values as a teacher forward at every
    step, since the teacher is in eval mode), then each batch looks its rows up by ``batch["index"]``."""
    from ..methods.base import ModelOutput
    from ..models.classifiers import predict_logits

    table = predict_logits(teacher, inputs)
    return lambda batch: ModelOutput(logits=table.to(batch["index"].device)[batch["index"]])


def cached_embeddings(teacher: Any, sentences: list[str], *, batch_size: int = 64) -> Tensor:
    """``teacher.encode(sentences)``, cached under ``$KDISTILL_CACHE/teacher_embeddings`` by teacher fingerprint
    and a hash of the sentence list (later runs and other students of the same teacher and data skip the teacher
    pass). Written atomically; a file for another number of sentences is recomputed."""
    from ..students.static import teacher_fingerprint

    h = hashlib.sha256("\x1f".join(sentences).encode()).hexdigest()[:16]
    path = cache_root() / "teacher_embeddings" / f"{teacher_fingerprint(teacher)}-{h}.safetensors"
    if path.is_file():
        emb = load_state_dict(path)["embeddings"]
        if emb.shape[0] == len(sentences):
            return emb
    emb = teacher.encode(sentences, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict_atomic(path, {"embeddings": emb.contiguous()})
    return emb


# ----------------------------------------------------------------------------------- language-model top-k


def targets_temperature(identity: Mapping[str, Any]) -> float:
    """The temperature top-k targets are stored at, from a method's ``cache_identity()`` (1 when it names none)."""
    return float(identity.get("kd_temperature", 1.0))


def check_served_temperature(identity: Mapping[str, Any], method: str) -> None:
    """A served teacher gives temperature-1 top-k log-probs: refuse a method whose cache targets need another
    temperature (``cache_identity()``), at config load."""
    t = targets_temperature(identity)
    if t != 1.0:
        raise KDistillError(f"method {method!r}: kd_temperature {t} with a served teacher; expected 1: a server "
                            "returns temperature-1 top-k log-probs, and softmax(logits / T) cannot be recovered "
                            "exactly from a top-k. Fix: method.kwargs.kd_temperature: 1.0")


def expected_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """What a cache's manifest must hold for a method's ``cache_identity()``: it, with the temperature explicit."""
    return {**identity, "kd_temperature": targets_temperature(identity)}


FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: manifest fields that must match between a writer that resumes, or a run that reads, and the cache
IDENTITY_FIELDS = ("format_version", "teacher_fingerprint", "tokenizer_hash", "k", "kd_temperature", "dtype",
                   "vocab_size", "max_length", "shard_size", "num_sequences", "data_hash")


# --------------------------------------------------------------------------------------- fingerprints

def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """A SHA-256 over the model's config (when it has one) and, for every parameter and buffer, its name,
    shape, dtype and an evenly strided sample of its values. Different weights -> different fingerprint
    (with overwhelming probability) at a cost of milliseconds even for large models."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k not in ("transformers_version",)}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel():
            step = max(1, math.ceil(flat.numel() / samples_per_tensor))
            sample = flat[::step].float().cpu().contiguous()
            h.update(sample.numpy().tobytes())
            h.update(str(_checksum(flat)).encode())
    return h.hexdigest()


def _checksum(flat: Tensor) -> int:
    """The sum of a tensor's raw 32-bit words (bytes when its size is not a multiple of 4), modulo 2**64: exact and
    independent of reduction order, so threads, devices and batch splits agree. A float sum is not: it changes
    with the thread count, and a cache written with one would be refused with another."""
    raw = flat.detach().contiguous().reshape(-1).view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    return int(words.to(torch.int64).sum()) % (1 << 64)


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's full serialisation (fast tokenizers), else of its sorted vocabulary and
    special tokens. Two tokenizers with the same hash map text to the same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str"):
        backend = tokenizer
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    if hasattr(tokenizer, "get_vocab"):
        payload = {"vocab": sorted(tokenizer.get_vocab().items()),
                   "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))}
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
    raise KDistillError(f"tokenizer_hash: got a {type(tokenizer).__name__}; expected a Hugging Face tokenizer "
                        "(with backend_tokenizer or get_vocab) or a `tokenizers.Tokenizer`.")


def data_hash(sequences: Sequence[Sequence[int]]) -> str:
    """SHA-256 of the token id sequences (order matters): ties a cache to the exact training data."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(len(s).to_bytes(4, "little"))
        h.update(torch.as_tensor(list(s), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise KDistillError(f"cache manifest {str(path / MANIFEST)!r} is not valid JSON ({e}); expected the file "
                            "written by `kdistill cache`. Delete the directory and cache again.") from None


def _mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key, want in wanted.items():
        got = found.get(key)
        same = (math.isclose(float(got), float(want), rel_tol=1e-9)
                if isinstance(want, float) and isinstance(got, (int, float)) else got == want)
        if not same:
            diffs.append(f"{key}: cache has {got!r}, run expects {want!r}")
    return diffs


def _check_shard(root: Path, entry: Mapping[str, Any]) -> str | None:
    """None when the shard file is intact, else why not."""
    p = root / entry["file"]
    if not p.is_file():
        return "file is missing"
    size = p.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} bytes, manifest says {entry['bytes']} (truncated or overwritten)"
    if _sha256_file(p) != entry["sha256"]:
        return "SHA-256 does not match the manifest (corrupt)"
    return None


# ---------------------------------------------------------------------------------------------- writer

TeacherFn = Callable[[Tensor, Tensor], Tensor]
"""``teacher_fn(input_ids (b, L) long, attention_mask (b, L) long) -> logits (b, L, V)``."""
TopKFn = Callable[[Sequence[Sequence[int]], int], list[tuple[Tensor, Tensor, Tensor]]]
"""``topk_fn(sequences, k)`` -> per sequence of ``n`` tokens ``(log-probs (n, k), ids (n, k), log residual (n,))``
at the cache's temperature, position j predicting token j + 1 (a served teacher's answers)."""


def _probe_diff(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    from .api import probe_difference

    if stored is None:
        return "the cache has no teacher_probe (it was written from local weights, not from a server)"
    return probe_difference(stored, current)


def write_topk_cache(
    output_dir: str | Path,
    teacher_fn: TeacherFn | None,
    sequences: Sequence[Sequence[int]],
    *,
    k: int,
    kd_temperature: float,
    teacher_fingerprint: str,
    tokenizer_hash: str,
    vocab_size: int,
    max_length: int | None = None,
    dtype: str = "float16",
    shard_size: int = 64,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
    stop_after_shards: int | None = None,
    extra: Mapping[str, Any] | None = None,
    topk_fn: TopKFn | None = None,
    teacher_probe: Mapping[str, Any] | None = None,
) -> Path:
    """Run the teacher over ``sequences`` (lists of token ids) and write the top-k cache to ``output_dir``.

    Resumes a partial cache written with the same settings (verifying its shards, rewriting broken
    ones); refuses a directory holding a different cache. ``extra``: more identity fields stored in the
    manifest and checked on resume (e.g. the recipe's teacher name). ``stop_after_shards`` writes at most
    that many new shards and returns (used by tests to simulate an interruption). Returns the directory.

    ``topk_fn`` (instead of ``teacher_fn``): a teacher that answers top-k log-probs directly (a served model, at
    temperature 1 only); ``teacher_probe``: its probe log-probs, stored in the manifest and compared within a
    tolerance on resume (see :func:`kdistill.teachers.api.probe_difference`).
    """
    if (teacher_fn is None) == (topk_fn is None):
        raise KDistillError("write_topk_cache: expected exactly one of teacher_fn (logits) and topk_fn (top-k "
                            "log-probs of a served teacher).")
    if topk_fn is not None and kd_temperature != 1.0:
        raise KDistillError(f"cache kd_temperature: got {kd_temperature!r} with a served teacher, expected 1.0: a "
                            "server returns temperature-1 top-k log-probs, and softmax(logits / T) cannot be "
                            "recovered exactly from a top-k. Fix: use kd_temperature 1 (the method's default), or "
                            "cache from the teacher's weights.")
    if dtype not in _DTYPES:
        raise KDistillError(f"cache dtype: got {dtype!r}, expected one of {sorted(_DTYPES)} (float16 is the "
                            "compact default: 2 bytes per log-prob).")
    if not (isinstance(shard_size, int) and shard_size >= 1):
        raise KDistillError(f"cache shard_size: got {shard_size!r}, expected an integer >= 1 (sequences per shard).")
    if not (isinstance(k, int) and 1 <= k <= vocab_size):
        raise KDistillError(f"cache k: got {k!r}, expected an integer in [1, {vocab_size}].")
    if not kd_temperature > 0:
        raise KDistillError(f"cache kd_temperature: got {kd_temperature!r}, expected a positive number.")
    if not sequences:
        raise KDistillError("cache: got no sequences; expected a non-empty list of token id lists.")
    lengths = [len(s) for s in sequences]
    if min(lengths) < 1:
        raise KDistillError("cache: a sequence is empty; expected at least one token per sequence.")
    L = max_length or max(lengths)
    if max(lengths) > L:
        raise KDistillError(f"cache: a sequence has {max(lengths)} tokens, expected <= max_length={L}. "
                            "Truncate the data or raise max_length.")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    identity = {
        "format_version": FORMAT_VERSION, "teacher_fingerprint": teacher_fingerprint,
        "tokenizer_hash": tokenizer_hash, "k": k, "kd_temperature": float(kd_temperature), "dtype": dtype,
        "vocab_size": int(vocab_size), "max_length": int(L), "shard_size": shard_size,
        "num_sequences": len(sequences), "data_hash": data_hash(sequences), **dict(extra or {}),
    }
    index_dtype = torch.uint16 if vocab_size <= 65536 else torch.int32
    if (root / MANIFEST).exists():
        manifest = _read_manifest(root)
        diffs = _mismatch(manifest, identity)
        if diffs:
            raise KDistillError(
                f"cache directory {str(root)!r} holds a different cache: " + "; ".join(diffs)
                + ". Fix: write to a new --output directory (or delete this one).")
        if teacher_probe is not None:
            why = _probe_diff(manifest.get("teacher_probe"), teacher_probe)
            if why is not None:
                raise KDistillError(f"cache directory {str(root)!r} was written from another served teacher: {why}. "
                                    "Fix: write to a new --output directory (or delete this one).")
    else:
        manifest = {**identity, "index_dtype": str(index_dtype).removeprefix("torch."), "shards": [],
                    "complete": False}
        if teacher_probe is not None:
            manifest["teacher_probe"] = dict(teacher_probe)
        write_json_atomic(root / MANIFEST, manifest)
    for stale in root.glob(".*.tmp"):  # temporary files of an interrupted write; never listed
        stale.unlink()

    num_shards = math.ceil(len(sequences) / shard_size)
    good: dict[int, dict[str, Any]] = {}
    for entry in manifest["shards"]:
        if _check_shard(root, entry) is None:
            good[entry["index"]] = entry
    written = 0
    for i in range(num_shards):
        if i in good:
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        start, stop = i * shard_size, min(len(sequences), (i + 1) * shard_size)
        if topk_fn is not None:
            tensors = _served_shard(topk_fn, sequences[start:stop], k=k, length=L, dtype=_DTYPES[dtype],
                                    index_dtype=index_dtype, pad_id=pad_id)
        else:
            tensors = _compute_shard(teacher_fn, sequences[start:stop], k=k, kd_temperature=kd_temperature,
                                     length=L, dtype=_DTYPES[dtype], index_dtype=index_dtype,
                                     batch_size=batch_size, pad_id=pad_id, vocab_size=vocab_size)
        path = root / _shard_name(i)
        # no safetensors metadata: its key order is not deterministic, and the manifest holds it all
        save_state_dict_atomic(path, tensors)
        good[i] = {"index": i, "file": path.name, "start": start, "count": stop - start,
                   "bytes": path.stat().st_size, "sha256": _sha256_file(path)}
        manifest["shards"] = [good[j] for j in sorted(good)]
        manifest["complete"] = len(good) == num_shards
        write_json_atomic(root / MANIFEST, manifest)
        written += 1
        if progress is not None:
            progress(len(good), num_shards)
    manifest["shards"] = [good[j] for j in sorted(good)]
    manifest["complete"] = len(good) == num_shards
    write_json_atomic(root / MANIFEST, manifest)
    return root


@torch.no_grad()
def _compute_shard(teacher_fn: TeacherFn, seqs: Sequence[Sequence[int]], *, k: int, kd_temperature: float,
                   length: int, dtype: torch.dtype, index_dtype: torch.dtype, batch_size: int, pad_id: int,
                   vocab_size: int) -> dict[str, Tensor]:
    n = len(seqs)
    ids = torch.full((n, length), pad_id, dtype=torch.int64)
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
    attn = (torch.arange(length).unsqueeze(0) < lens.unsqueeze(1)).long()
    lp_all = torch.zeros(n, length, k, dtype=dtype)
    idx_all = torch.zeros(n, length, k, dtype=index_dtype)
    res_all = torch.full((n, length), -math.inf, dtype=torch.float32)
    for b in range(0, n, batch_size):
        logits = teacher_fn(ids[b:b + batch_size], attn[b:b + batch_size])
        if logits.shape[:2] != (min(batch_size, n - b), length) or logits.shape[-1] < vocab_size:
            raise KDistillError(f"cache teacher: returned logits of shape {tuple(logits.shape)}, expected "
                                f"({min(batch_size, n - b)}, {length}, {vocab_size}).")
        logits = logits[..., :vocab_size]
        lp, idx, res = teacher_topk(logits, k=k, kd_temperature=kd_temperature)
        valid = attn[b:b + batch_size].bool()
        lp_all[b:b + batch_size] = torch.where(valid.unsqueeze(-1), lp, 0.0).to(dtype)
        idx_all[b:b + batch_size] = torch.where(valid.unsqueeze(-1), idx, 0).to(index_dtype)
        res_all[b:b + batch_size] = torch.where(valid, res, -math.inf)
    return {"input_ids": ids.to(torch.int32), "lengths": lens, "topk_logprobs": lp_all,
            "topk_indices": idx_all, "log_residual": res_all}


def _served_shard(topk_fn: TopKFn, seqs: Sequence[Sequence[int]], *, k: int, length: int, dtype: torch.dtype,
                  index_dtype: torch.dtype, pad_id: int) -> dict[str, Tensor]:
    """A shard from a served teacher's top-k answers: the same tensors, padding and zero-filling as
    :func:`_compute_shard`."""
    n = len(seqs)
    ids = torch.full((n, length), pad_id, dtype=torch.int64)
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    lp_all = torch.zeros(n, length, k, dtype=dtype)
    idx_all = torch.zeros(n, length, k, dtype=index_dtype)
    res_all = torch.full((n, length), -math.inf, dtype=torch.float32)
    answers = topk_fn(seqs, k)
    if len(answers) != n:
        raise KDistillError(f"cache teacher: answered {len(answers)} sequences, expected {n}.")
    for j, (s, (lp, idx, res)) in enumerate(zip(seqs, answers, strict=True)):
        m = len(s)
        if tuple(lp.shape) != (m, k) or tuple(idx.shape) != (m, k) or tuple(res.shape) != (m,):
            raise KDistillError(f"cache teacher: top-k of shapes {tuple(lp.shape)}, {tuple(idx.shape)}, "
                                f"{tuple(res.shape)} for a sequence of {m} tokens, expected ({m}, {k}), ({m}, {k}), "
                                f"({m},).")
        ids[j, :m] = torch.as_tensor(list(s), dtype=torch.int64)
        lp_all[j, :m] = lp.to(dtype)
        idx_all[j, :m] = idx.to(index_dtype)
        res_all[j, :m] = res.float()
    return {"input_ids": ids.to(torch.int32), "lengths": lens, "topk_logprobs": lp_all,
            "topk_indices": idx_all, "log_residual": res_all}


# ---------------------------------------------------------------------------------------------- reader

class TopKCache:
    """A verified, read-only view of a cache directory.

    ``expect`` (optional) maps manifest fields to the values the run needs (e.g. ``{"teacher_fingerprint":
    ..., "tokenizer_hash": ..., "kd_temperature": 2.0}``); any difference raises. All shards are checked
    (size + SHA-256) on open. ``cache[i]`` is one sequence as a dict of tensors; :meth:`collate` builds a
    batch with ``input_ids``, ``attention_mask``, ``mask``, ``labels`` and the top-k targets.
    """

    def __init__(self, path: str | Path, expect: Mapping[str, Any] | None = None, *, allow_partial: bool = False,
                 verify: bool = True, teacher_probe: Mapping[str, Any] | None = None) -> None:
        self.root = Path(path)
        if not (self.root / MANIFEST).is_file():
            raise KDistillError(f"cache {str(self.root)!r}: no {MANIFEST} there; expected a directory written by "
                                "`kdistill cache CONFIG --output DIR`. Run that first.")
        self.manifest = _read_manifest(self.root)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise KDistillError(f"cache {str(self.root)!r}: format_version {self.manifest.get('format_version')!r}, "
                                f"expected {FORMAT_VERSION}. Re-create it with this kdistill version.")
        if expect:
            diffs = _mismatch(self.manifest, expect)
            if diffs:
                raise KDistillError(f"cache {str(self.root)!r} does not match this run: " + "; ".join(diffs)
                                    + ". Fix: re-run `kdistill cache` for this recipe into a new directory.")
        if teacher_probe is not None:
            why = _probe_diff(self.manifest.get("teacher_probe"), teacher_probe)
            if why is not None:
                raise KDistillError(f"cache {str(self.root)!r} was written from another teacher than the one served "
                                    f"now: {why}. Fix: serve the model the cache was written from, or re-run "
                                    "`kdistill cache` for this recipe into a new directory.")
        if not self.manifest.get("complete") and not allow_partial:
            done = len(self.manifest.get("shards", []))
            total = math.ceil(self.manifest["num_sequences"] / self.manifest["shard_size"])
            raise KDistillError(f"cache {str(self.root)!r} is incomplete ({done}/{total} shards). Fix: run "
                                "`kdistill cache` again with the same recipe; it resumes where it stopped.")
        self.shards = list(self.manifest["shards"])
        if verify:
            for entry in self.shards:
                why = _check_shard(self.root, entry)
                if why is not None:
                    raise KDistillError(
                        f"cache shard {entry['file']!r} in {str(self.root)!r}: {why}. Fix: run `kdistill cache` "
                        "again with the same recipe and output; it verifies the shards and rewrites only broken ones.")
        self._data: list[dict[str, Tensor]] = []
        for entry in self.shards:
            try:
                self._data.append(load_file(str(self.root / entry["file"])))
            except Exception as e:  # safetensors' own errors on a damaged header
                raise KDistillError(f"cache shard {entry['file']!r} cannot be read ({e}); run `kdistill cache` "
                                    "again to rewrite it.") from None
        self._index = [(si, j) for si, d in enumerate(self._data) for j in range(d["input_ids"].shape[0])]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def kd_temperature(self) -> float:
        return float(self.manifest["kd_temperature"])

    def targets(self, batch: Mapping[str, Any]) -> Any:
        """The teacher output of a batch built by :meth:`collate`: its top-k targets and the temperature they
        were stored at (a method checks it against its own)."""
        from ..methods.base import ModelOutput

        return ModelOutput(None, extra={"topk_logprobs": batch["topk_logprobs"], "topk_indices": batch["topk_indices"],
                                        "log_residual": batch["log_residual"], "kd_temperature": self.kd_temperature})

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        si, j = self._index[i]
        d = self._data[si]
        return {name: t[j] for name, t in d.items()}

    def tokens(self) -> int:
        return int(sum(int(d["lengths"].sum()) for d in self._data))

    def bytes_on_disk(self) -> int:
        return sum(int(e["bytes"]) for e in self.shards)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for i in range(len(self)):
            yield self[i]

    @staticmethod
    def collate(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Stack sequences into a training batch. ``labels`` are the next tokens (``-100`` past the end)
        and ``mask`` marks the positions that have a next token (True = counts)."""
        ids = torch.stack([it["input_ids"] for it in items]).long()
        lens = torch.stack([it["lengths"] for it in items]).long()
        L = ids.shape[1]
        pos = torch.arange(L).unsqueeze(0)
        attn = (pos < lens.unsqueeze(1)).long()
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(pos[:, 1:] < lens.unsqueeze(1), ids[:, 1:], IGNORE_INDEX)
        idx = torch.stack([it["topk_indices"] for it in items])
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": label_mask(labels),
                "topk_logprobs": torch.stack([it["topk_logprobs"] for it in items]),
                "topk_indices": idx.to(torch.int64) if idx.dtype != torch.int64 else idx,
                "log_residual": torch.stack([it["log_residual"] for it in items])}


def open_topk_cache(cache_dir: str | Path, *, tokenizer: Any, train_blocks: Tensor, teacher: nn.Module | None = None,
                    k: int, dtype: str, identity: Mapping[str, Any], endpoint: Any = None) -> TopKCache:
    """The top-k cache in ``cache_dir``, refused unless it was written for this tokenizer, data (``train_blocks``),
    teacher (its fingerprint: config plus a strided sample and sum of every weight, milliseconds), ``k``,
    ``dtype`` and ``identity`` (the method's :meth:`~kdistill.methods.base.Method.cache_identity` and the
    teacher's name). A served teacher (``endpoint``, an :class:`~kdistill.teachers.api.EndpointScorer`, instead of
    ``teacher``) is identified by its model name and its log-probs on the probe text (one request; no weights)."""
    if (teacher is None) == (endpoint is None):
        raise KDistillError("open_topk_cache: expected exactly one of teacher (local weights) and endpoint (a "
                            "served teacher).")
    probe = endpoint.probe(tokenizer) if endpoint is not None else None
    expect = {"tokenizer_hash": tokenizer_hash(tokenizer), "k": k, "dtype": dtype,
              "data_hash": data_hash(train_blocks.tolist()),
              "teacher_fingerprint": endpoint.fingerprint if endpoint is not None else model_fingerprint(teacher),
              **expected_identity(identity)}
    return TopKCache(cache_dir, expect=expect, teacher_probe=probe)
