"""Multistep solvers fitted to one model ("bespoke" solvers; opt-in, via a calibration).

A deterministic n-step exponential multistep sampler (DPM-Solver++ and its corrector, DDIM)
is, once its grid is fixed, a linear recursion in the evaluations u_j = x_j + sigma_j^2
s(x_j, t_j) = alpha_j x0_j:

    x_{i+1} = r_i x_i + sum_{j <= i} w_ij u_j,       i = 0 .. n-1,

from x_0 = x_T, with the model evaluated at x_i and time t_i; x_n is the sample at eps. (The
UniPC-style corrector folds in: it only changes how past u_j enter the next step.) Its
ratios r_i and weights w_ij come from a polynomial model of the data prediction. A bespoke
solver (Shaul et al. 2023, "Bespoke Solvers for Generative Flow Models"; 2024, "Bespoke
Non-Stationary Solvers") keeps the recursion and its n evaluations but fits the times t_i,
r_i and w_ij to the model: gradient descent on the mean squared distance between x_n and
tight solutions of the probability-flow ODE from the same pilot x_T, starting from the
solver it replaces (so the fit begins at that solver's error). n + n(n+1)/2 + (n-1)
numbers - 74 at 10 steps - fitted on thousands of pilots generalise to fresh draws; the fit
keeps the parameters with the lowest error on held-out pilots and reports it.

`LearnedMultistepSampler` runs a fitted solver on the shared multistep engine (one `addmv`
per step); `fit_multistep` fits one. Use them through `scoresde.calibration.calibrate(...,
method="solver")`, which records the result with the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import check_positive_int
from scoresde.samplers._multistep import MultistepPlan, run_plan
from scoresde.samplers.base import Sampler, SamplingContext
from scoresde.samplers.toolkit import Coefficients, cached
from scoresde.sdes import SDE

_MIN_GAP = 1e-4  # smallest lambda increment between fitted evaluation times


def _as_list(name: str, value: Any, length: int) -> list[float]:
    out = torch.as_tensor(value, dtype=torch.float64).flatten().tolist()
    if len(out) != length or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {length} finite numbers, got {value!r}")
    return out


class LearnedMultistepSampler(Sampler):
    """x_{i+1} = ratio_i x_i + sum_{j<=i} weights_ij u_j, u_j = x_j + sigma(t_j)^2 s(x_j, t_j).

    NFE = n = len(times). Made by `fit_multistep` (or read back from a `Calibration`).

    Args:
        sde: the forward SDE.
        times: the n evaluation times `[n]`, strictly decreasing from times[0] = T, all
            above eps.
        ratios: r_i `[n]`.
        weights: w_ij `[n, n]` (lower triangular: entries j > i must be 0).
        eps: the end time (the samples are at eps).
    """

    def __init__(self, sde: SDE, times: Any, ratios: Any, weights: Any, eps: float) -> None:
        super().__init__(sde)
        t = torch.as_tensor(times, dtype=torch.float64).flatten()
        n = t.numel()
        if n < 1:
            raise ValueError("times must hold at least one evaluation time")
        self.eps = float(eps)
        if not (0.0 < self.eps < sde.T):
            raise ValueError(f"eps must be in (0, T={sde.T}), got {eps!r}")
        self.times = _as_list("times", t, n)
        ok = self.times[0] == sde.T and all(
            a > b for a, b in zip(self.times, self.times[1:], strict=False)
        )
        if not ok or not self.times[-1] > self.eps:
            raise ValueError(
                f"times must decrease strictly from T={sde.T} and stay above eps={self.eps}, "
                f"got {self.times}"
            )
        self.ratios = _as_list("ratios", ratios, n)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (n, n):
            raise ValueError(f"weights must be [{n}, {n}], got shape {tuple(w.shape)}")
        if bool((w.triu(1) != 0).any()) or not bool(w.isfinite().all()):
            raise ValueError("weights must be finite and lower triangular (w_ij = 0 for j > i)")
        self.weights = w.tolist()
        self.num_steps = n

    def _plan(self) -> tuple[Coefficients, MultistepPlan]:
        co = Coefficients(self.sde, torch.tensor([*self.times, self.eps], dtype=torch.float64))
        n = self.num_steps
        s2 = [s * s for s in co.sigma]
        plan = MultistepPlan(self.ratios, [0.0] * n, self.weights, [None] * n, s2, n)
        return co, plan

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        key = (tuple(self.times), tuple(self.ratios), self.eps)
        key += tuple(tuple(row) for row in self.weights)
        co, plan = cached(self, key, self._plan)
        return run_plan(ctx, x, co, plan)


def unrolled(sampler: Any) -> tuple[list[float], list[float], list[list[float]], float]:
    """(times, ratios, weights, eps) of a deterministic DPM-Solver++ sampler written as the
    recursion above (the corrector folded into the next step's weights); running them with
    `LearnedMultistepSampler` reproduces the sampler to round-off."""
    if getattr(sampler, "stochastic", True) or getattr(sampler, "denoise", True):
        raise ValueError(
            f"only a deterministic DPMSolverSampler without denoise can be unrolled, got "
            f"{sampler!r}"
        )
    co, plan = sampler._plan()
    n, slots = len(plan.ratio), plan.slots

    def full(row: list[float], last: int) -> list[float]:
        """Ring-slot weights -> weights over u_0..u_{n-1} (slot s holds the latest u_j,
        j <= last, with j % slots == s)."""
        out = [0.0] * n
        for s, v in enumerate(row):
            j = last - ((last - s) % slots)
            if 0 <= j < n:
                out[j] += v
        return out

    weights = [full(plan.pred[i], i) for i in range(n)]
    for i in range(1, n):
        c = plan.corr[i - 1]
        if c is not None:  # x_i += c.u after u_i; the next step multiplies x_i by r_i
            for j, v in enumerate(full(c, i)):
                weights[i][j] += plan.ratio[i] * v
    return co.t[:-1], list(plan.ratio), weights, co.t[-1]


def fit_multistep(
    score_fn: ScoreFn,
    sde: SDE,
    start: tuple[list[float], list[float], list[list[float]], float],
    x_T: Tensor,
    x_ref: Tensor,
    *,
    iterations: int = 400,
    lr: float = 1e-3,
    time_lr: float = 1e-2,
    validation: float = 0.25,
    batch_size: int | None = None,
    on_eval: Callable[[int], None] | None = None,
) -> tuple[LearnedMultistepSampler, dict[str, Any]]:
    """Fit a bespoke solver to `score_fn` (see the module doc) from `start` = (times, ratios,
    weights, eps) (e.g. `unrolled(DPMSolverSampler(...))`).

    Args:
        x_T: pilot prior draws `[B, *D]`; x_ref: their tight probability-flow solutions at
            eps `[B, *D]`. The last `validation` fraction is held out: the returned solver is
            the iterate with the lowest held-out RMS error (the start if none beats it).
        iterations: Adam steps (full batch unless `batch_size`), cosine-decayed rate `lr` (relative
            change of the ratios, absolute change of the weights; both scaled by alpha(eps))
            and `time_lr` (the interior evaluation times, moved in lambda = log(alpha/sigma)).
        batch_size: Adam steps on this many training pilots drawn afresh each step (a
            private generator, seed 0) instead of all of them: each step costs
            batch_size / (training pilots) of a full one, for a noisier gradient. None: all.
        on_eval: called with the number of score evaluations of each pass (each on the
            training pilots, or on a batch of them), so the caller can count NFE.

    Returns:
        (the fitted `LearnedMultistepSampler`, info: "initial_error" / "error" (held-out RMS
        pathwise error of the start and the result), "gain_z" (the mean paired per-path
        reduction of the squared error over its standard error, on the held-out pilots),
        "train_error", "iterations",
        "gradients" (training passes: n evaluations forward and back), "best_iteration").
    """
    if not (0.0 < validation < 1.0):
        raise ValueError(f"validation must be in (0, 1), got {validation!r}")
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    b = x_T.shape[0]
    n_val = max(1, int(round(b * validation)))
    if b - n_val < 1:
        raise ValueError(f"need at least 2 pilots, got {b}")
    fit = _Recursion(score_fn, sde, start, x_T)
    n, params = fit.n, fit.params
    train_x, val_x = x_T[: b - n_val].detach(), x_T[b - n_val :].detach()
    train_ref, val_ref = x_ref[: b - n_val].detach(), x_ref[b - n_val :].detach()

    def validate() -> tuple[float, Tensor]:
        """(held-out RMS error, per-path squared errors `[B_val]`)."""
        with torch.no_grad():
            sq = (fit.run(val_x, *fit.solver()) - val_ref).flatten(1).square().sum(1)
        if on_eval is not None:
            on_eval(n)
        err = math.sqrt(float(sq.mean()))
        return (err, sq) if math.isfinite(err) else (math.inf, sq)

    initial, initial_sq = validate()
    best = (initial, -1, [p.detach().clone() for p in params], initial_sq)
    opt = torch.optim.Adam(
        [{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": time_lr}]
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iterations, 1))
    check_every = max(1, iterations // 20)
    train, gradients = math.nan, 0
    batch = _Batches(train_x, train_ref, batch_size)
    for it in range(iterations):
        xb, rb = batch()
        with torch.enable_grad():
            loss = (fit.run(xb, *fit.solver()) - rb).flatten(1).square().sum(1).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        gradients += 1
        if on_eval is not None:
            on_eval(n)
        if not bool(torch.isfinite(loss)):
            break  # diverged: keep the best iterate so far
        train = math.sqrt(float(loss.detach()))
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.nan_to_num(0.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        fit.project()
        if (it + 1) % check_every == 0 or it == iterations - 1:
            err, sq = validate()
            if err < best[0]:
                best = (err, it, [p.detach().clone() for p in params], sq)
    for p, v in zip(params, best[2], strict=True):
        p.data.copy_(v)
    info = dict(initial_error=initial, error=best[0], train_error=train, iterations=iterations)
    info.update(best_iteration=best[1], gradients=gradients)
    info["gain_z"] = _gain_z(initial_sq, best[3], moved=best[1] >= 0)
    return fit.result(), info


def _gain_z(initial_sq: Tensor, best_sq: Tensor, moved: bool) -> float:
    """Mean paired per-path reduction of the squared error over its standard error. Per-path
    errors are heavy tailed (paths near a boundary between modes dominate the RMS), so a
    lower RMS can be luck: `calibrate` keeps a fit only if this is over 2 on test pilots."""
    gain = (initial_sq - best_sq).nan_to_num(0.0)
    se = float(gain.std()) / math.sqrt(gain.numel()) if gain.numel() > 1 else math.inf
    return float(gain.mean()) / se if se > 0 else (math.inf if moved else 0.0)


class _Batches:
    """Each call: (x_T, x_ref) of all training pilots, or of `size` of them drawn afresh
    (a private generator, seed 0)."""

    def __init__(self, x: Tensor, ref: Tensor, size: int | None) -> None:
        self.x, self.ref = x, ref
        self.size = None if size is None or size >= x.shape[0] else size
        self.gen = torch.Generator(device=x.device).manual_seed(0) if self.size else None

    def __call__(self) -> tuple[Tensor, Tensor]:
        if self.size is None:
            return self.x, self.ref
        pick = torch.randperm(self.x.shape[0], generator=self.gen, device=self.x.device)
        pick = pick[: self.size]
        return self.x[pick], self.ref[pick]


class _Recursion:
    """The differentiable recursion of `fit_multistep`: parameters (relative ratio changes,
    weight changes, interior lambda shifts), the solver they give, and a run on pilots."""

    def __init__(self, score_fn: ScoreFn, sde: SDE, start: tuple, x_T: Tensor) -> None:
        times0, ratios0, weights0, self.eps = start
        self.score_fn, self.sde, self.n = score_fn, sde, len(times0)
        n = self.n
        self.kw = kw = dict(dtype=x_T.dtype, device=x_T.device)
        self.r0, self.w0 = torch.tensor(ratios0, **kw), torch.tensor(weights0, **kw)
        self.mask = torch.ones(n, n, **kw).tril()
        self.lam_all = 0.5 * sde.log_snr(torch.tensor([*times0, self.eps], dtype=torch.float64))
        lam_lo, lam_hi = float(self.lam_all[0]), float(self.lam_all[-1])
        # Interior lambda_i (i = 1..n-1) in [lo_i, hi_i]: strictly inside (lambda(T),
        # lambda(eps)) with room for a gap of _MIN_GAP between neighbours.
        idx = torch.arange(1, n, dtype=torch.float64)
        self.lo, self.hi = lam_lo + idx * _MIN_GAP, lam_hi - (n - idx) * _MIN_GAP
        self.scale = float(sde.alpha(torch.tensor([self.eps], dtype=torch.float64)))
        self.t_first = torch.tensor([times0[0]], **kw)  # T exactly (no trip through lambda)
        d_ratio = torch.zeros(n, **kw, requires_grad=True)
        d_weight = torch.zeros(n, n, **kw, requires_grad=True)
        d_lam = torch.zeros(max(n - 1, 0), **kw, requires_grad=True)
        self.params = [d_ratio, d_weight, d_lam]

    def _lam(self, d_lam: Tensor) -> Tensor:
        """Interior lambdas, clamped to their bounds and increasing by >= _MIN_GAP."""
        lam = self.lam_all[1 : self.n].to(d_lam) + d_lam
        lam = torch.minimum(torch.maximum(lam, self.lo.to(lam)), self.hi.to(lam))
        steps = torch.arange(lam.numel(), dtype=lam.dtype, device=lam.device) * _MIN_GAP
        return torch.cummax(lam - steps, 0).values + steps

    def project(self) -> None:
        """Put the lambda shifts back where the times decrease strictly."""
        d_lam = self.params[2]
        with torch.no_grad():
            d_lam.copy_(self._lam(d_lam) - self.lam_all[1 : self.n].to(d_lam))

    def solver(self) -> tuple[Tensor, Tensor, Tensor]:
        d_ratio, d_weight, d_lam = self.params
        ratios = self.r0 * (1.0 + self.scale * d_ratio)
        weights = self.w0 + self.scale * d_weight * self.mask
        times = self.sde.t_from_log_snr(2.0 * self._lam(d_lam)).to(**self.kw).clamp(max=self.sde.T)
        return torch.cat([self.t_first, times]), ratios, weights

    def run(self, x: Tensor, times: Tensor, ratios: Tensor, weights: Tensor) -> Tensor:
        sigma2 = self.sde.sigma(times).square()
        us: list[Tensor] = []
        for i in range(self.n):
            us.append(x + sigma2[i] * self.score_fn(x, times[i].expand(x.shape[0])))
            step = ratios[i] * x
            for j, u in enumerate(us):  # no re-stacking of the history each step
                step = step + weights[i, j] * u
            x = step
        return x

    def result(self) -> LearnedMultistepSampler:
        """The current solver; its times from float64 lambdas (a float32 run could round
        two neighbours to the same t)."""
        with torch.no_grad():
            _, ratios, weights = self.solver()
            lam = self._lam(self.params[2].detach().cpu().double())
            t0 = torch.tensor([float(self.t_first)], dtype=torch.float64)
            times = torch.cat([t0, self.sde.t_from_log_snr(2.0 * lam).double()])
        return LearnedMultistepSampler(self.sde, times, ratios.cpu(), weights.cpu(), self.eps)


__all__ = ["LearnedMultistepSampler", "fit_multistep", "unrolled"]
