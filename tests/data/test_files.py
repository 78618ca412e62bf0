"""Reading user files: every format, splits, and one clear error for each kind of bad input."""

import json

import pytest

from kdistill.data.files import load_rows, read_rows, require_columns, resolve_files, split_rows
from kdistill.errors import KDistillError

ROWS = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]


def _write(tmp_path, name, rows):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        p.write_text(json.dumps(rows))
    elif name.endswith((".csv", ".tsv")):
        sep = "," if name.endswith(".csv") else "\t"
        p.write_text(sep.join(rows[0]) + "\n" + "".join(sep.join(str(v) for v in r.values()) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("name", ["a.jsonl", "a.json", "a.csv", "a.tsv"])
def test_every_text_format_reads_the_same_rows(tmp_path, name):
    assert read_rows([_write(tmp_path, name, ROWS)]) == ROWS


def test_parquet_and_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    assert read_rows([tmp_path / "a.parquet"]) == ROWS
    (tmp_path / "a.txt").write_text("one line\n\nanother\n")
    assert read_rows([tmp_path / "a.txt"]) == [{"text": "one line"}, {"text": "another"}]


def test_globs_lists_and_missing_files(tmp_path):
    _write(tmp_path, "a.jsonl", ROWS[:5])
    _write(tmp_path, "b.jsonl", ROWS[5:])
    assert [p.name for p in resolve_files("*.jsonl", base=tmp_path)] == ["a.jsonl", "b.jsonl"]
    assert read_rows(resolve_files(["a.jsonl", "b.jsonl"], base=tmp_path)) == ROWS
    with pytest.raises(KDistillError, match="matches no file"):
        resolve_files("nope/*.csv", base=tmp_path)


def test_bad_files_are_one_clear_error_each(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(KDistillError, match="holds no rows"):
        read_rows([tmp_path / "empty.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(KDistillError, match="line 2 is not valid JSON"):
        read_rows([tmp_path / "bad.jsonl"])
    (tmp_path / "mixed.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(KDistillError, match=r"row 2 has other columns.*missing \['label'\]"):
        read_rows([tmp_path / "mixed.jsonl"])
    (tmp_path / "short.csv").write_text("text,label\na,1\nb\n")
    with pytest.raises(KDistillError, match="line 3 has another number of fields"):
        read_rows([tmp_path / "short.csv"])
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(KDistillError, match="cannot tell the format"):
        read_rows([tmp_path / "x.xlsx"])
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(KDistillError, match="row 1 is a list"):
        read_rows([tmp_path / "list.jsonl"])
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(KDistillError, match="cannot be read as csv"):
        read_rows([tmp_path / "latin.csv"])


def test_missing_column_names_close_matches_and_the_columns_found():
    with pytest.raises(KDistillError, match=r"column 'lable' is not in the data\. Did you mean 'label'\?.*text"):
        require_columns(ROWS, ["text", "lable"], where="data")


def test_splits_are_seeded_disjoint_and_complete():
    a = split_rows(ROWS, validation_fraction=0.1, test_fraction=0.2, seed=3)
    b = split_rows(ROWS, validation_fraction=0.1, test_fraction=0.2, seed=3)
    assert a == b and (len(a["train"]), len(a["validation"]), len(a["test"])) == (14, 2, 4)
    texts = [r["text"] for part in a.values() for r in part]
    assert sorted(texts) == sorted(r["text"] for r in ROWS)
    assert split_rows(ROWS, validation_fraction=0.1, test_fraction=0.2, seed=4) != a
    with pytest.raises(KDistillError, match="nothing to train on"):
        split_rows(ROWS[:2], validation_fraction=0.1, test_fraction=0.1, seed=0)


def test_load_rows_with_split_files_and_columns(tmp_path):
    _write(tmp_path, "train.jsonl", ROWS)
    _write(tmp_path, "test.jsonl", ROWS[:3])
    got = load_rows(files={"train": "train.jsonl", "test": "test.jsonl"}, validation_fraction=0.25, base=tmp_path,
                    columns=["text", "label"])
    assert got["test"] == ROWS[:3] and len(got["validation"]) == 5 and len(got["train"]) == 15
    with pytest.raises(KDistillError, match="expected 'train'"):
        load_rows(files={"dev": "train.jsonl"}, base=tmp_path)
    with pytest.raises(KDistillError, match="exactly one of data.files and data.hf_dataset"):
        load_rows()


def test_hugging_face_dataset_folder_and_offline_hub_id(tmp_path, monkeypatch):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:16]),
                          "test": datasets.Dataset.from_list(ROWS[16:])}).save_to_disk(str(tmp_path / "ds"))
    got = load_rows(hf_dataset={"path": str(tmp_path / "ds")}, validation_fraction=0.25, columns=["label"])
    assert got["test"] == ROWS[16:] and len(got["train"]) == 12 and len(got["validation"]) == 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KDistillError, match="hub ids need the network"):
        load_rows(hf_dataset={"path": "someone/some-dataset"})
