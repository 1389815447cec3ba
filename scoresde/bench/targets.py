"""Benchmark targets (Gaussian mixtures with exact scores) and the tight reference solve.

A target is a data distribution with a closed-form p_t under every linear SDE, so a sampler
driven by its exact score makes only its own errors. The reference for "ode_err" is the
probability-flow ODE solved in float64 with dopri5 at rtol = atol = 1e-10 from the same x_T.

The probability-flow field here uses the analytic continuation of the schedule just past the
ends of [0, T] (sigma(t)^2 = -expm1(2 c(t)) and g(t)^2 = beta(t) rather than their square
roots): adaptive Runge-Kutta solvers (torchdiffeq's dopri5) evaluate their last step beyond
the end time and interpolate back, and sqrt(beta(t)) is NaN for t < 0 with VP's schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scoresde._typing import Tensor
from scoresde._validation import unchecked_times
from scoresde.flow import ProbabilityFlow
from scoresde.sdes import SDE, VESDE, VPSDE, SubVPSDE
from scoresde.toy import GaussianMixture, benchmark_mixture_2d, eight_gaussians, random_mixture

__all__ = [
    "Target",
    "TARGETS",
    "anisotropic_mixture_2d",
    "make_sde",
    "pf_ode_field",
    "exact_score",
    "reference_solve",
]


def anisotropic_mixture_2d() -> GaussianMixture:
    """Two thin, rotated, unequal Gaussians (variance ratio 400:1): a stiff 2-D target."""
    angle = torch.tensor([math.pi / 6, -math.pi / 3], dtype=torch.float64)
    c, s = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [2, 2, 2]
    lam = torch.tensor([[1.0, 0.0025], [0.5, 0.005]], dtype=torch.float64)
    covs = rot @ torch.diag_embed(lam) @ rot.transpose(-1, -2)
    return GaussianMixture([0.7, 0.3], [[-1.0, 0.5], [1.2, -0.8]], covs)


@dataclass(frozen=True)
class Target:
    """A named benchmark distribution: `factory()` builds the GaussianMixture."""

    name: str
    factory: Callable[[], GaussianMixture]
    dim: int
    description: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def mixture(self) -> GaussianMixture:
        if "mixture" not in self._cache:
            self._cache["mixture"] = self.factory()
        return self._cache["mixture"]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("mixture2d", benchmark_mixture_2d, 2, "PEERS.md's 3-component 2-D mixture"),
        Target("ring2d", eight_gaussians, 2, "8 Gaussians on a circle of radius 2, std 0.1"),
        Target("aniso2d", anisotropic_mixture_2d, 2, "2 thin rotated Gaussians (400:1)"),
        Target("mix16d", lambda: random_mixture(16), 16, "random 4-component mixture, 16-D"),
        Target("mix64d", lambda: random_mixture(64), 64, "random 4-component mixture, 64-D"),
    )
}


def rotated_covariances(
    g: torch.Generator, k: int, d: int, low: float, condition: float
) -> torch.Tensor:
    """`[k, d, d]` float64 covariances Q diag(lambda) Q^T with Q a random rotation per
    component and eigenvalues log-uniform in [low, low * condition] (drawn from `g` in that
    order, so the targets built on it are fixed by their seed); exactly symmetric."""
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=torch.float64))
    u = torch.rand(k, d, generator=g, dtype=torch.float64)
    log_ev = math.log(low) + math.log(condition) * u
    covs = q @ torch.diag_embed(log_ev.exp()) @ q.mT
    return 0.5 * (covs + covs.mT)


def aniso_mixture_32d() -> GaussianMixture:
    """A target held out from tuning (the few-step benchmark and the SA-Solver tests):
    6 components in 32-D, random rotations, covariance eigenvalues log-uniform in
    [0.002, 0.8] (condition number 400), means ~ N(0, 1.2^2 I), unequal weights."""
    g = torch.Generator().manual_seed(1234)
    k, d = 6, 32
    means = 1.2 * torch.randn(k, d, generator=g, dtype=torch.float64)
    covs = rotated_covariances(g, k, d, 0.002, 400.0)
    weights = 0.4 + torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, 0.5 * (covs + covs.mT))


def make_sde(kind: str) -> SDE:
    """The benchmark SDEs: "vp" is DDPM's linear schedule 1e-4..0.02 over 1000 steps
    (beta_min = 0.1, beta_max = 20); "subvp" the same betas; "ve" sigma 0.01..50."""
    sdes = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
    if kind not in sdes:
        raise ValueError(f"sde kind must be one of {tuple(sdes)}, got {kind!r}")
    return sdes[kind]()


def _schedule_sq(sde: SDE, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(f(t), g(t)^2, alpha(t), sigma(t)^2), analytic in t slightly outside [0, T]
    (`SDE.diffusion_sq`, `SDE.sigma_sq`: no square roots)."""
    with unchecked_times():  # the reference solve steps slightly below 0 on purpose
        return sde.drift_coef(t), sde.diffusion_sq(t), sde.alpha(t), sde.sigma_sq(t)


