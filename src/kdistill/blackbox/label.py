"""``label``: instruction-based labelling of unlabelled texts by an API teacher, then a student classifier.

After TAIL (task-specific instruction-following annotation with LLMs, 2024) and the line of work on
LLM annotation: the teacher gets an instruction listing the fixed label set and answers with one
label. A strict parser accepts an answer only when it names exactly one label (malformed answers are
counted, never guessed). When the server returns ``top_logprobs``, the first answer token's
distribution is mapped onto the labels whose names begin with that token and renormalised: a soft
label ``q(c | x)`` (kept when the label tokens hold at least ``min_label_mass`` of that position).
The student is trained with soft cross-entropy on ``q`` (soft) or on the parsed
label (one-hot); texts without a usable answer are left out and counted.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import KDistillError
from ..teachers.api import APITeacher, TeacherReply
from .data import TextData

LABEL_INSTRUCTION = ("Classify the text into exactly one of these categories: {labels}.\n"
                     "Text: {text}\n"
                     "Answer with the category name only.")


def label_request(text: str, class_names: Sequence[str], *, instruction: str = LABEL_INSTRUCTION,
                  max_tokens: int = 6, temperature: float = 0.0, top_logprobs: int = 10, use_logprobs: bool = True,
                  seed: int = 0, endpoint: str = "chat", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The request asking the teacher for one label of ``text``: a chat request, or with
    ``endpoint="completions"`` a plain completion of the formatted instruction (useful for few-shot
    prompts ending in e.g. ``"->"`` with small or base models)."""
    prompt = instruction.format(labels=", ".join(class_names), text=text)
    req: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    if endpoint == "chat":
        req["messages"] = [{"role": "user", "content": prompt}]
        if use_logprobs and top_logprobs > 0:
            req["logprobs"] = True
            req["top_logprobs"] = top_logprobs
    elif endpoint == "completions":
        req["prompt"] = prompt
        if use_logprobs and top_logprobs > 0:
            req["logprobs"] = top_logprobs
    else:
        raise KDistillError(f"label endpoint: got {endpoint!r}, expected 'chat' or 'completions'.")
    req.update(dict(extra or {}))
    return req


def parse_label(answer: str, class_names: Sequence[str]) -> int | None:
    """Index of the single label named in ``answer`` (case-insensitive, whole words, plural 's' allowed),
    or None when it names none or several. Labels may be phrases (``not spam``); a label found only inside a
    longer one that was also found (``spam`` in ``not spam``) does not count as a second label."""
    low = answer.lower()
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, c in enumerate(class_names):
        pat = r"(?<![a-z])" + re.escape(c.lower().strip()) + r"s?(?![a-z])"
        hits = [m.span() for m in re.finditer(pat, low)]
        if hits:
            spans[i] = hits
    found = [i for i, hits in spans.items()
             if not all(any(j != i and a <= s and e <= b and (b - a) > (e - s) for j, other in spans.items()
                            for a, b in other) for s, e in hits)]
    return found[0] if len(found) == 1 else None


def soft_label(reply: TeacherReply, class_names: Sequence[str], *, min_label_mass: float = 0.1,
               max_positions: int = 3) -> np.ndarray | None:
    """Label distribution read off the first answer position (the first generated token that is not
    whitespace, within ``max_positions``): every top token that begins exactly one label name gives that
    label its probability, and the result is renormalised over the labels (a verbaliser). None -- no soft
    label -- when no log-probs were returned or the label tokens carry less than ``min_label_mass`` of
    that position's probability (the teacher was about to say something else)."""
    names = [c.lower() for c in class_names]
    for pos, top in enumerate(reply.top_logprobs[:max_positions]):
        chosen = reply.tokens[pos].strip() if pos < len(reply.tokens) else "x"
        if not chosen:
            continue  # whitespace before the answer
        mass = np.zeros(len(names), dtype=np.float64)
        for tok, lp in top.items():
            t = tok.strip().lower()
            if not t or not math.isfinite(lp):
                continue
            hits = [i for i, n in enumerate(names) if n.startswith(t) or (t.startswith(n) and t.rstrip("s.") == n)]
            if len(hits) == 1:
                mass[hits[0]] += math.exp(lp)
        if mass.sum() <= 0 or mass.sum() < min_label_mass:
            return None
        return (mass / mass.sum()).astype(np.float32)
    return None


