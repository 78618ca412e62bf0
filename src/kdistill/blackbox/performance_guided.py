"""``performance_guided``: Performance-Guided Knowledge Distillation (PGKD, "Performance-Guided LLM
Knowledge Distillation for Efficient Text Classification at Scale", 2024).

Loop: train the student on the current labelled set; evaluate it on a labelled validation split;
for the classes it gets wrong most often, show the teacher a few of the misclassified validation
texts (with the class they were confused with) and ask for new, different examples of the true class
(hard examples); add the parsed examples with that class as label; retrain. Stop after ``rounds``
rounds or when validation accuracy has not improved for ``patience`` rounds; keep the best student.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import expect
from ..teachers.api import APITeacher
from .data import TextData
from .student import TextStudent, one_hot

HARD_EXAMPLE_INSTRUCTION = (
    "A classifier sorts short dictionary entries into these categories: {labels}.\n"
    "These entries belong to the category '{label}' but the classifier got them wrong:\n{examples}\n"
    "Write {n} new, different dictionary entries that belong to the category '{label}', in the same style "
    "('word: definition'), one per line, with no numbering.")
#: the same request for any texts (your own data): no assumption about their form
TEXT_HARD_EXAMPLE_INSTRUCTION = (
    "A classifier sorts short texts into these categories: {labels}.\n"
    "These texts belong to the category '{label}' but the classifier got them wrong:\n{examples}\n"
    "Write {n} new, different texts that belong to the category '{label}', in the same style, one per line, "
    "with no numbering.")


def parse_examples(text: str, *, min_chars: int = 8, max_chars: int = 300) -> list[str]:
    """One example per non-empty line; numbering / bullets removed; too short or long lines dropped."""
    out = []
    for line in text.splitlines():
        s = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().strip('"')
        if min_chars <= len(s) <= max_chars:
            out.append(s)
    return out


def performance_guided(data: TextData, teacher: APITeacher, *, init_texts: Sequence[str],
                       init_targets: np.ndarray, rounds: int = 3, patience: int = 1, classes_per_round: int = 3,
                       examples_shown: int = 3, new_per_request: int = 4, requests_per_class: int = 2,
                       max_tokens: int = 160, temperature: float = 0.7, student_kwargs: Mapping[str, Any] | None = None,
                       instruction: str = HARD_EXAMPLE_INSTRUCTION, seed: int = 0) -> dict[str, Any]:
    """Run PGKD rounds starting from ``init_texts`` / ``init_targets`` (e.g. the ``label`` pipeline's output).
    Returns the report fragment with per-round history, counts and the best student's test accuracy."""
    expect(data.val_labels is not None and data.test_labels is not None and len(data.val_texts) > 0,
           "performance_guided data", f"{len(data.val_texts)} validation texts, gold labels: {data.has_gold}",
           "a validation split with gold labels (every round picks the classes the student gets wrong on it)",
           "Set data.label_column (and data.validation_fraction > 0 or a validation file), or use another pipeline.")
    assert data.val_labels is not None and data.test_labels is not None
    t0 = time.monotonic()
    C = len(data.class_names)
    texts = list(init_texts)
    targets = np.asarray(init_targets, dtype=np.float32)
    seen = set(texts) | set(data.val_texts) | set(data.test_texts)
    history: list[dict[str, Any]] = []
    best: tuple[float, TextStudent | None, int] = (-1.0, None, -1)
    counts = {"requests": 0, "generated": 0, "accepted": 0, "duplicates": 0, "failed_requests": 0}
    stale = 0
    for rnd in range(rounds + 1):
        st = TextStudent(C, seed=seed, **dict(student_kwargs or {})).fit(texts, targets)
        pred = st.predict(data.val_texts)
        val_acc = float((pred == np.asarray(data.val_labels)).mean())
        history.append({"round": rnd, "train_size": len(texts), "val_accuracy": val_acc,
                        "test_accuracy": st.accuracy(data.test_texts, data.test_labels)})
        if val_acc > best[0]:
            best, stale = (val_acc, st, rnd), 0
        else:
            stale += 1
        if rnd == rounds or stale > patience:
            break
        wrong = [(i, int(p)) for i, p in enumerate(pred) if p != data.val_labels[i]]
        worst = [c for c, _ in Counter(data.val_labels[i] for i, _ in wrong).most_common(classes_per_round)]
        if not worst:
            break
        reqs, req_class = [], []
        for c in worst:
            shown = [(i, p) for i, p in wrong if data.val_labels[i] == c][:examples_shown]
            ex = "\n".join(f"- {data.val_texts[i]} (classifier said: {data.class_names[p]})" for i, p in shown)
            for k in range(requests_per_class):
                reqs.append({"messages": [{"role": "user", "content": instruction.format(
                    labels=", ".join(data.class_names), label=data.class_names[c], examples=ex, n=new_per_request)}],
                    "max_tokens": max_tokens, "temperature": temperature, "seed": seed * 1000 + rnd * 100 + k})
                req_class.append(c)
        replies = teacher.run(reqs)
        counts["requests"] += len(reqs)
        new_texts, new_labels = [], []
        for rep, c in zip(replies, req_class, strict=True):
            if not rep.ok:
                counts["failed_requests"] += 1
                continue
            for s in parse_examples(rep.text)[:new_per_request]:
                counts["generated"] += 1
                if s in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(s)
                new_texts.append(s)
                new_labels.append(c)
        counts["accepted"] += len(new_texts)
        history[-1]["added"] = len(new_texts)
        if new_texts:
            texts += new_texts
            targets = np.concatenate([targets, one_hot(new_labels, C)])
    best_acc, best_st, best_round = best
    assert best_st is not None
    return {"student": {"params": best_st.num_params(),
                        "metrics": {"accuracy": best_st.accuracy(data.test_texts, data.test_labels),
                                    "val_accuracy": best_acc}, "best_round": best_round},
            "rounds": history, "counts": counts, "teacher": {"cost": teacher.cost()},
            "seconds": time.monotonic() - t0}
