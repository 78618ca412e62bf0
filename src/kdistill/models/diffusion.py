"""Diffusion models for step distillation (task ``diffusion``): the noise schedule, the denoiser networks,
classifier-free guidance and the samplers.

Conventions, used by every diffusion method and test:

* a **discrete variance-preserving schedule** of ``num_timesteps`` steps (``T``, 1,000 by default) whose
  ``alphas_cumprod`` are built as ``diffusers`` builds them, so that one step of ours equals one step of its
  schedulers (a test checks it). Timestep ``t`` is an integer in ``[0, T)``; ``-1`` stands for clean data
  (``alpha = 1, sigma = 0``). ``z_t = alpha_t x + sigma_t eps`` with ``alpha_t**2 + sigma_t**2 = 1``;
* every network **predicts v** (Salimans & Ho, 2022): ``v = alpha_t eps - sigma_t x``, so ``x = alpha_t z - sigma_t v``
  and ``eps = sigma_t z + alpha_t v``. Unlike an eps-prediction, the clean-data estimate stays well conditioned at
  the last timestep, where one-step students start;
* a denoiser is called ``net(z, t, y) -> v`` with class ids ``y``; id ``num_classes`` is the *null* class that
  classifier-free guidance uses (the teacher trains with labels dropped to it);
* samplers are named (``SAMPLERS``) so an exported student says in data how it samples: ``ddim`` (deterministic
  DDIM on ``timesteps(n)``), ``consistency`` (predict clean data, re-noise it to the next timestep with fresh
  noise: multistep consistency sampling) and ``noise_to_data`` (a generator of clean data from the initial noise,
  BOOT's student: ``x = alpha_T eps - sigma_T net(eps, t, y)`` read at timestep 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect
from ..registry import MODELS

Net = Callable[[Tensor, Tensor, Tensor], Tensor]
SCHEDULES = ("cosine", "linear")


class DiffusionSchedule(nn.Module):
    """A discrete VP noise schedule. ``kind="cosine"``: ``diffusers``' ``squaredcos_cap_v2`` (Nichol & Dhariwal, 2021:
    betas from ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)**2``, capped at 0.999); ``"linear"``: betas
    evenly from 1e-4 to 0.02 (Ho et al., 2020). Buffers, so ``.to(device)`` moves it with a model."""

    def __init__(self, num_timesteps: int = 1000, kind: str = "cosine") -> None:
        super().__init__()
        expect(kind in SCHEDULES, "schedule kind", kind, " or ".join(repr(k) for k in SCHEDULES))
        expect(num_timesteps >= 2, "num_timesteps", num_timesteps, "an integer >= 2")
        self.num_timesteps, self.kind = int(num_timesteps), kind
        n = self.num_timesteps
        if kind == "cosine":
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
        else:
            betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, 0)
        # index 0 is "clean" (t = -1); index t + 1 is timestep t
        self.register_buffer("alphas_cumprod", ac.float(), persistent=False)
        self.register_buffer("_alpha", torch.cat([torch.ones(1, dtype=torch.float64), ac.sqrt()]).float(),
                             persistent=False)
        self.register_buffer("_sigma", torch.cat([torch.zeros(1, dtype=torch.float64), (1 - ac).sqrt()]).float(),
                             persistent=False)

    def settings(self) -> dict[str, object]:
        return {"num_timesteps": self.num_timesteps, "kind": self.kind}

    def alpha_sigma(self, t: Tensor, ndim: int = 1) -> tuple[Tensor, Tensor]:
        """``alpha_t, sigma_t`` of integer timesteps ``t`` ``(B,)`` (``-1``: clean), shaped ``(B, 1, ...)`` to broadcast
        against tensors of ``ndim`` dimensions."""
        t = torch.as_tensor(t, device=self._alpha.device).long()
        if (t < -1).any() or (t >= self.num_timesteps).any():
            raise KDistillError(f"timesteps must lie in [-1, {self.num_timesteps}); got {t.min()}..{t.max()}")
        shape = (-1,) + (1,) * (ndim - 1)
        return self._alpha[t + 1].reshape(shape), self._sigma[t + 1].reshape(shape)

    def add_noise(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x.ndim)
        return a * x + s * noise

    def v_target(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, x.ndim)
        return a * noise - s * x

    def predict_x0(self, v: Tensor, z: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, z.ndim)
        return a * z - s * v

    def predict_eps(self, v: Tensor, z: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t, z.ndim)
        return s * z + a * v

    def ddim_step(self, v: Tensor, z: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
        """One deterministic DDIM step (eta = 0) from ``z_t`` to ``z_{t_prev}`` given the prediction ``v`` at ``t``."""
        a_p, s_p = self.alpha_sigma(t_prev, z.ndim)
        return a_p * self.predict_x0(v, z, t) + s_p * self.predict_eps(v, z, t)

    def timesteps(self, steps: int) -> list[int]:
        """``steps`` sampling timesteps, last first, "trailing" spacing (the first is ``T - 1``, pure noise, so that a
        one-step sampler starts where the data is gone; Lin et al., 2024): ``diffusers``' ``"trailing"`` spacing."""
        expect(1 <= steps <= self.num_timesteps, "steps", steps, f"an integer in [1, {self.num_timesteps}]")
        n = self.num_timesteps
        return [int(round(n - i * n / steps)) - 1 for i in range(steps)]

    def snr(self, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return (a / s.clamp_min(1e-12)) ** 2


def guided(net: Net, z: Tensor, t: Tensor, y: Tensor, scale: float | Tensor, null_class: int) -> Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): ``v_null + scale * (v_y - v_null)``; ``scale = 1`` is the plain
    conditional prediction (one network call). ``scale`` may be per example ``(B,)``."""
    if not isinstance(scale, Tensor) and scale == 1.0:
        return net(z, t, y)
    both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    if isinstance(scale, Tensor):
        scale = scale.to(z).reshape((-1,) + (1,) * (z.ndim - 1))
    return uncond + scale * (cond - uncond)


def _timestep_batch(t: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)


@torch.no_grad()
def sample(net: Net, schedule: DiffusionSchedule, *, sampler: str, steps: int, noise: Tensor, labels: Tensor,
           generator: torch.Generator | None = None, timesteps: Sequence[int] | None = None) -> Tensor:
    """Clean samples from ``noise`` ``(B, ...)`` with ``steps`` network evaluations of ``net`` (already guided, if it
    should be). ``sampler``: see ``SAMPLERS``; ``generator`` draws the fresh noise of the consistency sampler."""
    expect(sampler in SAMPLERS, "sampler", sampler, " or ".join(repr(s) for s in SAMPLERS))
    return SAMPLERS[sampler](net, schedule, steps=steps, noise=noise, labels=labels, generator=generator,
                             timesteps=list(timesteps) if timesteps is not None else schedule.timesteps(steps))


def _ddim(net: Net, schedule: DiffusionSchedule, *, steps: int, noise: Tensor, labels: Tensor,
          generator: torch.Generator | None, timesteps: list[int]) -> Tensor:
    z = noise
    for i, t in enumerate(timesteps):
        tb = _timestep_batch(t, z)
        t_prev = _timestep_batch(timesteps[i + 1] if i + 1 < len(timesteps) else -1, z)
        z = schedule.ddim_step(net(z, tb, labels), z, tb, t_prev)
    return z


def _consistency(net: Net, schedule: DiffusionSchedule, *, steps: int, noise: Tensor, labels: Tensor,
                 generator: torch.Generator | None, timesteps: list[int]) -> Tensor:
    z = noise
    x = z
    for i, t in enumerate(timesteps):
        tb = _timestep_batch(t, z)
        x = schedule.predict_x0(net(z, tb, labels), z, tb)
        if i + 1 < len(timesteps):
            fresh = torch.randn(z.shape, generator=generator, device="cpu").to(z)
            z = schedule.add_noise(x, fresh, _timestep_batch(timesteps[i + 1], z))
    return x


def _noise_to_data(net: Net, schedule: DiffusionSchedule, *, steps: int, noise: Tensor, labels: Tensor,
                   generator: torch.Generator | None, timesteps: list[int]) -> Tensor:
    if steps != 1:
        raise KDistillError(f"the noise_to_data sampler (a one-step generator such as BOOT's) takes 1 step; got "
                            f"{steps}. Fix: evaluate it with steps: [1].")
    return noise_to_data(net, schedule, noise, labels, _timestep_batch(0, noise))


def noise_to_data(net: Net, schedule: DiffusionSchedule, noise: Tensor, labels: Tensor, t: Tensor) -> Tensor:
    """A generator's signal estimate at timestep ``t`` from the initial noise: ``alpha_T eps - sigma_T net(eps, t, y)``,
    the clean-data estimate of a v-network at the last timestep ``T`` (so a generator initialised from the teacher
    starts as the teacher's one-step prediction)."""
    last = _timestep_batch(schedule.num_timesteps - 1, noise)
    a, s = schedule.alpha_sigma(last, noise.ndim)
    return a * noise - s * net(noise, t, labels)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": _ddim, "consistency": _consistency,
                                              "noise_to_data": _noise_to_data}


