"""Normalisation and precision of the relation losses (PKT, RKD) against float64 direct computations of the
reference formulas (the PKT authors' code / mdistiller ``cosine_similarity_loss``; the RKD authors' code /
mdistiller ``rkd_loss``), written out here from the definitions."""

import pytest
import torch

from kdistill.losses.relations import pkt, rkd_angle, rkd_distance, triplet_cosines


def _features(b: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------------------------- references (float64)


def _pkt_reference(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """sum_ij p_t(j|i) log((p_t(j|i) + eps) / (p_s(j|i) + eps)) / B^2 (torch.mean over the B x B matrix)."""

    def cond(x):
        x = x.double()
        x = x / x.pow(2).sum(1, keepdim=True).sqrt()
        k = (x @ x.T + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ps, pt = cond(s), cond(t)
    b = s.shape[0]
    return (pt * torch.log((pt + eps) / (ps + eps))).sum() / (b * b)


def _smooth_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    return torch.where(d < 1.0, 0.5 * d * d, d - 0.5)


def _pdist_reference(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The reference's pdist: sqrt(clamp(|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>, eps)), diagonal set to 0."""
    sq = x.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.T).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(x), dtype=x.dtype))


def _rkd_distance_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, B) Huber terms; the reference's loss is their mean over all B^2 entries."""
    ds, dt = _pdist_reference(s.double()), _pdist_reference(t.double())
    ds = ds / ds[ds > 0].mean()
    dt = dt / dt[dt > 0].mean()
    return _smooth_l1(ds, dt)


def _cosines_reference(x: torch.Tensor) -> torch.Tensor:
    """[j, i, k] = <u_ji, u_jk> with u_ji = (x_i - x_j) / |x_i - x_j| from explicit difference vectors, and a
    zero difference vector normalised to the 0 vector (its cosines are 0). Gradient-safe at zero length."""
    x = x.double()
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # [j, i] = x_i - x_j
    sq = diff.pow(2).sum(-1)
    pos = sq > 0
    norm = torch.where(pos, sq, torch.ones_like(sq)).sqrt()
    unit = torch.where(pos.unsqueeze(-1), diff / norm.unsqueeze(-1), torch.zeros_like(diff))
    return torch.einsum("jid,jkd->jik", unit, unit)


def _rkd_angle_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, B, B) Huber terms indexed [j, i, k]; the reference's loss is their mean over all B^3 entries."""
    return _smooth_l1(_cosines_reference(s), _cosines_reference(t))


def _triplet_cosines_float32_subtraction(x: torch.Tensor) -> torch.Tensor:
    """The previous implementation (float64 distances cast to float32 before the law-of-cosines subtraction),
    kept here only to show that the test below tells the two apart."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    g = x @ x.T
    diag = g.diagonal()
    sq = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * g).clamp_min(0.0)
    inv = torch.where(sq > 1e-24, sq.clamp_min(1e-24).rsqrt(), torch.zeros_like(sq)).float()
    sq = sq.float()
    dots = 0.5 * (sq.unsqueeze(2) + sq.unsqueeze(1) - sq.unsqueeze(0))
    return dots * inv.unsqueeze(2) * inv.unsqueeze(1)


# ---------------------------------------------------------------------------------------------- PKT


@pytest.mark.parametrize("b", [16, 64, 128])
def test_pkt_mean_is_the_reference_mean_over_b_squared(b):
    """pkt(s, t).mean() == sum_ij p_t log(p_t / p_s) / B^2 (reference eps convention) at every batch size:
    the ratio is 1 (a per-row KL without the 1/B gave ratio B, i.e. a weight B times the cited setting)."""
    s, t = _features(b, 12, 10 + b), _features(b, 20, 20 + b)
    got = pkt(s, t)
    assert got.shape == (b,)
    want = _pkt_reference(s, t)
    assert want.item() > 1e-5  # a non-trivial value, so the ratio below is meaningful
    assert got.double().mean().item() / want.item() == pytest.approx(1.0, abs=1e-4)


def test_pkt_gradient_matches_reference():
    s, t = _features(16, 12, 1), _features(16, 20, 2)
    a = s.clone().requires_grad_(True)
    r = s.double().clone().requires_grad_(True)
    pkt(a, t).mean().backward()
    _pkt_reference(r, t).backward()
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-3, atol=1e-5 * r.grad.abs().max().item())


# ---------------------------------------------------------------------------------------------- RKD distance


@pytest.mark.parametrize("b", [3, 8, 32])
def test_rkd_distance_matches_reference_mean_over_b_squared(b):
    """Per row: sum_{j != i} Huber / B, so the mean over rows is the reference's mean over all B^2 entries
    (the old mean over the B - 1 partners was B / (B - 1) times larger). Normaliser: mean of the off-diagonal
    distances, which are exactly the reference's positive entries."""
    s, t = _features(b, 6, 3 + b, scale=2.0), _features(b, 9, 4 + b)
    s[1] = s[0] + 1e-3  # a near-duplicate pair: still a positive (off-diagonal) distance on both sides
    a = s.clone().requires_grad_(True)
    r = s.double().clone().requires_grad_(True)
    got = rkd_distance(a, t)
    want = _rkd_distance_reference(r, t)
    torch.testing.assert_close(got.double(), want.sum(1) / b, rtol=1e-5, atol=1e-7)
    assert got.double().mean().item() == pytest.approx(want.mean().item(), rel=1e-5)
    got.mean().backward()
    want.mean().backward()
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-6 * r.grad.abs().max().item())


