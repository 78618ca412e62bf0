"""Static student: one vector per vocabulary token, a sentence is the mean of its tokens' vectors.

Built from a teacher (:func:`static_from_teacher`):

1. every vocabulary token ``v`` is encoded by the teacher as the one-token sentence ``[CLS] v [SEP]``
   with the teacher's own pooling (its "meaning in isolation");
2. PCA (centred SVD) to ``dim`` components - decorrelates the dimensions and shrinks the table;
3. token weighting folded into the rows: ``zipf`` (``log(2 + rank)``, rank by frequency in a corpus, or by
   token id when no corpus is given) or ``sif`` (``a / (a + p(v))``, Arora et al., 2017, "A Simple but
   Tough-to-Beat Baseline for Sentence Embeddings"); frequent tokens count less in the mean;
4. optionally fine-tuned by distillation on sentences (the ``embedding_kd`` method with the usual loop).

This is the recipe model2vec (Tulkens & van Dongen, 2024) made popular. Inference is an ``EmbeddingBag``
mean over the tokenizer's ids without special tokens - exactly sentence-transformers' ``StaticEmbedding``,
so the exported folder gives the same vectors.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import device_of
from ..errors import KDistillError, expect
from .encoders import SentenceEncoder, _encode_sorted

WEIGHTINGS = ("zipf", "sif", "none")


def _plain_tokenizer(tokenizer: Any):
    """A private ``tokenizers.Tokenizer`` copy without padding or truncation (HF tokenizers mutate the
    shared backend's truncation settings on every call)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(backend, Tokenizer):
        raise KDistillError(f"static student tokenizer: got {type(tokenizer).__name__}, expected a fast (Rust) "
                            "tokenizer. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    tok = Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


class StaticEncoder(nn.Module):
    """``mean(E[token ids without specials]) -> (projection) -> (L2 normalise)``, ``E`` of shape ``(V, D)``.

    ``forward(input_ids, attention_mask)`` takes the padded batches of the teacher's tokenizer (special
    tokens and padding are skipped), so it trains in the same loop as transformer students; ``encode``
    tokenizes like sentence-transformers' ``StaticEmbedding``.
    """

    def __init__(self, embeddings: Tensor, tokenizer: Any, *, normalize: bool = True,
                 projection_dim: int | None = None, special_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        expect(embeddings.dim() == 2, "StaticEncoder embeddings", tuple(embeddings.shape), "a (V, D) matrix")
        self.embedding = nn.EmbeddingBag.from_pretrained(embeddings.float().clone(), freeze=False, mode="mean")
        self.tokenizer = tokenizer  # the HF tokenizer (for export and padded batches)
        self._tok = _plain_tokenizer(tokenizer)
        expect(self._tok.get_vocab_size() <= embeddings.shape[0], "StaticEncoder vocabulary",
               embeddings.shape[0], f">= the tokenizer's {self._tok.get_vocab_size()} tokens")
        if special_ids is None:
            special_ids = [i for i in getattr(tokenizer, "all_special_ids", []) if i is not None]
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long),
                             persistent=False)
        self.normalize = bool(normalize)
        self.projection = nn.Linear(embeddings.shape[1], int(projection_dim)) if projection_dim else None

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    @property
    def token_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.token_dim

    def _finish(self, pooled: Tensor) -> Tensor:
        if self.projection is not None:
            pooled = self.projection(pooled)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        keep = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        vectors = self.embedding.weight[input_ids]  # (B, T, D)
        w = keep.unsqueeze(-1).to(vectors.dtype)
        pooled = (vectors * w).sum(1) / w.sum(1).clamp_min(1.0)  # no token at all -> zero vector
        return self._finish(pooled)

    def tokenize_bag(self, sentences: Sequence[str]) -> dict[str, Tensor]:
        encodings = self._tok.encode_batch(list(sentences), add_special_tokens=False)
        lengths = [len(e.ids) for e in encodings]
        offsets = torch.tensor([0] + lengths[:-1], dtype=torch.long).cumsum(0)
        ids = torch.tensor([i for e in encodings for i in e.ids], dtype=torch.long)
        return {"input_ids": ids, "offsets": offsets}

    def forward_bag(self, input_ids: Tensor, offsets: Tensor) -> Tensor:
        return self._finish(self.embedding(input_ids, offsets))

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
        dev = device_of(self)  # token ids follow the weights
        return _encode_sorted(self, sentences, batch_size, lambda chunk: self.forward_bag(
            **{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in self.tokenize_bag(chunk).items()}))


def token_counts(tokenizer: Any, corpus: Sequence[str]) -> Tensor:
    """``(V,)`` how often each token id occurs in ``corpus`` (no special tokens)."""
    tok = _plain_tokenizer(tokenizer)
    counts: Counter[int] = Counter()
    for enc in tok.encode_batch(list(corpus), add_special_tokens=False):
        counts.update(enc.ids)
    out = torch.zeros(tok.get_vocab_size(), dtype=torch.float64)
    if counts:
        ids = torch.tensor(list(counts.keys()))
        out[ids] = torch.tensor(list(counts.values()), dtype=torch.float64)
    return out


def token_weights(vocab_size: int, *, weighting: str = "zipf", counts: Tensor | None = None,
                  sif_a: float = 1e-3) -> Tensor:
    """``(V,)`` per-token weights. ``zipf``: ``log(2 + rank)`` with rank 0 = most frequent token (by
    ``counts``; by token id when ``counts`` is None, as in frequency-sorted vocabularies); ``sif``:
    ``a / (a + p(v))`` with ``p`` from ``counts`` (required); ``none``: ones."""
    expect(weighting in WEIGHTINGS, "static weighting", weighting, f"one of {WEIGHTINGS}")
    if weighting == "none":
        return torch.ones(vocab_size)
    if weighting == "zipf":
        if counts is None:
            rank = torch.arange(vocab_size, dtype=torch.float64)
        else:
            order = torch.argsort(-counts, stable=True)
            rank = torch.empty(vocab_size, dtype=torch.float64)
            rank[order] = torch.arange(vocab_size, dtype=torch.float64)
        return torch.log(2.0 + rank).float()
    if counts is None:
        raise KDistillError("static weighting 'sif' needs token counts from a corpus; pass corpus=[...] "
                            "(e.g. the training sentences) or use weighting='zipf'.")
    expect(sif_a > 0, "sif_a", sif_a, "a positive number (1e-3 to 1e-4 is usual)")
    p = counts / counts.sum().clamp_min(1.0)
    return (sif_a / (sif_a + p)).float()


@torch.no_grad()
def teacher_token_vectors(teacher: SentenceEncoder, *, batch_size: int = 512) -> Tensor:
    """``(V, D_teacher)``: the teacher's (unnormalised) embedding of each token as ``[CLS] v [SEP]``."""
    tok = teacher.tokenizer
    vocab = len(tok)
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    was = teacher.training
    teacher.eval()
    normalize, teacher.normalize = teacher.normalize, False
    try:
        out = []
        for start in range(0, vocab, batch_size):
            ids = torch.arange(start, min(start + batch_size, vocab)).unsqueeze(1)
            parts = ([torch.full_like(ids, cls_id)] if cls_id is not None else []) + [ids] + (
                [torch.full_like(ids, sep_id)] if sep_id is not None else [])
            input_ids = torch.cat(parts, 1)
            out.append(teacher(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).float())
    finally:
        teacher.normalize = normalize
        teacher.train(was)
    return torch.cat(out)


def pca(x: Tensor, dim: int) -> Tensor:
    """Centred PCA of the rows of ``x`` onto its top ``dim`` components (``dim <= min(x.shape)``)."""
    expect(1 <= dim <= min(x.shape), "PCA dim", dim, f"an integer in [1, {min(x.shape)}]")
    x = x.double()
    centred = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:dim].T).float()


