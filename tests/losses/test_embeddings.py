import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import KDistillError
from kdistill.losses.embeddings import (
    cosine,
    embedding_mse,
    listwise_kl,
    margin_mse,
    rkd_angle,
    rkd_distance,
    similarity,
    token_cosine,
)
from kdistill.losses.reduce import masked_mean


def test_embedding_mse_closed_form_and_zero():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert torch.allclose(embedding_mse(s, t), torch.tensor([2.0, 12.5]))
    assert torch.equal(embedding_mse(t, t), torch.zeros(2))


def test_embedding_mse_shape_error_suggests_projection():
    with pytest.raises(KDistillError, match="project"):
        embedding_mse(torch.zeros(2, 3), torch.zeros(2, 4))


def test_cosine_closed_form_and_scale_invariance():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    t = torch.tensor([[0.0, 3.0], [2.0, 2.0], [1.0, 0.0]])
    assert torch.allclose(cosine(s, t), torch.tensor([1.0, 0.0, 2.0]), atol=1e-6)
    x = torch.randn(4, 8)
    assert torch.allclose(cosine(3.0 * x, x), torch.zeros(4), atol=1e-6)


def test_bf16_in_fp32_out():
    s, t = torch.randn(3, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    for fn in (embedding_mse, cosine, rkd_distance, rkd_angle):
        assert fn(s, t).dtype == torch.float32
    scores = torch.randn(3, 4).bfloat16()
    assert margin_mse(scores, scores).dtype == torch.float32
    assert listwise_kl(scores, scores).dtype == torch.float32


def test_similarity_cos_and_dot():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    assert torch.allclose(similarity(q, c, kind="dot"), torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, -2.0]]))
    r = 1 / math.sqrt(2)
    assert torch.allclose(similarity(q, c), torch.tensor([[1.0, r, 0.0], [0.0, r, -1.0]]), atol=1e-6)
    with pytest.raises(KDistillError, match="'cos' or 'dot'"):
        similarity(q, c, kind="l2")


def test_margin_mse_closed_form():
    s = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    t = torch.tensor([[0.8, 0.4], [0.7, 0.2]])
    # margins: student 0.8, 0.0; teacher 0.4, 0.5
    assert torch.allclose(margin_mse(s, t), torch.tensor([0.16, 0.25]), atol=1e-6)


def test_margin_mse_zero_when_margins_match_even_if_scores_shift():
    t = torch.randn(5, 4)
    s = t + torch.randn(5, 1) * 10.0  # per-query constant shift keeps every margin
    assert torch.allclose(margin_mse(s, t), torch.zeros(5), atol=1e-5)
    assert margin_mse(s * 2.0, t).abs().sum() > 0.1  # scaling changes margins


def test_margin_mse_several_negatives_average():
    s = torch.tensor([[1.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 1.0]])  # margins: s (1, 1), t (1, 0)
    assert torch.allclose(margin_mse(s, t), torch.tensor([0.5]))


def test_margin_mse_needs_a_negative():
    with pytest.raises(KDistillError, match="1 \\+ K"):
        margin_mse(torch.zeros(3, 1), torch.zeros(3, 1))


def test_listwise_kl_zero_at_equal_scores_and_shift_invariant():
    t = torch.randn(4, 6)
    assert torch.allclose(listwise_kl(t, t), torch.zeros(4), atol=1e-6)
    assert torch.allclose(listwise_kl(t + 3.0, t, kd_temperature=0.5), torch.zeros(4), atol=1e-5)


def test_listwise_kl_closed_form_and_direction():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher softmax (3/4, 1/4), student (1/2, 1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL(teacher || student)
    assert torch.allclose(listwise_kl(s, t), torch.tensor([expected]), atol=1e-6)


def test_listwise_kl_temperature():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2.0 * math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert torch.allclose(listwise_kl(s, t, kd_temperature=2.0), torch.tensor([expected]), atol=1e-6)
    # cosine-range scores: a lower temperature sharpens both distributions and grows the divergence
    s, t = torch.tensor([[0.5, 0.4, 0.1]]), torch.tensor([[0.6, 0.2, 0.3]])
    values = [listwise_kl(s, t, kd_temperature=T).item() for T in (1.0, 0.3, 0.05)]
    assert values[0] < values[1] < values[2]
    with pytest.raises(KDistillError):
        listwise_kl(s, t, kd_temperature=0.0)


def test_listwise_kl_candidate_mask():
    s = torch.tensor([[0.0, 0.0, 5.0]])
    t = torch.tensor([[math.log(3.0), 0.0, -7.0]])
    m = torch.tensor([True, True, False])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert torch.allclose(listwise_kl(s, t, candidate_mask=m), torch.tensor([expected]), atol=1e-6)
    empty = listwise_kl(s, t, candidate_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(1))
    with pytest.raises(KDistillError, match="bool"):
        listwise_kl(s, t, candidate_mask=m.float())


def test_listwise_kl_gradient_points_to_teacher():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    listwise_kl(s, t).sum().backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 2]  # descent raises the teacher's favourite
    assert torch.isfinite(s.grad).all()


def _rotate(x):
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=torch.Generator().manual_seed(1)))
    return x @ q


def test_rkd_zero_under_rotation_scale_and_translation():
    x = torch.randn(6, 5)
    y = 3.0 * _rotate(x) + 2.0
    assert torch.allclose(rkd_distance(y, x), torch.zeros(6), atol=1e-5)
    assert torch.allclose(rkd_angle(y, x), torch.zeros(6), atol=1e-5)


