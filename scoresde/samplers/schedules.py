"""Time grids tuned for one model: "Align Your Steps"-style schedule optimisation (opt-in).

A few-step ODE sampler's error depends strongly on where its steps fall (Watson et al. 2021,
"Learning fast samplers"; Sabour et al. 2024, "Align Your Steps"). For a given model,
`optimize_time_grid` picks the interior times t_1 > ... > t_{n-1} of a grid
T = t_0 > ... > t_n = eps that minimise the pathwise error of a deterministic sampler

    E(grid) = sqrt( mean_b || S_grid(x_T^b) - x_ref^b ||^2 ),

where x_T^b are pilot prior draws, S_grid is `sampler_factory(grid).sample(score_fn,
x_init=x_T)` and x_ref^b is a tight dopri5 solve of the probability-flow ODE
dx/dt = f(t) x - g(t)^2 s(x, t) / 2 from the same x_T^b down to the same end time eps.

Parameterisation (monotone by construction, end points fixed): in the log-SNR
lambda = sde.log_snr(t) (increasing from lambda(T) to lambda(eps)), the grid's increments are

    Delta lambda_i = (lambda(eps) - lambda(T)) softmax(z)_i,   z = log Delta lambda^init + B c,

so c = 0 is the initial grid and every c gives a strictly increasing lambda, i.e. a strictly
decreasing t. With n <= `max_params` steps B is the identity (one free log-increment per
step); with more steps B interpolates K = `max_params` knot values linearly over the step
index, a smooth multiplicative correction of the initial spacing with a bounded number of
parameters. c_0 is held at 0 (softmax is shift invariant), leaving n - 1 or K - 1 free
parameters, which scipy's Nelder–Mead minimises (derivative free: the sampler may be any
black box, e.g. one running under `torch.no_grad`, with a network score).

The pilots come from their own generator (seed 1234 by default), so a grid can be evaluated
honestly on other draws: `pathwise_error(sampler_factory(grid), score_fn, x_T, x_ref)` with
`x_ref = pf_ode_reference(sde, score_fn, x_T, eps)`. Do check: on the 2-D benchmark mixture
(benchmarks/results/schedules.md) a tuned grid cut DPM-Solver++(3M) + corrector's held-out
error 2-6x at 5-50 NFE, but the per-sample errors are heavy tailed (draws near a boundary
between modes dominate the RMS), so too few pilots overfit, and a grid is specific to its
model: the 2-D mixture's grid made a 16-D mixture's error 1.5-13x worse than "quadratic".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    check_data,
    check_device,
    check_eps,
    check_positive,
    check_positive_int,
    check_shape,
)
from scoresde.flow import ProbabilityFlow, solve
from scoresde.samplers.base import NonFiniteError, Sampler
from scoresde.samplers.grids import GRIDS, time_grid
from scoresde.sdes import SDE

SamplerFactory = Callable[[Tensor], Sampler]

__all__ = [
    "optimize_time_grid",
    "pf_ode_reference",
    "pathwise_error",
    "save_grids",
    "load_grids",
]

PILOT_SEED = 1234  # the default pilots' seed: keep it apart from evaluation seeds
_PENALTY = 1e6  # objective value of a grid on which the sampler fails (NaN/Inf, bad grid)


def pf_ode_reference(
    sde: SDE,
    score_fn: ScoreFn,
    x_T: Tensor,
    eps: float = 1e-3,
    *,
    rtol: float = 1e-7,
    atol: float | None = None,
) -> Tensor:
    """The probability-flow ODE solution x(eps) from x(T) = x_T `[B, *D]` (torchdiffeq dopri5).

    dx/dt = f(t) x - g(t)^2 s(x, t) / 2, solved from T down to eps in x_T's dtype (pass float64
    for a reference) with rtol and atol (default atol = rtol). Returns `[B, *D]`.
    """
    check_data("x_T", x_T)
    eps = check_eps(eps, sde)
    rtol = check_positive("rtol", rtol)
    atol = rtol if atol is None else check_positive("atol", atol)
    # scoresde.flow: the score is only evaluated on [eps, T] (a score or sigma(t) is not
    # defined below t = 0, and torchdiffeq's own first-step probe may go there).
    flow = ProbabilityFlow(sde, score_fn, t_range=(eps, sde.T))
    with torch.no_grad():
        return solve(flow, x_T, sde.T, eps, "dopri5", rtol=rtol, atol=atol)


def pathwise_error(sampler: Sampler, score_fn: ScoreFn, x_T: Tensor, x_ref: Tensor) -> float:
    """RMS over samples of ||sampler(x_T) - x_ref|| (norm over all but the batch dimension).

    x_T and x_ref are `[B, *D]`; the sampler starts from `x_init=x_T` and must be
    deterministic (an ODE sampler) for the number to mean anything.
    """
    return float(pathwise_sq_errors(sampler, score_fn, x_T, x_ref).mean().sqrt())


def pathwise_sq_errors(sampler: Sampler, score_fn: ScoreFn, x_T: Tensor, x_ref: Tensor) -> Tensor:
    """Per-path squared distances ||sampler(x_T) - x_ref||^2 `[B]` (as `pathwise_error`)."""
    x = sampler.sample(score_fn, tuple(x_T.shape), x_init=x_T)
    return (x - x_ref).reshape(x.shape[0], -1).pow(2).sum(dim=1)


class _GridMap:
    """c `[P]` (free parameters) -> a grid `[n + 1]` through softmax'd log-SNR increments."""

    def __init__(self, sde: SDE, init: Tensor, max_params: int) -> None:
        self.sde = sde
        self.t_start, self.t_end = float(init[0]), float(init[-1])
        lam = sde.log_snr(init)
        self.lam_start = float(lam[0])
        self.span = float(lam[-1] - lam[0])
        self.z0 = torch.log(lam[1:] - lam[:-1])  # [n] log-increments of the initial grid
        n = self.z0.numel()
        if n <= max_params:
            self.basis = torch.eye(n, dtype=torch.float64)
        else:
            # Hat functions on K knots over the step midpoints: rows sum to 1.
            knots = torch.linspace(0.0, 1.0, max_params, dtype=torch.float64)
            mid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            dist = (mid[:, None] - knots[None, :]).abs() * (max_params - 1)
            self.basis = (1.0 - dist).clamp(min=0.0)
        self.num_params = self.basis.shape[1] - 1  # c_0 = 0 (shift invariance)

    def __call__(self, params: Any) -> Tensor:
        c = torch.zeros(self.num_params + 1, dtype=torch.float64)
        c[1:] = torch.as_tensor(params, dtype=torch.float64)
        inc = torch.softmax(self.z0 + self.basis @ c, dim=0) * self.span
        lam = self.lam_start + torch.cat([inc.new_zeros(1), torch.cumsum(inc, 0)])
        grid = self.sde.t_from_log_snr(lam).to(torch.float64)
        grid[0], grid[-1] = self.t_start, self.t_end  # exact ends despite the inverse's round-off
        return grid


