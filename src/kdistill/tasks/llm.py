"""Task ``llm``: distil a causal language model into a smaller one on a text corpus.

Flow: teacher + tokenizer (zoo name, folder or hub id; or ``tiny`` for tests) -> student (layer-subset
copy or smaller config, same tokenizer) -> vocabulary check -> training blocks (fixed length, no padding)
-> optional offline top-k cache (``cache: DIR`` written by ``kdistill cache``; then the teacher is never
run on the training data) -> baseline (same student, cross-entropy only, same steps) and the distilled
student through :func:`kdistill.train.loop.fit` -> held-out perplexity, teacher-student top-1 agreement
and KL, a few greedy generations side by side -> ``report.json`` / ``report.md`` -> the students as
Hugging Face folders (``save_pretrained`` + tokenizer) under ``<output>/student`` and ``<output>/baseline``.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import Tensor, nn

from ..capture import device_of
from ..config import ALONE, DEFAULT_METHODS, FileSource, MethodSpec, StrictModel, TrainSpec
from ..data.lm import cache_dataset, label_mask, lm_dataset, lm_tensors, pack_blocks, tokenize_texts
from ..data.loaders import TensorDictDataset, make_loader
from ..errors import KDistillError
from ..eval.report import write_report
from ..io import write_json_atomic
from ..losses.topk import teacher_topk, topk_loss
from ..methods.base import ModelOutput
from ..models.classifiers import count_params
from ..registry import METHODS, TASKS
from ..train.loop import fit, make_accelerator
from .base import RunContext, Task


class LMTeacherSpec(StrictModel):
    """``name``: a zoo entry (``smollm2-135m``), a local folder or a hub id; ``tiny`` builds a random tiny
    Llama and trains a BPE tokenizer on the training texts (tests, CI)."""

    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"
    tiny_vocab_size: int = 512
    tiny_layers: int = 4
    tiny_hidden_size: int = 64


class LMStudentSpec(StrictModel):
    """``layer_subset``: ``num_layers`` evenly spaced (or ``keep_layers``) of the teacher, weights copied;
    ``smaller_config``: fresh model with ``config`` overrides (e.g. ``{num_hidden_layers: 4}``)."""

    kind: Literal["layer_subset", "smaller_config", "pretrained"] = "layer_subset"
    num_layers: int | None = 6
    keep_layers: list[int] | None = None
    config: dict[str, Any] = {}
    pretrained: str | None = None

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
        return self


class SequenceKDSpec(StrictModel):
    """Sequence-level KD: the teacher completes the first ``data.prompt_tokens`` tokens of every training
    block once (stored at ``store``, default ``<output>/teacher_generations.jsonl``, resumable) and the
    student trains on prompt + teacher completion (loss on the completion tokens)."""

    store: str | None = None
    sampling_temperature: float = 0.0


class LMDataSpec(FileSource):
    """``kjv``: the King James Bible (Debian ``bible-kjv``), held-out = the last verses (Revelation end);
    ``texts``: the strings in ``texts`` (tests); ``files``: your own data (``data: {files: ..., text_column: ...}``
    or ``hf_dataset: {path: ...}``): a ``text_column`` of documents, packed into ``block_length``-token blocks like
    the others, or a ``messages_column`` of chat conversations (``[{role, content}, ...]``), each formatted with the
    tokenizer's chat template and trained on its assistant tokens only. Held-out rows: a ``validation`` file, or
    ``eval_fraction`` of the rows (seeded)."""

    name: Literal["kjv", "texts", "files"] = "kjv"
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
        if self.prompt_column is not None and (self.prompt_tokens < 1 or self.sequence_kd is not None):
            raise ValueError("data.prompt_column: set data.prompt_tokens (the longest prompt, in tokens; prompts are "
                             "left-padded to it); sequence_kd does not take prompt rows yet (remove it)")
        return self


class LMCacheSpec(StrictModel):
    """Offline top-k teacher targets: ``kdistill cache RECIPE --output DIR`` writes them, ``dir`` uses them."""

    dir: str
    k: int = 32
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_size: int = 64


class LMEvalSpec(StrictModel):
    batch_size: int = 8
    agreement_k: int = 64
    generations: int = 3
    prompt_words: int = 8
    max_new_tokens: int = 24


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

    @model_validator(mode="after")
    def _check(self) -> LLMConfig:
        cls = METHODS.get(self.method.name)
        if self.cache is not None and not cls.cacheable:
            raise ValueError(f"method {self.method.name!r} is not cacheable (its targets depend on the student); "
                             f"remove `cache:` or use {DEFAULT_METHODS['llm']}")
        if cls.needs_prompts and self.data.prompt_tokens <= 0:
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
        return self


# ------------------------------------------------------------------------------------------ building

def load_teacher(cfg: LLMConfig, train_texts: list[str]) -> tuple[nn.Module, Any]:
    """The teacher and its tokenizer; with ``teachers:`` their mixture (one tokenizer, checked)."""
    if not cfg.teachers:
        return _load_one_teacher(cfg.teacher, seed=cfg.seed, train_texts=train_texts)
    from ..teachers.cache import tokenizer_hash
    from ..teachers.mixture import LMTeacherMixture

    loaded = [_load_one_teacher(spec, seed=cfg.seed + i, train_texts=train_texts)
              for i, spec in enumerate(cfg.teachers)]
    hashes = {tokenizer_hash(tok) for _, tok in loaded}
    if len(hashes) != 1:
        raise KDistillError(f"teachers: {[s.name for s in cfg.teachers]} use different tokenizers; expected one "
                            "tokenizer for all (their next-token distributions are averaged entry by entry).")
    return LMTeacherMixture([m for m, _ in loaded], cfg.teacher_weights).eval(), loaded[0][1]


def _load_one_teacher(spec: LMTeacherSpec, *, seed: int, train_texts: list[str]) -> tuple[nn.Module, Any]:
    if spec.name == "tiny":
        from ..teachers.tiny import tiny_llama, train_tokenizer

        tok = train_tokenizer(train_texts, vocab_size=spec.tiny_vocab_size)
        model = tiny_llama(len(tok), hidden_size=spec.tiny_hidden_size, num_layers=spec.tiny_layers,
                           seed=seed, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
        return model.eval(), tok
    from ..teachers.lm import load_causal_lm

    return load_causal_lm(spec.name, dtype=spec.dtype)


def build_student(cfg: LLMConfig, teacher: nn.Module) -> nn.Module:
    return student_and_tokenizer(cfg, teacher)[0]


def student_and_tokenizer(cfg: LLMConfig, teacher: nn.Module) -> tuple[nn.Module, Any | None]:
    """The student at its initial weights (the same every call), and a pretrained student's own tokenizer (to be
    checked against the teacher's; None when the student is built from the teacher and shares its tokenizer)."""
    from ..students.llm import layer_subset_copy, smaller_config_student

    torch.manual_seed(cfg.seed)
    if cfg.student.kind == "pretrained":
        from ..teachers.lm import load_causal_lm

        return load_causal_lm(cfg.student.pretrained, dtype=cfg.teacher.dtype, eval_mode=False)
    source = getattr(teacher, "base", teacher)  # several teachers: the student is built from the first
    if cfg.student.kind == "layer_subset":
        return layer_subset_copy(source, keep_layers=cfg.student.keep_layers,
                                 num_layers=cfg.student.num_layers), None
    return smaller_config_student(source, seed=cfg.seed, **cfg.student.config), None


