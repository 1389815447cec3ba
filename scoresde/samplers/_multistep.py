"""The shared engine of the exponential multistep samplers (DPM-Solver++ and its SDE
variant, SA-Solver): a per-grid plan of floats and small weight tensors, and one loop.

The family. With lambda = log(alpha/sigma), data prediction x0(x, t) = (x + sigma^2 s)/alpha
and a noise level tau >= 0 (constant over a step), the SDE

    dx = [f x - (1 + tau^2)/2 g^2 s] dt + tau g dw_bar

has the marginals p_t for every tau (tau = 0: the probability-flow ODE; tau = 1: the
reverse SDE). Its solution from t to s < t (h = lambda_s - lambda_t) is exactly

    x_s = (sigma_s/sigma_t) e^{-tau^2 h} x_t
          + alpha_s int_{-h}^{0} r e^{r u} x0(lambda_s + u) du + sigma_s sqrt(1 - e^{-2 tau^2 h}) z,

r = 1 + tau^2 (Lu et al. 2022, "DPM-Solver++", eq. for SDE-DPM-Solver++; Xue et al. 2023,
"SA-Solver", eq. 12). A k-th order step replaces x0 by the polynomial through the last k
data predictions (an Adams–Bashforth predictor) and integrates it exactly; substituting
v = r u, the weights are `exp_integral_weights(r h, r * nodes)`. A corrector (Adams–Moulton;
UniPC / SA-Solver) re-does the step with the interpolant through the data prediction at the
predicted point too - that evaluation is the next step's anyway, so it costs no NFE - and
with the same noise z, so it is just an increment on the predicted x.

The loop keeps u_j = alpha_j x0_j = x_j + sigma_j^2 s_j (one fused op per evaluation) in a
ring buffer H `[S, B*D]`; a step is then one `addmv` (ratio * x + H^T w) plus the noise and
(for the corrector) a second `addmv`. All weights are laid out in ring-slot order when the
plan is made, so the loop does no Python-float -> tensor work and no list juggling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde.samplers.base import SamplingContext
from scoresde.samplers.toolkit import Coefficients

# 16-point Gauss–Legendre rule on [-1, 1]: exact for polynomials of degree 31; the
# integrands e^u L_j(u) (polynomials of degree <= 4 times e^u) are resolved to round-off for
# any step of a practical grid (|r h| up to ~10).
_GL: tuple[list[float], list[float]] | None = None


def _gauss_legendre() -> tuple[list[float], list[float]]:
    global _GL
    if _GL is None:
        import numpy as np  # once per process; never in a sampling loop

        nodes, weights = np.polynomial.legendre.leggauss(16)
        _GL = (nodes.tolist(), weights.tolist())
    return _GL


VarFn = Callable[[list[float]], list[float]]


def exp_integral_weights(
    h: float, nodes: list[float], alpha_s: float, var: VarFn | None = None
) -> list[float]:
    """w_j = alpha_s int_{-h}^{0} e^u L_j(v(u)) du for the Lagrange basis on the nodes
    v(nodes) (u = lambda - lambda_s, so nodes lie in [-h, 0] for a corrector and at or left
    of -h for a predictor). `var` maps a list of u to the interpolation variable v (default
    v = u: the polynomial in lambda; an affine v gives the same weights)."""
    if len(nodes) == 1:
        return [-alpha_s * math.expm1(-h)]  # exact: alpha_s (1 - e^{-h})
    xs, ws = _gauss_legendre()
    us = [0.5 * h * (xq - 1.0) for xq in xs]
    vq, vn = (us, nodes) if var is None else (var(us), var(nodes))
    out = []
    for j, nu_j in enumerate(vn):
        total = 0.0
        for u, v, wq in zip(us, vq, ws, strict=True):
            basis = 1.0
            for m, nu_m in enumerate(vn):
                if m != j:
                    basis *= (v - nu_m) / (nu_j - nu_m)
            total += wq * math.exp(u) * basis
        out.append(alpha_s * 0.5 * h * total)
    return out


def sde_weights(
    h: float, nodes: list[float], alpha_s: float, tau: float, var: VarFn | None = None
) -> list[float]:
    """w_j = alpha_s int_{-h}^0 r e^{r u} L_j(v(u)) du, r = 1 + tau^2 (tau = 0: the ODE's)."""
    r = 1.0 + tau * tau
    scaled = None if var is None else (lambda us: var([w / r for w in us]))
    return exp_integral_weights(r * h, [r * nu for nu in nodes], alpha_s, scaled)


def step_orders(lam: list[float], order: int, lower_order_final: bool) -> list[int]:
    """The order of each step on a grid with log-SNR values `lam` (lambda = log(alpha/sigma)).

    Warm-up: min(order, i + 1). With `lower_order_final`, the final steps near sigma = 0 use
    min(., num_steps - i) (so the last is first order) when there are fewer than 15 steps (as
    in Lu et al.'s and diffusers' solvers), and any step more than twice as long in lambda as
    the one before it does too: extrapolating the data prediction that far past the last
    points is what blows up (e.g. a time-uniform grid's last step, h ratio ~4).
    """
    n = len(lam) - 1
    orders = []
    for i in range(n):
        k = min(order, i + 1)
        h = lam[i + 1] - lam[i]
        long_step = i > 0 and h > 2.0 * (lam[i] - lam[i - 1])
        if lower_order_final and (n < 15 or long_step):
            k = min(k, n - i)
        orders.append(k)
    return orders


@dataclass
class MultistepPlan:
    """Everything the loop needs, per step i (t_i -> t_{i+1}), as floats and slot weights.

    ratio[i]: (sigma_s/sigma_t) e^{-tau^2 h}; noise[i]: the std of the fresh noise;
    pred[i] / corr[i]: weights over the S ring slots (slot of u_j is j % S) for the
    predictor and for the corrector's increment (None: no corrector on that step);
    s2[j]: sigma_j^2 for u_j = x_j + sigma_j^2 s_j; slots: S.
    """

    ratio: list[float]
    noise: list[float]
    pred: list[list[float]]
    corr: list[list[float] | None]
    s2: list[float]
    slots: int
    _tables: dict = field(default_factory=dict, repr=False)

    def tables(self, co: Coefficients, x: Tensor) -> tuple[list, list, list]:
        """The plan as tensors on x's device and dtype (made once per device, dtype and
        batch size): [B] views of the grid times (CountedScore passes them on without
        allocating), the predictor rows `[S]` and the corrector rows (None: no corrector)."""
        key = (x.device, x.dtype, x.shape[0])
        if key not in self._tables:
            if len(self._tables) >= 4:
                self._tables.clear()
            kw = dict(device=x.device, dtype=x.dtype)
            times = torch.tensor(co.t, **kw)
            t_batch = [times[i].expand(x.shape[0]) for i in range(len(co.t))]
            pred = list(torch.tensor(self.pred, **kw).unbind(0))
            n = len(self.pred)
            corr = [
                torch.tensor(c, **kw) if c is not None and i < n - 1 else None
                for i, c in enumerate(self.corr)
            ]
            self._tables[key] = (t_batch, pred, corr)
        return self._tables[key]


def make_plan(
    co: Coefficients,
    pred_orders: list[int],
    corr_orders: list[int],
    taus: list[float],
    var: Callable[[list[float]], list[float]] | None = None,
) -> MultistepPlan:
    """The plan for a grid: `pred_orders[i]` past values in step i's predictor,
    `corr_orders[i]` values (the new one and corr_orders[i] - 1 past ones) in its corrector
    (0: none; the last step never has one: it would cost an extra evaluation), `taus[i]` its
    noise level. `var` maps lambda values to the variable in which the data prediction is
    interpolated (None: lambda itself)."""
    n = len(co.t) - 1
    # A corrected step writes u_{i+1} into the ring before its increment reads the predictor's
    # slots (u_i, ..., u_{i-k+1}): it needs k + 1 distinct slots, whatever the corrector order.
    corrected = [k + 1 for k, kc in zip(pred_orders, corr_orders, strict=True) if kc > 0]
    slots = max(max(pred_orders), max(corr_orders, default=0), max(corrected, default=0), 1)
    ratio, noise, pred, corr = [], [], [], []
    for i in range(n):
        tau, lam_s, a_s = taus[i], co.lam[i + 1], co.alpha[i + 1]
        h = lam_s - co.lam[i]
        step_var = None if var is None else _shifted(var, lam_s)
        ratio.append(co.sigma[i + 1] / co.sigma[i] * math.exp(-tau * tau * h))
        noise.append(co.sigma[i + 1] * math.sqrt(-math.expm1(-2.0 * tau * tau * h)))
        k = pred_orders[i]
        idx = [i - j for j in range(k)]  # grid indices of u_i, u_{i-1}, ...
        w = sde_weights(h, [co.lam[j] - lam_s for j in idx], a_s, tau, step_var)
        row = [0.0] * slots
        for j, wj in zip(idx, w, strict=True):
            row[j % slots] += wj / co.alpha[j]  # the loop holds alpha_j x0_j, not x0_j
        pred.append(row)
        kc = corr_orders[i] if i < n - 1 else 0
        if kc <= 0:
            corr.append(None)
            continue
        cidx = [i + 1 - j for j in range(kc)]  # u_{i+1}, u_i, ...
        wc = sde_weights(h, [co.lam[j] - lam_s for j in cidx], a_s, tau, step_var)
        crow = [0.0] * slots
        for j, wj in zip(cidx, wc, strict=True):
            crow[j % slots] += wj / co.alpha[j]
        # increment = corrector combination - predictor combination (same x_t term, same z)
        corr.append([c - p for c, p in zip(crow, row, strict=True)])
    s2 = [s * s for s in co.sigma]
    return MultistepPlan(ratio, noise, pred, corr, s2, slots)


def _shifted(var: VarFn, lam_s: float) -> VarFn:
    """u -> var(lam_s + u) on lists."""
    return lambda us: var([lam_s + u for u in us])


def time_variable(sde: Any) -> VarFn:
    """lambda -> t on lists (`sde.t_from_log_snr`; lambda is half the log-SNR): interpolating
    the data prediction as a polynomial in t rather than lambda (DEIS's "tAB", in the data
    prediction; `DPMSolverSampler(interpolation="t")`)."""

    def var(lams: list[float]) -> list[float]:
        lam = torch.tensor(lams, dtype=torch.float64)
        return sde.t_from_log_snr(2.0 * lam).to(torch.float64).tolist()

    return var


def run_plan(
    ctx: SamplingContext,
    x: Tensor,
    co: Coefficients,
    plan: MultistepPlan,
) -> Tensor:
    """Integrate x `[B, *D]` from co.t[0] to co.t[-1] with the plan; returns x at the end."""
    n = len(plan.ratio)
    shape = x.shape
    t_batch, pred, corr = plan.tables(co, x)
    noise = [c if c > 0.0 else None for c in plan.noise]
    # Zero-filled: unused slots have weight 0 and must not hold NaN garbage (0 * NaN = NaN).
    ring = torch.zeros((plan.slots, x.numel()), device=x.device, dtype=x.dtype)
    ring_t, slots = ring.t(), ring.unbind(0)  # [B*D, S] and the S rows
    torch.add(x.reshape(-1), ctx.score(x, t_batch[0]).reshape(-1), alpha=plan.s2[0], out=slots[0])
    for i in ctx.steps(n):
        flat = torch.addmv(x.reshape(-1), ring_t, pred[i], beta=plan.ratio[i])
        x = flat.view(shape)
        if noise[i] is not None:
            flat.add_(ctx.randn_like(x).reshape(-1), alpha=noise[i])
        if i < n - 1:
            score = ctx.score(x, t_batch[i + 1])
            torch.add(
                flat, score.reshape(-1), alpha=plan.s2[i + 1], out=slots[(i + 1) % plan.slots]
            )
            c = corr[i]
            if c is not None:
                flat.addmv_(ring_t, c)
        x = ctx.after_step(i, co.t[i + 1], x)
    return x


TauFn = Callable[[float], float]


def resolve_taus(tau: float | TauFn, co: Coefficients) -> list[float]:
    """tau per step: a constant, or tau(t) evaluated once per step at its start time t_i."""
    if callable(tau):
        out = []
        for t in co.t[:-1]:
            v = float(tau(t))
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"tau(t) must return a finite number >= 0, got {v!r} at t={t}")
            out.append(v)
        return out
    return [float(tau)] * (len(co.t) - 1)
