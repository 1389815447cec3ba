"""scoresde's "dopri5": Dormand-Prince 5(4) with one step size for the whole batch (private).

`solve_batch` follows torchdiffeq's dopri5 rule step for step -- Shampine's embedded error
weights, the I controller (factor clamp(0.9 E^(-1/5), 0.2, 10), no shrinking after an
accepted step), Hairer's first step clipped to the interval, time kept in float64 -- so
in float64 it takes the same steps and agrees with torchdiffeq's result to round-off. It
shares the Dormand-Prince step and the state packing with the per-sample solver
(`scoresde._ode`) and the step-size controller with every adaptive loop of scoresde
(`scoresde._control`); what it leaves out is torchdiffeq's per-step overhead (dense-output
fits, per-stage k stacks, time perturbations, tuple flattening on every call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scoresde._control import StepController
from scoresde._ode import (
    _E_SHAMPINE,
    _ORDER,
    State,
    _as_float,
    _dp5_step,
    _initial_step,
    _Packer,
)
from scoresde._typing import Tensor
from scoresde._validation import NonFiniteError, check_positive, check_positive_int

__all__ = ["BatchStats", "BatchNonFiniteError", "solve_batch", "mixed_rms_norm"]


@dataclass
class BatchStats:
    """What `solve_batch` did.

    Attributes:
        nfe: calls of `func` on the whole batch (the start, the first-step probe, then 6
            per attempted step).
        accepted, rejected: steps accepted and rejected.
    """

    nfe: int
    accepted: int
    rejected: int


def mixed_rms_norm(ratio: State) -> Tensor:
    """torchdiffeq's default norm, 0-d: the largest RMS over one tensor of the state (the RMS
    over all of a tensor state)."""
    parts = ratio if isinstance(ratio, tuple) else (ratio,)
    if len(parts) == 1:
        return parts[0].pow(2).mean().sqrt()
    return torch.stack([p.pow(2).mean().sqrt() for p in parts]).max()


class BatchNonFiniteError(NonFiniteError, RuntimeError):
    """func returned NaN/Inf in the step from `t_start` to `t_stop` (`solve_batch`)."""

    def __init__(self, message: str, t_start: float, t_stop: float) -> None:
        super().__init__(message)
        self.t_start, self.t_stop = t_start, t_stop


def solve_batch(
    func: Callable[..., State],
    y0: State,
    t0: float | Tensor,
    t1: float | Tensor,
    *,
    rtol: float,
    atol: float,
    norm: Callable[[State], Tensor] | None = None,
    max_steps: int = 10_000,
    name: str = "dopri5",
) -> tuple[State, BatchStats]:
    """Integrate dy/dt = func(t, y) from t0 to t1 with Dormand-Prince 5(4) (FSAL) and one
    step size for the whole batch: torchdiffeq's "dopri5" rule, stepped by scoresde's own
    loop (`_dp5_step`, the shared `StepController`).

    The rule (Hairer et al. I, Sec. II.4; torchdiffeq's defaults): E = norm(err / (atol +
    rtol max(|y|, |y_new|))) over the batch, accept iff E <= 1, next step h clamp(0.9
    E^(-1/5), 0.2, 10) with no shrinking after an accepted step; the first step by Hairer's
    heuristic clipped to the interval (one extra evaluation); the last step lands exactly
    on t1. Time is kept in float64 (y's dtype on MPS). One host synchronization per step
    (accept, done, NaN); no torchdiffeq bookkeeping (dense-output fits, per-stage k stacks,
    time perturbations, tuple flattening per call).

    Args:
        func: right-hand side func(t 0-d, y) -> dy/dt with y0's structure; t has y's dtype
            and device.
        y0: a tensor `[B, *D]` or a tuple of tensors `[B, *D_i]` (same batch, dtype, device).
        t0, t1: start and end times; t1 < t0 integrates backwards.
        rtol, atol: tolerances (> 0).
        norm: maps the scaled error (y0's structure) to a 0-d error norm; default
            `mixed_rms_norm` (torchdiffeq's).
        max_steps: the most steps (accepted + rejected); RuntimeError beyond.
        name: the method's name in error messages.

    Returns:
        (y at t1 with y0's structure, `BatchStats`).

    Raises:
        BatchNonFiniteError (a `NonFiniteError`): func returned NaN/Inf (names the step).
        RuntimeError: more than max_steps steps, or the step size underflowed.
    """
    if not callable(func):
        raise TypeError(f"func must be callable (t, y) -> dy/dt, got {type(func).__name__}")
    packer = _Packer(y0)
    y = packer.pack(y0)
    # Times are kept in float64 (as torchdiffeq does), so tight tolerances stay usable
    # on a float32 state.
    rtol, atol = check_positive("rtol", rtol), check_positive("atol", atol)
    t0f, t1f = _as_float("t0", t0), _as_float("t1", t1)
    max_steps = check_positive_int("max_steps", max_steps)
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be callable or None, got {type(norm).__name__}")
    if y.shape[0] == 0 or t0f == t1f:
        return packer.unpack(y.clone()), BatchStats(0, 0, 0)
    return _integrate_batch(func, packer, y, t0f, t1f, rtol, atol, norm, max_steps, name)


def _integrate_batch(
    func: Callable[..., State],
    packer: _Packer,
    y: Tensor,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    norm: Callable[[State], Tensor] | None,
    max_steps: int,
    name: str,
) -> tuple[State, BatchStats]:
    """The loop of `solve_batch` on the packed state y `[B, N]` (arguments checked)."""
    dtype, device = y.dtype, y.device
    # Time in float64 where the device has it; func gets it in y's dtype.
    tdtype = dtype if device.type == "mps" else torch.float64
    direction = 1.0 if t1 > t0 else -1.0
    ctrl = StepController(
        rtol=rtol, atol=atol, order=_ORDER, beta=0.0, safety=0.9, min_factor=0.2,
        max_factor=10.0, min_factor_accept=1.0, no_growth_after_reject=False,
        max_steps=max_steps, name=name,
    )  # fmt: skip
    nfe = 0

    def rhs(t: Tensor, y_: Tensor, idx: Any = None) -> Tensor:
        nonlocal nfe
        nfe += 1
        return packer.pack(func(t.to(dtype), packer.unpack(y_)), "func(t, y)")

    user_norm = norm or mixed_rms_norm

    def batch_norm(ratio: Tensor) -> Tensor:
        return user_norm(packer.unpack(ratio))

    t = torch.tensor(t0, dtype=tdtype, device=device)
    t_end = torch.tensor(t1, dtype=tdtype, device=device)
    h_min = 4 * torch.finfo(tdtype).eps * max(abs(t0), abs(t1), abs(t1 - t0))
    k1 = rhs(t, y)
    h = _initial_step(rhs, ctrl, t, y, k1, None, abs(t1 - t0), direction, batch_norm)
    h = h.to(tdtype)
    state = ctrl.init_state(1, tdtype, device)
    accepted = rejected = 0
    while True:
        ctrl.check_steps(accepted + rejected, y.shape[0], f"t1={t1}")
        t_try = t + h
        last = direction * (t_try - t_end) >= 0
        t_new = torch.where(last, t_end, t_try)  # the last step lands exactly on t1
        y_new, k7, err = _dp5_step(rhs, t, t_new, y, k1, None, _E_SHAMPINE)
        E = ctrl.error_norm(err, y, y_new, None, batch_norm).reshape(1).to(tdtype)
        accept, h_next, state = ctrl.decide(E, (t_new - t).reshape(1), state)
        h_next = h_next.reshape(())
        # The one host synchronization of the step.
        finite, acc, done, moving = torch.stack(
            [torch.isfinite(E[0]), accept[0], last, h_next.abs() >= h_min]
        ).tolist()
        if not finite:
            a, b = float(t), float(t_new)
            raise BatchNonFiniteError(
                f"{name}: non-finite values (NaN/Inf) from func in the step from t = {a:.6g} "
                f"to t = {b:.6g}",
                a,
                b,
            )
        if acc:
            accepted += 1
            y, k1, t = y_new, k7, t_new
            if done:
                break
        else:
            rejected += 1
        if not moving:
            raise RuntimeError(
                f"{name}: the step size underflowed at t = {float(t):.6g} (rtol={rtol:g}, "
                f"atol={atol:g}); the field is too stiff for these tolerances"
            )
        h = h_next
    return packer.unpack(y), BatchStats(nfe, accepted, rejected)
