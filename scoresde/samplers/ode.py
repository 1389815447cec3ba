"""Sampling (and encoding) with the probability-flow ODE (Song et al. 2021, eq. 13):

    dx/dt = f(t) x - g(t)^2 s(x, t) / 2,

integrated from t = T down to eps (`sample`) or from eps up to T (`encode`). Its solution
has the same marginals p_t as the SDE, so a prior draw at T becomes a data sample at eps
and `encode` maps data to its latent deterministically (sample(x_init=encode(x)) == x up
to the solver's error).

Fixed-step methods on a time grid t_0 > ... > t_n (h_k = t_{k+1} - t_k < 0):

- "euler":    x + h d(x, t)                                   1 NFE/step, order 1
- "midpoint": x + h d(x + h/2 d(x, t), t + h/2)               2 NFE/step, order 2
- "heun":     x + h/2 [d(x, t) + d(x + h d(x, t), t + h)]     2 NFE/step, order 2
- "rk4":      classical Runge–Kutta                           4 NFE/step, order 4

Every step is a full step of its method, the last one included (the grid stops at eps > 0,
where the drift is finite). Adaptive methods ("dopri5", "dopri8", "bosh3", "fehlberg2",
"adaptive_heun") run torchdiffeq's `odeint` with rtol/atol ("dopri5" runs torchdiffeq's
rule step for step in scoresde's own lean loop, `scoresde._ode_batch.solve_batch`); the error
norm is the largest
per-sample RMS error, so every sample (not only the batch on average) meets the tolerance.
The step sizes are still shared by the batch, so adaptive results depend (within the
tolerance) on the other samples. "dopri5_per_sample" (scoresde's own Dormand–Prince 5(4),
`scoresde._ode`) gives every sample its own step size and accept/reject decisions and stops
evaluating a sample once it has arrived: a sample's result does not depend on the rest of
the batch, and one score call on the still-active samples counts as one NFE.
"""

from __future__ import annotations

from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_bool, check_data, check_positive, check_positive_int
from scoresde.flow import (
    ADAPTIVE_METHODS,
    DEFAULT_MAX_STEPS,
    METHODS,
    PER_SAMPLE_METHODS,
    TORCHDIFFEQ_METHODS,
    ProbabilityFlow,
    pf_coefficients,
    solve,
)
from scoresde.samplers.base import (
    CountedScore,
    GeneratorNoise,
    NonFiniteGuard,
    Sampler,
    SamplingContext,
)
from scoresde.samplers.toolkit import cached, check_grid, grid_key, make_grid
from scoresde.sdes import SDE

__all__ = ["ODESampler", "FIXED_METHODS", "ADAPTIVE_METHODS"]
__all__ += ["TORCHDIFFEQ_METHODS", "PER_SAMPLE_METHODS"]

# Views of the one table of methods (scoresde.flow.METHODS): the fixed-step methods this
# module implements itself, and the adaptive ones it hands to scoresde.flow.solve.
FIXED_METHODS = tuple(name for name, m in METHODS.items() if m.native)


def per_sample_max_rms(v: Tensor) -> Tensor:
    """max over the batch of the per-sample RMS of v `[B, *D]` (an error norm for odeint)."""
    if v.ndim < 2:
        return v.pow(2).mean().sqrt()
    return v.reshape(v.shape[0], -1).pow(2).mean(dim=1).sqrt().max()


class _FixedSteps:
    """Per-step coefficients of the drift d(x, t) = f(t) x - c(t) s(x, t), c = g^2 / 2, at
    the start, midpoint and end of every step of a grid, as Python floats."""

    def __init__(self, sde: SDE, grid: Tensor) -> None:
        g = grid.detach().to(device="cpu", dtype=torch.float64)
        t0, t1 = g[:-1], g[1:]
        tm = 0.5 * (t0 + t1)
        self.t0, self.tm, self.t1 = t0.tolist(), tm.tolist(), t1.tolist()
        self.h = (t1 - t0).tolist()
        (f0, c0), (fm, cm), (f1, c1) = (pf_coefficients(sde, t) for t in (t0, tm, t1))
        self.f0, self.fm, self.f1 = f0.tolist(), fm.tolist(), f1.tolist()
        self.c0, self.cm, self.c1 = c0.tolist(), cm.tolist(), c1.tolist()
        # every time a method evaluates the score at (for `CountedScore.preload`)
        self.times = self.t0 + self.tm + self.t1
        self.preloaded: dict = {}


