"""Text classification data for the black-box pipelines: WordNet glosses -> coarse supersenses.

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

from ..errors import expect, unknown_name

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
    """Texts and integer labels (index into ``class_names``) for train / val / test."""

    name: str
    class_names: list[str]
    train_texts: list[str]
    train_labels: list[int]
    val_texts: list[str]
    val_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "classes": self.class_names, "train": len(self.train_texts),
                "val": len(self.val_texts), "test": len(self.test_texts)}


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