def test_rkd_different_widths_and_positive_when_structure_differs():
    s, t = torch.randn(5, 3), torch.randn(5, 7)
    assert rkd_distance(s, t).shape == (5,)
    assert rkd_angle(s, t).shape == (5,)
    assert rkd_distance(s, t).sum() > 0 and rkd_angle(s, t).sum() > 0


def test_rkd_distance_closed_form():
    # student: 3 points on a line at 0, 1, 2 -> distances 1, 2, 1 (mean 4/3); teacher equilateral (all 1)
    s = torch.tensor([[0.0], [1.0], [2.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    ds = torch.tensor([[0, 0.75, 1.5], [0.75, 0, 0.75], [1.5, 0.75, 0]])
    huber = lambda d: 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5  # noqa: E731
    row0 = (huber(ds[0, 1] - 1) + huber(ds[0, 2] - 1)) / 2
    row1 = (huber(ds[1, 0] - 1) + huber(ds[1, 2] - 1)) / 2
    got = rkd_distance(s, t)
    assert torch.allclose(got, torch.tensor([row0, row1, row0]), atol=1e-5)


def test_rkd_angle_closed_form():
    # student: right angle at point 0 (cos 0); teacher: equilateral (every angle 60 deg, cos 0.5)
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    got = rkd_angle(s, t)
    # at 0: cos 0 vs 0.5 -> huber 0.125; at 1 and 2: cos 45 deg vs 0.5
    c45 = math.sqrt(0.5)
    assert torch.allclose(got, torch.tensor([0.125, 0.5 * (c45 - 0.5) ** 2, 0.5 * (c45 - 0.5) ** 2]), atol=1e-5)


def test_rkd_mask_equals_dropping_examples():
    s, t = torch.randn(6, 4), torch.randn(6, 8)
    m = torch.tensor([True, True, False, True, False, True])
    for fn in (rkd_distance, rkd_angle):
        masked = fn(s, t, mask=m)
        dropped = fn(s[m], t[m])
        assert torch.allclose(masked[m], dropped, atol=1e-5)
        assert torch.equal(masked[~m], torch.zeros(2))
        assert masked_mean(masked, m).isfinite()
    with pytest.raises(KDistillError, match="bool"):
        rkd_distance(s, t, mask=m.float())


def test_masked_reduction_all_masked_is_zero():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    m = torch.zeros(3, dtype=torch.bool)
    for v in (embedding_mse(s, t), cosine(s, t), rkd_distance(s, t, mask=m), rkd_angle(s, t, mask=m)):
        assert masked_mean(v, m).item() == 0.0


@pytest.mark.parametrize("fn", [embedding_mse, cosine, rkd_distance, rkd_angle])
def test_gradients_finite_even_with_duplicate_rows(fn):
    t = torch.randn(4, 6)
    s = torch.randn(4, 6)
    s[1] = s[0]  # zero distance between two students
    s.requires_grad_(True)
    fn(s, t).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_mse_gradient_direction():
    t = torch.tensor([[1.0, -1.0]])
    s = torch.zeros(1, 2, requires_grad=True)
    embedding_mse(s, t).sum().backward()
    assert torch.allclose(s.grad, torch.tensor([[-1.0, 1.0]]))  # d/ds mean((s-t)^2) = (s-t)


def test_in_batch_listwise_matches_teacher_ranking_after_descent():
    torch.manual_seed(0)
    tq, tc = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    sq = torch.randn(8, 16, requires_grad=True)
    sc = torch.randn(8, 16, requires_grad=True)
    opt = torch.optim.Adam([sq, sc], lr=0.05)
    t_scores = similarity(tq, tc)
    first = None
    for _ in range(150):
        loss = listwise_kl(similarity(sq, sc), t_scores, kd_temperature=0.1).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702
    assert loss.item() < 0.1 * first
    assert torch.equal(similarity(sq, sc).argmax(1), t_scores.argmax(1))


def test_token_cosine_closed_form_padding_and_zero():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]],
                      [[-1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [1.0, -1.0]],
                      [[3.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: tokens (1 - 0) and (1 - 1), the third is padding; row 1: (1 - (-1)), (1 - 1), (1 - 0) [zero vector]
    assert torch.allclose(token_cosine(s, t, mask), torch.tensor([0.5, 1.0]), atol=1e-6)
    assert torch.allclose(token_cosine(3.0 * t, t, mask.bool()), torch.zeros(2), atol=1e-6)
    # padding never counts: changing the student's padded token changes nothing
    s2 = s.clone()
    s2[0, 2] = torch.tensor([-7.0, 3.0])
    assert torch.equal(token_cosine(s2, t, mask), token_cosine(s, t, mask))
    assert torch.equal(token_cosine(s, t, torch.zeros(2, 3)), torch.zeros(2))  # no real token: 0, not NaN


def test_token_cosine_gradient_direction_and_shape_errors():
    t = torch.randn(2, 4, 8)
    s = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    v = token_cosine(s, t, mask).sum()
    v.backward()
    assert torch.equal(s.grad[0, 3], torch.zeros(8)) and torch.equal(s.grad[1, 2:], torch.zeros(2, 8))
    with torch.no_grad():
        assert float(token_cosine(s - 0.1 * s.grad, t, mask).sum()) < float(v)
    with pytest.raises(KDistillError, match="project"):
        token_cosine(torch.zeros(2, 4, 8), torch.zeros(2, 4, 6), mask)
    with pytest.raises(KDistillError, match=r"\(B, T, D\)"):
        token_cosine(torch.zeros(2, 8), torch.zeros(2, 8), mask)
    with pytest.raises(KDistillError, match="attention_mask"):
        token_cosine(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.ones(2, 3))
