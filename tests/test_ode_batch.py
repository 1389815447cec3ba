"""Tests of scoresde._ode_batch.solve_batch, the in-house "dopri5" (one step size for the batch):
torchdiffeq's dopri5 rule step for step (same evaluations, same result to round-off) on the
probability-flow ODE of a mixture, both directions, tensor and tuple states; a closed-form
linear ODE; NaN and step-limit reports; and the controller's no-shrink-after-accept rule."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde._control import StepController
from scoresde._ode_batch import BatchNonFiniteError, mixed_rms_norm, solve_batch
from scoresde.flow import ProbabilityFlow, _first_step, _rms
from scoresde.likelihood import _per_sample_norm, log_likelihood
from scoresde.samplers import NonFiniteError
from scoresde.sdes import VPSDE
from scoresde.toy import GaussianMixture

torchdiffeq = pytest.importorskip("torchdiffeq")
F64 = torch.float64


def _mixture() -> GaussianMixture:
    # Not the benchmark target: two anisotropic components in 3-D.
    return GaussianMixture(
        torch.tensor([0.6, 0.4], dtype=F64),
        torch.tensor([[1.0, -0.5, 0.2], [-1.2, 0.8, 0.0]], dtype=F64),
        torch.stack(
            [torch.diag(torch.tensor(d, dtype=F64)) for d in ([0.2, 0.05, 0.4], [0.1, 0.3, 0.02])]
        ),
    )


def _torchdiffeq_dopri5(func, y0, t0, t1, tol, norm):
    """torchdiffeq's dopri5 with the same first step and norm as scoresde.flow.solve used."""
    calls = []

    def counted(t, y):
        calls.append(float(t))
        return func(t, y)

    f0 = counted(torch.tensor(t0, dtype=F64), y0)
    direction = 1.0 if t1 > t0 else -1.0
    h = _first_step(
        counted, torch.tensor(t0, dtype=F64), y0, f0, 5, tol, tol, norm, abs(t1 - t0), direction
    )
    ts = torch.tensor([t0, t1], dtype=F64)
    out = torchdiffeq.odeint(
        counted, y0, ts, rtol=tol, atol=tol, method="dopri5",
        options={"norm": norm, "first_step": h, "step_t": ts[1:]},
    )  # fmt: skip
    # torchdiffeq evaluates f(t0, y0) once more when it starts.
    return (tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]), len(calls) - 1


@pytest.mark.parametrize(("t0", "t1"), [(1e-3, 1.0), (1.0, 1e-3)])
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_matches_torchdiffeq_step_for_step(t0: float, t1: float, tol: float) -> None:
    sde = VPSDE()
    flow = ProbabilityFlow(sde, _mixture().score_fn(sde))
    x = torch.randn(40, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    ref, ref_nfe = _torchdiffeq_dopri5(flow, x, t0, t1, tol, _rms)
    ours, stats = solve_batch(flow, x, t0, t1, rtol=tol, atol=tol, norm=_rms)
    assert stats.nfe == ref_nfe == 2 + 6 * (stats.accepted + stats.rejected)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-11)


