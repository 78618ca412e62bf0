"""Your own texts for the black-box pipelines (blackbox.data.text_files) and label names that are phrases."""

import json

import pytest

from kdistill.blackbox.data import check_label_names, text_files
from kdistill.blackbox.label import parse_label
from kdistill.errors import KDistillError

NAMES = ["spam", "not spam"]


def test_label_names_may_be_phrases():
    assert parse_label("not spam", NAMES) == 1
    assert parse_label("Spam.", NAMES) == 0
    assert parse_label("This is not spam", NAMES) == 1  # 'spam' inside 'not spam' is not a second label
    assert parse_label("spam, or maybe not spam", NAMES) is None  # both named on their own
    assert parse_label("sci-fi", ["sci-fi", "drama"]) == 0 and parse_label("dramas", ["sci-fi", "drama"]) == 1


def test_check_label_names():
    assert check_label_names([" a ", "b"]) == ["a", "b"]
    for bad, match in ((["a"], "at least two"), ("ab", "list of strings"), (["a", "A"], "more than case"),
                       (["a", ""], "no empty label"), ([1, 2], "list of strings")):
        with pytest.raises(KDistillError, match=match):
            check_label_names(bad)


def _rows(n=20):
    return [{"text": f"text number {i}", "gold": "spam" if i % 2 else "not spam"} for i in range(n)]


def test_text_files_with_split_files_and_gold_labels(tmp_path):
    for split, n in (("train", 20), ("test", 6)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n)))
    d = text_files(files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
                   label_names=NAMES, label_column="gold", validation_fraction=0.1)
    assert (len(d.train_texts), len(d.val_texts), len(d.test_texts)) == (18, 2, 6)
    assert d.has_gold and d.reference == "gold" and d.test_metric == "accuracy"
    assert d.test_labels == [0 if i % 2 else 1 for i in range(6)]


def test_text_files_without_gold_labels_cuts_no_validation_split(tmp_path):
    (tmp_path / "t.csv").write_text("text,gold\n" + "".join(f"{r['text']},{r['gold']}\n" for r in _rows()))
    d = text_files(files=str(tmp_path / "*.csv"), label_names=NAMES, test_fraction=0.25)
    assert (len(d.train_texts), len(d.val_texts), len(d.test_texts)) == (15, 0, 5)
    assert d.train_labels is None and d.test_labels is None and not d.has_gold
    assert d.summary()["reference"] == "none"


def test_text_files_reads_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(_rows()).save_to_disk(str(tmp_path / "ds"))
    d = text_files(hf_dataset={"path": str(tmp_path / "ds")}, label_names=NAMES, label_column="gold",
                   validation_fraction=0.1, test_fraction=0.1)
    assert (len(d.train_texts), len(d.val_texts), len(d.test_texts)) == (16, 2, 2)
    assert sorted(d.train_texts + d.val_texts + d.test_texts) == sorted(r["text"] for r in _rows())


def test_a_missing_label_column_is_named(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    with pytest.raises(KDistillError, match="column 'golden' is not in the data. Did you mean 'gold'"):
        text_files(files=str(tmp_path / "t.jsonl"), label_names=NAMES, label_column="golden")
