import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.students.encoders import encoder_forward, tiny_corpus, tiny_encoder
from kdistill.students.static import (
    StaticEncoder,
    pca,
    static_from_teacher,
    teacher_token_vectors,
    token_counts,
    token_weights,
)

SENTENCES = tiny_corpus(10, seed=5) + ["", "light light dark"]


def _dist(x):
    return (x[:, None, :] - x[None, :, :]).norm(dim=-1)


@pytest.fixture(scope="module")
def teacher():
    return tiny_encoder(num_layers=2, seed=2)


def test_static_mean_of_token_vectors(teacher):
    tok = teacher.tokenizer
    v = len(tok)
    table = torch.randn(v, 6)
    enc = StaticEncoder(table, tok, normalize=False)
    ids = tok("light dark", add_special_tokens=False)["input_ids"]
    expected = table[ids].mean(0)
    assert torch.allclose(enc.encode(["light dark"])[0], expected, atol=1e-6)
    assert torch.equal(enc.encode([""])[0], torch.zeros(6))  # no tokens -> zero vector


def test_padded_forward_equals_bag_encode(teacher):
    enc = StaticEncoder(torch.randn(len(teacher.tokenizer), 8), teacher.tokenizer)
    batch = teacher.tokenize(SENTENCES, max_length=64)
    with torch.no_grad():
        assert torch.allclose(encoder_forward(enc, batch), enc.encode(SENTENCES), atol=1e-6)


def test_token_weights_zipf_and_sif():
    counts = torch.tensor([5.0, 100.0, 0.0, 20.0], dtype=torch.float64)
    z = token_weights(4, weighting="zipf", counts=counts)
    # ranks: id1 -> 0, id3 -> 1, id0 -> 2, id2 -> 3
    assert torch.allclose(z, torch.log(torch.tensor([4.0, 2.0, 5.0, 3.0])))
    assert torch.allclose(token_weights(3, weighting="zipf"), torch.log(torch.tensor([2.0, 3.0, 4.0])))
    s = token_weights(4, weighting="sif", counts=counts, sif_a=0.1)
    p = counts / 125.0
    assert torch.allclose(s, (0.1 / (0.1 + p)).float())
    assert s[2] == 1.0 and s[1] < s[3] < s[0]  # frequent tokens weigh less
    with pytest.raises(KDistillError, match="corpus"):
        token_weights(4, weighting="sif")
    with pytest.raises(KDistillError, match="static weighting"):
        token_weights(4, weighting="tfidf")


def test_token_counts(teacher):
    counts = token_counts(teacher.tokenizer, ["light light dark", "light"])
    light = teacher.tokenizer.convert_tokens_to_ids("light")
    dark = teacher.tokenizer.convert_tokens_to_ids("dark")
    assert counts[light] == 3 and counts[dark] == 1 and counts.sum() == 4


def test_pca_orthogonal_ordered_and_distance_preserving_at_full_rank():
    torch.manual_seed(0)
    x = torch.randn(50, 5) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    y = pca(x, 5)
    assert torch.allclose(_dist(y), _dist(x), atol=1e-4)
    var = y.var(0)
    assert (var[:-1] >= var[1:]).all()
    cov = (y.T @ y) / 49
    assert torch.allclose(cov - torch.diag(torch.diag(cov)), torch.zeros(5, 5), atol=1e-3)
    assert pca(x, 2).shape == (50, 2)
    with pytest.raises(KDistillError, match="PCA dim"):
        pca(x, 6)


def test_static_from_teacher_rows_are_teacher_token_vectors(teacher):
    vec = teacher_token_vectors(teacher, batch_size=64)
    assert vec.shape == (len(teacher.tokenizer), 32)
    light = teacher.tokenizer.convert_tokens_to_ids("light")
    cls, sep = teacher.tokenizer.cls_token_id, teacher.tokenizer.sep_token_id
    with torch.no_grad():
        teacher.normalize = False
        direct = teacher(input_ids=torch.tensor([[cls, light, sep]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
        teacher.normalize = True
    assert torch.allclose(vec[light], direct[0], atol=1e-5)
    full = static_from_teacher(teacher, dim=None, weighting="none", batch_size=64)
    table = full.embedding.weight.detach()
    specials = set(teacher.tokenizer.all_special_ids)
    keep = torch.tensor([i for i in range(len(teacher.tokenizer)) if i not in specials])
    # full-width PCA is a rotation of the centred vectors: pairwise distances survive
    assert torch.allclose(_dist(table[keep]), _dist(vec[keep]), atol=1e-3)
    assert table[sorted(specials)].abs().sum() == 0
    small = static_from_teacher(teacher, dim=8, weighting="sif", corpus=tiny_corpus(50), batch_size=64)
    assert small.embedding.weight.shape == (len(teacher.tokenizer), 8) and small.embedding_dim == 8
    with pytest.raises(KDistillError, match="static dim"):
        static_from_teacher(teacher, dim=64)


def test_static_student_fine_tunes_towards_teacher(teacher):
    student = static_from_teacher(teacher, dim=16, weighting="zipf", batch_size=64)
    student.projection = torch.nn.Linear(16, 32)
    batch = teacher.tokenize(SENTENCES[:10])
    with torch.no_grad():
        target = teacher(**batch)
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    first = None
    for _ in range(30):
        loss = (1 - (encoder_forward(student, batch) * target).sum(1)).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert student.embedding.weight.grad.abs().sum() > 0
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.5 * first


def test_token_vector_cache_reused_for_same_teacher_only(teacher, tmp_path, monkeypatch):
    import kdistill.students.static as static_mod

    first = static_mod.cached_token_vectors(teacher, tmp_path, batch_size=64)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(static_mod, "teacher_token_vectors", boom)
    assert torch.equal(static_mod.cached_token_vectors(teacher, tmp_path), first)
    other = tiny_encoder(num_layers=2, seed=99, tokenizer=teacher.tokenizer)
    with pytest.raises(AssertionError, match="recomputed"):
        static_mod.cached_token_vectors(other, tmp_path)
