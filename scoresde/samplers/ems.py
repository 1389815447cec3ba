"""DPM-Solver-v3 (Zheng et al., NeurIPS 2023): a multistep solver built on empirical model
statistics (EMS) measured once on the model; opt-in, via `calibrate(..., method="ems")`.

Written from the paper's equations, in the half log-SNR lambda = log(alpha / sigma). With
u = x / alpha the probability-flow ODE is du/dlambda = -sigma eps(x) / alpha, where
sigma eps = -sigma^2 s(x, t). The statistics split the model output, entry by entry:

- l_lambda = E[diag(d(sigma eps)/dx)], the linear part: sigma eps = l x + alpha f, so
  du/dlambda = -l u - f and f = (sigma eps - l x) / alpha is what the solver extrapolates;
- s_lambda, b_lambda: the regression df/dlambda ~ s f + b over trajectories, so that
  g = e^{-(S - S_s)} f - e^{S_s} (B - B_s) (S = int s, B = int e^{-S} b) is as constant in
  lambda as possible.

The step s -> t is then, with L = int l, I = int e^{L + S}, C = int e^{L + S} B,

    x_t = alpha_t [e^{L_s - L_t} x_s / alpha_s - e^{-L_t - S_s} (I_t - I_s) g_s
                   - e^{-L_t} (C_t - C_s - B_s (I_t - I_s))
                   - e^{L_s - L_t} sum_k g_s^(k) int_s^t e^{(L+S)(r) - (L+S)(s)} (r-s)^k / k! dr]

with g_s^(k) from the polynomial through earlier points' g. With l = 1 and s = b = 0 this is
DPM-Solver++ (f = -x0). The integrals are trapezoid sums on the statistics' grid (uniform in
lambda, 1,200 points by default), so the sampling grid is rounded to it. Once the grid is
fixed every update is linear, x_next = A x + sum_q W_q f_q + c with per-entry vectors A, W_q, c:
`EmpiricalModelStatistics.plan` computes them and `EMSSampler` runs them (what a calibration
saves: a few vectors per step, not the statistics).

The statistics come from pilot trajectories of the model's own probability-flow ODE (dopri5,
solved through every grid point a chunk at a time), l by Hutchinson's estimator with one
Rademacher probe per pilot, kept along the trajectory so that l is smooth in lambda, and
df/dlambda by central differences along each trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import check_bool, check_choice, check_positive_int
from scoresde.samplers.base import Sampler, SamplingContext
from scoresde.sdes import SDE

__all__ = ["EMSSampler", "EmpiricalModelStatistics"]


def _cumtrapz(y: Tensor, x: Tensor) -> Tensor:
    """Cumulative trapezoid integral of y `[M+1, ...]` over x `[M+1]`, 0 at x[0]."""
    dx = (x[1:] - x[:-1]).reshape(-1, *([1] * (y.ndim - 1)))
    out = torch.cumsum(0.5 * dx * (y[1:] + y[:-1]), 0)
    return torch.cat([torch.zeros_like(y[:1]), out], 0)


class EmpiricalModelStatistics:
    """l, s, b `[M+1, D]` (D: entries of one sample) on `lam` `[M+1]`, uniform in lambda from
    t = T to t = eps, and their integrals (float64, CPU). Build with `measure`."""

    def __init__(self, sde: SDE, lam: Tensor, l: Tensor, s: Tensor, b: Tensor, eps: float):
        self.sde, self.lam, self.eps = sde, lam, float(eps)
        self.t = _times(sde, lam, eps)
        self.alpha, self.sigma = sde.alpha(self.t).double(), sde.sigma(self.t).double()
        self.l, self.s, self.b = l, s, b
        self.L, self.S = _cumtrapz(l, lam), _cumtrapz(s, lam)
        self.I = _cumtrapz(torch.exp(self.L + self.S), lam)
        self.B = _cumtrapz(torch.exp(-self.S) * b, lam)
        self.C = _cumtrapz(torch.exp(self.L + self.S) * self.B, lam)

    @staticmethod
    def lambda_grid(sde: SDE, num_points: int, eps: float) -> Tensor:
        """`[num_points + 1]` half log-SNRs, uniform from t = T to t = eps."""
        ends = torch.tensor([sde.T, eps], dtype=torch.float64)
        lam_T, lam_eps = (0.5 * sde.log_snr(ends)).tolist()
        return torch.linspace(lam_T, lam_eps, num_points + 1, dtype=torch.float64)

    @classmethod
    def degenerate(cls, sde: SDE, dim: int, num_points: int = 1200, eps: float = 1e-3):
        """l = 1, s = b = 0: the solver is then DPM-Solver++ on the rounded grid."""
        lam = cls.lambda_grid(sde, num_points, eps)
        one = torch.ones(lam.numel(), dim, dtype=torch.float64)
        return cls(sde, lam, one, 0 * one, 0 * one, eps)

    @classmethod
    def measure(
        cls,
        sde: SDE,
        score_fn: ScoreFn,
        pilots: Tensor,
        *,
        num_points: int = 1200,
        eps: float = 1e-3,
        generator: torch.Generator | None = None,
        rtol: float = 1e-7,
        chunk: int = 50,
    ) -> EmpiricalModelStatistics:
        """The statistics of `score_fn` (s(x `[B, *D]`, t `[B]`), differentiable in x) from
        `pilots` `[n, *D]` (prior draws; their dtype and device are used): their ODE
        trajectories are solved (dopri5 at rtol = atol = `rtol`) `chunk` grid points at a
        time, so memory holds chunk + 1 states of the batch. `generator`: the probes."""
        from torchdiffeq import odeint

        from scoresde.flow import ProbabilityFlow

        num_points = check_positive_int("num_points", num_points)
        lam = cls.lambda_grid(sde, num_points, eps)
        times = _times(sde, lam, eps)
        alpha, sigma = sde.alpha(times).double(), sde.sigma(times).double()
        flow = ProbabilityFlow(sde, score_fn, t_range=(eps, sde.T))
        n = pilots.shape[0]
        where = pilots.device if generator is None else generator.device
        probe = torch.randint(0, 2, pilots.shape, generator=generator, device=where)
        probe = probe.to(pilots) * 2 - 1

        def nonlinear(x: Tensor, j: int) -> tuple[Tensor, Tensor]:
            """(diag-Jacobian estimate of sigma eps `[D]`, sigma eps `[n, D]`) at x_j."""
            x = x.detach().requires_grad_(True)
            t = times[j].to(x).expand(n)
            out = -(float(sigma[j]) ** 2) * score_fn(x, t)
            (vjp,) = torch.autograd.grad(out, x, probe)
            return (probe * vjp).reshape(n, -1).mean(0).double(), out.detach().reshape(n, -1)

        ls, sb, window, x = [], [], [], pilots
        for a in range(0, num_points, chunk):
            end = min(a + chunk, num_points)
            with torch.no_grad():
                xs = odeint(flow, x, times[a : end + 1].to(x), rtol=rtol, atol=rtol)
            for j in range(a if a == 0 else a + 1, end + 1):
                lj, out = nonlinear(xs[j - a], j)
                ls.append(lj)  # f_j = (sigma eps - l x) / alpha `[n, D]` (float64)
                window = [*window[-2:], (out.double() - lj * xs[j - a].reshape(n, -1).double())]
                window[-1] /= alpha[j]
                if j >= 1:  # f_{j-1}'s regression, now that f_j is known
                    lo = max(j - 2, 0)
                    sb.append(_regression(window[0], window[-2], window[-1], lam[j] - lam[lo]))
            x = xs[-1]
        m = num_points
        sb.append(_regression(window[-2], window[-1], window[-1], lam[m] - lam[m - 1]))
        l = torch.stack(ls)
        s, b = (torch.stack(v) for v in zip(*sb, strict=True))
        return cls(sde, lam, l, s, b, eps)

    def indexes(self, grid: Tensor) -> list[int]:
        """The statistics' grid points nearest (in lambda) to a time grid from T to eps."""
        lam = 0.5 * self.sde.log_snr(torch.as_tensor(grid, dtype=torch.float64))
        m = self.lam.numel() - 1
        idx = ((lam - self.lam[0]) / (self.lam[-1] - self.lam[0]) * m).round().long().tolist()
        idx[0], idx[-1] = 0, m
        if any(b <= a for a, b in zip(idx[:-1], idx[1:], strict=True)):
            raise ValueError("time_grid is finer than the statistics' grid (raise num_points)")
        return idx

    def update(self, base: int, target: int, points: Sequence[int]) -> tuple:
        """(A, [W_q], c), each `[D]`, with x_target = A x_base + sum_q W_q f_q + c, f_q the
        model's nonlinear part at grid point points[q] (points[0] = base)."""
        L, S, I, B, C, lam = self.L, self.S, self.I, self.B, self.C, self.lam
        a_t = self.alpha[target]
        A = a_t / self.alpha[base] * torch.exp(L[base] - L[target])
        K = [-a_t * torch.exp(-L[target] - S[base]) * (I[target] - I[base])]
        K += [torch.zeros_like(A) for _ in points[1:]]
        n = len(points) - 1
        if n:  # g^(k)_s from the polynomial through the points' g: weights over the points
            R = torch.stack([(lam[list(points[1:])] - lam[base]) ** k for k in range(1, n + 1)])
            inv = torch.linalg.inv(R.T)  # [n, n]: g^(k) / k! = sum_q inv[k-1, q-1] (g_q - g_0)
            ramp = torch.exp(L[base : target + 1] + S[base : target + 1] - L[base] - S[base])
            seg = lam[base : target + 1]
            for k in range(1, n + 1):
                mom = ((seg - seg[0]) ** k)[:, None]  # k! / k! cancels
                h = -a_t * torch.exp(L[base] - L[target]) * _cumtrapz(ramp * mom, seg)[-1]
                for q in range(1, n + 1):
                    K[q] = K[q] + h * inv[k - 1, q - 1]
                    K[0] = K[0] - h * inv[k - 1, q - 1]
        c = -a_t * torch.exp(-L[target]) * (C[target] - C[base] - B[base] * (I[target] - I[base]))
        W = []
        for q, p in enumerate(points):  # g_q = e^{S_s - S_q} f_q - e^{S_s} (B_q - B_s)
            W.append(K[q] * torch.exp(S[base] - S[p]))
            c = c - K[q] * torch.exp(S[base]) * (B[p] - B[base])
        return A, W, c

    def plan(
        self, grid: Tensor, order: int = 3, corrector: bool = True, lower_order_final: bool = True
    ) -> dict[str, Any]:
        """The `EMSSampler` arguments (JSON-able lists) for `grid` (T -> eps, rounded to the
        statistics' grid): predictor of order `order` (fewer at the start and, with
        `lower_order_final`, at the end); the corrector (as DPMSolverSampler's) redoes each
        step with the new point at one order more, keeping that point's f."""
        order = check_choice("order", order, (1, 2, 3))
        check_bool("corrector", corrector)
        idx = self.indexes(grid)
        steps = len(idx) - 1
        orders = [min(k + 1, order) for k in range(steps)]
        if lower_order_final:
            orders = [min(o, steps - k) for k, o in enumerate(orders)]
        pred, corr = [], [None]
        for k in range(steps):
            pred.append(self.update(idx[k], idx[k + 1], [idx[k - q] for q in range(orders[k])]))
            if corrector and k > 0:
                older = [idx[k - 1 - q] for q in range(1, orders[k - 1])]
                corr.append(self.update(idx[k - 1], idx[k], [idx[k - 1], idx[k], *older]))
            elif k > 0:
                corr.append(None)

        def plain(update: Any) -> Any:
            if update is None:
                return None
            A, W, c = update
            return dict(A=A.tolist(), W=[w.tolist() for w in W], c=c.tolist())

        return dict(
            times=self.t[idx].tolist(),
            linear=self.l[idx[:-1]].tolist(),
            predictor=[plain(u) for u in pred],
            corrector=[plain(u) for u in corr],
        )


