"""Controllable generation: classifier-free guidance, classifier guidance and imputation.

All three turn an unconditional (or class-conditional) score model into the score of a
conditional distribution, or steer a sampler, without retraining:

- `classifier_free_guidance(model, y, guidance_scale)`: the score_fn
  s = s(x, t, null) + w (s(x, t, y) - s(x, t, null)) (Ho & Salimans 2021, diffusers' scale);
- `guided_score(score_fn, log_likelihood_fn, scale)`: the score_fn
  s(x, t) + scale grad_x log p(y | x, t) (Song et al. 2021, eq. 14; Dhariwal & Nichol 2021);
  `classifier_log_prob(classifier, y)` builds log p(y | x, t) from a time-dependent classifier;
- `inpaint(sampler, score_fn, x_known, mask)`: imputation of the unknown coordinates of x
  with any sampler, by replacing the known coordinates after every step with the known data
  pushed through the forward SDE to the current time (Song et al. 2021, appendix I.2);
  `pc_inpaint` is Song et al.'s PC inpainter (a replacement after every predictor and every
  corrector step). `inpaint(..., method="smc")` is an asymptotically exact alternative, the
  twisted diffusion sampler (Wu et al. 2023): particles with weights that sample the true
  conditional p(x_unknown | x_known) as their number grows; `method="repaint"` is
  replacement with RePaint's resampling jumps (Lugmayr et al. 2022);
- `smc_sample(sampler, score_fn, log_likelihood_fn, shape)`: the same twisted SMC for
  guidance by any likelihood, e.g. an exact classifier, sampling p(x) p(y | x) / p(y).

Shapes: data `x` is `[B, *D]`; time `t` is `[B]`; labels `y` are `[B]` integer tensors.
`inpaint` and `pc_inpaint` live in `scoresde.inpainting` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from scoresde._smc import (
    ConditionalInfo,
    EndEstimate,
    LikelihoodTwist,
    ParticleFilter,
    gaussian_transitions,
)
from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    broadcast_time,
    check_bool,
    check_choice,
    check_positive,
    check_shape,
    resolve_device_dtype,
)
from scoresde.inpainting import (  # noqa: F401 - re-exported: their home was this module
    INPAINT_METHODS,
    KNOWN_NOISE,
    TWIST_GRADIENTS,
    _check_generator,
    _check_sampler,
    _check_smc_args,
    inpaint,
    pc_inpaint,
    repaint_schedule,
)

__all__ = [
    "classifier_free_guidance",
    "guided_score",
    "classifier_log_prob",
    "inpaint",
    "pc_inpaint",
    "smc_sample",
    "ConditionalInfo",
    "KNOWN_NOISE",
    "INPAINT_METHODS",
]


def _check_finite_number(name: str, value: Any) -> float:
    if torch.is_tensor(value) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _labels(name: str, y: Any, batch: int, device: torch.device) -> Tensor:
    """Labels as a `[batch]` int64 tensor on `device` (an int or a `[1]` tensor is broadcast)."""
    if isinstance(y, int) and not isinstance(y, bool):
        return torch.full((batch,), y, dtype=torch.long, device=device)
    if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an int or an integer tensor [B], got {y!r}")
    y = y.to(device=device, dtype=torch.long)
    if y.ndim == 0 or (y.ndim == 1 and y.shape[0] == 1):
        return y.reshape(1).expand(batch)
    if y.ndim == 1 and y.shape[0] == batch:
        return y
    raise ValueError(
        f"{name} must be an int or have shape [B] = [{batch}], got shape {tuple(y.shape)}"
    )


def _infer_null_label(model: Any) -> int | None:
    """scoresde's convention (MLPScoreNet): with num_classes K, label K is the null class."""
    for obj in (model, getattr(model, "net", None)):
        k = getattr(obj, "num_classes", None)
        if isinstance(k, int) and not isinstance(k, bool):
            return k
    return None


