"""DPM-Solver-v3 as benchmarked (scoresde.bench.ems) against closed forms: without
statistics it is DPM-Solver++; on a Gaussian with an axis-aligned covariance its statistics
are known and its few-step solve is exact."""

from __future__ import annotations

import pytest
import torch

from scoresde import DPMSolverSampler
from scoresde.bench.ems import EmpiricalModelStatistics, ems_sample
from scoresde.bench.targets import make_sde, pf_ode_field, reference_solve
from scoresde.samplers.grids import time_grid
from scoresde.toy import GaussianMixture


def _gaussian() -> GaussianMixture:
    """One Gaussian, mean (0.7, -1.3, 0.2), variances (0.02, 0.5, 1.7): made up here."""
    mean = torch.tensor([[0.7, -1.3, 0.2]], dtype=torch.float64)
    cov = torch.diag(torch.tensor([0.02, 0.5, 1.7], dtype=torch.float64))[None]
    return GaussianMixture([1.0], mean, cov)


def _statistics(sde, gm, num_points=600):
    pilots = torch.randn(256, gm.dim, generator=torch.Generator().manual_seed(5)).double()
    stats = EmpiricalModelStatistics.measure(
        sde, gm.score_fn(sde), pf_ode_field(sde, gm), pilots, num_points=num_points,
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip
    return stats


def test_without_statistics_it_is_dpm_solver_pp() -> None:
    """l = 1, s = b = 0, first order: DPM-Solver++(1) = DDIM on the same (rounded) grid; the
    only difference is the trapezoid quadrature of e^lambda on the statistics' grid."""
    sde, gm = make_sde("vp"), _gaussian()
    stats = EmpiricalModelStatistics.degenerate(sde, gm.dim, num_points=2000)
    z = torch.randn(64, gm.dim, generator=torch.Generator().manual_seed(0)).double()
    grid = time_grid(sde, 8, "quadratic")
    rounded = stats.t[stats.indexes(grid)]
    ours = ems_sample(stats, gm.score_fn(sde), z, grid, order=1, corrector=False)
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
    v3 = ems_sample(stats, gm.score_fn(sde), z, grid)
    pp = DPMSolverSampler(sde, 5).sample(gm.score_fn(sde), (0,), x_init=z)
    err_v3 = (v3 - ref).norm(dim=1).square().mean().sqrt()
    err_pp = (pp - ref).norm(dim=1).square().mean().sqrt()
    assert err_v3 < 2e-3 and err_pp > 30 * err_v3


def test_a_grid_finer_than_the_statistics_is_refused() -> None:
    sde = make_sde("vp")
    stats = EmpiricalModelStatistics.degenerate(sde, 2, num_points=20)
    with pytest.raises(ValueError, match="finer"):
        stats.indexes(time_grid(sde, 50, "quadratic"))
