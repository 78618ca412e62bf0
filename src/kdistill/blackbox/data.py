"""Text classification data for the black-box pipelines: your own texts, or WordNet glosses -> supersenses.

:func:`text_files` reads your rows (``data: {files: ..., text_column: ..., label_names: [...]}``) through
:func:`kdistill.data.files.load_rows`; a ``label_column`` of gold labels is optional and only used to evaluate
(the teacher labels the texts).

WordNet 3.0 (Debian ``wordnet-base``) gives every noun synset a gloss and a lexicographer file
(its supersense). ``wordnet_supersense`` keeps the nouns of a few coarse supersenses (by default
animal, artifact, food, person, plant) and returns balanced, seeded train / val / test splits of
``(text, label)`` where the text is ``"<lemma>: <gloss>"``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import KDistillError, close_matches, expect, unknown_name

# WordNet 3.0 noun lexicographer files (lexnames(5WN)): number -> supersense name.
NOUN_SUPERSENSES = {
    3: "tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 16: "motive",
    17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession", 22: "process",
    23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time",
}
DEFAULT_CLASSES = ["animal", "artifact", "food", "person", "plant"]


@dataclass
class TextData:
    """Texts and integer labels (index into ``class_names``) for train / val / test.

    ``train_labels`` / ``val_labels`` are None when the data has no gold labels; ``test_labels`` are then the
    teacher's labels of the test texts (``reference = "teacher"``, see
    :func:`kdistill.blackbox.label.teacher_reference`), and the student's test metric is ``teacher_agreement``
    instead of ``accuracy``."""

    name: str
    class_names: list[str]
    train_texts: list[str]
    train_labels: list[int] | None
    val_texts: list[str]
    val_labels: list[int] | None
    test_texts: list[str]
    test_labels: list[int] | None
    extra: dict[str, Any] = field(default_factory=dict)
    reference: str = "gold"

    @property
    def has_gold(self) -> bool:
        return self.train_labels is not None

    @property
    def test_metric(self) -> str:
        """Name of the student's test metric: ``accuracy`` against gold labels, else ``teacher_agreement``."""
        return "accuracy" if self.reference == "gold" else "teacher_agreement"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "classes": self.class_names, "train": len(self.train_texts),
                "val": len(self.val_texts), "test": len(self.test_texts), "reference": self.reference,
                **self.extra}


