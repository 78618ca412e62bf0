"""Task ``llm``: distil a causal language model into a smaller one on a text corpus.

Flow: teacher + tokenizer (zoo name, folder or hub id; or ``tiny`` for tests) -> student (layer-subset
copy or smaller config, same tokenizer; or its own, ``student.tokenizer`` / ``pretrained``: then a method with the
``cross_tokenizer`` hook and blocks aligned by characters, ``data.align``) -> vocabulary check -> training blocks
(fixed length, no padding)
-> optional offline top-k cache (``cache: DIR`` written by ``kdistill cache``; then the teacher is never
run on the training data) -> baseline (same student, cross-entropy only, same steps) and the distilled
student through :func:`kdistill.train.loop.fit` -> held-out perplexity, teacher-student top-1 agreement
and KL, a few greedy generations side by side, the audits (``eval.audit``, ``eval.shift``: teacher hacking,
memorisation, a shifted domain) -> ``report.json`` / ``report.md`` -> the students as Hugging Face folders
(``save_pretrained`` + tokenizer) under ``<output>/student`` and ``<output>/baseline``. ``audit_run`` is the
``kdistill audit`` entry.

This file holds the schema and the wiring; the parts live in ``data.lm`` (corpora, blocks, streams, padded rows),
``teachers.lm`` / ``teachers.generations`` / ``teachers.cache``, ``students.llm``, ``eval.lm`` and ``eval.audit``.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError, field_validator, model_validator
from torch import Tensor, nn

from ..config import (
    ALONE,
    DEFAULT_METHODS,
    DEFAULT_SELECTORS,
    DesignSettings,
    FileSource,
    MethodSpec,
    SelectionSpec,
    StrictModel,
    TrainSpec,
)
from ..data.lm import TextStream, corpus_texts, held_out_tensors, insert_canaries, lm_corpus, lm_dataset
from ..data.loaders import TensorDictDataset, make_loader
from ..data.selection import subset_dataset
from ..errors import KDistillError
from ..eval.audit import PROXY, audit_markdown, proxy_kl, read_log, training_proxy, write_teacher_hacking_plot
from ..eval.lm import evaluate_lm_models, lm_metrics, lm_report_markdown
from ..eval.report import write_report
from ..io import write_json_atomic
from ..methods.base import ModelOutput
from ..registry import TASKS
from ..train.loop import fit, join_torchrun, make_accelerator
from .base import RunContext, Task


class LMTeacherSpec(StrictModel):
    """``name``: a zoo entry (``smollm2-135m``), a local folder or a hub id; ``tiny`` builds a random tiny
    Llama and trains a BPE tokenizer on the training texts (tests, CI).

    A teacher served over HTTP: ``endpoint`` (an OpenAI-compatible base URL, ``http://HOST:PORT/v1``), ``model``
    (the served name), optional ``api_key_env`` (the *name* of the variable holding the key) and ``concurrency``;
    ``tokenizer`` (a zoo name, folder or hub id; default: ``student.pretrained``) is the served model's tokenizer,
    loaded locally (checked against the server by a probe). It is scored into a top-k cache by ``kdistill cache``
    and trained from that cache; its weights are never loaded."""

    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"
    tiny_vocab_size: int = 512
    tiny_layers: int = 4
    tiny_hidden_size: int = 64
    endpoint: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    tokenizer: str | None = None
    concurrency: int = 8

    @model_validator(mode="after")
    def _served(self) -> LMTeacherSpec:
        from ..teachers.api import check_api_key_env

        if self.endpoint is None:
            given = [f for f in ("model", "api_key_env", "tokenizer") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"teacher.{given[0]} goes with teacher.endpoint (a served teacher); got no endpoint. "
                                 "Fix: add `endpoint: http://HOST:PORT/v1`, or remove it")
            return self
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"teacher.endpoint: got {self.endpoint!r}, expected an http(s) base URL such as "
                             "'http://127.0.0.1:8000/v1'")
        if not self.model:
            raise ValueError("teacher.endpoint needs teacher.model: the name the server serves (GET /v1/models)")
        if self.concurrency < 1:
            raise ValueError(f"teacher.concurrency: got {self.concurrency}, expected an integer >= 1")
        try:
            check_api_key_env(self.api_key_env, "teacher.api_key_env")
        except KDistillError as e:
            raise ValueError(str(e)) from None
        return self


class LoRASpec(StrictModel):
    """LoRA adapters on the student (:func:`kdistill.students.llm.apply_lora`): only they (and the norms with
    ``train_norms``) train; the saved student has them merged in."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    train_norms: bool = False


_PRUNE_SIZES = ("target_params", "heads", "intermediate_size", "hidden_size")


class TrainBPESpec(StrictModel):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on the training texts."""

    vocab_size: int

    @field_validator("vocab_size")
    @classmethod
    def _vs(cls, v: int) -> int:
        if v < 259:
            raise ValueError(f"got {v}, expected an integer >= 259 (256 byte symbols + 3 special tokens)")
        return v


class StudentTokenizerSpec(StrictModel):
    train_bpe: TrainBPESpec


class LMStudentSpec(StrictModel):
    """``layer_subset``: ``num_layers`` evenly spaced (or ``keep_layers``) of the teacher, weights copied;
    ``smaller_config``: fresh model with ``config`` overrides (e.g. ``{num_hidden_layers: 4}``);
    ``pruned``: the teacher pruned by activation importance on ``calibration_batches`` training batches
    (:mod:`kdistill.students.pruning`) to ``target_params`` or to the given ``heads`` / ``intermediate_size`` /
    ``hidden_size`` / ``num_layers`` (an axis not given is kept whole); ``lora``: adapters on top of any kind.
    ``tokenizer`` (kind ``smaller_config``): the student's own tokenizer, a folder / hub id or ``{train_bpe:
    {vocab_size: N}}`` (trained on the training texts); the model is sized to it. A ``pretrained`` student brings
    its own. A tokenizer other than the teacher's needs a cross-tokenizer method (see docs/llm.md)."""

    kind: Literal["layer_subset", "smaller_config", "pruned", "pretrained"] = "layer_subset"
    num_layers: int | None = 6
    keep_layers: list[int] | None = None
    config: dict[str, Any] = {}
    pretrained: str | None = None
    target_params: int | None = None
    heads: int | None = None
    intermediate_size: int | None = None
    hidden_size: int | None = None
    calibration_batches: int = 8
    lora: LoRASpec | None = None
    tokenizer: str | StudentTokenizerSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _pretrained(cls, v: Any) -> Any:
        if isinstance(v, dict) and "pretrained" in v and "kind" not in v:
            return {**v, "kind": "pretrained"}
        return v

    @model_validator(mode="after")
    def _check(self) -> LMStudentSpec:
        if (self.kind == "pretrained") != (self.pretrained is not None):
            raise ValueError("student.pretrained (a zoo name, model folder or hub id) goes with kind 'pretrained'; "
                             "give `pretrained: PATH_OR_ID` alone, or another kind without it")
        if self.kind == "layer_subset" and self.keep_layers is not None:
            self.__dict__["num_layers"] = None
        if self.tokenizer is not None and self.kind != "smaller_config":
            raise ValueError(f"student.tokenizer: got one with kind {self.kind!r}; expected kind 'smaller_config' (a "
                             "fresh model sized to the tokenizer). layer_subset and pruned students keep the teacher's "
                             "embeddings, a pretrained student brings its own tokenizer. Fix: remove student.tokenizer "
                             "or set `kind: smaller_config`")
        given = [k for k in _PRUNE_SIZES if getattr(self, k) is not None]
        if self.kind != "pruned" and given:
            raise ValueError(f"student: got {', '.join(given)} with kind {self.kind!r}; these sizes belong to kind "
                             "'pruned'. Fix: set `kind: pruned`, or remove them")
        if self.kind == "pruned":
            if "num_layers" not in self.model_fields_set:  # depth is pruned only when asked
                self.__dict__["num_layers"] = None
            if self.keep_layers is not None:
                raise ValueError("student.keep_layers: kind 'pruned' chooses the layers by Block Influence; expected "
                                 "num_layers (how many to keep). Fix: replace keep_layers with num_layers")
            if not given and self.num_layers is None:
                raise ValueError("student kind 'pruned': got no size; expected target_params or at least one of "
                                 "heads, intermediate_size, hidden_size, num_layers (e.g. target_params: 60000000)")
            if self.calibration_batches < 1:
                raise ValueError(f"student.calibration_batches: got {self.calibration_batches}, expected >= 1")
        return self

    def tokenizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`kdistill.students.llm.student_tokenizer` (without the texts)."""
        t = self.tokenizer
        return {"source": t} if isinstance(t, str) else {"train_bpe_vocab_size": t.train_bpe.vocab_size}

    def prune_kwargs(self) -> dict[str, Any]:
        """The sizes of :func:`kdistill.students.pruning.prune_lm` for kind ``pruned``."""
        return {"num_layers": self.num_layers, **{k: getattr(self, k) for k in _PRUNE_SIZES}}


class SequenceKDSpec(StrictModel):
    """Sequence-level KD: the teacher completes every training prompt once -- the first ``data.prompt_tokens``
    tokens of each text block (exactly ``block_length - prompt_tokens`` new tokens), or each row's prompt with
    ``data.prompt_column`` (up to EOS or ``block_length - prompt_tokens`` tokens) -- stored at ``store`` (default
    ``<output>/teacher_generations.jsonl``, resumable), and the student trains on prompt + teacher completion
    (loss on the completion tokens). With prompt rows the file's completions serve held-out evaluation and the
    baseline only. ``generation_batch_size`` prompts are completed per ``generate`` call (left-padded; the stored
    completions do not depend on it)."""

    store: str | None = None
    sampling_temperature: float = 0.0
    generation_batch_size: int = 16

    @field_validator("generation_batch_size")
    @classmethod
    def _gbs(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"got {v}, expected an integer >= 1 (prompts per generate call; lower it if memory "
                             "runs out)")
        return v


def _at_least(v: int, low: int) -> int:
    if v < low:
        raise ValueError(f"got {v}, expected an integer >= {low}")
    return v


class CanarySpec(StrictModel):
    """Random canaries inserted into the training texts (``"my secret number is d d ... d"``, ``length`` digits;
    :func:`kdistill.data.lm.canary_texts`): ``count`` of them, each ``repeats`` times at positions drawn with
    ``seed``. The audit reports each one's exposure under every model."""

    count: int = 1
    repeats: int = 10
    length: int = 8
    seed: int = 0

    _positive = field_validator("count", "repeats", "length")(classmethod(lambda cls, v: _at_least(v, 1)))


