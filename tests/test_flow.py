"""scoresde.flow: the probability-flow field, and every adaptive path kept inside [t_end, T].

A score that raises outside the interval of the solve (as an exact kernel, a VE network with
a log-sigma embedding or the cosine VP near T would fail there) is run through every
adaptive method: ODESampler's torchdiffeq methods and dopri5_per_sample (sample and encode),
log_likelihood's methods, AdaptiveSDESampler and the torchdiffeq/torchsde adapters; on VP,
sub-VP and VE, float32 and float64. NaN from the score is reported as NonFiniteError with
the time, and every adaptive loop has a step limit.
"""

from __future__ import annotations

import re

import pytest
import torch

from scoresde import ODESampler, log_likelihood
from scoresde.flow import (
    ADAPTIVE_METHODS,
    METHODS,
    TORCHDIFFEQ_METHODS,
    ProbabilityFlow,
    pf_coefficients,
    solve,
)
from scoresde.interop.torch_solvers import to_torchdiffeq, to_torchsde
from scoresde.likelihood import _flow_map
from scoresde.samplers import AdaptiveSDESampler, NonFiniteError
from scoresde.sdes import VESDE, VPSDE, SubVPSDE
from scoresde.toy import benchmark_mixture_2d, eight_gaussians

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
DTYPES = (torch.float32, torch.float64)


class StrictScore:
    """The exact mixture score, raising when called at a time outside [lo, hi]."""

    def __init__(self, sde, lo: float, hi: float = 1.0, mixture=None) -> None:
        self.score = (mixture or benchmark_mixture_2d()).score_fn(sde)
        self.lo, self.hi = lo, hi
        self.times: list[float] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_min, t_max = float(t.min()), float(t.max())
        self.times += [t_min, t_max]
        # Rounding of t to float32 may put an end point one ulp outside: allow that.
        slack = 4 * torch.finfo(t.dtype).eps
        if t_min < self.lo - slack or t_max > self.hi + slack:
            raise AssertionError(
                f"score called at t in [{t_min}, {t_max}] outside [{self.lo}, {self.hi}]"
            )
        return self.score(x, t)


