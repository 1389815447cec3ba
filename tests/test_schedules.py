"""optimize_time_grid: monotone grids with fixed ends, a held-out improvement over the initial
grid, the PF-ODE reference against a closed form, private pilots and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import VESDE, VPSDE, CosineVPSDE, DDIMSampler, DPMSolverSampler, SubVPSDE
from scoresde.samplers import optimize_time_grid
from scoresde.samplers.grids import time_grid
from scoresde.samplers.schedules import (
    _GridMap,
    load_grids,
    pathwise_error,
    pf_ode_reference,
    save_grids,
)
from scoresde.toy import GaussianMixture, benchmark_mixture_2d

F64 = torch.float64


@pytest.fixture(scope="module")
def setup():
    sde = VPSDE()
    score = benchmark_mixture_2d().score_fn(sde)

    def factory(g):
        return DPMSolverSampler(sde, len(g) - 1, order=2, time_grid=g)

    return sde, score, factory


@pytest.fixture(scope="module")
def tuned(setup):
    sde, score, factory = setup
    grid = optimize_time_grid(factory, score, sde, 6, data_shape=(2,), num_pilot=128, max_evals=150)
    return grid


def test_grid_is_strictly_decreasing_with_fixed_ends(setup, tuned):
    sde, _, _ = setup
    assert tuned.dtype == F64 and tuned.shape == (7,)
    assert bool((tuned[1:] < tuned[:-1]).all())
    assert tuned[0].item() == sde.T and tuned[-1].item() == 1e-3
    assert not torch.allclose(tuned, time_grid(sde, 6, "quadratic"))  # it moved


def test_tuned_grid_beats_initial_grid_on_fresh_draws(setup, tuned):
    sde, score, factory = setup
    # Held-out draws (seed 99, never seen in tuning: the pilots use seed 1234).
    x_T = sde.prior_sampling((1000, 2), generator=torch.Generator().manual_seed(99), dtype=F64)
    x_ref = pf_ode_reference(sde, score, x_T, 1e-3, rtol=1e-8)
    before = pathwise_error(factory(time_grid(sde, 6, "quadratic")), score, x_T, x_ref)
    after = pathwise_error(factory(tuned), score, x_T, x_ref)
    assert after < 0.8 * before, (before, after)


def test_tuning_does_not_touch_the_global_rng(setup):
    sde, score, factory = setup
    state = torch.get_rng_state()
    a = optimize_time_grid(factory, score, sde, 3, data_shape=(2,), num_pilot=16, max_evals=10)
    assert torch.equal(torch.get_rng_state(), state)
    b = optimize_time_grid(factory, score, sde, 3, data_shape=(2,), num_pilot=16, max_evals=10)
    assert torch.equal(a, b)  # deterministic: private pilots seeded with 1234


def test_zero_parameters_reproduce_the_initial_grid():
    for sde in (VPSDE(), SubVPSDE(), VESDE(), CosineVPSDE()):
        for n in (4, 30):  # full parameterisation and the knot basis
            init = time_grid(sde, n, "quadratic")
            grid_map = _GridMap(sde, init, max_params=16)
            assert grid_map.num_params == min(n, 16) - 1
            assert torch.allclose(grid_map(torch.zeros(grid_map.num_params)), init, rtol=1e-9)
            # Any parameters give a strictly decreasing grid with the same ends.
            g = grid_map(torch.linspace(-2.0, 2.0, grid_map.num_params, dtype=F64))
            assert bool((g[1:] < g[:-1]).all()) and g[0] == init[0] and g[-1] == init[-1]


def test_reference_matches_the_gaussian_closed_form():
    # For data N(m, s^2 I) the PF ODE keeps z = (x - alpha m) / sqrt(alpha^2 s^2 + sigma^2)
    # constant, so x(eps) = alpha_eps m + r_eps / r_T (x_T - alpha_T m).
    sde, m, s2 = VPSDE(), torch.tensor([0.7, -1.2], dtype=F64), 0.3
    gauss = GaussianMixture([1.0], m[None], torch.tensor([s2]))
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    got = pf_ode_reference(sde, gauss.score_fn(sde), x_T, 1e-3, rtol=1e-9)
    t = torch.tensor([sde.T, 1e-3], dtype=F64)
    a, sig = sde.alpha(t), sde.sigma(t)
    r = torch.sqrt(a**2 * s2 + sig**2)
    want = a[1] * m + r[1] / r[0] * (x_T - a[0] * m)
    torch.testing.assert_close(got, want, rtol=0.0, atol=3e-7)


def test_works_on_any_data_rank(setup):
    sde, score, factory = setup
    x_T = sde.prior_sampling((8, 1, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = optimize_time_grid(factory, score, sde, 4, x_T=x_T, max_evals=8)
    assert grid.shape == (5,) and bool((grid[1:] < grid[:-1]).all())


def test_save_and_load_round_trip(tmp_path, tuned):
    path = tmp_path / "grids.json"
    save_grids(path, {6: tuned})
    back = load_grids(path)
    assert list(back) == [6] and torch.equal(back[6], tuned)


def test_argument_validation(setup):
    sde, score, factory = setup
    kw = {"data_shape": (2,), "num_pilot": 4, "max_evals": 2}
    with pytest.raises(ValueError, match="num_steps"):
        optimize_time_grid(factory, score, sde, 1, **kw)
    with pytest.raises(TypeError, match="num_steps"):
        optimize_time_grid(factory, score, sde, 4.0, **kw)
    with pytest.raises(ValueError, match="init"):
        optimize_time_grid(factory, score, sde, 4, init="cubic", **kw)
    with pytest.raises(ValueError, match="num_steps \\+ 1"):
        optimize_time_grid(factory, score, sde, 4, init=time_grid(sde, 5, "uniform"), **kw)
    with pytest.raises(ValueError, match="eps"):
        optimize_time_grid(factory, score, sde, 4, init=time_grid(sde, 4, "uniform"), eps=0.01)
    with pytest.raises(ValueError, match="eps"):
        optimize_time_grid(factory, score, sde, 4, eps=1.5, **kw)
    with pytest.raises(ValueError, match="data_shape"):
        optimize_time_grid(factory, score, sde, 4, max_evals=2)
    with pytest.raises(TypeError, match="generator"):
        optimize_time_grid(factory, score, sde, 4, generator=0, **kw)
    with pytest.raises(TypeError, match="sampler_factory"):
        optimize_time_grid(lambda g: None, score, sde, 4, **kw)
    with pytest.raises(TypeError, match="sampler_factory"):
        optimize_time_grid("dpm", score, sde, 4, **kw)
    with pytest.raises(TypeError, match="sde"):
        optimize_time_grid(factory, score, "vp", 4, **kw)
    with pytest.raises(ValueError, match="max_params"):
        optimize_time_grid(factory, score, sde, 4, max_params=1, **kw)
    with pytest.raises(ValueError, match="num_pilot"):
        optimize_time_grid(factory, score, sde, 4, data_shape=(2,), num_pilot=0)
    with pytest.raises(TypeError, match="x_T"):
        optimize_time_grid(factory, score, sde, 4, x_T=[[0.0, 1.0]])
    assert math.isfinite(pf_ode_reference(sde, score, torch.zeros(2, 2, dtype=F64)).sum().item())


def test_other_samplers_and_never_worse_on_the_pilots(setup):
    sde, score, _ = setup
    x_T = sde.prior_sampling((64, 2), generator=torch.Generator().manual_seed(2), dtype=F64)
    x_ref = pf_ode_reference(sde, score, x_T, 1e-3)

    def ddim(g):
        return DDIMSampler(sde, len(g) - 1, time_grid=g)

    grid = optimize_time_grid(ddim, score, sde, 4, x_T=x_T, init="uniform", max_evals=40)
    before = pathwise_error(ddim(time_grid(sde, 4, "uniform")), score, x_T, x_ref)
    after = pathwise_error(ddim(grid), score, x_T, x_ref)
    assert after < before  # DDIM on a uniform grid is far from optimal


def test_given_reference_is_used_and_not_solved_again(setup):
    sde, score, factory = setup
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    x_ref = pf_ode_reference(sde, score, x_T, 1e-3)
    calls = {"n": 0}

    def counted(x, t):
        calls["n"] += 1
        return score(x, t)

    kw = dict(x_T=x_T, max_evals=20)
    own = optimize_time_grid(factory, counted, sde, 4, **kw)
    solved = calls["n"]
    calls["n"] = 0
    given = optimize_time_grid(factory, counted, sde, 4, x_ref=x_ref, **kw)
    torch.testing.assert_close(given, own, rtol=0, atol=1e-12)
    # Only the sampler runs remain (4 NFE each); the reference solve took the difference.
    assert calls["n"] % 4 == 0 and solved - calls["n"] > 20
    with pytest.raises(ValueError, match="x_ref"):
        optimize_time_grid(factory, score, sde, 4, x_T=x_T, x_ref=x_ref[:5], max_evals=2)
    with pytest.raises(ValueError, match="x_ref"):
        optimize_time_grid(factory, score, sde, 4, data_shape=(2,), num_pilot=32, x_ref=x_ref)
    with pytest.raises(TypeError, match="x_ref"):
        optimize_time_grid(factory, score, sde, 4, x_T=x_T, x_ref=x_ref.tolist(), max_evals=2)
