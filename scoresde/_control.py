"""The one adaptive step-size controller of scoresde's own solvers (private).

In the spirit of diffrax, a solve is three separate things: the *term* (the field, e.g.
`scoresde.flow.ProbabilityFlow`), the *solver step* (an embedded pair that returns a
proposal and its local error: Dormand-Prince 5(4) in `scoresde._ode`, the Euler-Maruyama /
improved-Euler pair in `scoresde.samplers.adaptive`), and the *controller* here, which
decides, per sample:

- the error norm E of the local error err, scaled by sc = atol + rtol max(|y|, |y_new|)
  (`scale="sum"`, Hairer's) or sc = max(atol, rtol max(|y|, |y_new|)) (`scale="max"`,
  Jolicoeur-Martineau et al.'s), E = RMS of err / sc over the sample;
- accept iff E <= 1;
- the next step h_new = h clamp(safety E^(-alpha) E_prev^beta, min_factor, max_factor),
  capped at h_max; a rejected step uses the plain I-controller exponent 1/order, and
  `no_growth_after_reject` forbids growth right after a rejection (Hairer's PI controller,
  "Lund stabilization"; beta = 0 is the classic I controller); `min_factor_accept` raises
  the lower bound after an accepted step (1: a step that met the tolerance never shrinks
  the next one, torchdiffeq's rule);
- the step limit (`max_steps`, RuntimeError beyond) and the NaN/Inf report: a non-finite
  E is either a rejection (the step shrinks; `on_nonfinite="reject"`) or an immediate
  `NonFiniteError` naming the time (`on_nonfinite="raise"`).

All per-sample arithmetic stays on the device; no host sync happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import NonFiniteError

__all__ = ["StepController", "ControllerState"]

_HUGE = 1e10  # stands in for a non-finite error norm
_LOG_ERR_MIN = math.log(1e-4)  # floor of log E_prev (Hairer's facold)


@dataclass
class ControllerState:
    """Per-sample memory of the controller: log E of the last accepted step (floored at
    1e-4) and 1.0 where the last step was rejected (`[B]`, the solver's dtype)."""

    log_err_prev: Tensor
    rejected: Tensor

    def select(self, keep: Tensor) -> ControllerState:
        """The rows `keep` (when samples leave the active set)."""
        return ControllerState(
            self.log_err_prev.index_select(0, keep), self.rejected.index_select(0, keep)
        )


@dataclass
class StepController:
    """Per-sample accept/reject and step-size control (see the module docstring).

    Attributes:
        rtol, atol: tolerances (> 0).
        order: q + 1 for an embedded pair of orders (q, q + 1): the I exponent is 1/order.
        beta: the PI controller's E_prev exponent (0: I controller).
        alpha: the E exponent on accepted steps (default 1/order - 0.75 beta).
        alpha_reject: the E exponent on rejected steps (default 1/order).
        safety, min_factor, max_factor: factor = clamp(safety E^-alpha E_prev^beta, min, max).
        min_factor_accept: the lower bound of the factor after an accepted step (None:
            min_factor; torchdiffeq's adaptive solvers use 1).
        no_growth_after_reject: cap the factor at 1 right after a rejection.
        h_max: the largest step magnitude.
        max_steps: the most iterations of the loop (RuntimeError beyond).
        scale: "sum" (atol + rtol max|y|) or "max" (max(atol, rtol max|y|)).
        on_nonfinite: "reject" (shrink the step) or "raise" (NonFiniteError).
        name: the solver's name in error messages.
        limit_name: the user's name for max_steps (e.g. "max_iters"), in error messages.
    """

    rtol: float
    atol: float
    order: float
    beta: float = 0.0
    alpha: float | None = None
    alpha_reject: float | None = None
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    min_factor_accept: float | None = None
    no_growth_after_reject: bool = True
    h_max: float = math.inf
    max_steps: int = 10_000
    scale: str = "sum"
    on_nonfinite: str = "reject"
    name: str = "solver"
    limit_name: str = "max_steps"

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = 1.0 / self.order - 0.75 * self.beta
        if self.alpha_reject is None:
            self.alpha_reject = 1.0 / self.order

    # --- error norm ---------------------------------------------------------------------------
    def error_norm(
        self, err: Tensor, y: Tensor, y_new: Tensor, ones: Tensor | None = None, norm: Any = None
    ) -> Tensor:
        """E `[B]` of err `[B, N]` (consumed: divided in place) against y, y_new `[B, N]`.

        The RMS sums squares with a mat-vec against `ones` `[N]` when given (on CPU a sum
        over a short last dimension is ~10x slower); `norm` maps the scaled error to `[B]`
        instead when given; the default is the RMS by `vector_norm`.
        """
        big = torch.maximum(y.abs(), y_new.abs())
        if self.scale == "sum":
            ratio = err.div_(big.mul_(self.rtol).add_(self.atol))
        else:
            ratio = err.div_(big.mul_(self.rtol).clamp_(min=self.atol))
        if norm is not None:
            return norm(ratio)
        if ones is not None:
            return torch.mv(ratio.square_(), ones).div_(ones.shape[0]).sqrt_()
        return torch.linalg.vector_norm(ratio, dim=1).mul_(ratio.shape[1] ** -0.5)

    # --- accept / reject and the next step -------------------------------------------------
    def init_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> ControllerState:
        return ControllerState(
            torch.full((batch,), _LOG_ERR_MIN, dtype=dtype, device=device),
            torch.zeros(batch, dtype=dtype, device=device),
        )

    def decide(
        self, E: Tensor, h: Tensor, state: ControllerState, t: Tensor | None = None
    ) -> tuple[Tensor, Tensor, ControllerState]:
        """(accept `[B]` bool, next step `[B]` (signed like h), new state) from E `[B]`.

        A non-finite E is a rejection (shrinking by min_factor) or, with
        `on_nonfinite="raise"`, a NonFiniteError naming the time t of the sample.
        """
        if self.on_nonfinite == "raise":
            self.raise_if_nonfinite(E, t)
        # A NaN/inf error counts as huge: the step is rejected and shrinks.
        E = torch.nan_to_num(E, nan=_HUGE, posinf=_HUGE).clamp_(min=1e-10)
        accept = E <= 1.0
        acc_f = accept.to(state.log_err_prev.dtype)
        if self._plain_i():
            # The classic I controller with no factor bounds, computed directly.
            h_new = (self.safety * h) * E.pow(-self.alpha)
            if math.isfinite(self.h_max):
                h_new = h_new.clamp(-self.h_max, self.h_max)
            return accept, h_new, ControllerState(state.log_err_prev, 1.0 - acc_f)
        # Step factor, in logs: PI safety E^(-alpha) E_prev^beta on accepted steps, I
        # safety E^(-alpha_reject) on rejected ones, clamped.
        log_E = E.log()
        expo = acc_f * (self.alpha - self.alpha_reject) + self.alpha_reject
        log_factor = (acc_f * state.log_err_prev).mul_(self.beta).sub_(expo * log_E)
        factor = log_factor.exp_().mul_(self.safety).clamp_(self.min_factor, self.max_factor)
        if self.min_factor_accept is not None:
            floor = acc_f * (self.min_factor_accept - self.min_factor) + self.min_factor
            factor = torch.maximum(factor, floor)
        if self.no_growth_after_reject:
            factor = torch.minimum(
                factor, self.max_factor + (1.0 - self.max_factor) * state.rejected
            )
        h_new = h * factor
        if math.isfinite(self.h_max):
            h_new = h_new.clamp(-self.h_max, self.h_max)
        log_prev = torch.lerp(state.log_err_prev, log_E.clamp(min=_LOG_ERR_MIN), acc_f)
        return accept, h_new, ControllerState(log_prev, 1.0 - acc_f)

    def _plain_i(self) -> bool:
        return (
            self.beta == 0.0
            and self.alpha == self.alpha_reject
            and self.min_factor == 0.0
            and self.max_factor == math.inf
            and not self.no_growth_after_reject
        )

    # --- guards ----------------------------------------------------------------------------------
    def check_steps(self, iterations: int, active: int, target: str) -> None:
        """RuntimeError once `iterations` reaches max_steps with samples still active."""
        if iterations >= self.max_steps:
            raise RuntimeError(
                f"{self.name}: {active} sample(s) did not reach {target} within "
                f"{self.limit_name}={self.max_steps} steps (rtol={self.rtol}, atol={self.atol}); "
                f"raise {self.limit_name} or loosen the tolerances"
            )

    def raise_if_nonfinite(self, E: Tensor, t: Tensor | None) -> None:
        """NonFiniteError naming the time of the first sample with a non-finite error (one
        host sync)."""
        if bool(torch.isfinite(E).all()):
            return
        i = int((~torch.isfinite(E)).nonzero()[0, 0])
        when = f" at t = {float(t[i]):.6g}" if t is not None else ""
        raise NonFiniteError(
            f"{self.name}: non-finite values (NaN/Inf) in the step{when}; check the score function"
        )
