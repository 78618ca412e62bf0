"""``rationales``: Distilling Step-by-Step (Hsieh et al., "Distilling Step-by-Step! Outperforming Larger
Language Models with Less Training Data and Smaller Model Sizes", 2023).

The teacher answers each text with a label *and* a short rationale. A small causal LM student trains
multi-task on two targets built from the same input, distinguished by a task prefix:

    L = L_label + rationale_weight * L_rationale
    L_label     = CE over the tokens of  "[label] <text>\\n"     -> "<label name></s>"
    L_rationale = CE over the tokens of  "[rationale] <text>\\n" -> "<rationale></s>"

(prompt tokens are masked out; each term is a mean over its target tokens). At test time only the
label task is used: the student scores every class name as the continuation of the ``[label]``
prompt and predicts the most likely one, so no rationale is generated at inference.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..data.lm import IGNORE_INDEX, label_mask
from ..errors import expect
from ..losses.logits import cross_entropy
from ..losses.reduce import masked_mean
from ..models.classifiers import count_params
from ..teachers.api import APITeacher
from ..teachers.tiny import build_tiny_lm
from .data import TextData
from .label import parse_label

RATIONALE_INSTRUCTION = ("Classify the text into exactly one of these categories: {labels}.\n"
                         "Text: {text}\n"
                         "Reply with exactly two lines:\nLabel: <category>\nReason: <one short sentence>")


def parse_rationale(answer: str, class_names: Sequence[str]) -> tuple[int | None, str | None]:
    """``(label index or None, rationale or None)`` from a 'Label: ... / Reason: ...' answer."""
    m_label = re.search(r"label\s*:\s*([^\n]+)", answer, flags=re.I)
    m_reason = re.search(r"reason\s*:\s*([^\n]+)", answer, flags=re.I)
    y = parse_label(m_label.group(1), class_names) if m_label else None
    reason = m_reason.group(1).strip() if m_reason else None
    return y, (reason if reason and len(reason) >= 3 else None)


def _pairs(tok: Any, prompts: Sequence[str], targets: Sequence[str], max_len: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    rows = []
    for p, t in zip(prompts, targets, strict=True):
        tids = tok(t, add_special_tokens=False)["input_ids"][: max_len // 2] + [tok.eos_token_id]
        pids = tok(p, add_special_tokens=False)["input_ids"][: max_len - len(tids)]
        rows.append((pids + tids, [IGNORE_INDEX] * len(pids) + tids))
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a)] = torch.tensor(a)
        attn[i, : len(a)] = 1
        labels[i, : len(b)] = torch.tensor(b)
    return ids, attn, labels


def _target_loss(model: Any, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    tgt = labels[:, 1:]
    return masked_mean(cross_entropy(logits, tgt), label_mask(tgt))


class RationaleStudent:
    """A tiny causal LM trained multi-task on labels and rationales (tokenizer trained on its data)."""

    def __init__(self, class_names: Sequence[str], *, hidden_size: int = 96, num_layers: int = 2,
                 vocab_size: int = 2000, steps: int = 300, batch_size: int = 16, lr: float = 3e-3,
                 rationale_weight: float = 1.0, max_len: int = 96, seed: int = 0) -> None:
        expect(rationale_weight >= 0, "rationale_weight", rationale_weight, ">= 0")
        self.class_names = list(class_names)
        self.hidden_size, self.num_layers, self.vocab_size = hidden_size, num_layers, vocab_size
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.rationale_weight, self.max_len, self.seed = rationale_weight, max_len, seed
        self.model: Any = None
        self.tok: Any = None
        self.history: list[dict[str, float]] = []

    def fit(self, texts: Sequence[str], labels: Sequence[int], rationales: Sequence[str | None]) -> RationaleStudent:
        expect(len(texts) == len(labels) == len(rationales) > 0, "rationale training set sizes",
               (len(texts), len(labels), len(rationales)), "equal and > 0")
        corpus = list(texts) + [r for r in rationales if r] + self.class_names + ["[label]", "[rationale]"]
        self.model, self.tok = build_tiny_lm(corpus, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                             num_layers=self.num_layers, seed=self.seed)
        self.model.train()
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        g = np.random.default_rng(self.seed)
        with_r = [i for i, r in enumerate(rationales) if r]
        for step in range(self.steps):
            idx = g.choice(len(texts), size=min(self.batch_size, len(texts)), replace=False)
            loss_label = _target_loss(self.model, *_pairs(self.tok, [f"[label] {texts[i]}\n" for i in idx],
                                                          [" " + self.class_names[labels[i]] for i in idx],
                                                          self.max_len))
            loss = loss_label
            loss_r = torch.zeros(())
            if self.rationale_weight > 0 and with_r:
                ridx = g.choice(with_r, size=min(self.batch_size, len(with_r)), replace=False)
                loss_r = _target_loss(self.model, *_pairs(self.tok, [f"[rationale] {texts[i]}\n" for i in ridx],
                                                          [" " + str(rationales[i]) for i in ridx], self.max_len))
                loss = loss + self.rationale_weight * loss_r
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == self.steps - 1:
                self.history.append({"step": step, "label_loss": float(loss_label.detach()),
                                     "rationale_loss": float(loss_r.detach())})
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        expect(self.model is not None, "RationaleStudent", "unfitted", "a fitted student", "Call fit() first.")
        C = len(self.class_names)
        scores = np.zeros((len(texts), C))
        flat = [(i, c) for i in range(len(texts)) for c in range(C)]
        for s in range(0, len(flat), batch):
            chunk = flat[s:s + batch]
            ids, attn, labels = _pairs(self.tok, [f"[label] {texts[i]}\n" for i, _ in chunk],
                                       [" " + self.class_names[c] for _, c in chunk], self.max_len)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
            tgt = labels[:, 1:]
            tok_lp = torch.where(label_mask(tgt), logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
            for (i, c), v in zip(chunk, tok_lp.sum(-1).tolist(), strict=True):
                scores[i, c] = v
        return scores.argmax(-1)

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        return float((self.predict(texts) == np.asarray(labels)).mean()) if len(texts) else float("nan")

    def num_params(self) -> int:
        return count_params(self.model) if self.model is not None else 0


def rationales(data: TextData, teacher: APITeacher, *, max_tokens: int = 48, temperature: float = 0.0,
               instruction: str = RATIONALE_INSTRUCTION, student_kwargs: Mapping[str, Any] | None = None,
               label_only_baseline: bool = True, seed: int = 0) -> dict[str, Any]:
    """Teacher writes label + rationale for each training text; the LM student trains multi-task on them
    (and, with ``label_only_baseline``, the same student trains on the labels alone for comparison)."""
    t0 = time.monotonic()
    reqs = [{"messages": [{"role": "user", "content": instruction.format(labels=", ".join(data.class_names),
                                                                       text=t)}],
             "max_tokens": max_tokens, "temperature": temperature, "seed": seed} for t in data.train_texts]
    replies = teacher.run(reqs)
    counts = {"texts": len(reqs), "failed_requests": 0, "malformed_label": 0, "with_rationale": 0, "kept": 0}
    texts, labels, rats = [], [], []
    for t, rep in zip(data.train_texts, replies, strict=True):
        if not rep.ok:
            counts["failed_requests"] += 1
            continue
        y, r = parse_rationale(rep.text, data.class_names)
        if y is None:
            counts["malformed_label"] += 1
            continue
        counts["kept"] += 1
        counts["with_rationale"] += int(r is not None)
        texts.append(t)
        labels.append(y)
        rats.append(r)
    teacher_metrics: dict[str, float] = {}
    if data.train_labels is not None:  # gold labels: how often the teacher's parsed labels are right
        gold = {t: y for t, y in zip(data.train_texts, data.train_labels, strict=True)}
        right = [gold[t] == y for t, y in zip(texts, labels, strict=True)]
        teacher_metrics["accuracy_parsed"] = float(np.mean(right)) if right else float("nan")
    report: dict[str, Any] = {"counts": counts, "teacher": {"cost": teacher.cost(), "metrics": teacher_metrics},
                              "student": {"metrics": {}, "trained_on": len(texts)}, "variants": {}}

    def evaluate(st: RationaleStudent) -> dict[str, float]:
        if not data.test_texts or data.test_labels is None:
            return {}
        return {data.test_metric: st.accuracy(data.test_texts, data.test_labels)}

    if len(set(labels)) >= 2:
        kw = dict(student_kwargs or {})
        st = RationaleStudent(data.class_names, seed=seed, **kw).fit(texts, labels, rats)
        report["student"] = {"params": st.num_params(), "trained_on": len(texts), "history": st.history,
                             "metrics": evaluate(st)}
        if label_only_baseline:
            kw["rationale_weight"] = 0.0
            lo = RationaleStudent(data.class_names, seed=seed, **kw).fit(texts, labels, rats)
            report["variants"]["label_only"] = {"metrics": evaluate(lo)}
    report["seconds"] = time.monotonic() - t0
    return report