def test_likelihood_state_matches_torchdiffeq() -> None:
    """The likelihood's (x, delta) state under its worst-sample norm, exact trace."""
    sde = VPSDE()
    flow = ProbabilityFlow(sde, _mixture().score_fn(sde), t_range=(1e-4, 1.0))
    x = _mixture().sample(30, generator=torch.Generator().manual_seed(1), dtype=F64)

    def rhs(t, state):
        from scoresde.flow import one_hot_chunks

        return flow.with_divergence(t, state[0], "exact", one_hot_chunks(state[0]))

    y0 = (x, torch.zeros(30, dtype=F64))
    ref, ref_nfe = _torchdiffeq_dopri5(rhs, y0, 1e-4, 1.0, 1e-4, _per_sample_norm)
    ours, stats = solve_batch(rhs, y0, 1e-4, 1.0, rtol=1e-4, atol=1e-4, norm=_per_sample_norm)
    assert stats.nfe == ref_nfe
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_log_likelihood_dopri5_is_exact_on_a_mixture() -> None:
    """End to end through log_likelihood(method="dopri5"), float32 and float64."""
    sde, mix = VPSDE(), _mixture()
    x = mix.sample(64, generator=torch.Generator().manual_seed(2), dtype=F64)
    exact = mix.log_prob_fn(sde)(x, 1e-5)
    for dtype, tol, bound in ((F64, 1e-6, 0.02), (torch.float32, 1e-4, 0.05)):
        res = log_likelihood(mix.score_fn(sde), sde, x.to(dtype), trace="exact", rtol=tol, atol=tol)
        assert res.logp.dtype == dtype
        # The N(0, I) prior's mismatch with p_T is the floor here (~1e-2 nats at most).
        assert (res.logp.double() - exact).abs().max() < bound


def test_linear_ode_closed_form_and_tuple_default_norm() -> None:
    a = torch.linspace(-2.0, 2.0, 8, dtype=F64)

    def func(t, y):
        return (a[:, None] * torch.cos(t) * y[0], -a * y[1])

    y0 = (torch.ones(8, 2, dtype=F64), torch.ones(8, dtype=F64))
    (y, z), stats = solve_batch(func, y0, 0.0, 2.0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(
        y, torch.exp(a * math.sin(2.0))[:, None].expand(8, 2), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(z, torch.exp(-2.0 * a), rtol=1e-6, atol=0)
    assert stats.accepted > 0
    # The default norm: torchdiffeq's, the largest RMS over one tensor of the state.
    r = (torch.tensor([[3.0, 4.0]]), torch.tensor([1.0]))
    assert float(mixed_rms_norm(r)) == pytest.approx(math.sqrt(12.5))


def test_zero_interval_nan_and_step_limit() -> None:
    y0 = torch.ones(3, 2, dtype=F64)
    out, stats = solve_batch(lambda t, y: -y, y0, 0.5, 0.5, rtol=1e-6, atol=1e-6)
    assert torch.equal(out, y0) and stats.nfe == 0

    def nan_after(t, y):
        return torch.where(t > 0.3, torch.full_like(y, math.nan), -y)

    with pytest.raises(BatchNonFiniteError, match=r"from t = 0\.\d+") as info:
        solve_batch(nan_after, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6)
    assert isinstance(info.value, NonFiniteError) and info.value.t_start <= 0.3
    with pytest.raises(RuntimeError, match="max_steps=2"):
        solve_batch(lambda t, y: -50 * y, y0, 0.0, 1.0, rtol=1e-9, atol=1e-9, max_steps=2)
    with pytest.raises(TypeError, match="func"):
        solve_batch(None, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rtol"):
        solve_batch(lambda t, y: -y, y0, 0.0, 1.0, rtol=0.0, atol=1e-6)


def test_controller_never_shrinks_after_an_accepted_step() -> None:
    ctrl = StepController(
        rtol=1e-3, atol=1e-3, order=5, safety=0.9, min_factor=0.2, max_factor=10.0,
        min_factor_accept=1.0, no_growth_after_reject=False,
    )  # fmt: skip
    state = ctrl.init_state(3, F64, torch.device("cpu"))
    E = torch.tensor([0.99, 2.0, 1e-12], dtype=F64)
    h = torch.full((3,), 0.1, dtype=F64)
    accept, h_new, _ = ctrl.decide(E, h, state)
    assert accept.tolist() == [True, False, True]
    # 0.9 * 0.99^(-1/5) < 1 would shrink; torchdiffeq's rule keeps the step.
    assert h_new[0].item() == pytest.approx(0.1)
    assert h_new[1].item() == pytest.approx(0.1 * 0.9 * 2.0 ** (-0.2))
    assert h_new[2].item() == pytest.approx(1.0)  # grows by at most max_factor