def corpus(cfg: LLMConfig) -> tuple[list[Any], list[Any]]:
    """(train items, held-out items): texts, or conversations with ``data.messages_column``. For the built-in
    corpora the held-out part is the *end* of the corpus (never shuffled in); for files, a ``validation`` file or
    a seeded ``eval_fraction`` of the rows."""
    if cfg.data.name == "files":
        return _file_corpus(cfg.data)
    if cfg.data.name == "kjv":
        from ..data.text import kjv_verses

        texts = [v[3] for v in kjv_verses()]
    else:
        texts = list(cfg.data.texts)
    n_eval = max(1, int(round(len(texts) * cfg.data.eval_fraction)))
    if n_eval >= len(texts):
        raise KDistillError(f"data: {len(texts)} texts leave nothing to train on with eval_fraction "
                            f"{cfg.data.eval_fraction}; expected more texts or a smaller fraction.")
    return texts[:-n_eval], texts[-n_eval:]


def _file_corpus(spec: LMDataSpec) -> tuple[list[Any], list[Any]]:
    from ..data.files import load_rows
    from ..data.lm import check_conversation

    column = spec.messages_column or spec.prompt_column or spec.text_column
    rows = load_rows(files=spec.files, format=spec.format, hf_dataset=spec.hf_dataset,
                     validation_fraction=spec.eval_fraction, test_fraction=0.0, seed=0,
                     columns=[column, spec.completion_column])
    out = []
    for split in ("train", "validation"):
        items = []
        for i, row in enumerate(rows[split], start=1):
            where = f"data ({split} split), row {i}, column {column!r}"
            if spec.prompt_column is not None:
                pair = (row[spec.prompt_column], row[spec.completion_column])
                if not all(isinstance(x, str) for x in pair):
                    raise KDistillError(f"{where}: got prompt {pair[0]!r} and completion {pair[1]!r}, expected two "
                                        "texts.")
                items.append(pair)
            elif spec.messages_column is not None:
                items.append(check_conversation(row[column], where))
            elif not isinstance(row[column], str):
                raise KDistillError(f"{where}: got {type(row[column]).__name__}, expected a text string. For chat "
                                    "conversations set data.messages_column instead of text_column.")
            else:
                items.append(row[column])
        out.append(items)
    return out[0], out[1]


