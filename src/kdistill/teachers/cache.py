"""Every offline teacher target kdistill keeps, in one module:

* :func:`teacher_logits_table` -- a classifier teacher's logits over fixed training inputs, computed once and
  looked up by example index (in memory, for a run);
* :func:`cached_embeddings` -- a sentence encoder's embeddings of a text list, on disk by teacher fingerprint
  and text hash (reused across runs and students);
* the language-model cache below: per-token top-k log-probs or sampled tokens, sharded, verified, resumable.

Layout of a cache directory::

    manifest.json              what was cached and by whom (see below); rewritten atomically
    shard-00000.safetensors    sequences [0, S)
    shard-00001.safetensors    sequences [S, 2S) ...

Each shard holds, for ``n`` sequences padded to length ``L``, in ``mode: topk`` (the default):

=================  ============  =========================================================================
``input_ids``      (n, L) int32  the token ids the teacher saw (training reads its data from the cache)
``lengths``        (n,) int32    number of real tokens per sequence
``topk_logprobs``  (n, L, k)     teacher log-probs at temperature ``kd_temperature``, fp16 by default
``topk_indices``   (n, L, k)     their vocabulary ids: uint16 when ``vocab_size <= 65536``, else int32
``log_residual``   (n, L) fp32   log of the teacher's probability mass outside the top k (exact)
=================  ============  =========================================================================

At ``k = 32`` with fp16 log-probs and uint16 indices a token costs ``32 * (2 + 2) + 4 + 4 = 136`` bytes
(plus the safetensors header, amortised over the shard).

In ``mode: sampled`` (Random-Sampling KD, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
Anshumann et al., ACL 2025; :func:`kdistill.losses.topk.teacher_sample`) ``k`` is the number ``N`` of tokens drawn
per position from the teacher (at ``proposal_temperature``, by default ``kd_temperature``); repeats are folded into
counts and only the ``d <= N`` distinct ids are stored, flat over the shard's real positions in order:

=====================  ==========  =========================================================================
``input_ids``          (n, L)      as above (``lengths`` too)
``num_distinct``       (n, L) u8   ``d``, distinct ids drawn at each position (0 past the sequence end)
``sample_indices``     (sum d,)    the distinct ids, ascending per position: uint16 / int32 as above
``sample_counts``      (sum d,) u8 how often each was drawn (they sum to ``N`` per position)
``teacher_entropy``    (n, L)      ``H(p_T)`` in ``dtype``, so the targets give the forward KL, not only the CE
``sample_log_ratio``   (sum d,)    fp32 ``log p_T - log p_proposal``, only with another proposal temperature
=====================  ==========  =========================================================================

The target ``q(v) = count_v / N`` (times the ratio) has expectation ``p_T(v)``: forward KL / CE against it is
unbiased (:func:`kdistill.losses.topk.sampled_loss`), where top-k targets are a biased lower bound. A token costs
``1 + 3 d + 2 + 4`` bytes with uint16 ids: at most 100 for ``N <= 31`` even when every draw differs, and far less
for a confident teacher, whose draws repeat (SmolLM2-135M on KJV: 36 bytes at ``N = 32``, see ``docs/llm.md``).

The manifest records ``format_version``, ``teacher_fingerprint`` (and ``teacher_probe`` for a served teacher),
``tokenizer_hash``, ``mode`` (``topk`` / ``sampled``; with ``sampled`` also ``proposal_temperature`` and
``sample_seed``), ``k``, ``kd_temperature``, ``dtype``, ``index_dtype``, ``vocab_size``, ``max_length``,
``shard_size``, ``num_sequences``, ``data_hash`` and a shard index (file, first sequence, count, tokens, bytes,
sha256). A manifest without ``mode`` (written before sampled targets existed) is a top-k cache.

Safety:

* **atomic**: a shard is written to a temporary file, fsynced and renamed; the manifest entry is added
  only after the rename (also atomically). A crash leaves either a complete listed shard or nothing.
* **resumable**: writing again into the same directory with the same settings verifies the listed shards
  and computes only the missing ones (no shard lost, none duplicated).
* **verified, lazily**: opening a cache checks that every shard exists with its listed size (a ``stat``, no
  reading); each shard is read whole (one pass) the first time it is needed and its SHA-256 checked before it is
  parsed, so opening costs nothing per shard and no byte is used unverified. A truncated or corrupt shard is
  reported by name with the fix (re-run ``kdistill cache``: it rewrites only the broken shard). At most
  ``max_loaded_shards`` parsed shards stay in memory.
* **refused on mismatch**: a manifest whose teacher, tokenizer, mode, k, temperature or data differ from the
  run raises with the differing fields.
* **many writers**: under ``torchrun`` each rank writes the shards dealt to it and lists them in
  ``manifest.rank-<r>.json``; rank 0 merges the lists into ``manifest.json`` (also those an interrupted job left,
  re-hashing the shards they name). The result equals a one-process cache byte for byte.

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
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor, nn

from ..data.lm import IGNORE_INDEX, label_mask
from ..errors import KDistillError
from ..io import cache_root, load_state_dict, save_state_dict_atomic, write_json_atomic
from ..losses.topk import sample_weights, teacher_sample, teacher_topk

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
IDENTITY_FIELDS = ("format_version", "teacher_fingerprint", "tokenizer_hash", "mode", "k", "kd_temperature", "dtype",
                   "vocab_size", "max_length", "shard_size", "num_sequences", "data_hash")
#: what a cache stores per token: the k most likely teacher tokens, or N tokens drawn from the teacher
MODES = ("topk", "sampled")
#: the tensors of a sampled shard stored flat over its real positions (expanded to (n, L, d_max) on read)
_FLAT_SAMPLE_KEYS = ("sample_indices", "sample_counts", "sample_log_ratio")


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


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise KDistillError(f"cache manifest {str(path / MANIFEST)!r} is not valid JSON ({e}); expected the file "
                            "written by `kdistill cache`. Delete the directory and cache again.") from None
    manifest.setdefault("mode", "topk")  # written before sampled targets existed
    return manifest


def _mode_error(where: str, found: Any, wanted: Any, fix: str) -> KDistillError:
    return KDistillError(f"{where} holds {found!r} teacher targets (cache.mode), expected {wanted!r}. Fix: set "
                         f"`cache.mode: {found}` to use it as it is, or {fix}")


def _mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key, want in wanted.items():
        got = found.get(key)
        same = (math.isclose(float(got), float(want), rel_tol=1e-9)
                if isinstance(want, float) and isinstance(got, (int, float)) else got == want)
        if not same:
            diffs.append(f"{key}: cache has {got!r}, run expects {want!r}")
    return diffs


def _check_size(root: Path, entry: Mapping[str, Any]) -> str | None:
    """None when the shard file exists with the size the manifest lists (a ``stat``, nothing read), else why not."""
    p = root / entry["file"]
    if not p.is_file():
        return "file is missing"
    size = p.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} bytes, manifest says {entry['bytes']} (truncated or overwritten)"
    return None


def _check_shard(root: Path, entry: Mapping[str, Any]) -> str | None:
    """None when the shard file is intact (size and SHA-256), else why not."""
    why = _check_size(root, entry)
    if why is None and _sha256_file(root / entry["file"]) != entry["sha256"]:
        return "SHA-256 does not match the manifest (corrupt)"
    return why


def _broken_shard(root: Path, entry: Mapping[str, Any], why: str) -> KDistillError:
    return KDistillError(f"cache shard {entry['file']!r} in {str(root)!r}: {why}. Fix: run `kdistill cache` again "
                         "with the same recipe and output; it verifies the shards and rewrites only broken ones.")


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
    mode: str = "topk",
    proposal_temperature: float | None = None,
    sample_seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Run the teacher over ``sequences`` (lists of token ids) and write the top-k cache to ``output_dir``.

    ``mode``: ``"topk"`` stores the ``k`` most likely tokens with their log-probs; ``"sampled"`` draws ``k`` tokens
    per position from the teacher at ``proposal_temperature`` (default: ``kd_temperature``) and stores the distinct
    ids with their counts (see the module docstring); shard ``i`` draws with the seed ``(sample_seed, i)``, so a
    resumed cache equals an uninterrupted one.

    Resumes a partial cache written with the same settings (verifying its shards, rewriting broken
    ones); refuses a directory holding a different cache. ``extra``: more identity fields stored in the
    manifest and checked on resume (e.g. the recipe's teacher name). ``stop_after_shards`` writes at most
    that many new shards and returns (used by tests to simulate an interruption). Returns the directory.

    ``topk_fn`` (instead of ``teacher_fn``): a teacher that answers top-k log-probs directly (a served model, at
    temperature 1 only); ``teacher_probe``: its probe log-probs, stored in the manifest and compared within a
    tolerance on resume (see :func:`kdistill.teachers.api.probe_difference`).

    Many processes (``world_size > 1``, e.g. under ``torchrun``; ``barrier`` synchronises them): every rank calls
    this with the same arguments and its ``rank``. Rank 0 creates (or checks) the manifest and takes in what an
    interrupted run left; the shards still missing are dealt round-robin, each rank writes its own, atomically, and
    lists them in its own ``manifest.rank-<r>.json``; rank 0 then merges the lists into ``manifest.json``. Shard
    ``i`` holds the same sequences (and, sampled, the same draws) whoever writes it, so the cache equals a
    single-process one byte for byte; an interruption loses no listed shard, whichever process count resumes.
    ``progress(done, total)`` counts this rank's shards when ``world_size > 1``.
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise KDistillError(f"write_topk_cache: got rank {rank!r} of world_size {world_size!r}; expected an integer "
                            "world_size >= 1 and 0 <= rank < world_size.")
    if world_size > 1 and barrier is None:
        raise KDistillError(f"write_topk_cache: world_size {world_size} needs a barrier (e.g. "
                            "torch.distributed.barrier) so that rank 0 merges the manifest after every rank wrote.")
    if (teacher_fn is None) == (topk_fn is None):
        raise KDistillError("write_topk_cache: expected exactly one of teacher_fn (logits) and topk_fn (top-k "
                            "log-probs of a served teacher).")
    if mode not in MODES:
        raise KDistillError(f"cache mode: got {mode!r}, expected one of {list(MODES)} (topk: the k most likely "
                            "tokens; sampled: k tokens drawn from the teacher, an unbiased target).")
    if mode == "sampled":
        if topk_fn is not None:
            raise KDistillError("cache mode 'sampled' with a served teacher: drawing tokens needs the teacher's full "
                                "distribution, and a server returns only its top-k log-probs. Fix: cache.mode: topk.")
        if not (isinstance(k, int) and 1 <= k <= 255):
            raise KDistillError(f"cache k: got {k!r} with mode 'sampled', expected an integer in [1, 255] (draws per "
                                "token; counts are stored in one byte). 24-64 is typical.")
        if proposal_temperature is not None and not proposal_temperature > 0:
            raise KDistillError(f"cache proposal_temperature: got {proposal_temperature!r}, expected a positive "
                                "number (or none: draw at kd_temperature).")
    elif proposal_temperature is not None:
        raise KDistillError(f"cache proposal_temperature: got {proposal_temperature!r} with mode 'topk'; it sets "
                            "the temperature tokens are drawn at, so it needs cache.mode: sampled. Fix: remove it.")
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
        "tokenizer_hash": tokenizer_hash, "mode": mode, "k": k, "kd_temperature": float(kd_temperature),
        "dtype": dtype, "vocab_size": int(vocab_size), "max_length": int(L), "shard_size": shard_size,
        "num_sequences": len(sequences), "data_hash": data_hash(sequences), **dict(extra or {}),
    }
    prop_t = float(kd_temperature if proposal_temperature is None else proposal_temperature)
    if mode == "sampled":
        identity.update(proposal_temperature=prop_t, sample_seed=int(sample_seed))
    index_dtype = torch.uint16 if vocab_size <= 65536 else torch.int32
    if (root / MANIFEST).exists():  # every rank checks (the same files, the same verdict: none waits on a failed one)
        _check_existing(root, identity, mode, teacher_probe)
    num_shards = math.ceil(len(sequences) / shard_size)
    if rank == 0:
        if not (root / MANIFEST).exists():
            manifest = {**identity, "index_dtype": str(index_dtype).removeprefix("torch."), "shards": [],
                        "complete": False}
            if teacher_probe is not None:
                manifest["teacher_probe"] = dict(teacher_probe)
            write_json_atomic(root / MANIFEST, manifest)
        for stale in root.glob(".*.tmp"):  # temporary files of an interrupted write; never listed
            stale.unlink()
        _merge_rank_lists(root, num_shards, verify=True)
    if barrier is not None:
        barrier()
    manifest = _read_manifest(root)
    # rank 0 has just verified the listed shards (world_size 1: verify here; they are the same process's)
    good = {e["index"]: e for e in manifest["shards"]}
    missing = [i for i in range(num_shards) if i not in good]
    mine = missing[rank::world_size]
    ranks_list = root / f"manifest.rank-{rank}.json"
    written: list[dict[str, Any]] = []
    for i in mine:
        if stop_after_shards is not None and len(written) >= stop_after_shards:
            break
        start, stop = i * shard_size, min(len(sequences), (i + 1) * shard_size)
        if topk_fn is not None:
            tensors = _served_shard(topk_fn, sequences[start:stop], k=k, length=L, dtype=_DTYPES[dtype],
                                    index_dtype=index_dtype, pad_id=pad_id)
        else:
            encode = (_sample_encoder(samples=k, kd_temperature=kd_temperature, proposal_temperature=prop_t,
                                      dtype=_DTYPES[dtype], index_dtype=index_dtype,
                                      seed=int(sample_seed) * 1_000_003 + i)
                      if mode == "sampled" else
                      _topk_encoder(k=k, kd_temperature=kd_temperature, dtype=_DTYPES[dtype], index_dtype=index_dtype))
            tensors = _compute_shard(teacher_fn, sequences[start:stop], length=L, batch_size=batch_size,
                                     pad_id=pad_id, vocab_size=vocab_size, encode=encode)
        path = root / _shard_name(i)
        # no safetensors metadata: its key order is not deterministic, and the manifest holds it all
        save_state_dict_atomic(path, tensors)
        entry = {"index": i, "file": path.name, "start": start, "count": stop - start,
                 "tokens": int(tensors["lengths"].sum()), "bytes": path.stat().st_size, "sha256": _sha256_file(path)}
        written.append(entry)
        if world_size == 1:
            good[i] = entry
            _write_shard_list(root, manifest, good, num_shards)
            if progress is not None:
                progress(len(good), num_shards)
        else:  # only rank 0 writes manifest.json; each rank lists its own shards
            write_json_atomic(ranks_list, {"shards": written})
            if progress is not None:
                progress(len(written), len(mine))
    if world_size == 1:
        _write_shard_list(root, manifest, good, num_shards)
        return root
    barrier()
    if rank == 0:
        _merge_rank_lists(root, num_shards, verify=False)  # each rank hashed its shards as it wrote them
    barrier()  # every rank returns with the merged manifest on disk
    return root


def _check_existing(root: Path, identity: Mapping[str, Any], mode: str, teacher_probe: Mapping[str, Any] | None,
                    ) -> None:
    """Refuse to write into ``root`` when its manifest describes another cache (mode, identity, served teacher)."""
    manifest = _read_manifest(root)
    if manifest["mode"] != mode:
        raise _mode_error(f"cache directory {str(root)!r}", manifest["mode"], mode,
                          "write to a new --output directory (or delete this one).")
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


def _write_shard_list(root: Path, manifest: dict[str, Any], good: Mapping[int, Mapping[str, Any]],
                      num_shards: int) -> None:
    manifest["shards"] = [dict(good[j]) for j in sorted(good)]
    manifest["complete"] = len(good) == num_shards
    write_json_atomic(root / MANIFEST, manifest)


def _merge_rank_lists(root: Path, num_shards: int, *, verify: bool) -> None:
    """Fold the per-rank shard lists (``manifest.rank-<r>.json``, of this or an interrupted multi-process run) into
    ``manifest.json`` and delete them; with ``verify``, every listed shard is checked (size, SHA-256) and broken ones
    are dropped, to be written again."""
    manifest = _read_manifest(root)
    entries = list(manifest["shards"])
    lists = sorted(root.glob("manifest.rank-*.json"))
    for f in lists:
        try:
            entries += json.loads(f.read_text())["shards"]
        except (json.JSONDecodeError, KeyError):  # cannot happen with atomic writes; a damaged list lists nothing
            pass
    good: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if not verify or _check_shard(root, entry) is None:
            good[int(entry["index"])] = entry
    _write_shard_list(root, manifest, good, num_shards)
    for f in lists:
        f.unlink()


Encoder = Callable[[Tensor, Tensor], dict[str, Tensor]]
"""``encode(logits (b, L, V), valid (b, L) bool) -> tensors``: one teacher batch's stored targets, on the CPU."""


