import json
import os

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.exporters.sentence_transformers import (
    DEFAULT_CHECK_SENTENCES,
    check_sentence_transformers,
    export_onnx,
    load_student,
    save_sentence_transformer,
)
from kdistill.students.encoders import SentenceEncoder, layer_subset, narrow_encoder, tiny_encoder
from kdistill.students.static import StaticEncoder, static_from_teacher

SENTS = list(DEFAULT_CHECK_SENTENCES) + ["light dark water", "the king of the river"]


@pytest.fixture(scope="module")
def teacher():
    return tiny_encoder(num_layers=2, seed=3)


def _students(teacher):
    narrow = narrow_encoder(teacher, hidden_size=16, num_layers=1, num_heads=1)
    static = static_from_teacher(teacher, dim=8, weighting="zipf", batch_size=64)
    static.projection = torch.nn.Linear(8, 32)
    return {"subset": layer_subset(teacher, [1]), "narrow": narrow, "static": static}


def test_exported_students_load_in_plain_sentence_transformers_with_identical_embeddings(teacher, tmp_path):
    from sentence_transformers import SentenceTransformer

    for name, student in _students(teacher).items():
        path = save_sentence_transformer(student, tmp_path / name, metadata={"recipe": "test"})
        assert json.loads((path / "kdistill.json").read_text())["recipe"] == "test"
        st = SentenceTransformer(str(path), device="cpu")
        theirs = torch.as_tensor(st.encode(SENTS))
        assert theirs.shape == (len(SENTS), 32)
        assert torch.allclose(theirs, student.encode(SENTS), atol=1e-6), name
        assert check_sentence_transformers(student, path, SENTS) < 1e-6
        back = load_student(path)
        assert isinstance(back, StaticEncoder if name == "static" else SentenceEncoder)
        assert torch.allclose(back.encode(SENTS), student.encode(SENTS), atol=1e-6)


def test_export_contains_no_method_parameters_and_replaces_atomically(teacher, tmp_path):
    student = layer_subset(teacher, [0])
    path = save_sentence_transformer(student, tmp_path / "s")
    save_sentence_transformer(student, tmp_path / "s")  # overwrite in place
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("s")) == []  # no temp leftovers
    from safetensors.torch import load_file

    keys = load_file(str(path / "model.safetensors")).keys()
    assert not any("projector" in k for k in keys)
    assert len(json.loads((path / "modules.json").read_text())) == 3  # Transformer, Pooling, Normalize


def test_export_rejects_other_models(tmp_path):
    with pytest.raises(KDistillError, match="SentenceEncoder or StaticEncoder"):
        save_sentence_transformer(torch.nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_onnx_parity_across_batch_shapes(teacher, tmp_path):
    import onnxruntime as ort

    student = narrow_encoder(teacher, hidden_size=16, num_layers=1, num_heads=1)
    info = export_onnx(student, tmp_path / "s.onnx", sentences=SENTS)
    assert info["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    other = ["one more sentence with light and many many words of the river and the king", "x", "a b"]
    batch = student.tokenize(other)
    got = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    assert torch.allclose(torch.from_numpy(got), student.encode(other), atol=1e-4)
    with pytest.raises(KDistillError, match="SentenceEncoder"):
        export_onnx(static_from_teacher(teacher, dim=8, batch_size=64), tmp_path / "x.onnx")


@pytest.mark.resources
def test_minilm_two_layer_student_round_trip(tmp_path):
    from sentence_transformers import SentenceTransformer

    from kdistill.students.encoders import load_sentence_encoder

    student = layer_subset(load_sentence_encoder("minilm-l6"), [0, 5])
    path = save_sentence_transformer(student, tmp_path / "minilm2")
    st = SentenceTransformer(str(path), device="cpu")
    assert torch.allclose(torch.as_tensor(st.encode(SENTS)), student.encode(SENTS), atol=1e-5)


def test_api_export_of_an_embedding_run_folder(teacher, tmp_path):
    from kdistill import api

    student = layer_subset(teacher, [0])
    save_sentence_transformer(student, tmp_path / "run" / "student", metadata={"recipe": "r"})
    res = api.export(tmp_path / "run", tmp_path / "out")
    assert res["kind"] == "SentenceEncoder" and res["st_max_abs_diff"] < 1e-6
    assert json.loads((tmp_path / "out" / "kdistill.json").read_text())["recipe"] == "r"
    assert torch.allclose(load_student(tmp_path / "out").encode(SENTS), student.encode(SENTS), atol=1e-6)