def texts_of(items: list[Any]) -> list[str]:
    """Plain texts of corpus items (a conversation's turns are joined), e.g. to train a tiny tokenizer on."""
    return [x if isinstance(x, str) else " ".join(x) if isinstance(x, tuple) else "\n".join(m["content"] for m in x)
            for x in items]


def row_tensors(cfg: LLMConfig, tok: Any, items: list[Any], split: str) -> dict[str, Tensor]:
    """Padded LM tensors of chat conversations or (prompt, completion) rows, labels on what the student learns."""
    from ..data.lm import chat_tensors, prompt_tensors

    L, where = cfg.data.block_length, f"data ({split} split)"
    if cfg.data.messages_column is not None:
        return chat_tensors(tok, items, max_length=L, where=where)
    return prompt_tensors(tok, items, prompt_width=cfg.data.prompt_tokens, max_length=L, where=where)


def held_out_tensors(cfg: LLMConfig, tok: Any, train_items: list[Any] | None, eval_items: list[Any]
                     ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor] | None]:
    """``(train_blocks, eval_tensors, train_tensors)``: packed blocks of text (``train_tensors`` None), or for chat
    and prompt rows no blocks and padded rows. ``train_items`` None builds the held-out tensors alone."""
    if cfg.data.messages_column is not None or cfg.data.prompt_column is not None:
        train_t = row_tensors(cfg, tok, train_items, "train") if train_items is not None else None
        return None, row_tensors(cfg, tok, eval_items, "validation"), train_t
    if train_items is None:
        return None, lm_tensors(_blocks(cfg, tok, eval_items, cfg.data.eval_tokens)), None
    train_blocks, eval_blocks = token_blocks(cfg, tok, train_items, eval_items)
    return train_blocks, lm_tensors(eval_blocks), None


def token_blocks(cfg: LLMConfig, tok: Any, train_texts: list[str], eval_texts: list[str]) -> tuple[Tensor, Tensor]:
    """(training blocks, held-out blocks) of ``block_length`` tokens, within the recipe's token budgets."""
    return _blocks(cfg, tok, train_texts, cfg.data.train_tokens), _blocks(cfg, tok, eval_texts, cfg.data.eval_tokens)