# The steps below do the minimum of tensor work: the state x is never written (a callback
# may keep it), each stage's input is a fresh buffer that becomes that stage's slope in
# place (CountedScore guarantees the score does not share its memory), and slopes are
# summed in place. The arithmetic is that of the textbook formulas, in the same order.


def _slope(x: Tensor, score: Tensor, f: float, c: float) -> Tensor:
    """d = f x - c s as a new tensor (x is not written)."""
    return torch.mul(x, f).add_(score, alpha=-c)


def _slope_(buf: Tensor, score: Tensor, f: float, c: float) -> Tensor:
    """d = f x - c s written over x = `buf` (a stage input no longer needed)."""
    return buf.mul_(f).add_(score, alpha=-c)


def _euler(ctx: SamplingContext, x: Tensor, k: _FixedSteps, i: int) -> Tensor:
    h = k.h[i]
    # x + h (f x - c s) = (1 + h f) x - h c s
    return torch.add(x * (1 + h * k.f0[i]), ctx.score(x, k.t0[i]), alpha=-h * k.c0[i])


def _midpoint(ctx: SamplingContext, x: Tensor, k: _FixedSteps, i: int) -> Tensor:
    h = k.h[i]
    d0 = _slope(x, ctx.score(x, k.t0[i]), k.f0[i], k.c0[i])
    xm = torch.add(x, d0, alpha=0.5 * h)
    dm = _slope_(xm, ctx.score(xm, k.tm[i]), k.fm[i], k.cm[i])
    return torch.add(x, dm, alpha=h)


def _heun(ctx: SamplingContext, x: Tensor, k: _FixedSteps, i: int) -> Tensor:
    h = k.h[i]
    d0 = _slope(x, ctx.score(x, k.t0[i]), k.f0[i], k.c0[i])
    x1 = torch.add(x, d0, alpha=h)
    d1 = _slope_(x1, ctx.score(x1, k.t1[i]), k.f1[i], k.c1[i])
    return torch.add(x, d0.add_(d1), alpha=0.5 * h)


def _rk4(ctx: SamplingContext, x: Tensor, k: _FixedSteps, i: int) -> Tensor:
    h, tm, fm, cm = k.h[i], k.tm[i], k.fm[i], k.cm[i]
    k1 = _slope(x, ctx.score(x, k.t0[i]), k.f0[i], k.c0[i])
    x2 = torch.add(x, k1, alpha=0.5 * h)
    k2 = _slope_(x2, ctx.score(x2, tm), fm, cm)
    x3 = torch.add(x, k2, alpha=0.5 * h)
    k3 = _slope_(x3, ctx.score(x3, tm), fm, cm)
    x4 = torch.add(x, k3, alpha=h)
    k2.add_(k3)
    k4 = _slope_(x4, ctx.score(x4, k.t1[i]), k.f1[i], k.c1[i])
    # x + h/6 (k1 + 2 k2 + 2 k3 + k4), summed as (k1 + k4) + 2 (k2 + k3)
    return torch.add(x, k1.add_(k4).add_(k2, alpha=2.0), alpha=h / 6)


_STEPS = {"euler": _euler, "midpoint": _midpoint, "heun": _heun, "rk4": _rk4}
_NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


