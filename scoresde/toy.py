"""Exact toy distributions: Gaussian mixtures with closed-form marginals and scores, and the
named 2-D data sets (plus scikit-learn's 8x8 digits).

A Gaussian mixture pushed through any linear SDE of `scoresde.sdes` stays a Gaussian
mixture: component k at time t is N(alpha(t) mu_k, alpha(t)^2 Sigma_k + sigma(t)^2 I). Its
score is therefore exact, so with `GaussianMixture.score_fn(sde)` every error a sampler
or likelihood makes is its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import (
    broadcast_time,
    check_data,
    check_positive_int,
    expand_like,
    resolve_device_dtype,
)
from scoresde.sdes import SDE

__all__ = [
    "GaussianMixture",
    "eight_gaussians",
    "benchmark_mixture_2d",
    "random_mixture",
    "make_dataset",
    "DATASETS",
]


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) in D dimensions.

    Args:
        weights: `[K]`, non-negative, normalised here.
        means: `[K, D]`.
        covs: `[K, D, D]` full (symmetric positive definite), `[K, D]` diagonal, or `[K]`
            isotropic variances.

    Parameters are kept in float64; every method returns the dtype/device of its input
    (or of its `dtype`/`device` arguments).
    """

    def __init__(self, weights: Any, means: Any, covs: Any) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        mu = torch.as_tensor(means, dtype=torch.float64).detach().cpu()
        cov = torch.as_tensor(covs, dtype=torch.float64).detach().cpu()
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must have shape [K] with K >= 1, got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
        K = w.shape[0]
        if mu.ndim != 2 or mu.shape[0] != K:
            raise ValueError(f"means must have shape [K={K}, D], got {tuple(mu.shape)}")
        D = mu.shape[1]
        if not torch.isfinite(mu).all():
            raise ValueError(f"means must be finite, got {mu.tolist()}")
        if not torch.isfinite(cov).all():
            raise ValueError("covs must be finite, got NaN or inf entries")
        if cov.shape == (K,):
            cov = cov[:, None, None] * torch.eye(D, dtype=torch.float64)
        elif cov.shape == (K, D):
            cov = torch.diag_embed(cov)
        elif cov.shape != (K, D, D):
            raise ValueError(
                f"covs must have shape [K, D, D], [K, D] or [K] with K={K}, D={D}, "
                f"got {tuple(cov.shape)}"
            )
        if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-10):
            raise ValueError("covs must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if (evals <= 0).any():
            raise ValueError(
                f"covs must be positive definite, smallest eigenvalue {evals.min().item():.3g}"
            )
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cov
        self._evals = evals  # [K, D]
        self._evecs = evecs  # [K, D, D], Sigma_k = U diag(evals) U^T
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = {}

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _params(self, like: Tensor) -> tuple[Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(
                p.to(device=like.device, dtype=like.dtype)
                for p in (self.weights.log(), self.means, self._evals, self._evecs)
            )
        return self._cache[key]

    def mean(self) -> Tensor:
        """The mixture mean `[D]` (float64)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """The mixture covariance `[D, D]` (float64)."""
        m = self.mean()
        d = self.means - m
        return torch.einsum("k,kij->ij", self.weights, self.covs + d[:, :, None] * d[:, None, :])

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """n samples `[n, D]` (and their component labels `[n]` with `return_labels`)."""
        n = check_positive_int("n", n)
        device, dtype = resolve_device_dtype(generator, device, dtype)
        w = self.weights.to(device)
        labels = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs).to(device)
        x = self.means.to(device)[labels] + torch.einsum("nij,nj->ni", chol[labels], z)
        x = x.to(dtype)
        return (x, labels) if return_labels else x

    def _log_prob_and_score(
        self, x: Tensor, alpha: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """log p, its gradient, and responsibilities for the mixture pushed to (alpha, sigma).

        x `[B, D]`; alpha, sigma `[B]`. Component k has mean alpha mu_k and covariance
        U_k diag(alpha^2 lambda_k + sigma^2) U_k^T.
        """
        logw, mu, lam, U = self._params(x)
        a = alpha[:, None, None]
        var = a**2 * lam[None] + sigma[:, None, None] ** 2  # [B, K, D]
        diff = x[:, None, :] - a * mu[None]  # [B, K, D]
        y = torch.einsum("kdj,bkd->bkj", U, diff)  # U^T (x - alpha mu)
        log_comp = -0.5 * (
            (y**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi)
        )
        joint = logw[None] + log_comp  # [B, K]
        logp = torch.logsumexp(joint, dim=1)
        resp = torch.softmax(joint, dim=1)
        grad_comp = -torch.einsum("kdj,bkj->bkd", U, y / var)  # -Sigma_k(t)^-1 (x - alpha mu)
        score = (resp[:, :, None] * grad_comp).sum(1)
        return logp, score, resp

    def _flat(self, x: Tensor) -> Tensor:
        check_data("x", x)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(
                f"x must have {self.dim} features per sample, got shape {tuple(x.shape)}"
            )
        return flat

    def log_prob(self, x: Tensor) -> Tensor:
        """log density `[B]` of x `[B, D]`."""
        flat = self._flat(x)
        one = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
        return self._log_prob_and_score(flat, one, torch.zeros_like(one))[0]

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x), shaped like x."""
        flat = self._flat(x)
        one = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
        return self._log_prob_and_score(flat, one, torch.zeros_like(one))[1].reshape(x.shape)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities `[B, K]`."""
        flat = self._flat(x)
        one = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
        return self._log_prob_and_score(flat, one, torch.zeros_like(one))[2]

    def marginal(self, sde: SDE, t: float) -> GaussianMixture:
        """The marginal p_t of data ~ this mixture under `sde` at a scalar time t."""
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
        tt = torch.as_tensor(float(t), dtype=torch.float64)
        a, s = sde.alpha(tt), sde.sigma(tt)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, a * self.means, a**2 * self.covs + s**2 * eye)

    def score_fn(self, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact score grad_x log p_t(x) under `sde`: a score_fn(x `[B, *D]`, t `[B]`)."""
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")

        def score_fn(x: Tensor, t: Any) -> Tensor:
            flat = self._flat(x)
            t = broadcast_time(t, flat)
            return self._log_prob_and_score(flat, sde.alpha(t), sde.sigma(t))[1].reshape(x.shape)

        return score_fn

    def log_prob_fn(self, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact log p_t(x) `[B]` under `sde`, as a function of (x, t)."""

        def log_prob_fn(x: Tensor, t: Any) -> Tensor:
            flat = self._flat(x)
            t = broadcast_time(t, flat)
            return self._log_prob_and_score(flat, sde.alpha(t), sde.sigma(t))[0]

        return log_prob_fn

    def eps_fn(self, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact noise prediction eps = -sigma(t) score, for eps-model peers."""
        score = self.score_fn(sde)

        def eps_fn(x: Tensor, t: Any) -> Tensor:
            t = broadcast_time(t, x)
            return -expand_like(sde.sigma(t), x) * score(x, t)

        return eps_fn

    def _known_index(self, known_index: Any) -> tuple[Tensor, Tensor]:
        """(known, unknown) coordinate indices `[m]`, `[D - m]` from indices or a bool mask."""
        idx = torch.as_tensor(known_index).detach().cpu()
        if idx.dtype == torch.bool:
            if idx.shape != (self.dim,):
                raise ValueError(
                    f"known_index as a bool mask must have shape [D={self.dim}], "
                    f"got {tuple(idx.shape)}"
                )
            idx = idx.nonzero()[:, 0]
        elif idx.dtype.is_floating_point or idx.ndim > 1:
            raise TypeError(
                f"known_index must be a sequence of int indices or a bool mask [D], got "
                f"{known_index!r}"
            )
        idx = idx.reshape(-1).long()
        if ((idx < 0) | (idx >= self.dim)).any() or idx.unique().numel() != idx.numel():
            raise ValueError(
                f"known_index must hold distinct indices in [0, {self.dim}), got {idx.tolist()}"
            )
        if idx.numel() == 0 or idx.numel() == self.dim:
            raise ValueError(
                f"known_index must name between 1 and D - 1 = {self.dim - 1} coordinates, "
                f"got {idx.numel()}"
            )
        idx = idx.sort().values
        keep = torch.ones(self.dim, dtype=torch.bool)
        keep[idx] = False
        return idx, keep.nonzero()[:, 0]

    def conditional(self, known_index: Any, values: Any) -> GaussianMixture | list[GaussianMixture]:
        """The closed-form conditional p(x_U | x_M = values) of the unknown coordinates U
        given the known ones M: again a Gaussian mixture, with (Schur complements)

            w_k'  ~ w_k N(values; mu_kM, S_kMM),
            mu_k' = mu_kU + S_kUM S_kMM^-1 (values - mu_kM),
            S_k'  = S_kUU - S_kUM S_kMM^-1 S_kMU.

        Args:
            known_index: the known coordinates M: a sequence of distinct indices in [0, D)
                (any order; `values` follows the same order) or a bool mask `[D]`.
            values: `[m]` (one conditioning vector) or `[B, m]` (a batch), m = |M|.

        Returns:
            A `GaussianMixture` over the D - m unknown coordinates (in increasing index
            order) for `[m]` values, a list of B of them for `[B, m]`.
        """
        order = torch.as_tensor(known_index).detach().cpu()
        known, unknown = self._known_index(known_index)
        y = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
        if y.ndim not in (1, 2) or y.shape[-1] != known.numel():
            raise ValueError(
                f"values must have shape [m] or [B, m] with m = {known.numel()} known "
                f"coordinates, got {tuple(y.shape)}"
            )
        if order.dtype != torch.bool:  # values follow the user's order; `known` is sorted
            y = y[..., torch.argsort(order.reshape(-1).long())]
        if not torch.isfinite(y).all():
            raise ValueError("values must be finite")
        batch = y.reshape(-1, known.numel())  # [B, m]
        mu, cov = self.means, self.covs
        s_mm = cov[:, known][:, :, known]  # [K, m, m]
        s_um = cov[:, unknown][:, :, known]  # [K, u, m]
        s_uu = cov[:, unknown][:, :, unknown]  # [K, u, u]
        chol = torch.linalg.cholesky(s_mm)
        gain = torch.cholesky_solve(s_um.transpose(-1, -2), chol).transpose(-1, -2)  # [K, u, m]
        cond_cov = s_uu - gain @ s_um.transpose(-1, -2)
        cond_cov = 0.5 * (cond_cov + cond_cov.transpose(-1, -2))
        diff = batch[:, None, :] - mu[None, :, known]  # [B, K, m]
        # log N(y; mu_M, S_MM) through the Cholesky factor: |L^-1 d|^2 and log det.
        white = torch.linalg.solve_triangular(chol[None], diff[..., None], upper=False)[..., 0]
        log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [K]
        log_like = -0.5 * ((white**2).sum(-1) + log_det + known.numel() * math.log(2 * math.pi))
        log_w = torch.log_softmax(self.weights.log()[None] + log_like, dim=1)  # [B, K]
        means = mu[None, :, unknown] + torch.einsum("kum,bkm->bku", gain, diff)  # [B, K, u]
        out = [GaussianMixture(log_w[b].exp(), means[b], cond_cov) for b in range(batch.shape[0])]
        return out[0] if y.ndim == 1 else out

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"


def eight_gaussians(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """Eight equal isotropic Gaussians on a circle of `radius` (the '8 Gaussians' set)."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), std**2))


def benchmark_mixture_2d() -> GaussianMixture:
    """The 2-D, 3-component mixture that ../shared/PEERS.md measures peers on."""
    return GaussianMixture(
        [0.3, 0.2, 0.5],
        [[-1.5, 0.0], [1.5, 1.0], [0.5, -1.5]],
        [
            [[0.3, 0.1], [0.1, 0.05]],
            [[0.02, 0.0], [0.0, 0.2]],
            [[0.1, -0.06], [-0.06, 0.1]],
        ],
    )


def random_mixture(
    dim: int, num_components: int = 4, *, scale: float = 1.0, seed: int = 0
) -> GaussianMixture:
    """A reproducible random mixture in `dim` dimensions with anisotropic covariances."""
    dim = check_positive_int("dim", dim)
    num_components = check_positive_int("num_components", num_components)
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(num_components, dim, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(num_components, dim, dim, generator=g, dtype=torch.float64))
    evals = 0.05 + 0.3 * torch.rand(num_components, dim, generator=g, dtype=torch.float64)
    covs = q @ torch.diag_embed(evals) @ q.transpose(-1, -2)
    covs = 0.5 * (covs + covs.transpose(-1, -2))
    weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, covs)


# --- named data sets -------------------------------------------------------------------------


def _two_moons(n: int, g: torch.Generator | None, noise: float = 0.05) -> Tensor:
    upper = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    angle = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _swiss_roll(n: int, g: torch.Generator | None, noise: float = 0.3) -> Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    pts = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    pts = pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return pts / 5.0


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = (
        torch.rand(n, generator=g, dtype=torch.float64)
        - torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2
    )
    x2 = x2 + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], dim=1) * 1.0


def _circles(n: int, g: torch.Generator | None, noise: float = 0.04) -> Tensor:
    outer = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    r = torch.where(outer, torch.full_like(angle, 2.0), torch.full_like(angle, 1.0))
    pts = torch.stack([r * angle.cos(), r * angle.sin()], dim=1)
    return pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)


def load_digits_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1797 images shipped with the package, no download):
    images `[1797, 1, 8, 8]` with integer pixel levels 0..16 as float64, labels `[1797]`.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64)[:, None]
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def _digits(n: int, g: torch.Generator | None) -> Tensor:
    images, _ = load_digits_images()
    idx = torch.randint(0, images.shape[0], (n,), generator=g)
    return images[idx] / 16.0 * 2 - 1  # 17 levels scaled to [-1, 1]


DATASETS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "8gaussians": lambda n, g: eight_gaussians().sample(n, generator=g, dtype=torch.float64),
    "mixture3": lambda n, g: benchmark_mixture_2d().sample(n, generator=g, dtype=torch.float64),
    "two_moons": _two_moons,
    "swiss_roll": _swiss_roll,
    "checkerboard": _checkerboard,
    "circles": _circles,
    "digits": _digits,
}


def make_dataset(
    name: str,
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """n samples of a named toy set: `[n, 2]` for the 2-D sets, `[n, 1, 8, 8]` in [-1, 1]
    for "digits" (drawn with replacement from scikit-learn's 1797 images).

    Names: 8gaussians, mixture3 (the PEERS.md benchmark mixture), two_moons, swiss_roll,
    checkerboard, circles, digits.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    n = check_positive_int("n", n)
    device, dtype = resolve_device_dtype(generator, device, dtype)
    cpu_gen = generator
    if generator is not None and generator.device.type != "cpu":
        # The sets are drawn on the CPU; one draw from the accelerator's generator seeds a
        # CPU one, so successive calls with the same generator still differ.
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        cpu_gen = torch.Generator().manual_seed(int(seed))
    return DATASETS[name](n, cpu_gen).to(device=device, dtype=dtype)
