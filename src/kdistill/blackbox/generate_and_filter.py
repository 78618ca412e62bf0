"""``generate_and_filter``: Symbolic Knowledge Distillation (West et al., "Symbolic Knowledge
Distillation: from General Language Models to Commonsense Models", 2022; also Impossible
Distillation, 2023).

The teacher over-generates examples for each class (sampled, distinct seeds); a critic filters them;
the student trains on what passes. Critics: ``teacher`` -- the teacher labels each generated example
with the ``label`` prompt and the example is kept only when its label is the class it was generated
for (and, when soft labels exist, with probability >= ``min_confidence``); ``none`` -- keep all
well-formed generations (the ablation). The report gives the counts generated / kept / rejected by
reason, so the filter's effect is visible.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..errors import expect
from ..teachers.api import APITeacher
from .data import TextData
from .label import label
from .performance_guided import parse_examples
from .student import TextStudent, one_hot

GENERATE_INSTRUCTION = ("Write one short dictionary entry for a word whose meaning belongs to the category "
                        "'{label}'. Use the form 'word: definition' on a single line.")
#: the same request for any texts (your own data): a few training texts show their form
TEXT_GENERATE_INSTRUCTION = ("Here are a few example texts (of any category; the categories are {labels}):\n"
                             "{examples}\n"
                             "Write one new, different text in the same style that belongs to the category "
                             "'{label}'. Reply with the text only, on a single line.")


def generate_and_filter(data: TextData, teacher: APITeacher, *, per_class: int = 20, critic: str = "teacher",
                        min_confidence: float = 0.0, max_tokens: int = 48, temperature: float = 1.0,
                        instruction: str = GENERATE_INSTRUCTION, examples_shown: int = 3,
                        label_kwargs: Mapping[str, Any] | None = None, student_kwargs: Mapping[str, Any] | None = None,
                        seed: int = 0) -> dict[str, Any]:
    """Generate ``per_class`` examples per class, filter with ``critic``, train and test the student.
    ``instruction`` may use ``{label}`` (the class to write), ``{labels}`` (all classes) and ``{examples}``
    (the first ``examples_shown`` training texts, one a line, unlabelled: they show the form)."""
    expect(critic in ("teacher", "none"), "critic", critic, "'teacher' or 'none'")
    t0 = time.monotonic()
    C = len(data.class_names)
    shown = "\n".join(f"- {t}" for t in data.train_texts[:examples_shown])
    reqs, req_class = [], []
    for c, name in enumerate(data.class_names):
        for k in range(per_class):
            prompt = instruction.format(label=name, labels=", ".join(data.class_names), examples=shown)
            reqs.append({"messages": [{"role": "user", "content": prompt}],
                         "max_tokens": max_tokens, "temperature": temperature, "seed": seed * 100_000 + c * 1000 + k})
            req_class.append(c)
    replies = teacher.run(reqs)
    counts = {"requested": len(reqs), "failed_requests": 0, "malformed": 0, "duplicates": 0, "generated": 0,
              "rejected_by_critic": 0, "kept": 0}
    cand, cand_y, seen = [], [], set(data.test_texts)
    for rep, c in zip(replies, req_class, strict=True):
        if not rep.ok:
            counts["failed_requests"] += 1
            continue
        lines = parse_examples(rep.text)
        if not lines:
            counts["malformed"] += 1
            continue
        s = lines[0]
        if s in seen:
            counts["duplicates"] += 1
            continue
        seen.add(s)
        cand.append(s)
        cand_y.append(c)
    counts["generated"] = len(cand)
    keep = list(range(len(cand)))
    if critic == "teacher" and cand:
        res = label(cand, data.class_names, teacher, seed=seed, **dict(label_kwargs or {}))
        keep = []
        for i, (y, s) in enumerate(zip(res.labels, res.soft, strict=True)):
            ok = y == cand_y[i] and (s is None or float(s[cand_y[i]]) >= min_confidence)
            keep.append(i) if ok else None
    counts["kept"] = len(keep)
    counts["rejected_by_critic"] = len(cand) - len(keep)
    per_class_kept = {data.class_names[c]: sum(1 for i in keep if cand_y[i] == c) for c in range(C)}
    report: dict[str, Any] = {"counts": counts, "kept_per_class": per_class_kept,
                              "examples_kept": [cand[i] for i in keep[:5]],
                              "examples_rejected": [cand[i] for i in range(len(cand)) if i not in set(keep)][:5],
                              "student": {"metrics": {}, "trained_on": len(keep)}}
    if len({cand_y[i] for i in keep}) >= 2:
        st = TextStudent(C, seed=seed, **dict(student_kwargs or {}))
        st.fit([cand[i] for i in keep], one_hot([cand_y[i] for i in keep], C))
        metrics = {data.test_metric: st.accuracy(data.test_texts, data.test_labels)} \
            if data.test_texts and data.test_labels is not None else {}
        report["student"] = {"params": st.num_params(), "trained_on": len(keep), "metrics": metrics}
    report["teacher"] = {"cost": teacher.cost()}
    report["seconds"] = time.monotonic() - t0
    return report
