import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.relations import rkd_angle, rkd_distance
from kdistill.methods.base import ModelOutput
from kdistill.methods.rkd import RKD


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def test_distance_hand_value():
    s = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2 -> normalised 0.5, 1.5, 1.0
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3 ** 0.5 / 2]])  # equilateral: all 1
    # Huber(0.5) = 0.125; row sums over the partners 0.25, 0.125, 0.125, divided by B = 3 (the mean over rows is
    # then the mean over all B^2 entries, the reference's F.smooth_l1_loss over the B x B matrix)
    torch.testing.assert_close(rkd_distance(s, t), torch.tensor([0.25, 0.125, 0.125]) / 3)


def test_invariant_to_similarity_transforms_and_width():
    t = torch.randn(6, 4)
    s = torch.cat([t @ _rotation(4, 0) * 3.0 + 2.0, torch.zeros(6, 3)], dim=1)  # rotated, scaled, shifted, padded
    assert rkd_distance(s, t).abs().max() < 1e-5
    assert rkd_angle(s, t).abs().max() < 1e-5
    other = torch.randn(6, 7)
    assert rkd_distance(other, t).mean() > 1e-3 and rkd_angle(other, t).mean() > 1e-3


def test_angle_hand_value():
    # right angle at the origin vs a straight line: cos 0 vs cos pi at that vertex
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    v = rkd_angle(s, t)
    assert v.shape == (3,) and torch.isfinite(v).all() and v.sum() > 0


def test_small_batches():
    with pytest.raises(KDistillError, match="at least 3"):
        rkd_angle(torch.randn(2, 3), torch.randn(2, 3))
    # the method skips relation terms on a batch of one (e.g. a last partial batch) instead of crashing
    m = RKD(ce_weight=0.0)
    f = torch.randn(1, 4, requires_grad=True)
    out = m(ModelOutput(torch.randn(1, 3), {"embed": f}), ModelOutput(torch.randn(1, 3), {"embed": torch.randn(1, 5)}),
            {"labels": torch.zeros(1).long()})
    assert out["rkd_distance"].item() == 0.0 and out["rkd_angle"].item() == 0.0


def test_method_weights_and_mask():
    fs, ft = torch.randn(5, 4), torch.randn(5, 6)
    mask = torch.tensor([True, False, True, True, True])
    out = RKD(distance_weight=2.0, angle_weight=3.0, ce_weight=0.0)(
        ModelOutput(torch.randn(5, 3), {"embed": fs}), ModelOutput(torch.randn(5, 3), {"embed": ft}),
        {"labels": torch.zeros(5).long(), "mask": mask})
    assert out["rkd_distance"].item() == pytest.approx(2.0 * rkd_distance(fs[mask], ft[mask]).mean().item(), rel=1e-5)
    assert out["rkd_angle"].item() == pytest.approx(3.0 * rkd_angle(fs[mask], ft[mask]).mean().item(), rel=1e-5)


def test_gradients_and_three_step_fit(zoo):
    losses, s, t = zoo["one_backward"](RKD())
    zoo["assert_grads"](losses, s, t)
    res, t, before = zoo["fit3"](RKD())
    zoo["assert_fit_ok"](res, t, before)


def test_angle_matches_explicit_difference_vectors():
    """The Gram / law-of-cosines form equals the definition on unit difference vectors (value and gradient),
    including a duplicated point (zero difference vector: no direction, contributes cos 0, no NaN)."""
    import torch.nn.functional as F

    from kdistill.losses.relations import rkd_angle

    def explicit(s, t):
        def angles(x):
            e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
            return torch.bmm(e, e.transpose(1, 2))
        return F.smooth_l1_loss(angles(s), angles(t), reduction="none").mean((0, 2))

    torch.manual_seed(0)
    s = torch.randn(9, 7, dtype=torch.float64)
    s[3] = s[5]
    t = torch.randn(9, 300, dtype=torch.float64) * 4 + 2
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    got, want = rkd_angle(a, t), explicit(b, t)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    want.sum().backward()
    assert torch.isfinite(a.grad).all()
    keep = torch.ones(9, dtype=torch.bool)
    keep[[3, 5]] = False  # F.normalize's eps gives the duplicate pair an arbitrary direction gradient
    torch.testing.assert_close(a.grad[keep].double(), b.grad[keep], atol=1e-5, rtol=1e-4)
