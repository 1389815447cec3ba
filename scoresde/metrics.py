"""Sample-quality metrics for score-based samplers.

All metrics take sample sets `[N, *D]` (flattened to `[N, D]` internally), work on any
device and in float64, and return 0-d tensors on the samples' device (no `.item()` inside,
so they can run on a GPU without host syncs until the caller asks for a number).

- `rms_error`: RMS over samples of ||x_i - y_i|| for paired sets (a solver against a tight
  reference solve from the same x_T, the benchmark's "ode_err").
- `sliced_wasserstein`: the sliced 2-Wasserstein distance, by quantile matching of random
  1-D projections.
- `frechet_distance`: the (squared) Frechet distance between the Gaussians fitted to two
  sets, as in FID; `frechet_distance_from_moments` takes the moments directly.
- `mode_weight_error`: how far the mass a sampler puts on each component of a known mixture
  is from the mixture weights.
- `mean_log_density`: mean exact log-density of samples under a known mixture (the negative
  of the benchmark's NLL) and its standard error.
- `sampling_floor`: a metric between two fresh sets of true samples: the value below which a
  metric cannot tell a sampler from the truth at that sample size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_choice, check_data, check_device, check_positive_int

__all__ = [
    "rms_error",
    "sliced_wasserstein",
    "frechet_distance",
    "frechet_distance_from_moments",
    "mode_weight_error",
    "mean_log_density",
    "sampling_floor",
    "LogDensity",
    "MetricFloor",
]


def _flat(name: str, x: Any) -> Tensor:
    """Validate a sample set `[N, *D]` and flatten it to `[N, D]`."""
    check_data(name, x)
    return x.reshape(x.shape[0], -1)


def _pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Flatten two sets, check they have the same feature dimension, and promote y to x's
    device and a common floating dtype."""
    fx, fy = _flat("x", x), _flat("y", y)
    if fx.shape[1] != fy.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features per sample, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    dtype = torch.promote_types(fx.dtype, fy.dtype)
    return fx.to(dtype), fy.to(device=fx.device, dtype=dtype)


def rms_error(x: Tensor, y: Tensor) -> Tensor:
    """sqrt(mean_i ||x_i - y_i||^2) for paired sets x, y `[N, *D]` (a 0-d tensor).

    The benchmark's ode_err: x from a solver, y from a tight reference solve started at the
    same x_T, so the difference is the solver's own discretisation error.
    """
    fx, fy = _pair(x, y)
    if fx.shape[0] != fy.shape[0]:
        raise ValueError(
            f"x and y must be paired (same number of samples), got {fx.shape[0]} and {fy.shape[0]}"
        )
    return (fx - fy).pow(2).sum(dim=1).mean().sqrt()


def _quantiles(sorted_values: Tensor, levels: Tensor) -> Tensor:
    """Linear interpolation of sorted samples at quantile levels.

    sorted_values `[P, N]` (sorted along the last dim), levels `[L]` in (0, 1) -> `[P, L]`.
    Sample j is placed at level (j + 1/2) / N (the midpoint convention), so with L = N the
    quantiles are the sorted samples themselves and equal-size sets are matched exactly.
    """
    n = sorted_values.shape[-1]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(pos.dtype)).to(sorted_values.dtype)
    v_lo = sorted_values[:, lo]
    return v_lo + frac * (sorted_values[:, hi] - v_lo)


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    num_projections: int = 256,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sliced 2-Wasserstein distance between sample sets x `[N, *D]` and y `[M, *D]`.

    SW_2(x, y) = sqrt( E_theta[ W_2^2(theta^T x, theta^T y) ] ), theta uniform on the unit
    sphere (Monte Carlo with `num_projections` directions drawn with `generator`). In 1-D,
    W_2^2 = int_0^1 (F_x^-1(u) - F_y^-1(u))^2 du; it is evaluated at the levels
    u_i = (i + 1/2) / L, L = max(N, M), on quantile functions interpolated linearly between
    the sorted samples, which is exact when N = M. Returns a 0-d tensor (same units as x).

    In 1-D (D = 1) every direction is +-1, so the result is the plain W_2 distance: for
    y = x + c it is exactly |c|.
    """
    num_projections = check_positive_int("num_projections", num_projections)
    fx, fy = _pair(x, y)
    dim = fx.shape[1]
    if generator is not None and generator.device != fx.device:
        raise ValueError(
            f"generator must be on the samples' device {fx.device}, got {generator.device}"
        )
    theta = torch.randn(dim, num_projections, generator=generator, device=fx.device, dtype=fx.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = torch.sort((fx @ theta).T, dim=1).values  # [P, N]
    py = torch.sort((fy @ theta).T, dim=1).values  # [P, M]
    if px.shape[1] != py.shape[1]:
        size = max(px.shape[1], py.shape[1])
        levels = (torch.arange(size, device=fx.device, dtype=fx.dtype) + 0.5) / size
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return (px - py).pow(2).mean().sqrt()


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean `[D]` and unbiased covariance `[D, D]` of `[N, D]`."""
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {x.shape[0]}")
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix via eigh (negative
    round-off eigenvalues clamped to 0)."""
    sym = 0.5 * (matrix + matrix.T)
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance_from_moments(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    d^2 = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr( (C1^1/2 C2 C1^1/2)^1/2 ).

    The trace of the square root is computed from the eigenvalues of the symmetric matrix
    C1^1/2 C2 C1^1/2 (similar to C1 C2, so same spectrum) with `eigh`: no non-symmetric
    `sqrtm`, no complex round-off as in scipy-based FID code. mu `[D]`, cov `[D, D]`;
    returns a 0-d tensor, clamped at 0 against round-off.
    """
    for name, v, nd in (("mu1", mu1, 1), ("cov1", cov1, 2), ("mu2", mu2, 1), ("cov2", cov2, 2)):
        if not torch.is_tensor(v):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.ndim != nd:
            raise ValueError(f"{name} must have {nd} dimension(s), got shape {tuple(v.shape)}")
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"moments must have shapes [D], [D, D] with one D, got mu1 {tuple(mu1.shape)}, "
            f"cov1 {tuple(cov1.shape)}, mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}"
        )
    dtype = torch.promote_types(mu1.dtype, cov2.dtype)
    mu1, cov1 = mu1.to(dtype), cov1.to(dtype)
    mu2, cov2 = mu2.to(mu1.device, dtype), cov2.to(mu1.device, dtype)
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp(min=0).sqrt().sum()
    dist = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross
    return dist.clamp(min=0)


