"""torchsde / torchdiffeq adapters: their solvers, fed our reverse SDE and probability-flow
ODE, sample the right distribution and agree with ODESampler."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
import torchsde
from conftest import GM, TRUE_NLL, assert_mixture, mixture_errors  # noqa: F401

from scoresde import VESDE, VPSDE, SubVPSDE
from scoresde.interop import to_torchdiffeq, to_torchsde
from scoresde.samplers.ode import ODESampler
from scoresde.toy import random_mixture


def _sdeint(sde, method: str, noise_type: str, steps: int, n: int = 3000) -> tuple:
    rsde = to_torchsde(sde, GM.score_fn(sde), noise_type=noise_type)
    x_T = sde.prior_sampling(
        (n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    ts = rsde.times()
    dt = float(ts[-1]) / steps
    bm = torchsde.BrownianInterval(
        t0=0.0,
        t1=float(ts[-1]),
        size=(n, 2),
        dtype=torch.float64,
        dt=dt,
        entropy=0,
        levy_area_approximation="space-time" if method == "srk" else "none",
    )
    ys = torchsde.sdeint(rsde, rsde.flatten(x_T), ts, method=method, dt=dt, bm=bm)
    return ys, rsde


@pytest.mark.parametrize(
    ("sde", "method", "noise_type", "steps"),
    [
        (VPSDE(), "euler", "diagonal", 200),
        (VESDE(), "euler", "diagonal", 200),
        (SubVPSDE(), "srk", "additive", 100),
        (VPSDE(), "srk", "additive", 100),
    ],
)
def test_torchsde_samples_the_mixture(sde, method: str, noise_type: str, steps: int) -> None:
    ys, rsde = _sdeint(sde, method, noise_type, steps)
    assert ys.shape == (2, 3000, 2)
    assert_mixture(ys[-1], check_cov=False)  # this test never checked the covariance
    assert rsde.nfe >= steps


def test_torchsde_srk_diagonal_runs() -> None:
    """srk with diagonal noise (10 drift/diffusion calls per step) at 50 steps on a small
    batch: the NLL is right."""
    ys, rsde = _sdeint(VPSDE(), "srk", "diagonal", 50, n=1000)
    x = ys[-1]
    nll = float(-GM.log_prob(x).mean())
    assert abs(nll - TRUE_NLL) < 0.15, nll  # n = 1000: sd 0.033
    assert rsde.nfe >= 50


def test_torchsde_drift_and_diffusion_formulas() -> None:
    """f(s, y) = -[f(t) y - g(t)^2 s(y, t)], g = g(t) with t = T - s; diagonal and additive
    g agree; images are flattened for torchsde and reshaped for the score."""
    sde = VESDE()
    gm = random_mixture(16, 2, seed=1)
    score = gm.score_fn(sde)
    rsde = to_torchsde(sde, score, data_shape=(1, 4, 4))
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    y = rsde.flatten(x)
    assert y.shape == (5, 16) and torch.equal(rsde.unflatten(y), x)
    s = torch.tensor(0.3, dtype=torch.float64)
    t = torch.full((5,), 0.7, dtype=torch.float64)
    g = sde.diffusion_coef(t)[:, None]
    expected = g**2 * score(x, t).reshape(5, 16)  # VE: f = 0
    torch.testing.assert_close(rsde.f(s, y), expected)
    torch.testing.assert_close(rsde.g(s, y), g.expand(5, 16))
    additive = to_torchsde(sde, score, data_shape=(1, 4, 4), noise_type="additive")
    torch.testing.assert_close(additive.g(s, y), torch.diag_embed(g.expand(5, 16)))
    assert (rsde.noise_type, rsde.sde_type) == ("diagonal", "ito")
    times = rsde.times(5, eps=1e-3)
    assert times[0] == 0 and abs(float(times[-1]) - (1 - 1e-3)) < 1e-12
    assert bool((times[1:] > times[:-1]).all())


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()])
def test_torchdiffeq_matches_ode_sampler(sde) -> None:
    score = GM.score_fn(sde)
    x_T = sde.prior_sampling(
        (300, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    ours = ODESampler(sde, "dopri5", rtol=1e-9, atol=1e-9).sample(score, x_T.shape, x_init=x_T)
    func = to_torchdiffeq(sde, score)
    t = torch.tensor([sde.T, 1e-3], dtype=torch.float64)
    theirs = torchdiffeq.odeint(
        func, x_T, t, method="dopri5", rtol=1e-9, atol=1e-9, options={"step_t": t[1:]}
    )[-1]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert func.nfe > 0
    # torchdiffeq's fixed-step rk4 (the 3/8 rule) on the same 100 uniform steps: close.
    func = to_torchdiffeq(sde, score)
    grid = torch.linspace(sde.T, 1e-3, 101, dtype=torch.float64)
    rk4 = torchdiffeq.odeint(func, x_T, grid, method="rk4")[-1]
    ours_rk4 = ODESampler(sde, "rk4", num_steps=100).sample(score, x_T.shape, x_init=x_T)
    assert (rk4 - ours_rk4).abs().max() < 1e-3
    assert (rk4 - ours).abs().max() < 5e-3


def test_torchdiffeq_ode_on_images() -> None:
    gm = random_mixture(16, 2, seed=1)
    sde = SubVPSDE()
    func = to_torchdiffeq(sde, gm.score_fn(sde))
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    tb = t.expand(4)
    f, g = sde.drift_coef(tb), sde.diffusion_coef(tb)
    expected = f[:, None, None, None] * x - 0.5 * (g**2)[:, None, None, None] * gm.score_fn(sde)(
        x, tb
    )
    torch.testing.assert_close(func(t, x), expected)
    assert func.nfe == 1


def test_adapter_validation() -> None:
    score = GM.score_fn(VPSDE())
    with pytest.raises(TypeError, match="sde"):
        to_torchsde("vp", score)
    with pytest.raises(TypeError, match="score_fn"):
        to_torchdiffeq(VPSDE(), None)
    with pytest.raises(ValueError, match="noise_type"):
        to_torchsde(VPSDE(), score, noise_type="general")
    with pytest.raises(ValueError, match="data_shape"):
        to_torchsde(VPSDE(), score, data_shape=(0, 2))
