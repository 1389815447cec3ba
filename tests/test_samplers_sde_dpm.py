"""SDE-DPM-Solver++ (`DPMSolverSampler(stochastic=True)`) at few steps: the default (rho = 4
grid in t under VP and cosine, cubic under sub-VP) within issue 12's NLL tolerances at 20 NFE
on fresh seeds, convergence, the `tau` noise level and the default grids."""

from __future__ import annotations

import math

import pytest
import torch
from _fast_samplers import GM, SDES, TRUE_NLL, draw

from scoresde.bench.targets import aniso_mixture_32d
from scoresde.samplers import DPMSolverSampler
from scoresde.samplers._multistep import sde_weights
from scoresde.samplers.dpm_solver import noise_exponent, stochastic_grid
from scoresde.samplers.grids import time_grid
from scoresde.toy import GaussianMixture


def nll_gap(gm: GaussianMixture, x: torch.Tensor, entropy: float) -> tuple[float, float]:
    """(mean NLL - entropy, standard error of the mean NLL)."""
    nll = -gm.log_prob(x.double())
    return float(nll.mean()) - entropy, float(nll.std()) / math.sqrt(nll.numel())


def test_2d_mixture_at_20_nfe() -> None:
    """Issue 12.2 on the 2-D benchmark at 20 NFE with the defaults (tau = 1, 3M + corrector,
    the rho = 4 grid in t under VP): |gap| < .05, measured +.027 +- .004 (mean of 10 seeds x
    10,000); the cubic grid (the default before) .049, the quadratic one .22. Fresh seeds;
    n = 20,000: standard error ~.008, so the assertion sits ~3 s.e. above the mean."""
    sde = SDES["vp"]
    default = DPMSolverSampler(sde, 20, stochastic=True)
    for seed in (61, 62):
        gap, se = nll_gap(GM, draw(default, sde, n=20_000, seed=seed), TRUE_NLL)
        assert default.nfe == 20 and se < 0.01
        assert abs(gap) < 0.05, (seed, gap, se)
    quiet = DPMSolverSampler(sde, 20, stochastic=True, tau=0.7)
    gap, se = nll_gap(GM, draw(quiet, sde, n=20_000, seed=33), TRUE_NLL)
    assert quiet.nfe == 20 and abs(gap) < 0.05, (gap, se)
    before = DPMSolverSampler(sde, 20, stochastic=True, time_grid="quadratic")
    gap, _ = nll_gap(GM, draw(before, sde, n=20_000, seed=34), TRUE_NLL)
    assert gap > 0.15  # the quadratic grid's long final steps: too spread


def test_2d_held_out_mixture_at_20_nfe() -> None:
    """A 2-D mixture made up for this test after the grid was chosen (4 rotated components,
    variances .02-.5, unequal weights): measured +.042 +- .006 under VP (6 seeds x 10,000;
    the cubic grid: .060) and +.023 +- .007 under cosine. n = 20,000 (s.e. ~.01): held below
    .075, not at the goal's .05, which this target meets without a margin."""
    angle = torch.tensor([1.0, -0.4, 2.5, 0.2], dtype=torch.float64)
    c, s = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    ev = torch.tensor([[0.3, 0.02], [0.1, 0.04], [0.5, 0.06], [0.03, 0.025]], dtype=torch.float64)
    covs = rot @ torch.diag_embed(ev) @ rot.mT
    means = [[1.8, 1.5], [-0.5, 0.6], [-2.2, -1.0], [0.9, -1.7]]
    gm = GaussianMixture([0.25, 0.3, 0.15, 0.3], means, 0.5 * (covs + covs.mT))
    truth = gm.sample(200_000, generator=torch.Generator().manual_seed(5))
    entropy = -float(gm.log_prob(truth).mean())  # Monte Carlo, sd ~.003
    for name in ("vp", "cosine"):
        sde = SDES[name]
        x = draw(DPMSolverSampler(sde, 20, stochastic=True), sde, n=20_000, seed=71, gm=gm)
        gap, se = nll_gap(gm, x, entropy)
        assert abs(gap) < 0.075, (name, gap, se)


def test_default_32d_anisotropic_within_one_nat_at_20_nfe() -> None:
    """The held-out 32-D anisotropic mixture (never used to choose the grid): within 1 nat
    at 20 NFE (measured +.45 under VP, +.20 under the cosine SDE; the cubic grid gave .76 and
    .27, the quadratic one 5.6 and 1.8). n = 6,000 / 2,000: standard errors ~.065 / ~.11."""
    gm = aniso_mixture_32d()
    truth = gm.sample(20_000, generator=torch.Generator().manual_seed(1))
    entropy = -float(gm.log_prob(truth).mean())  # Monte Carlo, sd ~0.03
    for name, n in (("vp", 6000), ("cosine", 2000)):
        sde = SDES[name]
        x = draw(DPMSolverSampler(sde, 20, stochastic=True), sde, n=n, seed=8, gm=gm)
        gap, se = nll_gap(gm, x, entropy)
        assert se < 0.15 and abs(gap) < 1.0, (name, gap, se)