def classifier_free_guidance(
    model: Callable[..., Tensor],
    y: int | Tensor,
    guidance_scale: float,
    null_label: int | None = None,
) -> ScoreFn:
    """Classifier-free guidance (Ho & Salimans 2021) as a score_fn(x `[B, *D]`, t `[B]`).

        s_w(x, t) = s(x, t, null) + w (s(x, t, y) - s(x, t, null)),    w = guidance_scale,

    diffusers' convention: w = 1 is the plain conditional model s(x, t, y), w = 0 the
    unconditional one, w > 1 sharpens towards y (Ho & Salimans' w is our w - 1, i.e.
    s = (1 + w') s_cond - w' s_uncond). The guided score is the score of
    p_t(x)^(1-w) p_t(x | y)^w, i.e. of p_t(x) p_t(y | x)^w.

    Cost: the conditional and unconditional scores come from ONE network call on the doubled
    batch [x; x] with labels [y; null]. A sampler counts one NFE per call of the returned
    score_fn (as for any score_fn), so a guided NFE costs one network call on 2B rows (about
    twice an unguided NFE). With w = 1 (or w = 0) only the conditional (or unconditional)
    half is evaluated.

    Args:
        model: `model(x, t, y) -> score` shaped like x, e.g. `ScoreModel(MLPScoreNet(dim,
            num_classes=K), sde)`; `model(x, t)` (no y) must be the unconditional score when
            no null label is known.
        y: the class to guide towards: an int or an integer tensor `[B]`.
        guidance_scale: w above (any finite number).
        null_label: the label of the unconditional class. Default: `num_classes` of the model
            (or of `model.net`), scoresde's convention. If there is none, the unconditional
            score is `model(x, t)` in a second call (two network calls per NFE).
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
    w = _check_finite_number("guidance_scale", guidance_scale)
    if null_label is None:
        null_label = _infer_null_label(model)
    elif isinstance(null_label, bool) or not isinstance(null_label, int):
        raise TypeError(f"null_label must be an int or None, got {null_label!r}")
    # Validate y once here (the batch size is only known at call time).
    if not (isinstance(y, int) and not isinstance(y, bool)):
        _labels(
            "y", y, y.shape[0] if torch.is_tensor(y) and y.ndim == 1 else 1, torch.device("cpu")
        )

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        t = broadcast_time(t, x)
        batch = x.shape[0]
        labels = _labels("y", y, batch, x.device)
        if w == 1.0:
            return model(x, t, labels)
        if null_label is None:
            uncond = model(x, t)
            if w == 0.0:
                return uncond
            return torch.lerp(uncond, model(x, t, labels), w)
        null = torch.full((batch,), null_label, dtype=torch.long, device=x.device)
        if w == 0.0:
            return model(x, t, null)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out[:batch], out[batch:]
        # lerp(a, b, w) = a + w (b - a): the guided score in one fused op.
        return torch.lerp(uncond, cond, w)

    return score_fn


def guided_score(
    score_fn: ScoreFn,
    log_likelihood_fn: Callable[[Tensor, Tensor], Tensor],
    scale: float = 1.0,
) -> ScoreFn:
    """Guidance by any differentiable log-likelihood (Song et al. 2021, eq. 14):

        s(x, t | y) = s(x, t) + scale * grad_x log p_t(y | x),

    which by Bayes' rule is exactly the score of p_t(x | y) when scale = 1 and both terms
    are exact (scale > 1 is Dhariwal & Nichol's classifier scale, the score of
    p_t(x) p_t(y | x)^scale).

    The gradient is taken with autograd under `torch.enable_grad()` (samplers run under
    `no_grad`) on a detached copy of x; the result is detached. The guided score costs one
    NFE of `score_fn` plus one forward and backward pass of `log_likelihood_fn`.

    Args:
        score_fn: the unconditional score s(x `[B, *D]`, t `[B]`).
        log_likelihood_fn: log p_t(y | x) as a function (x `[B, *D]`, t `[B]`) -> `[B]`,
            differentiable in x, e.g. `classifier_log_prob(classifier, y)`.
        scale: the guidance weight (any finite number; 0 returns the plain score).
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    if not callable(log_likelihood_fn):
        raise TypeError(
            f"log_likelihood_fn must be callable, got {type(log_likelihood_fn).__name__}"
        )
    scale = _check_finite_number("scale", scale)

    def score(x: Tensor, t: Tensor) -> Tensor:
        t = broadcast_time(t, x)
        base = score_fn(x, t)
        if scale == 0.0:
            return base
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ll = log_likelihood_fn(xg, t.detach())
            if not torch.is_tensor(ll) or ll.shape != (x.shape[0],):
                got = tuple(ll.shape) if torch.is_tensor(ll) else type(ll).__name__
                raise ValueError(
                    f"log_likelihood_fn must return a tensor [B] = [{x.shape[0]}], got {got}"
                )
            # Samples are independent, so the gradient of the sum is each sample's gradient.
            (grad,) = torch.autograd.grad(ll.sum(), xg)
        return base.detach() + scale * grad.detach()

    return score