class _MixtureTables:
    """Eigen-decomposed mixture parameters on one device/dtype (computed once)."""

    def __init__(self, mixture: GaussianMixture, like: Tensor) -> None:
        lam, U = torch.linalg.eigh(mixture.covs)
        kw = dict(device=like.device, dtype=like.dtype)
        self.log_w = mixture.weights.log().to(**kw)
        self.mu = mixture.means.to(**kw)
        self.lam = lam.to(**kw)
        self.U = U.to(**kw)


def exact_score(
    mixture: GaussianMixture, x: Tensor, alpha: Tensor, noise_var: Tensor, tables=None
) -> Tensor:
    """Score of sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + noise_var I) at x `[B, D]`.

    alpha and noise_var are scalars (0-d tensors); noise_var may be slightly negative (the
    analytic continuation past t = 0) as long as every component variance stays positive.
    """
    tb = tables if tables is not None else _MixtureTables(mixture, x)
    var = alpha**2 * tb.lam + noise_var  # [K, D] in each component's eigenbasis
    y = torch.einsum("kdj,bkd->bkj", tb.U, x[:, None, :] - alpha * tb.mu[None])
    log_comp = -0.5 * ((y**2 / var).sum(-1) + var.log().sum(-1))
    resp = torch.softmax(tb.log_w + log_comp, dim=1)
    return -torch.einsum("kdj,bkj->bd", tb.U, resp[:, :, None] * y / var)


def schedule_coefficients(sde: SDE) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """t -> (f(t), g(t)^2 / 2) from `_schedule_sq`'s analytic continuation, as the
    `coefficients` of `scoresde.flow.ProbabilityFlow`."""

    def coefficients(t: Tensor) -> tuple[Tensor, Tensor]:
        f, g2, _, _ = _schedule_sq(sde, t)
        return f, 0.5 * g2

    return coefficients


def at_one_time(score: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """score(x, t [B]) -> score(x, t[0]): the benchmark scores take one time for the whole
    batch (every call of the torchdiffeq solvers is at one time)."""

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return score(x, t.reshape(-1)[0])

    return fn


def pf_ode_field(sde: SDE, mixture: GaussianMixture) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact probability-flow field dx/dt = f(t) x - g(t)^2 score_t(x) / 2
    (`scoresde.flow.ProbabilityFlow` on the analytic continuation of the schedule) for
    torchdiffeq: `field(t 0-d, x [B, D]) -> [B, D]`."""
    tables: dict = {}

    def score(x: Tensor, t: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in tables:
            tables[key] = _MixtureTables(mixture, x)
        _, _, alpha, var = _schedule_sq(sde, t)
        return exact_score(mixture, x, alpha, var, tables[key])

    return ProbabilityFlow(sde, at_one_time(score), coefficients=schedule_coefficients(sde))


def reference_solve(
    sde: SDE,
    mixture: GaussianMixture,
    x_T: Tensor,
    t_start: float,
    t_end: float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    chunk: int = 20000,
) -> Tensor:
    """The tight probability-flow solve x(t_end) from x(t_start) = x_T `[B, D]`.

    float64 dopri5 (torchdiffeq) at rtol = atol = 1e-10; solved in chunks of `chunk` samples
    (the step size is shared within a chunk, which at this tolerance changes nothing).
    Returns float64 `[B, D]` on x_T's device.
    """
    from torchdiffeq import odeint

    x64 = x_T.to(torch.float64)
    ts = torch.tensor([t_start, t_end], dtype=torch.float64, device=x64.device)
    field_fn = pf_ode_field(sde, mixture)
    parts = [
        odeint(field_fn, part, ts, rtol=rtol, atol=atol, method="dopri5")[-1]
        for part in x64.split(chunk)
    ]
    return torch.cat(parts)
