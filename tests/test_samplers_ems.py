"""DPM-Solver-v3 (scoresde.samplers.ems) against closed forms: without statistics it is
DPM-Solver++; on a Gaussian with an axis-aligned covariance its statistics are known and its
few-step solve is exact."""

from __future__ import annotations

import pytest
import torch

from scoresde import DPMSolverSampler
from scoresde.bench.targets import make_sde, reference_solve
from scoresde.samplers.ems import EmpiricalModelStatistics, EMSSampler
from scoresde.samplers.grids import time_grid
from scoresde.toy import GaussianMixture


def _gaussian() -> GaussianMixture:
    """One Gaussian, mean (0.7, -1.3, 0.2), variances (0.02, 0.5, 1.7): made up here."""
    mean = torch.tensor([[0.7, -1.3, 0.2]], dtype=torch.float64)
    cov = torch.diag(torch.tensor([0.02, 0.5, 1.7], dtype=torch.float64))[None]
    return GaussianMixture([1.0], mean, cov)


def _statistics(sde, gm, num_points=600):
    pilots = torch.randn(256, gm.dim, generator=torch.Generator().manual_seed(5)).double()
    return EmpiricalModelStatistics.measure(
        sde, gm.score_fn(sde), pilots, num_points=num_points,
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip


def test_without_statistics_it_is_dpm_solver_pp() -> None:
    """l = 1, s = b = 0, first order: DPM-Solver++(1) = DDIM on the same (rounded) grid; the
    only difference is the trapezoid quadrature of e^lambda on the statistics' grid."""
    sde, gm = make_sde("vp"), _gaussian()
    stats = EmpiricalModelStatistics.degenerate(sde, gm.dim, num_points=2000)
    z = torch.randn(64, gm.dim, generator=torch.Generator().manual_seed(0)).double()
    grid = time_grid(sde, 8, "quadratic")
    rounded = stats.t[stats.indexes(grid)]
    plan = stats.plan(grid, order=1, corrector=False)
    ours = EMSSampler(sde, **plan).sample(gm.score_fn(sde), (0,), x_init=z)
    ref = DPMSolverSampler(sde, 8, order=1, corrector=False, time_grid=rounded)
    theirs = ref.sample(gm.score_fn(sde), (0,), x_init=z)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


def test_statistics_of_an_axis_aligned_gaussian() -> None:
    """sigma eps = sigma^2 (x - alpha mu) / (alpha^2 c + sigma^2): l is that slope, f = -l mu
    is the same on every trajectory, so s = 0 and b = df/dlambda = -mu dl/dlambda."""
    sde, gm = make_sde("vp"), _gaussian()
    stats = _statistics(sde, gm)
    var = torch.tensor([0.02, 0.5, 1.7], dtype=torch.float64)
    a2, s2 = stats.alpha[:, None] ** 2, stats.sigma[:, None] ** 2
    slope = s2 / (a2 * var + s2)
    assert torch.allclose(stats.l, slope, rtol=1e-9, atol=1e-12)
    mu = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)
    dl = torch.gradient(slope, spacing=(stats.lam,), dim=0)[0]
    inner = slice(5, -5)  # the ends use one-sided differences
    assert torch.allclose(stats.b[inner], -mu * dl[inner], rtol=1e-3, atol=1e-4)
    assert stats.s[inner].abs().max() < 1e-3


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_few_steps_are_exact_on_an_axis_aligned_gaussian(kind: str) -> None:
    """The statistics make the model output exactly 'linear part + constant' here, so five
    steps reach the tight ODE solve up to quadrature, where DPM-Solver++ is far off."""
    sde, gm = make_sde(kind), _gaussian()
    stats = _statistics(sde, gm, num_points=1500)
    z = sde.prior_std * torch.randn(200, gm.dim, generator=torch.Generator().manual_seed(1))
    z = z.double()
    ref = reference_solve(sde, gm, z, sde.T, 1e-3)
    grid = time_grid(sde, 5, "quadratic")
    v3 = EMSSampler(sde, **stats.plan(grid)).sample(gm.score_fn(sde), (0,), x_init=z)
    pp = DPMSolverSampler(sde, 5).sample(gm.score_fn(sde), (0,), x_init=z)
    err_v3 = (v3 - ref).norm(dim=1).square().mean().sqrt()
    err_pp = (pp - ref).norm(dim=1).square().mean().sqrt()
    assert err_v3 < 2e-3 and err_pp > 30 * err_v3


def test_a_grid_finer_than_the_statistics_is_refused() -> None:
    sde = make_sde("vp")
    stats = EmpiricalModelStatistics.degenerate(sde, 2, num_points=20)
    with pytest.raises(ValueError, match="finer"):
        stats.indexes(time_grid(sde, 50, "quadratic"))


# --- calibrate(method="ems"): statistics + a grid searched for v3, saved with the model -------


