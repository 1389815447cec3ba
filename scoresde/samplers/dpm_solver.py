"""DPM-Solver++ multistep (Lu et al. 2022b), with an optional UniPC-style corrector.

In lambda = log(alpha/sigma) (half the SDE's `log_snr`) the probability-flow ODE has the exact
solution (data prediction x0(lambda) = (x + sigma^2 score)/alpha)

    x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^lambda x0(lambda) dlambda
        = (sigma_s / sigma_t) x_t + alpha_s int_{-h}^{0} e^u x0(lambda_s + u) du,
    h = lambda_s - lambda_t.

A k-th order multistep step replaces x0(lambda) by the polynomial through the last k data
predictions (at lambda_t, lambda_{t-1}, ...) and integrates it exactly, so

    x_s = (sigma_s / sigma_t) x_t + sum_j w_j x0_j,   w_j = alpha_s int_{-h}^0 e^u L_j(u) du

with L_j the Lagrange basis. k = 1 is DDIM / DPM-Solver++1: w = alpha_s (1 - e^{-h});
k = 2 is DPM-Solver++(2M) in its Taylor form, w = -alpha_s phi_1 m_0 + alpha_s phi_2 (m_0 - m_1)/r;
k = 3 is DPM-Solver++(3M). The weights depend only on the grid: they are computed once per
run (Gauss-Legendre quadrature, exact to round-off for these smooth integrands).

The corrector (Zhao et al. 2023, UniPC's idea; `corrector=True`) costs no NFE: after the
predictor reaches x_s, the data prediction at x_s that the next step needs anyway is
evaluated, and x_s is recomputed from x_t with the interpolant through that new value too
(order k + 1). The last step is not corrected (it would need one more evaluation).

`stochastic=True` is SDE-DPM-Solver++ (Lu et al. 2022b, Sec. 5; diffusers'
"sde-dpmsolver++", k-diffusion's dpmpp_2m_sde / dpmpp_3m_sde): the same multistep
interpolation of x0, integrated against the reverse SDE's kernel instead of the ODE's,

    x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s int_{-h}^0 2 e^{2u} x0(lambda_s + u) du
          + sigma_s sqrt(1 - e^{-2h}) z,

so k = 1 is DDPM's ancestral step (DDIM with eta = 1). `tau` lowers the noise: the same
multistep step on the reverse SDE with noise level tau (whose marginals are the same for every
tau; tau = 1 is the above, tau = 0 the ODE; k-diffusion's `eta` is tau^2). The engine is
`scoresde.samplers._multistep`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_bool, check_choice, check_positive, check_positive_int
from scoresde.samplers._multistep import (
    MultistepPlan,
    exp_integral_weights,
    make_plan,
    resolve_taus,
    run_plan,
    step_orders,
    time_variable,
)
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

# The default grid of the stochastic variant under VP: t_i = (T^(1/rho) + i/n (eps^(1/rho) -
# T^(1/rho)))^rho (Karras et al.'s rho schedule, in t).
STOCHASTIC_RHO = 4.0


def noise_exponent(sde: SDE) -> float:
    """q in sigma^2/alpha^2 ~ t^q as t -> 0 (VP with beta_min > 0 and the cosine schedule: 1;
    sub-VP: 2; VE: 0), from the log-SNR at t = 1e-6 and 2e-6."""
    lam = sde.log_snr(torch.tensor([1e-6, 2e-6], dtype=torch.float64))
    return float(lam[0] - lam[1]) / math.log(2.0)


def stochastic_grid(sde: SDE, num_steps: int, eps: float) -> Tensor:
    """The default grid of `DPMSolverSampler(..., stochastic=True)` `[num_steps + 1]`.

    - Noise variance linear in t at the data end (sigma^2/alpha^2 ~ c t: VP, cosine; see
      `noise_exponent`): the rho = 4 grid in t, t_i = (T^(1/4) + i/n (eps^(1/4) - T^(1/4)))^4.
    - Other SDEs that scale the data (alpha(T) < 1: sub-VP): the cubic grid
      t_i = eps + (T - eps)(1 - i/n)^3.
    - Variance-exploding SDEs: the quadratic grid.

    Why. With tau = 1 the multistep extrapolation of the data prediction also extrapolates
    the fresh noise of the past steps, which spreads the samples; the excess falls fast with
    the step h in lambda (for Gaussian data N(0, v) the output variance is a closed-form
    recursion in the plan's weights: with 3M + corrector the excess NLL per dimension at
    v = 0.01 is .041, .0035, .0012 at 20, 40, 80 cubic steps) and is made where sigma is
    of the order of the data's component scales. The quadratic grid's last steps are its
    longest in lambda (h ~ .6-.8 at 20 steps) and the 2-D benchmark came out +.22 nats too
    spread. The cubic grid (the default before) shortens them, but it is a power in
    t - eps: its last step is nearly empty (h = .06 at 20 steps) after steps of h ~ .5.
    Under VP lambda ~ -log(beta_min t)/2 near the data end, so the rho grid in t itself is
    ~uniform in sqrt(sigma) there: lambda-steps that vary slowly (adjacent ratios <= 1.4),
    h <= .47 to the end at 20 steps and h ~ .29 where sigma ~ 0.1-0.5, while t still covers
    the high-noise end evenly (the mode weights are set there: grids uniform in log t or
    log sigma, which skip it, doubled the mode-weight error on the 16-D mixture).

    Measured at 20 NFE under VP (3M + corrector, NLL gap = mean NLL - entropy, mean +- s.e.
    over seeds of 10,000 samples in 2-D / 3,000 beyond): 2-D benchmark .045 +- .004 (cubic)
    -> .027 +- .002 (rho = 4, 10 fresh seeds; rho = 3 / 3.5 / 5: .023 / .025 / .057 with
    worse 16-D or 2-D-ring figures; 2M + corrector .080, 2M .111, 3M without corrector
    .028); at 15 NFE .195 -> .042, at 30 the same (.014). Held out (targets made after the
    choice): two other 2-D mixtures .063 -> .028 and .060 -> .042, 32-D anisotropic mixtures
    .74 -> .31 and .77 -> .40, a 16-D one .54 -> .29. Under sub-VP, whose
    lambda ~ -log(beta_min t) makes the same t-grid's steps twice as long, the rho grid
    gave .10 against the cubic grid's .005, so sub-VP keeps the cubic grid; under the cosine
    schedule (held out) the two grids measured alike (2-D: .017 / .014 and .010 / .012;
    32-D: .07 / .15). VE's quadratic grid is already dense at the data end in lambda (its
    lambda is linear in t), and cubic is worse there.
    """
    alpha_T = float(sde.alpha(torch.tensor([sde.T], dtype=torch.float64)))
    if alpha_T >= 1.0:
        return make_grid(sde, num_steps, "quadratic", eps)
    frac = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if abs(noise_exponent(sde) - 1.0) < 0.25:
        a, b = sde.T ** (1.0 / STOCHASTIC_RHO), eps ** (1.0 / STOCHASTIC_RHO)
        grid = (a + frac * (b - a)) ** STOCHASTIC_RHO
        grid[0], grid[-1] = sde.T, eps  # exact end points despite round-off
        return grid
    return eps + (sde.T - eps) * (1.0 - frac) ** 3


class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep (data prediction, orders 1-3) on any linear SDE.

    NFE = num_steps (+1 if denoise); the corrector costs no NFE.

    Args:
        sde: the forward SDE.
        num_steps: steps from T to eps.
        order: 1 (DDIM), 2 (2M) or 3 (3M); the first steps warm up with lower orders.
        time_grid: "quadratic", "logsnr" (Lu et al.'s), "uniform", "karras" or a 1-D tensor.
            None (default): "quadratic" (the lowest pathwise errors on the 2-D benchmark at
            5-50 NFE for every order); with `stochastic=True` the rho = 4 grid in t,
            t_i = (T^(1/4) + i/n (eps^(1/4) - T^(1/4)))^4, under VP and cosine, the cubic
            grid t_i = eps + (T - eps)(1 - i/n)^3 under sub-VP and the quadratic one under
            VE (see `stochastic_grid`: 2-D benchmark at 20 NFE .027 nats).
        eps: the end time.
        lower_order_final: lower the order on the final steps when num_steps < 15 or where a
            step is over twice as long in lambda as the previous one (see `step_orders`).
        corrector: UniPC-style corrector of order+1 reusing the next evaluation (no NFE).
        denoise: finish with a Tweedie step x0_hat(x, eps) (one more NFE; "denoise to zero").
        stochastic: SDE-DPM-Solver++ (order 1-3 "M" variants; one Gaussian draw per step)
            instead of the probability-flow ODE. `corrector` then re-does each step with the
            same noise (the SA-Solver corrector with tau = 1).
        interpolation: the variable in which the past data predictions are interpolated
            (and the interpolant integrated exactly against e^lambda): "lambda" (default;
            DPM-Solver++) or "t" (the SDE's time, DEIS's "tAB" in the data prediction; the
            same as "lambda" for VE, whose lambda is affine in t). Opt-in: at <= 10 steps
            under VP most paths get much closer to the exact ODE solution (up to 3x lower
            RMS error), but not the RMS on every held-out target, and at 20 steps it can be
            worse (docs/benchmarks.md, "Tuning DPM-Solver++ at 10 NFE").
        tau: the noise level of the stochastic variant, a number >= 0 (None: 1 with
            `stochastic=True`, SDE-DPM-Solver++ as in Lu et al.; 0, the only value allowed,
            without). `sampler.tau` holds the level in effect. Less noise is
            more accurate in few steps: at tau = 1 the multistep extrapolation of the data
            prediction carries the fresh noise of past steps into the next (2-D benchmark at
            20 NFE, default grid: NLL gap .027 at tau = 1, .019 at tau = 0.7; see
            docs/benchmarks.md). k-diffusion's `eta` is tau^2.
    """

    def __init__(
        self,
        sde: SDE,
        num_steps: int = 20,
        order: int = 3,
        time_grid: Any = None,
        eps: float = 1e-3,
        lower_order_final: bool = True,
        corrector: bool = True,
        denoise: bool = False,
        stochastic: bool = False,
        interpolation: str = "lambda",
        tau: float | None = None,
    ) -> None:
        super().__init__(sde)
        kind = "quadratic" if time_grid is None else time_grid
        self.num_steps, kind, self.eps = check_grid(sde, num_steps, kind, eps, 20)
        # None stays None only for the stochastic variant, whose default is `stochastic_grid`.
        self.time_grid = None if time_grid is None and stochastic is True else kind
        check_positive_int("order", order)
        self.order = check_choice("order", order, (1, 2, 3))
        self.lower_order_final = check_bool("lower_order_final", lower_order_final)
        self.corrector = check_bool("corrector", corrector)
        self.denoise = check_bool("denoise", denoise)
        self.stochastic = check_bool("stochastic", stochastic)
        self.interpolation = check_choice("interpolation", interpolation, ("lambda", "t"))
        # self.tau is the noise level in effect: 0 for the ODE, 1 (or the given one) for SDE.
        if tau is None:
            self.tau = 1.0 if self.stochastic else 0.0
        else:
            self.tau = check_positive("tau", tau, allow_zero=True)
            if not self.stochastic and self.tau != 0.0:
                raise ValueError(
                    f"tau={tau!r} is the noise level of stochastic=True; got stochastic=False"
                )

    def _grid(self) -> Any:
        if self.time_grid is None:
            return stochastic_grid(self.sde, self.num_steps, self.eps)
        return make_grid(self.sde, self.num_steps, self.time_grid, self.eps)

    def _plan(self) -> tuple[Coefficients, MultistepPlan]:
        co = Coefficients(self.sde, self._grid())
        orders = step_orders(co.lam, self.order, self.lower_order_final)
        corr = [k + 1 for k in orders] if self.corrector else [0] * len(orders)
        taus = resolve_taus(self.tau, co)
        var = time_variable(self.sde) if self.interpolation == "t" else None
        return co, make_plan(co, orders, corr, taus, var)

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        grid = None if self.time_grid is None else grid_key(self.time_grid)
        key = (self.num_steps, grid, self.eps, self.order)
        key += (self.lower_order_final, self.corrector, self.stochastic, self.interpolation)
        key += (self.tau,)
        co, plan = cached(self, key, self._plan)
        x = run_plan(ctx, x, co, plan)
        if self.denoise:
            x = data_prediction(ctx, x, co.t[-1], co.alpha[-1], co.sigma[-1])
        return x


__all__ = [
    "DPMSolverSampler",
    "exp_integral_weights",
    "noise_exponent",
    "step_orders",
    "stochastic_grid",
]
