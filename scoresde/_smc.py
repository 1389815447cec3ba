"""Twisted sequential Monte Carlo over a sampler's Gaussian reverse transitions (private; the
public entry points are `scoresde.guidance.inpaint(method="smc")` and
`scoresde.guidance.smc_sample`).

The twisted diffusion sampler (TDS, Wu et al. 2023, "Practical and Asymptotically Exact
Conditional Sampling in Diffusion Models"). A stochastic sampler is a Markov chain
x_0 = x_T -> x_1 -> ... -> x_n whose every step is Gaussian,

    p(x_{k+1} | x_k) = N(a_k x_k + b_k s(x_k, t_k), c_k^2 I),

(Euler–Maruyama, PC's predictors and the "ald" corrector, DDIM with eta > 0). To sample
p(x_n) G(x_n) / Z (G: a likelihood p(y | x_n), or the indicator x_n[mask] = y), K particles
per conditioning item carry "twisting functions" L_k(x) = log p~_k(y | x_k), an
approximation of log p(y | x_k) (built from the Tweedie estimate x0_hat(x_k), or given).
Each step

- resamples (systematic) an item's particles when its effective sample size drops below
  `ess_threshold * K`;
- proposes from the twisted transition q = N(m + c^2 grad L_k(x_k), c^2 I), m the
  sampler's mean (a first-order approximation of p(x_{k+1} | x_k) exp(L_{k+1}));
- multiplies the weights by p(x_{k+1} | x_k) exp(L_{k+1}(x_{k+1})) / (exp(L_k(x_k)) q).

The weights make the particle approximation consistent whatever the twist (the twist only
changes the variance): as K grows the weighted particles sample the chain's own law
conditioned on y, which is the true conditional up to the sampler's discretization error.
The product of the mean incremental weights estimates the evidence Z = E[G(x_n)].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde.samplers.base import CountedScore, NonFiniteGuard


@dataclass(frozen=True)
class Transition:
    """One Gaussian step x' ~ N(a x + b s(x, t), c^2 I) from time t to t_next <= t."""

    t: float
    t_next: float
    a: float
    b: float
    c: float


@dataclass
class ConditionalInfo:
    """Diagnostics of a conditional sampling run (`inpaint(..., return_info=True)`,
    `smc_sample(..., return_info=True)`).

    Attributes:
        method: "replace", "repaint" or "smc".
        nfe: score evaluations (one call on the whole particle batch = one NFE; with SMC each
            one also back-propagates through score_fn when twist_gradient="autograd").
        num_particles: K, the particles per conditioning item (1 for "replace"/"repaint").
        ess: `[S + 1, B]` effective sample size of each item's weights after the initial
            weighting and after each of the S steps (before any resampling), in [1, K].
            None unless SMC.
        resampled: `[S, B]` bool, whether an item's particles were resampled before step k.
        log_evidence: `[B]` the SMC estimate of log p(y) (inpainting: the log density of the
            sampler's final state at x[mask] = y; guidance: log E[p(y | x)]).
        particles: `[B, K, *D]` all final particles; `log_weights` `[B, K]` their normalised
            log weights (the weighted set is a lower-variance estimate than one draw).
    """

    method: str
    nfe: int
    num_particles: int = 1
    ess: Tensor | None = None
    resampled: Tensor | None = None
    log_evidence: Tensor | None = None
    particles: Tensor | None = None
    log_weights: Tensor | None = None


# --- the Gaussian transitions of the supported samplers --------------------------------------

SMC_SAMPLERS = (
    "EulerMaruyamaSampler (em)",
    "PCSampler (pc) with corrector None or 'ald', probability_flow=False",
    "DDIMSampler (ddim) with eta > 0",
)


def _unsupported(sampler: Any, why: str) -> ValueError:
    return ValueError(
        f"this method needs a sampler whose steps are Gaussian transitions; "
        f"{type(sampler).__name__} {why}. Supported: {'; '.join(SMC_SAMPLERS)}"
    )