@torch.no_grad()
def _compute_shard(teacher_fn: TeacherFn, seqs: Sequence[Sequence[int]], *, length: int, batch_size: int,
                   pad_id: int, vocab_size: int, encode: Encoder) -> dict[str, Tensor]:
    """A shard: the padded inputs and ``encode`` of every teacher batch, concatenated in order along dim 0."""
    n = len(seqs)
    ids = torch.full((n, length), pad_id, dtype=torch.int64)
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
    attn = (torch.arange(length).unsqueeze(0) < lens.unsqueeze(1)).long()
    parts: list[dict[str, Tensor]] = []
    for b in range(0, n, batch_size):
        logits = teacher_fn(ids[b:b + batch_size], attn[b:b + batch_size])
        if logits.shape[:2] != (min(batch_size, n - b), length) or logits.shape[-1] < vocab_size:
            raise KDistillError(f"cache teacher: returned logits of shape {tuple(logits.shape)}, expected "
                                f"({min(batch_size, n - b)}, {length}, {vocab_size}).")
        parts.append(encode(logits[..., :vocab_size], attn[b:b + batch_size].bool().to(logits.device)))
    return {"input_ids": ids.to(torch.int32), "lengths": lens,
            **{key: torch.cat([part[key] for part in parts]) for key in parts[0]}}


