"""Audits of a distillation run: teacher hacking, memorisation, interpolation vs extrapolation.

* **Teacher hacking** (On Teacher Hacking in Language Model Distillation, Tiapkin et al., 2025): a student can keep
  getting closer to the teacher on the training prompts (the *proxy*: student-teacher KL there) while getting
  worse at the real task (the *golden* metric: held-out perplexity). :func:`teacher_hacking` flags a history where,
  after the golden metric's best evaluation, the golden metric rises for ``patience`` evaluations while the proxy
  keeps falling, and names the step where that starts. The llm task logs the proxy (:data:`PROXY`, from
  :func:`proxy_targets` + :func:`proxy_kl` on a fixed slice of training blocks) beside the held-out perplexity at
  every evaluation when ``train.eval_every > 0``.
* **Memorisation** (Memorization Dynamics in Knowledge Distillation, 2026; extraction as in Extracting
  Training Data from Large Language Models, Carlini et al., 2021): :func:`extraction_rate` is the share of sampled
  training sequences whose next ``m`` tokens greedy decoding reproduces exactly from their first ``k``. Greedy
  decoding reproduces them exactly if and only if, fed the true sequence, the model's argmax at each of those ``m``
  positions is the true next token (as long as it matches, greedy decoding sees exactly the true text), so one
  teacher-forced forward pass decides it. :func:`canary_exposure` is the exposure of an inserted random canary
  (The Secret Sharer, Carlini et al., 2019): ``log2 |R| - log2 rank`` of the canary among ``|R|`` strings of the
  same format, ranked by the model's likelihood; ``log2 |R|`` = the canary is the model's favourite, ~1 = chance.
* **Interpolation vs extrapolation** (Evaluating Interpolation and Extrapolation in Knowledge Distillation): the
  same metrics on held-out data near the training distribution and on a shifted domain (:func:`shift_metrics`,
  :func:`extrapolation`: each model's perplexity as a multiple of the teacher's on each); for classifiers,
  teacher-student agreement on mixup inputs (inside the training data's hull) vs noise-shifted inputs
  (:func:`hull_agreement`).

Every function takes flat arguments; :func:`lm_audits` assembles the llm audit (used by the llm task after training
and by ``kdistill audit RUN_DIR``), :func:`write_audit` writes ``audit.json`` / ``audit.md`` /
``audit_teacher_hacking.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import device_of
from ..data.lm import CANARY_PREFIX, canary_text, label_mask
from ..errors import KDistillError
from ..io import write_bytes_atomic, write_json_atomic
from ..losses.reduce import masked_mean
from ..losses.topk import teacher_topk, topk_loss
from .lm import lm_metrics, teacher_eval_targets

#: the teacher-hacking proxy the llm task logs: top-k KL(teacher || student) on a fixed slice of training blocks
PROXY = "train_kl_topk"
#: the golden metric it is compared with: held-out perplexity
GOLDEN = "perplexity"


# ------------------------------------------------------------------------------------------ teacher hacking

def teacher_hacking(history: Sequence[Mapping[str, Any]], *, proxy: str = PROXY, golden: str = GOLDEN,
                    patience: int = 3, min_change: float = 0.01) -> dict[str, Any]:
    """Flag teacher hacking in an evaluation ``history`` (``[{"step", proxy, golden, ...}, ...]``, lower = better
    for both): an evaluation where the golden metric is at its best so far, followed by ``patience`` evaluations
    that are all more than ``min_change`` (relative) above it while the proxy falls by more than ``min_change``
    over the same span. ``step`` is the first such evaluation: from there the student moves towards the teacher on
    its training data and away from the held-out data. The episode lasts until the golden metric is back at that
    best (``episode_end``; ``recovered`` says whether it got there). A golden metric that keeps falling, or one that
    rises while the proxy rises too (ordinary over-fitting), is not flagged."""
    if patience < 1 or not min_change >= 0:
        raise KDistillError(f"teacher_hacking: got patience {patience}, min_change {min_change}; expected patience "
                            ">= 1 and min_change >= 0.")
    pts = [(int(h["step"]), float(h[proxy]), float(h[golden])) for h in history
           if proxy in h and golden in h and math.isfinite(float(h[proxy])) and math.isfinite(float(h[golden]))]
    out: dict[str, Any] = {"flagged": False, "step": None, "proxy": proxy, "golden": golden, "patience": patience,
                           "min_change": min_change, "evaluations": len(pts)}
    if len(pts) < patience + 2:
        out["reason"] = (f"{len(pts)} evaluations hold both {proxy!r} and {golden!r}; at least {patience + 2} are "
                         "needed (set train.eval_every so that the run evaluates more often)")
        return out
    steps, p, g = (list(x) for x in zip(*pts))
    overfit = None
    for t in range(len(g) - patience):
        if g[t] > min(g[:t + 1]):
            continue  # not the best so far
        window = range(t + 1, t + 1 + patience)
        if not all(g[i] > g[t] * (1 + min_change) for i in window):
            continue
        if not p[t + patience] < p[t] - min_change * abs(p[t]):
            overfit = overfit if overfit is not None else t  # the golden metric rose, the proxy did not fall
            continue
        back = next((i for i in range(t + patience + 1, len(g)) if g[i] <= g[t]), None)
        span = range(t, back if back is not None else len(g))
        peak = max(span, key=lambda i: g[i])
        out.update(flagged=True, step=steps[t], golden_best=g[t], golden_peak=g[peak], peak_step=steps[peak],
                   proxy_at_best=p[t], proxy_at_peak=p[peak], recovered=back is not None,
                   episode_end=steps[back] if back is not None else steps[-1], golden_last=g[-1], proxy_last=p[-1])
        out["reason"] = (f"after step {steps[t]} {golden} rose from {g[t]:.4g} to {g[peak]:.4g} (step {steps[peak]}) "
                         f"while {proxy} fell from {p[t]:.4g} to {p[peak]:.4g}"
                         + (f"; {golden} was back at its step-{steps[t]} value by step {steps[back]}"
                            if back is not None else "; it had not recovered by the last evaluation"))
        return out
    best = int(np.argmin(g))
    out.update(best_step=steps[best], golden_best=g[best], golden_last=g[-1], proxy_at_best=p[best],
               proxy_last=p[-1])
    if overfit is not None:
        out["reason"] = (f"{golden} rose after step {steps[overfit]}, but {proxy} did not fall with it: "
                         "over-fitting, not teacher hacking")
    else:
        out["reason"] = (f"{golden} never rose for {patience} evaluations above its best so far (best: step "
                         f"{steps[best]}, {g[best]:.4g})")
    return out


def proxy_from_log(history: Sequence[Mapping[str, Any]], log_rows: Sequence[Mapping[str, Any]], *, term: str
                   ) -> tuple[list[dict[str, Any]], str]:
    """A stand-in proxy for runs that logged none: each evaluation of ``history`` gets the mean of the training
    loss term ``term`` over the ``metrics.jsonl`` rows logged since the previous evaluation, as ``train_<term>``.
    Returns ``(history with it, its name)``; evaluations with no log row in their interval are left out."""
    name = f"train_{term}"
    rows = sorted((int(r["step"]), float(r[term])) for r in log_rows if term in r and "step" in r)
    out, prev = [], -1
    for h in sorted(history, key=lambda h: int(h["step"])):
        vals = [v for s, v in rows if prev < s <= int(h["step"])]
        prev = int(h["step"])
        if vals:
            out.append({**h, name: float(np.mean(vals))})
    return out, name


def plot_teacher_hacking(history: Sequence[Mapping[str, Any]], path: str | Path, *, proxy: str = PROXY,
                         golden: str = GOLDEN, step: int | None = None, title: str = "") -> None:
    """The proxy and the golden metric over the optimizer steps (two axes), with the flagged step marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h.get(proxy), h.get(golden)) for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    gp = [(s, g) for s, _, g in pts if g is not None]
    pp = [(s, p) for s, p, _ in pts if p is not None]
    if gp:
        ax.plot(*zip(*gp), color="tab:red", marker=".", label=f"golden: held-out {golden}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"held-out {golden}", color="tab:red")
    ax2 = ax.twinx()
    if pp:
        ax2.plot(*zip(*pp), color="tab:blue", marker=".", label=f"proxy: {proxy}")
    ax2.set_ylabel(f"proxy: {proxy}", color="tab:blue")
    if step is not None:
        ax.axvline(step, color="k", ls="--", lw=1, label=f"teacher hacking from step {step}")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper center")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Teacher hacking audit")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())