def _regression(f_lo: Tensor, f: Tensor, f_hi: Tensor, dlam: Tensor) -> tuple[Tensor, Tensor]:
    """(s, b) `[D]`: the least-squares fit df/dlambda ~ s f + b over the trajectories `[n, D]`,
    df/dlambda = (f_hi - f_lo) / dlam (central, or one-sided at the ends)."""
    df = (f_hi - f_lo) / dlam
    fc, dfc = f - f.mean(0), df - df.mean(0)
    # A ridge relative to f's size: where f barely varies across trajectories (round-off
    # only), s is 0 and b the mean slope, not a ratio of round-off errors.
    var = fc.square().mean(0) + 1e-8 * f.square().mean(0) + 1e-300
    s = (fc * dfc).mean(0) / var
    return s, df.mean(0) - s * f.mean(0)


def _times(sde: SDE, lam: Tensor, eps: float) -> Tensor:
    t = sde.t_from_log_snr(2 * lam).double()
    t[0], t[-1] = sde.T, eps  # exact ends despite round-off in the inverse
    return t


class EMSSampler(Sampler):
    """DPM-Solver-v3 on a fixed grid, from a plan (`EmpiricalModelStatistics.plan`, or read
    back from a `Calibration`): n = len(times) - 1 score evaluations.

    Args:
        sde: the forward SDE.
        times: `[n + 1]` from T down to eps (the samples are at times[-1]).
        linear: l at the n evaluation times `[n][D]` (D: entries of one sample).
        predictor: n updates {"A": [D], "W": [[D], ...], "c": [D]}: x_{k+1} = A x_k +
            sum_q W_q f_{k-q} + c, f_j = (-sigma_j^2 s(x_j, t_j) - l_j x_j) / alpha_j.
        corrector: n entries, None or an update of x_k from x_{k-1} (corrected) and f_k,
            f_{k-1}, f_{k-2}, ... (in that order), applied after evaluating at x_k.
    """

    def __init__(self, sde: SDE, times: Any, linear: Any, predictor: Any, corrector: Any):
        super().__init__(sde)
        t = torch.as_tensor(times, dtype=torch.float64)
        n = t.numel() - 1
        if t.ndim != 1 or n < 1 or not bool((t[1:] < t[:-1]).all()) or float(t[0]) != sde.T:
            raise ValueError(f"times must decrease strictly from T={sde.T}, got {times!r}")
        lin = torch.as_tensor(linear, dtype=torch.float64)
        if lin.ndim != 2 or lin.shape[0] != n:
            raise ValueError(f"linear must be [{n}, D], got shape {tuple(lin.shape)}")
        if not (len(predictor) == n and len(corrector) == n):
            raise ValueError(f"predictor and corrector must hold {n} entries each")
        self.times, self.linear, self.num_steps = t, lin, n
        self.predictor = [_update(u, lin.shape[1]) for u in predictor]
        self.corrector = [None if u is None else _update(u, lin.shape[1]) for u in corrector]
        self.alpha, self.sigma = sde.alpha(t).double(), sde.sigma(t).double()
        self._on: dict = {}

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        shape, n = x.shape, self.num_steps
        key = (x.device, x.dtype)
        if key not in self._on:  # the plan's tensors on x's device, once
            like = x.new_empty(0)
            self._on = {key: (self.linear.to(like), _moved(self.predictor, like),
                              _moved(self.corrector, like))}  # fmt: skip
        linear, pred, corr = self._on[key]
        if x[0].numel() != linear.shape[1]:
            raise ValueError(f"samples of {x[0].numel()} entries, the plan has {linear.shape[1]}")
        times = [float(v) for v in self.times]
        s2 = [float(v) ** 2 for v in self.sigma]
        inv_alpha = [1.0 / float(v) for v in self.alpha]
        flat = x.reshape(shape[0], -1)
        fs: list[Tensor] = []
        prev = flat  # the corrected state at the previous point
        for k in ctx.steps(n):
            score = ctx.score(flat.reshape(shape), times[k]).reshape(shape[0], -1)
            fs.append((score * -s2[k] - linear[k] * flat) * inv_alpha[k])
            if corr[k] is not None:
                A, W, c = corr[k]
                used = [fs[-2], fs[-1], *fs[-3::-1]][: len(W)]
                flat = A * prev + c + sum(w * f for w, f in zip(W, used, strict=True))
            prev = flat
            A, W, c = pred[k]
            flat = A * flat + c + sum(w * f for w, f in zip(W, fs[::-1][: len(W)], strict=True))
            flat = ctx.after_step(k, times[k + 1], flat.reshape(shape)).reshape(shape[0], -1)
        return flat.reshape(shape)


