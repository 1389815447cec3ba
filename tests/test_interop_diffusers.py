"""diffusers interop: eps-models <-> score functions, scheduler configs, and a scoresde
sampler against diffusers' schedulers on the same exact mixture model."""

from __future__ import annotations

import diffusers
import pytest
import torch

from scoresde import VESDE, VPSDE, CosineVPSDE
from scoresde.interop.diffusers import (
    ddpm_scheduler,
    score_fn_from_diffusers,
    scoresde_model_as_diffusers_eps,
    vpsde_from_diffusers_scheduler,
    vpsde_to_ddpm_scheduler_config,
)
from scoresde.samplers.ddim import DDIMSampler
from scoresde.toy import benchmark_mixture_2d

GM = benchmark_mixture_2d()
VP = VPSDE()


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def exact_eps_model():
    """The mixture's exact eps at DDPM's discrete noise levels: model(x, k) for integer (or
    fractional) timesteps k, built from scoresde's own exact score."""
    return scoresde_model_as_diffusers_eps(GM.score_fn(VP), VP)


def _x(n=32, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- UNet2DModel as a score_fn ---------------------------------------------------------------


@pytest.mark.parametrize("timesteps", ["nearest", "float", "interpolate"])
def test_unet_wrapper_shape_dtype_and_formula(timesteps):
    unet = tiny_unet()
    score = score_fn_from_diffusers(unet, VP, timesteps=timesteps)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.01, 0.5, 0.97], dtype=torch.float64)
    with torch.no_grad():
        s = score(x, t)
        assert s.shape == x.shape and s.dtype == torch.float64 and torch.isfinite(s).all()
        assert score(x.float(), t.float()).dtype == torch.float32
        if timesteps == "nearest":
            # t -> the integer timestep nearest in log-SNR; score = -eps / sqrt(1 - abar_k).
            lam = VP.log_snr(t)
            table = torch.log(VP.alphas_cumprod / (1 - VP.alphas_cumprod))
            k = (table[None, :] - lam[:, None]).abs().argmin(1)
            eps = unet(x.float(), k).sample.double()
            expect = -eps / (1 - VP.alphas_cumprod[k]).sqrt()[:, None, None, None]
            torch.testing.assert_close(s, expect, rtol=1e-5, atol=1e-5)


def test_sampling_the_wrapped_unet_runs():
    sampler = DDIMSampler(VP, num_steps=8)
    with torch.no_grad():
        x = sampler.sample(
            score_fn_from_diffusers(tiny_unet(), VP),
            (4, 1, 8, 8),
            generator=torch.Generator().manual_seed(0),
        )
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and sampler.nfe == 8


# --- noise-level matching, both directions ---------------------------------------------------


@pytest.mark.parametrize("sde", [VPSDE(), CosineVPSDE(), VESDE()], ids=repr)
def test_exact_eps_model_gives_the_exact_score(sde):
    """An exact eps-model on DDPM's levels, wrapped for ANY SDE, gives that SDE's exact score:
    exactly with fractional timesteps; with "nearest" the level is off by <= half a step
    (relative score error up to ~6% at t = 0.01, where DDPM's levels are sparse in log-SNR)."""
    model = exact_eps_model()
    exact = GM.score_fn(sde)
    x = _x()
    for t in (0.01, 0.3, 0.9):
        ref = exact(x, t)
        s = score_fn_from_diffusers(model, sde, alphas_cumprod=VP.alphas_cumprod, timesteps="float")
        torch.testing.assert_close(s(x, t), ref, rtol=1e-8, atol=1e-8)
        for mode, tol in (("nearest", 0.1), ("interpolate", 0.02)):
            s = score_fn_from_diffusers(model, sde, alphas_cumprod=VP, timesteps=mode)
            assert float((s(x, t) - ref).norm() / ref.norm()) < tol


def test_eps_adapter_matches_discrete_levels():
    """eps(x, k) = -sqrt(1 - abar_k) score(x, t_k) with alpha(t_k)^2 = abar_k."""
    eps_model = exact_eps_model()
    x = _x()
    for k in (0, 37, 500, 900):
        abar = VP.alphas_cumprod[k]
        t = VP.t_from_log_snr(torch.log(abar / (1 - abar)))
        torch.testing.assert_close(VP.alpha(t) ** 2, abar, rtol=1e-10, atol=0)
        expect = -(1 - abar).sqrt() * GM.score_fn(VP)(x, t)
        torch.testing.assert_close(eps_model(x, k), expect, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(eps_model(x, torch.full((32,), k)), expect)


# --- scheduler configs -----------------------------------------------------------------------


def test_config_round_trip_and_alphas_cumprod():
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    config = vpsde_to_ddpm_scheduler_config(sde)
    assert config["beta_start"] == pytest.approx(1e-4) and config["beta_end"] == pytest.approx(0.02)
    scheduler = diffusers.DDPMScheduler(**config)
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), sde.alphas_cumprod, rtol=0, atol=1e-6
    )
    back = vpsde_from_diffusers_scheduler(scheduler)
    assert (back.beta_0, back.beta_1, back.N) == pytest.approx((0.1, 20.0, 1000))
    assert vpsde_to_ddpm_scheduler_config(back) == pytest.approx(config)
    assert vpsde_from_diffusers_scheduler(dict(config)).N == 1000
    small = VPSDE(beta_min=0.2, beta_max=10.0, N=50)
    assert vpsde_to_ddpm_scheduler_config(
        vpsde_from_diffusers_scheduler(vpsde_to_ddpm_scheduler_config(small))
    ) == pytest.approx(vpsde_to_ddpm_scheduler_config(small))