def wordnet_noun_rows() -> list[tuple[str, str, str]]:
    """``(lemma, gloss, supersense)`` for every WordNet noun synset (first lemma of the synset)."""
    from ..data.classification import debian_files

    files = [f for f in debian_files("wordnet-base") if re.search(r"/data\.noun$", f)]
    expect(len(files) == 1, "wordnet-base data.noun files", files, "exactly one /usr/share/wordnet/data.noun",
           "Reinstall: `sudo apt-get install --reinstall wordnet-base`.")
    rows = []
    with open(files[0], encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            p = line.split(" ")
            lex = int(p[1])
            rows.append((p[4].replace("_", " "), line.split(" | ", 1)[1].strip(), NOUN_SUPERSENSES.get(lex, str(lex))))
    return rows


def wordnet_supersense(classes: list[str] | None = None, per_class_train: int = 200, per_class_val: int = 40,
                       per_class_test: int = 60, data_seed: int = 0, max_gloss_chars: int = 200) -> TextData:
    """Balanced splits of WordNet noun glosses labelled with their coarse supersense."""
    classes = list(classes or DEFAULT_CLASSES)
    for c in classes:
        if c not in NOUN_SUPERSENSES.values():
            raise unknown_name("WordNet noun supersense", c, NOUN_SUPERSENSES.values())
    expect(len(set(classes)) == len(classes) >= 2, "classes", classes, "at least two distinct supersenses")
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for lemma, gloss, sense in wordnet_noun_rows():
        if sense in by_class:
            gloss = gloss.split(";")[0].strip()[:max_gloss_chars]  # the definition, without the examples
            by_class[sense].append(f"{lemma}: {gloss}")
    need = per_class_train + per_class_val + per_class_test
    rng = random.Random(data_seed)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for ci, c in enumerate(classes):
        items = sorted(set(by_class[c]))
        expect(len(items) >= need, f"WordNet {c!r} glosses", len(items), f">= {need} (train+val+test per class)",
               "Lower per_class_train / per_class_val / per_class_test.")
        rng.shuffle(items)
        splits["train"] += [(t, ci) for t in items[:per_class_train]]
        splits["val"] += [(t, ci) for t in items[per_class_train:per_class_train + per_class_val]]
        splits["test"] += [(t, ci) for t in items[per_class_train + per_class_val:need]]
    for v in splits.values():
        rng.shuffle(v)
    return TextData("wordnet_supersense", classes,
                    [t for t, _ in splits["train"]], [y for _, y in splits["train"]],
                    [t for t, _ in splits["val"]], [y for _, y in splits["val"]],
                    [t for t, _ in splits["test"]], [y for _, y in splits["test"]])


def check_label_names(label_names: Any) -> list[str]:
    """The label set the teacher chooses from: at least two distinct (case-insensitively), non-empty strings."""
    where = "data.label_names"
    fix = "Fix: list the categories the teacher should choose from, e.g. label_names: [positive, negative]."
    if not isinstance(label_names, (list, tuple)) or not all(isinstance(x, str) for x in label_names):
        raise KDistillError(f"{where}: got {label_names!r}, expected a list of strings. {fix}")
    names = [x.strip() for x in label_names]
    if len(names) < 2:
        raise KDistillError(f"{where}: got {list(label_names)!r}, expected at least two labels (the teacher picks one "
                            f"of them for each text). {fix}")
    if any(not x for x in names):
        raise KDistillError(f"{where}: got {list(label_names)!r}, expected no empty label. {fix}")
    seen: dict[str, str] = {}
    for x in names:
        if x.lower() in seen:
            raise KDistillError(f"{where}: got {seen[x.lower()]!r} and {x!r}, expected labels that differ in more "
                                "than case (the teacher's answer is matched case-insensitively). Fix: remove one.")
        seen[x.lower()] = x
    return names


def _texts(rows: list[dict[str, Any]], column: str, split: str) -> list[str]:
    out = []
    for i, row in enumerate(rows, start=1):
        v = row[column]
        if not isinstance(v, str) or not v.strip():
            raise KDistillError(f"data ({split} split), row {i}, column {column!r} (data.text_column): got {v!r}, "
                                "expected a non-empty text. Fix: fill or remove the row, or point data.text_column "
                                "at the column of texts.")
        out.append(v.strip())
    return out


def _gold(rows: list[dict[str, Any]], column: str, names: list[str], split: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, row in enumerate(rows, start=1):
        v = row[column]
        if isinstance(v, str) and v.strip() in index:
            out.append(index[v.strip()])
            continue
        hint = ""
        if isinstance(v, str):
            m = [n for n in names if n.lower() == v.strip().lower()] or close_matches(v.strip(), names)
            hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
        raise KDistillError(f"data ({split} split), row {i}, column {column!r} (data.label_column): got {v!r}, "
                            f"expected one of data.label_names {names}.{hint} Fix the label in the data, add it to "
                            "data.label_names, or drop data.label_column (gold labels are only used to evaluate).")
    return out


def text_files(*, label_names: list[str], text_column: str = "text", label_column: str | None = None,
               files: Any = None, format: str = "auto", hf_dataset: dict[str, Any] | None = None,
               validation_fraction: float = 0.1, test_fraction: float = 0.1, data_seed: int = 0) -> TextData:
    """Your texts (``files`` or ``hf_dataset``, read by :func:`kdistill.data.files.load_rows`) for the teacher to
    label with one of ``label_names``. ``label_column`` (optional) holds gold labels, strings among
    ``label_names``, used only to evaluate teacher and student. Without it no validation split is cut (nothing
    would use it) and ``train_labels`` / ``val_labels`` / ``test_labels`` are None."""
    from ..data.files import load_rows

    names = check_label_names(label_names)
    rows = load_rows(files=files, format=format, hf_dataset=hf_dataset,
                     validation_fraction=validation_fraction if label_column is not None else 0.0,
                     test_fraction=test_fraction, seed=data_seed, columns=[text_column, label_column])
    texts = {s: _texts(rows.get(s, []), text_column, s) for s in ("train", "validation", "test")}
    gold: dict[str, list[int] | None] = {
        s: _gold(rows.get(s, []), label_column, names, s) if label_column is not None else None
        for s in ("train", "validation", "test")}
    return TextData("files", names, texts["train"], gold["train"], texts["validation"], gold["validation"],
                    texts["test"], gold["test"], reference="gold" if label_column is not None else "none")
