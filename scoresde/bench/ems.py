"""DPM-Solver-v3 (Zheng et al., NeurIPS 2023): a multistep solver built on empirical model
statistics (EMS), measured in `benchmarks/ems_v3.py` as one of issue 12's 10-NFE options.

Written from the paper's equations, in the half log-SNR lambda = log(alpha / sigma). With
u = x / alpha the probability-flow ODE is du/dlambda = -sigma eps(x) / alpha. The statistics
split the model output, dimension by dimension:

- l_lambda = E[diag(d(sigma eps)/dx)]: the linear part, sigma eps = l x + alpha f, so
  du/dlambda = -l u - f and f = (sigma eps - l x) / alpha is what is left;
- s_lambda, b_lambda: the regression df/dlambda ~ s f + b over trajectories, so that
  g = e^{-(S - S_s)} f - e^{S_s} (B - B_s) (S = int s, B = int e^{-S} b) is as constant in
  lambda as possible and is the quantity the multistep method extrapolates.

The step s -> t is then (L = int l, I = int e^{L + S}, C = int e^{L + S} B)

    x_t = alpha_t [e^{L_s - L_t} x_s / alpha_s - e^{-L_t - S_s} (I_t - I_s) g_s
                   - e^{-L_t} (C_t - C_s - B_s (I_t - I_s))
                   - e^{L_s - L_t} sum_k g_s^(k) int_s^t e^{(L+S)(r) - (L+S)(s)} (r-s)^k / k! dr]

with the derivatives g_s^(k) from earlier steps' g (a Taylor fit). With l = 1 and s = b = 0
it is DPM-Solver++ (f = -x0). Every integral is a trapezoid sum on the statistics' grid (uniform
in lambda), so the sampling grid is rounded to it. The statistics are measured on pilot
trajectories of the model's own ODE (a dopri5 solve through every grid point); l by
Hutchinson's estimator with one Rademacher probe per pilot, fixed along the trajectory so
that l is smooth in lambda; df/dlambda by central differences along each trajectory.

This is a benchmark's implementation: per-dimension statistics, as in the paper, in the
data's own coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from scoresde._typing import Tensor
from scoresde.samplers.base import Sampler, SamplingContext
from scoresde.sdes import SDE

__all__ = ["EMSSampler", "EmpiricalModelStatistics", "ems_sample"]


def _cumtrapz(y: Tensor, x: Tensor) -> Tensor:
    """Cumulative trapezoid integral of y `[M+1, ...]` over x `[M+1]`, 0 at x[0]."""
    dx = (x[1:] - x[:-1]).reshape(-1, *([1] * (y.ndim - 1)))
    out = torch.cumsum(0.5 * dx * (y[1:] + y[:-1]), 0)
    return torch.cat([torch.zeros_like(y[:1]), out], 0)


class EmpiricalModelStatistics:
    """l, s, b `[M+1, D]` on a grid uniform in lambda from t = T to t = eps, and their
    integrals. Build with `measure` (or `degenerate` for DPM-Solver++)."""

    def __init__(self, sde: SDE, lam: Tensor, l: Tensor, s: Tensor, b: Tensor, eps: float):
        self.sde, self.lam, self.eps = sde, lam, eps
        self.t = sde.t_from_log_snr(2 * lam).double()
        self.t[0], self.t[-1] = sde.T, eps
        self.alpha, self.sigma = sde.alpha(self.t).double(), sde.sigma(self.t).double()
        self.l, self.s, self.b = l, s, b
        self.L, self.S = _cumtrapz(l, lam), _cumtrapz(s, lam)
        self.I = _cumtrapz(torch.exp(self.L + self.S), lam)
        self.B = _cumtrapz(torch.exp(-self.S) * b, lam)
        self.C = _cumtrapz(torch.exp(self.L + self.S) * self.B, lam)
        self.nfe = 0  # score evaluations spent measuring (backward passes: M + 1)

    @staticmethod
    def lambda_grid(sde: SDE, num_points: int, eps: float) -> Tensor:
        ends = torch.tensor([sde.T, eps], dtype=torch.float64)
        lam_T, lam_eps = (0.5 * sde.log_snr(ends)).tolist()
        return torch.linspace(lam_T, lam_eps, num_points + 1, dtype=torch.float64)

    @classmethod
    def degenerate(cls, sde: SDE, dim: int, num_points: int = 1200, eps: float = 1e-3):
        """l = 1, s = b = 0: the solver is then DPM-Solver++ on the same rounded grid."""
        lam = cls.lambda_grid(sde, num_points, eps)
        one = torch.ones(lam.numel(), dim, dtype=torch.float64)
        return cls(sde, lam, one, 0 * one, 0 * one, eps)

    @classmethod
    def measure(
        cls,
        sde: SDE,
        score: Callable[[Tensor, Tensor], Tensor],
        field: Callable[[Tensor, Tensor], Tensor],
        pilots: Tensor,
        *,
        num_points: int = 1200,
        eps: float = 1e-3,
        generator: torch.Generator | None = None,
    ) -> EmpiricalModelStatistics:
        """Statistics from `pilots` `[n, D]` (prior draws, float64): `field(t, x)` is the
        probability-flow field the trajectories are solved with (torchdiffeq's signature),
        `score(x, t)` the model; both see float64."""
        from torchdiffeq import odeint

        lam = cls.lambda_grid(sde, num_points, eps)
        t = sde.t_from_log_snr(2 * lam).double()
        t[0], t[-1] = sde.T, eps
        alpha, sigma = sde.alpha(t).double(), sde.sigma(t).double()
        with torch.no_grad():
            xs = odeint(field, pilots, t, rtol=1e-8, atol=1e-8, method="dopri5")  # [M+1,n,D]
        probe = torch.randint(0, 2, pilots.shape, generator=generator).double() * 2 - 1
        ls, noise = [], []
        for j in range(t.numel()):
            x = xs[j].clone().requires_grad_(True)
            out = -(sigma[j] ** 2) * score(x, t[j])  # sigma * eps
            (vjp,) = torch.autograd.grad(out, x, probe)
            ls.append((probe * vjp).mean(0))
            noise.append(out.detach())
        l = torch.stack(ls)
        f = (torch.stack(noise) - l[:, None] * xs) / alpha[:, None, None]
        df = torch.empty_like(f)  # df/dlambda along each trajectory
        df[1:-1] = (f[2:] - f[:-2]) / (lam[2:] - lam[:-2])[:, None, None]
        df[0] = (f[1] - f[0]) / (lam[1] - lam[0])
        df[-1] = (f[-1] - f[-2]) / (lam[-1] - lam[-2])
        fc, dfc = f - f.mean(1, keepdim=True), df - df.mean(1, keepdim=True)
        var = fc.square().mean(1)
        # A ridge relative to f's size: where f barely varies across trajectories (round-off
        # only), s is 0 and b the mean slope, instead of a ratio of round-off errors.
        s = (fc * dfc).mean(1) / (var + 1e-8 * f.square().mean(1) + 1e-300)
        b = df.mean(1) - s * f.mean(1)
        stats = cls(sde, lam, l, s, b, eps)
        stats.nfe = t.numel()
        return stats

    def indexes(self, grid: Tensor) -> list[int]:
        """The statistics' grid points nearest (in lambda) to a time grid from T to eps."""
        lam = 0.5 * self.sde.log_snr(grid.double())
        m = self.lam.numel() - 1
        idx = ((lam - self.lam[0]) / (self.lam[-1] - self.lam[0]) * m).round().long().tolist()
        idx[0], idx[-1] = 0, m
        if any(b <= a for a, b in zip(idx[:-1], idx[1:], strict=True)):
            raise ValueError("time grid is finer than the statistics' grid")
        return idx

    def update(self, base: int, target: int, points: Sequence[int], pseudo: bool = False):
        """(A, [W_q], c) `[D]` each with x_target = A x_base + sum_q W_q f_q + c, f_q the
        model's nonlinear part at grid point points[q] (points[0] = base)."""
        L, S, I, B, C, lam = self.L, self.S, self.I, self.B, self.C, self.lam
        a_t = self.alpha[target]
        A = a_t / self.alpha[base] * torch.exp(L[base] - L[target])
        K = [-a_t * torch.exp(-L[target] - S[base]) * (I[target] - I[base])]
        K += [torch.zeros_like(A) for _ in points[1:]]
        n = len(points) - 1
        if n:
            lams = lam[list(points)]
            unit = torch.eye(n + 1, dtype=torch.float64)
            weights = _derivatives(n, lams, list(unit), pseudo)  # [n][n+1]
            ramp = torch.exp(L[base : target + 1] + S[base : target + 1] - L[base] - S[base])
            seg = lam[base : target + 1]
            for k in range(1, n + 1):
                mom = ((seg - seg[0]) ** k / math.factorial(k))[:, None]
                h = -a_t * torch.exp(L[base] - L[target]) * _cumtrapz(ramp * mom, seg)[-1]
                for q in range(n + 1):
                    K[q] = K[q] + h * weights[k - 1][q]
        c = -a_t * torch.exp(-L[target]) * (C[target] - C[base] - B[base] * (I[target] - I[base]))
        W = []
        for q, p in enumerate(points):  # g_q = e^{S_s - S_q} f_q - e^{S_s} (B_q - B_s)
            W.append(K[q] * torch.exp(S[base] - S[p]))
            c = c - K[q] * torch.exp(S[base]) * (B[p] - B[base])
        return A, W, c


def _derivatives(n: int, lams: Tensor, g: list, pseudo: bool) -> list:
    """g^(1..n) at lams[0] from values g at lams `[n+1]`: the interpolating polynomial's
    (`pseudo`: Newton's divided differences times k!, as the paper's pseudo-order)."""
    if pseudo:
        table = [g]
        for i in range(1, n + 1):
            prev = table[-1]
            table.append(
                [(prev[j] - prev[j + 1]) / (lams[j] - lams[i + j]) for j in range(n - i + 1)]
            )
        return [table[i][0] * math.factorial(i) for i in range(1, n + 1)]
    R = torch.stack([(lams[1:] - lams[0]) ** i for i in range(1, n + 1)], 1)  # [n, n]
    rhs = torch.stack([gi - g[0] for gi in g[1:]]).reshape(n, -1)
    sol = torch.linalg.solve(R, rhs).reshape(n, *g[0].shape)
    return [sol[i - 1] * math.factorial(i) for i in range(1, n + 1)]


def ems_sample(
    stats: EmpiricalModelStatistics,
    score: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,
    grid: Tensor,
    *,
    order: int = 3,
    corrector: bool = True,
    pseudo: bool = False,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver-v3 from x_T `[B, D]` over `grid` (T -> eps, rounded to the statistics'
    grid), len(grid) - 1 score evaluations. The predictor has order `order` (fewer at the
    start and, with `lower_order_final`, at the end); the corrector (as DPMSolverSampler's)
    redoes each step with the new point at one order more, keeping the model's nonlinear part
    f of the new point (the paper's corrector)."""
    idx = stats.indexes(grid)
    steps = len(idx) - 1
    orders = [min(k, order) for k in range(1, steps + 1)]
    if lower_order_final:
        orders = [min(o, steps - k) for k, o in enumerate(orders)]
    cf = {}
    for k in range(steps):  # coefficients of every update, before the loop
        pts = [idx[k - q] for q in range(orders[k])]
        cf["p", k] = stats.update(idx[k], idx[k + 1], pts, pseudo)
        if corrector and k > 0:
            cpts = [idx[k - 1], idx[k]] + [idx[k - 1 - q] for q in range(1, orders[k - 1])]
            cf["c", k] = stats.update(idx[k - 1], idx[k], cpts, pseudo)
    cf = {key: tuple(_to(v, x_T) for v in val) for key, val in cf.items()}
    xs, fs = [], []
    x = x_T
    for k in range(steps):
        j = idx[k]
        sig2, lj, a = stats.sigma[j] ** 2, stats.l[j].to(x_T), stats.alpha[j]
        fs.append((-sig2 * score(x, stats.t[j].to(x_T)) - lj * x) / a)
        if ("c", k) in cf:  # x at this point again, from the step that led here
            A, W, c = cf["c", k]
            used = [fs[-2], fs[-1], *fs[-3::-1]][: len(W)]
            x = A * xs[-1] + c + sum(w * f for w, f in zip(W, used, strict=True))
        xs.append(x)
        A, W, c = cf["p", k]
        x = A * x + c + sum(w * f for w, f in zip(W, fs[::-1][: len(W)], strict=True))
    return x


def _to(v, like: Tensor):
    if isinstance(v, list):
        return [w.to(like) for w in v]
    return v.to(like)


class EMSSampler(Sampler):
    """`ems_sample` as a scoresde Sampler (so that `optimize_time_grid` can tune its grid)."""

    def __init__(self, stats: EmpiricalModelStatistics, grid: Tensor, **options) -> None:
        super().__init__(stats.sde)
        self.stats, self.grid, self.options = stats, grid, options

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        return ems_sample(self.stats, ctx.score, x, self.grid, **self.options)
