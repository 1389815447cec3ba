"""Adaptive-step reverse-SDE sampler (Jolicoeur-Martineau et al. 2021, "Gotta Go Fast").

The reverse SDE dx = [f(t) x - g(t)^2 s(x, t)] dt + g(t) dW_bar is integrated from T down to
eps with an embedded pair; with b(x, t) = f(t) x - g(t)^2 s(x, t), a step t -> t - h is

    x'  = x - h b(x, t) + g(t) dW                                   (Euler–Maruyama)
    x'' = x - h/2 [b(x, t) + b(x', t - h)] + (g(t) + g(t - h))/2 dW  (stochastic improved Euler)

(2 NFE) and the scaled error of the pair decides:

    E = ||(x' - x'') / delta||_2 / sqrt(D),   delta = max(atol, rtol max(|x'|, |x|)),

accept if E <= 1 (keeping x'', the higher-order value: "extrapolation"), and in any case
h <- min(h_max, safety h E^(-r)).

Differences from the published algorithm, both on purpose:
- Every sample has its own t and h (a batch-wide step would make sample i depend on the
  others); finished samples are not evaluated again: the score is called on the active subset
  only (one call = one NFE), and the score at (x, t) of a rejected sample is reused.
- The Brownian increment dW = W(t) - W(t - h) comes from one Brownian path per sample,
  fixed before the first step: a virtual Brownian tree (`_brownian.BrownianTree`) whose
  every value is a function of (the run's key, the global sample index, the time), so the
  noise is never redrawn. Redrawing it after a rejection (as the paper does) accepts
  preferentially the draws that make the error small, which biases the samples (on N(0, I)
  data, std ~1.26 in 2-D, ~1.5 in 1-D, at any tolerance). The key is the per-sample Philox
  key with `batch_invariant=True`, else one drawn from `generator`.
- Because the path is fixed, a sample is a continuous function of the solver's decisions:
  a smaller tolerance converges to the strong solution of the same path, and a decision
  flipped by rounding (a network can round differently in the last bit for another batch
  size) ends within about the solver's error. With noise drawn per iteration, as before, a
  flipped decision put the sample on other draws: on a trained 2-D MLP, 188 of 200 samples
  took other steps in batches of 7 than in one of 200 and moved by up to 3.4 (data std 1);
  with the tree, 178 take other steps and move by 0.023 (median), 0.11 at most. The tree costs
  depth + 1 = 31 normals per entry and iteration: +10-20 % on a trained MLP on the CPU, up
  to 5x on a cheap exact score.

Callback: `callback(step, t, x)` runs once per iteration with t the per-sample times, a
float64 tensor `[B]` (eps for finished samples; a rejected sample's t does not move). A
replacement x (returned, or written in place) is honoured: the changed samples' cached
score s(x, t) is recomputed (one more call), so inpainting by replacement works.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scoresde._control import ControllerState, StepController
from scoresde._typing import Tensor
from scoresde._validation import check_bool, check_eps, check_positive, check_positive_int
from scoresde.samplers._brownian import BrownianTree, _put, _take
from scoresde.samplers.base import Sampler, SamplingContext
from scoresde.samplers.philox import PhiloxNormal
from scoresde.sdes import SDE


def _progress_bar(ctx: SamplingContext) -> Any:
    """A tqdm bar of the time covered by the slowest sample, (T - max_i t_i) / (T - eps),
    when progress was asked for (None otherwise)."""
    if not ctx.progress:
        return None
    from tqdm.auto import tqdm

    fmt = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"
    return tqdm(total=1.0, desc=ctx.desc, leave=False, bar_format=fmt)


def _update_bar(bar: Any, t: Tensor, eps: float, T: float, nfe: int) -> None:
    """Move the bar to the slowest sample's progress (one sync; only with progress=True)."""
    t_max, n_done = torch.stack([t.max(), (t <= eps).sum().to(t.dtype)]).tolist()
    bar.update(min(max((T - t_max) / (T - eps), 0.0), 1.0) - bar.n)
    bar.set_postfix(nfe=nfe, finished=int(n_done), refresh=False)


def _take_state(state: ControllerState, sel: Tensor | None) -> ControllerState:
    return state if sel is None else state.select(sel)


def _put_state(state: ControllerState, sel: Tensor | None, new: ControllerState) -> ControllerState:
    if sel is None:
        return new
    return ControllerState(
        _put(state.log_err_prev, sel, new.log_err_prev), _put(state.rejected, sel, new.rejected)
    )