TARGET_KINDS = ("soft", "argmax", "parsed")


@dataclass
class LabelResult:
    """Per-text outcomes of a labelling run. ``labels[i]`` is -1 when the answer was unusable."""

    labels: list[int]
    soft: list[np.ndarray | None]
    answers: list[str]
    statuses: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    def targets(self, num_classes: int, kind: str = "soft") -> tuple[list[int], np.ndarray]:
        """Indices of usable texts and their target distributions. ``kind``: ``soft`` -- the soft label
        where there is one, else the parsed label one-hot; ``argmax`` -- one-hot of the soft label's argmax,
        else of the parsed label; ``parsed`` -- one-hot of the parsed label only (soft labels ignored)."""
        if kind not in TARGET_KINDS:
            raise KDistillError(f"label targets: got {kind!r}, expected one of {', '.join(TARGET_KINDS)}.")
        eye = np.eye(num_classes, dtype=np.float32)
        keep, rows = [], []
        for i, (y, s) in enumerate(zip(self.labels, self.soft, strict=True)):
            if kind != "parsed" and s is not None:
                keep.append(i)
                rows.append(s if kind == "soft" else eye[int(np.argmax(s))])
            elif y >= 0:
                keep.append(i)
                rows.append(eye[y])
        return keep, (np.stack(rows) if rows else np.zeros((0, num_classes), np.float32))


def label(texts: Sequence[str], class_names: Sequence[str], teacher: APITeacher, *,
          instruction: str = LABEL_INSTRUCTION, max_tokens: int = 6, temperature: float = 0.0, top_logprobs: int = 10,
          use_logprobs: bool = True, min_label_mass: float = 0.1, seed: int = 0, endpoint: str = "chat",
          extra: Mapping[str, Any] | None = None) -> LabelResult:
    """Ask ``teacher`` for one label per text; parse strictly; soft labels from top_logprobs."""
    reqs = [label_request(t, class_names, instruction=instruction, max_tokens=max_tokens, temperature=temperature,
                          top_logprobs=top_logprobs, use_logprobs=use_logprobs, seed=seed, endpoint=endpoint,
                          extra=extra) for t in texts]
    replies = teacher.run(reqs)
    labels, softs, answers, statuses = [], [], [], []
    counts = {"texts": len(texts), "answered": 0, "parsed": 0, "malformed": 0, "soft": 0, "soft_only": 0,
              "soft_agrees_with_parsed": 0, "failed_requests": 0, "skipped_budget": 0}
    for rep in replies:
        statuses.append(rep.status)
        answers.append(rep.text)
        if not rep.ok:
            counts["failed_requests" if rep.status == "error" else "skipped_budget"] += 1
            labels.append(-1)
            softs.append(None)
            continue
        counts["answered"] += 1
        y = parse_label(rep.text, class_names)
        s = soft_label(rep, class_names, min_label_mass=min_label_mass) if use_logprobs else None
        if y is None:
            counts["malformed"] += 1
        else:
            counts["parsed"] += 1
        if s is not None:
            counts["soft"] += 1
            if y is None:
                counts["soft_only"] += 1
            elif int(np.argmax(s)) == y:
                counts["soft_agrees_with_parsed"] += 1
        labels.append(-1 if y is None else y)
        softs.append(s)
    return LabelResult(labels, softs, answers, statuses, counts)


def teacher_accuracy(result: LabelResult, gold: Sequence[int]) -> dict[str, float]:
    """Teacher accuracy against gold labels: ``accuracy`` over all texts (unparsed = wrong),
    ``accuracy_parsed`` over parsed answers (``coverage`` = their share), ``soft_accuracy`` of the soft
    labels' argmax over the texts that have one."""
    y = np.asarray(result.labels)
    g = np.asarray(gold)
    parsed = y >= 0
    out = {"accuracy": float((y == g).mean()) if len(g) else float("nan"),
           "accuracy_parsed": float((y[parsed] == g[parsed]).mean()) if parsed.any() else float("nan"),
           "coverage": float(parsed.mean()) if len(g) else float("nan")}
    soft_pred = np.array([int(np.argmax(s)) if s is not None else -1 for s in result.soft])
    if (soft_pred >= 0).any():
        m = soft_pred >= 0
        out["soft_accuracy"] = float((soft_pred[m] == g[m]).mean())
    return out