def test_ddpm_scheduler_helper_and_missing_diffusers(monkeypatch):
    scheduler = ddpm_scheduler(VP, variance_type="fixed_large")
    assert scheduler.config.variance_type == "fixed_large" and not scheduler.config.clip_sample
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), VP.alphas_cumprod, rtol=0, atol=1e-6
    )
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # diffusers not installed
    with pytest.raises(ImportError, match=r"pip install 'scoresde\[bench\]'"):
        ddpm_scheduler(VP)


def test_config_errors():
    with pytest.raises(ValueError, match="beta_schedule must be 'linear'"):
        vpsde_from_diffusers_scheduler(diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="only VPSDE"):
        vpsde_to_ddpm_scheduler_config(CosineVPSDE())
    with pytest.raises(TypeError, match="scheduler_or_config"):
        vpsde_from_diffusers_scheduler(3)
    with pytest.raises(ValueError, match="timesteps"):
        score_fn_from_diffusers(tiny_unet(), VP, timesteps="round")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        score_fn_from_diffusers(tiny_unet(), VESDE())
    with pytest.raises(ValueError, match="strictly decreasing"):
        score_fn_from_diffusers(tiny_unet(), VP, alphas_cumprod=torch.tensor([0.5, 0.9]))


def test_cosine_model_through_alphas_cumprod():
    """A model trained with diffusers' "squaredcos_cap_v2" chain: pass the scheduler as
    alphas_cumprod and sample with any SDE; the exact eps-model then gives the exact score."""
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    cos_eps = scoresde_model_as_diffusers_eps(GM.score_fn(VP), VP, alphas_cumprod=scheduler)
    score = score_fn_from_diffusers(
        cos_eps, CosineVPSDE(), alphas_cumprod=scheduler, timesteps="float"
    )
    x = _x()
    for t in (0.05, 0.5, 0.9):
        torch.testing.assert_close(
            score(x, t), GM.score_fn(CosineVPSDE())(x, t), rtol=1e-5, atol=1e-5
        )


# --- the same sampler in both libraries ------------------------------------------------------


def _grid_times(timesteps):
    abar = VP.alphas_cumprod[timesteps]
    return VP.t_from_log_snr(torch.log(abar / (1 - abar)))


def test_diffusers_ddim_scheduler_matches_ddim_sampler():
    """diffusers' DDIMScheduler (10 steps, timesteps 900, 800, ..., 0, set_alpha_to_one)
    driven by the exact eps-model equals scoresde's DDIMSampler on the same noise levels
    (t_k with alpha(t_k)^2 = abar_k; its final Tweedie denoising step is diffusers' last step
    to abar = 1)."""
    eps_model = exact_eps_model()
    config = vpsde_to_ddpm_scheduler_config(VP)
    scheduler = diffusers.DDIMScheduler(**config, set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    x_T = _x(256, seed=1)
    x = x_T.clone()
    for k in scheduler.timesteps:
        x = scheduler.step(eps_model(x, int(k)), int(k), x, eta=0.0).prev_sample
    grid = _grid_times(scheduler.timesteps.long())
    sampler = DDIMSampler(VP, time_grid=grid, eta=0.0, denoise=True)
    ours = sampler.sample(score_fn_from_diffusers(eps_model, VP), x_T.shape, x_init=x_T)
    assert sampler.nfe == 10
    # diffusers keeps alphas_cumprod in float32: agreement to ~1e-6.
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_diffusers_ddpm_step_matches_stochastic_ddim_step():
    """One DDPMScheduler step (posterior mean and variance "fixed_small") equals one DDIM step
    with eta = 1 between the same levels, noise included (same generator seed)."""
    eps_model = exact_eps_model()
    scheduler = diffusers.DDPMScheduler(**vpsde_to_ddpm_scheduler_config(VP))
    scheduler.set_timesteps(10)
    k, k_prev = 900, 800
    x = _x(128, seed=2)
    out = scheduler.step(
        eps_model(x, k), k, x, generator=torch.Generator().manual_seed(7)
    ).prev_sample
    sampler = DDIMSampler(VP, time_grid=_grid_times(torch.tensor([k, k_prev])), eta=1.0)
    ours = sampler.sample(
        GM.score_fn(VP), x.shape, x_init=x, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)