def _blocks(cfg: LLMConfig, tok: Any, texts: list[str], tokens: int) -> Tensor:
    L = cfg.data.block_length
    return pack_blocks(tokenize_texts(tok, texts), L, eos_id=tok.eos_token_id, max_blocks=max(1, tokens // L))


def hf_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def fused_student_output(model: nn.Module, batch: dict[str, Any]) -> ModelOutput:
    """Final hidden states and LM head of a Hugging Face causal LM, without computing its logits."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = model.get_output_embeddings()
    return ModelOutput(None, extra={"hidden": hidden, "lm_head_weight": head.weight,
                                    "lm_head_bias": getattr(head, "bias", None)})


def report_teacher_name(cfg: LLMConfig) -> str | list[str]:
    return [s.name for s in cfg.teachers] if cfg.teachers else cfg.teacher.name


def cache_identity(cfg: LLMConfig) -> dict[str, Any]:
    specs = cfg.teachers or [cfg.teacher]
    return {"teacher": "+".join(f"{s.name}/{s.dtype}" for s in specs)
            + (f"@{cfg.teacher_weights}" if cfg.teacher_weights else "")}


# ---------------------------------------------------------------------------------------- evaluation

def _eval_batches(data: dict[str, Tensor], batch_size: int, device: torch.device):
    """``(input_ids, attention_mask, labels, mask)`` batches of held-out LM tensors on ``device``."""
    n = len(data["input_ids"])
    for b in range(0, n, batch_size):
        ids, attn, labels = (data[k][b:b + batch_size].to(device) for k in ("input_ids", "attention_mask", "labels"))
        yield ids, attn, labels, label_mask(labels)


@torch.no_grad()
def teacher_eval_targets(teacher: nn.Module, data: dict[str, Tensor], *, k: int, batch_size: int) -> dict[str, Any]:
    """Teacher perplexity on held-out LM tensors (the positions of ``mask``) plus its top-k log-probs there
    (T = 1), one entry per batch of ``batch_size`` rows, for agreement / KL."""
    nll, count, topk = 0.0, 0, []
    for ids, attn, labels, mask in _eval_batches(data, batch_size, device_of(teacher)):
        logits = teacher(input_ids=ids, attention_mask=attn).logits.float()[mask]
        lp_all = torch.log_softmax(logits, -1)
        nll += float(-lp_all.gather(-1, labels[mask].unsqueeze(-1)).sum())
        count += int(mask.sum())
        topk.append(tuple(x.cpu() for x in teacher_topk(logits, k=min(k, logits.shape[-1]))))
    return {"perplexity": math.exp(nll / count), "loss": nll / count, "topk": topk, "batch_size": batch_size}


@torch.no_grad()
def lm_metrics(model: nn.Module, data: dict[str, Tensor] | Tensor, *, batch_size: int,
               teacher_targets: dict[str, Any] | None = None) -> dict[str, float]:
    """Held-out ``perplexity`` / ``loss`` (mean next-token CE over the positions of ``mask``; ``data`` may also be
    a ``(N, L)`` tensor of text blocks), and with teacher targets the top-1 agreement and the KL(teacher ||
    student) on the teacher's top-k coarsened distributions (a lower bound of the full KL, exact when k = V)."""
    if isinstance(data, Tensor):
        data = lm_tensors(data)
    if teacher_targets is not None and teacher_targets["batch_size"] != batch_size:
        raise KDistillError(f"lm_metrics: teacher targets were made in batches of {teacher_targets['batch_size']}, "
                            f"got batch_size {batch_size}; expected the same.")
    was = model.training
    model.eval()
    nll, count, agree, kl = 0.0, 0, 0.0, 0.0
    for i, (ids, attn, labels, mask) in enumerate(_eval_batches(data, batch_size, device_of(model))):
        logits = model(input_ids=ids, attention_mask=attn).logits.float()[mask]
        lp = torch.log_softmax(logits, -1)
        nll += float(-lp.gather(-1, labels[mask].unsqueeze(-1)).sum())
        count += int(mask.sum())
        if teacher_targets is not None:
            tlp, tidx, tres = (x.to(logits.device) for x in teacher_targets["topk"][i])
            agree += float((logits.argmax(-1) == tidx[..., 0]).float().sum())
            kl += float(topk_loss(logits, tlp, tidx, tres).sum())
    model.train(was)
    out = {"perplexity": math.exp(nll / count), "loss": nll / count}
    if teacher_targets is not None:
        out["top1_agreement"] = agree / count
        out["kl_teacher_student_topk"] = kl / count
    return out


def generation_prompt(tokenizer: Any, item: Any, prompt_words: int) -> str:
    """The text a generation starts from: a held-out text's first words, or a conversation up to its first
    assistant turn, formatted by the chat template with the generation prompt."""
    if isinstance(item, str):
        return " ".join(item.split()[:prompt_words])
    if isinstance(item, tuple):  # (prompt, completion)
        return item[0]
    first = next(i for i, m in enumerate(item) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(item[:first], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_texts(model: nn.Module, tok: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    was = model.training
    model.eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device=device_of(model))
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was)
    return outs


def _latency_ms(model: nn.Module, ids: Tensor, repeats: int = 5) -> float:
    from ..eval.metrics import latency_ms

    was = model.training
    model.eval()
    try:
        ids_on = ids.to(device_of(model))
        return latency_ms(lambda: model(input_ids=ids_on), repeats=repeats, warmup=1)
    finally:
        model.train(was)


def _params(model: nn.Module) -> int:
    return count_params(model)  # parameters() already yields tied weights (embeddings / LM head) once


# ------------------------------------------------------------------------------------------------ run

def open_cache(cache_dir: str | Path, *, tokenizer: Any, train_blocks: Tensor, teacher: nn.Module, k: int, dtype: str,
               identity: dict[str, Any]):
    """The top-k cache in ``cache_dir``, refused unless it was written for this tokenizer, data, teacher (its
    fingerprint: config plus a strided sample and sum of every weight, milliseconds) and ``identity`` (the
    method's :meth:`~kdistill.methods.base.Method.cache_identity` and the teacher's name)."""
    from ..teachers.cache import TopKCache, data_hash, expected_identity, model_fingerprint, tokenizer_hash

    expect = {"tokenizer_hash": tokenizer_hash(tokenizer), "k": k, "dtype": dtype,
              "data_hash": data_hash(train_blocks.tolist()), "teacher_fingerprint": model_fingerprint(teacher),
              **expected_identity(identity)}
    return TopKCache(cache_dir, expect=expect)


def write_cache(cfg: LLMConfig, output: Path | None = None, *, progress: bool = True) -> Path:
    """Run the teacher once over the training blocks and store its top-k targets (resumable)."""
    from ..teachers.cache import model_fingerprint, targets_temperature, tokenizer_hash, write_topk_cache

    if cfg.cache is None and output is None:
        raise KDistillError("cache: the recipe has no `cache:` section and no --output was given; expected one "
                            "of them to name the cache directory.")
    spec = cfg.cache or LMCacheSpec(dir=str(output))
    out = Path(output) if output is not None else Path(spec.dir)
    train_texts, eval_texts = corpus(cfg)
    teacher, tok = load_teacher(cfg, texts_of(train_texts))
    train_blocks, _ = token_blocks(cfg, tok, train_texts, eval_texts)
    kd_t = targets_temperature(METHODS.get(cfg.method.name)(**cfg.method.kwargs).cache_identity())

    def teacher_fn(ids: Tensor, attn: Tensor) -> Tensor:
        return teacher(input_ids=ids, attention_mask=attn).logits

    def report(done: int, total: int) -> None:
        if progress:
            print(f"[cache] shard {done}/{total}", flush=True)

    return write_topk_cache(out, teacher_fn, train_blocks.tolist(), k=spec.k, kd_temperature=kd_t,
                            teacher_fingerprint=model_fingerprint(teacher), tokenizer_hash=tokenizer_hash(tok),
                            vocab_size=int(teacher.config.vocab_size), dtype=spec.dtype, shard_size=spec.shard_size,
                            batch_size=cfg.train.batch_size, pad_id=int(tok.pad_token_id or 0),
                            extra=cache_identity(cfg), progress=report)


def run_llm(cfg: LLMConfig, ctx: RunContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = ctx.output
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_items, eval_items = corpus(cfg)
    teacher, tok = load_teacher(cfg, texts_of(train_items))
    teacher.eval().requires_grad_(False)
    train_blocks, eval_t, train_t = held_out_tensors(cfg, tok, train_items, eval_items)

    from ..teachers.vocab import check_vocab

    probe_student, probe_tok = student_and_tokenizer(cfg, teacher)
    plan = check_vocab(teacher, probe_student, tok, probe_tok)
    del probe_student

    accelerator = make_accelerator(cfg.train.mixed_precision)
    main_method = METHODS.get(cfg.method.name)(**cfg.method.kwargs)
    cache = None
    if cfg.cache is not None:
        cache = open_cache(cfg.cache.dir, tokenizer=tok, train_blocks=train_blocks, teacher=teacher, k=cfg.cache.k,
                           dtype=cfg.cache.dtype, identity={**main_method.cache_identity(), **cache_identity(cfg)})
    dataset, sequences_info = training_set(cfg, tok, teacher, train_blocks, train_t, cache, out)
    loader = make_loader(dataset, cfg.train.batch_size, seed=cfg.seed)
    # the baseline always learns next-token CE on the original text blocks (every position counts)
    plain = (cache is None and cfg.data.sequence_kd is None and cfg.data.prompt_tokens == 0) or train_t is not None
    base_loader = loader if plain else make_loader(lm_dataset(train_blocks), cfg.train.batch_size, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    def teacher_forward(model: nn.Module, batch: dict[str, Any]) -> ModelOutput:
        logits = hf_forward(model, batch)
        return ModelOutput(logits if plan.is_identity else plan.align_teacher(logits))

    if main_method.fused_head and not plan.is_identity:
        raise KDistillError(f"method {cfg.method.name!r} as configured reads the student's hidden states and LM "
                            "head (a fused head), which needs identical teacher and student vocabularies (no padded "
                            "rows); configure it without the fused head.")

    def student_forward_for(method: Any):
        def student_forward(model: nn.Module, batch: dict[str, Any]) -> Tensor | ModelOutput:
            if method.fused_head and model.training:  # hidden states + LM head: the loss builds logits by chunks
                return fused_student_output(model, batch)
            logits = hf_forward(model, batch)
            return logits if plan.is_identity else plan.align_student(logits)
        return student_forward

    def evaluate(m: nn.Module) -> dict[str, float]:
        return lm_metrics(m, eval_t, batch_size=cfg.eval.batch_size)

    def phase(name: str, method_spec: MethodSpec) -> tuple[nn.Module, list[dict], float, int]:
        pdir, work = out / name, out / "work" / name
        if not ctx.resume and work.exists():
            shutil.rmtree(work)
        student = build_student(cfg, teacher)   # the same initial weights for baseline and student
        method = METHODS.get(method_spec.name)(**method_spec.kwargs)
        method.set_total_steps(total_steps * cfg.train.grad_accum)
        augment = None
        if method.needs_prompts:  # it rewrites each batch from the current student (on-policy generation)
            pad = int(tok.pad_token_id) if tok.pad_token_id is not None else None

            def augment(batch: dict[str, Any], rng: Any) -> dict[str, Any]:
                return method.prepare_batch(student, batch, pad_id=pad, eos_id=tok.eos_token_id)

        uses_teacher = method.needs_teacher
        res = fit(student=student, method=method, train_loader=base_loader if name == "baseline" else loader,
                  accelerator=accelerator,
                  teacher=teacher if uses_teacher and cache is None else None,
                  teacher_targets=cache.targets if uses_teacher and cache is not None else None,
                  student_forward=student_forward_for(method), teacher_forward=teacher_forward, augment=augment,
                  evaluate=evaluate, output_dir=work, resume=ctx.resume, phase=name, progress=ctx.progress,
                  seed=cfg.seed, **cfg.train.model_dump(exclude={"batch_size", "mixed_precision"}))
        if accelerator.is_main_process:
            res.student.save_pretrained(pdir)   # a plain Hugging Face folder: weights + config + tokenizer
            tok.save_pretrained(pdir)
            write_json_atomic(pdir / "kdistill.json", {"phase": name, "method": method_spec.model_dump(),
                                                       "teacher": report_teacher_name(cfg), "steps": res.steps,
                                                       "seconds": res.seconds})
        return res.student, res.history, res.seconds, res.steps

    phases: dict[str, tuple[nn.Module, list[dict], float, int]] = {}
    if cfg.baseline:
        phases["baseline"] = phase("baseline", MethodSpec(name=ALONE))
    phases["student"] = phase("student", cfg.method)

    report = evaluate_phases(cfg, teacher, tok, phases, eval_t, eval_items)
    report["data"] = {"name": cfg.data.name, "format": ("chat" if cfg.data.messages_column else "prompts"
                                                        if cfg.data.prompt_column else "text"),
                      "train_tokens": int(train_blocks.numel()) if train_blocks is not None
                      else int(train_t["mask"].sum()),
                      "eval_tokens": int(eval_t["mask"].sum()), "block_length": cfg.data.block_length,
                      "cache": cfg.cache.dir if cfg.cache else None, "sequence_kd": sequences_info}
    report["vocab"] = {"tokenizer_size": plan.tokenizer_size, "student_rows": plan.student_rows,
                       "teacher_rows": plan.teacher_rows}
    report["wall_seconds"] = time.perf_counter() - t_start
    if accelerator.is_main_process:
        write_report(report, out, curves={n: phases[n][1] for n in phases}, metric="perplexity",
                     extra_md=report_markdown(report))
    return report


def training_set(cfg: LLMConfig, tok: Any, teacher: nn.Module, train_blocks: Tensor | None,
                 train_t: dict[str, Tensor] | None, cache: Any, out: Path) -> tuple[Any, dict[str, Any] | None]:
    """``(dataset, sequence-KD info)``: cached top-k targets, the teacher's stored completions of the blocks'
    prompts (sequence-level KD), chat conversations, or text blocks (with ``prompt_tokens``: prompt data)."""
    if cache is not None:
        return cache_dataset(cache), None
    if cfg.data.sequence_kd is not None:
        from ..teachers.cache import model_fingerprint, tokenizer_hash
        from ..teachers.generations import generate_store

        P, spec = cfg.data.prompt_tokens, cfg.data.sequence_kd
        store = Path(spec.store) if spec.store else out / "teacher_generations.jsonl"
        records = generate_store(store, teacher, train_blocks[:, :P].tolist(),
                                 max_new_tokens=cfg.data.block_length - P,
                                 sampling_temperature=spec.sampling_temperature, seed=cfg.seed,
                                 teacher_fingerprint=model_fingerprint(teacher), tokenizer_hash=tokenizer_hash(tok),
                                 pad_id=tok.pad_token_id)
        seq_blocks = torch.tensor([r["prompt_ids"] + r["completion_ids"] for r in records], dtype=torch.long)
        return lm_dataset(seq_blocks, prompt_length=P), {"store": str(store), "sequences": len(records)}
    if train_t is not None:  # chat or (prompt, completion) rows: padded, loss on the replies / completions
        return TensorDictDataset(**train_t), None
    return lm_dataset(train_blocks, prompt_length=cfg.data.prompt_tokens), None


def evaluate_phases(cfg: LLMConfig, teacher: nn.Module, tok: Any, phases: dict[str, tuple], eval_t: dict[str, Tensor],
                    eval_items: list[Any]) -> dict[str, Any]:
    """The report's model entries: held-out perplexity of teacher, baseline and student, the students' top-1
    agreement and top-k KL with the teacher, latency, and a few greedy generations side by side."""
    tt = teacher_eval_targets(teacher, eval_t, k=cfg.eval.agreement_k, batch_size=cfg.eval.batch_size)
    lat_ids = eval_t["input_ids"][:1]

    def entry(model: nn.Module, secs: float, steps: int) -> dict[str, Any]:
        m = lm_metrics(model, eval_t, batch_size=cfg.eval.batch_size, teacher_targets=tt)
        agreement = {k: m.pop(k) for k in ("top1_agreement", "kl_teacher_student_topk")}
        return {"params": _params(model), "metrics": m, "agreement": agreement, "train_seconds": secs,
                "steps": steps, "latency_ms": _latency_ms(model, lat_ids)}

    student_entry = entry(*[phases["student"][i] for i in (0, 2, 3)])
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": "llm", "method": cfg.method.name, "seed": cfg.seed,
        "teacher": {"params": _params(teacher), "metrics": {"perplexity": tt["perplexity"], "loss": tt["loss"]},
                    "latency_ms": _latency_ms(teacher, lat_ids),
                    "model": report_teacher_name(cfg)},
        "student": student_entry, "agreement": student_entry["agreement"], "variants": {},
    }
    if "baseline" in phases:
        report["baseline"] = entry(*[phases["baseline"][i] for i in (0, 2, 3)])
    if hasattr(teacher, "mixture"):  # several teachers: each one's held-out figures beside the mixture's
        report["teacher"]["weights"] = teacher.weights.tolist()
        report["teacher"]["members"] = [
            {"model": spec.name, "params": _params(member),
             "metrics": lm_metrics(member, eval_t, batch_size=cfg.eval.batch_size)}
            for spec, member in zip(cfg.teachers, teacher.mixture.teachers)]
    prompts = [generation_prompt(tok, item, cfg.eval.prompt_words) for item in eval_items[: cfg.eval.generations]]
    gens = {"teacher": generate_texts(teacher, tok, prompts, cfg.eval.max_new_tokens)}
    gens.update({name: generate_texts(phases[name][0], tok, prompts, cfg.eval.max_new_tokens) for name in phases})
    report["generations"] = [{"prompt": p, **{k: v[i] for k, v in gens.items()}} for i, p in enumerate(prompts)]
    return report


def report_markdown(report: dict[str, Any]) -> str:
    """The llm task's report.md sections: held-out language modelling and the generations."""
    md = ["## Held-out language modelling", "", "| model | perplexity | top-1 agreement | KL(t‖s), top-k | params |",
          "|---|---:|---:|---:|---:|",
          f"| teacher | {report['teacher']['metrics']['perplexity']:.3f} | | | {report['teacher']['params']:,} |"]
    for name in [n for n in ("baseline", "student") if n in report]:
        e = report[name]
        md.append(f"| {name} | {e['metrics']['perplexity']:.3f} | {e['agreement']['top1_agreement']:.4f} | "
                  f"{e['agreement']['kl_teacher_student_topk']:.4f} | {e['params']:,} |")
    md += ["", "## Generations (greedy)", ""]
    for g in report["generations"]:
        md.append(f"**prompt:** {g['prompt']}")
        md += [f"- *{k}*: {v!r}" for k, v in g.items() if k != "prompt"]
        md.append("")
    return "\n".join(md)


TASKS.register("llm")(Task("llm", LLMConfig, run_llm,
                           "causal LM teacher -> smaller causal LM (token-level / top-k cached / on-policy KD)"))