# --- calibrate(method="ems") (scoresde.calibration): the steps behind it -------------------
_PROBE_SEED = 4321  # Hutchinson's probes of a calibration


def calibration_pilots(
    sampler: Any,
    data_shape: tuple[int, ...],
    num_pilot: int,
    ems_pilots: int,
    test_pilots: int,
    generator: torch.Generator | None,
    device: Any,
    dtype: torch.dtype,
) -> Tensor:
    """The pilot draws of `calibrate(method="ems")` `[num_pilot + ems_pilots + test_pilots,
    *D]`: the grid searches' (the same as method="grid"), the statistics', then the test's
    (which decide between v3 and the tuned grid)."""
    from scoresde._validation import check_positive_int
    from scoresde.calibration import pilot_batches
    from scoresde.samplers.dpm_solver import DPMSolverSampler

    if (
        type(sampler) is not DPMSolverSampler
        or sampler.stochastic
        or sampler.denoise
        or sampler.interpolation != "lambda"
    ):
        raise ValueError(
            f"method='ems' replaces DPMSolverSampler (stochastic=False, denoise=False, "
            f"interpolation='lambda'), got {sampler!r}"
        )
    check_positive_int("num_pilot", num_pilot)
    if check_positive_int("ems_pilots", ems_pilots) < 2:
        raise ValueError(f"ems_pilots={ems_pilots} must be at least 2 (a regression)")
    if check_positive_int("test_pilots", test_pilots) < 2:
        raise ValueError(f"test_pilots={test_pilots} must be at least 2 (a paired test)")
    sizes = (num_pilot, ems_pilots, test_pilots)
    return pilot_batches(sampler.sde, data_shape, sizes, generator, device, dtype)


