"""DDIM (Song, Meng & Ermon 2021) for any linear SDE x_t = alpha_t x0 + sigma_t eps.

One step from t to s < t with the predictions x0_hat = (x + sigma_t^2 score) / alpha_t and
eps_hat = -sigma_t score (one NFE):

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,     z ~ N(0, I),
    c   = eta * sigma_s * sqrt(1 - exp(2 (lambda_t - lambda_s))),   lambda = log(alpha/sigma).

Why this c: the forward transition s -> t is N((alpha_t/alpha_s) x_s,
sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2), so the posterior q(x_s | x_t, x0) has variance
sigma_s^2 (1 - (alpha_t sigma_s / (alpha_s sigma_t))^2) = sigma_s^2 (1 - e^{2(lambda_t-lambda_s)});
eta = 1 is therefore the ancestral (DDPM posterior, beta_tilde for VP on DDPM's grid) step,
and eta = 0 the deterministic step

    x_s = (sigma_s / sigma_t) x + alpha_s (1 - e^{-(lambda_s - lambda_t)}) x0_hat,

the first-order exponential integrator of the probability-flow ODE (DPM-Solver(++)-1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_bool, check_positive
from scoresde.samplers.base import Sampler, SamplingContext
from scoresde.samplers.toolkit import (
    Coefficients,
    cached,
    check_grid,
    data_prediction,
    grid_key,
    make_grid,
)
from scoresde.sdes import SDE


def ddim_coefficients(co: Coefficients, eta: float) -> list[tuple[float, float, float]]:
    """Per step i (t_i -> t_{i+1}): (a, b, c) with x_{i+1} = a x + b x0_hat + c z.

    From x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z and
    eps_hat = (x - alpha_t x0) / sigma_t:  a = sqrt(sigma_s^2 - c^2) / sigma_t,
    b = alpha_s - a alpha_t.
    """
    out = []
    for i in range(len(co.t) - 1):
        a_t, s_t, lam_t = co.alpha[i], co.sigma[i], co.lam[i]
        a_s, s_s, lam_s = co.alpha[i + 1], co.sigma[i + 1], co.lam[i + 1]
        # 1 - e^{2(lam_t - lam_s)} via expm1: accurate for small steps.
        c = eta * s_s * math.sqrt(-math.expm1(2.0 * (lam_t - lam_s)))
        a = math.sqrt(max(s_s * s_s - c * c, 0.0)) / s_t
        if eta == 0.0:
            # sigma_s / sigma_t and alpha_s (1 - e^{-h}) exactly as in DPM-Solver-1.
            a = s_s / s_t
            b = -a_s * math.expm1(-(lam_s - lam_t))
        else:
            b = a_s - a * a_t
        out.append((a, b, c))
    return out


class DDIMSampler(Sampler):
    """DDIM on any linear SDE (VP, sub-VP, VE, cosine VP); NFE = num_steps (+1 if denoise).

    Args:
        sde: the forward SDE.
        num_steps: number of steps from T to eps.
        eta: 0 = deterministic DDIM (the probability-flow ODE's first-order exponential
            integrator); 1 = ancestral sampling with the posterior variance; in between
            interpolates the noise level (Song et al. 2021, eq. 16).
        time_grid: "uniform", "quadratic", "karras", "logsnr" or a decreasing 1-D tensor
            of times from <= T to eps (see `scoresde.samplers.grids.time_grid`).
        eps: the end time.
        denoise: finish with one Tweedie step x0_hat(x, eps) (one more NFE).
    """

    def __init__(
        self,
        sde: SDE,
        num_steps: int = 50,
        eta: float = 0.0,
        time_grid: Any = "quadratic",
        eps: float = 1e-3,
        denoise: bool = False,
    ) -> None:
        super().__init__(sde)
        self.num_steps, self.time_grid, self.eps = check_grid(sde, num_steps, time_grid, eps, 50)
        self.eta = check_positive("eta", eta, allow_zero=True)
        if self.eta > 1.0:
            # c <= sigma_s needs eta <= 1 (eta = 1 is already the full posterior variance).
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        self.denoise = check_bool("denoise", denoise)

    def _plan(self) -> tuple[Coefficients, list[tuple[float, float, float]], list, dict]:
        co = Coefficients(self.sde, make_grid(self.sde, self.num_steps, self.time_grid, self.eps))
        steps = ddim_coefficients(co, self.eta)
        fused = []
        for i, (a, b, _) in enumerate(steps):
            k = a + b / co.alpha[i]
            fused.append((k, b * co.sigma[i] ** 2 / (co.alpha[i] * k)))
        return co, steps, fused, {}  # {}: the memo of CountedScore.preload

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        key = (self.num_steps, grid_key(self.time_grid), self.eps, self.eta)
        co, steps, fused, preloaded = cached(self, key, self._plan)
        ctx.score.preload(co.t, x, preloaded)
        for i in ctx.steps(len(steps)):
            a, b, c = steps[i]
            # a x + (b / alpha_t) (x + sigma_t^2 s) = k (x + (b sigma_t^2 / (alpha_t k)) s),
            # k = a + b / alpha_t > 0: two fused ops, none on the score's own tensor.
            k, ks = fused[i]
            x = torch.add(x, ctx.score(x, co.t[i]), alpha=ks).mul_(k)
            if c > 0.0:
                x.add_(ctx.randn_like(x), alpha=c)
            x = ctx.after_step(i, co.t[i + 1], x)
        if self.denoise:
            x = data_prediction(ctx, x, co.t[-1], co.alpha[-1], co.sigma[-1])
        return x
