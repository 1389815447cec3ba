"""Imputation (inpainting): the unknown coordinates of x sampled given the known ones, with
any scoresde sampler. `inpaint(sampler, score_fn, x_known, mask, method=...)` and
`pc_inpaint` (Song et al.'s PC inpainter: a replacement after every predictor and every
corrector step). Also re-exported by `scoresde.guidance`.

**method="replace"**:

The sampler runs unchanged; after every step, at the time t it reached, the known
coordinates are replaced by the known data pushed through the forward SDE,

    x <- mask * (alpha(t) x_known + sigma(t) z) + (1 - mask) * x,

so the unknown coordinates are driven by the unconditional score evaluated next to a
plausible noisy version of the known ones. x_T is a prior draw with the same replacement
at t = T, and the returned samples carry x_known exactly on the mask. For `PCSampler`
the replacement happens once per grid time, after the corrector + predictor pair;
`pc_inpaint` replaces after each of them, as Song et al.'s `get_pc_inpainter`.

`known_noise` chooses z: "fresh" (a new draw per step, Song et al.; the default, for
stochastic samplers), "fixed" (one draw per run: the known coordinates move along the
smooth path alpha(t) x_known + sigma(t) z, what the probability-flow ODE does to a point
mass at x_known) or "mean" (z = 0, the noise-free mean alpha(t) x_known). For
deterministic (ODE) samplers, "mean" was the most accurate of the three on the mixture
of tests/test_guidance.py (imputed mean error 0.11 against 0.13 "fresh" and 0.16
"fixed", std error 0.07 against 0.08 and 0.13), and all three are less accurate there
than PC sampling (mean error 0.001).

Replacement is an approximation of sampling p(x_unknown | x_known), not exact even
with the exact score and tiny steps: the unknown coordinates follow the score of
p_t(x_unknown | noisy known coordinates), and they settle on a mode while the known ones
are still too noisy to tell which mode they belong to. It is accurate when the known
coordinates resolve the modes earlier (at higher noise) than the unknown ones; see
tests/test_guidance.py for the error measured on Gaussian mixtures.

Samplers: every fixed-grid sampler works (the replacement runs in its per-step
callback). ODESampler with a torchdiffeq method (dopri5, ...) has no per-step callback
and is refused. AdaptiveSDESampler passes each sample's own time (a `[B]` tensor) and
replaces at those times.

Randomness: the sampler's noise and z both come from `generator` (same seed, same output),
which must be on x_known's device.

**method="smc"**: the twisted diffusion sampler (Wu et al. 2023; see docs/conditional.md).
Each row of x_known is one conditioning item; it gets `particles` = K particles (default
16), run together as one batch of B K rows, that follow the sampler's own Gaussian
steps twisted towards the data (proposal mean shifted by c^2 grad log p~_t(y | x_t),
p~_t(y | x_t) = N(y; mask * x0_hat(x_t), r_t^2), r_t^2 = d^2 sbar^2 / (d^2 + sbar^2),
sbar = sigma(t) / alpha(t), d = `data_std`), are weighted by the exact ratio of the
chain's transition to the proposal, and are resampled (systematic) when an item's
effective sample size falls below `ess_threshold * K`. The last step sets x[mask] =
x_known and weighs each particle by the transition density of x_known. The weights
correct any twist error, so as K grows the weighted particles sample the sampler's own
chain conditioned on x[mask] = x_known: the true conditional up to the sampler's
discretization error (with an exact score). The sampler's `denoise` is not applied (the
condition is put on its last noisy state, at t = eps). One particle per item, drawn by
weight, is returned; `return_info=True` also gives all particles and their weights.
Samplers: `EulerMaruyamaSampler`, `PCSampler` with the "euler_maruyama",
"reverse_diffusion" or "ancestral" predictor and corrector None or "ald", and
`DDIMSampler` with eta > 0 (steps with a Gaussian density); others raise ValueError.
Cost: one NFE per step on B K rows, plus one backward pass through score_fn for the
twist's gradient (`twist_gradient="autograd"`; "stop" treats the score as constant,
i.e. grad x0_hat = I / alpha, no backward pass and the weights still exact, but more
resampling). score_fn must be differentiable in x: a network in eval mode is called
with grad enabled.

**method="repaint"**: replacement with RePaint's resampling (Lugmayr et al. 2022): on the
sampler's Gaussian steps (same samplers as "smc"), after every `jump_length` steps the
state is pushed back `jump_length` steps through the forward SDE and denoised again,
`jump_n_sample - 1` times. NFE ~ num_steps * jump_n_sample. It harmonizes the known
and unknown coordinates better than replacement but is not exact.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from scoresde._smc import (
    ConditionalInfo,
    EndEstimate,
    InpaintTwist,
    ParticleFilter,
    Transition,
    gaussian_transitions,
)
from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    broadcast_time,
    check_bool,
    check_choice,
    check_data,
    check_finite,
    check_positive,
    check_positive_int,
    expand_like,
)
from scoresde.sdes import SDE

__all__ = ["inpaint", "pc_inpaint", "repaint_schedule", "KNOWN_NOISE", "INPAINT_METHODS"]

KNOWN_NOISE = ("fresh", "fixed", "mean")
INPAINT_METHODS = ("replace", "smc", "repaint")
TWIST_GRADIENTS = ("autograd", "stop")


def _known_values(x_known: Any, mask: Any) -> Tensor:
    """x_known with its unknown entries (ignored; users may mark them NaN) set to 0, after
    naming a NaN / Inf on the mask as the user's error rather than at some solver step."""
    mask = _check_mask(mask, check_data("x_known", x_known))
    known = torch.where(mask, x_known, 0.0)
    return check_finite("x_known", known, ", where mask is True (elsewhere NaN is ignored)")


