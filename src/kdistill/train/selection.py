"""The models data selection scores with (:mod:`kdistill.data.selection`): the lazy inputs a task hands to
:func:`~kdistill.data.selection.select_training_subset`.

* :func:`classifier_inputs`: the teacher's probabilities on the pool, a proxy student trained (by the task's own
  training function) on the teacher's targets of a seed slice, and both models on augmented views;
* :func:`lm_inputs`: per-document mean log-likelihood under the teacher (read from a top-k cache written at
  ``kd_temperature`` 1 when there is one, else one teacher pass), under a reference LM (given, or trained here on a
  slice), and per-example losses for DDK;
* :func:`text_inputs`: for a black-box teacher, a TF-IDF proxy student trained on the answers to a seed slice of
  queries (the answers stay in the response store, so the pipeline re-reads them without new requests).

Every input is a closure computed only when a strategy asks for it; a proxy trained for one seed slice is reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import KDistillError


def _memo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Remember the result for each tuple of tensor / plain arguments (a proxy trained for a seed slice is reused)."""
    seen: dict[Any, Any] = {}

    def key(x: Any) -> Any:
        return tuple(x.tolist()) if isinstance(x, Tensor) else x

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        k = (tuple(key(a) for a in args), tuple(sorted((n, key(v)) for n, v in kwargs.items())))
        if k not in seen:
            seen[k] = fn(*args, **kwargs)
        return seen[k]

    return wrapped


# -------------------------------------------------------------------------------------- classification

def classifier_inputs(*, teacher: nn.Module, x: Tensor, train_proxy: Callable[[Tensor], nn.Module],
                      y: Tensor | None = None, initial_student: Callable[[], nn.Module] | None = None,
                      domains: Sequence[str] | None = None, batch_size: int = 1024,
                      view_strength: float = 1.0) -> dict[str, Callable[..., Any]]:
    """Inputs over a pool of classifier inputs ``x`` ``(N, ...)``: ``teacher_probs``, ``proxy_probs`` (a student
    trained by ``train_proxy(indices)`` on those examples), ``view_probs`` (label-preserving augmentations of
    :mod:`kdistill.data.hard_augment`: noise, shift, scale, mask, one op per view in turn; float inputs only), and,
    given the labels ``y``, ``example_losses`` (per-example cross-entropy of the teacher, of ``initial_student()``,
    or of a model in training) and ``domains`` (``domains``: the domain of each example; without them a strategy
    that asks gets one error naming the setting)."""
    from ..data.hard_augment import OPS, _augment
    from ..models.classifiers import predict_logits

    @_memo
    def teacher_probs() -> Tensor:
        return torch.softmax(predict_logits(teacher, x, batch_size).float(), -1)

    proxy = _memo(train_proxy)

    def proxy_probs(indices: Tensor) -> tuple[Tensor, Tensor]:
        student = proxy(indices)
        return torch.softmax(predict_logits(student, x, batch_size).float(), -1), teacher_probs()[indices]

    def view_probs(indices: Tensor, views: int, seed: int) -> tuple[Tensor, Tensor]:
        if x.is_floating_point() is False:
            raise KDistillError("kd3: augmented views perturb input vectors, which token ids are not; expected float "
                                "inputs. Fix: use pcoreset, rad or random for text data.")
        student = proxy(indices)
        rng = np.random.default_rng([int(seed), 11])
        ts, ss = [], []
        for v in range(views):
            xv = torch.cat([_augment(x[i:i + batch_size], OPS[v % len(OPS)], rng, view_strength)
                            for i in range(0, len(x), batch_size)])
            ts.append(torch.softmax(predict_logits(teacher, xv, batch_size).float(), -1))
            ss.append(torch.softmax(predict_logits(student, xv, batch_size).float(), -1))
        return torch.stack(ts), torch.stack(ss)

    out: dict[str, Callable[..., Any]] = {"teacher_probs": teacher_probs, "proxy_probs": proxy_probs,
                                          "view_probs": view_probs}
    if y is not None and initial_student is not None:
        initial = _memo(initial_student)

        def example_losses(model: Any, indices: Tensor) -> Tensor:
            m = teacher if model is None else initial() if isinstance(model, str) else model
            logits = predict_logits(m, x[indices], batch_size).float()
            return torch.nn.functional.cross_entropy(logits, y[indices].to(logits.device), reduction="none")

        out["example_losses"] = example_losses

    def pool_domains() -> tuple[Tensor, list[str]]:
        from ..data.selection import domain_ids

        if domains is None:
            raise KDistillError("data.selection: this strategy needs the domain of every training example, and the "
                                "data has none. Fix: give your own files (data.files) with a column naming each "
                                "row's domain, as data.selection.domain_column.")
        if len(domains) != len(x):
            raise KDistillError(f"data.selection: got {len(domains)} domains for {len(x)} training examples; "
                                "expected one per example.")
        return domain_ids(domains)

    out["domains"] = _memo(pool_domains)
    return out


