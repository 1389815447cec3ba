"""The probability-flow ODE, stated once: its field, its divergence, the table of integration
methods and the solve that never leaves [t_end, T].

Song et al. (2021, eq. 13): the ODE

    dx/dt = v(x, t) = f(t) x - g(t)^2 s(x, t) / 2,        s ~ grad_x log p_t,

has the marginals p_t of the SDE dx = f(t) x dt + g(t) dw. Its divergence (for the
likelihood, App. D.2) is div_x v = f(t) D - g(t)^2 div_x s / 2, with div_x s computed
exactly (D vector-Jacobian products, batched) or by Hutchinson's estimator
E_v[v^T (ds/dx) v]. The coefficients (f, g^2 / 2) come from the SDE
(`SDE.reverse_coefficients`, the one place the reverse drift is defined).

Users: `ODESampler` (sampling and encoding), `log_likelihood`, the torchdiffeq adapter
(`scoresde.interop.torch_solvers`) and the benchmark references (`scoresde.bench`,
`scoresde.samplers.schedules`).

Staying inside [t_end, T]. A score is often only defined there (an exact kernel, a VE
network with a log-sigma embedding, the cosine VP near T). torchdiffeq's adaptive solvers
choose their first step with a probe f(t0 + h0) whose h0 is not limited to the interval
(t = -21.6 on the 2-D ring for a VP solve from T = 1); `solve` chooses the first step
itself with the same heuristic, clipped to the interval, lands the last step on t1
(`step_t`), and `ProbabilityFlow` clamps its time to its range as a last guard. Every
adaptive solve has a step limit (`max_steps`, RuntimeError beyond) and reports NaN/Inf in
the field as `NonFiniteError` with the time, instead of torchdiffeq's
"underflow in dt" AssertionError.

"dopri5" (the likelihood's and ODESampler's default adaptive method) does not go through
torchdiffeq: `scoresde._ode_batch.solve_batch` takes the same steps (Dormand-Prince-Shampine
error weights, the I controller with no shrinking after an accepted step, the same first
step and norm, so results agree with torchdiffeq's to round-off) with a fraction of its
per-step overhead (no dense-output fit, no per-stage stacking, one host sync per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import NonFiniteError, broadcast_time, expand_like
from scoresde.sdes import SDE

State = Tensor | tuple[Tensor, ...]

__all__ = [
    "METHODS",
    "FIXED_METHODS",
    "TORCHDIFFEQ_METHODS",
    "PER_SAMPLE_METHODS",
    "ADAPTIVE_METHODS",
    "Method",
    "ProbabilityFlow",
    "pf_coefficients",
    "divergence",
    "draw_probes",
    "one_hot_chunks",
    "solve",
    "DEFAULT_MAX_STEPS",
]

DEFAULT_MAX_STEPS = 10_000
# Elements of the one-hot cotangents of one batched VJP call of the exact trace (memory cap).
_EXACT_CHUNK_ELEMENTS = 1 << 22


# --- the table of integration methods ----------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One integration method of the probability-flow ODE.

    Attributes:
        name: scoresde's name.
        kind: "fixed" (a grid of num_steps steps), "adaptive" (torchdiffeq's rule, one step
            size for the batch; "dopri5" in `scoresde._ode_batch.solve_batch`, the others in
            torchdiffeq) or "per_sample" (`scoresde._ode`, a step size per sample).
        torchdiffeq: torchdiffeq's name for it (None for "per_sample").
        nfe_per_step: field evaluations per step (fixed methods).
        native: ODESampler has its own fixed-step implementation (`scoresde.samplers.ode`).
    """

    name: str
    kind: str
    torchdiffeq: str | None
    nfe_per_step: int | None = None
    native: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("euler", "fixed", "euler", 1, native=True),
        Method("midpoint", "fixed", "midpoint", 2, native=True),
        Method("heun", "fixed", "heun2", 2, native=True),  # Heun's 2nd-order trapezoid rule
        Method("heun3", "fixed", "heun3", 3),
        Method("rk4", "fixed", "rk4", 4, native=True),
        Method("dopri5", "adaptive", "dopri5"),
        Method("dopri8", "adaptive", "dopri8"),
        Method("bosh3", "adaptive", "bosh3"),
        Method("fehlberg2", "adaptive", "fehlberg2"),
        Method("adaptive_heun", "adaptive", "adaptive_heun"),
        Method("dopri5_per_sample", "per_sample", None),
    )
}
FIXED_METHODS = tuple(n for n, m in METHODS.items() if m.kind == "fixed")
TORCHDIFFEQ_METHODS = tuple(n for n, m in METHODS.items() if m.kind == "adaptive")
PER_SAMPLE_METHODS = tuple(n for n, m in METHODS.items() if m.kind == "per_sample")
ADAPTIVE_METHODS = TORCHDIFFEQ_METHODS + PER_SAMPLE_METHODS
# Order of each torchdiffeq adaptive pair's error estimate + 1 (torchdiffeq's `order`).
_ORDERS = {"dopri5": 5, "dopri8": 8, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2}