def _check_mask(mask: Any, x_known: Tensor) -> Tensor:
    """A boolean mask broadcastable to x_known (True / 1 = known coordinate)."""
    if not torch.is_tensor(mask):
        raise TypeError(f"mask must be a tensor (True/1 = known), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or contain only 0 and 1 (1 = known)")
        mask = mask != 0
    try:
        torch.broadcast_shapes(mask.shape, x_known.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to x_known's shape "
            f"{tuple(x_known.shape)}"
        ) from None
    if torch.broadcast_shapes(mask.shape, x_known.shape) != x_known.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} must broadcast to x_known's shape "
            f"{tuple(x_known.shape)} without enlarging it"
        )
    return mask.to(x_known.device)


class _Replacement:
    """Replaces the known coordinates by x_known pushed through the forward SDE to time t:

        x[mask] <- alpha(t) x_known + sigma(t) z,

    z fresh per call ("fresh"), drawn once per run ("fixed") or 0 ("mean").
    """

    def __init__(
        self,
        sde: SDE,
        x_known: Tensor,
        mask: Tensor,
        known_noise: str,
        generator: torch.Generator | None,
    ) -> None:
        self.sde = sde
        self.x_known = x_known
        self.mask = mask
        self.known_noise = known_noise
        self.generator = generator
        self.z: Tensor | None = None
        if known_noise == "fixed":
            self.z = self._randn()
        self._coef: dict[float, tuple[float, float]] = {}

    def _randn(self) -> Tensor:
        x = self.x_known
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def _coefficients(self, t: Any) -> tuple[Any, Any]:
        if torch.is_tensor(t) and t.ndim > 0:  # per-sample times (adaptive samplers)
            tb = broadcast_time(t, self.x_known)
            return (
                expand_like(self.sde.alpha(tb), self.x_known),
                expand_like(self.sde.sigma(tb), self.x_known),
            )
        t = float(t)
        if t not in self._coef:  # a few scalars per grid point, cached across steps
            tt = torch.tensor(t, dtype=torch.float64)
            self._coef[t] = (float(self.sde.alpha(tt)), float(self.sde.sigma(tt)))
        return self._coef[t]

    def alpha(self, t: Any) -> Any:
        return self._coefficients(t)[0]

    def known_at(self, t: Any) -> Tensor:
        """x_known diffused to time t (`[B, *D]`)."""
        alpha, sigma = self._coefficients(t)
        mean = self.x_known * alpha
        if self.known_noise == "mean":
            return mean
        z = self.z if self.z is not None else self._randn()
        return mean + sigma * z

    def __call__(self, step: int, t: Any, x: Tensor) -> Tensor:
        return torch.where(self.mask, self.known_at(t), x)