class LMDataSpec(FileSource):
    """``kjv``: the King James Bible (Debian ``bible-kjv``), held-out = the last verses (Revelation end);
    ``wordnet``: WordNet glosses (``"lemma: gloss"``, Debian ``wordnet-base``), held-out = the last 5%;
    ``texts``: the strings in ``texts`` (tests); ``files``: your own data (``data: {files: ..., text_column: ...}``
    or ``hf_dataset: {path: ...}``): a ``text_column`` of documents, packed into ``block_length``-token blocks like
    the others, or a ``messages_column`` of chat conversations (``[{role, content}, ...]``), each formatted with the
    tokenizer's chat template and trained on its assistant tokens only. Held-out rows: a ``validation`` file, or
    ``eval_fraction`` of the rows (seeded). ``stream: true`` (files with a ``text_column``): rows are read lazily
    and packed until ``train_tokens`` / ``eval_tokens`` are full, then reading stops; the held-out rows are those
    whose hash of (row index) falls below ``eval_fraction``, or a ``validation`` file."""

    name: Literal["kjv", "wordnet", "texts", "files"] = "kjv"
    texts: list[str] = []
    text_column: str = "text"
    messages_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    block_length: int = 128
    train_tokens: int = 200_000
    eval_tokens: int = 4_096
    eval_fraction: float = 0.05
    prompt_tokens: int = 0
    sequence_kd: SequenceKDSpec | None = None
    stream: bool = False
    canaries: CanarySpec | None = None
    selection: SelectionSpec | None = None

    @field_validator("block_length")
    @classmethod
    def _bl(cls, v: int) -> int:
        if v < 4:
            raise ValueError(f"must be >= 4 (got {v})")
        return v

    @model_validator(mode="after")
    def _chat(self) -> LMDataSpec:
        if self.messages_column is not None and (self.prompt_tokens or self.sequence_kd is not None
                                                 or self.prompt_column is not None):
            raise ValueError("data.messages_column trains on the assistant turns of each conversation; "
                             "prompt_tokens, prompt_column and sequence_kd apply to other data. Remove them.")
        if (self.prompt_column is None) != (self.completion_column is None):
            raise ValueError("data.prompt_column and data.completion_column go together: (prompt, completion) rows, "
                             "the completion being what the student learns (and what held-out perplexity measures)")
        if self.prompt_column is not None and self.prompt_tokens < 1:
            raise ValueError("data.prompt_column: set data.prompt_tokens (the longest prompt, in tokens; prompts are "
                             "left-padded to it)")
        if self.stream and (self.name != "files" or self.files is None or self.messages_column is not None
                            or self.prompt_column is not None):
            raise ValueError(f"data.stream: got name {self.name!r}, files {self.files!r}, hf_dataset "
                             f"{self.hf_dataset!r}, messages_column {self.messages_column!r}, prompt_column "
                             f"{self.prompt_column!r}; streaming reads the text_column of data.files (jsonl, csv, "
                             "tsv, txt, parquet) only. Fix: give data.files with a text_column, or remove stream")
        return self

    @model_validator(mode="after")
    def _canaries(self) -> LMDataSpec:
        if self.canaries is not None and (self.layout != "text" or self.stream):
            raise ValueError(f"data.canaries: got layout {self.layout!r}, stream {self.stream}; canaries are inserted "
                             "into a list of training texts (a text_column, not streamed). Fix: remove canaries")
        return self

    @property
    def layout(self) -> str:
        """What the items are: ``text`` (packed into blocks), ``chat`` or ``prompts`` (padded rows)."""
        return "chat" if self.messages_column else "prompts" if self.prompt_column else "text"

    def corpus_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`kdistill.data.lm.lm_corpus` for this section."""
        return self.model_dump(include={"name", "texts", "files", "format", "hf_dataset", "text_column",
                                        "messages_column", "prompt_column", "completion_column", "eval_fraction"})

    def tensor_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`kdistill.data.lm.held_out_tensors` for this section."""
        return {"layout": self.layout, **self.model_dump(include={"block_length", "prompt_tokens", "train_tokens",
                                                                  "eval_tokens"})}

    def text_stream(self) -> TextStream:
        """The streamed corpus of ``stream: true``."""
        from ..data.lm import text_stream

        return text_stream(files=self.files, format=self.format, text_column=self.text_column,
                           eval_fraction=self.eval_fraction)


