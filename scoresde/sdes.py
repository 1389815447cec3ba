"""Forward SDEs dx = f(t) x dt + g(t) dw and their reverses (Song et al., ICLR 2021).

Every SDE here is linear in x, so its perturbation kernel is Gaussian in closed form:

    p_0t(x_t | x_0) = N(x_t; alpha(t) x_0, sigma(t)^2 I).

Shapes: data `x` is `[B, *D]` of any rank >= 2; time `t` is `[B]` (a float or a 0-d
tensor is broadcast); per-sample coefficients come back as `[B]`. Device and dtype follow
x. Forward time runs from data (t = 0) to noise (t = T = 1).

Times outside [0, T] are a ValueError naming t in `sde`, `marginal_prob`, `discretize`,
`drift_coef`, `diffusion_coef`, `alpha` and `sigma` (checked for Python numbers and CPU
tensors; see `scoresde._validation.check_time`). `beta`, `log_mean_coeff`, `log_snr`,
`diffusion_sq`, `sigma_sq` and the inverses stay unchecked analytic continuations, and
internal code that evaluates the others slightly past [0, T] on purpose does so inside
`scoresde._validation.unchecked_times()`.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
import torch.nn.functional as F

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    as_tensor,
    broadcast_time,
    check_data,
    check_positive,
    check_positive_int,
    check_shape,
    check_time,
    expand_like,
    resolve_device_dtype,
    unchecked_times,
)
from scoresde.reverse_sde import ReverseSDE

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "ReverseSDE"]


class SDE(abc.ABC):
    """A linear forward SDE dx = f(t) x dt + g(t) dw on [0, T].

    Subclasses define the scalar coefficients `drift_coef` f(t), `diffusion_coef` g(t),
    and the kernel's `alpha(t)` (mean coefficient) and `sigma(t)` (std); everything else
    (drift, kernel, reverse, log-SNR) is derived here once.
    """

    T: float = 1.0

    def __init__(self, N: int) -> None:
        self.N = check_positive_int("N", N)

    # --- scalar schedule: each takes t of any shape and returns that shape ------------------
    @abc.abstractmethod
    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) in the drift f(t) x."""

    @abc.abstractmethod
    def diffusion_coef(self, t: Tensor) -> Tensor:
        """g(t), the diffusion coefficient."""

    @abc.abstractmethod
    def alpha(self, t: Any) -> Tensor:
        """alpha(t) = exp(int_0^t f(s) ds), the mean coefficient of p_0t."""

    @abc.abstractmethod
    def sigma(self, t: Any) -> Tensor:
        """sigma(t), the standard deviation of p_0t."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) at t = T."""

    def log_snr(self, t: Any) -> Tensor:
        """lambda(t) = log(alpha(t)^2 / sigma(t)^2), decreasing in t."""
        t = as_tensor(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    @abc.abstractmethod
    def t_from_log_snr(self, lam: Any) -> Tensor:
        """The inverse of `log_snr`: the t with log_snr(t) = lam.

        The formula is not clamped: a lam outside [log_snr(T), log_snr(0)] gives a t outside
        [0, T], which the SDE's methods and a ScoreModel refuse with a ValueError.
        """

    # --- the API of Song et al.'s sde_lib, shape-agnostic -----------------------------------
    def sde(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """(drift f(t) x shaped like x, diffusion g(t) `[B]`)."""
        check_data("x", x)
        check_time(t, self.T)
        t = broadcast_time(t, x)
        return expand_like(self.drift_coef(t), x) * x, self.diffusion_coef(t)

    def marginal_prob(self, x0: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """(mean alpha(t) x0 shaped like x0, std sigma(t) `[B]`) of p_0t(x_t | x_0)."""
        check_data("x0", x0)
        check_time(t, self.T)
        t = broadcast_time(t, x0)
        return expand_like(self.alpha(t), x0) * x0, self.sigma(t)

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """A `shape` sample of the prior N(0, prior_std^2 I)."""
        shape = check_shape(shape)
        device, dtype = resolve_device_dtype(generator, device, dtype)
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) summed over all but the batch dim: `[B]`."""
        check_data("z", z)
        dim = z[0].numel()
        s = self.prior_std
        sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * dim * math.log(2 * math.pi * s * s) - sq / (2 * s * s)

    def discretize(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """One forward step x_{i+1} = x_i + f + G z; Euler–Maruyama with dt = T/N.

        Returns (f shaped like x, G `[B]`).
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def _table(self, name: str, like: Tensor) -> Tensor:
        """The float64 table attribute `name` (e.g. `discrete_betas`) on like's device and dtype.

        Cached per (device, dtype) so a sampling loop does not copy (or, on a GPU, upload) the
        table at every step; a reassigned attribute is picked up.
        """
        table = getattr(self, name)
        cache = self.__dict__.setdefault("_table_cache", {})
        key = (name, like.device, like.dtype)
        hit = cache.get(key)
        if hit is None or hit[0] is not table:
            hit = (table, table.to(device=like.device, dtype=like.dtype))
            cache[key] = hit
        return hit[1]

    def _index(self, t: Tensor) -> Tensor:
        """Discrete step index i = floor(t (N - 1) / T), clamped to [0, N - 1]."""
        return (t * (self.N - 1) / self.T).long().clamp(0, self.N - 1)

    # --- what this SDE can do (asked of the SDE, never by isinstance elsewhere) --------------
    #: The short name of a built-in SDE ("vp", "subvp", "ve", "cosine"); None for others.
    name: str | None = None

    #: alpha(t)^2 + sigma(t)^2 = 1 for all t (VP, cosine VP): x_t is on DDPM's scale.
    variance_preserving: bool = False
    #: The SDE's own kernel is a DDPM chain q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I)
    #: at matched times: VP (DDPM's linear betas) and cosine VP (Improved DDPM's); not sub-VP
    #: (alpha^2 + sigma^2 < 1; the reference implementation has no chain for it either) nor
    #: VE (SMLD's chain).
    has_ddpm_chain: bool = False

    def ddpm_alphas_cumprod(self, N: int | None = None) -> Tensor | None:
        """The DDPM chain's abar_i `[N]` (float64) of this SDE with N steps (default self.N),
        or None when it has none (`has_ddpm_chain`)."""
        if not self.has_ddpm_chain:
            return None
        sde = self if N is None or N == self.N else self.with_N(N)
        return sde.alphas_cumprod

    def config(self) -> dict[str, Any]:
        """{"name": ..., constructor kwargs}: what a checkpoint stores to rebuild the SDE
        (`scoresde.training.build_sde(**config)`); {"name": class name, "custom": True} for
        an SDE that is not built in."""
        if self.name is None:
            return {"name": type(self).__name__, "custom": True}
        return {"name": self.name, **self._kwargs(), "N": self.N}

    def _kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments other than N (built-in SDEs)."""
        return {}

    def with_N(self, N: int) -> SDE:
        """A copy of this SDE with N discretization steps (the same continuous process)."""
        if self.name is None:
            raise TypeError(f"with_N needs a built-in SDE, got {type(self).__name__}")
        return type(self)(**self._kwargs(), N=N)

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g(t)^2 in closed form (an analytic continuation slightly past [0, T] where the
        square root is not defined)."""
        with unchecked_times():
            return self.diffusion_coef(t) ** 2

    def sigma_sq(self, t: Tensor) -> Tensor:
        """sigma(t)^2 in closed form (analytic slightly past [0, T])."""
        with unchecked_times():
            return self.sigma(t) ** 2

    def reverse_coefficients(
        self, t: Tensor, probability_flow: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(f(t), c(t)) shaped like t, with the reverse drift f(t) x - c(t) s(x, t):
        c = g^2 for the reverse SDE, g^2 / 2 for the probability-flow ODE."""
        g2 = self.diffusion_coef(t) ** 2
        return self.drift_coef(t), 0.5 * g2 if probability_flow else g2

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or probability-flow ODE) driven by `score_fn`."""
        return ReverseSDE(self, score_fn, probability_flow)

    def __repr__(self) -> str:
        kwargs = "".join(f"{k}={v}, " for k, v in self._kwargs().items())
        return f"{type(self).__name__}({kwargs}N={self.N})"


class _VPFamily(SDE):
    """Shared pieces of the SDEs with drift -beta(t) x / 2 (VP, sub-VP, cosine VP)."""

    @abc.abstractmethod
    def beta(self, t: Tensor) -> Tensor:
        """beta(t), the instantaneous noise rate."""

    @abc.abstractmethod
    def log_mean_coeff(self, t: Any) -> Tensor:
        """c(t) = log alpha(t) = -int_0^t beta(s) ds / 2."""

    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) = -beta(t) / 2."""
        check_time(t, self.T)
        return -0.5 * self.beta(t)

    def alpha(self, t: Any) -> Tensor:
        """alpha(t) = exp(c(t))."""
        check_time(t, self.T)
        return torch.exp(self.log_mean_coeff(as_tensor(t)))

    @property
    def prior_std(self) -> float:
        return 1.0

    def t_from_log_mean_coeff(self, c: Tensor) -> Tensor:
        """The inverse of c(t) (c <= 0 decreasing in t)."""
        raise NotImplementedError


class VPSDE(_VPFamily):
    """Variance preserving SDE, DDPM in continuous time: dx = -beta(t) x/2 dt + sqrt(beta(t)) dw,
    beta(t) = beta_min + t (beta_max - beta_min).

    The defaults discretize to DDPM's linear schedule 1e-4 .. 0.02 over N = 1000 steps.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(N)
        self.beta_0 = check_positive("beta_min", beta_min, allow_zero=True)
        self.beta_1 = check_positive("beta_max", beta_max)
        if self.beta_1 < self.beta_0:
            raise ValueError(
                f"beta_max must be >= beta_min, got beta_min={beta_min!r}, beta_max={beta_max!r}"
            )
        # DDPM's discrete chain, float64 on the CPU; moved/cast where used.
        self.discrete_betas = torch.linspace(
            self.beta_0 / N, self.beta_1 / N, N, dtype=torch.float64
        )
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def diffusion_coef(self, t: Tensor) -> Tensor:
        """g(t) = sqrt(beta(t))."""
        check_time(t, self.T)
        return torch.sqrt(self.beta(t))

    def log_mean_coeff(self, t: Any) -> Tensor:
        """c(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2."""
        t = as_tensor(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def sigma(self, t: Any) -> Tensor:
        """sigma(t) = sqrt(1 - exp(2 c(t)))."""
        check_time(t, self.T)
        return torch.sqrt(-torch.expm1(2 * self.log_mean_coeff(t)))

    def log_snr(self, t: Any) -> Tensor:
        """lambda(t) = 2 c - log(1 - exp(2 c))."""
        c2 = 2 * self.log_mean_coeff(t)
        return c2 - torch.log(-torch.expm1(c2))

    def t_from_log_mean_coeff(self, c: Tensor) -> Tensor:
        """Solve (beta_max - beta_min) t^2 / 4 + beta_min t / 2 + c = 0 for t >= 0."""
        a = 0.25 * (self.beta_1 - self.beta_0)
        b = 0.5 * self.beta_0
        # -2c / (b + sqrt(b^2 - 4 a c)) is the root without cancellation (and works for a = 0);
        # c = 0 is t = 0 also when beta_min = 0, where the formula is 0/0.
        c = as_tensor(c)
        t = -2 * c / (b + torch.sqrt(b * b - 4 * a * c))
        return torch.where(c == 0, torch.zeros_like(t), t)

    def t_from_log_snr(self, lam: Any) -> Tensor:
        """alpha^2 = sigmoid(lambda), so c = -softplus(-lambda) / 2."""
        lam = as_tensor(lam)
        return self.t_from_log_mean_coeff(-0.5 * F.softplus(-lam))

    def discretize(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """DDPM's transition: f = sqrt(1 - beta_i) x - x, G = sqrt(beta_i), i = floor(t (N-1)/T)."""
        check_data("x", x)
        check_time(t, self.T)
        t = broadcast_time(t, x)
        i = self._index(t)
        beta = self._table("discrete_betas", x)[i]
        f = expand_like(torch.sqrt(1.0 - beta), x) * x - x
        return f, torch.sqrt(beta)

    name = "vp"
    variance_preserving = True
    has_ddpm_chain = True

    def _kwargs(self) -> dict[str, Any]:
        return {"beta_min": self.beta_0, "beta_max": self.beta_1}

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g(t)^2 = beta(t)."""
        return self.beta(t)

    def sigma_sq(self, t: Tensor) -> Tensor:
        """sigma(t)^2 = 1 - exp(2 c(t))."""
        return -torch.expm1(2 * self.log_mean_coeff(t))


class SubVPSDE(VPSDE):
    """sub-VP SDE: dx = -beta x/2 dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw.

    Same mean as VP, std 1 - exp(2 c(t)) <= the VP std (Song et al. 2021, eq. 11).
    """

    def diffusion_coef(self, t: Tensor) -> Tensor:
        """g(t) = sqrt(beta(t) (1 - exp(4 c(t))))."""
        check_time(t, self.T)
        return torch.sqrt(self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t)))

    def sigma(self, t: Any) -> Tensor:
        """sigma(t) = 1 - exp(2 c(t))."""
        check_time(t, self.T)
        return -torch.expm1(2 * self.log_mean_coeff(t))

    def log_snr(self, t: Any) -> Tensor:
        """lambda(t) = 2 c - 2 log(1 - exp(2 c))."""
        c2 = 2 * self.log_mean_coeff(t)
        return c2 - 2 * torch.log(-torch.expm1(c2))

    def t_from_log_snr(self, lam: Any) -> Tensor:
        """alpha / sigma = r = exp(lambda/2) with alpha = u: r u^2 + u - r = 0.

        u = 2r / (1 + sqrt(1 + 4 r^2)); log u written as -log1p(...) to stay accurate as u -> 1.
        """
        lam = as_tensor(lam)
        r = torch.exp(0.5 * lam)
        root = torch.sqrt(1 + 4 * r * r)
        c = -torch.log1p((1 + 1 / (root + 2 * r)) / (2 * r))
        return self.t_from_log_mean_coeff(c)

    def discretize(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """Euler–Maruyama (the reference implementation has no special chain for sub-VP)."""
        return SDE.discretize(self, x, t)

    name = "subvp"
    # Its `discrete_betas`/`alphas_cumprod` are VP's (kept for SNR matching, e.g. by
    # `ddpm_vlb`), but its kernel is not that chain's.
    variance_preserving = False
    has_ddpm_chain = False

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g(t)^2 = beta(t) (1 - exp(4 c(t)))."""
        return self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t))

    def sigma_sq(self, t: Tensor) -> Tensor:
        """sigma(t)^2 = (1 - exp(2 c(t)))^2."""
        return (-torch.expm1(2 * self.log_mean_coeff(t))) ** 2


class VESDE(SDE):
    """Variance exploding SDE, SMLD/NCSN in continuous time: dx = sqrt(d sigma(t)^2/dt) dw,
    sigma(t) = sigma_min (sigma_max / sigma_min)^t.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000) -> None:
        super().__init__(N)
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"sigma_max must be > sigma_min, got sigma_min={sigma_min!r}, "
                f"sigma_max={sigma_max!r}"
            )
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        # SMLD's noise levels: geometric from sigma_min to sigma_max in N points.
        self.discrete_sigmas = torch.exp(
            torch.linspace(
                math.log(self.sigma_min), math.log(self.sigma_max), N, dtype=torch.float64
            )
        )

    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) = 0."""
        check_time(t, self.T)
        return torch.zeros_like(t)

    def diffusion_coef(self, t: Tensor) -> Tensor:
        """g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min))."""
        check_time(t, self.T)
        return self._sigma(t) * math.sqrt(2 * self._log_ratio)

    def alpha(self, t: Any) -> Tensor:
        """alpha(t) = 1."""
        check_time(t, self.T)
        return torch.ones_like(as_tensor(t))

    def sigma(self, t: Any) -> Tensor:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        check_time(t, self.T)
        return self._sigma(t)

    def _sigma(self, t: Any) -> Tensor:
        return self.sigma_min * torch.exp(as_tensor(t) * self._log_ratio)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def log_snr(self, t: Any) -> Tensor:
        """lambda(t) = -2 log sigma(t)."""
        return -2 * (math.log(self.sigma_min) + as_tensor(t) * self._log_ratio)

    def t_from_log_snr(self, lam: Any) -> Tensor:
        """t = (log sigma - log sigma_min) / log(sigma_max / sigma_min), sigma = exp(-lambda/2)."""
        return (-0.5 * as_tensor(lam) - math.log(self.sigma_min)) / self._log_ratio

    def discretize(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """SMLD's chain: f = 0, G = sqrt(sigma_i^2 - sigma_{i-1}^2), sigma_{-1} = 0."""
        check_data("x", x)
        check_time(t, self.T)
        t = broadcast_time(t, x)
        i = self._index(t)
        sigmas = self._table("discrete_sigmas", x)
        sigma = sigmas[i]
        previous = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigma**2 - previous**2)

    name = "ve"

    def _kwargs(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g(t)^2 = 2 log(sigma_max / sigma_min) sigma(t)^2."""
        return 2 * self._log_ratio * self._sigma(t) ** 2


class CosineVPSDE(_VPFamily):
    """VP SDE with Nichol & Dhariwal's (2021) cosine schedule, in continuous time.

    alpha(t)^2 = cos^2(theta(t)) / cos^2(theta(0)), theta(t) = (t t_max / T + s) / (1 + s) pi/2,
    beta(t) = -d log alpha^2 / dt = pi t_max tan(theta(t)) / ((1 + s) T).

    The cosine schedule's beta diverges at the end of its time range; `t_max` < 1 stops it
    short of that (like DPM-Solver's T = 0.9946) and rescales it to [0, T], so beta, alpha
    and sigma stay exactly consistent: alpha(T)^2 is about 7e-5 and beta(T) about 370.
    """

    def __init__(self, N: int = 1000, s: float = 0.008, t_max: float = 0.9946) -> None:
        super().__init__(N)
        self.s = check_positive("s", s)
        self.t_max = check_positive("t_max", t_max)
        if self.t_max >= 1.0:
            raise ValueError(f"t_max must be in (0, 1) so beta(T) stays finite, got {t_max!r}")
        self._theta0 = self.s / (1 + self.s) * math.pi / 2
        self._dtheta_dt = self.t_max / ((1 + self.s) * self.T) * math.pi / 2
        self._tan_theta0 = math.tan(self._theta0)
        self._log_sin_phi0 = math.log(math.sin(math.pi / 2 - self._theta0))
        # Improved DDPM's discrete chain on the same schedule (betas clipped at 0.999).
        grid = torch.linspace(0, self.T, N + 1, dtype=torch.float64)
        abar = torch.exp(2 * self.log_mean_coeff(grid))
        self.discrete_betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _theta(self, t: Tensor) -> Tensor:
        return self._theta0 + t * self._dtheta_dt

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = 2 tan(theta(t)) d theta/dt."""
        return 2 * torch.tan(self._theta(t)) * self._dtheta_dt

    def diffusion_coef(self, t: Tensor) -> Tensor:
        """g(t) = sqrt(beta(t))."""
        check_time(t, self.T)
        return torch.sqrt(self.beta(t))

    def log_mean_coeff(self, t: Any) -> Tensor:
        """c(t) = log cos(theta(t)) - log cos(theta(0)), evaluated without cancellation.

        With delta = theta(t) - theta(0): near t = 0, c = log1p(-2 sin^2(delta/2) -
        tan(theta0) sin(delta)) (log cos(theta) - log cos(theta0) would lose every digit of
        a tiny c, e.g. a float32 sigma(1e-6) off by a factor of 100); near T,
        cos(theta) = sin(phi) with phi = pi/2 - theta = ((1 - u) + u (1 - t_max)) pi / (2 (1 + s)),
        u = t / T, which keeps the small phi accurate.
        """
        t = as_tensor(t)
        delta = t * self._dtheta_dt
        near_zero = torch.log1p(
            -2 * torch.sin(0.5 * delta) ** 2 - self._tan_theta0 * torch.sin(delta)
        )
        u = t / self.T
        phi = ((1 - u) + u * (1 - self.t_max)) * (math.pi / (2 * (1 + self.s)))
        near_end = torch.log(torch.sin(phi)) - self._log_sin_phi0
        return torch.where(u < 0.5, near_zero, near_end)

    def sigma(self, t: Any) -> Tensor:
        """sigma(t) = sqrt(1 - alpha(t)^2)."""
        check_time(t, self.T)
        return torch.sqrt(-torch.expm1(2 * self.log_mean_coeff(t)))

    def log_snr(self, t: Any) -> Tensor:
        """lambda(t) = 2 c - log(1 - exp(2 c))."""
        c2 = 2 * self.log_mean_coeff(t)
        return c2 - torch.log(-torch.expm1(c2))

    def _t_from_alpha(self, alpha: Tensor, sigma2: Tensor) -> Tensor:
        """t from alpha = cos(theta)/cos(theta0) and sigma^2 = 1 - alpha^2, both given so that
        neither is computed by cancellation.

        theta - theta0 = atan2(sin(theta - theta0), cos(theta - theta0)) with
        sin(theta) = sqrt(sin^2 theta0 + cos^2 theta0 sigma^2) and
        sin(theta - theta0) = cos(theta0) sigma^2 / (sin(theta) + alpha sin(theta0)), which is
        accurate for tiny t where arccos(cos(theta0) alpha) is not.
        """
        cos0, sin0 = math.cos(self._theta0), math.sin(self._theta0)
        sin_theta = torch.sqrt(sin0 * sin0 + cos0 * cos0 * sigma2)
        cos_theta = cos0 * alpha
        sin_diff = cos0 * sigma2 / (sin_theta + alpha * sin0)
        cos_diff = cos_theta * cos0 + sin_theta * sin0
        return torch.atan2(sin_diff, cos_diff) / self._dtheta_dt

    def t_from_log_mean_coeff(self, c: Tensor) -> Tensor:
        """The t with log alpha(t) = c: theta = arccos(cos(theta0) exp(c)), computed stably."""
        c = as_tensor(c)
        return self._t_from_alpha(torch.exp(c), -torch.expm1(2 * c))

    def t_from_log_snr(self, lam: Any) -> Tensor:
        """alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
        lam = as_tensor(lam)
        return self._t_from_alpha(torch.sqrt(torch.sigmoid(lam)), torch.sigmoid(-lam))

    name = "cosine"
    variance_preserving = True
    has_ddpm_chain = True

    def _kwargs(self) -> dict[str, Any]:
        return {"s": self.s, "t_max": self.t_max}

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """g(t)^2 = beta(t)."""
        return self.beta(t)
