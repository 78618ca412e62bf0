"""Task ``embedding``: distil a sentence encoder into a smaller or static student and measure what
retrieval quality it keeps per unit of speed.

Flow: teacher (zoo name / folder) -> pairs, triples or texts split into train / dev / held-out test
(deterministic, :mod:`kdistill.data.pairs`) -> student built from the teacher (:mod:`kdistill.students.embedding`)
-> teacher embeddings of the training texts computed once (the method is ``cacheable``) ->
:func:`kdistill.train.loop.fit` -> retrieval metrics (for unlabelled texts: agreement with the teacher) and
throughput of teacher, untrained student and distilled student on the held-out set -> ``report.json`` /
``report.md`` and the student exported as a sentence-transformers folder (``<output>/student``), checked by
reloading it in plain sentence-transformers.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator

from ..config import ALONE, DEFAULT_METHODS, FileSource, MethodSpec, StrictModel, TrainSpec, check_kwargs
from ..data.loaders import NeighbourGroupSampler, TensorDictDataset, make_loader
from ..data.pairs import load_embedding_data, row_neighbours
from ..eval.report import write_report
from ..eval.retrieval import embedding_report_md, encoder_entry, retrieval_metrics, text_agreement
from ..io import seed_everything
from ..modules.quantization import ProductQuantizer, quantize_student
from ..registry import TASKS
from ..students.embedding import STUDENTS
from ..students.encoders import SentenceEncoder, load_teacher_encoder, training_forwards
from ..teachers.cache import cached_embeddings
from ..train.loop import fit, make_accelerator
from .base import RunContext, Task


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
    """Pair set (``wordnet`` lemma -> gloss, ``kjv`` verse -> next verse, ``tiny`` for smoke tests, or your
    ``files``), the held-out test pairs, a dev subset for learning curves, and the training sentences (texts of the
    remaining pairs, optionally capped at ``num_train``).

    Your files give (``query_column``, ``positive_column``) pairs; ``negative_column`` adds a hard negative to
    each row (triples: always kept together in training, whatever ``pairs`` says, ``num_train // 3`` of them; the
    held-out negatives join the candidate pool of the test); ``text_column`` alone gives unlabelled texts (the
    student learns the teacher's embeddings of them; the report measures agreement with the teacher on held-out
    texts).

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
    (rows = pairs / triples when kept together, keyed by the sum of the teacher's unit vectors of their texts; else
    sentences): each anchor, in a shuffled order, is followed by up to ``g - 1`` of its ``neighbour_pool`` nearest
    rows not yet drawn this epoch (:class:`~kdistill.data.NeighbourGroupSampler`), so the in-batch list-wise /
    margin terms rank near ties, where a small student loses top-1 retrieval. Every row is still seen once per
    epoch."""

    name: Literal["wordnet", "kjv", "tiny", "files"] = "wordnet"
    query_column: str = "query"
    positive_column: str = "positive"
    negative_column: str | None = None
    text_column: str | None = None
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

    @model_validator(mode="after")
    def _columns(self) -> EmbeddingDataSpec:
        own = [c for c in ("negative_column", "text_column") if getattr(self, c) is not None]
        if own and self.name != "files":
            raise ValueError(f"data.{own[0]} reads your own files, but data.name is {self.name!r} (a built-in pair "
                             "set). Fix: give data.files (or data.hf_dataset), or remove the column.")
        if self.text_column is not None:
            defaults = {"query_column": "query", "positive_column": "positive", "negative_column": None}
            both = [c for c, d in defaults.items() if getattr(self, c) != d]  # a saved config holds the defaults
            if both:
                raise ValueError(f"data.text_column ({self.text_column!r}, unlabelled texts) and data.{both[0]} "
                                 "(labelled pairs) were both given; expected one layout. Fix: keep text_column for "
                                 "texts alone, or query_column + positive_column (+ negative_column) for pairs.")
            if self.pairs:
                raise ValueError(f"data.pairs: true keeps (query, candidate) pairs together, but data.text_column "
                                 f"({self.text_column!r}) gives unlabelled texts; expected pairs: false. Fix: drop "
                                 "pairs, or give query_column and positive_column.")
        if self.negative_column is not None and self.negative_column in (self.query_column, self.positive_column):
            raise ValueError(f"data.negative_column {self.negative_column!r} is also the query or positive column; "
                             "expected a column of its own holding each row's hard negative.")
        return self

    @field_validator("num_eval", "num_dev", "max_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (got {v})")
        return v

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`kdistill.data.pairs.load_embedding_data` (the data-reading fields)."""
        return self.model_dump(exclude={"max_length", "neighbour_group", "neighbour_pool"})


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
    temperature: float = 0.05
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
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"quantize.lr and quantize.temperature must be > 0 (got {self.lr}, "
                             f"{self.temperature})")
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
        if not self.method.method_class.needs_teacher and self.distill:
            raise ValueError(f"method {self.method.name!r} does not use a teacher; embedding distillation needs one "
                             f"(use {DEFAULT_METHODS['embedding']}, or distill: false for the student alone)")
        method = self.method.build()  # its declared needs, checked before any model loads
        if self.student.name == "static" and method.uses_token_states:
            raise ValueError(f"method {self.method.name!r} as configured reads token states, "
                             "but student 'static' has none: use layer_subset or narrow, or drop the token term.")
        if method.needs_pairs and self.data.text_column is not None:
            raise ValueError(f"method {self.method.name!r} as configured trains on (query, candidate) pairs "
                             f"(its pair term), but data.text_column ({self.data.text_column!r}) gives unlabelled "
                             "texts, which have no partner to rank: drop the pair term (the embedding-matching and "
                             "in-batch terms learn from texts alone), or give query_column and positive_column.")
        if method.needs_pairs and not (self.data.pairs or self.data.negative_column):
            raise ValueError(f"method {self.method.name!r} as configured trains on (query, candidate) pairs "
                             "(its pair term), but data.pairs is false, so a batch holds unrelated texts: set "
                             "data.pairs: true (keep the training pairs together) or drop the pair term.")
        if self.quantize is not None and self.data.text_column is not None:
            raise ValueError(f"quantize measures retrieval on held-out pairs, but data.text_column "
                             f"({self.data.text_column!r}) gives unlabelled texts; expected pairs. Fix: remove "
                             "quantize, or give query_column and positive_column.")
        return self