def _prior(sde, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _data(n: int, dtype: torch.dtype) -> torch.Tensor:
    return benchmark_mixture_2d().sample(n, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("kind", SDES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_ode_sampler_adaptive_stays_in_interval(kind: str, dtype: torch.dtype, method: str) -> None:
    sde = SDES[kind]()
    eps = 1e-3
    score = StrictScore(sde, eps)
    sampler = ODESampler(sde, method, rtol=1e-3, atol=1e-3, eps=eps)
    x = sampler.sample(score, (16, 2), x_init=_prior(sde, 16, dtype))
    assert x.dtype == dtype and torch.isfinite(x).all()
    z = sampler.encode(score, _data(16, dtype))
    assert z.dtype == dtype and torch.isfinite(z).all()
    assert min(score.times) >= eps - 1e-6 and max(score.times) <= sde.T + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue_reproduction_ring_vp_dopri5(dtype: torch.dtype) -> None:
    """The reported case: the 8-Gaussian ring, VP, dopri5 at 1e-5 (second call was at
    t = -21.6). Now the probe stays in [eps, T] and the NFE is not higher than before."""
    sde = VPSDE()
    score = StrictScore(sde, 1e-3, mixture=eight_gaussians(std=0.15))
    sampler = ODESampler(sde, method="dopri5", rtol=1e-5, atol=1e-5)
    x = sampler.sample(score, (500, 2), generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert torch.isfinite(x).all()
    assert 1e-3 - 1e-6 <= score.times[2] <= 1.0  # the probe (second call)
    radius = x.norm(dim=1)
    assert abs(float(radius.median()) - 2.0) < 0.1


@pytest.mark.parametrize("kind", SDES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_log_likelihood_adaptive_stays_in_interval(
    kind: str, dtype: torch.dtype, method: str
) -> None:
    sde = SDES[kind]()
    eps = 1e-5
    score = StrictScore(sde, eps)
    x = _data(8, dtype)
    res = log_likelihood(score, sde, x, trace="exact", method=method, rtol=1e-3, atol=1e-3, eps=eps)
    assert res.logp.dtype == dtype and torch.isfinite(res.logp).all()
    # And decoding the latent back, the other direction.
    back, _ = _flow_map(score, sde, res.z, sde.T, eps, method=method, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(back).all()


@pytest.mark.parametrize("kind", SDES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_sde_sampler_stays_in_interval(kind: str, dtype: torch.dtype) -> None:
    sde = SDES[kind]()
    eps = 1e-3
    score = StrictScore(sde, eps)
    sampler = AdaptiveSDESampler(sde, rtol=5e-2, eps=eps)
    x = sampler.sample(score, (16, 2), generator=torch.Generator().manual_seed(2), dtype=dtype)
    assert x.dtype == dtype and torch.isfinite(x).all()


@pytest.mark.parametrize("kind", SDES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interop_adapters_stay_in_interval(kind: str, dtype: torch.dtype) -> None:
    """torchdiffeq's own dopri5 (whose probe leaves the interval) through to_torchdiffeq
    with t_min = the solve's end, and torchsde's Euler through to_torchsde."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    sde = SDES[kind]()
    eps = 1e-3
    score = StrictScore(sde, eps)
    func = to_torchdiffeq(sde, score, t_min=eps)
    ts = torch.tensor([sde.T, eps], dtype=dtype)
    x = torchdiffeq.odeint(func, _prior(sde, 16, dtype), ts, method="dopri5", rtol=1e-3, atol=1e-3)
    assert torch.isfinite(x[-1]).all()
    torchsde = pytest.importorskip("torchsde")
    score = StrictScore(sde, 0.0)
    rsde = to_torchsde(sde, score)
    ys = torchsde.sdeint(rsde, _prior(sde, 8, dtype), rsde.times(eps=eps, dtype=dtype), dt=0.05)
    assert torch.isfinite(ys[-1]).all()


# --- NaN from the score, step limits, bad input -------------------------------------------------


def _nan_below_half(sde):
    score = benchmark_mixture_2d().score_fn(sde)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where((t < 0.5)[:, None], torch.full_like(x, float("nan")), score(x, t))

    return fn


@pytest.mark.parametrize("seed", [208, 225, 285])
def test_a_nan_at_the_first_step_probe_is_reported_with_a_finite_time(seed: int) -> None:
    """The first-step probe of these draws lands below t = 0.5, where the score is NaN: the
    step size used to become NaN and the error read "t = 1 .. nan"."""
    torch.manual_seed(seed)
    with pytest.raises(NonFiniteError, match=r"t = 0\.\d+ \.\. 0\.\d+"):
        ODESampler(VPSDE(), "dopri5").sample(_nan_below_half(VPSDE()), (4, 2))


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri5_per_sample"])
def test_nan_score_is_reported_with_the_time(method: str) -> None:
    sde = VPSDE()
    score = _nan_below_half(sde)
    with pytest.raises(NonFiniteError, match=r"t = 0\.\d+"):
        ODESampler(sde, method).sample(score, (4, 2))
    with pytest.raises(NonFiniteError, match=r"t = "):
        log_likelihood(score, sde, _data(4, torch.float32), method=method)
    with pytest.raises(NonFiniteError, match=r"t = 0\.\d+"):
        AdaptiveSDESampler(sde).sample(score, (4, 2), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri5_per_sample"])
def test_a_score_nan_from_the_first_time_is_reported_at_that_time(method: str) -> None:
    """A field NaN already at t0 made the first-step size NaN, so the probe asked for a NaN
    time and the error read "t = 1e-05 .. nan"."""
    sde = VPSDE()

    def nan_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float("nan"))

    with pytest.raises(NonFiniteError) as err:
        log_likelihood(nan_score, sde, _data(4, torch.float64), method=method)
    assert re.search(r"at t = 1e-05( \.\. 1\.0+\d*e-05)?( \(|;)", str(err.value)), str(err.value)
    with pytest.raises(NonFiniteError, match=r"t = 1(\.0+)?[ ;]"):
        ODESampler(sde, method).sample(nan_score, (4, 2))


def test_max_steps_guards() -> None:
    sde = VPSDE()
    score = benchmark_mixture_2d().score_fn(sde)
    for method in ADAPTIVE_METHODS:
        with pytest.raises(RuntimeError, match="max_steps=3"):
            ODESampler(sde, method, max_steps=3).sample(score, (4, 2))
        with pytest.raises(RuntimeError, match="max_steps=3"):
            log_likelihood(score, sde, _data(4, torch.float64), method=method, max_steps=3)
    with pytest.raises(RuntimeError, match="max_iters=3"):
        AdaptiveSDESampler(sde, max_iters=3).sample(score, (4, 2))
    with pytest.raises(ValueError, match="max_steps"):
        ODESampler(sde, "dopri5", max_steps=0)


def test_log_likelihood_refuses_empty_and_half_precision() -> None:
    sde = VPSDE()
    score = benchmark_mixture_2d().score_fn(sde)
    with pytest.raises(ValueError, match="x must hold at least one sample"):
        log_likelihood(score, sde, torch.zeros(0, 2))
    with pytest.raises(TypeError, match="float16"):
        log_likelihood(score, sde, torch.zeros(3, 2, dtype=torch.float16))


# --- the field, the coefficients and the method table ------------------------------------------


@pytest.mark.parametrize("kind", SDES)
def test_field_matches_the_reverse_sde_and_closed_form(kind: str) -> None:
    """v = f x - g^2 s / 2: against sde.reverse(probability_flow=True) and by hand."""
    sde = SDES[kind]()
    score = benchmark_mixture_2d().score_fn(sde)
    x = _data(6, torch.float64)
    t = torch.full((6,), 0.37, dtype=torch.float64)
    v = ProbabilityFlow(sde, score)(t, x)
    by_hand = sde.drift_coef(t)[:, None] * x - 0.5 * sde.diffusion_coef(t)[:, None] ** 2 * score(
        x, t
    )
    rev = sde.reverse(score, probability_flow=True).sde(x, t)[0]
    torch.testing.assert_close(v, by_hand, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(v, rev, rtol=1e-13, atol=1e-13)
    f, c = pf_coefficients(sde, t)
    f2, g2 = sde.reverse_coefficients(t)
    torch.testing.assert_close(f, f2)
    torch.testing.assert_close(2 * c, g2, rtol=1e-15, atol=0)


def test_exact_and_hutchinson_divergence_match_a_linear_score() -> None:
    """s(x) = -A x: div s = -tr(A); Hutchinson with many probes converges to it."""
    from scoresde.flow import divergence, draw_probes, one_hot_chunks

    A = torch.tensor([[2.0, 0.5, 0.0], [0.1, 1.0, 0.3], [0.0, 0.2, 3.0]], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xg = x.requires_grad_(True)
    s = -xg @ A.T
    div, n = divergence(s, xg, "exact", one_hot_chunks(x))
    torch.testing.assert_close(div, torch.full((5,), -6.0, dtype=torch.float64))
    assert n == 3
    probes = draw_probes(x, "rademacher", 4000, torch.Generator().manual_seed(1))
    s = -xg @ A.T
    est, n = divergence(s, xg, "hutchinson", probes)
    assert n == 4000 and torch.allclose(est, torch.full((5,), -6.0, dtype=torch.float64), atol=0.05)


def test_one_method_table() -> None:
    """ODESampler and log_likelihood read their method names from scoresde.flow.METHODS."""
    from scoresde import likelihood as L
    from scoresde.samplers import ode

    assert set(ode.ADAPTIVE_METHODS) <= set(METHODS)
    assert set(ode.FIXED_METHODS) <= set(METHODS)
    assert set(L.FIXED_METHODS) | set(L.ADAPTIVE_METHODS) | set(L.PER_SAMPLE_METHODS) == set(
        METHODS
    )
    assert set(TORCHDIFFEQ_METHODS) == {m for m, s in METHODS.items() if s.kind == "adaptive"}


def test_solve_first_step_never_leaves_a_short_interval() -> None:
    """On a short interval (h0 of the heuristic far longer than it) the probe is clipped."""
    calls: list[float] = []

    def func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(float(t))
        return -y

    y0 = torch.ones(3, 2, dtype=torch.float64)
    y = solve(func, y0, 0.5, 0.5001, "dopri5", rtol=1e-6, atol=1e-6)
    assert min(calls) >= 0.5 and max(calls) <= 0.5001 + 1e-15
    torch.testing.assert_close(y, y0 * torch.exp(torch.tensor(-1e-4, dtype=torch.float64)))