def test_calibration_keeps_v3_where_it_is_exact_and_counts_every_evaluation(tmp_path) -> None:
    from scoresde.calibration import calibrate, load_calibrations, save_calibrations

    sde, gm = make_sde("vp"), _gaussian()
    calls = []

    def score(x, t):
        calls.append(1)
        return gm.score_fn(sde)(x, t)

    sampler = DPMSolverSampler(sde, 5)
    cal = calibrate(score, sampler, data_shape=(3,), method="ems", num_pilot=64, max_evals=15,
                    ems_pilots=128, test_pilots=256,
                    generator=torch.Generator().manual_seed(3))  # fmt: skip
    # the statistics' 1,201 probes, 2 searches, the test's reference and its 2 runs
    assert cal.nfe == len(calls) > 1201 + 2 * 15 * 5 + 2 * 5
    assert cal.ems is not None and cal.extra["ems_pilots"] == 128
    assert cal.pilot_error == cal.extra["ems_error"] < 1e-2 * cal.extra["grid_error"]
    assert cal.extra["test_pilots"] == 256 and cal.extra["test_gain_z"] > 2
    assert cal.extra["test_error"] < 1e-2 * cal.extra["test_initial_error"]
    assert len(cal.extra["tuned_grid"]) == 6 and "DPM-Solver-v3" in cal.describe()
    assert f"-> {cal.extra['test_error']:.3g}" in cal.describe()  # the errors that decided
    old = type(cal)(**{**cal.to_dict(), "extra": {}})  # written in round 8: no test pilots
    assert f"-> {cal.pilot_error:.3g}" in old.describe()
    v3 = cal.make_sampler(sde)
    assert isinstance(v3, EMSSampler) and cal.matches(sampler)
    assert torch.equal(cal.grid(), v3.times)
    z = torch.randn(300, 3, generator=torch.Generator().manual_seed(9)).double()
    ref = reference_solve(sde, gm, z, sde.T, 1e-3)
    x = v3.sample(gm.score_fn(sde), (0,), x_init=z)
    assert v3.nfe == 5 and float((x - ref).norm(dim=1).max()) < 1e-3
    save_calibrations(tmp_path / "c.json", [cal])
    (back,) = load_calibrations(tmp_path / "c.json")
    assert back == cal
    assert torch.equal(back.make_sampler(sde).sample(gm.score_fn(sde), (0,), x_init=z), x)


def test_calibration_decides_on_test_pilots_not_on_those_it_was_tuned_on() -> None:
    """Two far-apart components; the grid searches' and the statistics' pilots all flow to
    the right one, the test pilots to the left one. v3's statistics then fit the right
    component only: 100x better than the tuned grid on its own pilots, far worse on the test
    pilots, so the tuned grid is kept (the pilot-error rule would have kept v3)."""
    from scoresde.samplers.ems import calibrate_plan
    from scoresde.samplers.schedules import optimize_time_grid

    sde = make_sde("vp")
    means = torch.tensor([[3.0, 0.5], [-3.0, -0.5]], dtype=torch.float64)
    gm = GaussianMixture([0.5, 0.5], means, torch.tensor([[0.05, 0.3], [0.3, 0.05]]).double())
    z = torch.randn(192, 2, generator=torch.Generator().manual_seed(4)).double()
    right = torch.cat([z[:, :1].abs() + 1.0, z[:, 1:]], dim=1)
    x_grid, x_stats, x_test = right[:64], right[64:128], -right[128:]
    score, sampler, info = gm.score_fn(sde), DPMSolverSampler(sde, 6), {}
    x_ref = reference_solve(sde, gm, x_grid, sde.T, sampler.eps)
    grid = optimize_time_grid(
        lambda g: DPMSolverSampler(sde, 6, time_grid=g), score, sde, 6, x_T=x_grid,
        x_ref=x_ref, init=sampler.time_grid, eps=sampler.eps, max_evals=10, dtype=torch.float64,
        info=info,
    )  # fmt: skip
    tuned, grid_error = DPMSolverSampler(sde, 6, time_grid=grid), info["error"]
    kept, plan, extra = calibrate_plan(
        score, sampler, tuned, info, (x_grid, x_stats, x_test), x_ref, 10, 1e-7
    )
    assert extra["ems_error"] < 0.1 * extra["grid_error"]  # in-sample, v3 wins by far
    assert extra["test_error"] > 10 * extra["test_initial_error"]  # out of it, it loses
    assert extra["test_gain_z"] < -2 and extra["test_pilots"] == 64
    assert kept is tuned.time_grid and plan is None and info["error"] == grid_error
    assert set(extra["rejected_ems"]) == {"times", "linear", "predictor", "corrector"}
    assert extra["ems_pilots"] == 64


def test_calibration_refuses_what_v3_cannot_replace() -> None:
    from scoresde import DDIMSampler
    from scoresde.calibration import Calibration, calibrate

    sde, gm = make_sde("vp"), _gaussian()
    kw = dict(data_shape=(3,), method="ems", num_pilot=8, max_evals=2)
    for bad in (DDIMSampler(sde, 4), DPMSolverSampler(sde, 4, interpolation="t")):
        with pytest.raises(ValueError, match="ems"):
            calibrate(gm.score_fn(sde), bad, **kw)
    for name in ("ems_pilots", "test_pilots"):
        with pytest.raises(ValueError, match=name):
            calibrate(gm.score_fn(sde), DPMSolverSampler(sde, 4), **{name: 1}, **kw)
    good = calibrate(gm.score_fn(sde), DPMSolverSampler(sde, 4), data_shape=(3,), num_pilot=8,
                     max_evals=2).to_dict()  # fmt: skip
    with pytest.raises(ValueError, match="ems"):
        Calibration.from_dict({**good, "ems": {"times": good["time_grid"]}})


def test_sampler_checks_its_plan_and_the_data() -> None:
    sde = make_sde("vp")
    plan = EmpiricalModelStatistics.degenerate(sde, 3, num_points=100).plan(
        time_grid(sde, 4, "quadratic")
    )
    with pytest.raises(ValueError, match="times"):
        EMSSampler(sde, **{**plan, "times": plan["times"][::-1]})
    with pytest.raises(ValueError, match="linear"):
        EMSSampler(sde, **{**plan, "linear": plan["linear"][:2]})
    with pytest.raises(ValueError, match="A, c"):
        EMSSampler(sde, **{**plan, "predictor": [{"A": [1.0], "W": [[1.0]], "c": [0.0]}] * 4})
    with pytest.raises(ValueError, match="entries"):
        EMSSampler(sde, **plan).sample(lambda x, t: -x, (5, 2))
