import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.eval.retrieval import (
    evaluate_encoder,
    mean_cosine,
    mixed_retrieval,
    partner_ranks,
    retrieval_metrics,
    sentences_per_second,
    similarity_spearman,
    spearman,
)
from kdistill.students.encoders import layer_subset, tiny_corpus, tiny_encoder


def test_partner_ranks_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
    # q0: cos (0.995, 1.0, 0) -> partner c0 is 2nd; q1: (0.0995, 0, 1) -> c1 is 3rd;
    # q2: (0.774, 0.707, 0.707) -> partner c2 ties c1 behind c0, and a tie ranks last -> 3rd
    ranks = partner_ranks(q, c)
    assert ranks.tolist() == [2, 3, 3]
    m = retrieval_metrics(q, c, ks=(1, 2))
    assert m["recall_at_1"] == 0.0 and m["recall_at_2"] == pytest.approx(1 / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)


def test_identity_is_perfect_and_ties_rank_last():
    x = torch.randn(20, 8)
    m = retrieval_metrics(x, x.clone())
    assert m == {"recall_at_1": 1.0, "recall_at_10": 1.0, "mrr": 1.0}
    zeros = torch.zeros(20, 8)  # a degenerate encoder must not score as perfect
    assert partner_ranks(zeros, zeros).tolist() == [20] * 20
    assert retrieval_metrics(zeros, zeros)["recall_at_1"] == 0.0


def test_chunking_does_not_change_ranks():
    q, c = torch.randn(37, 6), torch.randn(37, 6)
    assert torch.equal(partner_ranks(q, c, chunk=5), partner_ranks(q, c))


def test_shape_errors():
    with pytest.raises(KDistillError, match="query i paired"):
        retrieval_metrics(torch.randn(4, 3), torch.randn(5, 3))


def test_spearman_values():
    a = torch.randn(100)
    assert spearman(a, a.exp()) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


def test_similarity_spearman_and_mean_cosine():
    q, c = torch.randn(30, 8), torch.randn(30, 8)
    rot, _ = torch.linalg.qr(torch.randn(8, 8))
    assert similarity_spearman(q @ rot, c @ rot, q, c) == pytest.approx(1.0)
    assert similarity_spearman(torch.randn(30, 8), torch.randn(30, 8), q, c) < 0.3
    assert similarity_spearman(q @ rot, c @ rot, q, c, max_pairs=100) == pytest.approx(1.0)
    assert mean_cosine(3 * q, q) == pytest.approx(1.0)
    assert mean_cosine(-q, q) == pytest.approx(-1.0)
    assert mean_cosine(q[:, :4], q) is None


def test_evaluate_encoder_teacher_against_itself_and_throughput():
    teacher = tiny_encoder(num_layers=2, seed=0)
    corpus = tiny_corpus(60, seed=9)
    queries, cands = corpus[:30], corpus[30:]
    t_emb = (teacher.encode(queries), teacher.encode(cands))
    threads = torch.get_num_threads()
    m = evaluate_encoder(teacher, queries, cands, teacher_embeddings=t_emb, throughput_sentences=corpus,
                         threads=1, batch_size=16)
    assert torch.get_num_threads() == threads
    assert m["spearman_vs_teacher"] == pytest.approx(1.0) and m["cosine_to_teacher"] == pytest.approx(1.0)
    assert m["sentences_per_second"] > 0
    assert 0.0 <= m["recall_at_1"] <= m["recall_at_10"] <= 1.0
    # mixed sides with the teacher against itself: the teacher's own figures
    assert m["student_queries_recall_at_1"] == m["student_candidates_recall_at_1"] == m["recall_at_1"]
    assert m["student_queries_mrr"] == pytest.approx(m["mrr"])
    student = layer_subset(teacher, [0])
    ms = evaluate_encoder(student, queries, cands, teacher_embeddings=t_emb)
    assert ms["spearman_vs_teacher"] < 1.0 and ms["cosine_to_teacher"] < 1.0
    sq, sc = student.encode(queries), student.encode(cands)
    assert ms["student_queries_recall_at_1"] == retrieval_metrics(sq, t_emb[1])["recall_at_1"]
    assert ms["student_candidates_mrr"] == pytest.approx(retrieval_metrics(t_emb[0], sc)["mrr"])


def test_mixed_retrieval_scores_each_side_against_the_other_models_vectors():
    # 3 pairs in 2-D; the student's queries point at the right teacher candidates, its candidates are scrambled
    tq = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tc = tq.clone()
    sq = tq.clone()
    sc = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # pairs 0 and 1 swapped
    m = mixed_retrieval(sq, sc, tq, tc)
    assert m["student_queries_recall_at_1"] == 1.0 and m["student_queries_mrr"] == 1.0
    assert m["student_candidates_recall_at_1"] == pytest.approx(1 / 3)
    assert mixed_retrieval(sq[:, :1], sc[:, :1], tq, tc) == {}  # widths differ: no shared space
    with pytest.raises(KDistillError, match="expected two"):
        mixed_retrieval(sq, sc[:2], tq, tc)


def test_sentences_per_second_counts_sentences():
    class Fake:
        calls = []

        def encode(self, sentences, batch_size=64):
            self.calls.append(len(sentences))
            return torch.zeros(len(sentences), 2)

    f = Fake()
    assert sentences_per_second(f, ["a"] * 50, batch_size=8, repeats=2) > 0
    assert f.calls == [8, 50, 50]
    with pytest.raises(KDistillError):
        sentences_per_second(f, [])