def _topk_encoder(*, k: int, kd_temperature: float, dtype: torch.dtype, index_dtype: torch.dtype) -> Encoder:
    def encode(logits: Tensor, valid: Tensor) -> dict[str, Tensor]:
        lp, idx, res = teacher_topk(logits, k=k, kd_temperature=kd_temperature)
        return {"topk_logprobs": torch.where(valid.unsqueeze(-1), lp, 0.0).to(dtype).cpu(),
                "topk_indices": torch.where(valid.unsqueeze(-1), idx, 0).to(index_dtype).cpu(),
                "log_residual": torch.where(valid, res, -math.inf).cpu()}
    return encode


def _sample_encoder(*, samples: int, kd_temperature: float, proposal_temperature: float, dtype: torch.dtype,
                    index_dtype: torch.dtype, seed: int) -> Encoder:
    """Sampled targets of the real positions (:func:`kdistill.losses.topk.teacher_sample`), flat, in row order; one
    generator per shard, seeded, so the shard is the same whenever it is (re)computed."""
    gen: list[torch.Generator] = []

    def encode(logits: Tensor, valid: Tensor) -> dict[str, Tensor]:
        if not gen:
            gen.append(torch.Generator(device=logits.device).manual_seed(seed))
        ids, counts, ratio, ent = teacher_sample(logits[valid], samples=samples, kd_temperature=kd_temperature,
                                                 proposal_temperature=proposal_temperature, generator=gen[0])
        keep = counts > 0
        num = torch.zeros(valid.shape, dtype=torch.uint8, device=valid.device)
        num[valid] = keep.sum(-1).to(torch.uint8)
        entropy = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        entropy[valid] = ent
        out = {"num_distinct": num.cpu(), "sample_indices": ids[keep].to(index_dtype).cpu(),
               "sample_counts": counts[keep].to(torch.uint8).cpu(), "teacher_entropy": entropy.to(dtype).cpu()}
        if ratio is not None:
            out["sample_log_ratio"] = ratio[keep].float().cpu()
        return out
    return encode


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
    """A verified, read-only view of a cache directory (top-k or sampled targets, ``mode``).

    ``expect`` (optional) maps manifest fields to the values the run needs (e.g. ``{"teacher_fingerprint":
    ..., "tokenizer_hash": ..., "kd_temperature": 2.0}``); any difference raises. Opening checks that every shard
    exists with its listed size; a shard's SHA-256 is checked when it is first read (``verify=False`` skips both).
    Shards are read on demand and at most ``max_loaded_shards`` stay parsed in memory. ``cache[i]`` is one sequence
    as a dict of tensors; :meth:`collate` builds a batch with ``input_ids``, ``attention_mask``, ``mask``, ``labels``
    and the targets.
    """

    def __init__(self, path: str | Path, expect: Mapping[str, Any] | None = None, *, allow_partial: bool = False,
                 verify: bool = True, teacher_probe: Mapping[str, Any] | None = None,
                 max_loaded_shards: int = 4) -> None:
        self.root = Path(path)
        if not (self.root / MANIFEST).is_file():
            raise KDistillError(f"cache {str(self.root)!r}: no {MANIFEST} there; expected a directory written by "
                                "`kdistill cache CONFIG --output DIR`. Run that first.")
        self.manifest = _read_manifest(self.root)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise KDistillError(f"cache {str(self.root)!r}: format_version {self.manifest.get('format_version')!r}, "
                                f"expected {FORMAT_VERSION}. Re-create it with this kdistill version.")
        if expect:
            if "mode" in expect and self.manifest["mode"] != expect["mode"]:
                raise _mode_error(f"cache {str(self.root)!r}", self.manifest["mode"], expect["mode"],
                                  f"re-run `kdistill cache` with cache.mode: {expect['mode']} into a new directory.")
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
        if not (isinstance(max_loaded_shards, int) and max_loaded_shards >= 1):
            raise KDistillError(f"TopKCache max_loaded_shards: got {max_loaded_shards!r}, expected an integer >= 1.")
        self.shards = list(self.manifest["shards"])
        self._verify = verify
        if verify:  # cheap: a stat per shard; the hashes are checked on first read (_shard)
            for entry in self.shards:
                why = _check_size(self.root, entry)
                if why is not None:
                    raise _broken_shard(self.root, entry, why)
        self._verified: set[int] = set()
        self._loaded: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._max_loaded = max_loaded_shards
        self._index = [(si, j) for si, entry in enumerate(self.shards) for j in range(int(entry["count"]))]

    def _shard(self, si: int) -> dict[str, Tensor]:
        """Shard ``si``'s tensors: read whole, its SHA-256 checked the first time, then parsed (sampled targets
        expanded to ``(n, L, d_max)``); the ``max_loaded_shards`` most recently used stay in memory."""
        if si in self._loaded:
            self._loaded.move_to_end(si)
            return self._loaded[si]
        entry = self.shards[si]
        try:
            data = (self.root / entry["file"]).read_bytes()
        except OSError as e:
            raise _broken_shard(self.root, entry, f"cannot be read ({e})") from None
        if self._verify and si not in self._verified:
            if len(data) != entry["bytes"]:
                raise _broken_shard(self.root, entry, f"size {len(data)} bytes, manifest says {entry['bytes']} "
                                                      "(truncated or overwritten)")
            if _sha256_bytes(data) != entry["sha256"]:
                raise _broken_shard(self.root, entry, "SHA-256 does not match the manifest (corrupt)")
            self._verified.add(si)
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as e:  # safetensors' own errors on a damaged header (only reachable with verify=False)
            raise _broken_shard(self.root, entry, f"cannot be parsed ({e})") from None
        if "num_distinct" in tensors:
            tensors = _expand_samples(tensors, lambda why: _broken_shard(self.root, entry, why))
        self._loaded[si] = tensors
        while len(self._loaded) > self._max_loaded:
            self._loaded.popitem(last=False)
        return tensors

    @property
    def mode(self) -> str:
        """``topk`` or ``sampled`` (what each token stores; see the module docstring)."""
        return str(self.manifest["mode"])

    @property
    def k(self) -> int:
        """Targets per token: the top k, or (``sampled``) the tokens drawn per position."""
        return int(self.manifest["k"])

    @property
    def kd_temperature(self) -> float:
        return float(self.manifest["kd_temperature"])

    def targets(self, batch: Mapping[str, Any]) -> Any:
        """The teacher output of a batch built by :meth:`collate`: its top-k (or sampled) targets and the temperature
        they were stored at (a method checks it against its own)."""
        from ..methods.base import ModelOutput

        keys = (("sample_indices", "sample_weights", "teacher_entropy") if self.mode == "sampled"
                else ("topk_logprobs", "topk_indices", "log_residual"))
        return ModelOutput(None, extra={**{key: batch[key] for key in keys}, "kd_temperature": self.kd_temperature})

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        si, j = self._index[i]
        return {name: t[j] for name, t in self._shard(si).items()}

    def tokens(self) -> int:
        """Real tokens cached (from the manifest; a shard listed without its count is read)."""
        return sum(int(e["tokens"]) if "tokens" in e else int(self._shard(si)["lengths"].sum())
                   for si, e in enumerate(self.shards))

    def bytes_on_disk(self) -> int:
        return sum(int(e["bytes"]) for e in self.shards)

    def bytes_per_token(self) -> float:
        """Shard bytes on disk (headers included, manifest not) per cached token."""
        return self.bytes_on_disk() / max(1, self.tokens())

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for i in range(len(self)):
            yield self[i]

    @staticmethod
    def collate(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Stack sequences into a training batch. ``labels`` are the next tokens (``-100`` past the end)
        and ``mask`` marks the positions that have a next token (True = counts). Top-k items give
        ``topk_logprobs`` / ``topk_indices`` (int64) / ``log_residual``; sampled items give ``sample_indices``
        (int64), ``sample_weights`` (fp32, the target ``q`` of :func:`kdistill.losses.topk.sample_weights`, padded
        with 0 to the batch's widest position) and ``teacher_entropy``."""
        ids = torch.stack([it["input_ids"] for it in items]).long()
        lens = torch.stack([it["lengths"] for it in items]).long()
        L = ids.shape[1]
        pos = torch.arange(L).unsqueeze(0)
        attn = (pos < lens.unsqueeze(1)).long()
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(pos[:, 1:] < lens.unsqueeze(1), ids[:, 1:], IGNORE_INDEX)
        out = {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": label_mask(labels)}
        if "sample_indices" in items[0]:
            width = max(int(it["sample_indices"].shape[-1]) for it in items)

            def stack(key: str, dtype: torch.dtype) -> Tensor:
                return torch.stack([F.pad(it[key].to(dtype), (0, width - it[key].shape[-1])) for it in items])

            ratio = stack("sample_log_ratio", torch.float32) if "sample_log_ratio" in items[0] else None
            out.update(sample_indices=stack("sample_indices", torch.int64),
                       sample_weights=sample_weights(stack("sample_counts", torch.int32), ratio),
                       teacher_entropy=torch.stack([it["teacher_entropy"] for it in items]).float())
            return out
        idx = torch.stack([it["topk_indices"] for it in items])
        out.update(topk_logprobs=torch.stack([it["topk_logprobs"] for it in items]),
                   topk_indices=idx.to(torch.int64) if idx.dtype != torch.int64 else idx,
                   log_residual=torch.stack([it["log_residual"] for it in items]))
        return out


def _expand_samples(tensors: dict[str, Tensor], broken: Callable[[str], KDistillError]) -> dict[str, Tensor]:
    """A sampled shard's flat per-id tensors as ``(n, L, d_max)``, zero-padded (padding has count 0)."""
    num = tensors.pop("num_distinct").long()
    width = max(int(num.max()), 1) if num.numel() else 1
    keep = torch.arange(width) < num.unsqueeze(-1)
    total = int(keep.sum())
    for key in _FLAT_SAMPLE_KEYS:
        if key not in tensors:
            continue
        flat = tensors[key]
        if tuple(flat.shape) != (total,):
            raise broken(f"{key} holds {flat.numel()} entries where num_distinct counts {total} (corrupt)")
        # uint16 ids are widened: few operations exist for them
        dtype = torch.int32 if flat.dtype == torch.uint16 else flat.dtype
        padded = torch.zeros((*num.shape, width), dtype=dtype)
        padded[keep] = flat.to(dtype)
        tensors[key] = padded
    return tensors


def open_topk_cache(cache_dir: str | Path, *, tokenizer: Any, train_blocks: Tensor, teacher: nn.Module | None = None,
                    k: int, dtype: str, identity: Mapping[str, Any], endpoint: Any = None, mode: str = "topk",
                    proposal_temperature: float | None = None) -> TopKCache:
    """The top-k cache in ``cache_dir``, refused unless it was written for this tokenizer, data (``train_blocks``),
    teacher (its fingerprint: config plus a strided sample and sum of every weight, milliseconds), ``mode`` (and,
    sampled, ``proposal_temperature``), ``k``, ``dtype`` and ``identity`` (the method's
    :meth:`~kdistill.methods.base.Method.cache_identity` and the teacher's name). A served teacher (``endpoint``, an
    :class:`~kdistill.teachers.api.EndpointScorer`, instead of ``teacher``) is identified by its model name and its
    log-probs on the probe text (one request; no weights)."""
    if (teacher is None) == (endpoint is None):
        raise KDistillError("open_topk_cache: expected exactly one of teacher (local weights) and endpoint (a "
                            "served teacher).")
    probe = endpoint.probe(tokenizer) if endpoint is not None else None
    wanted = expected_identity(identity)
    expect = {"tokenizer_hash": tokenizer_hash(tokenizer), "mode": mode, "k": k, "dtype": dtype,
              "data_hash": data_hash(train_blocks.tolist()),
              "teacher_fingerprint": endpoint.fingerprint if endpoint is not None else model_fingerprint(teacher),
              **wanted}
    if mode == "sampled":
        expect["proposal_temperature"] = float(wanted["kd_temperature"] if proposal_temperature is None
                                               else proposal_temperature)
    return TopKCache(cache_dir, expect=expect, teacher_probe=probe)
