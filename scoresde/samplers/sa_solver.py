"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of
Diffusion Models"): a stochastic Adams predictor-corrector in data prediction.

It samples the family of reverse SDEs that share the marginals p_t,

    dx = [f x - (1 + tau(t)^2)/2 g^2 s(x, t)] dt + tau(t) g dw_bar,

tau = 0 being the probability-flow ODE and tau = 1 the reverse SDE. Over a step from t to
s < t (h = lambda_s - lambda_t, lambda = log(alpha/sigma), tau constant on the step) the
linear part and the noise are integrated exactly and the data prediction x0 by the
polynomial through the last few evaluations:

    predictor  x_s = (sigma_s/sigma_t) e^{-tau^2 h} x_t + sum_j b_j x0_{t_j}
                     + sigma_s sqrt(1 - e^{-2 tau^2 h}) z                (Adams–Bashforth)
    corrector  the same with the interpolant through x0(x_s, s) too, and the same z
                                                                          (Adams–Moulton)

with b_j = alpha_s int_{-h}^0 (1 + tau^2) e^{(1+tau^2) u} L_j(u) du. The corrector's new
evaluation is the next predictor's, so a run costs one NFE per step (the paper's
"predictor-corrector without extra NFE", as UniPC). tau = 0 with corrector order
predictor_order + 1 is exactly `DPMSolverSampler`'s predictor-corrector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scoresde._typing import Tensor
from scoresde._validation import check_bool, check_choice, check_positive, check_positive_int
from scoresde.samplers._multistep import (
    MultistepPlan,
    make_plan,
    resolve_taus,
    run_plan,
    step_orders,
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

__all__ = ["SASolverSampler"]


def _check_order(name: str, value: Any, allowed: tuple[int, ...]) -> int:
    return check_choice(name, check_positive_int(name, value, minimum=0), allowed)


class SASolverSampler(Sampler):
    """SA-Solver: stochastic Adams predictor-corrector (data prediction) on any linear SDE.

    NFE = num_steps (+1 if denoise); the corrector costs no NFE; one Gaussian draw per
    step where tau > 0.

    Args:
        sde: the forward SDE.
        num_steps: steps from T to eps.
        predictor_order: 1-4 past data predictions in the predictor (the first steps warm up
            with fewer; the final steps are lowered as in `DPMSolverSampler`).
        corrector_order: 0 (no corrector) or 1-4 points (the new one included) in the
            corrector; the last step is never corrected (it would cost an NFE).
        tau: the noise level: None (default: the paper's and diffusers' choice, 1 for
            0.2 T <= t <= 0.8 T and 0 outside, i.e. noise in the middle of the trajectory
            and ODE steps at both ends), a number >= 0, or a function tau(t) -> float,
            evaluated once per step at the step's start time. 1 is the reverse SDE, 0 the
            probability-flow ODE.
        time_grid: "quadratic" (default), "logsnr", "uniform", "karras" or a 1-D tensor.
        eps: the end time.
        lower_order_final: lower the predictor order on the final steps (see
            `scoresde.samplers.dpm_solver.step_orders`).
        denoise: finish with a Tweedie step x0_hat(x, eps) (one more NFE).
    """

    def __init__(
        self,
        sde: SDE,
        num_steps: int = 20,
        predictor_order: int = 3,
        corrector_order: int = 4,
        tau: float | Callable[[float], float] | None = None,
        time_grid: Any = "quadratic",
        eps: float = 1e-3,
        lower_order_final: bool = True,
        denoise: bool = False,
    ) -> None:
        super().__init__(sde)
        self.num_steps, self.time_grid, self.eps = check_grid(sde, num_steps, time_grid, eps, 20)
        self.predictor_order = _check_order("predictor_order", predictor_order, (1, 2, 3, 4))
        self.corrector_order = _check_order("corrector_order", corrector_order, (0, 1, 2, 3, 4))
        if tau is None:
            self.tau: float | Callable[[float], float] | None = None
        elif callable(tau):
            self.tau = tau
        else:
            self.tau = check_positive("tau", tau, allow_zero=True)
        self.lower_order_final = check_bool("lower_order_final", lower_order_final)
        self.denoise = check_bool("denoise", denoise)

    def _middle_tau(self, t: float) -> float:
        T = self.sde.T
        return 1.0 if 0.2 * T <= t <= 0.8 * T else 0.0

    def _plan(self) -> tuple[Coefficients, MultistepPlan]:
        co = Coefficients(self.sde, make_grid(self.sde, self.num_steps, self.time_grid, self.eps))
        orders = step_orders(co.lam, self.predictor_order, self.lower_order_final)
        # The corrector never reaches further back than one past the predictor's points.
        corr = [min(self.corrector_order, k + 1) for k in orders]
        tau = self.tau if self.tau is not None else self._middle_tau
        return co, make_plan(co, orders, corr, resolve_taus(tau, co))

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        key = (self.num_steps, grid_key(self.time_grid), self.eps, self.predictor_order)
        key += (self.corrector_order, self.tau, self.lower_order_final)
        co, plan = cached(self, key, self._plan)
        x = run_plan(ctx, x, co, plan)
        if self.denoise:
            x = data_prediction(ctx, x, co.t[-1], co.alpha[-1], co.sigma[-1])
        return x