def teacher_fingerprint(teacher: SentenceEncoder) -> str:
    """sha256 over the teacher's weights, pooling rule and vocabulary (cache key for token vectors)."""
    import hashlib

    h = hashlib.sha256()
    h.update(f"{teacher.pooling}|{teacher.normalize}|{len(teacher.tokenizer)}".encode())
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cached_token_vectors(teacher: SentenceEncoder, cache_dir: str | Path | None, *, batch_size: int = 512) -> Tensor:
    """:func:`teacher_token_vectors`, stored under ``cache_dir/<teacher fingerprint>.safetensors`` (atomic
    write) and reused when the same teacher asks again; ``cache_dir=None`` disables the cache."""
    if cache_dir is None:
        return teacher_token_vectors(teacher, batch_size=batch_size)
    from safetensors.torch import load_file

    from ..io import save_state_dict_atomic

    path = Path(cache_dir) / f"{teacher_fingerprint(teacher)}.safetensors"
    if path.is_file():
        return load_file(str(path))["vectors"]
    vectors = teacher_token_vectors(teacher, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict_atomic(path, {"vectors": vectors.contiguous()})
    return vectors


def static_from_teacher(teacher: SentenceEncoder, *, dim: int | None = 256, weighting: str = "zipf",
                        corpus: Sequence[str] | None = None, sif_a: float = 1e-3, normalize: bool = True,
                        batch_size: int = 512, cache_dir: str | Path | None = None) -> StaticEncoder:
    """Distil ``teacher`` into a :class:`StaticEncoder` (steps 1-3 of the module docstring).

    ``dim=None`` keeps the teacher's width (PCA still decorrelates). ``cache_dir`` keeps the teacher's
    token vectors (the slow step) for the next student of the same teacher. ``corpus`` gives token frequencies
    for the weighting; without it ``zipf`` ranks by token id. Special tokens get zero vectors (they never
    count anyway).
    """
    expect(weighting in WEIGHTINGS, "static weighting", weighting, f"one of {WEIGHTINGS}")
    vectors = cached_token_vectors(teacher, cache_dir, batch_size=batch_size)
    dim = dim or vectors.shape[1]
    expect(dim <= vectors.shape[1], "static dim", dim, f"at most the teacher's width {vectors.shape[1]}")
    table = pca(vectors, dim)
    counts = token_counts(teacher.tokenizer, corpus) if corpus is not None else None
    w = token_weights(table.shape[0], weighting=weighting, counts=counts, sif_a=sif_a)
    table = table * w[: table.shape[0], None]
    specials = [i for i in teacher.tokenizer.all_special_ids if i is not None and i < table.shape[0]]
    table[specials] = 0.0
    if not math.isfinite(float(table.abs().sum())):
        raise KDistillError("static_from_teacher produced non-finite vectors; check the teacher's outputs.")
    return StaticEncoder(table, teacher.tokenizer, normalize=normalize, special_ids=specials)


def build_static(teacher: SentenceEncoder, *, corpus: Sequence[str], dim: int | None = 256, weighting: str = "zipf",
                 use_corpus_counts: bool = True, sif_a: float = 1e-3, projection: bool = False,
                 projection_init: Literal["identity", "least_squares"] = "identity") -> StaticEncoder:
    """The ``static`` student of the embedding task: :func:`static_from_teacher` (token vectors cached under
    ``$KDISTILL_CACHE/token_vectors``; ``use_corpus_counts`` weights tokens by their counts in ``corpus``, else by
    id). ``projection`` adds a learned ``dim -> teacher dim`` linear map that is trained and exported with the
    student. ``projection_init``: ``identity`` (zero-padded identity: PCA coordinates in the first dims) or
    ``least_squares`` (the affine map that best sends the static sentence vectors of ``corpus`` to the teacher's
    embeddings of it, closed form)."""
    from ..io import cache_root
    from ..teachers.cache import cached_embeddings

    if projection_init not in ("identity", "least_squares"):
        raise KDistillError(f"static projection_init: got {projection_init!r}, expected 'identity' or 'least_squares'.")
    student = static_from_teacher(teacher, dim=dim, weighting=weighting,
                                  corpus=corpus if use_corpus_counts else None, sif_a=sif_a,
                                  cache_dir=cache_root() / "token_vectors")
    if projection:
        x = None
        if projection_init == "least_squares":
            normalize, student.normalize = student.normalize, False
            x = student.encode(corpus, batch_size=256).double()  # unnormalised mean token vectors
            student.normalize = normalize
        student.projection = torch.nn.Linear(student.token_dim, teacher.embedding_dim)
        with torch.no_grad():
            if x is not None:
                y = cached_embeddings(teacher, list(corpus)).double()
                sol = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution
                student.projection.weight.copy_(sol[:-1].T.float())
                student.projection.bias.copy_(sol[-1].float())
            else:
                student.projection.weight.zero_()
                n = min(student.token_dim, teacher.embedding_dim)
                student.projection.weight[:n, :n] = torch.eye(n)
                student.projection.bias.zero_()
    return student
