"""A batched adaptive ODE solver in which every sample takes its own steps (private).

`torchdiffeq`'s adaptive solvers share one step size across the batch: the hardest sample
sets the step for all of them, and a sample's result depends on which other samples it was
batched with. `solve_per_sample` integrates dy/dt = func(t, y) with Dormand & Prince's
5(4) pair (FSAL) where each sample has its own time, step size, error estimate and
accept/reject decision. Each right-hand-side call is made on the still-active samples only
(finished samples are dropped from the batch and never evaluated again), so one call on the
active sub-batch is one NFE and a sample's trajectory is the one it would take alone.

`scoresde._ode_batch.solve_batch` is the batch-wide counterpart, scoresde's "dopri5": the
same Dormand-Prince step (`_dp5_step`, with Shampine's error weights) and controller
(`scoresde._control`), one step size for the whole batch, following torchdiffeq's dopri5
rule step for step without its per-step overhead.

Method (Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.4-II.5):

    k_i = f(t + c_i h, y + h sum_j a_ij k_j),   i = 1..7  (k_1 reuses the last k_7: FSAL),
    y_new = y + h sum_i b_i k_i                 (5th order, a_7j = b_j),
    err   = h sum_i e_i k_i,  e = b - b_hat     (embedded 4th-order estimate),
    E     = sqrt(mean((err / (atol + rtol max(|y|, |y_new|)))^2))  per sample,

accept when E <= 1; next step h_new = h min(max_factor, max(min_factor,
safety E^(-alpha) E_prev^beta)) with alpha = 1/5 - 0.75 beta (Hairer's PI "Lund
stabilization"; beta = 0 is the classic I controller), no growth right after a rejection.
The first step follows Hairer's heuristic (one extra evaluation) unless `h_init` is given.

Cost of the loop: one host-device synchronization per step (`nonzero` on the "still
active" mask, needed to know whether to go on and to size the next sub-batch); everything
else stays on the device. Steps in which some samples finish also compact the active
state with `index_select` and write the leaving rows out with `index_copy_`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scoresde._control import ControllerState, StepController
from scoresde._typing import Tensor
from scoresde._validation import NonFiniteError, check_choice, check_positive, check_positive_int

State = Tensor | tuple[Tensor, ...]

__all__ = ["PerSampleStats", "solve_per_sample", "rms_norm"]

# Dormand-Prince 5(4) tableau (Hairer et al. I, Table 5.2). Python floats: the arithmetic
# follows the state's dtype, and nothing is allocated per step.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# e = b - b_hat: the 5th-order weights (= the last row of _A, then 0) minus the 4th-order.
_E = (
    71 / 57600,
    0.0,
    -71 / 16695,
    71 / 1920,
    -17253 / 339200,
    22 / 525,
    -1 / 40,
)
# The same pair with Shampine's embedded 4th-order weights (b_hat = 1951/21600, 0,
# 22642/50085, 451/720, -12231/42400, 649/6300, 1/60), as torchdiffeq's "dopri5" uses them:
# `scoresde._ode_batch.solve_batch` follows that solver's rule step for step.
_E_SHAMPINE = (
    35 / 384 - 1951 / 21600,
    0.0,
    500 / 1113 - 22642 / 50085,
    125 / 192 - 451 / 720,
    -2187 / 6784 + 12231 / 42400,
    11 / 84 - 649 / 6300,
    -1 / 60,
)
_ORDER = 5  # error exponent 1 / (q + 1) with q = 4, the lower order of the pair
CONTROLLERS = ("pi", "i")


@dataclass
class PerSampleStats:
    """What `solve_per_sample` did.

    Attributes:
        nfe: batched calls of `func` (each on the active sub-batch): the NFE.
        accepted: `[B]` int64 accepted steps per sample.
        rejected: `[B]` int64 rejected steps per sample.
        evaluations: `[B]` int64 evaluations of `func` on each sample's row
            (2 or 1 for the start, then 6 per attempted step).
        iterations: steps of the batched loop (= the largest accepted + rejected).
    """

    nfe: int
    accepted: Tensor
    rejected: Tensor
    evaluations: Tensor
    iterations: int


def rms_norm(ratio: State) -> Tensor:
    """Hairer's norm `[B]`: the RMS over each sample's whole state (all tuple components).

    `ratio` is err / (atol + rtol max(|y|, |y_new|)), a tensor `[B, *D]` or a tuple of them.
    """
    parts = ratio if isinstance(ratio, tuple) else (ratio,)
    B = parts[0].shape[0]
    sq = sum(p.reshape(B, -1).pow(2).sum(1) for p in parts)
    n = sum(p[0].numel() for p in parts)
    return (sq / n).sqrt()


# --- state packing: the solver works on one [B, N] matrix, func sees the user's structure ---


class _Packer:
    """Flattens a state (tensor or tuple, leading batch dim) into one `[B, N]` matrix."""

    def __init__(self, y0: State) -> None:
        self.is_tuple = isinstance(y0, tuple)
        parts = y0 if self.is_tuple else (y0,)
        if len(parts) == 0:
            raise ValueError("y0 must be a tensor [B, *D] or a non-empty tuple of them, got ()")
        for i, p in enumerate(parts):
            name = f"y0[{i}]" if self.is_tuple else "y0"
            if not torch.is_tensor(p):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
            if not torch.is_floating_point(p):
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {p.dtype}")
            if p.ndim < 1:
                raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
        first = parts[0]
        for i, p in enumerate(parts[1:], start=1):
            if p.shape[0] != first.shape[0] or p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"y0[{i}] must match y0[0] in batch size, dtype and device, got "
                    f"{tuple(p.shape)} {p.dtype} {p.device} vs "
                    f"{tuple(first.shape)} {first.dtype} {first.device}"
                )
        self.tails = [tuple(p.shape[1:]) for p in parts]
        self.sizes = [math.prod(s) for s in self.tails]

    def pack(self, y: State, what: str = "y0") -> Tensor:
        parts = y if isinstance(y, tuple) else (y,)
        if len(parts) != len(self.sizes):
            raise ValueError(
                f"func must return the structure of y0 ({len(self.sizes)} tensors), "
                f"got {len(parts)}"
            )
        B = parts[0].shape[0]
        flat = []
        for p, tail in zip(parts, self.tails, strict=True):
            if not torch.is_tensor(p) or tuple(p.shape) != (B, *tail):
                shape = tuple(p.shape) if torch.is_tensor(p) else type(p).__name__
                raise ValueError(f"{what} must have shape {(B, *tail)}, got {shape}")
            flat.append(p.reshape(B, -1))
        return flat[0] if len(flat) == 1 else torch.cat(flat, 1)

    def unpack(self, m: Tensor) -> State:
        B = m.shape[0]
        if not self.is_tuple:
            return m.reshape(B, *self.tails[0])
        cols = torch.split(m, self.sizes, dim=1)
        return tuple(c.reshape(B, *tail) for c, tail in zip(cols, self.tails, strict=True))


# --- argument checks ----------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)
    ):
        raise TypeError(f"{name} must be a number or a 1-element tensor, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_tolerance(name: str, value: Any, dtype: torch.dtype) -> float:
    value = check_positive(name, value)
    if name == "rtol" and value < 10 * torch.finfo(dtype).eps:
        raise ValueError(
            f"rtol must be >= 10 x the machine epsilon of {dtype} "
            f"({10 * torch.finfo(dtype).eps:.3g}) or the steps stall, got {value!r}"
        )
    return value


# --- the solver ---------------------------------------------------------------------------------


def solve_per_sample(
    func: Callable[..., State],
    y0: State,
    t0: float | Tensor,
    t1: float | Tensor,
    *,
    rtol: float,
    atol: float,
    h_init: float | None = None,
    max_steps: int = 10_000,
    norm: Callable[[State], Tensor] | None = None,
    controller: str = "pi",
    safety: float = 0.9,
    min_factor: float = 0.2,
    max_factor: float = 10.0,
    with_index: bool = False,
) -> tuple[State, PerSampleStats]:
    """Integrate dy/dt = func(t, y) from t0 to t1 with a separate adaptive step per sample.

    Dormand-Prince 5(4) with FSAL (see the module docstring for the formulas). Every
    sample keeps its own t, h and error history; its last step is clipped to land exactly
    on t1. A sample's result does not depend on the rest of the batch, provided `func`
    treats the rows of its input independently.

    Args:
        func: right-hand side, called as func(t `[Ba]`, y) (or func(t, y, idx) with
            `with_index`) on the Ba still-active samples, y shaped like y0 but with Ba rows;
            returns dy/dt of the same structure. t has y's dtype and device.
        y0: the initial state: a tensor `[B, *D]` or a tuple of tensors `[B, *D_i]`
            (same batch size, dtype and device; e.g. (x, log-density increment `[B]`)).
        t0, t1: start and end times (floats or 1-element tensors); t1 < t0 integrates
            backwards.
        rtol, atol: relative and absolute tolerances (> 0), per element.
        h_init: magnitude of every sample's first step; None chooses it per sample with
            Hairer's heuristic (one extra evaluation).
        max_steps: the most steps (accepted + rejected) any sample may take; RuntimeError
            beyond.
        norm: maps the scaled error err / (atol + rtol max(|y|, |y_new|)), shaped like the
            state with Ba rows, to `[Ba]` per-sample norms. Default `rms_norm` (Hairer's
            RMS over all of a sample's components).
        controller: "pi" (Hairer's PI controller, beta = 0.04) or "i" (E^(-1/5)).
        safety, min_factor, max_factor: step factor h_new / h = clamp(safety E^(-alpha)
            E_prev^beta, min_factor, max_factor).
        with_index: also pass idx `[Ba]` (int64), the active samples' rows in y0, so that
            func can look up per-sample data (noise probes, class labels...).

    Returns:
        (y at t1 with y0's structure, `PerSampleStats`).

    Raises:
        ValueError/TypeError on bad arguments; RuntimeError if a sample needs more than
        `max_steps` steps or its step size underflows (e.g. a NaN right-hand side).
    """
    if not callable(func):
        raise TypeError(f"func must be callable (t, y) -> dy/dt, got {type(func).__name__}")
    packer = _Packer(y0)
    y = packer.pack(y0)
    dtype, device = y.dtype, y.device
    rtol = _check_tolerance("rtol", rtol, dtype)
    atol = _check_tolerance("atol", atol, dtype)
    t0f, t1f = _as_float("t0", t0), _as_float("t1", t1)
    if h_init is not None:
        h_init = check_positive("h_init", h_init)
    max_steps = check_positive_int("max_steps", max_steps)
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be callable or None, got {type(norm).__name__}")
    check_choice("controller", controller, CONTROLLERS)
    safety = check_positive("safety", safety)
    min_factor = check_positive("min_factor", min_factor)
    max_factor = check_positive("max_factor", max_factor)
    if not (safety <= 1 and min_factor < 1 < max_factor):
        raise ValueError(
            "need 0 < safety <= 1 and 0 < min_factor < 1 < max_factor, got "
            f"safety={safety!r}, min_factor={min_factor!r}, max_factor={max_factor!r}"
        )

    B = y.shape[0]
    zeros = torch.zeros(B, dtype=torch.int64, device=device)
    if B == 0 or t0f == t1f:
        stats = PerSampleStats(0, zeros, zeros.clone(), zeros.clone(), 0)
        return packer.unpack(y.clone()), stats
    return _integrate(
        func, packer, y, t0f, t1f, rtol, atol, h_init, max_steps,
        norm, controller, safety, min_factor, max_factor, with_index,
    )  # fmt: skip


class NonFiniteSolveError(NonFiniteError, RuntimeError):
    """func returned NaN/Inf and the step size underflowed: a `NonFiniteError` (the
    samplers' report) that is also the RuntimeError `solve_per_sample` always raised."""


class _Rhs:
    """Calls func on packed matrices, counts batched calls (the NFE) and remembers, on the
    device, a time at which func first returned NaN/Inf (no host sync per call)."""

    def __init__(self, func: Callable[..., State], packer: _Packer, with_index: bool) -> None:
        self.func, self.packer, self.with_index = func, packer, with_index
        self.nfe = 0
        self.bad_t: Tensor | None = None

    def __call__(self, t: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        self.nfe += 1
        args = (t, self.packer.unpack(y)) + ((idx,) if self.with_index else ())
        out = self.packer.pack(self.func(*args), "func(t, y)")
        bad = ~torch.isfinite(out).all(dim=1)
        t_bad = torch.where(bad, t, torch.full_like(t, -math.inf)).max(dim=0, keepdim=True)[0]
        t_bad = torch.where(torch.isinf(t_bad), torch.full_like(t_bad, math.nan), t_bad)
        self.bad_t = (
            t_bad if self.bad_t is None else torch.where(torch.isnan(self.bad_t), t_bad, self.bad_t)
        )
        return out

    def first_bad_time(self) -> float | None:
        if self.bad_t is None:
            return None
        value = float(self.bad_t[0])
        return None if math.isnan(value) else value


def _initial_step(
    rhs: Callable[..., Tensor],
    ctrl: StepController,
    t: Tensor,
    y: Tensor,
    k1: Tensor,
    idx: Tensor,
    span: float,
    direction: float,
    norm: Any,
) -> Tensor:
    """Hairer's starting step `[B]` (signed), per sample (Hairer et al. I, Sec. II.4), or one
    0-d step for the batch when `norm` reduces the batch to a 0-d norm (`_ode_batch`).

    h0 = 0.01 |y0|/|f0|, then h1 = (0.01 / max(|f0|, |f(t0 + h0, y0 + h0 f0) - f0| / h0))^(1/5)
    and h = min(100 h0, h1), all in the scaled norm; clipped to the interval so the probe
    never leaves [t0, t1].
    """
    ones = torch.ones(y.shape[1], dtype=y.dtype, device=y.device)
    d0 = ctrl.error_norm(y.clone(), y, y, ones, norm)
    d1 = ctrl.error_norm(k1.clone(), y, y, ones, norm)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    # A field already NaN/Inf at t0 makes h0 NaN, and the probe then asks for a NaN time:
    # start tiny so the failure is reported at t0 itself.
    h0 = torch.where(torch.isfinite(h0), h0, torch.full_like(h0, 1e-6))
    h0 = h0.clamp(max=span)
    h0s = direction * h0
    y1 = torch.addcmul(y, h0s.reshape(-1, 1), k1)  # h0 `[B]` per sample or 0-d batch-wide
    k2 = rhs(t + h0s, y1, idx)
    d2 = ctrl.error_norm(k2 - k1, y, y, ones, norm) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        torch.clamp(h0 * 1e-3, min=1e-6),
        (0.01 / dmax).pow(1.0 / _ORDER),
    )
    # A non-finite probe (the field is NaN/Inf somewhere before t0 + h0) would make h NaN
    # and the failure's time unknown: start small instead, so the steps reach the bad
    # region from finite times and the error names them.
    h1 = torch.where(torch.isfinite(d2), h1, 1e-3 * h0)
    return direction * torch.minimum(100 * h0, h1).clamp(max=span)


def _dp5_step(
    rhs: Callable[..., Tensor],
    t: Tensor,
    t_new: Tensor,
    y: Tensor,
    k1: Tensor,
    idx: Tensor | None,
    e: tuple[float, ...] = _E,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Dormand-Prince 5(4) step from t to t_new, per sample (t `[Ba]`) or for the whole
    batch (t 0-d): (y_new, k7 = f(t_new, y_new) for FSAL, the local error estimate err),
    all `[Ba, N]`, with the error weights e = b - b_hat. 6 evaluations."""
    h = t_new - t
    # Per sample: one broadcast per step, not seven.
    h_full = h[:, None].expand_as(y).contiguous() if h.ndim else h
    ks = [k1]
    for i in range(1, 7):
        incr = ks[0] * _A[i][0]
        for a, k in zip(_A[i][1:], ks[1:], strict=True):
            if a != 0.0:
                incr = incr.add(k, alpha=a)
        y_stage = torch.addcmul(y, h_full, incr)
        t_stage = t_new if _C[i] == 1.0 else t + _C[i] * h
        ks.append(rhs(t_stage, y_stage, idx))
    err = ks[0] * e[0]
    for e_i, k in zip(e[1:], ks[1:], strict=True):
        if e_i != 0.0:
            err = err.add(k, alpha=e_i)
    # Stage 7 is evaluated at the 5th-order solution (FSAL): y_stage is y_new.
    return y_stage, ks[6], err.mul_(h_full)


class _Active:
    """The compact state of the still-active samples; `idx` maps its rows to the batch's.

    Rows leave (`drop`) when their sample is done or failed; `flush` writes the current
    rows into the per-batch results first."""

    def __init__(
        self, B: int, y: Tensor, t: Tensor, t_end: Tensor, ctrl_state: ControllerState
    ) -> None:
        device = y.device
        self.idx = torch.arange(B, device=device)
        self.t, self.t_end, self.y = t, t_end, y
        self.h = self.k1 = y  # set by the caller
        self.ctrl = ctrl_state
        self.acc = torch.zeros(B, dtype=torch.int64, device=device)
        self.rej = torch.zeros(B, dtype=torch.int64, device=device)
        self.failed = torch.zeros(B, dtype=torch.bool, device=device)
        # Results, written row by row as samples leave the active set.
        self.y_out = torch.empty_like(y)
        self.acc_out = torch.zeros(B, dtype=torch.int64, device=device)
        self.rej_out = torch.zeros_like(self.acc_out)
        self.failed_out = torch.zeros(B, dtype=torch.bool, device=device)

    def flush(self) -> None:
        self.y_out.index_copy_(0, self.idx, self.y)
        self.acc_out.index_copy_(0, self.idx, self.acc)
        self.rej_out.index_copy_(0, self.idx, self.rej)
        self.failed_out.index_copy_(0, self.idx, self.failed)

    def keep(self, rows: Tensor) -> None:
        for name in ("idx", "t", "t_end", "h", "y", "k1", "acc", "rej", "failed"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.ctrl = self.ctrl.select(rows)


def _integrate(
    func: Callable[..., State],
    packer: _Packer,
    y: Tensor,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    h_init: float | None,
    max_steps: int,
    norm: Any,
    controller: str,
    safety: float,
    min_factor: float,
    max_factor: float,
    with_index: bool,
) -> tuple[State, PerSampleStats]:
    """The loop of `solve_per_sample` on the packed state y `[B, N]` (arguments checked):
    the Dormand-Prince step (`_dp5_step`) under the shared controller (`scoresde._control`)."""
    B, dtype, device = y.shape[0], y.dtype, y.device
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    ctrl = StepController(
        rtol=rtol, atol=atol, order=_ORDER, beta=0.04 if controller == "pi" else 0.0,
        safety=safety, min_factor=min_factor, max_factor=max_factor, max_steps=max_steps,
        name="solve_per_sample",
    )  # fmt: skip
    rhs = _Rhs(func, packer, with_index)
    h_min = 4 * torch.finfo(dtype).eps * max(abs(t0), abs(t1), span)
    unpacked_norm = None if norm is None else (lambda r: norm(packer.unpack(r)))

    t = torch.full((B,), t0, dtype=dtype, device=device)
    s = _Active(
        B, y, t, torch.full((B,), t1, dtype=dtype, device=device), ctrl.init_state(B, dtype, device)
    )
    s.k1 = rhs(t, y, s.idx)
    if h_init is None:
        s.h = _initial_step(rhs, ctrl, t, y, s.k1, s.idx, span, direction, unpacked_norm)
        start_evals = 2
    else:
        s.h = torch.full((B,), direction * min(h_init, span), dtype=dtype, device=device)
        start_evals = 1
    ones = torch.ones(y.shape[1], dtype=dtype, device=device)  # row sums as one mat-vec

    iterations = 0
    while True:
        ctrl.check_steps(iterations, s.idx.numel(), f"t1={t1}")
        iterations += 1
        # The last step of each sample lands exactly on t1 (never past it). Selections
        # between finite values use lerp with a 0/1 weight, which returns exactly one end
        # (lerp computes start + w (end - start) for w < 1/2, end - (1 - w)(end - start) else)
        # and is far faster than torch.where on CPU.
        t_try = s.t + s.h
        last = direction * (t_try - s.t_end) >= 0
        t_new = torch.lerp(t_try, s.t_end, last.to(dtype))
        h = t_new - s.t
        y_new, k7, err = _dp5_step(rhs, s.t, t_new, s.y, s.k1, s.idx)
        E = ctrl.error_norm(err, s.y, y_new, ones, unpacked_norm)
        accept, s.h, s.ctrl = ctrl.decide(E, h, s.ctrl)
        acc_f = accept.to(dtype)
        s.acc += accept
        s.rej += ~accept
        mask = accept[:, None].expand_as(s.y).contiguous()
        s.y = torch.where(mask, y_new, s.y)  # y_new may be non-finite on a rejected step
        s.k1 = torch.where(mask, k7, s.k1)
        s.t = torch.lerp(s.t, t_new, acc_f)
        # A step too small to move t (underflow, e.g. NaN in func) is a failure.
        done = accept & last
        stuck = ~(s.h.abs() >= h_min) & ~done  # written so that a NaN step counts as stuck
        s.failed = s.failed | stuck
        keep = (~(done | stuck)).nonzero().squeeze(1)  # the one host sync per step
        if keep.numel() < s.idx.numel():
            # Write every current row out (rows still active are overwritten later), then
            # drop the leavers: finished samples are never evaluated again.
            s.flush()
            if keep.numel() == 0:
                break
            s.keep(keep)

    _raise_failures(s.failed_out, rhs)
    evaluations = start_evals + 6 * (s.acc_out + s.rej_out)
    stats = PerSampleStats(rhs.nfe, s.acc_out, s.rej_out, evaluations, iterations)
    return packer.unpack(s.y_out), stats


def _raise_failures(failed: Tensor, rhs: _Rhs) -> None:
    """NonFiniteSolveError (NaN/Inf from func, with the time) or RuntimeError (stiffness)
    when some sample's step size underflowed."""
    if not bool(failed.any()):
        return
    bad = failed.nonzero().squeeze(1).tolist()
    t_bad = rhs.first_bad_time()
    if t_bad is not None:
        raise NonFiniteSolveError(
            f"solve_per_sample: non-finite values (NaN/Inf) from func at t = {t_bad:.6g}; "
            f"the step size underflowed for sample(s) {bad[:10]}"
        )
    raise RuntimeError(
        f"solve_per_sample: the step size underflowed for sample(s) {bad[:10]} "
        "(non-finite or extremely stiff right-hand side)"
    )