def _initial_grid(sde: SDE, num_steps: int, init: Any, eps: float) -> Tensor:
    if isinstance(init, str):
        if init not in GRIDS:
            raise ValueError(f"init must be one of {GRIDS} or a 1-D tensor, got {init!r}")
        return time_grid(sde, num_steps, init, eps=eps)
    grid = time_grid(sde, num_steps, init).to(device="cpu", dtype=torch.float64)
    if grid.numel() != num_steps + 1:
        raise ValueError(
            f"init must have num_steps + 1 = {num_steps + 1} times, got {grid.numel()}"
        )
    if not math.isclose(float(grid[0]), sde.T, rel_tol=1e-12):
        raise ValueError(f"init must start at T = {sde.T}, got {float(grid[0])!r}")
    if not math.isclose(float(grid[-1]), eps, rel_tol=1e-9):
        raise ValueError(f"init must end at eps = {eps!r}, got {float(grid[-1])!r}")
    return grid.clone()


def _check_tuning_args(
    sampler_factory: Any,
    score_fn: Any,
    sde: Any,
    num_steps: Any,
    eps: Any,
    max_params: Any,
    max_evals: Any,
    dtype: Any,
    generator: Any,
    device: Any,
) -> tuple[int, float, int]:
    """Validate `optimize_time_grid`'s arguments; (num_steps, eps, max_params)."""
    if device is not None:
        check_device("device", device)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
    if not callable(sampler_factory):
        raise TypeError(f"sampler_factory must be callable, got {type(sampler_factory).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    num_steps = check_positive_int("num_steps", num_steps, minimum=2)
    eps = check_eps(eps, sde)
    max_params = check_positive_int("max_params", max_params, minimum=2)
    if max_evals is not None:
        check_positive_int("max_evals", max_evals)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return num_steps, eps, max_params


def optimize_time_grid(
    sampler_factory: SamplerFactory,
    score_fn: ScoreFn,
    sde: SDE,
    num_steps: int,
    *,
    data_shape: tuple[int, ...] | None = None,
    x_T: Tensor | None = None,
    x_ref: Tensor | None = None,
    num_pilot: int = 1024,
    eps: float = 1e-3,
    init: str | Tensor = "quadratic",
    reference_rtol: float = 1e-7,
    max_params: int = 16,
    max_evals: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    info: dict[str, Any] | None = None,
) -> Tensor:
    """A time grid `[num_steps + 1]` (float64, CPU; T down to eps) tuned for one model.

    Minimises the RMS pathwise error of `sampler_factory(grid)` against tight probability-flow
    ODE solutions on pilot draws x_T (see the module docstring for the objective and the
    monotone parameterisation). Use the result as `DPMSolverSampler(sde, num_steps,
    time_grid=grid)` (or any fixed-step sampler's `time_grid=`); tune with the same sampler
    settings (order, corrector...) you will sample with.

    Args:
        sampler_factory: grid `[num_steps + 1]` -> a deterministic `Sampler`, e.g.
            `lambda g: DPMSolverSampler(sde, len(g) - 1, time_grid=g)`.
        score_fn: s(x `[B, *D]`, t `[B]`) -> `[B, *D]`, the model to tune for.
        sde: the forward SDE the model was trained with.
        num_steps: steps of the grid (>= 2: a 1-step grid has no interior time).
        data_shape: one sample's shape `D` (e.g. `(2,)` or `(1, 28, 28)`); the pilots are
            `num_pilot` prior draws of shape `[num_pilot, *D]`. Not needed with `x_T`.
        x_T: pilot prior draws `[B, *D]` to use instead (their device wins).
        x_ref: with `x_T`, their reference solves `[B, *D]` if already made
            (`pf_ode_reference` to `eps`), so they are not solved again.
        num_pilot: number of pilot draws (ignored with `x_T`). Per-sample errors are heavy
            tailed (draws near a mode boundary dominate the RMS): too few pilots overfit
            (2-D benchmark, 3M without corrector at 20 NFE: 512 did, 2048 did not).
        eps: the end time (the grid's last point and the reference solve's end).
        init: the starting grid: a kind of `time_grid` ("quadratic", "logsnr", ...) or a
            tensor `[num_steps + 1]` from T to eps.
        reference_rtol: rtol = atol of the dopri5 reference solve (in `dtype`).
        max_params: at most this many knots for the log-increment correction (free
            parameters: min(num_steps, max_params) - 1).
        max_evals: objective evaluations (sampler runs) for Nelder–Mead; default
            150 * (free parameters + 1).
        generator: for the pilot draws; default a private generator seeded with 1234 (never
            the global RNG, so tuning does not shift a later evaluation's noise).
        device: where the pilots live (default: the generator's device, else CPU).
        dtype: dtype of the pilots, the reference and the tuning runs (float64 recommended).
        info: a dict to fill with "initial_error" and "error" (RMS pathwise error on the
            pilots with `init` and with the returned grid) and "evaluations" (sampler runs).

    Returns:
        The tuned grid, strictly decreasing, `grid[0] = T`, `grid[-1] = eps`; never worse on
        the pilots than `init` (the initial grid is returned if nothing improves on it).
    """
    from scipy.optimize import minimize

    num_steps, eps, max_params = _check_tuning_args(sampler_factory, score_fn, sde, num_steps,
                                                    eps, max_params, max_evals, dtype, generator,
                                                    device)  # fmt: skip
    grid_map = _GridMap(sde, _initial_grid(sde, num_steps, init, eps), max_params)
    pilots = _pilots(sde, x_T, data_shape, num_pilot, generator, device, dtype)
    p = grid_map.num_params
    start = [0.0] * p
    probe = sampler_factory(grid_map(start))
    if not isinstance(probe, Sampler):
        raise TypeError(
            f"sampler_factory must return a scoresde Sampler, got {type(probe).__name__}"
        )
    x_ref = _reference(sde, score_fn, pilots, x_T, x_ref, eps, reference_rtol)
    # Unguarded: a failure on the initial grid is the user's to see (bad score_fn, factory).
    init_err = pathwise_error(probe, score_fn, pilots, x_ref)

    def objective(params: Any) -> float:
        grid = grid_map(params)
        if not bool((grid[1:] < grid[:-1]).all()):
            return _PENALTY  # increments below round-off: two equal times
        try:
            err = pathwise_error(sampler_factory(grid), score_fn, pilots, x_ref)
        except (NonFiniteError, ValueError):
            return _PENALTY
        return err if math.isfinite(err) else _PENALTY

    # One Nelder–Mead run (restarting it from its optimum gained < 0.1% held-out on the
    # 2-D benchmark at 2-4x the time: it does converge).
    budget = max_evals or 150 * (p + 1)
    res = minimize(
        objective, start, method="Nelder-Mead", options=_nm_options(start, budget, init_err)
    )
    improved = float(res.fun) < init_err
    if info is not None:
        info.update(initial_error=init_err, error=float(res.fun) if improved else init_err)
        info["evaluations"] = int(res.nfev) + 1
    return grid_map(res.x if improved else start)


def _nm_options(x0: list[float], budget: int, scale: float) -> dict[str, Any]:
    """Nelder–Mead options: a simplex of x0 and x0 + 0.5 e_i (each log-increment or knot
    scaled by e^0.5; scipy's default simplex around 0 is 2.5e-4 wide, far too small)."""
    p = len(x0)
    simplex = [x0] + [[v + (0.5 if j == i else 0.0) for j, v in enumerate(x0)] for i in range(p)]
    return {
        "maxfev": budget,
        "initial_simplex": simplex,
        "xatol": 1e-3,
        "fatol": 1e-4 * scale,  # stop once the simplex agrees to 0.01% of the initial error
        "adaptive": p > 4,  # Gao & Han's dimension-dependent coefficients
    }


def _reference(
    sde: SDE, score_fn: ScoreFn, pilots: Tensor, x_T: Any, x_ref: Any, eps: float, rtol: float
) -> Tensor:
    """The pilots' reference solves: `x_ref` checked against the user's `x_T` (moved to the
    pilots' device and dtype), else solved here."""
    if x_ref is None:
        return pf_ode_reference(sde, score_fn, pilots, eps, rtol=rtol)
    if not isinstance(x_ref, torch.Tensor):
        raise TypeError(f"x_ref must be a tensor, got {type(x_ref).__name__}")
    if x_T is None or x_ref.shape != pilots.shape:
        shape = None if x_T is None else tuple(pilots.shape)
        raise ValueError(
            f"x_ref needs x_T of the same shape, got x_ref {tuple(x_ref.shape)}, x_T {shape}"
        )
    return x_ref.to(pilots)


def _pilots(
    sde: SDE,
    x_T: Tensor | None,
    data_shape: tuple[int, ...] | None,
    num_pilot: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Tensor:
    """The pilot x_T `[B, *D]`: the user's, or prior draws from a private generator."""
    if x_T is not None:
        return check_data("x_T", x_T).detach().to(dtype)
    if data_shape is None:
        raise ValueError("give data_shape (one sample's shape, e.g. (2,)) or x_T")
    shape = check_shape((check_positive_int("num_pilot", num_pilot), *tuple(data_shape)))
    if generator is None:
        generator = torch.Generator(device=device or "cpu").manual_seed(PILOT_SEED)
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


def save_grids(path: str | Path, grids: Mapping[int, Tensor]) -> None:
    """Write {num_steps: grid} as JSON (float64 values round-trip exactly through repr)."""
    data = {str(int(k)): torch.as_tensor(v, dtype=torch.float64).tolist() for k, v in grids.items()}
    Path(path).write_text(json.dumps(data, indent=1))


def load_grids(path: str | Path) -> dict[int, Tensor]:
    """Read {num_steps: grid `[num_steps + 1]` float64} written by `save_grids`."""
    data = json.loads(Path(path).read_text())
    return {int(k): torch.tensor(v, dtype=torch.float64) for k, v in data.items()}
