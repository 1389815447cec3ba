"""Karras et al. (2022) "EDM" sampler (their Algorithm 2: Heun with optional churn).

EDM works in the scale-free variables of any linear SDE x_t = alpha_t x0 + sigma_t eps:

    x_hat = x / alpha_t,   sigma_edm(t) = sigma_t / alpha_t = exp(-lambda_t),

in which the probability-flow ODE is dx_hat/dsigma = (x_hat - D(x_hat, sigma)) / sigma with the
denoiser D = x0_hat = (x + sigma_t^2 score(x, t)) / alpha_t. Its slope is just the noise
prediction, (x_hat - D) / sigma_edm = -sigma_t score(alpha_t x_hat, t) = eps_hat.

Step i (sigma_i -> sigma_{i+1}):
  1. churn: gamma = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0,
     sigma_hat = sigma_i (1 + gamma) (capped at sigma_edm(T)), x_hat += sqrt(sigma_hat^2 -
     sigma_i^2) S_noise z; sigma_hat is mapped back to a time t_hat by the SDE's
     `t_from_log_snr(-2 log sigma_hat)`;
  2. Euler: x' = x_hat + (sigma_{i+1} - sigma_hat) d,  d = eps_hat(x_hat, t_hat);
  3. Heun (all but the last step): x' = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2,
     d' = eps_hat(x', t_{i+1}).
NFE = 2 num_steps - 1 (+1 if denoise).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_bool, check_positive
from scoresde.samplers.base import Sampler, SamplingContext
from scoresde.samplers.toolkit import cached, check_grid, grid_key, make_grid
from scoresde.sdes import SDE


class EDMSampler(Sampler):
    """Karras et al. (2022) Heun sampler with S_churn/S_tmin/S_tmax/S_noise on any linear SDE.

    Args:
        sde: the forward SDE.
        num_steps: steps from T to eps; NFE = 2 num_steps - 1 (+1 with denoise).
        S_churn: total churn (0 = deterministic Heun on the probability-flow ODE).
        S_tmin, S_tmax: churn only where S_tmin <= sigma_edm <= S_tmax (EDM's noise levels,
            sigma_edm = sigma(t)/alpha(t)).
        S_noise: scale of the added noise (slightly > 1 offsets denoisers' over-smoothing).
        rho: the Karras grid's exponent (used by time_grid="karras").
        eps: the end time.
        time_grid: "karras" (default), "uniform", "quadratic", "logsnr" or a 1-D tensor.
        denoise: finish with a Tweedie step D(x, eps) (one more NFE).
    """

    def __init__(
        self,
        sde: SDE,
        num_steps: int = 18,
        S_churn: float = 0.0,
        S_tmin: float = 0.0,
        S_tmax: float = float("inf"),
        S_noise: float = 1.0,
        rho: float = 7.0,
        eps: float = 1e-3,
        time_grid: Any = "karras",
        denoise: bool = False,
    ) -> None:
        super().__init__(sde)
        self.num_steps, self.time_grid, self.eps = check_grid(sde, num_steps, time_grid, eps, 18)
        self.S_churn = check_positive("S_churn", S_churn, allow_zero=True)
        self.S_tmin = check_positive("S_tmin", S_tmin, allow_zero=True)
        if isinstance(S_tmax, (int, float)) and S_tmax == float("inf"):
            self.S_tmax = float("inf")
        else:
            self.S_tmax = check_positive("S_tmax", S_tmax)
        if self.S_tmax < self.S_tmin:
            raise ValueError(f"S_tmax must be >= S_tmin={self.S_tmin}, got {S_tmax!r}")
        self.S_noise = check_positive("S_noise", S_noise, allow_zero=True)
        self.rho = check_positive("rho", rho)
        self.denoise = check_bool("denoise", denoise)

    def _plan(self) -> tuple[list[tuple[float, ...]], float, float, float, float, list, dict]:
        """Per step (t_hat, alpha_hat, sigma_hat_t, sigma_hat_edm, churn std, t_next,
        alpha_next, sigma_next, sigma_next_edm), then the end's (t, alpha, sigma), the
        start's alpha, every time the score is evaluated at and the memo of
        `CountedScore.preload`."""
        sde = self.sde
        grid = make_grid(sde, self.num_steps, self.time_grid, self.eps, self.rho)
        n = grid.numel() - 1
        sig = torch.exp(-0.5 * sde.log_snr(grid))  # sigma_edm at the grid times
        gamma = min(self.S_churn / n, math.sqrt(2.0) - 1.0)
        in_range = (sig >= self.S_tmin) & (sig <= self.S_tmax)
        sig_hat = torch.where(in_range[:-1], sig[:-1] * (1.0 + gamma), sig[:-1])
        sig_hat = torch.minimum(sig_hat, sig[0])  # the model knows no sigma above sigma(T)
        t_hat = sde.t_from_log_snr(-2.0 * torch.log(sig_hat)).clamp(max=sde.T)
        # Where there is no churn, keep the grid's own time (no round trip through lambda).
        t_hat = torch.where(sig_hat > sig[:-1], t_hat, grid[:-1])
        churn = self.S_noise * torch.sqrt(torch.clamp(sig_hat**2 - sig[:-1] ** 2, min=0.0))
        cols = [
            t_hat,
            sde.alpha(t_hat),
            sde.sigma(t_hat),
            sig_hat,
            churn,
            grid[1:],
            sde.alpha(grid[1:]),
            sde.sigma(grid[1:]),
            sig[1:],
        ]
        plan = list(zip(*(c.tolist() for c in cols), strict=True))
        t_end = float(grid[-1])
        ends = (float(sde.alpha(grid[-1])), float(sde.sigma(grid[-1])), float(sde.alpha(grid[0])))
        times = [row[0] for row in plan] + [row[5] for row in plan]
        return plan, t_end, *ends, times, {}

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        key = (self.num_steps, grid_key(self.time_grid), self.eps, self.rho, self.S_churn)
        key += (self.S_tmin, self.S_tmax, self.S_noise)
        plan, t_end, a_end, s_end, a_start, times, preloaded = cached(self, key, self._plan)
        ctx.score.preload(times, x, preloaded)
        last = len(plan) - 1
        x = x * (1.0 / a_start)  # x_hat at the grid's first time (T unless a user grid)
        plain = ctx.callback is None  # no callback: the guard may look at x_hat directly
        for i in ctx.steps(len(plan)):
            t_h, a_h, s_h, sig_h, churn, t_n, a_n, s_n, sig_n = plan[i]
            if churn > 0.0:
                x = x.add(ctx.randn_like(x), alpha=churn)
            # d = (x_hat - D) / sigma_edm = -sigma_t score(alpha_t x_hat, t), so an Euler step
            # x + dsig d is one fused op on the score (dsig = sig_n - sig_h).
            dsig = sig_n - sig_h
            s1 = ctx.score(x * a_h, t_h)
            x_next = torch.add(x, s1, alpha=-dsig * s_h)
            if i < last:
                s2 = ctx.score(x_next * a_n, t_n)
                # Heun: x + dsig (d1 + d2) / 2 = Euler point + dsig s_h/2 s1 - dsig s_n/2 s2.
                x_next.add_(s1, alpha=0.5 * dsig * s_h).add_(s2, alpha=-0.5 * dsig * s_n)
            x = x_next
            if plain:  # finiteness does not depend on the scale a_n
                x = ctx.after_step(i, t_n, x)
            else:
                x = ctx.after_step(i, t_n, x * a_n) / a_n
        if self.denoise:
            # D(x_hat, sigma) = x_hat + sigma_t sigma_edm score(alpha x_hat, t) = x0_hat.
            score = ctx.score(x * a_end, t_end)
            return x.add(score, alpha=s_end * s_end / a_end)  # not in place: x was guarded
        return x * a_end