# --- the field and its divergence ---------------------------------------------------------------


def pf_coefficients(sde: SDE, t: Tensor) -> tuple[Tensor, Tensor]:
    """(f(t), g(t)^2 / 2), shaped like t: dx/dt = f x - (g^2 / 2) s."""
    return sde.reverse_coefficients(t, probability_flow=True)


class ProbabilityFlow:
    """The field v(x, t) = f(t) x - g(t)^2 s(x, t) / 2 of `sde` driven by `score_fn`.

    Called as `flow(t, x)` (torchdiffeq's order) with t a float, a 0-d tensor or `[B]`,
    x `[B, *D]`; returns `[B, *D]`. `nfe` counts score calls.

    Args:
        sde: the forward SDE.
        score_fn: s(x `[B, *D]`, t `[B]`) -> `[B, *D]`.
        t_range: (lo, hi): times are clamped into it before the score is called (a guard:
            `solve` never leaves its interval anyway). None: no clamp.
        coefficients: t -> (f(t), g(t)^2 / 2), default `pf_coefficients(sde, t)` (the
            benchmarks pass an analytic continuation valid slightly outside [0, T]).
    """

    def __init__(
        self,
        sde: SDE,
        score_fn: ScoreFn,
        *,
        t_range: tuple[float, float] | None = None,
        coefficients: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.sde = sde
        self.score_fn = score_fn
        self.t_range = t_range
        self.coefficients = coefficients or (lambda t: pf_coefficients(sde, t))
        self.nfe = 0
        self.vjps = 0

    def _time(self, t: Any, x: Tensor) -> Tensor:
        if torch.is_tensor(t):
            t = t.to(dtype=x.dtype, device=x.device)
        else:
            t = torch.tensor(float(t), dtype=x.dtype, device=x.device)
        if self.t_range is not None:
            t = torch.clamp(t, *self.t_range)
        return t

    def __call__(self, t: Any, x: Tensor) -> Tensor:
        """v(x, t) `[B, *D]`."""
        t = self._time(t, x)
        f, c = self.coefficients(t)
        score = self.score_fn(x, broadcast_time(t, x))
        self.nfe += 1
        return expand_like(f, x) * x - expand_like(c, x) * score

    def with_divergence(
        self, t: Any, x: Tensor, trace: str, cotangents: Any
    ) -> tuple[Tensor, Tensor]:
        """(v(x, t) `[B, *D]`, div_x v `[B]`); trace "exact" or "hutchinson" (cotangents from
        `one_hot_chunks` or `draw_probes`, rows matching x)."""
        t = self._time(t, x)
        f, c = self.coefficients(t)
        s, div_s = self.score_with_divergence(t, x, trace, cotangents)
        v = expand_like(f, x) * x - expand_like(c, x) * s
        return v, f * x[0].numel() - c * div_s

    def score_with_divergence(
        self, t: Any, x: Tensor, trace: str, cotangents: Any
    ) -> tuple[Tensor, Tensor]:
        """(s(x, t) `[B, *D]`, div_x s `[B]`), both detached: one score call and its
        vector-Jacobian products (see `divergence`)."""
        t = self._time(t, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            s = self.score_fn(xg, broadcast_time(t, x))
            self.nfe += 1
            div_s, n = divergence(s, xg, trace, cotangents)
        self.vjps += n
        return s.detach(), div_s.detach()


def draw_probes(
    x: Tensor,
    probe: str,
    num_probes: int,
    generator: torch.Generator | None,
    batch_invariant: bool = False,
    sample_offset: int = 0,
) -> Tensor:
    """`[P, B, *D]` Hutchinson probes with E[v v^T] = I, drawn on the generator's device,
    or (batch_invariant) from per-point Philox streams keyed by one draw of the generator,
    point b being point sample_offset + b of a larger data set."""
    if batch_invariant:
        from scoresde.samplers.base import PerSampleNoise

        noise = PerSampleNoise(generator, sample_offset)
        v = noise.normals(tuple(x.shape), x.device, x.dtype, 0, num_probes)
        if probe == "gaussian":
            return v
        return torch.where(v >= 0, 1.0, -1.0).to(x.dtype)
    shape = (num_probes, *x.shape)
    device = generator.device if generator is not None else x.device
    if probe == "gaussian":
        v = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    else:
        bits = torch.randint(0, 2, shape, generator=generator, device=device)
        v = bits.to(x.dtype) * 2 - 1
    return v.to(x.device)


def one_hot_chunks(x: Tensor) -> list[tuple[int, Tensor]]:
    """Cotangents for the exact Jacobian diagonal: chunks of e_j (each `[Dc, B, *D]`)."""
    B = x.shape[0]
    D = x[0].numel()
    chunk = max(1, min(D, _EXACT_CHUNK_ELEMENTS // max(1, B * D)))
    eye = torch.eye(D, dtype=x.dtype, device=x.device)
    out = []
    for j0 in range(0, D, chunk):
        rows = eye[j0 : j0 + chunk]  # [Dc, D]
        cot = rows[:, None, :].expand(rows.shape[0], B, D).reshape(rows.shape[0], *x.shape)
        out.append((j0, cot.contiguous()))
    return out


def select_rows(cotangents: Any, trace: str, idx: Tensor, Ba: int) -> Any:
    """The cotangents of the Ba active samples `idx` (per-sample solver)."""
    if trace == "hutchinson":
        return cotangents.index_select(1, idx)  # each sample keeps its own probes
    # The one-hot rows are the same for every sample: any Ba of them will do.
    return [(j0, cot[:, :Ba]) for j0, cot in cotangents]


def divergence(s: Tensor, x: Tensor, trace: str, cotangents: Any) -> tuple[Tensor, int]:
    """(div_x s `[B]` (exact) or Hutchinson's estimate, number of VJPs), from s = score(x)
    built with grad."""
    B = x.shape[0]
    if not s.requires_grad:
        # The score does not depend on x (e.g. a constant): its divergence is zero.
        return torch.zeros(B, dtype=x.dtype, device=x.device), 0
    if trace == "hutchinson":
        probes = cotangents  # [P, B, *D]
        P = probes.shape[0]
        if P == 1:
            (jtv,) = torch.autograd.grad(s, x, grad_outputs=probes[0])
            jtv = jtv[None]
        else:
            (jtv,) = torch.autograd.grad(s, x, grad_outputs=probes, is_grads_batched=True)
        return (jtv * probes).reshape(P, B, -1).sum(-1).mean(0), P
    # One plain vector-Jacobian product per dimension, reusing the graph: on one CPU core
    # 1.1-1.5x faster in most timings than one vmapped (is_grads_batched) product over all
    # of them (exact mixture scores in 2-D and 16-D, a trained 2-D MLP; 64-D noisy), with
    # one product's memory.
    div = torch.zeros(B, dtype=x.dtype, device=x.device)
    flat_dim = x[0].numel()
    vjps = 0
    for i, (j0, cot) in enumerate(cotangents):
        last_chunk = i == len(cotangents) - 1
        for k in range(cot.shape[0]):
            last = last_chunk and k == cot.shape[0] - 1
            (row,) = torch.autograd.grad(s, x, grad_outputs=cot[k], retain_graph=not last)
            # Row j of the Jacobian's transpose holds d s_j / d x_j at position j.
            div = div + row.reshape(B, flat_dim)[:, j0 + k]
            vjps += 1
    return div, vjps


# --- the solve ------------------------------------------------------------------------------------


class _Guarded:
    """Wraps func(t, y) for torchdiffeq: returns a precomputed f(t0, y0) on the first call
    (the solver's own start evaluation, so choosing the first step costs no extra NFE) and
    remembers, on the device, the first time at which func returned NaN/Inf."""

    def __init__(self, func: Callable[..., State], like: Tensor) -> None:
        self.func = func
        self.start: tuple[Tensor, State, State] | None = None
        self.bad_t = torch.full((), math.nan, dtype=like.dtype, device=like.device)

    def __call__(self, t: Tensor, y: State) -> State:
        if self.start is not None:
            t0, y0, f0 = self.start
            self.start = None
            if bool(t == t0) and _same(y, y0):
                return f0
        out = self.func(t, y)
        parts = out if isinstance(out, tuple) else (out,)
        finite = torch.stack([torch.isfinite(p).all() for p in parts]).all()
        t_now = t.reshape(-1)[0].to(self.bad_t.dtype) if torch.is_tensor(t) else float(t)
        self.bad_t = torch.where(torch.isnan(self.bad_t) & ~finite, t_now, self.bad_t)
        return out

    def first_bad_time(self) -> float | None:
        value = float(self.bad_t)
        return None if math.isnan(value) else value


def _same(a: State, b: State) -> bool:
    if isinstance(a, tuple) != isinstance(b, tuple):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def _tmap(fn: Callable[..., Tensor], *states: State) -> State:
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states, strict=True))
    return fn(*states)


def _first_step(
    func: Callable[..., State],
    t0: Tensor,
    y0: State,
    f0: State,
    order: int,
    rtol: float,
    atol: float,
    norm: Callable[[State], Tensor],
    span: float,
    direction: float,
) -> Tensor:
    """Hairer's starting step (Solving ODEs I, Sec. II.4), as torchdiffeq computes it but
    with the probe h0 and the result clipped to the interval's length `span`.

    h0 = 0.01 |y0| / |f0| (scaled norms), probe f1 = f(t0 + h0, y0 + h0 f0),
    h1 = (0.01 / max(|f0|, |f1 - f0| / h0))^(1 / order), step = min(100 h0, h1, span).
    """
    scale = _tmap(lambda y: atol + torch.abs(y) * rtol, y0)
    d0 = norm(_tmap(torch.div, y0, scale)).abs()
    d1 = norm(_tmap(torch.div, f0, scale)).abs()
    if d0 < 1e-5 or d1 < 1e-5:
        h0 = torch.tensor(1e-6, dtype=d0.dtype, device=d0.device)
    else:
        h0 = (0.01 * d0 / d1).abs()
    # A field NaN/Inf at t0 makes h0 NaN and the probe would ask for a NaN time (as in _ode).
    h0 = torch.where(torch.isfinite(h0), h0, torch.full_like(h0, 1e-6)).clamp(max=span)
    y1 = _tmap(lambda y, f: y + direction * h0 * f, y0, f0)
    # Time arithmetic in float64 (as torchdiffeq's), the call in the state's dtype.
    f1 = func((t0 + direction * h0).to(h0.dtype), y1)
    diff = _tmap(lambda a, b, s: direction * (a - b) / s, f1, f0, scale)
    d2 = torch.abs(norm(diff) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = torch.clamp(h0 * 1e-3, min=1e-6)
    else:
        h1 = (0.01 / torch.maximum(d1, d2)) ** (1.0 / float(order))
    # A non-finite probe: start small, so the steps reach the bad region from finite times.
    h1 = torch.where(torch.isfinite(d2), h1, 1e-3 * h0)
    return torch.minimum(100 * h0, h1.abs()).clamp(max=span)


def _rms(v: Tensor) -> Tensor:
    return v.pow(2).mean().sqrt()


def solve(
    func: Callable[..., State],
    y0: State,
    t0: float,
    t1: float,
    method: str,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_steps: int | None = None,
    norm: Callable[[State], Tensor] | None = None,
    sample_norm: Callable[[State], Tensor] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    with_index: bool = False,
) -> State:
    """Integrate dy/dt = func(t, y) from t0 to t1 with a method of `METHODS`; y at t1.

    The field is only ever evaluated at times in [min(t0, t1), max(t0, t1)] (see the
    module docstring). y0 is a tensor `[B, *D]` or a tuple of them.

    Args:
        func: func(t, y) -> dy/dt; t is a 0-d tensor (fixed and torchdiffeq methods) or
            per-sample `[Ba]` ("dopri5_per_sample", which also passes idx `[Ba]` when
            `with_index`).
        method: a name in `METHODS`.
        rtol, atol: tolerances of adaptive methods.
        num_steps: steps of a fixed method (uniform in t).
        norm: torchdiffeq's error norm (state -> 0-d), default RMS.
        sample_norm: the per-sample solver's norm (state -> `[B]`), default its RMS.
        max_steps: the most steps an adaptive method may take (RuntimeError beyond).

    Raises:
        NonFiniteError: func returned NaN/Inf and the solve could not go on.
        RuntimeError: more than `max_steps` steps.
    """
    spec = METHODS[method]
    if spec.kind == "per_sample":
        from scoresde._ode import solve_per_sample

        out, _ = solve_per_sample(
            func, y0, t0, t1, rtol=rtol, atol=atol, norm=sample_norm,
            max_steps=max_steps, with_index=with_index,
        )  # fmt: skip
        return out
    if method == "dopri5":
        return _solve_dopri5(func, y0, t0, t1, rtol, atol, norm, max_steps)
    from torchdiffeq import odeint

    first = y0[0] if isinstance(y0, tuple) else y0
    like = {"dtype": first.dtype, "device": first.device}
    ts = torch.tensor([t0, t1], **like)
    if spec.kind == "fixed":
        frac = torch.linspace(0.0, 1.0, num_steps + 1, **like)
        # Exact endpoints: torchdiffeq insists that the grid starts and ends at ts.
        grid = torch.cat([ts[0] + (ts[1] - ts[0]) * frac[:-1], ts[1:]])

        def grid_constructor(func: Any, y0: Any, t: Tensor) -> Tensor:
            # torchdiffeq negates this itself when integrating backwards (t1 < t0).
            return grid

        out = odeint(
            func, y0, ts, method=spec.torchdiffeq, options={"grid_constructor": grid_constructor}
        )
        return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]
    norm = norm or _rms
    guarded = _Guarded(func, ts)
    f0 = guarded(ts[0], y0)
    direction = 1.0 if t1 > t0 else -1.0
    t0_64 = torch.tensor(t0, dtype=torch.float64, device=first.device)
    h = _first_step(
        guarded, t0_64, y0, f0, _ORDERS[method], rtol, atol, norm, abs(t1 - t0), direction
    )
    guarded.start = (ts[0], y0, f0)
    options = {
        "norm": norm,
        "first_step": h,
        # step_t: land on t1 instead of stepping past it and interpolating back.
        "step_t": ts[1:],
        "max_num_steps": max_steps,
    }
    try:
        out = odeint(
            guarded, y0, ts, rtol=rtol, atol=atol, method=spec.torchdiffeq, options=options
        )
    except AssertionError as err:
        _raise_failure(guarded, err, method, t0, t1, rtol, atol, max_steps)
        raise
    out = tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]
    return out


def _solve_dopri5(
    func: Callable[..., State],
    y0: State,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    norm: Callable[[State], Tensor] | None,
    max_steps: int,
) -> State:
    """ "dopri5" by scoresde's own batch loop (`scoresde._ode_batch.solve_batch`): torchdiffeq's
    rule (one step size for the batch, the same controller, first step and norm) without
    its per-step overhead; NaN/Inf in the field is reported with the time."""
    from scoresde._ode_batch import BatchNonFiniteError, solve_batch

    try:
        out, _ = solve_batch(
            func, y0, t0, t1, rtol=rtol, atol=atol, norm=norm, max_steps=max_steps, name="dopri5"
        )
    except BatchNonFiniteError as err:
        raise NonFiniteError(
            f"non-finite values (NaN/Inf) in the probability-flow field at t = "
            f"{err.t_start:.6g} .. {err.t_stop:.6g} (dopri5 from t = {t0:g} to {t1:g}); "
            "check the score function"
        ) from err
    return out


def _raise_failure(
    guarded: _Guarded,
    err: AssertionError,
    method: str,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    max_steps: int,
) -> None:
    """Turn torchdiffeq's AssertionErrors into NonFiniteError / RuntimeError."""
    bad_t = guarded.first_bad_time()
    if bad_t is not None:
        raise NonFiniteError(
            f"non-finite values (NaN/Inf) in the probability-flow field at t = {bad_t:.6g} "
            f"({method} from t = {t0:g} to {t1:g}); check the score function"
        ) from err
    if "max_num_steps" in str(err):
        raise RuntimeError(
            f"{method} did not reach t = {t1:g} from t = {t0:g} within max_steps={max_steps} "
            f"steps (rtol={rtol:g}, atol={atol:g}); raise max_steps or loosen the tolerances"
        ) from err
    if "underflow" in str(err):
        raise RuntimeError(
            f"{method}: the step size underflowed between t = {t0:g} and {t1:g} "
            f"(rtol={rtol:g}, atol={atol:g}); the field is too stiff for these tolerances"
        ) from err
