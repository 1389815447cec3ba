"""ODESampler on exact Gaussian-mixture scores: distributions, convergence orders of the
fixed-step solvers against a tight dopri5 solve, encode/decode round trips, denoising,
NFE accounting and validation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GM, TRUE_NLL, assert_mixture, mixture_errors  # noqa: F401

from scoresde import VESDE, VPSDE, CosineVPSDE, SubVPSDE
from scoresde.samplers.grids import time_grid
from scoresde.samplers.ode import ODESampler, per_sample_max_rms
from scoresde.toy import GaussianMixture, random_mixture

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(), "cosine": CosineVPSDE()}


def prior(sde, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square over samples of the per-sample Euclidean distance."""
    return float((a - b).reshape(a.shape[0], -1).pow(2).sum(1).mean().sqrt())


# --- distributions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sde_name", "method", "num_steps"),
    [
        ("vp", "heun", 50),
        ("vp", "rk4", 25),
        ("vp", "euler", 100),
        ("vp", "dopri5", 1),
        ("subvp", "heun", 50),
        ("ve", "heun", 50),
        ("ve", "rk4", 25),
        ("cosine", "midpoint", 50),
        ("cosine", "bosh3", 1),
    ],
)
def test_ode_distribution(sde_name: str, method: str, num_steps: int) -> None:
    sde = SDES[sde_name]
    sampler = ODESampler(sde, method, num_steps=num_steps, rtol=1e-4, atol=1e-4)
    x = sampler.sample(
        GM.score_fn(sde), (3000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    # Euler at 100 steps under-disperses the narrow modes (NLL ~1.23): a looser bound.
    assert_mixture(x, nll_tol=0.09 if method == "euler" else 0.07)


def test_ode_images_shape_and_float32() -> None:
    """[B, 1, 4, 4] data and float32: the run equals the flat float64 run up to float32
    round-off, and the samples' NLL matches fresh data's."""
    gm = random_mixture(16, 3, scale=1.5, seed=3)
    sde = VPSDE()
    score = gm.score_fn(sde)
    x_T = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = ODESampler(sde, "heun", num_steps=40)
    flat = sampler.sample(score, x_T.shape, x_init=x_T)
    img = sampler.sample(score, None, x_init=x_T.float().reshape(1000, 1, 4, 4))
    assert img.shape == (1000, 1, 4, 4) and img.dtype == torch.float32
    torch.testing.assert_close(img.reshape(1000, 16).double(), flat, rtol=1e-3, atol=1e-3)
    data = gm.sample(20000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    nll, ref = float(-gm.log_prob(flat).mean()), float(-gm.log_prob(data).mean())
    assert abs(nll - ref) < 0.35, (nll, ref)  # per-sample sd ~3.0 -> sd 0.1 at n = 1000


# --- convergence orders ----------------------------------------------------------------------

# A smooth mixture (no narrow modes), so that the errors are in the asymptotic regime from
# a few steps on even with eps = 1e-3 (the benchmark mixture's variance-0.02 mode makes the
# VP ODE stiff near eps and Euler's error falls like h^0.2 up to 160 steps).
SMOOTH = GaussianMixture([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5])
ORDERS = {  # method: (step counts, expected order, band)
    "euler": ([40, 80, 160], 1.0, 0.15),
    "heun": ([20, 40, 80], 2.0, 0.25),
    "rk4": ([10, 20, 40], 4.0, 0.45),
}


def _slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    lx = torch.tensor(steps, dtype=torch.float64).log()
    ly = -torch.tensor(errors, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


@pytest.mark.parametrize("sde_name", list(SDES))
def test_fixed_step_convergence_orders(sde_name: str) -> None:
    sde = SDES[sde_name]
    score = SMOOTH.score_fn(sde)
    x_T = prior(sde, 200)
    ref = ODESampler(sde, "dopri5", rtol=1e-10, atol=1e-10).sample(score, x_T.shape, x_init=x_T)
    for method, (steps, order, band) in ORDERS.items():
        errors = []
        for n in steps:
            x = ODESampler(sde, method, num_steps=n).sample(score, x_T.shape, x_init=x_T)
            errors.append(rms(x, ref))
        slope = _slope(steps, errors)
        assert abs(slope - order) < band, (method, errors, slope)


def test_pathwise_error_on_benchmark_mixture() -> None:
    """At 50 steps Heun is far closer to the exact flow than Euler, RK4 closer still; dopri5
    at rtol 1e-5 is within 1e-3 of the rtol-1e-10 solve."""
    sde = VPSDE()
    score = GM.score_fn(sde)
    x_T = prior(sde, 500)
    ref = ODESampler(sde, "dopri5", rtol=1e-10, atol=1e-10).sample(score, x_T.shape, x_init=x_T)
    err = {
        m: rms(ODESampler(sde, m, num_steps=50).sample(score, x_T.shape, x_init=x_T), ref)
        for m in ("euler", "heun", "rk4")
    }
    assert err["rk4"] < err["heun"] < 0.2 * err["euler"], err
    adaptive = ODESampler(sde, "dopri5")
    assert rms(adaptive.sample(score, x_T.shape, x_init=x_T), ref) < 1e-3
    assert 50 < adaptive.nfe < 1000


def test_adaptive_tolerance_holds_per_sample() -> None:
    """The error norm is the worst sample's: every sample meets the tolerance, not only the
    batch on average."""
    sde = VESDE()
    score = GM.score_fn(sde)
    x_T = prior(sde, 300)
    ref = ODESampler(sde, "dopri5", rtol=1e-10, atol=1e-10).sample(score, x_T.shape, x_init=x_T)
    x = ODESampler(sde, "dopri5", rtol=1e-6, atol=1e-6).sample(score, x_T.shape, x_init=x_T)
    assert (x - ref).abs().max() < 1e-3
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert float(per_sample_max_rms(v)) == pytest.approx(math.sqrt(12.5))


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_per_sample_adaptive_is_accurate_and_batch_independent(sde_name: str) -> None:
    """dopri5_per_sample: every sample within the tolerance of the tight solve, the same
    result for a sample alone as inside its batch, and honest NFE (one call on the active
    samples = one NFE, so at most the evaluations of the slowest sample)."""
    sde = SDES[sde_name]
    score = GM.score_fn(sde)
    x_T = prior(sde, 200)
    ref = ODESampler(sde, "dopri5", rtol=1e-10, atol=1e-10).sample(score, x_T.shape, x_init=x_T)
    sampler = ODESampler(sde, "dopri5_per_sample", rtol=1e-6, atol=1e-6)
    x = sampler.sample(score, x_T.shape, x_init=x_T)
    assert (x - ref).abs().max() < 1e-3
    batch_nfe = sampler.nfe
    alone, alone_nfe = [], []
    for i in (0, 7, 199):
        alone.append(sampler.sample(score, (1, 2), x_init=x_T[i : i + 1]))
        alone_nfe.append(sampler.nfe)
    torch.testing.assert_close(torch.cat(alone), x[[0, 7, 199]], rtol=0, atol=1e-12)
    # The batch makes one call per step of its slowest sample: never fewer than any sample.
    assert 20 < max(alone_nfe) <= batch_nfe < 2000
    # Decoding an encoded batch returns it.
    data = GM.marginal(sde, 1e-3).sample(
        100, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    tight = ODESampler(sde, "dopri5_per_sample", rtol=1e-8, atol=1e-8)
    back = tight.sample(score, data.shape, x_init=tight.encode(score, data))
    assert (back - data).abs().max() < 1e-4


# --- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_encode_decode_round_trip(sde_name: str) -> None:
    sde = SDES[sde_name]
    score = GM.score_fn(sde)
    x = GM.marginal(sde, 1e-3).sample(
        300, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    sampler = ODESampler(sde, "dopri5", rtol=1e-8, atol=1e-8)
    z = sampler.encode(score, x)
    assert sampler.nfe > 0 and z.shape == x.shape
    # The latents look like prior draws: mean 0, std prior_std.
    assert abs(float(z.std()) / sde.prior_std - 1) < 0.1
    back = sampler.sample(score, x.shape, x_init=z)
    assert (back - x).abs().max() < 1e-4
    # A fixed-step encoder runs the reversed grid (rk4: close, not exact).
    fixed = ODESampler(sde, "rk4", num_steps=100)
    back = fixed.sample(score, x.shape, x_init=fixed.encode(score, x))
    assert rms(back, x) < 0.02
    assert fixed.nfe == 400


# --- denoising, NFE, hand-checked step -------------------------------------------------------


def test_denoise_is_one_tweedie_step() -> None:
    sde = SubVPSDE()
    score = GM.score_fn(sde)
    x_T = prior(sde, 64)
    plain = ODESampler(sde, "heun", num_steps=20, eps=0.01)
    denoised = ODESampler(sde, "heun", num_steps=20, eps=0.01, denoise=True)
    x = plain.sample(score, x_T.shape, x_init=x_T)
    x0 = denoised.sample(score, x_T.shape, x_init=x_T)
    t = torch.tensor(0.01, dtype=torch.float64)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    torch.testing.assert_close(x0, (x + sigma**2 * score(x, t.expand(64))) / alpha)
    assert (plain.nfe, denoised.nfe) == (40, 41)


@pytest.mark.parametrize(
    ("method", "per_step"), [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)]
)
def test_fixed_step_nfe(method: str, per_step: int) -> None:
    sde = VPSDE()
    sampler = ODESampler(sde, method, num_steps=7)
    sampler.sample(GM.score_fn(sde), (4, 2), generator=torch.Generator().manual_seed(0))
    assert sampler.nfe == 7 * per_step


def test_adaptive_nfe_is_counted() -> None:
    sde = VPSDE()
    calls = []

    def score(x, t):
        calls.append(1)
        return GM.score_fn(sde)(x, t)

    sampler = ODESampler(sde, "dopri5", rtol=1e-3, atol=1e-3)
    sampler.sample(score, (16, 2), generator=torch.Generator().manual_seed(0))
    assert sampler.nfe == len(calls) > 10


def test_heun_step_by_hand() -> None:
    """Two Heun steps on a 'karras' grid written out: d = f x - g^2 s / 2."""
    sde = VPSDE()
    score = GM.score_fn(sde)
    x = prior(sde, 8)
    sampler = ODESampler(sde, "heun", num_steps=2, time_grid="karras", eps=0.02)
    out = sampler.sample(score, x.shape, x_init=x)
    grid = time_grid(sde, 2, "karras", eps=0.02)
    assert grid[0] == 1.0 and abs(float(grid[-1]) - 0.02) < 1e-12

    def d(y, t):
        t = t.expand(8)
        f, g = sde.drift_coef(t)[:, None], sde.diffusion_coef(t)[:, None]
        return f * y - 0.5 * g**2 * score(y, t)

    for k in range(2):
        h = grid[k + 1] - grid[k]
        d0 = d(x, grid[k])
        d1 = d(x + h * d0, grid[k + 1])
        x = x + 0.5 * h * (d0 + d1)
    torch.testing.assert_close(out, x)


def _hand_fixed_steps(method: str, sde, score, x, grid):
    """Midpoint / classical RK4 written out as in a textbook, d = f x - g^2 s / 2."""

    def d(y, t):
        t = t.expand(y.shape[0])
        f, g = sde.drift_coef(t)[:, None], sde.diffusion_coef(t)[:, None]
        return f * y - 0.5 * g**2 * score(y, t)

    for k in range(grid.numel() - 1):
        t0, t1 = grid[k], grid[k + 1]
        h, tm = t1 - t0, 0.5 * (grid[k] + grid[k + 1])
        if method == "midpoint":
            x = x + h * d(x + 0.5 * h * d(x, t0), tm)
            continue
        k1 = d(x, t0)
        k2 = d(x + 0.5 * h * k1, tm)
        k3 = d(x + 0.5 * h * k2, tm)
        k4 = d(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("method", ["rk4", "midpoint"])
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_rk4_and_midpoint_steps_by_hand(method: str, sde_name: str) -> None:
    """The in-place stage arithmetic is the textbook method, to round-off (float64), on a
    quadratic grid (and encoding runs the same steps forwards)."""
    sde = SDES[sde_name]
    score = GM.score_fn(sde)
    x = prior(sde, 16, seed=3)
    sampler = ODESampler(sde, method, num_steps=3, time_grid="quadratic", eps=0.05)
    out = sampler.sample(score, x.shape, x_init=x)
    grid = time_grid(sde, 3, "quadratic", eps=0.05)
    torch.testing.assert_close(out, _hand_fixed_steps(method, sde, score, x, grid))
    z = sampler.encode(score, out)
    torch.testing.assert_close(z, _hand_fixed_steps(method, sde, score, out, grid.flip(0)))
    assert sampler.nfe == 3 * {"rk4": 4, "midpoint": 2}[method]


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
def test_score_returning_its_input_is_not_overwritten(method: str) -> None:
    """The stages are updated in place: a score_fn that returns its argument itself
    (s(x) = x) or a view of it gives the same result as one that returns a copy."""
    sde = VPSDE()
    x = prior(sde, 8, seed=1)
    sampler = ODESampler(sde, method, num_steps=4)
    ref = sampler.sample(lambda y, t: y.clone(), x.shape, x_init=x)
    same = sampler.sample(lambda y, t: y, x.shape, x_init=x)
    view = sampler.sample(lambda y, t: y.view(y.shape), x.shape, x_init=x)
    torch.testing.assert_close(same, ref, rtol=0, atol=0)
    torch.testing.assert_close(view, ref, rtol=0, atol=0)


def test_time_grids_all_converge() -> None:
    sde = CosineVPSDE()
    score = SMOOTH.score_fn(sde)
    x_T = prior(sde, 100)
    ref = ODESampler(sde, "dopri5", rtol=1e-9, atol=1e-9).sample(score, x_T.shape, x_init=x_T)
    for grid in ("uniform", "quadratic", "karras", "logsnr"):
        x = ODESampler(sde, "rk4", num_steps=30, time_grid=grid).sample(
            score, x_T.shape, x_init=x_T
        )
        assert rms(x, ref) < 1e-3, grid


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "leapfrog"}, ValueError, "method"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 1.5}, TypeError, "num_steps"),
        ({"rtol": 0.0}, ValueError, "rtol"),
        ({"atol": -1e-5}, ValueError, "atol"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": 2.0}, ValueError, "eps"),
        ({"denoise": "no"}, TypeError, "denoise"),
        ({"time_grid": "cosine"}, ValueError, "time_grid"),
    ],
)
def test_ode_validation(kwargs: dict, error, match) -> None:
    with pytest.raises(error, match=match):
        ODESampler(VPSDE(), **kwargs)


def test_encode_validation() -> None:
    sampler = ODESampler(VPSDE(), "euler", num_steps=2)
    with pytest.raises(ValueError, match="x"):
        sampler.encode(GM.score_fn(VPSDE()), torch.zeros(3))
    with pytest.raises(TypeError, match="score_fn"):
        sampler.encode("score", torch.zeros(3, 2))
    with pytest.raises(TypeError, match="sde"):
        ODESampler("vp")


def test_plans_of_user_sdes_with_other_state_are_not_shared() -> None:
    """Per-grid coefficients are cached by the SDE's scalar settings; a user SDE may hold a
    tensor (here a scaled VP schedule) that the scalars do not show, so two such SDEs must
    not share a plan."""

    class ScaledVP(VPSDE):
        name = None  # a user SDE

        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = torch.tensor(scale, dtype=torch.float64)  # not a scalar setting

        def drift_coef(self, t):
            return super().drift_coef(t) * self.scale

        def diffusion_coef(self, t):
            return super().diffusion_coef(t) * self.scale.sqrt()

    x = prior(VPSDE(), 8, seed=2)
    outs = []
    for scale in (1.0, 0.5):
        sde = ScaledVP(scale)
        sampler = ODESampler(sde, "euler", num_steps=3)
        outs.append(sampler.sample(lambda y, t: -2.0 * y, x.shape, x_init=x))
    # the drift f x - g^2 s / 2 = beta x / 2 (with s = -2x) scales with the schedule
    assert not torch.allclose(outs[0], outs[1], rtol=1e-3, atol=0)