# ---------------------------------------------------------------------------------------------- RKD angle


@pytest.mark.parametrize("b", [3, 7, 16])
def test_rkd_angle_matches_reference_mean_over_b_cubed(b):
    """rkd_angle(s, t).mean() is the reference's smooth_l1 mean over all B^3 triplet entries (zero-length
    differences normalised to 0 vectors); per row i: sum_{j, k} h[j, i, k] / B^2. Values and gradients."""
    s, t = _features(b, 5, 30 + b), _features(b, 11, 40 + b, scale=3.0)
    a = s.clone().requires_grad_(True)
    r = s.double().clone().requires_grad_(True)
    got = rkd_angle(a, t)
    want = _rkd_angle_reference(r, t)
    torch.testing.assert_close(got.double(), want.mean((0, 2)), rtol=1e-5, atol=1e-7)
    assert got.double().mean().item() == pytest.approx(want.mean().item(), rel=1e-5)
    got.mean().backward()
    want.mean().backward()
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-6 * r.grad.abs().max().item())


def test_triplet_cosines_keep_float64_through_the_subtraction():
    """A near-duplicate pair at embedding scale 100: the law-of-cosines subtraction cancels; in float64 the
    cosines match explicit unit difference vectors to ~1e-7 and their gradients to ~1e-7 relative. The same
    inputs through a float32 subtraction are off by ~1e-3, far outside these tolerances."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g) * 100
    x[5] = x[2] + 0.005 * torch.randn(16, generator=g)
    w = torch.randn(8, 8, 8, generator=g, dtype=torch.float64)  # a generic weighting of the cosines for the gradient

    want = _cosines_reference(x)
    got = triplet_cosines(x)
    assert got.dtype == torch.float32
    err = (got.double() - want).abs().max().item()
    assert err < 1e-6  # well below the ~2.7e-3 error of the float32 subtraction
    old_err = (_triplet_cosines_float32_subtraction(x).double() - want).abs().max().item()
    assert old_err > 1e-4  # the check above would have failed before the fix

    a = x.double().clone().requires_grad_(True)
    r = x.double().clone().requires_grad_(True)
    (triplet_cosines(a).double() * w).sum().backward()
    (_cosines_reference(r) * w).sum().backward()
    scale = r.grad.abs().max().item()
    assert (a.grad - r.grad).abs().max().item() < 1e-6 * scale
    o = x.double().clone().requires_grad_(True)
    (_triplet_cosines_float32_subtraction(o).double() * w).sum().backward()
    assert (o.grad - r.grad).abs().max().item() > 1e-5 * scale  # and the gradient check would have failed too


def test_rkd_angle_near_duplicate_pair_at_scale_100():
    """The loss itself on the near-duplicate input: value and gradient agree with the explicit reference."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 16, generator=g) * 100
    s[5] = s[2] + 0.005 * torch.randn(16, generator=g)
    t = torch.randn(8, 10, generator=g)
    a = s.clone().requires_grad_(True)
    r = s.double().clone().requires_grad_(True)
    got, want = rkd_angle(a, t), _rkd_angle_reference(r, t).mean((0, 2))
    assert (got.double() - want).abs().max().item() < 1e-6
    got.sum().backward()
    want.sum().backward()
    assert (a.grad.double() - r.grad).abs().max().item() < 1e-5 * r.grad.abs().max().item()
