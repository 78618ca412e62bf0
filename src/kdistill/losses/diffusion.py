"""Diffusion step distillation: targets and per-example losses given the networks' predictions.

Conventions of :mod:`kdistill.models.diffusion`: ``z_t = alpha_t x + sigma_t eps``, networks predict
``v = alpha_t eps - sigma_t x``, timestep ``-1`` is clean data (``alpha = 1, sigma = 0``). Coefficients are passed as
tensors that broadcast against the samples (``schedule.alpha_sigma(t, z.ndim)``), so these functions never see a
model or a schedule. Every loss returns one fp32 value per example ``(B,)``; reduce with ``masked_mean``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import KDistillError, expect

DISTANCES = ("l2", "pseudo_huber")
#: iCT's pseudo-Huber constant per sqrt(dimension) (Song & Dhariwal, 2023: c = 0.00054 sqrt(d))
PSEUDO_HUBER_C_PER_SQRT_DIM = 0.00054

AlphaSigma = tuple[Tensor, Tensor]


def _per_example(values: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...)`` -> ``(B,)``."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def ddim_map(v: Tensor, z: Tensor, *, alpha: Tensor, sigma: Tensor, alpha_to: Tensor, sigma_to: Tensor) -> Tensor:
    """The deterministic DDIM map (eta = 0) of ``z`` at ``(alpha, sigma)`` to ``(alpha_to, sigma_to)`` given the
    v-prediction ``v`` at ``z``: ``alpha_to * x_hat + sigma_to * eps_hat`` with ``x_hat = alpha z - sigma v`` and
    ``eps_hat = sigma z + alpha v``. ``(alpha_to, sigma_to) = (1, 0)`` gives ``x_hat``; equal coefficients give
    ``z``."""
    x_hat = alpha * z - sigma * v
    eps_hat = sigma * z + alpha * v
    return alpha_to * x_hat + sigma_to * eps_hat


def progressive_target(z: Tensor, z_next: Tensor, *, alpha: Tensor, sigma: Tensor, alpha_next: Tensor,
                       sigma_next: Tensor) -> Tensor:
    """Progressive distillation's clean-data target (Salimans & Ho, 2022, Algorithm 2): the ``x`` for which ONE DDIM
    step from ``z`` (at ``alpha, sigma``) lands exactly on ``z_next`` (at ``alpha_next, sigma_next``), where ``z_next``
    is where two teacher DDIM steps went. Solving ``z_next = alpha_next x + sigma_next (z - alpha x) / sigma``::

        x = (sigma z_next - sigma_next z) / (alpha_next sigma - sigma_next alpha)

    which is ``z_next`` itself when the step ends at clean data (``sigma_next = 0``). Needs ``sigma > 0`` (a noisy
    start) and a step towards less noise (``alpha_next / sigma_next > alpha / sigma``), so the denominator is > 0."""
    z, z_next = z.float(), z_next.float()
    denom = alpha_next * sigma - sigma_next * alpha
    if not bool((denom > 0).all()):
        raise KDistillError("progressive_target: the step must go from noise towards data (alpha_next * sigma > "
                            f"sigma_next * alpha); got a smallest alpha_next*sigma - sigma_next*alpha of "
                            f"{float(denom.min()):.3g}. Pass the coefficients of t and of a smaller t''.")
    return (sigma * z_next - sigma_next * z) / denom


def truncated_snr_mse(student_x0: Tensor, target_x0: Tensor, *, snr: Tensor) -> Tensor:
    """Per-example ``max(snr, 1) * mean((x_student - x_target)^2)`` ``(B,)``: the "truncated SNR" weighting of
    Salimans & Ho (2022). At high SNR it equals the eps-prediction loss; at low SNR (where ``z`` is nearly pure noise
    and a few-step student starts) it stays a plain x-space MSE instead of vanishing. ``snr``: ``(B,)`` or
    broadcastable to ``(B, 1, ...)``."""
    err = _per_example((student_x0.float() - target_x0.float()) ** 2)
    weight = snr.float().reshape(err.shape[0], -1)[:, 0].clamp_min(1.0)
    return weight * err


def segment_boundaries(t: Tensor, *, boundaries: Tensor) -> Tensor:
    """The lower boundary of each timestep's trajectory segment (Hyper-SD): for every ``t`` ``(B,)`` the largest of the
    ascending ``boundaries`` ``(S,)`` strictly below it, so a segment is ``(b_k, b_{k+1}]`` and a boundary timestep
    itself belongs to the segment above it (the one its sampling step starts). ``boundaries`` must start with ``-1``
    (clean data); ``boundaries = [-1]`` maps every timestep to clean data (consistency distillation)."""
    b = torch.as_tensor(boundaries, device=t.device).long()
    if b.ndim != 1 or not b.numel() or int(b[0]) != -1 or bool((b[1:] <= b[:-1]).any()):
        raise KDistillError(f"segment boundaries: got {b.tolist()}, expected ascending timesteps starting with -1 "
                            "(clean data), e.g. [-1, 249, 499, 749] for 4 segments of 1000 timesteps.")
    t = t.long()
    if bool((t < 0).any()):
        raise KDistillError(f"segment_boundaries: got timestep {int(t.min())}, expected timesteps >= 0 (a noisy "
                            "sample; -1 is clean data and lies in no segment).")
    return b[torch.searchsorted(b, t.contiguous(), right=False) - 1]


def consistency_loss(student_v: Tensor, target_v: Tensor, *, student_z: Tensor, target_z: Tensor,
                     student_alpha_sigma: AlphaSigma, target_alpha_sigma: AlphaSigma,
                     boundary: AlphaSigma | None = None, distance: str = "l2",
                     huber_c: float | None = None) -> Tensor:
    """Consistency distillation's per-example loss ``d(f_student(z_{t_{n+1}}), f_target(z_hat_{t_n}))`` ``(B,)``.

    ``f(z, t) = ddim_map(v(z, t), z, t -> boundary)`` maps a noisy sample along the DDIM trajectory its prediction
    implies to the ``boundary`` (coefficients ``(alpha_b, sigma_b)`` per example): ``None`` or ``(1, 0)`` is clean
    data, i.e. ``f = x_hat`` (Song et al., 2023); Hyper-SD passes the lower end of the student timestep's segment.
    The boundary condition ``f(z, b) = z`` holds by construction (a map from ``b`` to itself is the identity), so a
    target at the boundary (e.g. ``t_n = -1``) is the teacher's ODE step itself, whatever ``target_v`` holds.
    ``target_v`` comes from the frozen target network (no gradient flows into it here: it is detached).

    ``distance``: ``"l2"``, the squared error averaged over dimensions; ``"pseudo_huber"``,
    ``sqrt(||a - b||^2 + c^2) - c`` with ``c = huber_c`` (default ``0.00054 sqrt(dim)``: Song & Dhariwal, 2023,
    "Improved Techniques for Training Consistency Models"), less sensitive to outliers than l2."""
    expect(distance in DISTANCES, "consistency distance", distance, " or ".join(repr(d) for d in DISTANCES))
    one = torch.ones((), device=student_z.device)
    a_b, s_b = boundary if boundary is not None else (one, one * 0.0)
    a_s, s_s = student_alpha_sigma
    a_t, s_t = target_alpha_sigma
    f_student = ddim_map(student_v.float(), student_z.float(), alpha=a_s, sigma=s_s, alpha_to=a_b, sigma_to=s_b)
    f_target = ddim_map(target_v.detach().float(), target_z.detach().float(), alpha=a_t, sigma=s_t, alpha_to=a_b,
                        sigma_to=s_b)
    diff = (f_student - f_target).reshape(f_student.shape[0], -1)
    if distance == "l2":
        return (diff ** 2).mean(dim=1)
    c = PSEUDO_HUBER_C_PER_SQRT_DIM * math.sqrt(diff.shape[1]) if huber_c is None else float(huber_c)
    expect(c > 0, "consistency huber_c", huber_c, "a positive number (or None for 0.00054 * sqrt(dim))")
    return torch.sqrt((diff ** 2).sum(dim=1) + c * c) - c