def run_embedding(cfg: EmbeddingConfig, ctx: RunContext) -> dict[str, Any]:
    from ..exporters.sentence_transformers import check_sentence_transformers, export_onnx, save_sentence_transformer

    t_start = time.perf_counter()
    ctx.output.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    data = load_embedding_data(**cfg.data.load_kwargs())
    sentences, labelled = data.train, data.labelled
    teacher = load_teacher_encoder(cfg.teacher).eval()

    seed_everything(cfg.seed)
    student = STUDENTS[cfg.student.name](teacher, corpus=sentences, **cfg.student.kwargs)
    if cfg.quantize is not None:  # a width the subspaces do not divide fails now, not after training
        ProductQuantizer(int(student.embedding_dim), cfg.quantize.num_subspaces, cfg.quantize.num_centroids)
    bs = cfg.eval.batch_size
    queries, candidates = [p.query for p in data.test], [p.candidate for p in data.test]
    held = {"queries": queries, "candidates": candidates, "distractors": data.test_negatives, "texts": data.test_texts}
    throughput = (candidates if labelled else data.test_texts)[: cfg.eval.throughput_sentences]
    if labelled:
        t_test: Any = tuple(cached_embeddings(teacher, x, batch_size=bs) for x in (queries, candidates)) + (
            (cached_embeddings(teacher, data.test_negatives, batch_size=bs),) if data.test_negatives else ())
    else:
        t_test = cached_embeddings(teacher, data.test_texts, batch_size=bs)
    timing = {"batch_size": bs, "threads": cfg.eval.threads, "throughput": throughput,
              "throughput_repeats": cfg.eval.throughput_repeats}
    sizes = ({"dev_pairs": len(data.dev), "test_pairs": len(data.test), "test_negatives": len(data.test_negatives)}
             if labelled else {"dev_texts": len(data.dev_texts), "test_texts": len(data.test_texts)})
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": "embedding", "method": cfg.method.name if cfg.distill else ALONE,
        "seed": cfg.seed,
        "data": {"name": cfg.data.name, "train_sentences": len(sentences), **sizes,
                 "throughput_sentences": len(throughput), "batch_size": bs,
                 "threads": cfg.eval.threads or torch.get_num_threads()},
        "teacher": {"model": cfg.teacher, **encoder_entry(teacher, embeddings=t_test, **held, **timing)},
        "variants": {},
    }
    if cfg.eval.eval_untrained and cfg.distill:
        report["variants"]["untrained"] = encoder_entry(student, teacher_embeddings=t_test, **held, **timing)

    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    metric = "recall_at_1" if labelled else "neighbour_agreement"
    if cfg.distill:
        work = ctx.output / "work"
        if not ctx.resume and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        t_train = cached_embeddings(teacher, sentences, batch_size=bs)
        enc = teacher.tokenize(sentences, max_length=cfg.data.max_length)
        tensors = {k: v for k, v in enc.items()}
        width = tensors["input_ids"].shape[1]
        if width < cfg.data.max_length:  # fixed width so every batch stacks
            tensors = {k: torch.nn.functional.pad(v, (0, cfg.data.max_length - width)) for k, v in tensors.items()}
        g = data.group_size
        if g > 1:  # one row = (query, positive[, negative]): (R, G, ...) tensors, flattened back per batch
            tensors = {k: v.view(-1, g, *v.shape[1:]) for k, v in tensors.items()}
            t_train = t_train.view(-1, g, t_train.shape[-1])
        method = cfg.method.build()
        # the teacher runs live when the method reads token states or other internals (not cacheable)
        student_forward, teacher_kwargs = training_forwards(teacher, list(tensors), group_size=g,
                                                            token_states=method.uses_token_states
                                                            or not method.cacheable)
        sampler = None
        if cfg.data.neighbour_group > 1:
            sampler = NeighbourGroupSampler(row_neighbours(t_train, cfg.data.neighbour_pool),
                                            cfg.data.neighbour_group, cfg.seed)
        loader = make_loader(TensorDictDataset(**tensors, teacher_emb=t_train), cfg.train.batch_size, seed=cfg.seed,
                             sampler=sampler)
        dq, dc, dn = [p.query for p in data.dev], [p.candidate for p in data.dev], data.dev_negatives
        t_dev = None if labelled else cached_embeddings(teacher, data.dev_texts, batch_size=bs)

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            if not labelled:
                m = text_agreement(model.encode(data.dev_texts, bs), t_dev)
                return {k: v for k, v in m.items() if isinstance(v, float)}
            return retrieval_metrics(model.encode(dq, bs), model.encode(dc, bs),
                                     distractors=model.encode(dn, bs) if dn else None)

        accelerator = make_accelerator(cfg.train.mixed_precision)
        res = fit(student=student, method=method, train_loader=loader, accelerator=accelerator,
                  student_forward=student_forward, **teacher_kwargs,
                  evaluate=evaluate, output_dir=work, resume=ctx.resume, phase="student", progress=ctx.progress,
                  seed=cfg.seed, **cfg.train.model_dump(exclude={"batch_size", "mixed_precision"}))
        student, history, train_seconds = res.student, res.history, res.seconds
        teacher.cpu()  # a live teacher (token term) was moved to the loop's device; encode() works on CPU
    student.eval()
    s_entry = encoder_entry(student, teacher_embeddings=t_test, **held, **timing)
    s_entry["train_seconds"] = train_seconds
    s_entry["student"] = cfg.student.model_dump()
    t_r1 = report["teacher"]["metrics"].get("recall_at_1")
    for e in [s_entry, *report["variants"].values()]:
        e["speedup"] = e["sentences_per_second"] / report["teacher"]["sentences_per_second"]
        if labelled:
            e["recall_at_1_kept"] = e["metrics"]["recall_at_1"] / t_r1 if t_r1 > 0 else float("nan")
    report["student"] = s_entry
    report["agreement"] = {k: v for k, v in s_entry["metrics"].items()
                           if k in ("spearman_vs_teacher", "cosine_to_teacher", "neighbour_agreement")
                           or k.startswith("student_")}

    if cfg.quantize is not None:
        report["quantization"] = quantize_student(
            student, teacher, texts=sentences, queries=queries, candidates=candidates,
            distractors=data.test_negatives, teacher_recall_at_1=t_r1, seed=cfg.seed, encode_batch_size=bs,
            teacher_cached_all=cfg.distill, output=ctx.output, **cfg.quantize.model_dump())

    if cfg.export.sentence_transformers:
        path = save_sentence_transformer(student, ctx.output / "student",
                                         metadata={"recipe": cfg.name, "teacher": cfg.teacher})
        report["export"] = {"sentence_transformers": str(path),
                            "st_max_abs_diff": check_sentence_transformers(student, path, throughput[:32])}
        if cfg.export.onnx and isinstance(student, SentenceEncoder):
            report["export"]["onnx"] = export_onnx(student, ctx.output / "student.onnx", sentences=throughput[:16])
    report["wall_seconds"] = time.perf_counter() - t_start
    write_report(report, ctx.output, curves={"student": history} if history else None, metric=metric,
                 extra_md=embedding_report_md(report))
    return report


TASKS.register("embedding")(Task("embedding", EmbeddingConfig, run_embedding,
                                 "sentence encoder -> layer-subset / narrow / static student, retrieval report"))