def frechet_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared Frechet distance (FID's formula) between the Gaussians fitted to x `[N, *D]`
    and y `[M, *D]` (sample means and unbiased covariances); see
    `frechet_distance_from_moments`. A 0-d tensor."""
    fx, fy = _pair(x, y)
    return frechet_distance_from_moments(*_moments(fx), *_moments(fy))


def _mixture_responsibilities(samples: Tensor, mixture: Any) -> Tensor:
    if not hasattr(mixture, "responsibilities") or not hasattr(mixture, "weights"):
        raise TypeError(
            f"mixture must be a scoresde.toy.GaussianMixture, got {type(mixture).__name__}"
        )
    return mixture.responsibilities(samples)


def mode_weight_error(
    samples: Tensor,
    mixture: Any,
    *,
    assignment: str = "soft",
    reduction: str = "tv",
) -> Tensor:
    """Distance between the mass the samples put on each mixture component and the weights.

    With p(k | x) the exact responsibilities of `mixture` (a `scoresde.toy.GaussianMixture`),
    the estimated weight of component k is

        soft: w_hat_k = mean_i p(k | x_i)              (unbiased for true samples:
                                                        E_p[p(k | x)] = w_k)
        hard: w_hat_k = mean_i [k = argmax_j p(j | x_i)] (biased where components overlap)

    reduction "tv": total variation 1/2 sum_k |w_hat_k - w_k| (in [0, 1]);
    "max": max_k |w_hat_k - w_k|. samples `[N, *D]`; returns a 0-d tensor.
    """
    check_choice("assignment", assignment, ("soft", "hard"))
    check_choice("reduction", reduction, ("tv", "max"))
    flat = _flat("samples", samples)
    resp = _mixture_responsibilities(flat, mixture)
    if assignment == "hard":
        k = resp.shape[1]
        resp = torch.nn.functional.one_hot(resp.argmax(dim=1), k).to(resp.dtype)
    w_hat = resp.mean(dim=0)
    diff = (w_hat - mixture.weights.to(device=w_hat.device, dtype=w_hat.dtype)).abs()
    return 0.5 * diff.sum() if reduction == "tv" else diff.max()


class LogDensity(NamedTuple):
    """Mean exact log-density of a sample set and the standard error of that mean."""

    mean: Tensor
    stderr: Tensor


def mean_log_density(samples: Tensor, mixture: Any) -> LogDensity:
    """(mean_i log p(x_i), std_i(log p(x_i)) / sqrt(N)) under a known density.

    `mixture` is anything with `log_prob(x) -> [N]` (e.g. `scoresde.toy.GaussianMixture`).
    -mean is the cross-entropy of the sampler's distribution q against the truth p, the
    benchmark's "NLL": for true samples it estimates the entropy H(p); samples that are too
    concentrated on p's modes give less, too spread out more. samples `[N, *D]`, N >= 2.
    """
    flat = _flat("samples", samples)
    if flat.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 samples, got {flat.shape[0]}")
    if not hasattr(mixture, "log_prob"):
        raise TypeError(f"mixture must have a log_prob method, got {type(mixture).__name__}")
    logp = mixture.log_prob(flat)
    return LogDensity(logp.mean(), logp.std() / math.sqrt(flat.shape[0]))


class MetricFloor(NamedTuple):
    """A metric between pairs of independent true sets: mean, std and the raw values."""

    mean: float
    std: float
    values: Tensor


def sampling_floor(
    mixture: Any,
    n: int,
    metric: Callable[[Tensor, Tensor], Tensor],
    repeats: int = 5,
    *,
    m: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> MetricFloor:
    """The noise floor of a two-sample `metric` at sample size n.

    Draws `repeats` pairs of independent sets (n and m = n samples) from `mixture` (anything
    with `sample(n, generator=, device=, dtype=)`) and evaluates `metric(x, y)` on each pair:
    a sampler whose metric against fresh data is within this floor cannot be told from the
    truth at this sample size. Returns `MetricFloor(mean, std, values [repeats])`.
    """
    n = check_positive_int("n", n)
    m = n if m is None else check_positive_int("m", m)
    repeats = check_positive_int("repeats", repeats)
    if device is not None:
        device = check_device("device", device)
    if not callable(metric):
        raise TypeError(f"metric must be callable, got {type(metric).__name__}")
    values = []
    for _ in range(repeats):
        x = mixture.sample(n, generator=generator, device=device, dtype=dtype)
        y = mixture.sample(m, generator=generator, device=device, dtype=dtype)
        values.append(torch.as_tensor(metric(x, y), dtype=torch.float64).reshape(()).cpu())
    vals = torch.stack(values)
    std = float(vals.std()) if repeats > 1 else 0.0
    return MetricFloor(float(vals.mean()), std, vals)