def _prepare_inpainting(
    sde: SDE, x_known: Any, mask: Any, known_noise: str, generator: torch.Generator | None
) -> _Replacement:
    check_data("x_known", x_known)
    check_choice("known_noise", known_noise, KNOWN_NOISE)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    mask = _check_mask(mask, x_known)
    return _Replacement(sde, x_known.detach(), mask, known_noise, generator)


def _start(
    sde: Any, x_known: Tensor, x_init: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """The state at T `[B, *D]`: the user's x_init (checked against x_known's shape) or a
    prior draw, on x_known's device and dtype."""
    if x_init is None:
        return sde.prior_sampling(
            tuple(x_known.shape), generator=generator, device=x_known.device, dtype=x_known.dtype
        )
    check_data("x_init", x_init)
    if x_init.shape != x_known.shape:
        raise ValueError(
            f"x_init must have x_known's shape {tuple(x_known.shape)}, got {tuple(x_init.shape)}"
        )
    return x_init.detach().to(device=x_known.device, dtype=x_known.dtype)


def _run_inpainting(
    sampler: Any,
    score_fn: ScoreFn,
    replace: _Replacement,
    x_init: Tensor | None,
    generator: torch.Generator | None,
    progress: bool,
    callback: Callable[[int, Any, Tensor], Tensor | None] | None,
    replace_after_step: bool,
) -> Tensor:
    """Start from a prior draw with the known coordinates diffused to T, run the sampler with
    the replacement (and the user's callback) after every step, restore x_known exactly."""
    sde, x_known = sampler.sde, replace.x_known
    x_init = replace(-1, sde.T, _start(sde, x_known, x_init, generator))

    def after_step(step: int, t: Any, x: Tensor) -> Tensor:
        if replace_after_step:
            x = replace(step, t, x)
        if callback is not None:
            out = callback(step, t, x)
            if out is not None:
                x = out
        return x

    out = sampler.sample(
        score_fn,
        tuple(x_known.shape),
        generator=generator,
        x_init=x_init,
        progress=progress,
        callback=after_step,
    )
    # The sampler's last step may stop at t = eps > 0 or denoise: put the data back exactly.
    return torch.where(replace.mask, x_known, out)


def _check_sampler(sampler: Any) -> SDE:
    """Replacement needs a callback after every step at one known time."""
    from scoresde.samplers.base import Sampler
    from scoresde.samplers.ode import ADAPTIVE_METHODS, ODESampler

    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a scoresde Sampler, got {type(sampler).__name__}")
    if isinstance(sampler, ODESampler) and sampler.method in ADAPTIVE_METHODS:
        # torchdiffeq integrates in one call: there is no step to replace after.
        raise ValueError(
            f"inpainting needs a fixed-step sampler; ODESampler(method={sampler.method!r}) "
            "solves in one torchdiffeq call. Use method='heun', 'rk4', ... or another sampler"
        )
    return sampler.sde


def inpaint(
    sampler: Any,
    score_fn: ScoreFn,
    x_known: Tensor,
    mask: Tensor,
    *,
    method: str = "replace",
    particles: int | None = None,
    generator: torch.Generator | None = None,
    known_noise: str = "fresh",
    x_init: Tensor | None = None,
    progress: bool = False,
    callback: Callable[[int, Any, Tensor], Tensor | None] | None = None,
    return_info: bool = False,
    ess_threshold: float = 0.5,
    twist_gradient: str = "autograd",
    data_std: float = 1.0,
    jump_length: int = 10,
    jump_n_sample: int = 10,
) -> Tensor | tuple[Tensor, ConditionalInfo]:
    """Impute the unknown coordinates of x with a scoresde sampler: replacement (the
    default, Song et al. 2021, appendix I.2), asymptotically exact twisted SMC
    (`method="smc"`) or RePaint's resampling jumps (`method="repaint"`).

    Each method (accuracy, the samplers it takes, randomness, cost) is described in the
    docstring of `scoresde.inpainting`: replacement and RePaint are approximate, SMC is
    asymptotically exact (the true conditional as `particles` grows).

    Args:
        sampler: a `scoresde.samplers.Sampler` (PC, Euler–Maruyama, ODE, DDIM, DPM-Solver,
            EDM, adaptive, ...).
        score_fn: the unconditional score s(x `[B, *D]`, t `[B]`).
        x_known: `[B, *D]` data whose masked coordinates are known (others are ignored).
        mask: bool or 0/1 tensor broadcastable to x_known; True/1 marks a known coordinate.
        method: "replace", "smc" or "repaint" (module docstring).
        particles: SMC particles per row of x_known (default 16); only for "smc".
        generator, progress: passed to the sampler (SMC: the only source of its randomness).
        known_noise: "fresh", "fixed" or "mean" (module docstring; "replace" and "repaint").
        x_init: the x_T to start from (its known coordinates are replaced too); "replace" and
            "repaint".
        callback: the user's `callback(step, t, x)`, run after the replacement; it may return
            a replacement x. "replace" only.
        return_info: also return a `ConditionalInfo` (NFE; for SMC the effective sample size
            per step, resampling steps, log-evidence estimate, all particles and weights).
        ess_threshold: SMC resamples an item when its ESS < ess_threshold * K (in [0, 1];
            1 resamples at every step, 0 never).
        twist_gradient: "autograd" (through score_fn) or "stop" (module docstring).
        data_std: d in the twist variance r_t (the data's scale; 1 for data in [-1, 1]).
        jump_length, jump_n_sample: RePaint's j and r.

    Returns:
        `[B, *D]` samples with x[mask] = x_known[mask]; with `return_info=True` the tuple
        (samples, info).
    """
    check_choice("method", method, INPAINT_METHODS)
    check_bool("return_info", return_info)
    sde = _check_sampler(sampler)
    x_known = _known_values(x_known, mask)
    if method != "smc" and particles is not None:
        raise ValueError(f"particles is only used by method='smc', got particles={particles!r}")
    if method != "replace" and callback is not None:
        raise ValueError(f"callback is only supported by method='replace', not {method!r}")
    if method == "smc":
        if x_init is not None:
            raise ValueError("x_init is not supported by method='smc' (particles start at x_T)")
        out, info = _smc_inpaint(
            sampler,
            score_fn,
            x_known,
            mask,
            particles=16 if particles is None else particles,
            generator=generator,
            ess_threshold=ess_threshold,
            twist_gradient=twist_gradient,
            data_std=data_std,
            progress=progress,
        )
    else:
        out = _inpaint_by_replacement(
            sampler,
            score_fn,
            sde,
            x_known,
            mask,
            method,
            known_noise,
            generator,
            x_init,
            progress,
            callback,
            jump_length,
            jump_n_sample,
        )
        info = ConditionalInfo(method=method, nfe=sampler.nfe)
    return (out, info) if return_info else out


def _inpaint_by_replacement(
    sampler: Any,
    score_fn: ScoreFn,
    sde: SDE,
    x_known: Tensor,
    mask: Tensor,
    method: str,
    known_noise: str,
    generator: torch.Generator | None,
    x_init: Tensor | None,
    progress: bool,
    callback: Callable[[int, Any, Tensor], Tensor | None] | None,
    jump_length: int,
    jump_n_sample: int,
) -> Tensor:
    """`inpaint`'s methods "replace" and "repaint"."""
    replace = _prepare_inpainting(sde, x_known, mask, known_noise, generator)
    if method == "repaint":
        out = _repaint(sampler, score_fn, replace, x_init, generator, jump_length, jump_n_sample)
    else:
        out = _run_inpainting(
            sampler,
            score_fn,
            replace,
            x_init,
            generator,
            progress,
            callback,
            replace_after_step=True,
        )
    return out


def _check_smc_args(particles: Any, ess_threshold: Any, twist_gradient: Any) -> tuple[int, float]:
    particles = check_positive_int("particles", particles)
    ess_threshold = check_positive("ess_threshold", ess_threshold, allow_zero=True)
    if ess_threshold > 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold!r}")
    check_choice("twist_gradient", twist_gradient, TWIST_GRADIENTS)
    return particles, ess_threshold


