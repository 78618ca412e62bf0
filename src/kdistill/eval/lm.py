"""Held-out evaluation of causal LMs: perplexity over the positions of ``mask``, top-1 agreement and top-k KL
with a teacher, latency, greedy generations side by side, and the llm report's markdown sections."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import device_of
from ..data.lm import IGNORE_INDEX, label_mask, lm_tensors
from ..errors import KDistillError
from ..losses.logits import forward_kl as _forward_kl
from ..losses.topk import teacher_topk, topk_loss
from ..models.classifiers import count_params


def eval_batches(data: Mapping[str, Tensor], batch_size: int, device: torch.device
                 ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(input_ids, attention_mask, labels, mask)`` batches of held-out LM tensors on ``device``."""
    n = len(data["input_ids"])
    for b in range(0, n, batch_size):
        ids, attn, labels = (data[k][b:b + batch_size].to(device) for k in ("input_ids", "attention_mask", "labels"))
        yield ids, attn, labels, label_mask(labels)


def _bits_per_char(data: Mapping[str, Tensor], nll: float) -> dict[str, float]:
    """``{"bits_per_char": nll / ln 2 / characters}`` over the predicted positions, when ``data`` counts the
    characters of each predicted token (``target_chars``); else nothing."""
    chars = data.get("target_chars")
    if chars is None:
        return {}
    n = int(chars[label_mask(data["labels"])].sum())
    return {"bits_per_char": nll / math.log(2.0) / max(n, 1)}


@torch.no_grad()
def teacher_eval_targets(teacher: nn.Module, data: Mapping[str, Tensor], *, k: int, batch_size: int
                         ) -> dict[str, Any]:
    """Teacher perplexity on held-out LM tensors (the positions of ``mask``) plus its top-k log-probs there
    (T = 1), one entry per batch of ``batch_size`` rows, for agreement / KL."""
    nll, count, topk = 0.0, 0, []
    for ids, attn, labels, mask in eval_batches(data, batch_size, device_of(teacher)):
        logits = teacher(input_ids=ids, attention_mask=attn).logits.float()[mask]
        lp_all = torch.log_softmax(logits, -1)
        nll += float(-lp_all.gather(-1, labels[mask].unsqueeze(-1)).sum())
        count += int(mask.sum())
        topk.append(tuple(x.cpu() for x in teacher_topk(logits, k=min(k, logits.shape[-1]))))
    return {"perplexity": math.exp(nll / count), "loss": nll / count, **_bits_per_char(data, nll), "topk": topk,
            "batch_size": batch_size}


@torch.no_grad()
def lm_metrics(model: nn.Module, data: Mapping[str, Tensor] | Tensor, *, batch_size: int,
               teacher_targets: dict[str, Any] | None = None) -> dict[str, float]:
    """Held-out ``perplexity`` / ``loss`` (mean next-token CE over the positions of ``mask``; ``data`` may also be
    a ``(N, L)`` tensor of text blocks), ``bits_per_char`` when ``data`` has ``target_chars`` (comparable across
    tokenizers, unlike perplexity), and with teacher targets the top-1 agreement and the KL(teacher || student) on
    the teacher's top-k coarsened distributions (a lower bound of the full KL, exact when k = V)."""
    if isinstance(data, Tensor):
        data = lm_tensors(data)
    if teacher_targets is not None and teacher_targets["batch_size"] != batch_size:
        raise KDistillError(f"lm_metrics: teacher targets were made in batches of {teacher_targets['batch_size']}, "
                            f"got batch_size {batch_size}; expected the same.")
    was = model.training
    model.eval()
    nll, count, agree, kl = 0.0, 0, 0.0, 0.0
    for i, (ids, attn, labels, mask) in enumerate(eval_batches(data, batch_size, device_of(model))):
        logits = model(input_ids=ids, attention_mask=attn).logits.float()[mask]
        lp = torch.log_softmax(logits, -1)
        nll += float(-lp.gather(-1, labels[mask].unsqueeze(-1)).sum())
        count += int(mask.sum())
        if teacher_targets is not None:
            tlp, tidx, tres = (x.to(logits.device) for x in teacher_targets["topk"][i])
            agree += float((logits.argmax(-1) == tidx[..., 0]).float().sum())
            kl += float(topk_loss(logits, tlp, tidx, tres).sum())
    model.train(was)
    out = {"perplexity": math.exp(nll / count), "loss": nll / count, **_bits_per_char(data, nll)}
    if teacher_targets is not None:
        out["top1_agreement"] = agree / count
        out["kl_teacher_student_topk"] = kl / count
    return out


