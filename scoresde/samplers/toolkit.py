"""The solver toolkit: what scoresde's samplers are built from, for writing your own.

A sampler is a `Sampler` subclass with one method, `_sample(ctx, x)`, that integrates x from
t = T (a prior draw or the user's x_init, `[B, *D]`) to the data end and returns the samples;
the base class does validation, the prior draw, noise, NFE counting, progress bars, the
user's callback and NaN/Inf detection. Inside `_sample`:

- `ctx.score(x, t)`: the score (t a float or `[B]`; one call = one NFE, shape checked;
  the result never shares memory with x, so it and a stage buffer passed as x may be
  updated in place); float times become cached `[B]` tensors, `ctx.score.preload(times, x)`
  makes a whole grid's at once;
- `ctx.randn_like(x)`: noise from the user's generator (or per-sample streams);
- `ctx.steps(n)`: range(n) with a progress bar;
- `ctx.after_step(i, t, x)`: the NaN/Inf check (`NonFiniteError` with step and time) and
  the user's callback (which may return a replacement x); call it after every step.

The pieces below turn a step count and a grid kind into times and per-step coefficients:
`check_grid` (validate num_steps, time_grid, eps in `__init__`), `make_grid` (the decreasing
float64 grid T -> eps), `Coefficients` (alpha, sigma, lambda = log(alpha / sigma), t on the
grid as Python floats), `data_prediction` / `noise_prediction` (Tweedie's x0_hat and
eps_hat from the score) and `pf_coefficients` (f and g^2 / 2 of the probability-flow ODE).
See "Writing your own solver" in docs/solvers.md for a complete example.

Every SDE here has the Gaussian kernel x_t = alpha_t x0 + sigma_t eps, so a score s(x, t)
gives the data and noise predictions (Tweedie)

    x0_hat = (x + sigma_t^2 s) / alpha_t,        eps_hat = -sigma_t s,

and the fast samplers (DDIM, DPM-Solver++, EDM) are written in (alpha, sigma, lambda) with
lambda = log(alpha / sigma) (half the SDE's `log_snr`), so they apply to VP, sub-VP, VE and
cosine VP alike.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import (
    NonFiniteError,
    check_eps,
    check_positive_int,
    unchecked_times,
)
from scoresde.flow import pf_coefficients
from scoresde.samplers.base import Sampler, SamplingContext
from scoresde.samplers.grids import GRIDS, time_grid
from scoresde.sdes import SDE

__all__ = [
    "Sampler",
    "SamplingContext",
    "NonFiniteError",
    "GRIDS",
    "time_grid",
    "check_grid",
    "make_grid",
    "Coefficients",
    "data_prediction",
    "noise_prediction",
    "pf_coefficients",
    "grid_key",
    "cached",
]


def check_grid(
    sde: SDE, num_steps: Any, kind: Any, eps: Any, default_steps: int | None = None
) -> tuple[int, Any, float]:
    """Validate (num_steps, time_grid, eps) once in a sampler's __init__; returns them
    (num_steps is the length of a user grid tensor minus one). Given the sampler's default
    `default_steps`, a num_steps that is neither it nor the grid tensor's step count is a
    ValueError instead of being silently replaced by the tensor's."""
    num_steps = check_positive_int("num_steps", num_steps)
    eps = check_eps(eps, sde)
    if isinstance(kind, str) and kind not in GRIDS:
        raise ValueError(f"time_grid must be one of {GRIDS} or a 1-D tensor, got {kind!r}")
    if not isinstance(kind, str):
        # A user grid: validated by time_grid; its length fixes the step count.
        steps = time_grid(sde, num_steps, kind, eps=eps).numel() - 1
        if default_steps is not None and num_steps not in (steps, default_steps):
            raise ValueError(
                f"num_steps={num_steps} disagrees with the time_grid tensor, which has {steps} "
                f"steps ({steps + 1} times); leave num_steps out or pass num_steps={steps}"
            )
        num_steps = steps
    return num_steps, kind, eps


class Coefficients:
    """alpha, sigma, lambda = log(alpha/sigma) and t on a grid, as Python float lists.

    Computed once per run in float64 on the CPU, so the loop only multiplies tensors by floats.
    """

    def __init__(self, sde: SDE, grid: Tensor) -> None:
        g = grid.detach().to(device="cpu", dtype=torch.float64)
        self.t: list[float] = g.tolist()
        with unchecked_times():  # a grid from t_from_log_snr may round past [0, T]
            self.alpha: list[float] = sde.alpha(g).tolist()
            self.sigma: list[float] = sde.sigma(g).tolist()
        # log_snr is implemented with expm1/softplus: more accurate than log(alpha/sigma).
        self.lam: list[float] = (0.5 * sde.log_snr(g)).tolist()


def make_grid(sde: SDE, num_steps: int, kind: Any, eps: float, rho: float = 7.0) -> Tensor:
    """The decreasing float64 grid `[num_steps + 1]` (CPU) from T to eps."""
    return time_grid(sde, num_steps, kind, eps=eps, rho=rho)


def data_prediction(
    ctx: SamplingContext, x: Tensor, t: float, alpha: float, sigma: float
) -> Tensor:
    """x0_hat = (x + sigma^2 s(x, t)) / alpha  `[B, *D]` (one NFE)."""
    score = ctx.score(x, t)
    return torch.add(x, score, alpha=sigma * sigma).mul_(1.0 / alpha)


def noise_prediction(ctx: SamplingContext, x: Tensor, t: float, sigma: float) -> Tensor:
    """eps_hat = -sigma s(x, t)  `[B, *D]` (one NFE)."""
    return ctx.score(x, t).mul_(-sigma)


def grid_key(kind: Any) -> Any:
    """A hashable stand-in for a `time_grid` argument (a name, or a user grid's values)."""
    if isinstance(kind, str):
        return kind
    return tuple(torch.as_tensor(kind, dtype=torch.float64).flatten().tolist())


_PLANS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_MAX_PLANS = 32


def _sde_key(sde: SDE) -> tuple[Any, ...]:
    """The SDE's class and scalar settings: a built-in SDE's tensors derive from them. A
    user's SDE (no `name`) may hold other state (e.g. a tabulated schedule), so its plans are
    also keyed by the object itself."""
    scalars = sorted((k, v) for k, v in vars(sde).items() if isinstance(v, (bool, int, float, str)))
    if getattr(sde, "name", None) is None:
        return (type(sde), id(sde), *scalars)
    return (type(sde), *scalars)


def cached(owner: Any, key: tuple[Any, ...], build: Any) -> Any:
    """`build()` memoised under (the sampler's class, its SDE's settings, `key`).

    A sampler's per-grid coefficients depend only on its settings and its SDE, not on the
    batch: computing them once per process (not at every `sample` call, nor for every new
    sampler object with the same settings) keeps the setup out of the per-step cost of
    repeated sampling. `key` must name every setting `build` uses; the 32 most recently used
    plans are kept.
    """
    full_key = (type(owner), _sde_key(owner.sde), *key)
    entry = _PLANS.get(full_key)
    # (a user SDE's id may be reused by a new object once it is freed: check it is the same)
    if entry is None or (entry[1] is not None and entry[1]() is not owner.sde):
        owner_ref = None if getattr(owner.sde, "name", None) else weakref.ref(owner.sde)
        entry = _PLANS[full_key] = (build(), owner_ref)
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(full_key)
    return entry[0]