def _check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _smc_inpaint(
    sampler: Any,
    score_fn: ScoreFn,
    x_known: Any,
    mask: Any,
    *,
    particles: Any,
    generator: torch.Generator | None,
    ess_threshold: Any,
    twist_gradient: str,
    data_std: Any,
    progress: bool,
) -> tuple[Tensor, ConditionalInfo]:
    check_data("x_known", x_known)
    _check_generator(generator)
    particles, ess_threshold = _check_smc_args(particles, ess_threshold, twist_gradient)
    data_std = check_positive("data_std", data_std)
    mask = _check_mask(mask, x_known)
    transitions = gaussian_transitions(sampler)
    B, K = x_known.shape[0], particles
    x_known = x_known.detach()
    y = x_known.repeat_interleave(K, 0)  # item b's particles are rows b K .. b K + K - 1
    full_mask = mask.expand(x_known.shape).repeat_interleave(K, 0)
    twist = InpaintTwist(EndEstimate(sampler.sde, transitions[-1].t_next, data_std), y, full_mask)
    pf = ParticleFilter(
        transitions,
        score_fn,
        twist,
        batch=B,
        particles=K,
        generator=generator,
        ess_threshold=ess_threshold,
        twist_gradient=twist_gradient,
        progress=progress,
    )
    x_T = sampler.sde.prior_sampling(
        tuple(y.shape), generator=generator, device=x_known.device, dtype=x_known.dtype
    )
    out, info = pf.sample(sampler, x_T)
    return torch.where(mask, x_known, out), info


