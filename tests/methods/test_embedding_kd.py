import pytest
import torch
import torch.nn.functional as F

from kdistill.config import load_config
from kdistill.data.loaders import TensorDictDataset, make_loader
from kdistill.errors import ConfigError, KDistillError
from kdistill.losses.embeddings import cosine, listwise_kl, similarity, token_cosine
from kdistill.methods.base import ModelOutput, SetupInfo
from kdistill.methods.embedding_kd import EmbeddingKD
from kdistill.registry import METHODS
from kdistill.students.encoders import encoder_forward, narrow_encoder, tiny_corpus, tiny_encoder
from kdistill.students.static import static_from_teacher
from kdistill.train.loop import fit, make_accelerator


def _out(x):
    return ModelOutput(logits=x)


def _assert_step_lowers(method, s, t, term):
    """A small step of the student's vectors against the gradient of ``term`` lowers that term."""
    s = s.clone().requires_grad_(True)
    v = method(_out(s), _out(t), {})[term]
    v.backward()
    with torch.no_grad():
        assert float(method(_out(s - 0.05 * s.grad / s.grad.norm()), _out(t), {})[term]) < float(v)


def test_registered_and_cacheable():
    assert METHODS.get("embedding_kd") is EmbeddingKD and EmbeddingKD.cacheable


def test_zero_when_student_equals_teacher():
    t = F.normalize(torch.randn(8, 16), dim=-1)
    m = EmbeddingKD(mse_weight=1, cosine_weight=1, listwise_weight=1, margin_weight=1, rkd_distance_weight=1,
                    rkd_angle_weight=1, cross_weight=1, candidate_weight=1)
    m.setup(SetupInfo({}, {}, student_logits=(8, 16), teacher_logits=(8, 16)))
    losses = m(_out(t.clone()), _out(t), {})
    assert set(losses) == {"mse", "cosine", "listwise", "margin", "rkd_distance", "rkd_angle", "cross", "candidates"}
    for k, v in losses.items():
        assert abs(float(v)) < 1e-5, k


def test_terms_are_weighted_means_of_the_pure_losses():
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    m = EmbeddingKD(mse_weight=0, cosine_weight=2.0, listwise_weight=3.0, kd_temperature=0.5)
    losses = m(_out(s), _out(t), {})
    assert torch.allclose(losses["cosine"], 2.0 * cosine(s, t).mean())
    eye = torch.eye(6, dtype=torch.bool)
    s_sim, t_sim = similarity(s, s)[~eye].view(6, 5), similarity(t, t)[~eye].view(6, 5)
    assert torch.allclose(losses["listwise"], 3.0 * listwise_kl(s_sim, t_sim, kd_temperature=0.5).mean())


def test_cross_term_ranks_teacher_vectors_with_student_vectors():
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    m = EmbeddingKD(mse_weight=0, cross_weight=2.0, kd_temperature=0.5)
    eye = torch.eye(6, dtype=torch.bool)
    x_sim, t_sim = similarity(s, t)[~eye].view(6, 5), similarity(t, t)[~eye].view(6, 5)
    assert torch.allclose(m(_out(s), _out(t), {})["cross"], 2.0 * listwise_kl(x_sim, t_sim, kd_temperature=0.5).mean())
    # invariant to the student's scale per row (cosine) and zero for any s_i along t_i, unlike the list-wise term
    assert float(m(_out(3.0 * t), _out(t), {})["cross"]) < 1e-6
    # the gradient reaches the student only, and a step along it lowers the term
    s.requires_grad_(True)
    v = m(_out(s), _out(t), {})["cross"]
    v.backward()
    with torch.no_grad():
        assert float(m(_out(s - 0.05 * s.grad / s.grad.norm()), _out(t), {})["cross"]) < float(v)
    # across widths it goes through the learned projector (created for it even without a point-wise term)
    w = EmbeddingKD(mse_weight=0, cross_weight=1.0)
    w.setup(SetupInfo({}, {}, student_logits=(6, 4), teacher_logits=(6, 8)))
    assert w.projector is not None and torch.isfinite(w(_out(torch.randn(6, 4)), _out(t), {})["cross"])
    with pytest.raises(KDistillError, match="cross_weight"):
        EmbeddingKD(cross_weight=-1.0)