def generation_prompt(tokenizer: Any, item: Any, prompt_words: int) -> str:
    """The text a generation starts from: a held-out text's first words, a (prompt, completion) row's prompt, or a
    conversation up to its first assistant turn, formatted by the chat template with the generation prompt."""
    if isinstance(item, str):
        return " ".join(item.split()[:prompt_words])
    if isinstance(item, tuple):  # (prompt, completion); a prompt of chat turns ends with the generation prompt
        if isinstance(item[0], str):
            return item[0]
        return tokenizer.apply_chat_template(item[0], tokenize=False, add_generation_prompt=True)
    first = next(i for i, m in enumerate(item) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(item[:first], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens skipped)."""
    was = model.training
    model.eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]], device=device_of(model))
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was)
    return outs


def lm_latency_ms(model: nn.Module, ids: Tensor, repeats: int = 5) -> float:
    """Milliseconds of one forward pass of ``model`` over ``ids`` (eval mode, one warm-up)."""
    from .metrics import latency_ms

    was = model.training
    model.eval()
    try:
        ids_on = ids.to(device_of(model))
        return latency_ms(lambda: model(input_ids=ids_on), repeats=repeats, warmup=1)
    finally:
        model.train(was)


def evaluate_lm_models(teacher: nn.Module, tokenizer: Any, students: Mapping[str, tuple[nn.Module, float, int]],
                       eval_tensors: Mapping[str, Tensor], eval_items: Sequence[Any], *, batch_size: int,
                       agreement_k: int, generations: int, prompt_words: int, max_new_tokens: int,
                       member_names: Sequence[str] = (), student_tokenizer: Any | None = None,
                       student_eval_tensors: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """The report's model entries: held-out perplexity of the teacher and of each student (``{name: (model, train
    seconds, steps)}``), the students' top-1 agreement and top-k KL with the teacher, parameters, latency, and
    ``generations`` greedy continuations side by side. A teacher mixture (``teacher.mixture``) also gets each
    member's figures (named by ``member_names``).

    A student with its own tokenizer (``student_tokenizer`` and its ``student_eval_tensors``, the same held-out texts
    in its tokens): each model is scored on its own tokens, agreement is left out (``{}``: token ids are not
    comparable), and bits per character is the comparable figure."""
    tt = teacher_eval_targets(teacher, eval_tensors, k=agreement_k, batch_size=batch_size)
    lat_ids = eval_tensors["input_ids"][:1]
    t_metrics = {k: tt[k] for k in ("perplexity", "loss", "bits_per_char") if k in tt}
    out: dict[str, Any] = {
        "teacher": {"params": count_params(teacher), "metrics": t_metrics,
                    "latency_ms": lm_latency_ms(teacher, lat_ids)}}
    cross = student_tokenizer is not None
    s_tensors = student_eval_tensors if cross else eval_tensors
    for name, (model, secs, steps) in students.items():
        m = lm_metrics(model, s_tensors, batch_size=batch_size, teacher_targets=None if cross else tt)
        agreement = {} if cross else {k: m.pop(k) for k in ("top1_agreement", "kl_teacher_student_topk")}
        out[name] = {"params": count_params(model), "metrics": m, "agreement": agreement, "train_seconds": secs,
                     "steps": steps, "latency_ms": lm_latency_ms(model, s_tensors["input_ids"][:1])}
    if hasattr(teacher, "mixture"):  # several teachers: each one's held-out figures beside the mixture's
        out["teacher"]["weights"] = teacher.weights.tolist()
        out["teacher"]["members"] = [
            {"model": name, "params": count_params(member),
             "metrics": lm_metrics(member, eval_tensors, batch_size=batch_size)}
            for name, member in zip(member_names, teacher.mixture.teachers)]
    prompts = [generation_prompt(tokenizer, item, prompt_words) for item in list(eval_items)[:generations]]
    gens = {"teacher": generate_texts(teacher, tokenizer, prompts, max_new_tokens)}
    gens.update({name: generate_texts(s[0], student_tokenizer or tokenizer, prompts, max_new_tokens)
                 for name, s in students.items()})
    out["generations"] = [{"prompt": p, **{k: v[i] for k, v in gens.items()}} for i, p in enumerate(prompts)]
    return out


def lm_report_markdown(report: Mapping[str, Any]) -> str:
    """The llm report.md sections: held-out language modelling and the generations."""
    def num(x: Any, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    bpc = "bits_per_char" in report["teacher"]["metrics"]
    md = ["## Held-out language modelling", "", "| model | perplexity |" + (" bits/char |" if bpc else "")
          + " top-1 agreement | KL(t‖s), top-k | params |", "|---|---:|" + ("---:|" if bpc else "") + "---:|---:|---:|"]
    for name in [n for n in ("teacher", "baseline", "student") if n in report]:
        e = report[name]
        a = e.get("agreement", {})
        md.append(f"| {name} | {e['metrics']['perplexity']:.3f} |"
                  + (f" {num(e['metrics'].get('bits_per_char'), '.4f')} |" if bpc else "")
                  + f" {num(a.get('top1_agreement'), '.4f') if name != 'teacher' else ''} |"
                  f" {num(a.get('kl_teacher_student_topk'), '.4f') if name != 'teacher' else ''} | {e['params']:,} |")
    if report.get("vocab", {}).get("cross_tokenizer"):
        md += ["", "Teacher and student use different tokenizers: each perplexity is per token of the model's own "
               "tokenizer, so only bits per character compares them; top-1 agreement and KL need one vocabulary."]
    md += ["", "## Generations (greedy)", ""]
    for g in report["generations"]:
        md.append(f"**prompt:** {g['prompt']}")
        md += [f"- *{k}*: {v!r}" for k, v in g.items() if k != "prompt"]
        md.append("")
    return "\n".join(md)


@torch.no_grad()
def zero_shot_kl(model: nn.Module, batches: list[dict[str, Tensor]], teacher_logits: list[Tensor]) -> float:
    """Mean KL(teacher || model) per predicted token over ``batches`` (full vocabulary, temperature 1)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b, t in zip(batches, teacher_logits):
            s = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            mask = b["labels"] != IGNORE_INDEX
            total += float(_forward_kl(s[mask], t[mask]).sum())
            count += int(mask.sum())
    finally:
        model.train(was)
    return total / max(1, count)
