"""Shared checks for the fast-sampler tests (DDIM, DPM-Solver++, EDM, adaptive): sample
statistics against the benchmark mixture, a tight probability-flow reference, order fits."""

from __future__ import annotations

import math

import torch
import torchdiffeq
from conftest import GM, TRUE_NLL, assert_mixture, mixture_errors  # noqa: F401

from scoresde import VESDE, VPSDE, CosineVPSDE, SubVPSDE
from scoresde._validation import unchecked_times
from scoresde.toy import GaussianMixture

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(), "cosine": CosineVPSDE()}
# A smooth 2-D mixture (wide, overlapping components) where the asymptotic orders show early.
SMOOTH = GaussianMixture([0.6, 0.4], [[-0.5, 0.2], [0.7, -0.3]], [0.5, 0.3])


def draw(sampler, sde, n: int = 3000, seed: int = 0, gm: GaussianMixture = GM, **kw):
    gen = torch.Generator().manual_seed(seed)
    return sampler.sample(gm.score_fn(sde), (n, gm.dim), generator=gen, dtype=torch.float64, **kw)


def pf_ode_reference(sde, gm: GaussianMixture, x_T: torch.Tensor, t_end: float, tol=1e-10):
    """The probability-flow ODE dx/dt = f x - g^2 s / 2 solved by dopri5 (float64) from T to
    t_end; `step_t` keeps every stage inside [t_end, T] (the schedule is undefined below 0)."""
    score = gm.score_fn(sde)

    def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.expand(x.shape[0])
        with unchecked_times():  # torchdiffeq's first-step guess probes far below t = 0
            f, g = sde.drift_coef(tt)[:, None], sde.diffusion_coef(tt)[:, None]
            return f * x - 0.5 * g * g * score(x, tt)

    ts = torch.tensor([sde.T, t_end], dtype=torch.float64)
    return torchdiffeq.odeint(
        rhs, x_T, ts, rtol=tol, atol=tol, method="dopri5", options={"step_t": ts}
    )[-1]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS over samples of ||a_i - b_i||."""
    return float((a - b).flatten(1).norm(dim=1).square().mean().sqrt())


def fitted_order(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    xs = [math.log(n) for n in steps]
    ys = [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum(
        (a - mx) ** 2 for a in xs
    )