def test_mask_excludes_examples():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    mask = torch.tensor([True, True, False, True, False])
    m = EmbeddingKD(cosine_weight=1.0, mse_weight=1.0)
    losses = m(_out(s), _out(t), {"mask": mask})
    assert torch.allclose(losses["cosine"], cosine(s[mask], t[mask]).mean())


def test_projector_only_when_widths_differ_and_pointwise_terms_on():
    m = EmbeddingKD(mse_weight=1.0)
    m.setup(SetupInfo({}, {}, student_logits=(4, 8), teacher_logits=(4, 16)))
    assert isinstance(m.projector, torch.nn.Linear) and m.projector.weight.shape == (16, 8)
    r = EmbeddingKD(mse_weight=0.0, listwise_weight=1.0)
    r.setup(SetupInfo({}, {}, student_logits=(4, 8), teacher_logits=(4, 16)))
    assert r.projector is None
    losses = r(_out(torch.randn(4, 8)), _out(torch.randn(4, 16)), {})  # relational terms work across widths
    assert torch.isfinite(losses["listwise"])


def test_margin_term_uses_teacher_top_neighbour():
    t = F.normalize(torch.randn(6, 8), dim=-1)
    s = F.normalize(t + 0.3 * torch.randn(6, 8), dim=-1)
    m = EmbeddingKD(mse_weight=0, margin_weight=1.0)
    v = m(_out(s), _out(t), {})["margin"]
    assert v > 0
    shifted = m(_out(t), _out(t), {})["margin"]
    assert float(shifted) < 1e-6


