"""recipes/examples/triples_jsonl: (query, positive, hard negative) triples from a JSONL file."""

import json
import random

import pytest


def write_encoder_and_triples(folder, n=200):
    from kdistill.exporters.sentence_transformers import save_sentence_transformer
    from kdistill.students.encoders import tiny_corpus, tiny_encoder

    save_sentence_transformer(tiny_encoder(num_layers=4, seed=1), folder / "my_encoder")
    texts = tiny_corpus(n, seed=5)
    rng = random.Random(0)
    rows = []
    for i, s in enumerate(texts):  # negative: another sentence (never the row's own positive)
        j = (i + 1 + rng.randrange(n - 1)) % n
        rows.append({"query": " ".join(s.split()[: max(1, len(s.split()) // 2)]), "positive": s,
                     "negative": texts[j]})
    (folder / "triples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_triples_train_and_put_the_negatives_in_the_test_pool(tmp_path, example):
    rows = write_encoder_and_triples(tmp_path)
    r, rep = example("examples/triples_jsonl")
    assert r.exit_code == 0, r.output
    assert rep["data"]["test_pairs"] == round(len(rows) * 0.2) and rep["data"]["test_negatives"] > 0
    # training rows are whole triples: every text of the 140 training rows is embedded, 3 a row
    assert rep["data"]["train_sentences"] == 3 * (len(rows) - 40 - 20)
    for who in ("teacher", "student"):
        assert 0.0 <= rep[who]["metrics"]["recall_at_1"] <= rep[who]["metrics"]["recall_at_10"] <= 1.0
    assert "hard negatives" in (tmp_path / "run" / "report.md").read_text()
    log = [json.loads(x) for x in (tmp_path / "run" / "work" / "metrics.jsonl").read_text().splitlines()]
    assert any("margin" in h for h in log) and any("listwise" in h for h in log)
    ev = example.cli("eval", "run")
    assert ev.exit_code == 0, ev.output
    got = json.loads(ev.stdout)
    assert got["metrics"]["recall_at_1"] == pytest.approx(rep["student"]["metrics"]["recall_at_1"])


@pytest.mark.parametrize("bad, shown", [("", "''"), (None, "None"), (7, "7 (int)")])
def test_a_bad_negative_is_named_with_its_row(tmp_path, example, bad, shown):
    rows = write_encoder_and_triples(tmp_path, n=40)
    rows[3]["negative"] = bad
    (tmp_path / "triples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r, _ = example("examples/triples_jsonl", "data.test_fraction=0", "data.validation_fraction=0",
                   "data.files={train: triples.jsonl, validation: triples.jsonl, test: triples.jsonl}")
    assert r.exit_code == 2, r.output
    assert "row 4, column 'negative'" in r.output and shown in r.output and "hard negative" in r.output


def test_a_misspelt_negative_column_is_named_with_the_columns_found(tmp_path, example):
    write_encoder_and_triples(tmp_path, n=40)
    r, _ = example("examples/triples_jsonl", "data.negative_column=negativ")
    assert r.exit_code == 2 and "Did you mean 'negative'" in r.output