# ------------------------------------------------------------------------------------------------ LMs

@torch.no_grad()
def sequence_log_likelihood(model: nn.Module, tensors: Mapping[str, Tensor], *, batch_size: int,
                            indices: Tensor | None = None) -> Tensor:
    """Mean next-token log-likelihood of each row ``(N,)`` of LM tensors (``input_ids``, ``attention_mask``,
    ``labels``; the positions of ``mask``), in eval mode; a row with no predicted token gets NaN."""
    from ..capture import device_of
    from ..data.lm import label_mask

    was = model.training
    model.eval()
    rows = torch.arange(len(tensors["input_ids"])) if indices is None else indices.long()
    dev = device_of(model)
    out = []
    try:
        for b in range(0, len(rows), batch_size):
            r = rows[b:b + batch_size]
            ids, attn, labels = (tensors[k][r].to(dev) for k in ("input_ids", "attention_mask", "labels"))
            mask = label_mask(labels)
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
            tok = lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            n = mask.sum(1)
            out.append(torch.where(n > 0, (tok * mask).sum(1) / n.clamp_min(1), torch.full_like(n, math.nan,
                                                                                                  dtype=tok.dtype)))
    finally:
        model.train(was)
    return torch.cat(out).double().cpu() if out else torch.zeros(0, dtype=torch.float64)


def cache_has_log_likelihood(cache: Any) -> bool:
    """Whether a top-k cache holds the teacher's own log-probs (top-k targets written at ``kd_temperature`` 1; a
    sampled cache holds drawn tokens, no log-probs)."""
    return cache is not None and cache.mode == "topk" and abs(float(cache.kd_temperature) - 1.0) <= 1e-9


