"""The diffusion schedule, guidance and samplers against closed forms and diffusers' schedulers."""

import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.models.diffusion import (
    SAMPLERS,
    DiffusionSchedule,
    MLPDenoiser,
    UNetDenoiser,
    guided,
    noise_to_data,
    sample,
    timestep_embedding,
)


@pytest.mark.parametrize("kind,beta", [("cosine", "squaredcos_cap_v2"), ("linear", "linear")])
def test_alphas_cumprod_match_diffusers(kind, beta):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta).alphas_cumprod
    ours = DiffusionSchedule(1000, kind).alphas_cumprod
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-7)


def test_variance_preserving_and_clean_timestep():
    s = DiffusionSchedule(100)
    t = torch.arange(-1, 100)
    a, sig = s.alpha_sigma(t)
    torch.testing.assert_close(a ** 2 + sig ** 2, torch.ones_like(a))
    assert a[0] == 1 and sig[0] == 0  # t = -1: clean data
    assert (a[1:] < a[:-1]).all()  # alpha falls with t
    with pytest.raises(KDistillError, match="timesteps"):
        s.alpha_sigma(torch.tensor([100]))


def test_v_roundtrip_closed_form():
    s = DiffusionSchedule(1000)
    x, eps = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0, 10, 500, 998, 999])
    z = s.add_noise(x, eps, t)
    v = s.v_target(x, eps, t)
    torch.testing.assert_close(s.predict_x0(v, z, t), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.predict_eps(v, z, t), eps, atol=1e-5, rtol=1e-5)
    # an exact prediction makes one DDIM step land on the same trajectory (same x, same eps)
    t_prev = torch.tensor([-1, 3, 200, 500, 0])
    torch.testing.assert_close(s.ddim_step(v, z, t, t_prev), s.add_noise(x, eps, t_prev), atol=1e-5, rtol=1e-5)


def test_ddim_step_equals_diffusers_scheduler_step():
    """One denoising step of ours equals diffusers' DDIMScheduler.step (v-prediction, trailing spacing)."""
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                        timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(4)
    ours = DiffusionSchedule(1000, "cosine")
    assert ours.timesteps(4) == [int(t) for t in ref.timesteps]
    torch.manual_seed(0)
    z, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    steps = ours.timesteps(4) + [-1]
    for t, t_prev in zip(steps[:-1], steps[1:], strict=True):
        expect = ref.step(v, t, z).prev_sample
        got = ours.ddim_step(v, z, torch.full((2,), t), torch.full((2,), t_prev))
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


def test_timesteps_trailing():
    s = DiffusionSchedule(1000)
    assert s.timesteps(1) == [999]
    assert s.timesteps(2) == [999, 499]
    assert s.timesteps(4) == [999, 749, 499, 249]
    with pytest.raises(KDistillError, match="steps"):
        s.timesteps(0)


def test_guidance_closed_form_and_scale_one_is_one_call():
    calls = []

    def net(z, t, y):
        calls.append(len(z))
        return z + (y != 3).float()[:, None]  # conditional: z + 1; null class 3: z

    z, t, y = torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])
    torch.testing.assert_close(guided(net, z, t, y, 1.0, null_class=3), torch.ones(2, 2))
    assert calls == [2]
    torch.testing.assert_close(guided(net, z, t, y, 2.5, null_class=3), torch.full((2, 2), 2.5))
    per_example = guided(net, z, t, y, torch.tensor([1.0, 3.0]), null_class=3)
    torch.testing.assert_close(per_example, torch.tensor([[1.0, 1.0], [3.0, 3.0]]))


class _Gaussian(torch.nn.Module):
    """The exact v-prediction of the optimal denoiser of data N(mu_y, s^2 I): E[x | z_t] in closed form."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, z, t, y):
        a, sig = self.schedule.alpha_sigma(t, z.ndim)
        mu = self.mu[y]
        x_hat = mu + a * self.s ** 2 / (a ** 2 * self.s ** 2 + sig ** 2) * (z - a * mu)
        eps_hat = (z - a * x_hat) / sig
        return a * eps_hat - sig * x_hat


def test_many_step_ddim_on_exact_gaussian_denoiser_gives_the_data_distribution():
    s = DiffusionSchedule(1000)
    mu = torch.tensor([[3.0, -2.0], [-1.0, 0.5]])
    net = _Gaussian(s, mu, 0.5)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, generator=g)
    y = torch.arange(4000) % 2
    x = sample(net, s, sampler="ddim", steps=100, noise=noise, labels=y)
    for c in (0, 1):
        xc = x[y == c]
        torch.testing.assert_close(xc.mean(0), mu[c], atol=0.05, rtol=0)
        assert abs(float(xc.std(0).mean()) - 0.5) < 0.03
    # one step from pure noise lands on the mean: the optimal denoiser at t = T-1 sees almost no signal
    x1 = sample(net, s, sampler="ddim", steps=1, noise=noise, labels=y)
    assert float((x1 - mu[y]).abs().max()) < 0.05


def test_consistency_sampler_is_seeded_and_noise_to_data_has_one_step():
    s = DiffusionSchedule(1000)
    net = MLPDenoiser((2,), 2, width=16, depth=2)
    noise, y = torch.randn(8, 2), torch.arange(8) % 2
    def draw(seed):
        return sample(net, s, sampler="consistency", steps=3, noise=noise, labels=y,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # one consistency step equals the DDIM step to clean data
    torch.testing.assert_close(sample(net, s, sampler="consistency", steps=1, noise=noise, labels=y),
                               sample(net, s, sampler="ddim", steps=1, noise=noise, labels=y))
    x = sample(net, s, sampler="noise_to_data", steps=1, noise=noise, labels=y)
    torch.testing.assert_close(x, noise_to_data(net, s, noise, y, torch.zeros(8, dtype=torch.long)))
    with pytest.raises(KDistillError, match="1 step"):
        sample(net, s, sampler="noise_to_data", steps=2, noise=noise, labels=y)
    with pytest.raises(KDistillError, match="sampler"):
        sample(net, s, sampler="euler", steps=2, noise=noise, labels=y)
    assert set(SAMPLERS) == {"ddim", "consistency", "noise_to_data"}


def test_timestep_embedding_shape_and_values():
    e = timestep_embedding(torch.tensor([0, 5]), 7)
    assert e.shape == (2, 7)
    torch.testing.assert_close(e[0, :3], torch.ones(3))  # cos(0)
    assert math.isclose(float(e[1, 0]), math.cos(5.0), rel_tol=1e-6)


def test_unet_denoiser_shapes_and_class_conditioning():
    torch.manual_seed(0)
    net = UNetDenoiser((1, 28, 28), 10, widths=(8, 16, 16), norm_groups=4)
    z, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    out = net(z, t, torch.tensor([0, 10]))  # 10: the null class
    assert out.shape == z.shape
    assert not torch.allclose(net(z, t, torch.tensor([0, 10])), net(z, t, torch.tensor([1, 10])))