class LMCacheSpec(StrictModel):
    """Offline teacher targets: ``kdistill cache RECIPE --output DIR`` writes them, ``dir`` uses them. ``mode``:
    ``topk`` keeps the ``k`` most likely tokens per position; ``sampled`` keeps ``k`` tokens drawn from the teacher
    (at ``proposal_temperature``; default: the temperature the method's ``cache_identity`` asks targets to be written
    at), an unbiased forward-KL target of at most ``7 + 3 k`` bytes per token (vocabularies up to 65,536), less when
    the draws repeat (:mod:`kdistill.teachers.cache`)."""

    dir: str
    mode: Literal["topk", "sampled"] = "topk"
    k: int = 32
    proposal_temperature: float | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_size: int = 64

    @model_validator(mode="after")
    def _check_mode(self) -> LMCacheSpec:
        if self.mode == "sampled" and not 1 <= self.k <= 255:
            raise ValueError(f"cache.k: got {self.k} with mode sampled, expected 1-255 draws per token (counts are "
                             "stored in one byte); 24-64 is typical")
        if self.proposal_temperature is not None and (self.mode != "sampled" or not self.proposal_temperature > 0):
            raise ValueError(f"cache.proposal_temperature: got {self.proposal_temperature} with mode {self.mode}; "
                             "expected a positive number and mode: sampled (it is the temperature tokens are drawn "
                             "at). Fix: remove it, or set mode: sampled")
        return self


