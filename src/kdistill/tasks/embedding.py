"""Task ``embedding``: distil a sentence encoder into a smaller or static student and measure what
retrieval quality it keeps per unit of speed.

Flow: teacher (zoo name / folder) -> pair set split into train / dev / held-out test (deterministic) ->
student built from the teacher (layer subset, narrow + projection, or static) -> teacher embeddings of the
training sentences computed once (the method is ``cacheable``) -> :func:`kdistill.train.loop.fit` ->
retrieval metrics, agreement and throughput of teacher, untrained student and distilled student on the
held-out pairs -> ``report.json`` / ``report.md`` and the student exported as a sentence-transformers
folder (``<output>/student``), checked by reloading it in plain sentence-transformers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import field_validator, model_validator

from ..config import ALONE, DEFAULT_METHODS, FileSource, MethodSpec, StrictModel, TrainSpec, check_kwargs
from ..data.loaders import NeighbourGroupSampler, TensorDictDataset, make_loader
from ..data.text import Pair, kjv_pairs, pair_texts, retrieval_split, wordnet_pairs, wordnet_synonym_gloss_pairs
from ..errors import KDistillError
from ..eval.report import write_report
from ..eval.retrieval import evaluate_encoder, retrieval_metrics
from ..io import cache_root, save_state_dict_atomic, seed_everything
from ..methods.base import ModelOutput
from ..registry import METHODS, TASKS
from ..students.encoders import (
    SentenceEncoder,
    count_params,
    encoder_forward,
    layer_subset,
    load_sentence_encoder,
    narrow_encoder,
    tiny_corpus,
    tiny_encoder,
    trim_padding,
)
from ..students.static import StaticEncoder, static_from_teacher
from ..teachers.cache import cached_embeddings
from ..train.loop import fit, make_accelerator
from .base import RunContext, Task


def build_static(teacher: SentenceEncoder, *, corpus: list[str], dim: int | None = 256, weighting: str = "zipf",
                 use_corpus_counts: bool = True, sif_a: float = 1e-3, projection: bool = False,
                 projection_init: Literal["identity", "least_squares"] = "identity") -> StaticEncoder:
    """Static student (see :mod:`kdistill.students.static`); ``projection`` adds a learned ``dim -> teacher
    dim`` linear map that is trained and exported with the student. ``projection_init``: ``identity``
    (zero-padded identity: PCA coordinates in the first dims) or ``least_squares`` (the affine map that best
    sends the static sentence vectors of ``corpus`` to the teacher's embeddings of it, closed form)."""
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


def _layer_subset(teacher: SentenceEncoder, *, corpus: list[str], layers: list[int],
                  freeze_embeddings: bool = False, dropout: float | None = None) -> SentenceEncoder:
    return layer_subset(teacher, layers, freeze_embeddings=freeze_embeddings, dropout=dropout)


def _narrow(teacher: SentenceEncoder, *, corpus: list[str], hidden_size: int, num_layers: int,
            num_heads: int | None = None, intermediate_size: int | None = None, init: str = "teacher",
            seed: int = 0, dropout: float | None = None) -> SentenceEncoder:
    return narrow_encoder(teacher, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          intermediate_size=intermediate_size, init=init, seed=seed, dropout=dropout)


def _pretrained(teacher: SentenceEncoder, *, corpus: list[str], path: str) -> SentenceEncoder:
    return load_sentence_encoder(path)


STUDENTS = {"layer_subset": _layer_subset, "narrow": _narrow, "static": build_static, "pretrained": _pretrained}


class StudentSpec(StrictModel):
    """``name``: ``layer_subset`` (kwargs ``layers``), ``narrow`` (``hidden_size``, ``num_layers``, ...),
    ``static`` (``dim``, ``weighting``, ``projection``, ...), or your own encoder: ``{pretrained: PATH_OR_ID}``
    (a sentence-transformers or Hugging Face encoder folder, a zoo name, or online a hub id)."""

    name: Literal["layer_subset", "narrow", "static", "pretrained"]
    kwargs: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _own_student(cls, v: Any) -> Any:
        if isinstance(v, dict) and "pretrained" in v and "name" not in v:
            return {"name": "pretrained", "kwargs": {"path": v["pretrained"]}}
        return v

    @model_validator(mode="after")
    def _check(self) -> StudentSpec:
        check_kwargs("student", self.name, STUDENTS[self.name], self.kwargs, provided=("teacher", "corpus"))
        return self


class EmbeddingDataSpec(FileSource):
    """Pair set (``wordnet`` lemma -> gloss, ``kjv`` verse -> next verse, ``tiny`` for smoke tests), the
    held-out test pairs, a dev subset for learning curves, and the training sentences (texts of the
    remaining pairs, optionally capped at ``num_train``).

    ``pairs: true`` keeps the training pairs together: every training row is a (query, candidate) pair
    (``num_train // 2`` pairs), so a batch of B rows gives the method 2B embedding rows in which every
    query meets its own candidate - the in-batch list-wise / margin terms then see the teacher's scores
    of true partners next to the other pairs' texts (in-batch negatives), as ranking losses expect.
    The default (``false``) is unsupervised: single sentences, shuffled.

    ``synonym_queries: true`` (``wordnet`` only) adds a pair ``(lemma, definition)`` for every *other* lemma
    of each training synset (:func:`~kdistill.data.text.wordnet_synonym_gloss_pairs`; 85,793 more pairs), so
    the student sees many more short query texts; pairs whose lemma or definition is a test or dev text are
    left out, so the held-out split is unchanged. ``num_train`` then samples from the larger pool.

    ``neighbour_group: g > 1`` builds every batch from neighbourhoods of ``g`` training rows by the teacher
    (rows = pairs with ``pairs: true``, keyed by the sum of the teacher's unit vectors of query and
    candidate; else sentences): each anchor, in a shuffled order, is followed by up to ``g - 1`` of its
    ``neighbour_pool`` nearest rows not yet drawn this epoch (:class:`~kdistill.data.NeighbourGroupSampler`),
    so the in-batch list-wise / margin terms rank near ties, where a small student loses top-1 retrieval.
    Every row is still seen once per epoch."""

    name: Literal["wordnet", "kjv", "tiny", "files"] = "wordnet"
    query_column: str = "query"
    positive_column: str = "positive"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    num_eval: int = 2000
    num_dev: int = 500
    num_train: int | None = 20000
    max_length: int = 64
    data_seed: int = 0
    pairs: bool = False
    synonym_queries: bool = False
    neighbour_group: int = 1
    neighbour_pool: int = 16

    @field_validator("neighbour_group", "neighbour_pool")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (got {v}; neighbour_group 1 = plain shuffled batches)")
        return v

    @model_validator(mode="after")
    def _synonyms_need_wordnet(self) -> EmbeddingDataSpec:
        if self.synonym_queries and self.name != "wordnet":
            raise ValueError(f"data.synonym_queries needs data.name 'wordnet' (got {self.name!r}): only WordNet "
                             "synsets have synonym lemmas. Set synonym_queries: false.")
        return self

    @field_validator("num_eval", "num_dev", "max_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (got {v})")
        return v


class EmbeddingEvalSpec(StrictModel):
    batch_size: int = 64
    threads: int | None = None
    throughput_sentences: int = 1000
    throughput_repeats: int = 3
    eval_untrained: bool = True


class ExportSpec(StrictModel):
    sentence_transformers: bool = True
    onnx: bool = False


class QuantizeSpec(StrictModel):
    """Optional product quantisation of the student's embeddings (``modules/quantization.py``): k-means
    codebooks, then (``distill: true``) Distill-VQ training of the codebooks against the teacher's in-batch
    scores, each batch made of anchors and their ``neighbours`` nearest sentences by the teacher. The report
    compares dense, k-means-PQ and Distill-VQ retrieval at ``bytes_per_vector``. Defaults from a sweep on the
    WordNet set (docs/embedding.md): Adam moves every centroid by about ``lr`` per step whatever its gradient,
    so ``lr`` must stay small (1e-3 degraded recall, 3e-3 destroyed it); random in-batch candidates alone
    (``neighbours: 0``) did worse than k-means. ``max_train``: the codebooks are fitted on at most this many
    training texts (a seeded random subset; ``null`` = all). k-means, the teacher-neighbour search and the
    student encoding all grow with it, and 256 centroids per subspace need far fewer than 200k vectors."""

    num_subspaces: int = 32
    num_centroids: int = 256
    kmeans_iters: int = 25
    distill: bool = True
    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-4
    kd_temperature: float = 0.05
    neighbours: int = 7
    max_train: int | None = 50000

    @model_validator(mode="after")
    def _check(self) -> QuantizeSpec:
        # checked at config load, not after a long training run (the width check needs the student: see
        # run_embedding, right after the student is built)
        if self.max_train is not None and self.max_train < self.num_centroids:
            raise ValueError(f"quantize.max_train must be >= num_centroids = {self.num_centroids} (got "
                             f"{self.max_train}; k-means needs at least one vector per centroid), or null for all")
        for name in ("num_subspaces", "kmeans_iters", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"quantize.{name} must be >= 1 (got {getattr(self, name)})")
        if not 2 <= self.num_centroids <= 65536:
            raise ValueError(f"quantize.num_centroids must be in [2, 65536] (got {self.num_centroids}; 256 = one "
                             "byte per subspace)")
        if self.lr <= 0 or self.kd_temperature <= 0:
            raise ValueError(f"quantize.lr and quantize.kd_temperature must be > 0 (got {self.lr}, "
                             f"{self.kd_temperature})")
        if not 0 <= self.neighbours < self.batch_size:
            raise ValueError(f"quantize.neighbours must be in [0, batch_size - 1] = [0, {self.batch_size - 1}] "
                             f"(got {self.neighbours}); batches hold anchors plus their neighbours")
        return self


class EmbeddingConfig(StrictModel):
    task: Literal["embedding"] = "embedding"
    name: str = "embedding"
    description: str = ""
    seed: int = 0
    teacher: str = "minilm-l6"
    student: StudentSpec
    data: EmbeddingDataSpec = EmbeddingDataSpec()
    method: MethodSpec = MethodSpec(name=DEFAULT_METHODS["embedding"])
    distill: bool = True
    train: TrainSpec = TrainSpec(epochs=1, batch_size=64, lr=1e-4, warmup_steps=20)
    eval: EmbeddingEvalSpec = EmbeddingEvalSpec()
    export: ExportSpec = ExportSpec()
    quantize: QuantizeSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> EmbeddingConfig:
        cls = METHODS.get(self.method.name)
        if not cls.needs_teacher and self.distill:
            raise ValueError(f"method {self.method.name!r} does not use a teacher; embedding distillation needs one "
                             f"(use {DEFAULT_METHODS['embedding']}, or distill: false for the student alone)")
        method = cls(**self.method.kwargs)  # its declared needs, checked before any model loads
        if self.student.name == "static" and method.uses_token_states:
            raise ValueError(f"method {self.method.name!r} as configured reads token states, "
                             "but student 'static' has none: use layer_subset or narrow, or drop the token term.")
        if method.needs_pairs and not self.data.pairs:
            raise ValueError(f"method {self.method.name!r} as configured trains on (query, candidate) pairs "
                             "(its pair term), but data.pairs is false, so a batch holds unrelated texts: set "
                             "data.pairs: true (keep the training pairs together) or drop the pair term.")
        return self


# ------------------------------------------------------------------------------------------------ data


def load_pairs(spec: EmbeddingDataSpec) -> tuple[list[str], list[Pair], list[Pair]]:
    """``(train_sentences, dev_pairs, test_pairs)``, deterministic in the spec."""
    if spec.name == "files":
        train_pairs, dev, test = _file_pairs(spec)
    else:
        if spec.name == "wordnet":
            pairs = wordnet_pairs()
        elif spec.name == "kjv":
            pairs = kjv_pairs()
        else:  # tiny: prefix -> full sentence
            pairs = [Pair(" ".join(s.split()[: max(1, len(s.split()) // 2)]), s) for s in tiny_corpus(600, seed=11)]
        rest, test = retrieval_split(pairs, num_eval=spec.num_eval, seed=spec.data_seed)
        train_pairs, dev = retrieval_split(rest, num_eval=min(spec.num_dev, len(rest) // 2),
                                           seed=spec.data_seed + 1)
    if spec.synonym_queries:  # wordnet only (checked by the spec)
        held_q = {p.query.lower() for p in (*test, *dev)}
        held_c = {p.candidate.lower() for p in (*test, *dev)}
        train_pairs = train_pairs + [p for p in wordnet_synonym_gloss_pairs()
                                     if p.query.lower() not in held_q and p.candidate.lower() not in held_c]
    if spec.pairs:  # [q1, c1, q2, c2, ...]: whole pairs, num_train // 2 of them
        if spec.num_train is not None and spec.num_train // 2 < len(train_pairs):
            keep = np.random.default_rng(spec.data_seed).permutation(len(train_pairs))[: spec.num_train // 2]
            train_pairs = [train_pairs[i] for i in sorted(keep)]
        sentences = [t for p in train_pairs for t in (p.query, p.candidate)]
        if not sentences:
            raise KDistillError(f"data {spec.name!r}: no training pairs left after holding out {spec.num_eval} + "
                                f"{spec.num_dev} pairs; lower data.num_eval / data.num_dev.")
        return sentences, dev, test
    sentences = pair_texts(train_pairs)
    if spec.num_train is not None and spec.num_train < len(sentences):
        keep = np.random.default_rng(spec.data_seed).permutation(len(sentences))[: spec.num_train]
        sentences = [sentences[i] for i in sorted(keep)]
    if not sentences:
        raise KDistillError(f"data {spec.name!r}: no training sentences left after holding out {spec.num_eval} + "
                            f"{spec.num_dev} pairs; lower data.num_eval / data.num_dev.")
    return sentences, dev, test


def _file_pairs(spec: EmbeddingDataSpec) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, dev, test) pairs of your (query, positive) rows; held-out splits from files or seeded fractions."""
    from ..data.files import load_rows

    q, c = spec.query_column, spec.positive_column
    rows = load_rows(files=spec.files, format=spec.format, hf_dataset=spec.hf_dataset,
                     validation_fraction=spec.validation_fraction, test_fraction=spec.test_fraction,
                     seed=spec.data_seed, columns=[q, c])
    out = []
    for split in ("train", "validation", "test"):
        pairs = []
        for i, row in enumerate(rows.get(split, []), start=1):
            for col in (q, c):
                if not isinstance(row[col], str) or not row[col].strip():
                    raise KDistillError(f"data ({split} split), row {i}, column {col!r}: got {row[col]!r}, "
                                        "expected a non-empty text.")
            pairs.append(Pair(row[q], row[c]))
        out.append(pairs)
    for split, pairs, name in ((2, "test", "test_fraction"), (1, "validation", "validation_fraction")):
        if not out[split]:
            raise KDistillError(f"data: no {pairs} pairs; expected a {pairs} file or data.{name} > 0 (retrieval "
                                "is measured on held-out pairs, learning curves on validation pairs).")
    return out[0], out[1], out[2]


def load_teacher(name: str) -> SentenceEncoder:
    return tiny_encoder(num_layers=4, seed=1) if name == "tiny" else load_sentence_encoder(name)


def _row_neighbours(t_train: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k)`` nearest training rows by the teacher: rows of ``(N, D)`` sentence embeddings, or of
    ``(N, 2, D)`` pairs keyed by the sum of the two unit vectors."""
    from ..modules.quantization import teacher_neighbours

    t = torch.nn.functional.normalize(t_train.float(), dim=-1)
    key = t.sum(1) if t.dim() == 3 else t
    return teacher_neighbours(key, min(k, len(key) - 1)) if len(key) > 1 else torch.zeros(1, 0, dtype=torch.long)


def token_forward(model: SentenceEncoder, batch: dict[str, torch.Tensor]) -> ModelOutput:
    """Like :func:`~kdistill.students.encoders.encoder_forward` (padding columns trimmed), but also returns the
    last hidden states: ``ModelOutput(logits=(B, D) embeddings, features={"tokens": (B, T, H)},
    extra={"attention_mask": (B, T) bool})`` - what a method's token term reads (``uses_token_states``)."""
    kwargs = trim_padding(batch)
    tokens = model.backbone(**kwargs).last_hidden_state
    return ModelOutput(logits=model.head(tokens, kwargs["attention_mask"]), features={"tokens": tokens},
                       extra={"attention_mask": kwargs["attention_mask"].bool()})


def _training_forwards(method: Any, teacher: SentenceEncoder, keys: list[str], *,
                       pairs: bool) -> tuple[Any, dict[str, Any]]:
    """``(student_forward, teacher arguments of fit)``. Rows of pairs ``(P, 2, ...)`` are flattened to ``2P`` texts.
    The teacher's sentence embeddings come from the cache in the batch (``teacher_targets``); with a method that
    reads token states (``uses_token_states``) the student also returns its last hidden states and the loop runs
    the teacher live (``teacher`` + ``teacher_forward``: frozen, on the loop's device, no gradients) for its own."""

    def texts(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (b[k].flatten(0, 1) if pairs else b[k]) for k in keys}

    def cached(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return b["teacher_emb"].flatten(0, 1) if pairs else b["teacher_emb"]

    if not method.uses_token_states:
        return (lambda model, b: encoder_forward(model, texts(b))), {"teacher_targets": lambda b: ModelOutput(
            logits=cached(b))}

    def teacher_forward(model: SentenceEncoder, b: dict[str, torch.Tensor]) -> ModelOutput:
        out = token_forward(model, texts(b))
        return ModelOutput(logits=cached(b), features={"tokens": out.features["tokens"]})

    return (lambda model, b: token_forward(model, texts(b))), {"teacher": teacher, "teacher_forward": teacher_forward}


# ------------------------------------------------------------------------------------------------- run


def _entry(model: Any, test: list[Pair], *, teacher_emb: tuple[torch.Tensor, torch.Tensor] | None,
           spec: EmbeddingEvalSpec, throughput: list[str],
           embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    m = evaluate_encoder(model, [p.query for p in test], [p.candidate for p in test], teacher_embeddings=teacher_emb,
                         embeddings=embeddings,
                         batch_size=spec.batch_size, throughput_sentences=throughput, threads=spec.threads,
                         throughput_repeats=spec.throughput_repeats)
    sps = m.pop("sentences_per_second")
    return {"params": count_params(model), "embedding_dim": int(model.embedding_dim), "metrics": m,
            "sentences_per_second": sps, "latency_ms": 1000.0 * spec.batch_size / sps}


def run_embedding(cfg: EmbeddingConfig, ctx: RunContext) -> dict[str, Any]:
    from ..exporters.sentence_transformers import check_sentence_transformers, export_onnx, save_sentence_transformer

    t_start = time.perf_counter()
    ctx.output.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    sentences, dev, test = load_pairs(cfg.data)
    teacher = load_teacher(cfg.teacher).eval()

    seed_everything(cfg.seed)
    student = STUDENTS[cfg.student.name](teacher, corpus=sentences, **cfg.student.kwargs)
    if cfg.quantize is not None:  # a width the subspaces do not divide fails now, not after training
        from ..modules.quantization import ProductQuantizer

        ProductQuantizer(int(student.embedding_dim), cfg.quantize.num_subspaces, cfg.quantize.num_centroids)
    throughput = [p.candidate for p in test][: cfg.eval.throughput_sentences]
    t_test = (cached_embeddings(teacher, [p.query for p in test], batch_size=cfg.eval.batch_size),
              cached_embeddings(teacher, [p.candidate for p in test], batch_size=cfg.eval.batch_size))
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": "embedding", "method": cfg.method.name if cfg.distill else ALONE,
        "seed": cfg.seed,
        "data": {"name": cfg.data.name, "train_sentences": len(sentences), "dev_pairs": len(dev),
                 "test_pairs": len(test), "throughput_sentences": len(throughput),
                 "batch_size": cfg.eval.batch_size, "threads": cfg.eval.threads or torch.get_num_threads()},
        "teacher": {"model": cfg.teacher, **_entry(teacher, test, teacher_emb=None, spec=cfg.eval,
                                                   throughput=throughput, embeddings=t_test)},
        "variants": {},
    }
    if cfg.eval.eval_untrained and cfg.distill:
        report["variants"]["untrained"] = _entry(student, test, teacher_emb=t_test, spec=cfg.eval,
                                                 throughput=throughput)

    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    if cfg.distill:
        work = ctx.output / "work"
        if not ctx.resume and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        t_train = cached_embeddings(teacher, sentences, batch_size=cfg.eval.batch_size)
        enc = teacher.tokenize(sentences, max_length=cfg.data.max_length)
        tensors = {k: v for k, v in enc.items()}
        width = tensors["input_ids"].shape[1]
        if width < cfg.data.max_length:  # fixed width so every batch stacks
            tensors = {k: torch.nn.functional.pad(v, (0, cfg.data.max_length - width)) for k, v in tensors.items()}
        if cfg.data.pairs:  # one row = (query, candidate): (P, 2, ...) tensors, flattened back to 2B rows per batch
            tensors = {k: v.view(-1, 2, *v.shape[1:]) for k, v in tensors.items()}
            t_train = t_train.view(-1, 2, t_train.shape[-1])
        method = METHODS.get(cfg.method.name)(**cfg.method.kwargs)
        student_forward, teacher_kwargs = _training_forwards(method, teacher, list(tensors), pairs=cfg.data.pairs)
        sampler = None
        if cfg.data.neighbour_group > 1:
            sampler = NeighbourGroupSampler(_row_neighbours(t_train, cfg.data.neighbour_pool),
                                            cfg.data.neighbour_group, cfg.seed)
        loader = make_loader(TensorDictDataset(**tensors, teacher_emb=t_train), cfg.train.batch_size, seed=cfg.seed,
                             sampler=sampler)
        dq, dc = [p.query for p in dev], [p.candidate for p in dev]

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            return retrieval_metrics(model.encode(dq, cfg.eval.batch_size), model.encode(dc, cfg.eval.batch_size))

        accelerator = make_accelerator(cfg.train.mixed_precision)
        res = fit(student=student, method=method, train_loader=loader, accelerator=accelerator,
                  student_forward=student_forward, **teacher_kwargs,
                  evaluate=evaluate, output_dir=work, resume=ctx.resume, phase="student", progress=ctx.progress,
                  seed=cfg.seed, **cfg.train.model_dump(exclude={"batch_size", "mixed_precision"}))
        student, history, train_seconds = res.student, res.history, res.seconds
        teacher.cpu()  # a live teacher (token term) was moved to the loop's device; encode() works on CPU
    student.eval()
    s_entry = _entry(student, test, teacher_emb=t_test, spec=cfg.eval, throughput=throughput)
    s_entry["train_seconds"] = train_seconds
    s_entry["student"] = cfg.student.model_dump()
    t_r1 = report["teacher"]["metrics"]["recall_at_1"]
    for e in [s_entry, *report["variants"].values()]:
        e["speedup"] = e["sentences_per_second"] / report["teacher"]["sentences_per_second"]
        e["recall_at_1_kept"] = e["metrics"]["recall_at_1"] / t_r1 if t_r1 > 0 else float("nan")
    report["student"] = s_entry
    report["agreement"] = {k: v for k, v in s_entry["metrics"].items()
                           if k in ("spearman_vs_teacher", "cosine_to_teacher") or k.startswith("student_")}

    if cfg.quantize is not None:
        report["quantization"] = quantize_student(cfg, student, teacher, sentences, test, t_r1, ctx.output)

    if cfg.export.sentence_transformers:
        path = save_sentence_transformer(student, ctx.output / "student",
                                         metadata={"recipe": cfg.name, "teacher": cfg.teacher})
        report["export"] = {"sentence_transformers": str(path),
                            "st_max_abs_diff": check_sentence_transformers(student, path, throughput[:32])}
        if cfg.export.onnx and isinstance(student, SentenceEncoder):
            report["export"]["onnx"] = export_onnx(student, ctx.output / "student.onnx", sentences=throughput[:16])
    report["wall_seconds"] = time.perf_counter() - t_start
    write_report(report, ctx.output, curves={"student": history} if history else None, metric="recall_at_1",
                 extra_md=_extra_md(report))
    return report


def quantize_student(cfg: EmbeddingConfig, student: Any, teacher: SentenceEncoder, sentences: list[str],
                     test: list[Pair], teacher_r1: float, output: Path) -> dict[str, Any]:
    """Product-quantise the student's candidate embeddings: k-means codebooks, then Distill-VQ; retrieval with
    dense queries against decoded candidates. Codebooks saved to ``<output>/pq.safetensors``."""
    from ..modules.quantization import ProductQuantizer, train_distill_vq

    q = cfg.quantize
    bs = cfg.eval.batch_size
    keep = list(range(len(sentences)))
    if q.max_train is not None and len(sentences) > q.max_train:
        keep = sorted(np.random.default_rng(cfg.seed).permutation(len(sentences))[: q.max_train].tolist())
    if cfg.distill:  # training cached the teacher's embeddings of every training text: take the subset's rows
        t_train = cached_embeddings(teacher, sentences, batch_size=bs)[keep]
        sentences = [sentences[i] for i in keep]
    else:
        sentences = [sentences[i] for i in keep]
        t_train = cached_embeddings(teacher, sentences, batch_size=bs)
    with torch.no_grad():
        s_train = student.encode(sentences, bs)
        s_q, s_c = student.encode([p.query for p in test], bs), student.encode([p.candidate for p in test], bs)
    pq = ProductQuantizer(s_train.shape[1], q.num_subspaces, q.num_centroids).init_kmeans(
        s_train, iters=q.kmeans_iters, seed=cfg.seed)

    def scored() -> dict[str, Any]:
        m = retrieval_metrics(s_q, pq(s_c).detach())
        m["recall_at_1_kept"] = m["recall_at_1"] / teacher_r1 if teacher_r1 > 0 else float("nan")
        m["reconstruction_mse"] = pq.reconstruction_error(s_c)
        return m

    dense = retrieval_metrics(s_q, s_c)
    dense["recall_at_1_kept"] = dense["recall_at_1"] / teacher_r1 if teacher_r1 > 0 else float("nan")
    out: dict[str, Any] = {"num_subspaces": pq.m, "num_centroids": pq.k, "bytes_per_vector": pq.bytes_per_vector,
                           "dense_bytes_per_vector": 4 * pq.dim,
                           "compression": 4 * pq.dim / pq.bytes_per_vector, "train_texts": len(sentences),
                           "dense": dense, "kmeans": scored()}
    if q.distill:
        out["distill_vq_training"] = train_distill_vq(pq, s_train, t_train, epochs=q.epochs, batch_size=q.batch_size,
                                                      lr=q.lr, kd_temperature=q.kd_temperature,
                                                      neighbours=q.neighbours, seed=cfg.seed)
        out["distill_vq"] = scored()
    save_state_dict_atomic(output / "pq.safetensors", {"codebooks": pq.codebooks.detach().contiguous()})
    return out


def _extra_md(report: dict[str, Any]) -> str:
    s, t = report["student"], report["teacher"]
    return "\n".join([
        "## Retrieval trade-off (held-out pairs)", "",
        f"- teacher: recall@1 {t['metrics']['recall_at_1']:.4f}, MRR {t['metrics']['mrr']:.4f}, "
        f"{t['sentences_per_second']:.1f} sentences/s",
        f"- student: recall@1 {s['metrics']['recall_at_1']:.4f} ({100 * s['recall_at_1_kept']:.1f}% of the teacher), "
        f"MRR {s['metrics']['mrr']:.4f}, {s['sentences_per_second']:.1f} sentences/s ({s['speedup']:.1f}x)",
        f"- agreement: Spearman {s['metrics']['spearman_vs_teacher']:.4f}, cosine to teacher "
        f"{s['metrics']['cosine_to_teacher'] if s['metrics']['cosine_to_teacher'] is not None else 'n/a'}",
        *_mixed_md(s["metrics"], t["metrics"]["recall_at_1"]),
        *_quantization_md(report.get("quantization")),
    ])


def _mixed_md(m: dict[str, Any], teacher_r1: float) -> list[str]:
    if "student_queries_recall_at_1" not in m:
        return []

    def kept(x: float) -> str:
        return f"{100 * x / teacher_r1:.1f}%" if teacher_r1 > 0 else "n/a"

    return [f"- mixed sides: the student's queries against the teacher's index: recall@1 "
            f"{m['student_queries_recall_at_1']:.4f} ({kept(m['student_queries_recall_at_1'])}); the teacher's queries "
            f"against the student's index: {m['student_candidates_recall_at_1']:.4f} "
            f"({kept(m['student_candidates_recall_at_1'])})"]


def _quantization_md(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    lines = ["", f"## Product quantisation ({q['num_subspaces']} x {q['num_centroids']} centroids: "
             f"{q['bytes_per_vector']} bytes per vector instead of {q['dense_bytes_per_vector']}, "
             f"{q['compression']:.0f}x)", "",
             "| candidates | recall@1 | MRR | kept of teacher's recall@1 |", "|---|---:|---:|---:|"]
    for key, label in (("dense", "dense student"), ("kmeans", "PQ, k-means codebooks"),
                       ("distill_vq", "PQ, Distill-VQ codebooks")):
        if key in q:
            m = q[key]
            lines.append(f"| {label} | {m['recall_at_1']:.4f} | {m['mrr']:.4f} | {100 * m['recall_at_1_kept']:.1f}% |")
    return lines


TASKS.register("embedding")(Task("embedding", EmbeddingConfig, run_embedding,
                                 "sentence encoder -> layer-subset / narrow / static student, retrieval report"))