class AdaptiveSDESampler(Sampler):
    """Adaptive EM / improved-Euler reverse-SDE sampler with per-sample step sizes.

    After `sample`: `nfe` (all calls, rejected steps included), `accepted_steps` and
    `rejected_steps` (`[B]` int64 per sample). The callback gets per-sample times `t` `[B]`
    (see the module docstring); `progress=True` shows the time covered by the slowest
    sample, (T - max_i t_i) / (T - eps), with the NFE and the number of finished samples.

    Args:
        sde: the forward SDE.
        rtol, atol: relative and absolute tolerances of the error estimate (atol defaults to
            0.0078 as in the paper, ~ 1/128 for data in [-1, 1]).
        eps: the end time.
        h_init: the first step size; h_max: the largest (default T - eps).
        safety: the controller's safety factor; exponent: r in h E^(-r) (0.9 in the paper).
        extrapolate: keep the improved-Euler value x'' (True) or the EM value x'.
        denoise: finish with a Tweedie step x0_hat(x, eps) (one more NFE).
        max_iters: give up (RuntimeError) after this many iterations.
    """

    def __init__(
        self,
        sde: SDE,
        rtol: float = 1e-2,
        atol: float = 0.0078,
        eps: float = 1e-3,
        h_init: float = 1e-2,
        safety: float = 0.9,
        exponent: float = 0.9,
        h_max: float | None = None,
        extrapolate: bool = True,
        denoise: bool = True,
        max_iters: int = 100_000,
    ) -> None:
        super().__init__(sde)
        self.rtol = check_positive("rtol", rtol)
        self.atol = check_positive("atol", atol)
        self.eps = check_eps(eps, sde)
        self.h_init = check_positive("h_init", h_init)
        self.safety = check_positive("safety", safety)
        if self.safety > 1.0:
            raise ValueError(f"safety must be in (0, 1], got {safety!r}")
        self.exponent = check_positive("exponent", exponent)
        self.h_max = sde.T - self.eps if h_max is None else check_positive("h_max", h_max)
        self.extrapolate = check_bool("extrapolate", extrapolate)
        self.denoise = check_bool("denoise", denoise)
        self.max_iters = check_positive_int("max_iters", max_iters)
        self.accepted_steps: Tensor | None = None
        self.rejected_steps: Tensor | None = None

    def _coefs(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """f(t) and g(t) `[b, 1]` in the data's dtype, for times t `[b]`."""
        f = self.sde.drift_coef(t).to(dtype)[:, None]
        g = self.sde.diffusion_coef(t).to(dtype)[:, None]
        return f, g

    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        shape, batch = x.shape, x.shape[0]
        dtype, device = x.dtype, x.device
        x = x.reshape(batch, -1).clone()  # [B, D]
        eps, T = self.eps, self.sde.T
        t = torch.full((batch,), T, dtype=torch.float64, device=device)
        h = torch.full_like(t, min(self.h_init, self.h_max))
        f_t, g_t = self._coefs(t, dtype)  # f, g at each sample's t, refreshed on acceptance
        path = self._brownian_tree(ctx, batch, x.shape[1], device, dtype)
        w_t = path.query(None, t)  # W at each sample's current time
        score_t = torch.empty_like(x)  # s(x, t), reused after a rejection
        fresh = torch.zeros(batch, dtype=torch.bool, device=device)
        accepted = torch.zeros(batch, dtype=torch.int64, device=device)
        rejected = torch.zeros_like(accepted)
        ctrl = self._controller()
        state = ctrl.init_state(batch, torch.float64, device)
        bar = _progress_bar(ctx)
        it = 0
        try:
            while True:
                active = t > eps
                idx = torch.nonzero(active).squeeze(1)  # one sync per iteration ends the loop
                if idx.numel() == 0:
                    break
                ctrl.check_steps(it, idx.numel(), f"eps={eps}")
                # sel: the active rows, None when all are (no gathers then).
                sel = None if idx.numel() == batch else idx
                stale = torch.nonzero(active & ~fresh).squeeze(1)
                if stale.numel() == batch:
                    score_t = self._score(ctx, x, t, shape)
                elif stale.numel() > 0:
                    score_t[stale] = self._score(ctx, x[stale], t[stale], shape)
                fresh |= active
                x_a, t_a, h_a = _take(x, sel), _take(t, sel), _take(h, sel)
                f_a, g_a = _take(f_t, sel), _take(g_t, sel)
                # The last step lands exactly on eps.
                q = (t_a - h_a).clamp_(min=eps)
                step = t_a - q
                w_q = path.query(sel, q)
                dw = _take(w_t, sel) - w_q  # W(t) - W(q): the reverse-time increment
                f_q, g_q = self._coefs(q, dtype)
                s_a = score_t if sel is None else score_t[sel]
                x_em, diff = self._pair(ctx, x_a, q, step, f_a, g_a, f_q, g_q, dw, s_a, shape)
                # The controller (scoresde._control): E, accept, the next step, NaN report.
                E = ctrl.error_norm(diff.clone(), x_a, x_em, norm=self._rms64)
                ok, h_next, st = ctrl.decide(E, step, _take_state(state, sel), t=t_a)
                state = _put_state(state, sel, st)
                h = _put(h, sel, h_next)
                ok_col = ok[:, None]
                x_new = x_em - diff if self.extrapolate else x_em
                x = _put(x, sel, torch.where(ok_col, x_new, x_a))
                # t is replaced, not written in place: the callback and the guard may keep it.
                t_new = torch.where(ok, q, t_a)
                t = t_new if sel is None else t.index_put((idx,), t_new)
                f_t = _put(f_t, sel, torch.where(ok_col, f_q, f_a))
                g_t = _put(g_t, sel, torch.where(ok_col, g_q, g_a))
                fresh = _put(fresh, sel, ~ok)
                accepted = _put(accepted, sel, _take(accepted, sel) + ok)
                rejected = _put(rejected, sel, _take(rejected, sel) + ~ok)
                w_t = _put(w_t, sel, torch.where(ok_col, w_q, _take(w_t, sel)))
                x, fresh = self._after_step(ctx, it, t, x, fresh, shape)
                if bar is not None:
                    _update_bar(bar, t, eps, T, ctx.score.nfe)
                it += 1
        finally:
            if bar is not None:
                bar.close()
        self.accepted_steps, self.rejected_steps = accepted, rejected
        x = x.reshape(shape)
        if self.denoise:
            alpha, sigma = self.sde.alpha(eps), self.sde.sigma(eps)
            score = ctx.score(x, eps)
            x = torch.add(x, score, alpha=float(sigma) ** 2).mul_(1.0 / float(alpha))
        return x

    def _brownian_tree(
        self, ctx: SamplingContext, batch: int, dim: int, device: torch.device, dtype: torch.dtype
    ) -> BrownianTree:
        """The samples' Brownian paths: keyed by the run's per-sample Philox key and global
        sample indices (batch_invariant=True), else by a key drawn from the generator."""
        noise = ctx.noise
        if not isinstance(noise, PhiloxNormal):
            noise = PhiloxNormal.from_generator(noise.generator)
        samples = noise.sample_offset + torch.arange(batch, device=device)
        return BrownianTree(noise.key, samples, dim, self.sde.T, device=device, dtype=dtype)

    def _controller(self) -> StepController:
        """The shared controller (scoresde._control) with this sampler's rule:
        h <- min(h_max, safety h E^(-r)) on every step, E with delta = max(atol, rtol |x|)."""
        return StepController(
            rtol=self.rtol, atol=self.atol, order=1.0, alpha=self.exponent,
            alpha_reject=self.exponent, safety=self.safety, min_factor=0.0,
            max_factor=math.inf, no_growth_after_reject=False, h_max=self.h_max,
            max_steps=self.max_iters, scale="max", on_nonfinite="raise",
            name="AdaptiveSDESampler", limit_name="max_iters",
        )  # fmt: skip

    @staticmethod
    def _rms64(ratio: Tensor) -> Tensor:
        """||ratio||_2 / sqrt(D) `[b]` in float64."""
        norm = torch.linalg.vector_norm(ratio, dim=1)
        return norm.to(torch.float64).mul_(ratio.shape[1] ** -0.5)

    def _pair(
        self, ctx: SamplingContext, x_a: Tensor, q: Tensor, step: Tensor, f_a: Tensor,
        g_a: Tensor, f_q: Tensor, g_q: Tensor, dw: Tensor, score_a: Tensor, shape: Any,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The solver step: Euler-Maruyama x' and the difference x' - x'' to the stochastic
        improved Euler value (one NFE, at (x', q))."""
        hh = step.to(x_a.dtype)[:, None]
        # b(x, t) = f x - g^2 s: the reverse drift, integrated backwards in time.
        b_a = torch.addcmul(f_a * x_a, g_a * g_a, score_a, value=-1.0)
        x_em = torch.addcmul(torch.addcmul(x_a, hh, b_a, value=-1.0), g_a, dw)
        s_q = self._score(ctx, x_em, q, shape)
        b_q = torch.addcmul(f_q * x_em, g_q * g_q, s_q, value=-1.0)
        # x' - x'' = h/2 (b(x', t - h) - b(x, t)) + (g(t) - g(t - h))/2 dW.
        diff = torch.addcmul(hh * (b_q - b_a), g_a - g_q, dw).mul_(0.5)
        return x_em, diff

    @staticmethod
    def _after_step(
        ctx: SamplingContext, it: int, t: Tensor, x: Tensor, fresh: Tensor, shape: Any
    ) -> tuple[Tensor, Tensor]:
        """ctx.after_step with per-sample times t `[B]`; rows the callback changed (returned
        or in place) lose their cached score s(x, t)."""
        view = x.view(shape)
        if ctx.callback is None:
            ctx.after_step(it, t, view)  # the NaN/Inf guard only: x is returned unchanged
            return x, fresh
        before = x.clone()
        out = ctx.after_step(it, t, view)
        if out is not view:  # a replacement: copy it, later steps write into x in place
            x = out.reshape(x.shape).to(before, copy=True)
        changed = (x != before).any(dim=1)
        return x, fresh & ~changed

    @staticmethod
    def _score(ctx: SamplingContext, x: Tensor, t: Tensor, shape: Any) -> Tensor:
        """ctx.score on a subset `[b, D]` at per-sample times `[b]` (one NFE)."""
        b = x.shape[0]
        out = ctx.score(x.reshape((b, *shape[1:])), t.to(x.dtype))
        return out.reshape(b, -1)