def test_default_converges_with_steps() -> None:
    """More steps, smaller gap: from 20 to 50 steps the default gets within .03 nats (the
    first-order DDPM chain at 50 steps is still .14 too tight)."""
    sde = SDES["vp"]
    x = draw(DPMSolverSampler(sde, 50, stochastic=True), sde, n=10_000, seed=32)
    gap, _ = nll_gap(GM, x, TRUE_NLL)
    assert abs(gap) < 0.035, gap
    ddpm = DPMSolverSampler(sde, 50, order=1, corrector=False, stochastic=True)
    gap1, _ = nll_gap(GM, draw(ddpm, sde, n=10_000, seed=32), TRUE_NLL)
    assert gap1 < -0.08  # the first-order chain under-disperses at 50 steps: not a free pass


def test_2m_weights_are_the_papers_closed_form() -> None:
    """SDE-DPM-Solver++ 2M integrates the linear interpolant exactly: x_s = ... +
    alpha (1 - e^{-2h}) m0 + alpha (1 - (1 - e^{-2h}) / (2h)) (h / h1) (m0 - m1)
    (Lu et al. 2022; diffusers' "heun" form of sde-dpmsolver++)."""
    h, h1, a = 0.6, 0.45, 0.7
    w0, w1 = sde_weights(h, [-h, -h - h1], a, 1.0)
    c = a * (1 - (1 - math.exp(-2 * h)) / (2 * h)) * h / h1
    assert w0 == pytest.approx(a * (1 - math.exp(-2 * h)) + c, rel=1e-12)
    assert w1 == pytest.approx(-c, rel=1e-12)


def test_tau_zero_is_the_ode_and_tau_one_the_default() -> None:
    sde = SDES["vp"]
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = stochastic_grid(sde, 12, 1e-3)
    ode = DPMSolverSampler(sde, 12, time_grid=grid).sample(GM.score_fn(sde), (0,), x_init=x_T)
    tau0 = DPMSolverSampler(sde, 12, stochastic=True, tau=0.0).sample(
        GM.score_fn(sde), (0,), x_init=x_T, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(tau0, ode, rtol=1e-12, atol=1e-12)
    a, b = (
        DPMSolverSampler(sde, 12, stochastic=True, **kw).sample(
            GM.score_fn(sde), (0,), x_init=x_T, generator=torch.Generator().manual_seed(1)
        )
        for kw in ({}, {"tau": 1.0})
    )
    assert torch.equal(a, b)
    c = DPMSolverSampler(sde, 12, stochastic=True, tau=0.5).sample(
        GM.score_fn(sde), (0,), x_init=x_T, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.equal(a, c) and torch.isfinite(c).all()


def test_default_grids() -> None:
    """ODE: quadratic as before; stochastic: the rho = 4 grid in t under VP and cosine (noise
    variance linear in t at the data end), cubic under sub-VP (quadratic in t), quadratic
    under VE."""
    n, eps = 7, 1e-3
    frac = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    for name, q in (("vp", 1.0), ("cosine", 1.0), ("subvp", 2.0), ("ve", 0.0)):
        assert noise_exponent(SDES[name]) == pytest.approx(q, abs=0.01), name
    for name in ("vp", "cosine"):
        sde = SDES[name]
        want = (sde.T**0.25 + frac * (eps**0.25 - sde.T**0.25)) ** 4
        torch.testing.assert_close(stochastic_grid(sde, n, eps), want)
    sub = SDES["subvp"]
    torch.testing.assert_close(stochastic_grid(sub, n, eps), eps + (sub.T - eps) * (1 - frac) ** 3)
    # Under VP the rho grid's lambda-steps vary slowly and its last is not a near-empty one.
    lam = 0.5 * SDES["vp"].log_snr(stochastic_grid(SDES["vp"], 20, eps))
    h = lam.diff()
    assert float((h[1:] / h[:-1]).max()) < 1.4 and 0.3 < float(h[-1]) < 0.5
    ve = SDES["ve"]
    torch.testing.assert_close(stochastic_grid(ve, n, eps), time_grid(ve, n, "quadratic", eps=eps))
    for name, sde in SDES.items():
        gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
        a = DPMSolverSampler(sde, n).sample(GM.score_fn(sde), (30, 2), generator=gen())
        b = DPMSolverSampler(sde, n, time_grid="quadratic").sample(
            GM.score_fn(sde), (30, 2), generator=gen()
        )
        assert torch.equal(a, b), name
    assert DPMSolverSampler(SDES["vp"], n).time_grid == "quadratic"
    assert DPMSolverSampler(SDES["vp"], n, stochastic=True).time_grid is None  # stochastic_grid
    assert DPMSolverSampler(SDES["vp"], n).tau == 0.0
    assert DPMSolverSampler(SDES["vp"], n, stochastic=True).tau == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stochastic": True, "tau": -0.5}, ValueError, "tau"),
        ({"stochastic": True, "tau": float("nan")}, ValueError, "tau"),
        ({"stochastic": True, "tau": "high"}, TypeError, "tau"),
        ({"tau": 0.5}, ValueError, "stochastic"),
        ({"tau": 1.0}, ValueError, "stochastic"),
    ],
)
def test_tau_validation(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DPMSolverSampler(SDES["vp"], 10, **kwargs)
