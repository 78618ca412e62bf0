"""Losses of one-step diffusion generators: score distillation (VSD, DMD) and bootstrapping (BOOT).

Pure functions on tensors in the conventions of :mod:`kdistill.models.diffusion` (v-prediction, ``z_t = alpha_t x +
sigma_t eps``). Every function returns fp32 values per example ``(B,)`` or a per-element direction ``(B, ...)``;
reduce with :func:`kdistill.losses.reduce.masked_mean`.

Score distillation trains a generator ``x = G(eps)`` with a gradient that is not the gradient of a loss one can write
down in closed form: ``dL/dx = grad`` with ``grad`` a difference of two denoisers' predictions at a noised copy of
``x``. :func:`surrogate_loss` turns such a direction into a scalar whose gradient with respect to ``x`` is
``grad / D`` (``D`` elements per example), so that autograd carries it through the generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KDistillError


def _same_shape(what: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise KDistillError(f"{what}: got shapes {tuple(a.shape)} and {tuple(b.shape)}, expected equal shapes "
                            "(B, *sample_shape).")


def sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each example ``(B, ...)`` -> ``(B,)``, in fp32: the denoising loss of a v-prediction
    against its target, and the regression of a generator's samples onto fixed targets."""
    _same_shape("sample_mse", pred, target)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * mean_d (x - sg(x - grad))**2`` per example ``(B,)``: its value is ``0.5 * mean(grad**2)`` and its
    gradient with respect to ``x`` is exactly ``grad / D`` (``D``: elements per example); ``grad`` never receives a
    gradient. How a score-distillation direction reaches the generator's parameters (DMD; Poole et al., 2022)."""
    _same_shape("surrogate_loss", x, grad)
    x = x.float()
    target = (x - grad.float()).detach()
    return 0.5 * (x - target).pow(2).flatten(1).mean(1)


def dmd_gradient(x: Tensor, fake_x0: Tensor, real_x0: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Distribution matching direction (Yin et al., 2024, "One-step Diffusion with Distribution Matching
    Distillation"): ``(fake_x0 - real_x0) / mean_d |x - real_x0|`` per example, ``(B, ...)`` fp32.

    ``x``: the generator's samples; ``fake_x0`` / ``real_x0``: the clean-data predictions of the generator's own
    (fake) score network and of the teacher at the same noised copy of ``x``. The difference of the two scores at
    ``z_t`` is ``alpha_t / sigma_t**2 * (fake_x0 - real_x0)``; DMD drops that factor and divides by the mean
    distance to the teacher's prediction instead, which makes the step size the same at every timestep and noise
    level. Descending it moves ``x`` towards ``real_x0`` and away from ``fake_x0``. Never a gradient: it is a target.
    """
    _same_shape("dmd_gradient", x, fake_x0)
    _same_shape("dmd_gradient", x, real_x0)
    with torch.no_grad():
        x, fake_x0, real_x0 = x.float(), fake_x0.float(), real_x0.float()
        norm = (x - real_x0).abs().flatten(1).mean(1).clamp_min(eps)
        grad = (fake_x0 - real_x0) / norm.reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.nan_to_num(grad)


def vsd_gradient(fake_x0: Tensor, real_x0: Tensor, *, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Variational score distillation direction (Wang et al., 2023, "ProlificDreamer"): ``w(t) * (eps_real -
    eps_fake)`` with ``w(t) = sigma_t**2``, written with clean-data predictions at the same ``z_t``:
    ``eps = (z_t - alpha_t x0) / sigma_t`` gives ``eps_real - eps_fake = alpha_t / sigma_t * (fake_x0 - real_x0)``,
    so the direction is ``alpha_t * sigma_t * (fake_x0 - real_x0)`` ``(B, ...)`` fp32. ``alpha`` / ``sigma``:
    ``(B, 1, ...)`` tensors that broadcast against the predictions. Never a gradient: it is a target."""
    _same_shape("vsd_gradient", fake_x0, real_x0)
    with torch.no_grad():
        return (alpha.float() * sigma.float()) * (fake_x0.float() - real_x0.float())


def boot_signal_target(signal_t: Tensor, teacher_x0: Tensor, *, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
                       sigma_s: Tensor) -> Tensor:
    """BOOT's bootstrapping target (Gu et al., 2023, "BOOT: Data-free Distillation of Denoising Diffusion Models
    with Bootstrapping"): the signal at the earlier timestep ``s`` after one deterministic DDIM step of the teacher.

    The student predicts the *signal* ``y_t = (x_t - sigma_t eps) / alpha_t`` of the teacher's ODE trajectory
    ``x_t`` that starts from the noise ``eps``. From ``x_t = alpha_t y_t + sigma_t eps``, the teacher's clean-data
    prediction ``x0`` at ``x_t`` and the DDIM step ``x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t``::

        y_s = (x_s - sigma_s eps) / alpha_s = x0 + (sigma_s alpha_t) / (alpha_s sigma_t) * (y_t - x0)

    The right-hand form never divides by a small ``alpha``: both ratios ``sigma_s / sigma_t`` and ``alpha_t /
    alpha_s`` lie in ``(0, 1]`` for ``s < t``, so the target is as well conditioned at the last timestep as at the
    first (it tends to the teacher's ``x0``). ``alpha_*`` / ``sigma_*``: ``(B, 1, ...)``; returns ``(B, ...)`` fp32,
    detached (a stop-gradient target)."""
    _same_shape("boot_signal_target", signal_t, teacher_x0)
    with torch.no_grad():
        ratio = (sigma_s.float() / sigma_t.float()) * (alpha_t.float() / alpha_s.float())
        x0 = teacher_x0.float()
        return x0 + ratio * (signal_t.float() - x0)
