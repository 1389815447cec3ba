"""DDIMSampler: the general-kernel DDIM step against closed forms (DPM-Solver-1 for eta = 0,
DDPM's posterior for eta = 1), first-order convergence, sample quality on every SDE."""

from __future__ import annotations

import math

import pytest
import torch
from _fast_samplers import (
    GM,
    SDES,
    SMOOTH,
    assert_mixture,
    draw,
    fitted_order,
    pf_ode_reference,
    rms,
)

from scoresde import VPSDE
from scoresde.samplers import DDIMSampler, DPMSolverSampler
from scoresde.samplers.ddim import ddim_coefficients
from scoresde.samplers.toolkit import Coefficients
from scoresde.toy import random_mixture


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "cosine"])
@pytest.mark.parametrize("grid", ["uniform", "logsnr"])
def test_eta0_is_dpm_solver_1_pathwise(sde_name: str, grid: str) -> None:
    sde = SDES[sde_name]
    x_T = sde.prior_sampling(
        (64, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    score = GM.score_fn(sde)
    ddim = DDIMSampler(sde, num_steps=12, eta=0.0, time_grid=grid).sample(score, (0,), x_init=x_T)
    dpm = DPMSolverSampler(sde, num_steps=12, order=1, corrector=False, time_grid=grid)
    torch.testing.assert_close(ddim, dpm.sample(score, (0,), x_init=x_T), rtol=1e-12, atol=1e-12)


def test_eta1_is_ddpm_posterior_on_the_discrete_chain() -> None:
    """On VP with t_k such that alpha(t_k)^2 = abar_k, eta = 1 gives DDPM's posterior
    q(x_{k-1} | x_k, x0): mean coefficients sqrt(abar_{k-1}) beta_k / (1 - abar_k) on x0 and
    sqrt(1 - beta_k) (1 - abar_{k-1}) / (1 - abar_k) on x_k, variance beta_tilde_k."""
    sde = VPSDE()
    abar = sde.alphas_cumprod.double()
    ks = torch.tensor([999, 800, 500, 200, 50, 10, 1])
    grid = sde.t_from_log_snr(torch.log(abar[ks] / (1 - abar[ks])))
    steps = ddim_coefficients(Coefficients(sde, grid), eta=1.0)
    for (a, b, c), k, k_prev in zip(steps, ks[:-1].tolist(), ks[1:].tolist(), strict=True):
        # a DDIM step between non-adjacent steps is the posterior of the skipping chain
        beta = 1 - float(abar[k] / abar[k_prev])
        ab, ab_prev = float(abar[k]), float(abar[k_prev])
        assert c**2 == pytest.approx((1 - ab_prev) / (1 - ab) * beta, rel=1e-9)
        assert b == pytest.approx(math.sqrt(ab_prev) * beta / (1 - ab), rel=1e-9)
        assert a == pytest.approx(math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab), rel=1e-9)


def test_stochastic_step_mean_and_variance_from_samples() -> None:
    """One eta = 0.5 step from a fixed x: the output's mean and variance are a x + b x0_hat
    and c^2 (the noise enters once, with std c)."""
    sde = VPSDE()
    grid = torch.tensor([0.6, 0.4], dtype=torch.float64)
    ((a, b, c),) = ddim_coefficients(Coefficients(sde, grid), eta=0.5)
    x = torch.full((20000, 2), 0.3, dtype=torch.float64)
    out = DDIMSampler(sde, eta=0.5, time_grid=grid).sample(
        GM.score_fn(sde), (0,), x_init=x, generator=torch.Generator().manual_seed(0)
    )
    alpha, sigma = float(sde.alpha(0.6)), float(sde.sigma(0.6))
    x0 = (x + sigma**2 * GM.score_fn(sde)(x, 0.6)) / alpha
    mean = a * x[0] + b * x0[0]
    assert torch.allclose(out.mean(0), mean, atol=4 * c / math.sqrt(20000))
    assert torch.allclose(out.var(0), torch.full((2,), c * c, dtype=torch.float64), rtol=0.05)


def test_first_order_convergence() -> None:
    sde = VPSDE()
    x_T = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = pf_ode_reference(sde, SMOOTH, x_T, 1e-3)
    steps = [16, 32, 64]
    errors = [
        rms(
            DDIMSampler(sde, n, time_grid="logsnr").sample(SMOOTH.score_fn(sde), (0,), x_init=x_T),
            ref,
        )
        for n in steps
    ]
    assert 0.85 < fitted_order(steps, errors) < 1.15, errors


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_distribution(sde_name: str, eta: float) -> None:
    sde = SDES[sde_name]
    n = 100 if eta == 0.0 else 200  # ancestral steps converge more slowly (NLL bias 0.08 at 100)
    sampler = DDIMSampler(sde, num_steps=n, eta=eta)
    x = draw(sampler, sde)
    assert sampler.nfe == n
    assert_mixture(x)


def test_nfe_denoise_shapes_dtype_determinism() -> None:
    sde = VPSDE()
    gm = random_mixture(16, 3, seed=2)
    sampler = DDIMSampler(sde, num_steps=7, eta=0.3, denoise=True)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    x = sampler.sample(gm.score_fn(sde), (6, 1, 4, 4), generator=gen())
    assert x.shape == (6, 1, 4, 4) and x.dtype == torch.float32 and sampler.nfe == 8
    assert torch.equal(x, sampler.sample(gm.score_fn(sde), (6, 1, 4, 4), generator=gen()))
    x64 = sampler.sample(gm.score_fn(sde), (6, 1, 4, 4), generator=gen(), dtype=torch.float64)
    assert x64.dtype == torch.float64 and torch.isfinite(x64).all()
    # deterministic DDIM: float32 and float64 from the same x_T agree to float32 accuracy
    x_T = torch.randn(6, 1, 4, 4, generator=gen(), dtype=torch.float64)
    ode = DDIMSampler(sde, num_steps=7)
    x32 = ode.sample(gm.score_fn(sde), (0,), x_init=x_T.float())
    torch.testing.assert_close(
        x32, ode.sample(gm.score_fn(sde), (0,), x_init=x_T).float(), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eta": -0.1}, ValueError, "eta"),
        ({"eta": 1.5}, ValueError, "eta"),
        ({"eta": "1"}, TypeError, "eta"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
        ({"time_grid": "cosine"}, ValueError, "time_grid"),
        ({"time_grid": torch.tensor([0.5, 0.7])}, ValueError, "time_grid"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": 1.5}, ValueError, "eps"),
        ({"denoise": 1}, TypeError, "denoise"),
    ],
)
def test_validation(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DDIMSampler(VPSDE(), **kwargs)
