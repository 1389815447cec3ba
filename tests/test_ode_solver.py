"""Tests of scoresde._ode.solve_per_sample (per-sample adaptive Dormand-Prince 5(4)) against
closed-form linear ODEs, and of the likelihood's "dopri5_per_sample" method."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import likelihood as L
from scoresde._ode import rms_norm, solve_per_sample
from scoresde.sdes import VPSDE
from scoresde.toy import benchmark_mixture_2d

F64 = torch.float64


def _rates(B: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Per-sample rates a_i in [-3, 3]: samples of very different difficulty."""
    return torch.linspace(-3.0, 3.0, B, dtype=dtype)


def _linear(a: torch.Tensor):
    """dy/dt = a_i cos(t) y with a per-sample rate; exact y(t) = y(t0) exp(a (sin t - sin t0))."""

    def func(t, y, idx):
        return (a[idx] * torch.cos(t)).reshape(-1, *([1] * (y.ndim - 1))) * y

    def exact(y0, t0, t1):
        return y0 * (a * (math.sin(t1) - math.sin(t0))).reshape(-1, *([1] * (y0.ndim - 1))).exp()

    return func, exact


def _scaled_err(y, ref, tol):
    return ((y - ref).abs() / (tol + tol * ref.abs())).max().item()


@pytest.mark.parametrize(("t0", "t1"), [(0.0, 2.0), (2.5, 0.5)])
def test_linear_ode_matches_closed_form_both_directions(t0: float, t1: float) -> None:
    B = 20
    a = _rates(B)
    y0 = torch.randn(B, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    func, exact = _linear(a)
    y, stats = solve_per_sample(func, y0, t0, t1, rtol=1e-6, atol=1e-6, with_index=True)
    ref = exact(y0, t0, t1)
    # The global error stays within a small multiple of the per-step tolerance...
    assert _scaled_err(y, ref, 1e-6) < 5.0
    # ...and is far below what a single loose step would give.
    assert (y - ref).abs().max() < 1e-4
    assert y.dtype == F64 and y.shape == y0.shape
    # a = 0 is a constant solution (one step), |a| = 3 needs the most steps.
    steps = stats.accepted + stats.rejected
    assert steps[B // 2] <= steps[0] and steps[B // 2] <= steps[-1]


def test_error_is_of_the_order_of_the_tolerance() -> None:
    """Global error ~ tol (slope ~1 on a log-log plot), NFE ~ tol^(-1/5)."""
    B = 8
    a = _rates(B)
    y0 = torch.ones(B, 2, dtype=F64)
    func, exact = _linear(a)
    ref = exact(y0, 0.0, 3.0)
    errs, nfes = [], []
    tols = [1e-4, 1e-6, 1e-8, 1e-10]
    for tol in tols:
        y, stats = solve_per_sample(func, y0, 0.0, 3.0, rtol=tol, atol=tol, with_index=True)
        errs.append((y - ref).abs().max().item())
        nfes.append(stats.nfe)
        assert _scaled_err(y, ref, tol) < 10.0
    slope = math.log(errs[0] / errs[-1]) / math.log(tols[0] / tols[-1])
    assert 0.7 < slope < 1.3, (errs, slope)
    # Each 100x tighter tolerance costs about 100^(1/5) = 2.5x the steps.
    for n0, n1 in zip(nfes[:-1], nfes[1:], strict=True):
        assert 1.5 < n1 / n0 < 4.0, nfes


def _nonlinear(t, y):
    """A per-row nonlinear ODE (logistic growth with time-varying rate), rows independent."""
    return (1.0 + 0.9 * torch.sin(3 * t))[:, None] * y * (1.0 - y) + 0.1 * y.roll(1, dims=1)


def test_batch_independence() -> None:
    """A sample solved alone takes the same steps and gives the same result as in a batch."""
    B = 100
    y0 = torch.rand(B, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * 3 + 0.01
    y_all, st_all = solve_per_sample(_nonlinear, y0, 0.0, 4.0, rtol=1e-7, atol=1e-7)
    counts = st_all.accepted + st_all.rejected
    assert counts.min() < counts.max()  # the batch really mixes easy and hard samples
    for i in (0, int(counts.argmax()), int(counts.argmin()), 57):
        y_i, st_i = solve_per_sample(_nonlinear, y0[i : i + 1], 0.0, 4.0, rtol=1e-7, atol=1e-7)
        assert torch.allclose(y_i[0], y_all[i], rtol=0, atol=1e-12)
        assert st_i.accepted[0] == st_all.accepted[i]
        assert st_i.rejected[0] == st_all.rejected[i]
        assert st_i.nfe == st_all.evaluations[i]


def test_stats_are_honest_and_finished_samples_are_not_evaluated() -> None:
    """Count every row of every call: per-sample evaluations, NFE, and times in [t0, t1]."""
    B = 12
    a = _rates(B)
    y0 = torch.ones(B, 2, dtype=F64)
    func, exact = _linear(a)
    calls = 0
    evals = torch.zeros(B, dtype=torch.int64)
    last_t = torch.full((B,), float("nan"), dtype=F64)
    t_seen = []

    def counting(t, y, idx):
        nonlocal calls
        calls += 1
        assert t.shape == (y.shape[0],) and idx.shape == (y.shape[0],)
        evals.index_add_(0, idx, torch.ones_like(idx))
        last_t[idx] = t
        t_seen.append(t)
        return func(t, y, idx)

    y, stats = solve_per_sample(counting, y0, 0.0, 2.0, rtol=1e-5, atol=1e-5, with_index=True)
    assert stats.nfe == calls == 2 + 6 * stats.iterations
    assert torch.equal(stats.evaluations, evals)
    assert torch.equal(evals, 2 + 6 * (stats.accepted + stats.rejected))
    assert stats.iterations == int((stats.accepted + stats.rejected).max())
    # Samples leave the batch as they finish, so the easy ones were evaluated less often.
    assert evals.min() < evals.max()
    # Every sample's last evaluation (the FSAL stage of its last step) is exactly at t1.
    assert torch.all(last_t == 2.0)
    t_all = torch.cat(t_seen)
    assert t_all.min() >= 0.0 and t_all.max() <= 2.0
    assert (y - exact(y0, 0.0, 2.0)).abs().max() < 1e-3


def test_given_first_step_and_zero_length_interval() -> None:
    B = 5
    func, exact = _linear(_rates(B))
    y0 = torch.ones(B, 3, dtype=F64)
    y, stats = solve_per_sample(
        func, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6, h_init=0.01, with_index=True
    )
    assert stats.nfe == 1 + 6 * stats.iterations
    assert (y - exact(y0, 0.0, 1.0)).abs().max() < 1e-4
    y, stats = solve_per_sample(func, y0, 0.5, 0.5, rtol=1e-6, atol=1e-6, with_index=True)
    assert stats.nfe == 0 and torch.equal(y, y0) and stats.accepted.sum() == 0


def test_i_controller_and_float32() -> None:
    B = 16
    a = _rates(B, torch.float32)
    func, exact = _linear(a)
    y0 = torch.ones(B, 2, 2, dtype=torch.float32)
    for controller in ("pi", "i"):
        y, _ = solve_per_sample(
            func, y0, 0.0, 2.0, rtol=1e-4, atol=1e-4, controller=controller, with_index=True
        )
        assert y.dtype == torch.float32 and y.shape == y0.shape
        assert _scaled_err(y.double(), exact(y0, 0.0, 2.0).double(), 1e-4) < 5.0


def test_tuple_state_and_custom_norm() -> None:
    """(x [B, 2, 3], s [B]) with dx/dt = a x and ds/dt = a sum(x): s = sum(x0) (e^{a t} - 1)."""
    B = 6
    a = _rates(B)
    x0 = torch.randn(B, 2, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    s0 = torch.zeros(B, dtype=F64)

    def func(t, state, idx):
        x, _ = state
        ai = a[idx]
        return ai[:, None, None] * x, ai * x.sum((1, 2))

    norms_seen = []

    def norm(ratio):
        assert isinstance(ratio, tuple) and ratio[0].shape[1:] == (2, 3) and ratio[1].ndim == 1
        norms_seen.append(True)
        return rms_norm(ratio)

    (x, s), stats = solve_per_sample(
        func, (x0, s0), 0.0, 1.0, rtol=1e-8, atol=1e-8, norm=norm, with_index=True
    )
    growth = a.exp()
    assert torch.allclose(x, x0 * growth[:, None, None], rtol=1e-6, atol=1e-7)
    assert torch.allclose(s, x0.sum((1, 2)) * (growth - 1), rtol=1e-6, atol=1e-7)
    assert norms_seen and stats.nfe > 0
    # The default norm is the same Hairer RMS: same steps, same result.
    (x2, s2), stats2 = solve_per_sample(
        func, (x0, s0), 0.0, 1.0, rtol=1e-8, atol=1e-8, with_index=True
    )
    assert torch.allclose(x2, x, rtol=1e-12) and torch.allclose(s2, s, rtol=1e-12)
    assert stats2.nfe == stats.nfe


def test_argument_validation_and_failures() -> None:
    y0 = torch.ones(3, 2, dtype=F64)

    def f(t, y):
        return -y

    kw = {"rtol": 1e-5, "atol": 1e-5}
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rtol"):
            solve_per_sample(f, y0, 0.0, 1.0, rtol=bad, atol=1e-5)
        with pytest.raises(ValueError, match="atol"):
            solve_per_sample(f, y0, 0.0, 1.0, rtol=1e-5, atol=bad)
    for bad in ("1e-3", True, None):
        with pytest.raises(TypeError, match="rtol"):
            solve_per_sample(f, y0, 0.0, 1.0, rtol=bad, atol=1e-5)
    with pytest.raises(ValueError, match="rtol.*float32"):
        solve_per_sample(f, y0.float(), 0.0, 1.0, rtol=1e-8, atol=1e-5)
    with pytest.raises(TypeError, match="func"):
        solve_per_sample("f", y0, 0.0, 1.0, **kw)
    with pytest.raises(TypeError, match="y0"):
        solve_per_sample(f, [1.0, 2.0], 0.0, 1.0, **kw)
    with pytest.raises(TypeError, match="y0"):
        solve_per_sample(f, torch.ones(3, 2, dtype=torch.int64), 0.0, 1.0, **kw)
    with pytest.raises(ValueError, match="y0\\[1\\]"):
        solve_per_sample(f, (y0, torch.ones(4, dtype=F64)), 0.0, 1.0, **kw)
    with pytest.raises(ValueError, match="t1"):
        solve_per_sample(f, y0, 0.0, float("nan"), **kw)
    with pytest.raises(ValueError, match="h_init"):
        solve_per_sample(f, y0, 0.0, 1.0, h_init=-0.1, **kw)
    with pytest.raises(ValueError, match="max_steps"):
        solve_per_sample(f, y0, 0.0, 1.0, max_steps=0, **kw)
    with pytest.raises(ValueError, match="controller"):
        solve_per_sample(f, y0, 0.0, 1.0, controller="pid", **kw)
    with pytest.raises(ValueError, match="min_factor"):
        solve_per_sample(f, y0, 0.0, 1.0, min_factor=2.0, **kw)
    with pytest.raises(ValueError, match="shape"):
        solve_per_sample(lambda t, y: y[:, :1], y0, 0.0, 1.0, **kw)
    with pytest.raises(RuntimeError, match="max_steps=3"):
        solve_per_sample(f, y0, 0.0, 100.0, max_steps=3, **kw)

    def nan_after_half(t, y):
        return torch.where((t > 0.5)[:, None], torch.full_like(y, float("nan")), -y)

    with pytest.raises(RuntimeError, match="underflowed"):
        solve_per_sample(nan_after_half, y0, 0.0, 1.0, **kw)
    with pytest.raises(RuntimeError, match="underflowed"):
        solve_per_sample(lambda t, y: y * float("nan"), y0, 0.0, 1.0, **kw)


# --- the likelihood's per-sample method -------------------------------------------------------


def _mixture_setup(n: int):
    mix, sde = benchmark_mixture_2d(), VPSDE()
    x = mix.sample(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    return mix, sde, x


def test_likelihood_per_sample_matches_exact_density() -> None:
    """Exact trace: with the true p_T as prior, the error is the solver's, within tolerance."""
    mix, sde, x = _mixture_setup(24)
    log_p = mix.log_prob_fn(sde)
    exact = log_p(x, 1e-5)
    res = L.log_likelihood(
        mix.score_fn(sde), sde, x, trace="exact", method="dopri5_per_sample", rtol=1e-5, atol=1e-5
    )
    solver_err = (res.delta_logp + log_p(res.z, sde.T) - exact).abs()
    assert solver_err.max() < 2e-3, solver_err.max()
    assert solver_err.mean() < 2e-4, solver_err.mean()
    # Against the exact density, the N(0, I) prior's mismatch with p_T adds ~1e-2 at most.
    assert (res.logp - exact).abs().max() < 0.03
    assert torch.allclose(res.logp, res.prior_logp + res.delta_logp, atol=1e-12)
    # The latent decodes back to the data along the same per-sample ODE.
    back, nfe = L._flow_map(
        mix.score_fn(sde), sde, res.z, sde.T, 1e-5, method="dopri5_per_sample", rtol=1e-7, atol=1e-7
    )
    assert torch.allclose(back, x, atol=1e-4) and nfe > 0


def test_likelihood_per_sample_is_batch_independent_and_follows_probes() -> None:
    mix, sde, x = _mixture_setup(10)
    score = mix.score_fn(sde)
    kw = {"trace": "exact", "method": "dopri5_per_sample", "rtol": 1e-4, "atol": 1e-4}
    whole = L.log_likelihood(score, sde, x, **kw)
    for i in (0, 7):
        alone = L.log_likelihood(score, sde, x[i : i + 1], **kw)
        assert torch.allclose(alone.logp[0], whole.logp[i], rtol=0, atol=1e-10)
    # Hutchinson: each sample keeps its own probe through the sub-batches, so the result is
    # the batch-wide solver's with the same probes.
    hk = {"trace": "hutchinson", "rtol": 1e-6, "atol": 1e-6}
    per = L.log_likelihood(
        score, sde, x, method="dopri5_per_sample", generator=torch.Generator().manual_seed(5), **hk
    )
    ref = L.log_likelihood(
        score, sde, x, method="dopri5", generator=torch.Generator().manual_seed(5), **hk
    )
    assert torch.allclose(per.logp, ref.logp, atol=1e-3)
    assert not torch.allclose(per.logp, whole.logp, atol=1e-3)  # the probes matter