def calibrate_plan(
    score: ScoreFn,
    sampler: Any,
    tuned: Any,
    info: dict[str, Any],
    pilots: tuple[Tensor, Tensor, Tensor],
    x_ref: Tensor,
    max_evals: int | None,
    reference_rtol: float,
) -> tuple[Tensor, dict[str, Any] | None, dict[str, Any]]:
    """(the grid, the v3 plan or None, the record for `Calibration.extra`: errors on the
    pilots, `grid_error` / `ems_error`, and on the test pilots, `test_initial_error` (the tuned
    grid's) / `test_error` (v3's) and the paired `test_gain_z`; `tuned_grid`). pilots: (the grid
    searches' x_T, whose references are x_ref; the statistics'; the test's). The statistics,
    then the same grid search as for `tuned` (the sampler on its tuned grid; same pilots,
    references, start and budget) for DPM-Solver-v3 with the sampler's order, corrector and
    lower_order_final. v3 is kept if its RMS error on the test pilots (references solved
    apart) is below the tuned grid's: both were searched on the same pilots, so their pilot
    errors favour whichever overfit them more. Else the tuned grid stays and the plan is in
    `extra["rejected_ems"]`. `info` (the grid's errors) is updated to the kept one's."""
    from scoresde.samplers.learned import _gain_z
    from scoresde.samplers.schedules import optimize_time_grid, pathwise_sq_errors, pf_ode_reference

    (x_grid, x_stats, x_test), sde, start = pilots, sampler.sde, time.perf_counter()
    options = dict(order=sampler.order, corrector=sampler.corrector,
                   lower_order_final=sampler.lower_order_final)  # fmt: skip
    probes = torch.Generator(device=x_stats.device).manual_seed(_PROBE_SEED)  # not the global RNG
    rtol = 1e-7 if x_stats.dtype == torch.float64 else 1e-5  # as ScoreModel.calibrate's
    stats = EmpiricalModelStatistics.measure(
        sde, score, x_stats, eps=sampler.eps, generator=probes, rtol=rtol
    )
    v3: dict[str, Any] = {}
    with torch.no_grad():
        v3_grid = optimize_time_grid(
            lambda g: EMSSampler(sde, **stats.plan(g, **options)), score, sde,
            tuned.num_steps, x_T=x_grid, x_ref=x_ref, init=sampler.time_grid, eps=sampler.eps,
            max_evals=max_evals, dtype=x_grid.dtype, info=v3,
        )  # fmt: skip
        plan = stats.plan(v3_grid, **options)
        ref = pf_ode_reference(sde, score, x_test, sampler.eps, rtol=reference_rtol)
        sq = [pathwise_sq_errors(s, score, x_test, ref) for s in (tuned, EMSSampler(sde, **plan))]
    errors = [math.sqrt(float(v.mean())) for v in sq]
    extra = dict(ems_pilots=int(x_stats.shape[0]), ems_seconds=time.perf_counter() - start,
                 grid_error=info["error"], ems_initial_error=v3["initial_error"],
                 ems_error=v3["error"], tuned_grid=tuned.time_grid.tolist(),
                 test_pilots=int(x_test.shape[0]), test_initial_error=errors[0],
                 test_error=errors[1], test_gain_z=_gain_z(sq[0], sq[1], moved=True))  # fmt: skip
    if not errors[1] < errors[0]:
        return tuned.time_grid, None, {**extra, "rejected_ems": plan}
    info["error"] = v3["error"]
    return torch.tensor(plan["times"], dtype=torch.float64), plan, extra


def _moved(updates: list, like: Tensor) -> list:
    return [None if u is None else (u[0].to(like), [w.to(like) for w in u[1]], u[2].to(like))
            for u in updates]  # fmt: skip


def _update(u: Any, dim: int) -> tuple[Tensor, list[Tensor], Tensor]:
    if not isinstance(u, dict) or set(u) != {"A", "W", "c"}:
        raise ValueError("each update must be a dict with entries A, W, c")
    A = torch.as_tensor(u["A"], dtype=torch.float64)
    W = [torch.as_tensor(w, dtype=torch.float64) for w in u["W"]]
    c = torch.as_tensor(u["c"], dtype=torch.float64)
    if any(v.shape != (dim,) or not bool(v.isfinite().all()) for v in (A, c, *W)) or not W:
        raise ValueError(f"A, c and each of W must be {dim} finite numbers")
    return A, W, c
