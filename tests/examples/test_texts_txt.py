"""recipes/examples/texts_txt: unlabelled texts, one a line, distilled without pairs."""

import json

import pytest


def write_encoder_and_texts(folder, n=200):
    from kdistill.exporters.sentence_transformers import save_sentence_transformer
    from kdistill.students.encoders import tiny_corpus, tiny_encoder

    save_sentence_transformer(tiny_encoder(num_layers=4, seed=1), folder / "my_encoder")
    texts = list(dict.fromkeys(tiny_corpus(n, seed=5)))
    (folder / "texts.txt").write_text("\n".join(texts) + "\n")
    return texts


def test_texts_train_and_report_agreement_with_the_teacher(tmp_path, example):
    texts = write_encoder_and_texts(tmp_path)
    r, rep = example("examples/texts_txt")
    assert r.exit_code == 0, r.output
    assert rep["data"]["test_texts"] == round(len(texts) * 0.2) and "test_pairs" not in rep["data"]
    m, u = rep["student"]["metrics"], rep["variants"]["untrained"]["metrics"]
    assert 0.0 <= m["neighbour_agreement"] <= 1.0 and m["neighbour_k"] == 10
    assert -1.0 <= m["cosine_to_teacher"] <= 1.0 and -1.0 <= m["spearman_vs_teacher"] <= 1.0
    assert 0.0 <= u["neighbour_agreement"] <= 1.0
    log = [json.loads(x) for x in (tmp_path / "run" / "work" / "metrics.jsonl").read_text().splitlines()]
    assert any("cosine" in h for h in log) and (tmp_path / "run" / "curves.png").is_file()  # dev learning curve
    assert "recall_at_1" not in m and rep["agreement"]["neighbour_agreement"] == m["neighbour_agreement"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "neighbour agreement" in md and "nearest other held-out texts" in md
    ev = example.cli("eval", "run")
    assert ev.exit_code == 0, ev.output
    got = json.loads(ev.stdout)
    assert got["test_texts"] == rep["data"]["test_texts"]
    assert got["metrics"]["neighbour_agreement"] == pytest.approx(m["neighbour_agreement"])


def test_a_pair_term_on_texts_is_refused_at_load(tmp_path, example):
    write_encoder_and_texts(tmp_path, n=40)
    r, _ = example("examples/texts_txt", "method.kwargs={cosine_weight: 1.0, pair_weight: 0.5}")
    assert r.exit_code == 2, r.output
    assert "embedding_kd" in r.output and "text_column" in r.output and "drop the pair term" in r.output
    assert not (tmp_path / "run" / "report.json").exists()