class ODESampler(Sampler):
    """Probability-flow ODE sampler (and encoder).

    Args:
        sde: the forward SDE.
        method: fixed-step "euler", "midpoint", "heun" (default), "rk4", adaptive with one
            step size for the batch (torchdiffeq's rule) "dopri5", "dopri8", "bosh3", "fehlberg2",
            "adaptive_heun", or adaptive per sample "dopri5_per_sample" (batch-independent).
        num_steps: steps of a fixed-step method (default 100; NFE = 100 for Euler, 200 for
            Heun/midpoint, 400 for RK4). Ignored by adaptive methods.
        rtol, atol: tolerances of an adaptive method (per sample, see the module docstring).
        eps: the ODE is solved between T and eps.
        denoise: after reaching eps, one Tweedie step x0 = (x + sigma(eps)^2 s) / alpha(eps)
            (one more NFE). `encode` never applies it, so round trips need denoise=False.
        time_grid: the fixed-step grid: "uniform", "quadratic", "karras", "logsnr" or a
            decreasing tensor from T to eps (see `scoresde.samplers.time_grid`).
        max_steps: the most steps of an adaptive method (RuntimeError beyond).

    With an adaptive method the callback (and the NaN check) run once, after the solve; the
    score is only evaluated on [eps, T], and NaN/Inf from it raises `NonFiniteError` with
    the time.
    """

    def __init__(
        self,
        sde: SDE,
        method: str = "heun",
        num_steps: int = 100,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        eps: float = 1e-3,
        denoise: bool = False,
        time_grid: Any = "uniform",
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> None:
        super().__init__(sde)
        if method not in FIXED_METHODS + ADAPTIVE_METHODS:
            raise ValueError(
                f"method must be one of {FIXED_METHODS + ADAPTIVE_METHODS}, got {method!r}"
            )
        self.method = method
        self.num_steps, self.time_grid, self.eps = check_grid(sde, num_steps, time_grid, eps, 100)
        self.rtol = check_positive("rtol", rtol)
        self.atol = check_positive("atol", atol)
        self.denoise = check_bool("denoise", denoise)
        self.max_steps = check_positive_int("max_steps", max_steps)

    # --- public --------------------------------------------------------------------------
    def encode(self, score_fn: Any, x: Tensor, *, progress: bool = False) -> Tensor:
        """The latent z at T `[B, *D]` of data x `[B, *D]` at t = eps: the probability-flow
        ODE solved forwards from eps to T with this sampler's method and grid (reversed).
        Device and dtype follow x; `self.nfe` is set as after `sample`."""
        check_data("x", x)
        score = CountedScore(score_fn)
        guard = NonFiniteGuard(x.device)
        ctx = SamplingContext(score, GeneratorNoise(None), guard, None, progress, "encode")
        try:
            with torch.no_grad():
                z = self._solve(ctx, x.detach().clone(), forward=True)
            guard.flush()
        finally:
            self.nfe = score.nfe
        return z

    # --- internals -----------------------------------------------------------------------
    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        x = self._solve(ctx, x, forward=False)
        if self.denoise:
            t = torch.tensor(self.eps, dtype=torch.float64)
            alpha, sigma = float(self.sde.alpha(t)), float(self.sde.sigma(t))
            x = torch.add(x, ctx.score(x, self.eps), alpha=sigma * sigma).mul_(1 / alpha)
        return x

    def _solve(self, ctx: SamplingContext, x: Tensor, *, forward: bool) -> Tensor:
        if self.method in ADAPTIVE_METHODS:
            return self._solve_adaptive(ctx, x, forward)
        key = (self.num_steps, grid_key(self.time_grid), self.eps, forward)
        k = cached(self, key, lambda: self._fixed_steps(forward))
        ctx.score.preload(k.times, x, k.preloaded)
        step = _STEPS[self.method]
        for i in ctx.steps(len(k.h)):
            x = ctx.after_step(i, k.t1[i], step(ctx, x, k, i))
        return x

    def _fixed_steps(self, forward: bool) -> _FixedSteps:
        grid = make_grid(self.sde, self.num_steps, self.time_grid, self.eps)
        return _FixedSteps(self.sde, grid.flip(0) if forward else grid)

    def _solve_adaptive(self, ctx: SamplingContext, x: Tensor, forward: bool) -> Tensor:
        ends = (self.eps, self.sde.T) if forward else (self.sde.T, self.eps)
        # The score is only ever evaluated on [eps, T] (see scoresde.flow).
        flow = ProbabilityFlow(self.sde, ctx.score, t_range=(self.eps, self.sde.T))
        out = solve(
            flow, x, ends[0], ends[1], self.method, rtol=self.rtol, atol=self.atol,
            norm=per_sample_max_rms, max_steps=self.max_steps,
        )  # fmt: skip
        return ctx.after_step(0, ends[1], out)