def sample_rows(tensors: Mapping[str, Tensor], *, count: int, seed: int = 0) -> dict[str, Tensor]:
    """``count`` rows (all when fewer) of aligned tensors, drawn without replacement (seeded), in index order."""
    n = len(next(iter(tensors.values())))
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))
    index = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[index] for k, v in tensors.items()}


@torch.no_grad()
def proxy_targets(rows: Mapping[str, Tensor], *, teacher: nn.Module | None = None, k: int = 64,
                  kd_temperature: float = 1.0, batch_size: int = 8) -> dict[str, Any]:
    """The teacher's top-``k`` targets on a few training rows (LM tensors ``input_ids``, ``attention_mask``,
    ``labels``), computed once: taken from the rows when they hold a top-k cache's ``topk_logprobs`` /
    ``topk_indices`` / ``log_residual`` (at the cache's ``kd_temperature``), else from ``teacher`` at
    ``kd_temperature``."""
    out: dict[str, Any] = {key: rows[key] for key in ("input_ids", "attention_mask", "labels")}
    out["kd_temperature"] = float(kd_temperature)
    if "topk_logprobs" in rows:
        out.update({key: rows[key] for key in ("topk_logprobs", "topk_indices", "log_residual")})
        return out
    if teacher is None:
        raise KDistillError("proxy_targets: the rows hold no cached top-k targets and no teacher was given; expected "
                            "one of them.")
    parts: list[tuple[Tensor, ...]] = []
    dev = device_of(teacher)
    for b in range(0, len(out["input_ids"]), batch_size):
        ids, attn = out["input_ids"][b:b + batch_size].to(dev), out["attention_mask"][b:b + batch_size].to(dev)
        logits = teacher(input_ids=ids, attention_mask=attn).logits.float()
        parts.append(tuple(x.cpu() for x in teacher_topk(logits, k=min(k, logits.shape[-1]),
                                                         kd_temperature=kd_temperature)))
    out["topk_logprobs"], out["topk_indices"], out["log_residual"] = (torch.cat(x) for x in zip(*parts))
    return out


