"""recipes/examples/pairs_jsonl: (query, positive) pairs from a JSONL file, a teacher encoder folder."""

import json

import pytest


def write_encoder_and_pairs(folder):
    from kdistill.exporters.sentence_transformers import save_sentence_transformer
    from kdistill.students.encoders import tiny_corpus, tiny_encoder

    save_sentence_transformer(tiny_encoder(num_layers=4, seed=1), folder / "my_encoder")
    rows = [{"query": " ".join(s.split()[: max(1, len(s.split()) // 2)]), "positive": s}
            for s in tiny_corpus(200, seed=5)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_pairs_jsonl_with_an_encoder_folder(tmp_path, example):
    rows = write_encoder_and_pairs(tmp_path)
    r, rep = example("examples/pairs_jsonl")
    assert r.exit_code == 0, r.output
    assert rep["student"]["params"] < rep["teacher"]["params"]
    for who in ("teacher", "student"):
        assert 0.0 <= rep[who]["metrics"]["recall_at_1"] <= rep[who]["metrics"]["recall_at_10"] <= 1.0
    ev = example.cli("eval", "run")
    assert ev.exit_code == 0, ev.output
    got = json.loads(ev.stdout)
    assert got["test_pairs"] == round(len(rows) * 0.2)
    assert got["metrics"]["recall_at_1"] == pytest.approx(rep["student"]["metrics"]["recall_at_1"])
    # a pretrained student folder works the same way: the exported student, distilled again
    again, _ = example("examples/pairs_jsonl", "student={pretrained: run/student}", "train.epochs=1", output="run2")
    assert again.exit_code == 0, again.output


def test_a_misspelt_pair_column_is_named_with_the_columns_found(tmp_path, example):
    write_encoder_and_pairs(tmp_path)
    r, _ = example("examples/pairs_jsonl", "data.positive_column=postive")
    assert r.exit_code == 2 and "Did you mean 'positive'" in r.output and "Columns found: positive, query" in r.output