def gaussian_transitions(sampler: Any) -> list[Transition]:
    """The sampler's chain as Gaussian steps (all stochastic, including the last one: the
    sampler's `denoise` is not applied, as the condition is placed on the last noisy state).
    """
    from scoresde.samplers.ddim import DDIMSampler, ddim_coefficients
    from scoresde.samplers.pc import (
        AnnealedLangevinCorrector,
        EulerMaruyamaSampler,
        PCContext,
        PCSampler,
        _LinearStepPredictor,
    )
    from scoresde.samplers.toolkit import Coefficients, make_grid

    sde = sampler.sde
    if isinstance(sampler, EulerMaruyamaSampler):
        grid = make_grid(sde, sampler.num_steps, sampler.time_grid, sampler.eps)
        t, h = grid[:-1], grid[:-1] - grid[1:]
        f, g2 = sde.reverse_coefficients(t)  # the reverse drift f x - g^2 s
        rows = zip(
            grid[:-1].tolist(),
            grid[1:].tolist(),
            (1 - h * f).tolist(),
            (h * g2).tolist(),
            torch.sqrt(h * g2).tolist(),
            strict=True,
        )
        return [Transition(*row) for row in rows]
    if isinstance(sampler, DDIMSampler):
        if sampler.eta == 0.0:
            raise _unsupported(sampler, "with eta=0 is deterministic (its steps have no density)")
        co = Coefficients(sde, make_grid(sde, sampler.num_steps, sampler.time_grid, sampler.eps))
        out = []
        for i, (a, b, c) in enumerate(ddim_coefficients(co, sampler.eta)):
            # x' = a x + b x0_hat + c z with x0_hat = (x + sigma^2 s) / alpha.
            alpha, sigma = co.alpha[i], co.sigma[i]
            out.append(Transition(co.t[i], co.t[i + 1], a + b / alpha, b * sigma**2 / alpha, c))
        return out
    if isinstance(sampler, PCSampler):
        pred, corr = sampler.predictor, sampler.corrector
        if sampler.probability_flow:
            raise _unsupported(sampler, "with probability_flow=True is deterministic")
        if pred is not None and not isinstance(pred, _LinearStepPredictor):
            raise _unsupported(sampler, f"has predictor {type(pred).__name__}")
        if corr is not None and not isinstance(corr, AnnealedLangevinCorrector):
            # The reference Langevin step size depends on the whole batch (its norms).
            raise _unsupported(sampler, f"has corrector {type(corr).__name__}")
        chain = sampler._chain
        times = torch.linspace(chain.T, sampler.eps, sampler.num_steps, dtype=torch.float64)
        pc = PCContext(None, chain, times, False)  # type: ignore[arg-type]
        after = pc.times[1:] + [max(pc.times[-1] - pc.dt, 0.0)]
        out = []
        if pred is not None:
            pred.prepare(pc)
        if corr is not None:
            corr.prepare(pc)
        for i, t in enumerate(pc.times):
            if corr is not None:
                e = corr._step[i]
                out += [Transition(t, t, 1.0, e, math.sqrt(2 * e))] * corr.n_steps
            if pred is not None:
                out.append(
                    Transition(t, after[i], pred._x_coef[i], pred._s_coef[i], pred._noise[i])
                )
        return out
    raise _unsupported(sampler, "is not one of them")


# --- twists ----------------------------------------------------------------------------------


class EndEstimate:
    """The Tweedie estimate of the chain's final state x_e (time t_e, usually eps) from x_t:

        x_t = a x_e + b xi  (forward SDE, a = alpha_t / alpha_e, b^2 = sigma_t^2 - a^2 sigma_e^2)
        =>  xhat_e(x_t) = E[x_e | x_t] = (x_t + b^2 s(x_t, t)) / a,

    (x0_hat when t_e = 0), with the variance v_t^2 = V b^2 / (a^2 V + b^2) of x_e given x_t
    for data N(0, d^2) (V = alpha_e^2 d^2 + sigma_e^2; Pi-GDM's r_t^2 at t_e = 0), which goes
    to 0 as t -> t_e, and the Jacobian d xhat_e / d x_t = (a v_t^2 / b^2) I of that Gaussian
    (used by the stop-gradient twist). Coefficients are Python floats cached per time.
    """

    def __init__(self, sde: Any, t_end: float, data_std: float) -> None:
        self.sde, self.t_end = sde, t_end
        te = torch.tensor(t_end, dtype=torch.float64)
        self.alpha_e, self.sigma_e = float(sde.alpha(te)), float(sde.sigma(te))
        self.V = self.alpha_e**2 * data_std**2 + self.sigma_e**2
        self._coef: dict[float, tuple[float, float, float, float]] = {}

    def coefficients(self, t: float) -> tuple[float, float, float, float]:
        """(1 / a, b^2, v_t^2, Jacobian scale) at time t."""
        if t not in self._coef:
            tt = torch.tensor(t, dtype=torch.float64)
            a = float(self.sde.alpha(tt)) / self.alpha_e
            b2 = max(float(self.sde.sigma(tt)) ** 2 - (a * self.sigma_e) ** 2, 1e-300)
            v2 = self.V * b2 / (a * a * self.V + b2)
            self._coef[t] = (1.0 / a, b2, v2, a * v2 / b2)
        return self._coef[t]

    def signal_fraction(self, t: float) -> float:
        """1 - v_t^2 / V in [0, 1]: 0 at high noise (x_t says nothing about x_e), 1 at t_e."""
        return 1.0 - self.coefficients(t)[2] / self.V

    def __call__(self, x: Tensor, t: float, score: Tensor) -> Tensor:
        inv_a, b2, _, _ = self.coefficients(t)
        return torch.add(x, score, alpha=b2) * inv_a