def classifier_log_prob(
    classifier: Callable[[Tensor, Tensor], Tensor], y: int | Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    """log p_t(y | x) = log_softmax(classifier(x, t))[y] for a time-dependent classifier
    returning logits `[B, C]`; pass it to `guided_score`.
    """
    if not callable(classifier):
        raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")

    def log_prob(x: Tensor, t: Tensor) -> Tensor:
        logits = classifier(x, t)
        if not torch.is_tensor(logits) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(f"classifier must return logits [B, C], got {got}")
        labels = _labels("y", y, x.shape[0], x.device)
        logp = torch.log_softmax(logits, dim=1)
        return logp.gather(1, labels[:, None])[:, 0]

    return log_prob


def smc_sample(
    sampler: Any,
    score_fn: ScoreFn,
    log_likelihood_fn: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    *,
    particles: int = 16,
    twist: str = "tweedie",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    ess_threshold: float = 0.5,
    twist_gradient: str = "autograd",
    data_std: float = 1.0,
    progress: bool = False,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, ConditionalInfo]:
    """Sample p(x | y) ∝ p(x) p(y | x) by twisted SMC (Wu et al. 2023) over a sampler's
    Gaussian steps: the asymptotically exact counterpart of `guided_score` (which follows
    the guided score and is exact only when log p_t(y | x_t) is).

    Each of the B = shape[0] outputs is drawn from its own K = `particles` particles (one
    batch of B K rows). The twist log p~_t(y | x_t) is

    - twist="tweedie": `log_likelihood_fn(x0_hat(x_t), t_end)`, a likelihood of clean data
      applied to the Tweedie estimate x0_hat = (x + sigma^2 s) / alpha (gradient through the
      score with twist_gradient="autograd", the TDS recipe);
    - twist="direct": `log_likelihood_fn(x_t, t)`, a time-dependent classifier of noisy
      data (e.g. `classifier_log_prob(classifier, y)`); with the exact p_t(y | x_t) the
      weights stay nearly uniform.

    The last step's weight uses the likelihood itself, `log_likelihood_fn(x_n, t_end)` at
    the sampler's last time t_end, so whatever the twist, the weighted particles sample the
    sampler's chain reweighted by p(y | x_n) as K grows. Samplers, costs and diagnostics as
    `inpaint(method="smc")`.

    Args:
        sampler: `EulerMaruyamaSampler`, `PCSampler` (corrector None or "ald") or
            `DDIMSampler` with eta > 0.
        score_fn: the unconditional score s(x `[N, *D]`, t `[N]`).
        log_likelihood_fn: log p(y | x, t) -> `[N]`, differentiable in x (y is fixed inside
            it, e.g. `classifier_log_prob(classifier, y)` with an int y).
        shape: `(B, *D)`, the output's shape.
        particles, ess_threshold, twist_gradient, data_std, progress, return_info: as
            `inpaint` (data_std sets the stop-gradient Jacobian).
        generator, device, dtype: as `Sampler.sample`.

    Returns:
        `[B, *D]` samples (and a `ConditionalInfo` with `return_info=True`).
    """
    if not callable(log_likelihood_fn):
        raise TypeError(
            f"log_likelihood_fn must be callable, got {type(log_likelihood_fn).__name__}"
        )
    check_choice("twist", twist, ("tweedie", "direct"))
    check_bool("return_info", return_info)
    _check_generator(generator)
    particles, ess_threshold = _check_smc_args(particles, ess_threshold, twist_gradient)
    data_std = check_positive("data_std", data_std)
    shape = check_shape(shape)
    device, dtype = resolve_device_dtype(generator, device, dtype)
    sde = _check_sampler(sampler)
    transitions = gaussian_transitions(sampler)
    B, K = shape[0], particles
    pf = ParticleFilter(
        transitions,
        score_fn,
        LikelihoodTwist(
            EndEstimate(sde, transitions[-1].t_next, data_std), log_likelihood_fn, twist
        ),
        batch=B,
        particles=K,
        generator=generator,
        ess_threshold=ess_threshold,
        twist_gradient=twist_gradient,
        progress=progress,
    )
    x_T = sde.prior_sampling((B * K, *shape[1:]), generator=generator, device=device, dtype=dtype)
    out, info = pf.sample(sampler, x_T)
    return (out, info) if return_info else out