@pytest.mark.parametrize("kwargs", [{"mse_weight": -1.0}, {"mse_weight": 0.0}, {"kd_temperature": 0.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(KDistillError):
        EmbeddingKD(**kwargs)


def _run(student, teacher, method, steps=3):
    sents = tiny_corpus(48, seed=4)
    enc = teacher.tokenize(sents, max_length=32)
    enc = {k: F.pad(v, (0, 32 - v.shape[1])) for k, v in enc.items()}
    targets = teacher.encode(sents)
    loader = make_loader(TensorDictDataset(**enc, teacher_emb=targets), 16, seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = fit(student=student, method=method, train_loader=loader, accelerator=make_accelerator(),
              teacher_targets=lambda b: ModelOutput(logits=b["teacher_emb"]), student_forward=encoder_forward,
              max_steps=steps, epochs=1, progress=False, log_every=1, lr=1e-2)
    return res, before


def test_three_step_fit_narrow_student_and_method_projector():
    teacher = tiny_encoder(num_layers=2, seed=0)
    student = narrow_encoder(teacher, hidden_size=16, num_layers=1, num_heads=1)
    student.projection = None  # force the method's projector (student width 16, teacher 32)
    method = EmbeddingKD(mse_weight=1.0, cosine_weight=1.0, listwise_weight=0.1)
    res, before = _run(student, teacher, method)
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history if "loss" in h)
    after = res.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert res.method.projector is not None and res.method.projector.weight.abs().sum() > 0
    p0 = torch.nn.Linear(16, 32, bias=False)
    assert not torch.equal(res.method.projector.weight, p0.weight)


def test_six_step_fit_static_student_updates_its_table():
    teacher = tiny_encoder(num_layers=2, seed=0)
    student = static_from_teacher(teacher, dim=16, weighting="zipf", batch_size=64)
    student.projection = torch.nn.Linear(16, 32)
    method = EmbeddingKD(mse_weight=0.0, cosine_weight=1.0)
    res, before = _run(student, teacher, method, steps=6)
    assert not torch.equal(before["embedding.weight"], res.student.state_dict()["embedding.weight"])


def test_config_rejects_typo_with_close_match():
    with pytest.raises(ConfigError, match="listwise_weight"):
        load_config("embedding/minilm_to_2layer", ["method.kwargs.listwise_weigth=0.1"])


def _tok(emb, tokens, mask=None):
    return ModelOutput(logits=emb, features={"tokens": tokens},
                       extra={} if mask is None else {"attention_mask": mask})


def test_token_term_weighted_mean_of_token_cosine_and_needs_token_states():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    st, tt = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    m = EmbeddingKD(mse_weight=0, cosine_weight=1.0, token_weight=0.5)
    assert m.uses_token_states and not EmbeddingKD(cosine_weight=1.0).uses_token_states
    losses = m(_tok(s, st, am), _tok(t, tt), {})
    assert torch.allclose(losses["tokens"], 0.5 * token_cosine(st, tt, am).mean())
    assert float(m(_tok(t, 2.0 * tt, am), _tok(t, tt), {})["tokens"]) < 1e-6
    mask = torch.tensor([True, False, True, True])
    assert torch.allclose(m(_tok(s, st, am), _tok(t, tt), {"mask": mask})["tokens"],
                          0.5 * token_cosine(st, tt, am)[mask].mean())
    with pytest.raises(KDistillError, match=r"attention_mask.*token_weight: 0|token_weight: 0"):
        m(_tok(s, st), _tok(t, tt), {})
    with pytest.raises(KDistillError, match=r"teacher.features\['tokens'\]"):
        m(_tok(s, st, am), _out(t), {})


def test_token_projector_only_when_hidden_widths_differ():
    m = EmbeddingKD(mse_weight=0, listwise_weight=1.0, token_weight=1.0)
    m.setup(SetupInfo({"tokens": (4, 5, 16)}, {"tokens": (4, 5, 32)}, student_logits=(4, 8), teacher_logits=(4, 8)))
    assert m.token_projector is not None and m.token_projector.weight.shape == (32, 16) and m.projector is None
    out = m(_tok(torch.randn(4, 8), torch.randn(4, 5, 16), torch.ones(4, 5).bool()), _tok(torch.randn(4, 8),
                                                                                         torch.randn(4, 5, 32)), {})
    assert torch.isfinite(out["tokens"])
    same = EmbeddingKD(cosine_weight=1.0, token_weight=1.0)
    same.setup(SetupInfo({"tokens": (4, 5, 32)}, {"tokens": (4, 5, 32)}, student_logits=(4, 8), teacher_logits=(4, 8)))
    assert same.token_projector is None


def test_cross_queue_adds_past_teacher_vectors_as_candidates():
    torch.manual_seed(0)
    m = EmbeddingKD(mse_weight=0, cross_weight=2.0, kd_temperature=0.5, cross_queue=5)
    m.setup(SetupInfo({}, {}, student_logits=(4, 8), teacher_logits=(4, 8)))
    assert m.queue is not None and m.queue.items.shape == (5, 8)
    s0, t0 = torch.randn(4, 8), torch.randn(4, 8)
    eye = torch.eye(4, dtype=torch.bool)
    first = m(_out(s0), _out(t0), {"mask": torch.tensor([True, True, False, True])})["cross"]
    # empty queue: the in-batch cross term; the three unmasked teacher rows are enqueued, the masked one is not
    x, tt = similarity(s0, t0)[~eye].view(4, 3), similarity(t0, t0)[~eye].view(4, 3)
    kl0 = listwise_kl(x, tt, kd_temperature=0.5)
    assert torch.allclose(first, 2.0 * kl0[[0, 1, 3]].mean())
    assert int(m.queue.filled) == 3 and torch.equal(m.queue.get(), t0[[0, 1, 3]])
    s1, t1 = torch.randn(4, 8), torch.randn(4, 8)
    second = m(_out(s1), _out(t1), {})["cross"]
    bank = t0[[0, 1, 3]]
    x = torch.cat([similarity(s1, t1)[~eye].view(4, 3), similarity(s1, bank)], 1)
    tt = torch.cat([similarity(t1, t1)[~eye].view(4, 3), similarity(t1, bank)], 1)
    assert torch.allclose(second, 2.0 * listwise_kl(x, tt, kd_temperature=0.5).mean())
    # FIFO of the last 5 teacher rows; carried by state_dict (so checkpoints resume with the same queue)
    # slots 3, 4, 0, 1 took t1's four rows: t0's oldest two rows were overwritten
    assert torch.equal(m.queue.get(), torch.stack([t1[2], t1[3], t0[3], t1[0], t1[1]])) and int(m.queue.ptr) == 2
    assert "queue.items" in m.state_dict()
    # eval mode reads the queue but never writes it; the student equal to the teacher still gives zero
    m.eval()
    before = m.queue.items.clone()
    assert float(m(_out(t1.clone()), _out(t1), {})["cross"]) < 1e-6
    assert torch.equal(m.queue.items, before)
    for bad in ({"cross_queue": -1, "cross_weight": 1.0}, {"cross_queue": 16, "cosine_weight": 1.0}):
        with pytest.raises(KDistillError, match="cross_queue"):
            EmbeddingKD(**bad)


def test_candidate_term_is_the_cross_term_over_the_other_axis():
    """Teacher vectors (batch, then queue) are the queries and the batch's student vectors the candidates."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 8), torch.randn(5, 8)
    m = EmbeddingKD(mse_weight=0, candidate_weight=2.0, kd_temperature=0.5)
    eye = torch.eye(5, dtype=torch.bool)
    # in-batch: column j of the cross term's score matrix, i.e. row j of cos(t, s), without the diagonal
    y, tt = similarity(t, s)[~eye].view(5, 4), similarity(t, t)[~eye].view(5, 4)
    got = m(_out(s), _out(t), {})["candidates"]
    assert torch.allclose(got, 2.0 * listwise_kl(y, tt, kd_temperature=0.5).mean())
    assert not torch.allclose(got, EmbeddingKD(mse_weight=0, cross_weight=2.0, kd_temperature=0.5)(
        _out(s), _out(t), {})["cross"])  # the rows are normalised over a different axis
    # zero for any student vector along its teacher's (cosine), and a gradient step lowers it
    assert float(m(_out(2.0 * t), _out(t), {})["candidates"]) < 1e-6
    _assert_step_lowers(m, s, t, "candidates")


def test_candidate_term_with_queue_and_mask():
    torch.manual_seed(1)
    m = EmbeddingKD(mse_weight=0, candidate_weight=1.0, kd_temperature=0.5, cross_queue=6)
    m.setup(SetupInfo({}, {}, student_logits=(4, 8), teacher_logits=(4, 8)))
    s0, t0 = torch.randn(4, 8), torch.randn(4, 8)
    m(_out(s0), _out(t0), {})  # fills 4 of the 6 queue slots (the queue is fed without a cross term too)
    assert int(m.queue.filled) == 4 and torch.equal(m.queue.get(), t0)
    s1, t1 = torch.randn(4, 8), torch.randn(4, 8)
    mask = torch.tensor([True, False, True, True])
    m.eval()  # reads the queue without writing it
    got = m(_out(s1), _out(t1), {"mask": mask})["candidates"]
    keep = torch.tensor([0, 2, 3])
    # queries: t1's counted rows (their own text excluded) and the four queued rows; candidates: s1's counted rows
    expect = []
    for q in [*t1[keep], *t0]:
        own = [k for k in keep.tolist() if not torch.equal(t1[k], q)]
        y, tt = similarity(q[None], s1[own]), similarity(q[None], t1[own])
        expect.append(listwise_kl(y, tt, kd_temperature=0.5))
    assert torch.allclose(got, torch.cat(expect).mean(), atol=1e-6)
    # the uncounted row plays no part: changing its student vector leaves the term unchanged
    s2 = s1.clone()
    s2[1] = torch.randn(8)
    assert torch.allclose(m(_out(s2), _out(t1), {"mask": mask})["candidates"], got, atol=1e-6)
    m.train()
    m(_out(s1), _out(t1), {"mask": mask})  # training enqueues the counted teacher rows only
    assert int(m.queue.filled) == 6 and torch.equal(m.queue.items[4:], t1[[0, 2]])
    with pytest.raises(KDistillError, match="candidate_weight"):
        EmbeddingKD(candidate_weight=-0.5)
    EmbeddingKD(mse_weight=0, candidate_weight=1.0, cross_queue=8)  # the queue may feed this term alone


def test_listwise_queue_adds_the_students_past_vectors_as_candidates():
    torch.manual_seed(2)
    m = EmbeddingKD(mse_weight=0, listwise_weight=2.0, kd_temperature=0.5, listwise_queue=5)
    m.setup(SetupInfo({}, {}, student_logits=(4, 6), teacher_logits=(4, 8)))  # any widths: scores only
    assert m.student_bank.items.shape == (5, 6) and m.teacher_bank.items.shape == (5, 8)
    eye = torch.eye(4, dtype=torch.bool)
    s0, t0 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 8)
    first = m(_out(s0), _out(t0), {"mask": torch.tensor([True, False, True, True])})["listwise"]
    x, tt = similarity(s0, s0)[~eye].view(4, 3), similarity(t0, t0)[~eye].view(4, 3)
    assert torch.allclose(first, 2.0 * listwise_kl(x, tt, kd_temperature=0.5)[[0, 2, 3]].mean())
    # the counted rows were banked, detached, on both sides
    sb = m.student_bank.get()
    assert torch.equal(sb, s0.detach()[[0, 2, 3]]) and torch.equal(m.teacher_bank.get(), t0[[0, 2, 3]])
    assert not sb.requires_grad
    s1, t1 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 8)
    second = m(_out(s1), _out(t1), {})["listwise"]
    x = torch.cat([similarity(s1, s1)[~eye].view(4, 3), similarity(s1, s0[[0, 2, 3]])], 1)
    tt = torch.cat([similarity(t1, t1)[~eye].view(4, 3), similarity(t1, t0[[0, 2, 3]])], 1)
    assert torch.allclose(second, 2.0 * listwise_kl(x, tt, kd_temperature=0.5).mean())
    # gradients reach this batch's vectors only, never the banked ones (the earlier batch)
    second.backward()
    assert s1.grad is not None and s0.grad is None
    assert "student_bank.items" in m.state_dict() and "teacher_bank.items" in m.state_dict()
    # eval mode reads without writing; a student whose banked and current vectors equal the teacher's scores 0
    m.eval()
    before = m.student_bank.items.clone()
    z = EmbeddingKD(mse_weight=0, listwise_weight=1.0, listwise_queue=8)
    t2 = torch.randn(4, 8)
    z(_out(t2.clone()), _out(t2), {})
    assert float(z(_out(t1.clone()), _out(t1), {})["listwise"]) < 1e-6
    m(_out(s1.detach()), _out(t1), {})
    assert torch.equal(m.student_bank.items, before)
    for bad in ({"listwise_queue": -2, "listwise_weight": 1.0}, {"listwise_queue": 16, "cosine_weight": 1.0}):
        with pytest.raises(KDistillError, match="listwise_queue"):
            EmbeddingKD(**bad)


def test_cross_queue_resume_equals_uninterrupted(tmp_path, interrupt_at):
    teacher = tiny_encoder(num_layers=2, seed=0)
    sents = tiny_corpus(96, seed=4)
    enc = {k: F.pad(v, (0, 32 - v.shape[1])) for k, v in teacher.tokenize(sents, max_length=32).items()}
    loader_data = TensorDictDataset(**enc, teacher_emb=teacher.encode(sents))

    def train(out, **kw):
        student = narrow_encoder(teacher, hidden_size=32, num_layers=1, num_heads=2)
        return fit(student=student, method=EmbeddingKD(mse_weight=0, cosine_weight=1.0, cross_weight=1.0,
                                                       cross_queue=20),
                   train_loader=make_loader(loader_data, 16, seed=0), accelerator=make_accelerator(),
                   teacher_targets=lambda b: ModelOutput(logits=b["teacher_emb"]), student_forward=encoder_forward,
                   epochs=1, progress=False, lr=1e-2, output_dir=out, checkpoint_every=3, **kw)

    full = train(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "part", eval_every=1, evaluate=interrupt_at(5))
    torch.manual_seed(999)
    resumed = train(tmp_path / "part", resume=True)
    assert int(full.method.queue.filled) == 20 and torch.equal(full.method.queue.items, resumed.method.queue.items)
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), k


def _symmetric_nce(q, c, tau):
    """Hand-built symmetric InfoNCE: each query picks its candidate among all candidates, and back."""
    logits = F.normalize(q, dim=1) @ F.normalize(c, dim=1).T / tau
    target = torch.arange(len(q))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def test_pair_term_is_symmetric_infonce_over_the_labelled_pairs():
    torch.manual_seed(2)
    s, t = torch.randn(8, 6), torch.randn(8, 6)  # rows (0, 1), (2, 3), ... are (query, candidate) pairs
    m = EmbeddingKD(mse_weight=0, pair_weight=0.7, kd_temperature=0.2)
    got = m(_out(s), _out(t), {})["pairs"]
    assert torch.allclose(got, 0.7 * _symmetric_nce(s[0::2], s[1::2], 0.2), atol=1e-6)
    # the labels, not the teacher: another teacher gives the same value ...
    assert torch.allclose(m(_out(s), _out(torch.randn(8, 6)), {})["pairs"], got)
    # ... pairing the rows differently gives another, and matched orthogonal pairs give almost zero
    assert not torch.allclose(m(_out(s[[0, 3, 2, 1, 4, 5, 6, 7]]), _out(t), {})["pairs"], got)
    e = torch.eye(6)[:4].repeat_interleave(2, dim=0)  # q_p = c_p = e_p
    assert float(m(_out(e), _out(t), {})["pairs"]) < 0.7 * 2 * 3 * float(torch.exp(torch.tensor(-5.0)))
    # a gradient step lowers it
    _assert_step_lowers(m, s, t, "pairs")


def test_pair_term_mask_and_bad_layouts():
    torch.manual_seed(3)
    s, t = torch.randn(8, 6), torch.randn(8, 6)
    m = EmbeddingKD(mse_weight=0, pair_weight=1.0, kd_temperature=0.5)
    mask = torch.tensor([True, True, True, False, True, True, True, True])  # pair 1 loses its candidate
    got = m(_out(s), _out(t), {"mask": mask})["pairs"]
    keep = torch.tensor([0, 2, 3])
    assert torch.allclose(got, _symmetric_nce(s[0::2][keep], s[1::2][keep], 0.5), atol=1e-6)
    s2 = s.clone()
    s2[2] = torch.randn(6)  # the query of the dropped pair plays no part
    assert torch.allclose(m(_out(s2), _out(t), {"mask": mask})["pairs"], got, atol=1e-6)
    # one counted pair has no negative: zero, with a gradient that is defined
    one = torch.tensor([True, True] + [False] * 6)
    assert float(m(_out(s), _out(t), {"mask": one})["pairs"]) == 0.0
    with pytest.raises(KDistillError, match="even number"):
        m(_out(torch.randn(7, 6)), _out(torch.randn(7, 6)), {})
    with pytest.raises(KDistillError):
        EmbeddingKD(pair_weight=-0.1)