def _renoise(sde: SDE, x: Tensor, t_from: float, t_to: float, z: Tensor) -> Tensor:
    """A draw of the forward SDE's transition from t_from to t_to > t_from."""
    tt = torch.tensor([t_from, t_to], dtype=torch.float64)
    (a_from, a_to), (s_from, s_to) = sde.alpha(tt).tolist(), sde.sigma(tt).tolist()
    ratio = a_to / a_from
    return x * ratio + math.sqrt(max(s_to**2 - (ratio * s_from) ** 2, 0.0)) * z


def repaint_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's walk over the step positions 0 (x_T) .. num_steps (the end): +1 is a
    denoising step, -1 one step back through the forward SDE. Every `jump_length` steps
    (counted from the end, as in RePaint) the walk goes back `jump_length` steps,
    `jump_n_sample - 1` times."""
    jumps = {d: jump_n_sample - 1 for d in range(0, num_steps - jump_length, jump_length)}
    d, moves = num_steps, []  # d: steps left to the end
    while d > 0:
        d -= 1
        moves.append(1)
        if jumps.get(d, 0) > 0:
            jumps[d] -= 1
            moves += [-1] * jump_length
            d += jump_length
    return moves


def _repaint(
    sampler: Any,
    score_fn: ScoreFn,
    replace: _Replacement,
    x_init: Tensor | None,
    generator: torch.Generator | None,
    jump_length: Any,
    jump_n_sample: Any,
) -> Tensor:
    """Replacement on the sampler's Gaussian steps with RePaint's jumps back."""
    from scoresde.samplers.base import CountedScore, NonFiniteGuard

    jump_length = check_positive_int("jump_length", jump_length)
    jump_n_sample = check_positive_int("jump_n_sample", jump_n_sample)
    steps: list[Transition] = gaussian_transitions(sampler)
    if any(tr.t_next >= tr.t for tr in steps):
        raise ValueError("method='repaint' needs steps that advance in time (no corrector)")
    sde, x_known = sampler.sde, replace.x_known
    x = _start(sde, x_known, x_init, generator)
    score = CountedScore(score_fn)
    guard = NonFiniteGuard(x.device)
    x = replace(-1, steps[0].t, x)
    pos = 0
    try:
        with torch.no_grad():
            for i, move in enumerate(repaint_schedule(len(steps), jump_length, jump_n_sample)):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                if move > 0:
                    tr = steps[pos]
                    x = torch.add(x * tr.a, score(x, tr.t), alpha=tr.b).add_(z, alpha=tr.c)
                    pos += 1
                    x = replace(i, tr.t_next, x)
                else:
                    tr = steps[pos - 1]
                    x = _renoise(sde, x, tr.t_next, tr.t, z)
                    pos -= 1
                guard(i, steps[pos].t if pos < len(steps) else steps[-1].t_next, x)
        guard.flush()
    finally:
        sampler.nfe = score.nfe
    return torch.where(replace.mask, x_known, x)


class _ReplacingStep:
    """Wraps a PC predictor or corrector: its update followed by the replacement at the time
    the state has reached (t for a corrector, the next grid time for a predictor)."""

    def __init__(self, inner: Any, replace: _Replacement, advances: bool) -> None:
        self.inner = inner
        self.replace = replace
        self.advances = advances

    def prepare(self, pc: Any) -> None:
        self.inner.prepare(pc)
        times = pc.times
        self._after = times[1:] + [max(times[-1] - pc.dt, 0.0)] if self.advances else times

    def update(self, pc: Any, x: Tensor, t: float, step: int) -> tuple[Tensor, Tensor]:
        x, x_mean = self.inner.update(pc, x, t, step)
        t_now = self._after[step]
        known = self.replace.known_at(t_now)
        x = torch.where(self.replace.mask, known, x)
        # As the reference: the noise-free mean carries the noise-free known data.
        x_mean = torch.where(
            self.replace.mask, self.replace.x_known * self.replace.alpha(t_now), x_mean
        )
        return x, x_mean


def pc_inpaint(
    sampler: Any,
    score_fn: ScoreFn,
    x_known: Tensor,
    mask: Tensor,
    *,
    generator: torch.Generator | None = None,
    known_noise: str = "fresh",
    x_init: Tensor | None = None,
    progress: bool = False,
    callback: Callable[[int, Any, Tensor], Tensor | None] | None = None,
) -> Tensor:
    """Song et al.'s PC inpainter (`get_pc_inpainter`): like `inpaint`, but the known
    coordinates are replaced after EVERY corrector step (at the grid time t_i) and after
    every predictor step (at the time it reached), not once per grid time.

    Differences from the reference: the predictor's replacement uses the time the step
    reached (the reference uses the time it started from), and x_T's known coordinates are
    diffused to T (the reference puts the clean data there).

    Args: as `inpaint`; `sampler` must be a `PCSampler` (its predictor and corrector are
    wrapped for this run only; `sampler.nfe` is set as usual).
    """
    from scoresde.samplers.pc import PCSampler

    if not isinstance(sampler, PCSampler):
        raise TypeError(f"sampler must be a PCSampler, got {type(sampler).__name__}")
    x_known = _known_values(x_known, mask)
    replace = _prepare_inpainting(sampler.sde, x_known, mask, known_noise, generator)
    run = copy.copy(sampler)  # the user's sampler keeps its own predictor and corrector
    if sampler.predictor is not None:
        run.predictor = _ReplacingStep(sampler.predictor, replace, advances=True)
    if sampler.corrector is not None:
        run.corrector = _ReplacingStep(sampler.corrector, replace, advances=False)
    out = _run_inpainting(
        run, score_fn, replace, x_init, generator, progress, callback, replace_after_step=False
    )
    sampler.nfe = run.nfe
    return out