@torch.no_grad()
def proxy_kl(model: nn.Module, targets: Mapping[str, Any], *, batch_size: int = 8) -> float:
    """KL(teacher || student) on the teacher's top-k coarsened distributions (:func:`kdistill.losses.topk.topk_loss`)
    at the targets' temperature, averaged over the predicted positions of :func:`proxy_targets`' rows."""
    was = model.training
    model.eval()
    dev = device_of(model)
    total, count = 0.0, 0
    for b in range(0, len(targets["input_ids"]), batch_size):
        sl = {key: targets[key][b:b + batch_size].to(dev) for key in
              ("input_ids", "attention_mask", "labels", "topk_logprobs", "topk_indices", "log_residual")}
        logits = model(input_ids=sl["input_ids"], attention_mask=sl["attention_mask"]).logits.float()
        mask = label_mask(sl["labels"])
        per_token = topk_loss(logits, sl["topk_logprobs"], sl["topk_indices"].long(), sl["log_residual"],
                              divergence="forward_kl", kd_temperature=targets["kd_temperature"])
        total += float(masked_mean(per_token, mask)) * int(mask.sum())
        count += int(mask.sum())
    model.train(was)
    return total / max(count, 1)


def training_proxy(rows: Mapping[str, Tensor], *, teacher: nn.Module | None, cache: Any = None, count: int = 8,
                   k: int = 64, seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """:func:`proxy_targets` on ``count`` rows of the training tensors (seeded): the top-k cache's targets when the
    run trains from one (``cache``, a :class:`~kdistill.teachers.cache.TopKCache`, and ``rows`` its dataset's
    tensors, at its temperature), else the teacher's, at the cache's temperature when it holds sampled targets
    (no top-k to reuse) and at T = 1 without a cache."""
    picked = sample_rows(rows, count=count, seed=seed)
    if cache is not None and "topk_logprobs" in picked:
        return proxy_targets(picked, k=k, kd_temperature=cache.kd_temperature, batch_size=batch_size)
    return proxy_targets(picked, teacher=teacher, k=k, batch_size=batch_size,
                         kd_temperature=cache.kd_temperature if cache is not None else 1.0)


def read_history(checkpoints: str | Path) -> list[dict[str, Any]]:
    """The evaluation history stored in a phase's newest checkpoint (``work/<phase>/checkpoints``), read from its
    JSON part alone (no weights loaded); ``[]`` when there is none."""
    from ..train.checkpoint import CheckpointManager, unflatten_state

    latest = CheckpointManager(checkpoints).latest()
    if latest is None:
        return []
    try:
        state = json.loads((latest / "state.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return []
    for key, value in state.get("__dict__", []):
        if key == "history":
            return list(unflatten_state(value, {}))
    return []


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (``[]`` when the file is missing)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ memorisation

def training_sequences(blocks: Tensor | None, rows: Mapping[str, Tensor] | None = None) -> list[list[int]]:
    """Token lists of the training data: each packed block, or each padded row without its padding."""
    if blocks is not None:
        return blocks.tolist()
    if rows is None:
        raise KDistillError("training_sequences: expected training blocks or padded rows, got neither.")
    return [ids[attn.bool()].tolist() for ids, attn in zip(rows["input_ids"], rows["attention_mask"])]


def extraction_window(sequences: Sequence[Sequence[int]], *, prefix_tokens: int, continuation_tokens: int
                      ) -> tuple[int, int, str | None]:
    """``(k, m, note)``: the prefix and continuation lengths that fit the longest training sequence (halved evenly
    when ``k + m`` is longer than it, with a note saying so)."""
    if prefix_tokens < 1 or continuation_tokens < 1:
        raise KDistillError(f"extraction: got prefix_tokens {prefix_tokens}, continuation_tokens "
                            f"{continuation_tokens}; expected both >= 1.")
    longest = max((len(s) for s in sequences), default=0)
    if longest < 2:
        raise KDistillError(f"extraction: the longest training sequence has {longest} tokens; expected at least 2.")
    if prefix_tokens + continuation_tokens <= longest:
        return prefix_tokens, continuation_tokens, None
    k = min(prefix_tokens, longest // 2)
    m = min(continuation_tokens, longest - k)
    return k, m, (f"training sequences hold {longest} tokens, fewer than {prefix_tokens} + {continuation_tokens}; "
                  f"used a {k}-token prefix and a {m}-token continuation")


@torch.no_grad()
def extraction_rate(model: nn.Module, sequences: Sequence[Sequence[int]], *, prefix_tokens: int = 32,
                    continuation_tokens: int = 32, samples: int = 64, seed: int = 0, batch_size: int = 8
                    ) -> dict[str, Any]:
    """Share of ``samples`` training sequences (seeded draw among those of at least ``k + m`` tokens) whose tokens
    ``k .. k+m-1`` greedy decoding reproduces exactly from tokens ``0 .. k-1``; also the share of those
    continuation tokens that are the model's greedy choice (``token_match_rate``)."""
    k, m = prefix_tokens, continuation_tokens
    eligible = [list(s[: k + m]) for s in sequences if len(s) >= k + m]
    if not eligible:
        raise KDistillError(f"extraction_rate: no training sequence holds {k} + {m} tokens; expected shorter "
                            "prefix_tokens / continuation_tokens (see extraction_window).")
    idx = np.sort(np.random.default_rng(seed).choice(len(eligible), size=min(samples, len(eligible)),
                                                     replace=False))
    data = torch.tensor([eligible[i] for i in idx], dtype=torch.long)
    was = model.training
    model.eval()
    dev = device_of(model)
    extracted, matched = 0, 0
    for b in range(0, len(data), batch_size):
        ids = data[b:b + batch_size].to(dev)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        hit = logits[:, k - 1:k + m - 1].argmax(-1) == ids[:, k:k + m]  # position t predicts token t + 1
        extracted += int(hit.all(-1).sum())
        matched += int(hit.sum())
    model.train(was)
    n = len(data)
    return {"extraction_rate": extracted / n, "token_match_rate": matched / (n * m), "prefix_tokens": k,
            "continuation_tokens": m, "samples": n}


@torch.no_grad()
def sequence_logprobs(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32) -> list[float]:
    """``log p(text)`` (natural log, summed over its tokens) of each text, read after an end-of-text token as a text
    packed into a training block is (the BOS token, or none, when the tokenizer has no EOS)."""
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    seqs = [([int(start)] if start is not None else []) + list(tokenizer(t, add_special_tokens=False)["input_ids"])
            for t in texts]
    was = model.training
    model.eval()
    dev = device_of(model)
    out: list[float] = []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s), 1
        ids, attn = ids.to(dev), attn.to(dev)
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
        tok_lp = lp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * attn[:, 1:]
        out.extend(float(x) for x in tok_lp.sum(-1))
    model.train(was)
    return out


def canary_exposure(model: nn.Module, tokenizer: Any, canary: str, *, candidates: int = 256, seed: int = 0,
                    batch_size: int = 32) -> dict[str, Any]:
    """Exposure of ``canary`` (``"my secret number is d d ... d"``, see :func:`kdistill.data.lm.canary_texts`):
    ``log2 |R| - log2 rank`` where ``R`` = the canary and ``candidates - 1`` other random digit strings of its
    length (seeded, distinct), ranked by the model's likelihood (rank 1 = most likely; ties count against the
    canary). ``max_exposure`` = ``log2 |R|``."""
    if not canary.startswith(CANARY_PREFIX + " "):
        raise KDistillError(f"canary_exposure: got {canary[:60]!r}, expected a canary of canary_texts "
                            f"({CANARY_PREFIX!r} followed by digits).")
    digits = canary[len(CANARY_PREFIX) + 1:].split()
    space = 10 ** len(digits)
    if candidates < 2 or candidates > space:
        raise KDistillError(f"canary_exposure: got candidates {candidates}, expected 2 to {space} (the number of "
                            f"{len(digits)}-digit secrets).")
    rng = np.random.default_rng(seed)
    others: set[str] = set()
    while len(others) < candidates - 1:
        text = canary_text(rng.integers(0, 10, len(digits)).tolist())
        if text != canary:
            others.add(text)
    texts = [canary, *sorted(others)]
    scores = sequence_logprobs(model, tokenizer, texts, batch_size=batch_size)
    rank = 1 + sum(s >= scores[0] for s in scores[1:])
    return {"exposure": math.log2(len(texts)) - math.log2(rank), "rank": rank, "candidates": len(texts),
            "max_exposure": math.log2(len(texts))}


# ------------------------------------------------------------------------------------- interpolation / shift

def shift_metrics(teacher: nn.Module, models: Mapping[str, nn.Module], tensors: Mapping[str, Tensor], *,
                  batch_size: int, k: int, own_tensors: Mapping[str, Mapping[str, Tensor]] | None = None
                  ) -> dict[str, dict[str, float]]:
    """Perplexity of the teacher and of each model on shifted-domain LM tensors, with each model's top-1 agreement
    and top-k KL(teacher || student) there. A model with its own tokenizer reads its own tokens of the same texts
    (``own_tensors[name]``): perplexity only (token ids are not comparable)."""
    tt = teacher_eval_targets(teacher, tensors, k=k, batch_size=batch_size)
    out: dict[str, dict[str, float]] = {"teacher": {"perplexity": tt["perplexity"], "loss": tt["loss"]}}
    for name, model in models.items():
        own = (own_tensors or {}).get(name)
        m = lm_metrics(model, own if own is not None else tensors, batch_size=batch_size,
                       teacher_targets=None if own is not None else tt)
        out[name] = {key: m[key] for key in ("perplexity", "loss", "top1_agreement", "kl_teacher_student_topk")
                     if key in m}
    return out


def extrapolation(held_out: Mapping[str, Mapping[str, float]], shift: Mapping[str, Mapping[str, float]]
                  ) -> dict[str, dict[str, float]]:
    """Each student's perplexity as a multiple of the teacher's, on the held-out data (interpolation) and on the
    shifted domain (extrapolation), and ``gap`` = shift ratio / held-out ratio (> 1: the student falls further
    behind the teacher off the training distribution than on it)."""
    t_h, t_s = held_out["teacher"]["perplexity"], shift["teacher"]["perplexity"]
    out = {}
    for name in held_out:
        if name == "teacher" or name not in shift:
            continue
        h, s = held_out[name]["perplexity"] / t_h, shift[name]["perplexity"] / t_s
        out[name] = {"held_out_ratio": h, "shift_ratio": s, "gap": s / h}
    return out


@torch.no_grad()
def hull_agreement(teacher_fn: Callable[[Tensor], Tensor], student_fn: Callable[[Tensor], Tensor], x: Tensor, *,
                   samples: int = 1024, mixup_alpha: float = 1.0, noise_scale: float = 1.0, seed: int = 0,
                   batch_size: int = 256) -> dict[str, float]:
    """Classifiers: teacher-student top-1 agreement on ``samples`` inputs inside the training data's hull (mixup of
    two random training inputs, weight ~ Beta(alpha, alpha)) and outside it (a random training input plus Gaussian
    noise of ``noise_scale`` times the per-feature standard deviation), beside agreement on the inputs themselves.
    ``x`` (N, ...) are training inputs; ``*_fn`` map a batch to logits."""
    g = torch.Generator().manual_seed(int(seed))
    n = len(x)
    i, j = torch.randint(0, n, (samples,), generator=g), torch.randint(0, n, (samples,), generator=g)
    lam = torch.as_tensor(np.random.default_rng(seed).beta(mixup_alpha, mixup_alpha, samples), dtype=x.dtype)
    lam = lam.view(-1, *([1] * (x.dim() - 1)))
    std = x.float().std(0, keepdim=True).to(x.dtype)
    sets = {"train": x[i], "mixup": lam * x[i] + (1 - lam) * x[j],
            "noise": x[i] + noise_scale * std * torch.randn(x[i].shape, generator=g).to(x.dtype)}

    def agree(inputs: Tensor) -> float:
        same = 0
        for b in range(0, len(inputs), batch_size):
            xb = inputs[b:b + batch_size]
            same += int((teacher_fn(xb).argmax(-1) == student_fn(xb).argmax(-1)).sum())
        return same / len(inputs)

    return {f"{name}_agreement": agree(v) for name, v in sets.items()}


# ------------------------------------------------------------------------------------------ the llm audit

def lm_audits(*, models: Mapping[str, nn.Module], tokenizers: Mapping[str, Any],
              sequences: Mapping[str, Sequence[Sequence[int]]], held_out: Mapping[str, Mapping[str, float]],
              shift: Mapping[str, Any] | None = None, shift_note: str | None = None,
              history: Sequence[Mapping[str, Any]] = (), log_rows: Sequence[Mapping[str, Any]] = (),
              log_term: str | None = None, canaries: Sequence[str] = (), extraction_samples: int = 64,
              prefix_tokens: int = 32, continuation_tokens: int = 32, canary_candidates: int = 256,
              patience: int = 3, seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """The audit of an llm run (the keys of ``audit.json``).

    ``models`` (``teacher``, optional ``baseline``, ``student``) with their ``tokenizers`` and their own token
    lists of the training data (``sequences``); ``held_out``: each model's held-out ``perplexity`` (and the
    students' ``top1_agreement`` / ``kl_teacher_student_topk``); ``shift``: :func:`shift_metrics` on a shifted
    domain (with its ``source``) or None (``shift_note`` says why); ``history``: the student's evaluations, with
    :data:`PROXY` when the run logged it, else the mean of the training loss term ``log_term`` in ``log_rows``
    (when the method's loss is a divergence to the teacher) stands in for it; ``canaries``: the inserted canary
    texts, each scored by :func:`canary_exposure` under every model."""
    out: dict[str, Any] = {}
    if shift is not None:
        out["shift"] = {**shift, "held_out": {n: dict(v) for n, v in held_out.items()}}
        out["extrapolation"] = extrapolation(held_out, {n: v for n, v in shift.items() if n != "source"})
    else:
        out["shift"] = {"held_out": {n: dict(v) for n, v in held_out.items()},
                        "note": shift_note or "no shifted domain configured (eval.shift)"}
    out["teacher_hacking"] = teacher_hacking_audit(history, log_rows=log_rows, log_term=log_term, patience=patience)
    mem: dict[str, Any] = {}
    for name, model in models.items():
        k, m, note = extraction_window(sequences[name], prefix_tokens=prefix_tokens,
                                       continuation_tokens=continuation_tokens)
        mem[name] = extraction_rate(model, sequences[name], prefix_tokens=k, continuation_tokens=m,
                                    samples=extraction_samples, seed=seed, batch_size=batch_size)
        if note:
            mem[name]["note"] = note
    if canaries:
        mem["canaries"] = {name: [{"canary": c, **canary_exposure(model, tokenizers[name], c,
                                                                  candidates=canary_candidates, seed=seed + i)}
                                  for i, c in enumerate(canaries)] for name, model in models.items()}
    out["memorization"] = mem
    return out


def teacher_hacking_audit(history: Sequence[Mapping[str, Any]], *, log_rows: Sequence[Mapping[str, Any]] = (),
                          log_term: str | None = None, patience: int = 3) -> dict[str, Any]:
    """:func:`teacher_hacking` on the logged proxy, else on the training loss term ``log_term`` (a divergence to
    the teacher) from ``log_rows``, else ``{"flagged": False, "proxy": None, ...}`` saying that no proxy was
    logged. ``source`` says which; ``curve`` holds the points (step, proxy, golden)."""
    if any(PROXY in h for h in history):
        hist, proxy, source = list(history), PROXY, f"{PROXY}: logged at every evaluation"
    elif log_term is not None and log_rows:
        hist, proxy = proxy_from_log(history, log_rows, term=log_term)
        source = (f"no proxy logged (train.eval_every = 0, eval.audit off, or a run from before the proxy); the "
                  f"training loss term {log_term!r} (the method's divergence to the teacher on the training batches, "
                  "from metrics.jsonl) stands in for it")
    else:
        return {"flagged": False, "step": None, "proxy": None, "golden": GOLDEN,
                "reason": "no proxy logged: the run logged no train_kl_topk (train.eval_every = 0, eval.audit off, a "
                          "student with its own tokenizer, or a run from before the proxy) and the method declares no "
                          "divergence-to-the-teacher loss term to stand in for it"}
    out = teacher_hacking(hist, proxy=proxy, golden=GOLDEN, patience=patience)
    out["source"] = source
    out["curve"] = [{"step": h["step"], proxy: h[proxy], GOLDEN: h[GOLDEN]} for h in hist
                    if proxy in h and GOLDEN in h]
    return out


# ------------------------------------------------------------------------------------------ output

def audit_markdown(audit: Mapping[str, Any], *, heading: str = "## Audits") -> str:
    """The ``Audits`` section of report.md / audit.md."""
    def num(x: Any, fmt: str = ".3f") -> str:
        return "—" if x is None else format(x, fmt)

    md = [heading, ""]
    sh = audit.get("shift", {})
    held = sh.get("held_out", {})
    if "teacher" in sh:
        src = sh.get("source", {})
        ext = audit.get("extrapolation", {})
        md += [f"**Interpolation vs extrapolation**: held-out data vs a shifted domain ({src.get('name', '?')}, "
               f"{src.get('tokens', '?')} tokens). Ratio = perplexity / the teacher's on the same data.", "",
               "| model | held-out ppl | shifted ppl | held-out ratio | shifted ratio | top-1 agr. (shifted) | "
               "KL(t‖s) (shifted) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in [n for n in ("teacher", "baseline", "student") if n in sh]:
            e, x = sh[name], ext.get(name, {})
            md.append(f"| {name} | {num(held.get(name, {}).get('perplexity'), '.2f')} | {e['perplexity']:.2f} | "
                      f"{num(x.get('held_out_ratio'), '.2f')} | {num(x.get('shift_ratio'), '.2f')} | "
                      f"{num(e.get('top1_agreement'))} | {num(e.get('kl_teacher_student_topk'))} |")
        md.append("")
    elif "shift" in audit:
        md += [f"**Interpolation vs extrapolation**: not measured ({sh.get('note', 'no shifted domain')}).", ""]
    for name, e in (audit.get("extrapolation", {}) if "shift" not in audit else {}).items():  # a classifier run
        md += ["**Interpolation vs extrapolation**: teacher-student top-1 agreement on training inputs, inside the "
               "training data's hull (mixup) and outside it (noise).", "",
               "| model | training inputs | mixup | noise |", "|---|---:|---:|---:|",
               f"| {name} | {e['train_agreement']:.4f} | {e['mixup_agreement']:.4f} | {e['noise_agreement']:.4f} |", ""]
    th = audit.get("teacher_hacking")
    if th is not None:
        verdict = f"**flagged** from step {th['step']}" if th.get("flagged") else "not flagged"
        md += [f"**Teacher hacking** (proxy `{th.get('proxy')}` vs golden held-out `{th.get('golden')}`): {verdict}; "
               f"{th.get('reason', '')}." + (f" Proxy: {th['source']}." if th.get("source") else ""), ""]
        if th.get("curve"):
            md += ["![teacher hacking audit](audit_teacher_hacking.png)", ""]
    mem = audit.get("memorization", {})
    rows = [n for n in ("teacher", "baseline", "student") if n in mem]
    if rows:
        md += ["**Memorisation**: share of sampled training sequences whose continuation greedy decoding "
               "reproduces exactly from their prefix.", "",
               "| model | extraction rate | token match | prefix | continuation | samples |",
               "|---|---:|---:|---:|---:|---:|"]
        for n in rows:
            e = mem[n]
            md.append(f"| {n} | {e['extraction_rate']:.3f} | {e['token_match_rate']:.3f} | {e['prefix_tokens']} | "
                      f"{e['continuation_tokens']} | {e['samples']} |")
        md += [f"\n{mem[n]['note']}." for n in rows[:1] if mem[n].get("note")]
        md.append("")
    if mem.get("canaries"):
        md += ["**Canary exposure** (bits; the maximum is log2 of the number of candidates):", ""]
    for name, items in mem.get("canaries", {}).items():
        md.append(f"- canary exposure, {name}: " + ", ".join(
            f"{e['exposure']:.2f} / {e['max_exposure']:.2f} bits (rank {e['rank']})" for e in items))
    return "\n".join(md).rstrip() + "\n"


def write_audit(audit: Mapping[str, Any], out: str | Path, *, title: str = "") -> dict[str, Path]:
    """``audit.json``, ``audit.md`` and (when the audit holds a curve) ``audit_teacher_hacking.png`` in ``out``."""
    out = Path(out)
    paths = {"json": out / "audit.json", "md": out / "audit.md"}
    write_teacher_hacking_plot(audit, out)
    if (out / "audit_teacher_hacking.png").exists():
        paths["png"] = out / "audit_teacher_hacking.png"
    write_json_atomic(paths["json"], audit)
    md = audit_markdown(audit, heading=f"# kdistill audit{': ' + title if title else ''}")
    write_bytes_atomic(paths["md"], md.encode())
    return paths


def write_teacher_hacking_plot(audit: Mapping[str, Any], out: str | Path) -> None:
    """``audit_teacher_hacking.png`` from the audit's teacher-hacking curve, when it has one."""
    th = audit.get("teacher_hacking", {})
    if th.get("curve"):
        plot_teacher_hacking(th["curve"], Path(out) / "audit_teacher_hacking.png", proxy=th["proxy"],
                             golden=th["golden"], step=th.get("step"))


def held_out_entries(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{model: {"perplexity", "top1_agreement"?, "kl_teacher_student_topk"?}}`` from an llm report's entries."""
    out = {}
    for name in ("teacher", "baseline", "student"):
        e = report.get(name)
        if e and "perplexity" in e.get("metrics", {}):
            out[name] = {"perplexity": e["metrics"]["perplexity"], **(e.get("agreement") or {})}
    return out



def lm_run_audits(*, teacher: nn.Module, tokenizer: Any, students: Mapping[str, tuple[nn.Module, Any]],
                  train_sequences: Sequence[Sequence[int]], train_texts: Callable[[], Any] | None,
                  block_length: int, train_tokens: int, held_out: Mapping[str, Mapping[str, float]],
                  shift_texts: Sequence[str] | None = None, shift_name: str = "", shift_tokens: int = 4096,
                  agreement_k: int = 64, full: bool = True, batch_size: int = 8, **audit_kwargs: Any
                  ) -> dict[str, Any]:
    """:func:`lm_audits` on an llm run's models: ``teacher`` with its ``tokenizer``, ``students`` ``{name: (model,
    tokenizer)}``. A student whose tokenizer is not the teacher's reads its own tokens of the same texts: the
    training texts (``train_texts()``, packed into ``block_length``-token blocks up to ``train_tokens``) and the
    shifted domain's ``shift_texts`` (packed up to ``shift_tokens``; None = no shift measured). ``full=False``: the
    shifted-domain metrics alone (``{"shift": ...}``). Other keywords go to :func:`lm_audits`."""
    from ..data.lm import lm_tensors, text_blocks
    from ..teachers.cache import tokenizer_hash

    own = {n: t for n, (_, t) in students.items() if tokenizer_hash(t) != tokenizer_hash(tokenizer)}
    models = {n: m for n, (m, _) in students.items()}
    shifted = None
    if shift_texts is not None:
        blocks = {n: lm_tensors(text_blocks(t, shift_texts, block_length=block_length, tokens=shift_tokens))
                  for n, t in {"teacher": tokenizer, **own}.items()}
        shifted = {**shift_metrics(teacher, models, blocks.pop("teacher"), batch_size=batch_size, k=agreement_k,
                                   own_tensors=blocks), "source": {"name": shift_name, "tokens": shift_tokens}}
    if not full:
        return {"shift": {**(shifted or {}), "held_out": {n: dict(v) for n, v in held_out.items()}}}
    sequences = {"teacher": train_sequences, **{n: train_sequences for n in models}}
    for n, t in own.items():
        if train_texts is None:
            raise KDistillError(f"audit: student {n!r} has its own tokenizer; expected the training texts to "
                                "tokenise them with it.")
        sequences[n] = text_blocks(t, train_texts(), block_length=block_length, tokens=train_tokens).tolist()
    out = lm_audits(models={"teacher": teacher, **models},
                    tokenizers={"teacher": tokenizer, **{n: t for n, (_, t) in students.items()}},
                    sequences=sequences, held_out=held_out, shift=shifted, batch_size=batch_size, **audit_kwargs)
    for n in own:  # perplexities per token of two tokenizers: their ratio to the teacher's means nothing
        if out.get("extrapolation", {}).pop(n, None) is not None:
            out["extrapolation"].setdefault("note", f"left out {sorted(own)}: own tokenizer, perplexity per "
                                                    "token is not comparable with the teacher's")
    return out