# ------------------------------------------------------------------------------------------------ networks


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of timesteps ``(B,)`` -> ``(B, dim)`` (Vaswani et al., 2017; as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class _Denoiser(nn.Module):
    """What the denoisers share: example inputs ``(z, t, y)`` for export checks."""

    input_shape: tuple[int, ...]
    num_classes: int

    def example_inputs(self, n: int, _last_dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(n, *self.input_shape, generator=g), torch.randint(0, 1000, (n,), generator=g),
                torch.randint(0, self.num_classes + 1, (n,), generator=g))


class MLPDenoiser(_Denoiser):
    """A small v-prediction network for low-dimensional data (the 2-D toys): ``[z, emb(t), emb(y)]`` through ``depth``
    SiLU layers of ``width`` units."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 3,
                 time_dim: int = 32) -> None:
        super().__init__()
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        d = int(math.prod(self.input_shape))
        self.time_dim = time_dim
        self.label_emb = nn.Embedding(num_classes + 1, time_dim)  # + the null class
        layers: list[nn.Module] = []
        last = d + 2 * time_dim
        for _ in range(depth):
            layers += [nn.Linear(last, width), nn.SiLU()]
            last = width
        self.body = nn.Sequential(*layers, nn.Linear(last, d))

    def forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h = torch.cat([z.reshape(z.shape[0], -1), timestep_embedding(t, self.time_dim), self.label_emb(y)], dim=-1)
        return self.body(h).reshape(z.shape)


class UNetDenoiser(_Denoiser):
    """``diffusers``' ``UNet2DModel``, class-conditional (``num_classes + 1`` label embeddings: the last is the null
    class), predicting v. ``widths``: channels per resolution (each but the last halves the image); ``attention``: a
    self-attention block at the middle resolution (costly on CPU)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 layers_per_block: int = 1, attention: bool = False, norm_groups: int = 8) -> None:
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError as e:  # pragma: no cover - depends on the install
            raise KDistillError("the unet denoiser needs diffusers: pip install 'kdistill[diffusion]'") from e
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        expect(len(self.input_shape) == 3, "input_shape", input_shape, "(channels, height, width)")
        n = len(widths)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if attention and n >= 2:
            down[n // 2], up[n - 1 - n // 2] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.unet = UNet2DModel(sample_size=self.input_shape[1:], in_channels=self.input_shape[0],
                                out_channels=self.input_shape[0], block_out_channels=tuple(widths),
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                layers_per_block=layers_per_block, num_class_embeds=num_classes + 1,
                                norm_num_groups=norm_groups)

    def forward(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.unet(z, t, class_labels=y).sample


@MODELS.register("mlp_denoiser")
def build_mlp_denoiser(input_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 3,
                       time_dim: int = 32) -> MLPDenoiser:
    """v-prediction MLP for low-dimensional data (task ``diffusion``: the 2-D toys)."""
    return MLPDenoiser(input_shape, num_classes, width=width, depth=depth, time_dim=time_dim)


@MODELS.register("unet_denoiser")
def build_unet_denoiser(input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 32, 64),
                        layers_per_block: int = 1, attention: bool = False, norm_groups: int = 8) -> UNetDenoiser:
    """v-prediction UNet for images (task ``diffusion``; ``diffusers``' ``UNet2DModel``)."""
    return UNetDenoiser(input_shape, num_classes, widths=tuple(widths), layers_per_block=layers_per_block,
                        attention=attention, norm_groups=norm_groups)