def cache_log_likelihood(cache: Any) -> Tensor | None:
    """Per-sequence mean teacher log-likelihood read off a top-k cache (no teacher pass), or None when the cache was
    written at a temperature other than 1 (its log-probs are then not the teacher's). Exact where the next token is
    among the top k; otherwise the residual mass is taken as spread evenly over the other ``V - k`` tokens (the
    same reading top-k distillation makes of it)."""
    if not cache_has_log_likelihood(cache):
        return None
    vocab = int(cache.manifest.get("vocab_size") or 0)
    out = []
    for i in range(len(cache)):
        b = cache.collate([cache[i]])
        labels, mask = b["labels"][0], b["mask"][0]
        lp, idx, res = b["topk_logprobs"][0].float(), b["topk_indices"][0], b["log_residual"][0].float()
        hit = idx == labels.clamp_min(0).unsqueeze(-1)
        inside = (lp * hit).sum(-1)
        k = idx.shape[-1]
        outside = res - math.log(max(vocab - k, 1))
        tok = torch.where(hit.any(-1), inside, outside)
        n = int(mask.sum())
        out.append(float((tok * mask).sum()) / n if n else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def train_lm(model: nn.Module, tensors: Mapping[str, Tensor], indices: Tensor, *, epochs: int, batch_size: int,
             lr: float, seed: int) -> nn.Module:
    """``model`` trained with next-token cross-entropy on rows ``indices`` of LM tensors (the shared loop, the
    ``none`` method), quietly; returns the trained model."""
    from ..config import ALONE
    from ..data.loaders import TensorDictDataset, make_loader
    from ..registry import METHODS
    from ..teachers.lm import lm_logits
    from .loop import fit, make_accelerator

    data = TensorDictDataset(**{k: v[indices.long()] for k, v in tensors.items()})
    res = fit(student=model, method=METHODS.get(ALONE)(), train_loader=make_loader(data, batch_size, seed=seed),
              accelerator=make_accelerator("no"), student_forward=lm_logits, progress=False, seed=seed,
              epochs=epochs, lr=lr, schedule="cosine", log_every=10**9)
    return res.student


def lm_inputs(*, teacher: nn.Module, tensors: Mapping[str, Tensor], batch_size: int,
              build_student: Callable[[], nn.Module], cache: Any = None, train_batch_size: int = 8,
              lr: float = 3e-4, seed: int = 0, domains: Callable[[], tuple[Tensor, list[str]]] | None = None
              ) -> dict[str, Callable[..., Any]]:
    """Inputs over a pool of LM rows (``tensors``: the training blocks or padded rows): ``teacher_log_likelihood``
    (the cache's when it can serve, else one teacher pass), ``reference_log_likelihood`` (a given causal LM, which
    must share the teacher's tokenizer, or ``build_student()`` trained here on a slice for ``reference_epochs``),
    ``example_losses`` (per-row mean cross-entropy of the teacher, the initial student, or a model in training) and
    ``domains`` as given."""
    from ..teachers.lm import load_causal_lm

    @_memo
    def teacher_log_likelihood() -> Tensor:
        from_cache = cache_log_likelihood(cache) if cache is not None else None
        return from_cache if from_cache is not None else sequence_log_likelihood(teacher, tensors,
                                                                                 batch_size=batch_size)

    def reference_log_likelihood(*, name: str | None, train_indices: Tensor | None, epochs: int = 3) -> Tensor:
        if name is not None:
            model, _ = load_causal_lm(name)
            vocab = int(model.get_output_embeddings().weight.shape[0])
            top = int(tensors["input_ids"].max()) + 1
            if vocab < top:
                raise KDistillError(f"data.selection.reference {name!r}: its vocabulary has {vocab} rows, the "
                                    f"training data uses token ids up to {top - 1}; expected a model with the "
                                    "teacher's tokenizer. Fix: give a reference of the teacher's family, or leave "
                                    "reference out to train one here.")
        else:
            assert train_indices is not None
            model = train_lm(build_student(), tensors, train_indices, epochs=epochs, batch_size=train_batch_size,
                             lr=lr, seed=seed)
        return sequence_log_likelihood(model, tensors, batch_size=batch_size)

    initial = _memo(build_student)

    def example_losses(model: Any, indices: Tensor) -> Tensor:
        m = teacher if model is None else initial() if isinstance(model, str) else model
        return -sequence_log_likelihood(m, tensors, batch_size=batch_size, indices=indices)

    out: dict[str, Callable[..., Any]] = {"teacher_log_likelihood": teacher_log_likelihood,
                                          "reference_log_likelihood": reference_log_likelihood,
                                          "example_losses": example_losses}
    if domains is not None:
        out["domains"] = _memo(domains)
    return out


def lm_domains(*, tokenizer: Any, items: Sequence[Any], labels: Sequence[str], layout: str, block_length: int,
               train_tokens: int, pool_size: int) -> tuple[Tensor, list[str]]:
    """Domain ids of the LM training pool: one per packed block (its majority domain) for text, one per row for
    chat / prompt rows; checked to cover the pool exactly. Only the domains present in the pool are named."""
    from ..data.lm import corpus_texts, tokenize_texts
    from ..data.selection import block_domains, domain_ids, drop_empty_domains

    if len(labels) != len(items):
        raise KDistillError(f"data.selection: got {len(labels)} domain labels for {len(items)} training texts; "
                            "expected one per text.")
    ids, names = domain_ids(labels)
    if layout == "text":
        ids = block_domains(tokenize_texts(tokenizer, corpus_texts(items)), ids.tolist(), block_length=block_length,
                            eos_id=tokenizer.eos_token_id, max_blocks=max(1, train_tokens // block_length),
                            num_domains=len(names))
    if len(ids) != pool_size:
        raise KDistillError(f"data.selection: the domains cover {len(ids)} training rows, the pool has {pool_size}; "
                            "expected the same packing (a bug, or data that changed between the two reads).")
    return drop_empty_domains(ids, names)


# ----------------------------------------------------------------------------------------- black box

def text_inputs(*, texts: Sequence[str], class_names: Sequence[str], teacher: Any,
                label_kwargs: Mapping[str, Any] | None = None, student_kwargs: Mapping[str, Any] | None = None,
                seed: int = 0) -> dict[str, Callable[..., Any]]:
    """Inputs over a pool of texts labelled by a black-box teacher: ``proxy_probs(indices)`` queries the teacher on
    those texts only (``blackbox.label.label``; answers kept in its store), trains the TF-IDF student on the usable
    answers and returns its probabilities on every text with the teacher's soft labels of the queried ones (uniform
    where the answer was unusable)."""
    from ..blackbox.label import label
    from ..blackbox.student import TextStudent

    C = len(class_names)

    @_memo
    def proxy_probs(indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = indices.tolist()
        res = label([texts[i] for i in idx], list(class_names), teacher, seed=seed, **dict(label_kwargs or {}))
        keep, q = res.targets(C, "soft")
        teacher_rows = torch.full((len(idx), C), 1.0 / C)
        if keep:
            teacher_rows[keep] = torch.as_tensor(q)
        if len(keep) == 0:
            raise KDistillError("data.selection: the teacher gave no usable answer to the seed queries; expected at "
                                "least one to train a proxy student on. Check the teacher (see its answers in the "
                                "response store) or use method random.")
        st = TextStudent(C, seed=seed, **dict(student_kwargs or {}))
        st.fit([texts[idx[j]] for j in keep], q)
        return torch.as_tensor(st.predict_proba(list(texts))), teacher_rows

    return {"proxy_probs": proxy_probs}