class LMShiftSpec(FileSource):
    """A second text domain the student never trains on: ``wordnet`` (WordNet glosses), ``kjv`` (the held-out
    verses), ``texts`` or ``files`` (every row of ``text_column``), cut into ``data.block_length``-token blocks up
    to ``tokens``. Every model's perplexity there, and the students' agreement and KL with the teacher, go to the
    report's ``shift``."""

    name: Literal["wordnet", "kjv", "texts", "files"] = "wordnet"
    texts: list[str] = []
    text_column: str = "text"
    tokens: int = 4096

    @model_validator(mode="after")
    def _one_source(self) -> LMShiftSpec:
        if self.name == "files" and (self.files is None) == (self.hf_dataset is None):
            raise ValueError("eval.shift name 'files' needs exactly one of eval.shift.files and eval.shift.hf_dataset")
        if self.name == "texts" and not self.texts:
            raise ValueError("eval.shift name 'texts' needs a non-empty eval.shift.texts list")
        if self.tokens < 1:
            raise ValueError(f"eval.shift.tokens: got {self.tokens}, expected an integer >= 1 (at least one block)")
        return self

    def corpus_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`kdistill.data.lm.shift_texts`."""
        return self.model_dump(include={"name", "texts", "files", "format", "hf_dataset", "text_column"})


class LMAuditSpec(StrictModel):
    """The audits after training (:mod:`kdistill.eval.audit`; ``kdistill audit RUN_DIR`` runs them on a finished run):
    memorisation on ``extraction_samples`` training sequences (a ``prefix_tokens`` prefix, ``continuation_tokens``
    to reproduce), canary exposure among ``canary_candidates`` strings (with ``data.canaries``), and teacher hacking:
    the proxy (KL to the teacher on ``proxy_blocks`` training rows) is logged at every evaluation when
    ``train.eval_every > 0`` and the run is flagged after ``patience`` evaluations."""

    enabled: bool = True
    extraction_samples: int = 32
    prefix_tokens: int = 32
    continuation_tokens: int = 32
    canary_candidates: int = 256
    proxy_blocks: int = 8
    patience: int = 3

    _positive = field_validator("extraction_samples", "prefix_tokens", "continuation_tokens", "proxy_blocks",
                                "patience")(classmethod(lambda cls, v: _at_least(v, 1)))
    _candidates = field_validator("canary_candidates")(classmethod(lambda cls, v: _at_least(v, 2)))


class LMEvalSpec(StrictModel):
    batch_size: int = 8
    agreement_k: int = 64
    generations: int = 3
    prompt_words: int = 8
    max_new_tokens: int = 24
    shift: LMShiftSpec | None = None
    audit: LMAuditSpec = LMAuditSpec()


class LMDesignSpec(DesignSettings):
    """``design:`` of an llm recipe (``kdistill design``; :mod:`kdistill.tasks.llm_design`). ``space``:
    ``{student kind: {field of student: [values]}}``, every combination one candidate (``{layer_subset: {num_layers:
    [2, 4, 6]}, pruned: {target_params: [60000000]}}``); the recipe's other ``student`` fields (e.g.
    ``calibration_batches``) are kept. ``classes``: DisWOT's semantic matrix is taken over the ``classes`` most
    frequent next tokens of the scoring blocks. ``rank_by``: the training-free score that picks the ``top_k``:
    ``diswot`` or ``zero_shot_kl`` (the untrained candidate's KL(teacher || student) on the scoring blocks; meaningful
    for students built from the teacher's weights). ``score_batch_size`` counts blocks. Latency: the median of
    ``latency_repeats`` forwards over ``eval.batch_size`` training blocks."""

    space: dict[str, dict[str, Any]] = {"layer_subset": {"num_layers": [1, 2, 3, 4, 6, 8]}}
    steps: int = 100
    score_batch_size: int = 8
    classes: int = 256
    latency_repeats: int = 5
    rank_by: Literal["diswot", "zero_shot_kl"] = "diswot"

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
        from ..students.design import candidates

        if not v:
            raise ValueError("design.space: got an empty search space; expected {student kind: {field: [values]}}, "
                             "e.g. {layer_subset: {num_layers: [2, 4, 6]}}")
        out: dict[str, dict[str, list[Any]]] = {}
        for kind, args in v.items():
            if not isinstance(args, dict):
                raise ValueError(f"design.space.{kind}: got {args!r}, expected a mapping of student field -> list of "
                                 "values, e.g. {num_layers: [2, 4]}")
            out[kind] = {k: list(x) if isinstance(x, (list, tuple)) else [x] for k, x in args.items()}
            if any(not x for x in out[kind].values()):
                raise ValueError(f"design.space.{kind}: an argument has an empty list; expected at least one value")
        for cand in candidates(out):  # every candidate is a valid `student:` section
            try:
                LMStudentSpec(kind=cand.family, **cand.kwargs)
            except ValidationError as e:
                raise ValueError(f"design.space: candidate {cand.name} is not a valid student: "
                                 f"{e.errors()[0]['msg']} (fields: {', '.join(LMStudentSpec.model_fields)})") from None
        return out


class LLMConfig(StrictModel):
    task: Literal["llm"] = "llm"
    name: str = "llm"
    description: str = ""
    seed: int = 0
    teacher: LMTeacherSpec = LMTeacherSpec()
    teachers: list[LMTeacherSpec] = []
    teacher_weights: list[float] | None = None
    student: LMStudentSpec = LMStudentSpec()
    data: LMDataSpec = LMDataSpec()
    method: MethodSpec = MethodSpec(name=DEFAULT_METHODS["llm"])
    cache: LMCacheSpec | None = None
    train: TrainSpec = TrainSpec(epochs=1, batch_size=8, lr=3e-4, log_every=10)
    baseline: bool = True
    eval: LMEvalSpec = LMEvalSpec()
    design: LMDesignSpec | None = None  # `kdistill design`: the student search space (default: LMDesignSpec())

    @model_validator(mode="after")
    def _check(self) -> LLMConfig:
        method = self.method.build()  # one instance for the checks below (cheap: no shape-dependent parts yet)
        if self.cache is not None and not method.cacheable:
            raise ValueError(f"method {self.method.name!r} is not cacheable (its targets depend on the student); "
                             f"remove `cache:` or use {DEFAULT_METHODS['llm']}")
        if self.cache is not None:
            try:
                method.check_cache_mode(self.cache.mode)
            except KDistillError as e:  # the config layer reports it as this field's error
                raise ValueError(str(e)) from None
        if method.needs_prompts and self.data.prompt_tokens <= 0:
            raise ValueError(f"method {self.method.name!r} continues prompts: set data.prompt_tokens > 0, e.g. 32, "
                             "so each block is (prompt, continuation)")
        if self.teachers:
            if "teacher" in self.model_fields_set:
                raise ValueError("expected one of `teacher:` (one model) and `teachers:` (a list, distilled from the "
                                 "weighted mean of their next-token distributions), not both")
            if len(self.teachers) < 2:
                raise ValueError("teachers: give at least 2 (or use `teacher:` for one)")
            if self.data.sequence_kd is not None:
                raise ValueError("data.sequence_kd samples completions from one teacher; with `teachers:` distil "
                                 "token by token instead (remove sequence_kd)")
        if self.teacher_weights is not None and (len(self.teacher_weights) != len(self.teachers)
                                                 or any(not w > 0 for w in self.teacher_weights)):
            raise ValueError(f"teacher_weights: got {self.teacher_weights}, expected {len(self.teachers)} positive "
                             "numbers, one per entry of `teachers:`")
        if self.data.messages_column is not None and self.cache is not None:
            raise ValueError("cache: top-k caches hold packed text blocks; chat data (data.messages_column) trains "
                             "from the live teacher. Remove `cache:`.")
        if self.data.prompt_tokens >= self.data.block_length - 1:
            raise ValueError(f"data.prompt_tokens ({self.data.prompt_tokens}) must be < block_length - 1")
        if self.data.sequence_kd is not None and (self.data.prompt_tokens <= 0 or self.cache is not None):
            raise ValueError("data.sequence_kd needs data.prompt_tokens > 0 (the prompt the teacher completes) and "
                             "no `cache:` (the cache holds the original text, not the teacher's completions)")
        if self.data.name == "texts" and not self.data.texts:
            raise ValueError("data.name 'texts' needs a non-empty data.texts list")
        if any(t.endpoint for t in self.teachers):
            raise ValueError("teachers: a served teacher (endpoint) cannot be part of a mixture; use `teacher:`")
        if self.teacher.endpoint:
            self._check_served(method)
        if self.student.tokenizer is not None:
            self._check_own_tokenizer(method)
        return self

    def _check_own_tokenizer(self, method: Any) -> None:
        """A student with its own tokenizer: a method that compares across tokenizers, on text blocks."""
        from ..data.align import check_cross_data
        from ..teachers.vocab import cross_tokenizer_error

        d = self.data
        try:
            check_cross_data(layout=d.layout, stream=d.stream, cache=self.cache is not None,
                             sequence_kd=d.sequence_kd is not None, prompt_tokens=d.prompt_tokens)
            if not method.cross_tokenizer:
                raise cross_tokenizer_error()
        except KDistillError as e:
            raise ValueError(str(e)) from None

    def _check_served(self, method: Any) -> None:
        """A teacher over HTTP gives top-k log-probs, not logits or weights: it needs a cache and a student that is
        not built from the teacher."""
        from ..teachers.cache import check_served_temperature

        if self.cache is None:
            raise ValueError("teacher.endpoint: got a served teacher and no `cache:`; training reads the teacher's "
                             "logits at every step, which a server does not give. Fix: add `cache: {dir: DIR, k: 20}` "
                             "and run `kdistill cache RECIPE` first (it scores the training data through the server)")
        if self.cache.mode != "topk":
            raise ValueError(f"cache.mode: got {self.cache.mode!r} with a served teacher (teacher.endpoint); drawing "
                             "tokens needs the teacher's full distribution and a server returns its top-k log-probs. "
                             "Fix: cache.mode: topk")
        if self.student.kind != "pretrained":
            raise ValueError(f"student.kind: got {self.student.kind!r}, which is built from the teacher's weights, "
                             "and the teacher is served (teacher.endpoint). Fix: `student: {pretrained: PATH_OR_ID}`")
        if self.teacher.tokenizer is None and self.student.pretrained is None:
            raise ValueError("teacher.endpoint: no local tokenizer; expected teacher.tokenizer (the served model's "
                             "tokenizer: zoo name, folder or hub id) or student.pretrained")
        try:
            check_served_temperature(method.cache_identity(), self.method.name)
        except KDistillError as e:  # the config layer reports it as this field's error
            raise ValueError(str(e)) from None


# ---------------------------------------------------------------------------------------------- wiring
# Private glue from this schema to the components' flat keyword arguments: no logic of its own.

#: streamed corpora: how many training texts the ``tiny`` test teacher trains its tokenizer on
_TOKENIZER_SAMPLE = 10_000


def _served(cfg: LLMConfig, store: Path | None = None) -> tuple[Any, Any]:
    """``(EndpointScorer, local tokenizer)`` of a served teacher."""
    from ..teachers.api import APITeacher, EndpointScorer
    from ..teachers.lm import load_tokenizer

    t = cfg.teacher
    tok = load_tokenizer(t.tokenizer or cfg.student.pretrained)
    client = APITeacher(t.endpoint, t.model, api_key_env=t.api_key_env, concurrency=t.concurrency,
                        store=str(store) if store is not None else None)
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    return EndpointScorer(client, vocab_size=len(tok), end_id=int(end or 0)), tok


def _teacher(cfg: LLMConfig, tokenizer_texts: Any) -> tuple[nn.Module, Any]:
    from ..teachers.lm import load_lm_teacher, mix_lm_teachers

    if cfg.teacher.endpoint:  # evaluated through the server; trained from the cache (checked at config load)
        from ..teachers.api import ServedLM

        scorer, tok = _served(cfg)
        return ServedLM(scorer, k=cfg.cache.k), tok
    specs = cfg.teachers or [cfg.teacher]
    texts = list(tokenizer_texts) if len(specs) > 1 else tokenizer_texts  # each tiny teacher reads them
    loaded = [load_lm_teacher(s.name, dtype=s.dtype, seed=cfg.seed + i, tokenizer_texts=texts,
                              tiny_vocab_size=s.tiny_vocab_size, tiny_layers=s.tiny_layers,
                              tiny_hidden_size=s.tiny_hidden_size) for i, s in enumerate(specs)]
    if not cfg.teachers:
        return loaded[0]
    return mix_lm_teachers(loaded, names=[s.name for s in specs], weights=cfg.teacher_weights)


def _student(cfg: LLMConfig, teacher: nn.Module, calibration: list[dict[str, Tensor]] | None = None,
             fused_head: bool = False, tokenizer: Any | None = None) -> tuple[nn.Module, Any | None]:
    from ..students.llm import build_lm_student

    s = cfg.student
    return build_lm_student(teacher, kind=s.kind, num_layers=s.num_layers, keep_layers=s.keep_layers,
                            config=s.config, pretrained=s.pretrained, dtype=cfg.teacher.dtype, seed=cfg.seed,
                            prune=s.prune_kwargs() if s.kind == "pruned" else None, calibration=calibration,
                            lora=s.lora.model_dump() if s.lora is not None else None, fused_head=fused_head,
                            tokenizer=tokenizer)


def _corpus(cfg: LLMConfig) -> tuple[Any, list[Any], TextStream | None]:
    """``(train items, held-out items, stream)``; a streamed corpus gives a lazy sample of training texts (for a
    tiny teacher's tokenizer) and the first held-out texts (generation prompts)."""
    if not cfg.data.stream:
        train, held = lm_corpus(**cfg.data.corpus_kwargs())
        if cfg.data.canaries is not None:  # the same texts in the cache, the run and its audit
            train = insert_canaries(train, **cfg.data.canaries.model_dump())
        return train, held, None
    stream = cfg.data.text_stream()
    return (itertools.islice(stream.texts("train"), _TOKENIZER_SAMPLE),
            list(itertools.islice(stream.texts("validation"), cfg.eval.generations)), stream)


def _teacher_name(cfg: LLMConfig) -> str | list[str]:
    return [s.name for s in cfg.teachers] if cfg.teachers else cfg.teacher.name


def _cache_identity(cfg: LLMConfig) -> dict[str, Any]:
    if cfg.teacher.endpoint:
        return {"teacher": f"endpoint:{cfg.teacher.model}"}
    specs = cfg.teachers or [cfg.teacher]
    return {"teacher": "+".join(f"{s.name}/{s.dtype}" for s in specs)
            + (f"@{cfg.teacher_weights}" if cfg.teacher_weights else "")}


def _sequence_kd(cfg: LLMConfig, tok: Any, teacher: nn.Module, train_blocks: Tensor | None, train_items: list[Any],
                 out: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The teacher's stored completions of the training prompts as padded rows (loss on the completions)."""
    from ..data.lm import pad_id_of, prompt_id_tensors, prompt_ids
    from ..eval.metrics import repetition
    from ..teachers.generations import complete_prompts

    P, L, spec = cfg.data.prompt_tokens, cfg.data.block_length, cfg.data.sequence_kd
    rows = train_blocks is None  # (prompt, completion) rows: the file's prompts, completions end at EOS
    prompts = (prompt_ids(tok, [p for p, _ in train_items], prompt_width=P, where="data (train split)") if rows
               else train_blocks[:, :P].tolist())
    store = Path(spec.store) if spec.store else out / "teacher_generations.jsonl"
    records = complete_prompts(store, teacher, tok, prompts, max_new_tokens=L - P, stop_at_eos=rows,
                               sampling_temperature=spec.sampling_temperature, seed=cfg.seed,
                               generation_batch_size=spec.generation_batch_size)
    tensors = prompt_id_tensors([(r["prompt_ids"], r["completion_ids"]) for r in records], prompt_width=P,
                                max_length=L, pad_id=pad_id_of(tok))
    # a small teacher decoding greedily loops: the share of completions that repeat an 8-token span says so
    loops = repetition([r["completion_ids"] for r in records], span=8, n=4)
    info: dict[str, Any] = {"store": str(store), "sequences": len(records),
                            "repeating_completions": loops["repeating"], "distinct_4grams": loops["distinct_ngrams"]}
    if rows:
        info["ended_at_eos"] = sum(r["completion_ids"][-1:] == [tok.eos_token_id] for r in records)
    return tensors, info


# ------------------------------------------------------------------------------------------ entry points

def write_cache(cfg: LLMConfig, output: Path | None = None, *, progress: bool = True) -> Path:
    """Run the teacher once over the training blocks and store its top-k targets (resumable)."""
    from ..teachers.cache import model_fingerprint, targets_temperature, tokenizer_hash, write_topk_cache

    if cfg.cache is None and output is None:
        raise KDistillError("cache: the recipe has no `cache:` section and no --output was given; expected one "
                            "of them to name the cache directory.")
    spec = cfg.cache or LMCacheSpec(dir=str(output))
    out = Path(output) if output is not None else Path(spec.dir)
    train_items, eval_items, stream = _corpus(cfg)
    method = cfg.method.build()
    method.check_cache_mode(spec.mode)  # before the teacher runs: a cache the method cannot use is never written
    kd_t = targets_temperature(method.cache_identity())
    if cfg.teacher.endpoint:
        return _write_served_cache(cfg, spec, out, train_items, eval_items, stream, kd_t, progress)
    rank, world, barrier, device = join_torchrun()  # under torchrun, ranks write disjoint shards
    teacher, tok = _teacher(cfg, corpus_texts(train_items))
    train_blocks = held_out_tensors(tok, train_items, eval_items, stream=stream, **cfg.data.tensor_kwargs())[0]
    fingerprint = model_fingerprint(teacher)  # of the weights as loaded, wherever they run
    teacher.to(device)

    def teacher_fn(ids: Tensor, attn: Tensor) -> Tensor:
        return teacher(input_ids=ids.to(device), attention_mask=attn.to(device)).logits

    def report(done: int, total: int) -> None:
        if progress:
            print(f"[cache] shard {done}/{total}" if world == 1 else f"[cache rank {rank}] shard {done}/{total}",
                  flush=True)

    return write_topk_cache(out, teacher_fn, train_blocks.tolist(), k=spec.k, kd_temperature=kd_t,
                            teacher_fingerprint=fingerprint, tokenizer_hash=tokenizer_hash(tok),
                            vocab_size=int(teacher.config.vocab_size), dtype=spec.dtype, shard_size=spec.shard_size,
                            batch_size=cfg.train.batch_size, pad_id=int(tok.pad_token_id or 0),
                            extra=_cache_identity(cfg), progress=report, mode=spec.mode,
                            proposal_temperature=spec.proposal_temperature, sample_seed=cfg.seed,
                            rank=rank, world_size=world, barrier=barrier)


def _write_served_cache(cfg: LLMConfig, spec: LMCacheSpec, out: Path, train_items: Any, eval_items: Any,
                        stream: Any, kd_t: float, progress: bool) -> Path:
    """:func:`write_cache` for a teacher served over HTTP: every block scored by the server (concurrent requests,
    retries, answers kept in ``<out>/responses.sqlite`` until the cache is complete, so an interrupted run re-sends
    nothing it was answered)."""
    from ..teachers.cache import TopKCache, tokenizer_hash, write_topk_cache

    store = out / "responses.sqlite"
    scorer, tok = _served(cfg, store=store)
    train_blocks = held_out_tensors(tok, train_items, eval_items, stream=stream, **cfg.data.tensor_kwargs())[0]
    probe = scorer.probe(tok, k=spec.k)  # same tokenizer, k allowed, and the model's identity: before any work

    def report(done: int, total: int) -> None:
        if progress:
            print(f"[cache] shard {done}/{total}", flush=True)

    root = write_topk_cache(out, None, train_blocks.tolist(), k=spec.k, kd_temperature=kd_t,
                            teacher_fingerprint=scorer.fingerprint, tokenizer_hash=tokenizer_hash(tok),
                            vocab_size=len(tok), dtype=spec.dtype, shard_size=spec.shard_size,
                            pad_id=int(tok.pad_token_id or 0), extra=_cache_identity(cfg), progress=report,
                            topk_fn=scorer.topk, teacher_probe=probe)
    scorer.teacher.store.close()
    if TopKCache(root, allow_partial=True, verify=False).manifest.get("complete"):
        for f in (store, store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
            f.unlink(missing_ok=True)
    return root


def run_llm(cfg: LLMConfig, ctx: RunContext) -> dict[str, Any]:
    from ..data.align import teacher_view
    from ..students.llm import fused_student_output, plain_student, student_tokenizer
    from ..students.pruning import calibration_batches
    from ..teachers.lm import fused_head_output, has_lm_head, lm_logits
    from ..teachers.vocab import check_vocab

    t_start = time.perf_counter()
    out = ctx.output
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_items, eval_items, stream = _corpus(cfg)
    teacher, tok = _teacher(cfg, corpus_texts(train_items))
    teacher.eval().requires_grad_(False)
    train_blocks, eval_t, train_t = held_out_tensors(tok, train_items, eval_items, stream=stream,
                                                     **cfg.data.tensor_kwargs())

    base_set = TensorDictDataset(**train_t) if train_t is not None else lm_dataset(train_blocks)
    # a pruned student measures importance on the same rows of the training data in every phase
    calib = (calibration_batches(base_set, num_batches=cfg.student.calibration_batches,
                                 batch_size=cfg.train.batch_size) if cfg.student.kind == "pruned" else None)
    main_method = cfg.method.build()
    own_tok = (student_tokenizer(**cfg.student.tokenizer_kwargs(), texts=corpus_texts(train_items))
               if cfg.student.tokenizer is not None else None)
    probe_student, probe_tok = _student(cfg, teacher, calib, fused_head=main_method.fused_head, tokenizer=own_tok)
    plan = check_vocab(teacher, probe_student, tok, probe_tok, cross_tokenizer=main_method.cross_tokenizer,
                       fused_head=main_method.fused_head)
    del probe_student
    s_tok, s_eval_t, vmap = tok, eval_t, None
    if plan.cross:  # the student reads its own tokens of the same texts, aligned by characters (data.align)
        s_tok, vmap, base_set, eval_t, s_eval_t = _cross_data(cfg, tok, probe_tok, train_items, eval_items,
                                                              streamed=stream is not None)

    accelerator = make_accelerator(cfg.train.mixed_precision)
    kd_set, cache, sequences_info = _kd_set(cfg, tok, teacher, main_method, base_set, train_blocks, train_t,
                                            train_items, out)
    selection, select_inputs = None, {}
    if cfg.data.selection is not None:  # distil on a chosen subset (or, DDK, a reweighted draw of the pool)
        selection, select_inputs, _ = _select(cfg, cfg.data.selection, teacher, tok, base_set, cache, train_items,
                                              calib, own_tok, cross=plan.cross)
        if selection.schedule is None:
            same = kd_set is base_set
            base_set = subset_dataset(base_set, selection.indices)
            kd_set = base_set if same else subset_dataset(kd_set, selection.indices)
    loader = make_loader(kd_set, cfg.train.batch_size, seed=cfg.seed)
    base_loader = loader if kd_set is base_set else make_loader(base_set, cfg.train.batch_size, seed=cfg.seed)
    batches = math.ceil(selection.budget / cfg.train.batch_size) if selection and selection.schedule else len(loader)
    total_steps = min(cfg.train.epochs * math.ceil(batches / cfg.train.grad_accum), cfg.train.max_steps or math.inf)
    reweighting: dict[str, Any] = {}

    def teacher_forward(model: nn.Module, batch: dict[str, Any]) -> ModelOutput:
        if main_method.fused_head and plan.is_identity and has_lm_head(model):  # hidden states + head: no logits
            return fused_head_output(model, teacher_view(batch))
        logits = lm_logits(model, teacher_view(batch))  # a cross-tokenizer batch holds the teacher's own tokens
        return ModelOutput(logits if plan.is_identity else plan.align_teacher(logits))

    def student_forward_for(method: Any):
        def student_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor | ModelOutput:
            if method.fused_head and model.training:  # hidden states + LM head: the loss builds logits by chunks
                return fused_student_output(model, batch)
            logits = lm_logits(model, batch)
            return logits if plan.is_identity else plan.align_student(logits)
        return student_forward

    # teacher hacking: the student's KL to the teacher on a few rows it trains on, logged beside held-out perplexity
    proxy = (training_proxy(kd_set.tensors, teacher=teacher, cache=cache,
                            count=cfg.eval.audit.proxy_blocks, k=cfg.eval.agreement_k, seed=cfg.seed,
                            batch_size=cfg.eval.batch_size)
             if cfg.train.eval_every > 0 and cfg.eval.audit.enabled and not plan.cross else None)

    def evaluate(m: nn.Module) -> dict[str, float]:
        metrics = lm_metrics(m, s_eval_t, batch_size=cfg.eval.batch_size)
        if proxy is not None:
            metrics[PROXY] = proxy_kl(m, proxy, batch_size=cfg.eval.batch_size)
        return metrics

    def phase(name: str, method_spec: MethodSpec) -> tuple[nn.Module, float, int, list[dict], dict]:
        pdir, work = out / name, out / "work" / name
        if not ctx.resume and work.exists():
            shutil.rmtree(work)
        method = method_spec.build()
        # same initial weights in both phases
        student = _student(cfg, teacher, calib, fused_head=method.fused_head, tokenizer=own_tok)[0]
        method.set_total_steps(total_steps * cfg.train.grad_accum)
        if vmap is not None:
            method.set_vocab_map(*vmap)
        augment = None
        if method.needs_prompts:  # it rewrites each batch from the current student (on-policy generation)
            pad = int(tok.pad_token_id) if tok.pad_token_id is not None else None

            def augment(batch: dict[str, Any], rng: Any) -> dict[str, Any]:
                return method.prepare_batch(student, batch, pad_id=pad, eos_id=tok.eos_token_id)

        uses_teacher = method.needs_teacher
        train_loader, on_step = base_loader if name == "baseline" else loader, None
        if selection is not None and selection.schedule is not None:  # DDK: domains redrawn as the student learns
            sampler, on_step = reweighting[name] = selection.schedule(select_inputs["example_losses"])
            train_loader = make_loader(base_set if name == "baseline" else kd_set, cfg.train.batch_size,
                                       sampler=sampler)
        res = fit(student=student, method=method, train_loader=train_loader, on_step=on_step,
                  accelerator=accelerator,
                  teacher=teacher if uses_teacher and cache is None else None,
                  teacher_targets=cache.targets if uses_teacher and cache is not None else None,
                  student_forward=student_forward_for(method), teacher_forward=teacher_forward, augment=augment,
                  evaluate=evaluate, output_dir=work, resume=ctx.resume, phase=name, progress=ctx.progress,
                  seed=cfg.seed, **cfg.train.model_dump(exclude={"batch_size", "mixed_precision"}))
        trained = plain_student(res.student)  # LoRA adapters merged into the weights
        if accelerator.is_main_process:
            trained.save_pretrained(pdir)   # a plain Hugging Face folder: weights + config + tokenizer
            s_tok.save_pretrained(pdir)  # the student's own tokenizer (the teacher's unless student.tokenizer)
            write_json_atomic(pdir / "kdistill.json", {"phase": name, "method": method_spec.model_dump(),
                                                       "teacher": _teacher_name(cfg), "steps": res.steps,
                                                       "seconds": res.seconds, "time_shares": res.time_shares})
        return trained, res.seconds, res.steps, res.history, res.time_shares

    phases: dict[str, tuple[nn.Module, float, int, list[dict], dict]] = {}
    if cfg.baseline:
        phases["baseline"] = phase("baseline", MethodSpec(name=ALONE))
    phases["student"] = phase("student", cfg.method)

    entries = evaluate_lm_models(teacher, tok, {n: p[:3] for n, p in phases.items()}, eval_t, eval_items,
                                 batch_size=cfg.eval.batch_size, agreement_k=cfg.eval.agreement_k,
                                 generations=cfg.eval.generations, prompt_words=cfg.eval.prompt_words,
                                 max_new_tokens=cfg.eval.max_new_tokens,
                                 member_names=[s.name for s in cfg.teachers],
                                 student_tokenizer=s_tok if plan.cross else None, student_eval_tensors=s_eval_t)
    report: dict[str, Any] = {"recipe": cfg.name, "task": "llm", "method": cfg.method.name, "seed": cfg.seed,
                              **entries, "agreement": entries["student"]["agreement"], "variants": {}}
    report["teacher"]["model"] = _teacher_name(cfg)
    for name, p in phases.items():  # e.g. generation_share: the share of step time an on-policy method generates
        report[name]["time_shares"] = p[4]
        report[name]["history"] = p[3]
    report["data"] = {"name": cfg.data.name, "format": cfg.data.layout,
                      "train_tokens": int(train_blocks.numel() if train_blocks is not None else train_t["mask"].sum()),
                      "eval_tokens": int(eval_t["mask"].sum()), "block_length": cfg.data.block_length,
                      "cache": cfg.cache.dir if cfg.cache else None, "sequence_kd": sequences_info,
                      "stream": cfg.data.stream}
    if selection is not None:
        report["selection"] = {**selection.summary(),
                               **{f"{n}_reweighting": hook.history for n, (_, hook) in reweighting.items()}}
    report["vocab"] = {"tokenizer_size": plan.tokenizer_size, "student_rows": plan.student_rows,
                       "teacher_rows": plan.teacher_rows, "cross_tokenizer": plan.cross,
                       "student_tokenizer_size": plan.student_tokenizer_size or plan.tokenizer_size}
    audit = None
    if cfg.eval.audit.enabled or cfg.eval.shift is not None:
        audit = _audits(cfg, teacher, tok, {n: (p[0], s_tok) for n, p in phases.items()}, train_blocks, train_t,
                        train_items, report, history=phases["student"][3],
                        log_rows=read_log(out / "work" / "student" / "metrics.jsonl"),
                        log_term=main_method.teacher_divergence_term, shift=cfg.eval.shift,
                        samples=cfg.eval.audit.extraction_samples, full=cfg.eval.audit.enabled)
        if "teacher" in audit["shift"]:
            report["shift"] = {k: v for k, v in audit["shift"].items() if k != "held_out"}
        if cfg.eval.audit.enabled:
            report["audits"] = {k: v for k, v in audit.items() if k != "shift"}
    report["wall_seconds"] = time.perf_counter() - t_start
    if accelerator.is_main_process:
        if audit is not None:
            write_teacher_hacking_plot(audit, out)
        write_report(report, out, curves={n: phases[n][3] for n in phases}, metric="perplexity",
                     extra_md=lm_report_markdown(report) + ("\n\n" + audit_markdown(audit) if audit else ""))
    return report


def audit_run(cfg: LLMConfig, run_dir: Path, *, samples: int = 64) -> dict[str, Any]:
    """``kdistill audit RUN_DIR`` on an llm run: its students (the run folder's ``student`` / ``baseline``), report,
    evaluation history and training log are read back; the teacher and the data are rebuilt from the config; the
    shift is measured on ``eval.shift``, or on WordNet glosses when the run configured no shift."""
    from ..eval.audit import read_history
    from ..teachers.lm import load_causal_lm

    report = json.loads((run_dir / "report.json").read_text())
    train_items, eval_items, stream = _corpus(cfg)
    teacher, tok = _teacher(cfg, corpus_texts(train_items))
    teacher.eval().requires_grad_(False)
    train_blocks, _, train_t = held_out_tensors(tok, train_items, eval_items, stream=stream,
                                                **cfg.data.tensor_kwargs())
    students = {n: load_causal_lm(str(run_dir / n)) for n in ("baseline", "student") if (run_dir / n).is_dir()}
    work = run_dir / "work" / "student"
    main_method = cfg.method.build()
    return _audits(cfg, teacher, tok, students, train_blocks, train_t, train_items, report,
                   history=report["student"].get("history") or read_history(work / "checkpoints"),
                   log_rows=read_log(work / "metrics.jsonl"), log_term=main_method.teacher_divergence_term,
                   shift=cfg.eval.shift or LMShiftSpec(), samples=samples)


def _audits(cfg: LLMConfig, teacher: nn.Module, tok: Any, students: dict[str, tuple[nn.Module, Any]],
            train_blocks: Tensor | None, train_t: dict[str, Tensor] | None, train_items: Any, report: dict[str, Any],
            *, shift: LMShiftSpec | None, samples: int, full: bool = True, **logged: Any) -> dict[str, Any]:
    """:func:`kdistill.eval.audit.lm_run_audits` on this run's models (``{name: (model, tokenizer)}``) and data;
    ``logged``: the student's ``history``, ``log_rows`` and the method's ``log_term``."""
    from ..data.lm import canary_texts, shift_texts
    from ..eval.audit import held_out_entries, lm_run_audits, training_sequences

    a = cfg.eval.audit
    return lm_run_audits(
        teacher=teacher, tokenizer=tok, students=students, train_sequences=training_sequences(train_blocks, train_t),
        train_texts=lambda: corpus_texts(train_items), block_length=cfg.data.block_length,
        train_tokens=cfg.data.train_tokens, held_out=held_out_entries(report),
        shift_texts=shift_texts(**shift.corpus_kwargs()) if shift else None, shift_name=shift.name if shift else "",
        shift_tokens=shift.tokens if shift else 0, agreement_k=cfg.eval.agreement_k, full=full,
        batch_size=cfg.eval.batch_size, extraction_samples=samples, prefix_tokens=a.prefix_tokens,
        continuation_tokens=a.continuation_tokens, canary_candidates=a.canary_candidates, patience=a.patience,
        seed=cfg.seed, **logged,
        canaries=canary_texts(**cfg.data.canaries.model_dump(exclude={"repeats"})) if cfg.data.canaries else ())


def _cross_data(cfg: LLMConfig, tok: Any, student_tok: Any, train_items: list[Any], eval_items: list[Any], *,
                streamed: bool) -> tuple[Any, Any, Any, dict[str, Tensor], dict[str, Tensor]]:
    """A student with its own tokenizer: ``(its tokenizer, vocabulary map, training set, teacher held-out tensors,
    student held-out tensors)``, both tokenizations of the same texts aligned by characters."""
    from ..data.align import check_cross_data, cross_tensors, vocab_map

    check_cross_data(layout=cfg.data.layout, stream=streamed, cache=cfg.cache is not None,
                     sequence_kd=cfg.data.sequence_kd is not None, prompt_tokens=cfg.data.prompt_tokens)
    cross_t, eval_t, s_eval_t = cross_tensors(student_tok, tok, train_items, eval_items,
                                              block_length=cfg.data.block_length,
                                              train_tokens=cfg.data.train_tokens, eval_tokens=cfg.data.eval_tokens,
                                              layout=cfg.data.layout, prompt_tokens=cfg.data.prompt_tokens)
    return student_tok, vocab_map(student_tok, tok), TensorDictDataset(**cross_t), eval_t, s_eval_t


def _select(cfg: LLMConfig, spec: SelectionSpec, teacher: nn.Module, tok: Any, base_set: Any, cache: Any,
            train_items: Any, calib: Any, own_tok: Any, *, cross: bool) -> tuple[Any, dict[str, Any], str]:
    """``(selection, its inputs, pool fingerprint)`` over the training rows of ``base_set``: teacher and reference
    log-likelihoods (the top-k cache's when it was written at temperature 1), per-row losses and the rows' domains
    (``spec.domain_column`` or ``spec.groups``)."""
    from ..data.selection import corpus_item_domains, pool_fingerprint, select_training_subset
    from ..train.selection import lm_domains, lm_inputs

    if cross:
        raise KDistillError("data.selection: the student reads its own tokenization of the texts (student.tokenizer "
                            "or a pretrained student with another vocabulary), so teacher and student rows differ; "
                            "expected a student with the teacher's tokenizer. Fix: remove data.selection.")
    d = cfg.data
    rows = base_set.tensors

    def domains() -> tuple[Tensor, list[str]]:
        labels = corpus_item_domains(name=d.name, items=train_items, groups=spec.groups,
                                     domain_column=spec.domain_column, files=d.files, format=d.format,
                                     hf_dataset=d.hf_dataset, eval_fraction=d.eval_fraction)
        return lm_domains(tokenizer=tok, items=train_items, labels=labels, layout=d.layout,
                          block_length=d.block_length, train_tokens=d.train_tokens, pool_size=len(base_set))

    inputs = lm_inputs(teacher=teacher, tensors=rows, batch_size=cfg.eval.batch_size, cache=cache,
                       build_student=lambda: _student(cfg, teacher, calib, tokenizer=own_tok)[0],
                       train_batch_size=cfg.train.batch_size, lr=cfg.train.lr, seed=cfg.seed, domains=domains)
    pool = pool_fingerprint(rows["input_ids"], rows["labels"])
    return select_training_subset(**spec.entry_kwargs(), n=len(base_set), seed=cfg.seed, pool=pool,
                                  **inputs), inputs, pool


def select_llm(cfg: LLMConfig, output: Path, progress: bool = True) -> dict[str, Any]:
    """``kdistill select`` for an llm recipe: the teacher, the training rows (and the recipe's top-k cache when it
    exists), then the subset of ``data.selection`` (default: MiniPLM at 50%) written to ``output``."""
    from ..data.selection import write_subset
    from ..students.pruning import calibration_batches
    from ..teachers.cache import MANIFEST
    from ..train.selection import cache_has_log_likelihood

    train_items, eval_items, stream = _corpus(cfg)
    teacher, tok = _teacher(cfg, corpus_texts(train_items))
    teacher.eval().requires_grad_(False)
    train_blocks, _, train_t = held_out_tensors(tok, train_items, eval_items, stream=stream, **cfg.data.tensor_kwargs())
    base_set = TensorDictDataset(**train_t) if train_t is not None else lm_dataset(train_blocks)
    calib = (calibration_batches(base_set, num_batches=cfg.student.calibration_batches,
                                 batch_size=cfg.train.batch_size) if cfg.student.kind == "pruned" else None)
    main_method = cfg.method.build()
    cache = None
    if cfg.cache is not None and (Path(cfg.cache.dir) / MANIFEST).is_file():
        cache = _kd_set(cfg, tok, teacher, main_method, base_set, train_blocks, train_t, train_items, output)[1]
    spec = cfg.data.selection or SelectionSpec(method=DEFAULT_SELECTORS["llm"])
    selection, _, pool = _select(cfg, spec, teacher, tok, base_set, cache, train_items, calib, None,
                                 cross=cfg.student.tokenizer is not None)
    ids = base_set.tensors["input_ids"]
    write_subset(output, selection, pool=pool, describe=lambda i: tok.decode(ids[i][:48].tolist()))
    return {"output": str(output), "teacher_log_likelihood_from_cache": cache_has_log_likelihood(cache),
            **selection.summary()}


def _kd_set(cfg: LLMConfig, tok: Any, teacher: nn.Module, method: Any, base_set: Any, train_blocks: Tensor | None,
            train_t: dict[str, Tensor] | None, train_items: list[Any], out: Path) -> tuple[Any, Any, dict | None]:
    """``(dataset, top-k cache or None, sequence-KD info or None)`` of the distilled student: the cached targets,
    the teacher's completions (sequence-level KD), the prompt/continuation blocks, or the baseline's own data (the
    baseline always learns next-token CE on the original data: every position of the text blocks, or the file's
    replies / completions)."""
    from ..data.lm import cache_dataset
    from ..teachers.cache import open_topk_cache

    if cfg.cache is not None:
        served = {"endpoint": teacher.scorer} if cfg.teacher.endpoint else {"teacher": teacher}
        cache = open_topk_cache(cfg.cache.dir, tokenizer=tok, train_blocks=train_blocks, **served,
                                k=cfg.cache.k, dtype=cfg.cache.dtype, mode=cfg.cache.mode,
                                proposal_temperature=cfg.cache.proposal_temperature,
                                identity={**method.cache_identity(), **_cache_identity(cfg)})
        return cache_dataset(cache), cache, None
    if cfg.data.sequence_kd is not None:
        seq_t, info = _sequence_kd(cfg, tok, teacher, train_blocks, train_items, out)
        return TensorDictDataset(**seq_t), None, info
    if train_t is not None or cfg.data.prompt_tokens == 0:
        return base_set, None, None
    return lm_dataset(train_blocks, prompt_length=cfg.data.prompt_tokens), None, None


def _design_llm(cfg: LLMConfig, output: Path, **kwargs: Any) -> dict[str, Any]:
    from .llm_design import design_llm

    return design_llm(cfg, output, **kwargs)


TASKS.register("llm")(Task("llm", LLMConfig, run_llm,
                           "causal LM teacher -> smaller causal LM (token-level / top-k cached / on-policy KD)",
                           select=select_llm, design=_design_llm))