class Twist:
    """log p~_k(y | x) for the particles, and the final step.

    `log_twist(x, t, score)` -> `[N]` must be differentiable in x (directly, and through
    `score` when the score was computed from x with autograd); `stop_gradient(x, t, score)`
    -> (log twist, its gradient) with the score's Jacobian replaced by the Gaussian one.
    """

    needs_score_grad = True

    def log_twist(self, x: Tensor, t: float, score: Tensor) -> Tensor:
        raise NotImplementedError

    def stop_gradient(self, x: Tensor, t: float, score: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def final(
        self, mean: Tensor, c: float, grad: Tensor, z: Tensor, t_next: float
    ) -> tuple[Tensor, Tensor]:
        """The last step: (x_n `[N, *D]`, log[p(x_n | x) G(x_n) / q(x_n | x)] `[N]`)."""
        raise NotImplementedError


def _flat_sum(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


class InpaintTwist(Twist):
    """Inpainting (the final state's known coordinates must equal y): the twist

        log p~_t(y | x_t) = -|mask * (y - xhat_e(x_t))|^2 / (2 v_t^2)

    (`EndEstimate`; constants cancel between steps and are left out). The last step sets
    x[mask] = y and draws the unknown coordinates from the untwisted transition; its weight
    is the transition density of y, N(y; m[mask], c^2).
    """

    def __init__(self, end: EndEstimate, y: Tensor, mask: Tensor) -> None:
        self.end, self.y, self.mask = end, y, mask
        self.maskf = mask.to(y.dtype)
        self.num_known = float(_flat_sum(self.maskf.expand_as(y)[:1])[0])

    def log_twist(self, x: Tensor, t: float, score: Tensor) -> Tensor:
        v2 = self.end.coefficients(t)[2]
        return -0.5 / v2 * _flat_sum(self.maskf * (self.y - self.end(x, t, score)) ** 2)

    def stop_gradient(self, x: Tensor, t: float, score: Tensor) -> tuple[Tensor, Tensor]:
        _, _, v2, jac = self.end.coefficients(t)
        resid = self.maskf * (self.y - self.end(x, t, score))
        return -0.5 / v2 * _flat_sum(resid**2), resid * (jac / v2)

    def final(
        self, mean: Tensor, c: float, grad: Tensor, z: Tensor, t_next: float
    ) -> tuple[Tensor, Tensor]:
        x = torch.where(self.mask, self.y, mean + c * z)
        sq = _flat_sum(self.maskf * (self.y - mean) ** 2)
        log_n = -0.5 * sq / c**2 - self.num_known * (math.log(c) + 0.5 * math.log(2 * math.pi))
        return x, log_n


class LikelihoodTwist(Twist):
    """Guidance by a likelihood log p(y | x) = `log_likelihood_fn(x, t)` `[N]`:

    - "tweedie": log p~_t(y | x_t) = log_likelihood_fn(xhat_e(x_t), t_e), the likelihood
      of the final state applied to its Tweedie estimate (TDS; x0_hat when t_e = 0);
    - "direct": log p~_t(y | x_t) = log_likelihood_fn(x_t, t), a time-dependent classifier
      of noisy data (the exact twist when it is the exact p_t(y | x_t)).

    The last step is an ordinary twisted step whose twist is the likelihood itself,
    log_likelihood_fn(x_n, t_e).
    """

    def __init__(self, end: EndEstimate, log_likelihood_fn: Callable, mode: str) -> None:
        self.end, self.fn, self.mode = end, log_likelihood_fn, mode
        self.t_e = end.t_end
        self.needs_score_grad = mode == "tweedie"

    def _call(self, x: Tensor, t: float) -> Tensor:
        out = self.fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        if not torch.is_tensor(out) or out.shape != (x.shape[0],):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"log_likelihood_fn must return a tensor [N] = [{x.shape[0]}], {got}")
        return out

    def log_twist(self, x: Tensor, t: float, score: Tensor) -> Tensor:
        if self.mode == "direct":
            return self._call(x, t)
        return self._call(self.end(x, t, score), self.t_e) * self.end.signal_fraction(t)

    def stop_gradient(self, x: Tensor, t: float, score: Tensor) -> tuple[Tensor, Tensor]:
        rho = self.end.signal_fraction(t)
        with torch.enable_grad():
            xe = self.end(x.detach(), t, score.detach()).requires_grad_(True)
            log_twist = self._call(xe, self.t_e)
            (grad,) = torch.autograd.grad(log_twist.sum(), xe)
        return log_twist.detach() * rho, grad * (self.end.coefficients(t)[3] * rho)

    def final(
        self, mean: Tensor, c: float, grad: Tensor, z: Tensor, t_next: float
    ) -> tuple[Tensor, Tensor]:
        x = mean + (c * c) * grad + c * z
        with torch.enable_grad():
            log_g = self._call(x.detach(), self.t_e).detach()
        return x, _proposal_correction(grad, z, c) + log_g


def _proposal_correction(grad: Tensor, z: Tensor, c: float) -> Tensor:
    """log N(x'; m, c^2) - log N(x'; m + c^2 g, c^2) at x' = m + c^2 g + c z:
    -c^2 |g|^2 / 2 - c g.z  `[N]` (the exact difference, without forming either density)."""
    return -0.5 * c * c * _flat_sum(grad * grad) - c * _flat_sum(grad * z)


# --- the particle filter ---------------------------------------------------------------------


def _log_ess(log_w: Tensor) -> Tensor:
    """log ESS of normalised log weights `[B, K]` -> `[B]`: ESS = 1 / sum w^2."""
    return -torch.logsumexp(2 * log_w, dim=1)


def _systematic(log_w: Tensor, offsets: Tensor, generator: torch.Generator | None) -> Tensor:
    """Systematic resampling: ancestor indices `[B, K]` in [0, K) for weights `[B, K]`
    (offsets: arange(K) in log_w's dtype)."""
    b, k = log_w.shape
    u = torch.rand((b, 1), generator=generator, device=log_w.device, dtype=log_w.dtype)
    cdf = torch.cumsum(log_w.exp(), dim=1)
    return torch.searchsorted(cdf, (u + offsets) / k).clamp_(max=k - 1)


class ParticleFilter:
    """Runs the twisted SMC (module docstring) for B items with K particles each; particle
    j of item b is row b K + j of every `[N = B K, *D]` tensor."""

    def __init__(
        self,
        transitions: list[Transition],
        score_fn: ScoreFn,
        twist: Twist,
        *,
        batch: int,
        particles: int,
        generator: torch.Generator | None,
        ess_threshold: float,
        twist_gradient: str,
        progress: bool = False,
    ) -> None:
        self.transitions = transitions
        self.score = CountedScore(score_fn)
        self.twist = twist
        self.B, self.K = batch, particles
        self.generator = generator
        self.ess_threshold = ess_threshold
        self.stop = twist_gradient == "stop" and twist.needs_score_grad
        self.progress = progress

    def _evaluate(self, x: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """(score, log twist `[N]`, grad of the log twist), all detached; one NFE."""
        if self.stop:  # the score's Jacobian replaced by a Gaussian one (weights correct it)
            with torch.no_grad():
                score = self.score(x, t)
            log_twist, grad = self.twist.stop_gradient(x, t, score)
            return score, log_twist, grad
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            if self.twist.needs_score_grad:
                score = self.score(xg, t)
            else:
                with torch.no_grad():
                    score = self.score(x, t)
            log_twist = self.twist.log_twist(xg, t, score)
            (grad,) = torch.autograd.grad(log_twist.sum(), xg)
        return score.detach(), log_twist.detach(), grad.detach()

    def _randn(self, x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def _resample(self, log_w: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor], Tensor]:
        """Resample the items whose ESS is below the threshold; others keep their particles."""
        K = self.K
        low = _log_ess(log_w).exp() < self.ess_threshold * K  # [B]; threshold 0: never
        ancestors = torch.where(
            low[:, None], _systematic(log_w, self._offsets, self.generator), self._keep
        )
        rows = (ancestors + self._first_rows).reshape(-1)
        state = [s.index_select(0, rows) for s in state]
        log_w = torch.where(low[:, None], torch.full_like(log_w, -math.log(K)), log_w)
        return log_w, state, low

    def run(self, x: Tensor) -> tuple[Tensor, Tensor, ConditionalInfo]:
        """x: `[N, *D]` draws of x_T. Returns (final particles `[N, *D]`, normalised log
        weights `[B, K]`, info)."""
        B, K = self.B, self.K
        guard = NonFiniteGuard(x.device)
        # Constant index tensors of the resampling step, built once per run.
        self._keep = torch.arange(K, device=x.device).expand(B, K)
        self._first_rows = K * torch.arange(B, device=x.device)[:, None]
        self._offsets = torch.arange(K, device=x.device, dtype=x.dtype)
        steps = self.transitions
        score, log_twist, grad = self._evaluate(x, steps[0].t)
        # x_T comes from the prior, so the first weight is the twist itself.
        log_w = log_twist.reshape(B, K)
        log_z = torch.logsumexp(log_w, 1) - math.log(K)
        log_w = torch.log_softmax(log_w, 1)
        ess, resampled = [_log_ess(log_w)], []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(steps), desc="smc", leave=False)
        for k, tr in enumerate(steps):
            log_w, (x, score, log_twist, grad), low = self._resample(
                log_w, [x, score, log_twist, grad]
            )
            resampled.append(low)
            mean = torch.add(x * tr.a, score, alpha=tr.b)
            z = self._randn(x)
            if k == len(steps) - 1:
                x, log_num = self.twist.final(mean, tr.c, grad, z, tr.t_next)
                incr = log_num - log_twist
            else:
                x = mean + (tr.c * tr.c) * grad + tr.c * z
                correction = _proposal_correction(grad, z, tr.c)
                score, new_twist, grad = self._evaluate(x, tr.t_next)
                incr = new_twist - log_twist + correction
                log_twist = new_twist
            guard(k, tr.t_next, x)
            unnorm = log_w + incr.reshape(B, K)
            log_z = log_z + torch.logsumexp(unnorm, 1)
            log_w = torch.log_softmax(unnorm, 1)  # shifts by the max first: exact when huge
            ess.append(_log_ess(log_w))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        # An item whose particles all got zero weight has no estimate: report it.
        guard(len(steps), steps[-1].t_next, log_z)
        guard.flush()
        info = ConditionalInfo(
            method="smc",
            nfe=self.score.nfe,
            num_particles=K,
            ess=torch.stack(ess).exp(),
            resampled=torch.stack(resampled),
            log_evidence=log_z,
        )
        return x, log_w, info

    def sample(self, sampler: Any, x_T: Tensor) -> tuple[Tensor, ConditionalInfo]:
        """Run from x_T `[B K, *D]`, set `sampler.nfe`, and return one weighted draw per
        item `[B, *D]` with the run's diagnostics (all particles and their log-weights)."""
        try:
            x, log_w, info = self.run(x_T)
        finally:
            sampler.nfe = self.score.nfe
        info.particles = x.reshape(self.B, self.K, *x.shape[1:])
        info.log_weights = log_w
        return self.select(x, log_w), info

    def select(self, x: Tensor, log_w: Tensor) -> Tensor:
        """One particle per item drawn by its weight: `[B, *D]`."""
        idx = torch.multinomial(log_w.exp(), 1, generator=self.generator)[:, 0]
        rows = idx + self.K * torch.arange(self.B, device=x.device)
        return x.index_select(0, rows)