def teacher_reference(data: TextData, teacher: APITeacher, *, label_kwargs: Mapping[str, Any] | None = None,
                      seed: int = 0) -> TextData:
    """For data without gold labels: the teacher labels the test texts (the same ``label`` request as for
    training), and those labels become the reference the student is compared with (``teacher_agreement``).
    Test texts without a usable answer are left out and counted (``data.extra["test_without_teacher_label"]``)."""
    if data.has_gold or not data.test_texts:
        return data
    res = label(data.test_texts, data.class_names, teacher, seed=seed, **dict(label_kwargs or {}))
    keep, q = res.targets(len(data.class_names), "argmax")
    extra = {**data.extra, "test_without_teacher_label": len(data.test_texts) - len(keep),
             "test_label_counts": res.counts}
    return replace(data, test_texts=[data.test_texts[i] for i in keep], test_labels=[int(y) for y in q.argmax(-1)],
                   extra=extra, reference="teacher")


def run_label_pipeline(data: TextData, teacher: APITeacher, *, label_kwargs: Mapping[str, Any] | None = None,
                       student_kwargs: Mapping[str, Any] | None = None, targets: str = "soft",
                       variants: bool = True, baseline: bool = True, seed: int = 0) -> dict[str, Any]:
    """Label ``data.train_texts`` with the teacher, train a student on the usable labels (``targets``: see
    :meth:`LabelResult.targets`), evaluate it on the test split (gold labels, or the teacher's: see
    :func:`teacher_reference`). ``variants`` also trains the same student on the other target kinds (no extra
    requests); ``baseline`` on the gold labels of the same texts (only when there are gold labels). Returns a
    report fragment (teacher / student / variants / baseline / counts / cost)."""
    from .student import TextStudent, one_hot  # torch / training imports only where a student trains

    t0 = time.monotonic()
    C = len(data.class_names)
    res = label(data.train_texts, data.class_names, teacher, seed=seed, **dict(label_kwargs or {}))
    keep, tgt = res.targets(C, targets)
    metrics: dict[str, float] = {}
    if data.train_labels is not None:  # gold labels: how good the teacher's labels are
        metrics = teacher_accuracy(res, data.train_labels)
    if keep and data.train_labels is not None:  # how often the student's targets point at the gold class
        metrics["target_accuracy"] = float((tgt.argmax(-1) == np.asarray(data.train_labels)[keep]).mean())
    report: dict[str, Any] = {
        "teacher": {"metrics": metrics, "counts": res.counts, "cost": teacher.cost()},
        "student": {"metrics": {}, "trained_on": len(keep), "targets": targets},
        "variants": {},
    }

    def train(kind: str) -> dict[str, Any] | None:
        idx, q = res.targets(C, kind)
        if not idx:
            return None
        st = TextStudent(C, seed=seed, **dict(student_kwargs or {}))
        st.fit([data.train_texts[i] for i in idx], q)
        m: dict[str, float] = {}
        if data.test_texts and data.test_labels is not None:
            m[data.test_metric] = st.accuracy(data.test_texts, data.test_labels)
        if data.val_texts and data.val_labels is not None:
            m["val_accuracy"] = st.accuracy(data.val_texts, data.val_labels)
        m["final_train_loss"] = st.history[-1]
        return {"params": st.num_params(), "trained_on": len(idx), "targets": kind, "metrics": m}

    main = train(targets)
    if main is not None:
        report["student"] = main
    if variants:
        for kind in TARGET_KINDS:
            if kind != targets and (v := train(kind)) is not None:
                report["variants"][f"targets_{kind}"] = v
    if baseline and data.train_labels is not None and data.test_labels is not None:
        gold = TextStudent(C, seed=seed, **dict(student_kwargs or {}))
        gold.fit(data.train_texts, one_hot(data.train_labels, C))
        report["baseline"] = {"note": "same student trained on the gold labels of the same texts",
                              "trained_on": len(data.train_texts),
                              "metrics": {"accuracy": gold.accuracy(data.test_texts, data.test_labels)}}
    report["examples"] = [{"text": data.train_texts[i], "answer": res.answers[i], "parsed": res.labels[i],
                           "gold": data.train_labels[i] if data.train_labels is not None else None}
                          for i in range(min(5, len(res.answers)))]
    report["seconds"] = time.monotonic() - t0
    report["label_result"] = res
    return report
