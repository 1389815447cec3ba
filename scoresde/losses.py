"""Training objectives: continuous-time denoising score matching and DDPM's L_simple.

Both losses perturb clean data with the SDE's Gaussian kernel,

    x_t = alpha(t) x0 + sigma(t) z,    z ~ N(0, I),

whose score is grad log p_0t(x_t | x0) = -z / sigma(t). Denoising score matching
(Vincent 2011; Song et al. 2021, eq. 7) regresses the model's score onto that target:

    L(theta) = E_{t, x0, z} [ lambda(t) || s_theta(x_t, t) + z / sigma(t) ||^2 ].

Written through the noise prediction eps_hat = -sigma(t) s_theta(x_t, t), the integrand is

    lambda(t) / sigma(t)^2 * || eps_hat - z ||^2,

which is how it is computed here: for an "eps" `ScoreModel` eps_hat is the network
output itself, so nothing is divided by a small sigma and multiplied back (the two forms
are equal mathematically; the second stays well scaled as sigma -> 0).

Design: each loss splits into `sample_noise` (every random draw for a batch: times or
step indices, the noise z and the label-dropout mask) and `per_sample` (a deterministic
function of the model, the data and those draws). `__call__` chains them. The `Trainer`
draws the noise for the *global* batch and hands each process its slice, so a
multi-process run consumes exactly the random numbers of a single-process run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from scoresde._typing import Tensor
from scoresde._validation import (
    check_choice,
    check_data,
    check_finite_rows,
    check_positive,
    expand_like,
    unchecked_times,
)
from scoresde.nets.score_model import ScoreModel
from scoresde.sdes import SDE

ScoreFn = Callable[..., Tensor]

__all__ = ["DSMLoss", "DDPMLoss", "LossNoise", "WEIGHTINGS", "noise_prediction"]

WEIGHTINGS = ("sigma2", "likelihood", "none")


class LossNoise(NamedTuple):
    """The random draws of one loss evaluation on a batch of B samples.

    t: `[B]` continuous times; step: `[B]` DDPM step indices (long) or None;
    z: `[B, *D]` Gaussian noise; drop: `[B]` bool, True where the label is replaced by
    the null class (classifier-free guidance training), or None; weight: `[B]` extra
    per-sample factor (importance-sampling correction) or None.
    """

    t: Tensor
    z: Tensor
    step: Tensor | None = None
    drop: Tensor | None = None
    weight: Tensor | None = None

    def slice(self, start: int, stop: int) -> LossNoise:
        """The draws of samples `start:stop` (a process's share of a global batch)."""
        return LossNoise(*(None if v is None else v[start:stop] for v in self))


def _null_label(model: Any) -> int:
    """The null-class index of a conditional network: its `num_classes` (MLPScoreNet, UNet),
    looked up through ScoreModel (`.net`) and DistributedDataParallel (`.module`) wrappers."""
    todo = [model]
    while todo:
        obj = todo.pop()
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        todo += [
            getattr(obj, a)
            for a in ("net", "module")
            if isinstance(getattr(obj, a, None), nn.Module)
        ]
    raise ValueError(
        "label_dropout > 0 needs a conditional model with an integer `num_classes` "
        "(its null class); the model has none"
    )


def _apply_dropout(model: Any, y: Tensor | None, drop: Tensor | None) -> Tensor | None:
    if y is None or drop is None:
        return y
    null = torch.full_like(y, _null_label(model))
    return torch.where(drop, null, y)


def _call_score(model: ScoreFn, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    return model(x, t) if y is None else model(x, t, y)


def noise_prediction(
    model: ScoreFn, sde: SDE, x: Tensor, t: Tensor, y: Tensor | None = None
) -> Tensor:
    """eps_hat = -sigma(t) * score(x, t) `[B, *D]`, computed without dividing by sigma where
    the model allows it.

    For a `ScoreModel` on the same SDE this is `ScoreModel.noise_prediction` (the network
    output converted directly, e.g. "eps" without preconditioning: eps_hat = out). Any
    other callable goes through its score.
    """
    if isinstance(model, ScoreModel) and model.sde is sde:
        return model.noise_prediction(x, t, y)
    score = _call_score(model, x, t, y)
    if score.shape != x.shape:
        raise ValueError(
            f"the score must have x's shape {tuple(x.shape)}, got {tuple(score.shape)}"
        )
    return -expand_like(sde.sigma(t), x) * score


def _reduce(sq: Tensor, reduce_mean: bool) -> Tensor:
    """Per-sample squared error `[B, *D]` -> `[B]` (mean or sum over the data dims)."""
    flat = sq.reshape(sq.shape[0], -1)
    return flat.mean(dim=1) if reduce_mean else flat.sum(dim=1)


def _check_finite_flag(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"check_finite must be None, True or False, got {value!r}")
    return value


class _Loss:
    """Shared call protocol: loss(model, x0, generator=None, y=None) -> scalar."""

    label_dropout: float = 0.0
    # None: refuse non-finite x0 when it is on the CPU (a cheap reduction); on an
    # accelerator the check costs a host sync per call, so it runs only with True.
    check_finite: bool | None = None

    def sample_noise(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        *,
        has_labels: bool = False,
    ) -> LossNoise:
        raise NotImplementedError

    def per_sample(
        self, model: ScoreFn, x0: Tensor, noise: LossNoise, y: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def _dropout_mask(
        self, batch: int, has_labels: bool, generator: torch.Generator | None, device: Any
    ) -> Tensor | None:
        if not has_labels or self.label_dropout == 0.0:
            return None
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        return u < self.label_dropout

    def __call__(
        self,
        model: ScoreFn,
        x0: Tensor,
        generator: torch.Generator | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """The loss on a batch x0 `[B, *D]` (labels y `[B]` for conditional models):
        a scalar, the mean over the batch of `per_sample`."""
        if not callable(model):
            raise TypeError(f"model must be a callable score function, got {type(model).__name__}")
        check_data("x0", x0)
        if self.check_finite or (self.check_finite is None and x0.device.type == "cpu"):
            check_finite_rows("x0", x0)
        if y is not None and (not torch.is_tensor(y) or y.shape[:1] != x0.shape[:1]):
            raise ValueError(
                f"y must be a tensor of labels [B] = [{x0.shape[0]}], got "
                f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}"
            )
        noise = self.sample_noise(x0, generator, has_labels=y is not None)
        return self.per_sample(model, x0, noise, y).mean()


class DSMLoss(_Loss):
    """Continuous-time denoising score matching (Song et al. 2021, eq. 7).

    loss = E_{t ~ U(eps, T), x0, z} lambda(t) || s(x_t, t) + z / sigma(t) ||^2
         = E lambda(t) / sigma(t)^2 || eps_hat - z ||^2,   eps_hat = -sigma(t) s(x_t, t),

    with lambda(t) = sigma(t)^2 ("sigma2", Song et al.'s default: the eps-prediction loss),
    g(t)^2 ("likelihood", Song et al. 2021b: the weighted loss bounds the KL / NLL) or 1
    ("none"). The squared norm is averaged over the data dims (`reduce_mean=True`) or
    summed, then averaged over the batch.

    `importance_sampling=True` (likelihood weighting only) draws t with density
    q(t) proportional to g(t)^2 / sigma(t)^2 and multiplies by the matching weight, which
    leaves the expectation unchanged and removes most of its variance. For every linear
    SDE, d sigma^2/dt = 2 f sigma^2 + g^2, so g^2 / sigma^2 = -d log-SNR / dt: under q the
    log-SNR lambda(t) is *uniform* on [lambda(T), lambda(eps)] and t = t_from_log_snr(lambda)
    is exact (no grid). The per-sample weight is then
    (lambda(eps) - lambda(T)) / (T - eps) on || eps_hat - z ||^2.

    `label_dropout` p: for conditional training (labels y given), each label is replaced by
    the network's null class `num_classes` with probability p (classifier-free guidance).

    `check_finite`: calling the loss on x0 holding NaN/Inf raises ValueError naming the rows
    (instead of returning a NaN loss). None (default): checked when x0 is on the CPU (one
    reduction); on an accelerator the check would cost a host sync per call, so it runs
    there only with True (the `Trainer` validates its data when loading it and calls
    `per_sample`, never this check). False: never.
    """

    def __init__(
        self,
        sde: SDE,
        weighting: str = "sigma2",
        eps: float = 1e-5,
        reduce_mean: bool = True,
        importance_sampling: bool = False,
        label_dropout: float = 0.0,
        check_finite: bool | None = None,
    ) -> None:
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
        self.sde = sde
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self.eps = check_positive("eps", eps)
        if self.eps >= sde.T:
            raise ValueError(f"eps must be < T = {sde.T}, got {eps!r}")
        self.reduce_mean = bool(reduce_mean)
        self.importance_sampling = bool(importance_sampling)
        if self.importance_sampling and weighting != "likelihood":
            raise ValueError(
                "importance_sampling=True is only defined for weighting='likelihood', "
                f"got weighting={weighting!r}"
            )
        self.label_dropout = check_positive("label_dropout", label_dropout, allow_zero=True)
        self.check_finite = _check_finite_flag(check_finite)
        if self.label_dropout >= 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout!r}")
        if self.importance_sampling:
            ends = torch.tensor([self.eps, sde.T], dtype=torch.float64)
            lam_eps, lam_T = sde.log_snr(ends).tolist()
            self._lam_range = (lam_T, lam_eps)
            self._is_weight = (lam_eps - lam_T) / (sde.T - self.eps)

    def sample_noise(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        *,
        has_labels: bool = False,
    ) -> LossNoise:
        """t `[B]` ~ U(eps, T) (or the importance distribution), z ~ N(0, I) like x0."""
        device, dtype, batch = x0.device, x0.dtype, x0.shape[0]
        u = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        weight = None
        if self.importance_sampling:
            lo, hi = self._lam_range
            t = self.sde.t_from_log_snr(lo + (hi - lo) * u).clamp(self.eps, self.sde.T)
            weight = torch.full_like(t, self._is_weight)
        else:
            t = self.eps + (self.sde.T - self.eps) * u
        z = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
        drop = self._dropout_mask(batch, has_labels, generator, device)
        return LossNoise(t=t, z=z, drop=drop, weight=weight)

    def weight(self, t: Tensor) -> Tensor:
        """lambda(t) / sigma(t)^2 `[B]`, the factor on || eps_hat - z ||^2."""
        if self.weighting == "sigma2":
            return torch.ones_like(t)
        sigma2 = self.sde.sigma(t) ** 2
        if self.weighting == "none":
            return 1.0 / sigma2
        return self.sde.diffusion_coef(t) ** 2 / sigma2

    def per_sample(
        self, model: ScoreFn, x0: Tensor, noise: LossNoise, y: Tensor | None = None
    ) -> Tensor:
        """`[B]` per-sample losses lambda(t)/sigma^2 ||eps_hat - z||^2 for given draws."""
        t, z = noise.t.to(x0.dtype), noise.z
        alpha = expand_like(self.sde.alpha(t), x0)
        sigma = expand_like(self.sde.sigma(t), x0)
        xt = alpha * x0 + sigma * z
        eps_hat = noise_prediction(model, self.sde, xt, t, _apply_dropout(model, y, noise.drop))
        err = _reduce((eps_hat - z) ** 2, self.reduce_mean)
        if noise.weight is not None:  # importance sampling: lambda/sigma^2 / q(t) is constant
            return noise.weight.to(err.dtype) * err
        return self.weight(t).to(err.dtype) * err

    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values) for checkpoints."""
        return {
            "name": "dsm",
            "weighting": self.weighting,
            "eps": self.eps,
            "reduce_mean": self.reduce_mean,
            "importance_sampling": self.importance_sampling,
            "label_dropout": self.label_dropout,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"DSMLoss({self.sde!r}, {args})"


def ddpm_timesteps(sde: SDE) -> Tensor:
    """The continuous time t_i `[N]` (float64) of DDPM step i for a VP-type SDE.

    t_i is the exact solution of alpha(t_i)^2 = abar_i, i.e. log-SNR(t_i) =
    log(abar_i / (1 - abar_i)), so the continuous kernel at t_i *is* DDPM's q(x_i | x_0)
    to float64 precision. For the default linear VPSDE this differs from the naive
    t_i = (i + 1) / N by at most 0.0034 (that mapping gets the noise std of step 0 wrong
    by 4.9 %; Song et al.'s i = t (N - 1) / T, i.e. t_i = i / N-1, gives std 0 at i = 0);
    for CosineVPSDE, whose chain is built from alpha((i+1)/N), it equals (i + 1) / N.
    The last t_i of the linear VPSDE is 1.0034, just past T (the schedule extends there).
    """
    abar = sde.alphas_cumprod
    return sde.t_from_log_snr(torch.log(abar) - torch.log1p(-abar))


class DDPMLoss(_Loss):
    """DDPM's L_simple (Ho et al. 2020) on the discrete chain of a VP SDE.

    i ~ U{0, ..., N-1}, x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) z, and
    loss = || eps_hat - z ||^2 with eps_hat = -sqrt(1 - abar_i) score(x_i, t_i), where
    t_i = `ddpm_timesteps(sde)[i]` (see there: the continuous kernel at t_i equals
    DDPM's). Mean over data dims (`reduce_mean`) or sum, then mean over the batch.

    Accepts `VPSDE` and `CosineVPSDE` (their `alphas_cumprod` define the chain); sub-VP and
    VE SDEs have no DDPM chain and raise TypeError. `check_finite` as in `DSMLoss`.
    """

    def __init__(
        self,
        sde: SDE,
        reduce_mean: bool = True,
        label_dropout: float = 0.0,
        check_finite: bool | None = None,
    ) -> None:
        if not isinstance(sde, SDE) or not sde.has_ddpm_chain:
            raise TypeError(
                "sde must be a VPSDE or CosineVPSDE (DDPM's discrete chain is variance "
                f"preserving), got {type(sde).__name__}; use DSMLoss for other SDEs"
            )
        self.sde = sde
        self.reduce_mean = bool(reduce_mean)
        self.label_dropout = check_positive("label_dropout", label_dropout, allow_zero=True)
        self.check_finite = _check_finite_flag(check_finite)
        if self.label_dropout >= 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout!r}")
        self.timesteps = ddpm_timesteps(sde)  # [N] float64, cast where used
        self.alphas_cumprod = sde.alphas_cumprod
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}

    def _tables(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(t_i, sqrt(abar_i), sqrt(1 - abar_i)) on like's device and dtype, cached."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            abar = self.alphas_cumprod
            self._cache[key] = tuple(
                v.to(device=like.device, dtype=like.dtype)
                for v in (self.timesteps, abar.sqrt(), (1 - abar).sqrt())
            )
        return self._cache[key]

    def sample_noise(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        *,
        has_labels: bool = False,
    ) -> LossNoise:
        """step `[B]` ~ U{0..N-1} (with t = t_step), z ~ N(0, I) like x0."""
        batch = x0.shape[0]
        step = torch.randint(
            0, self.sde.N, (batch,), generator=generator, device=x0.device, dtype=torch.long
        )
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self._tables(x0)[0][step]
        drop = self._dropout_mask(batch, has_labels, generator, x0.device)
        return LossNoise(t=t, z=z, step=step, drop=drop)

    def per_sample(
        self, model: ScoreFn, x0: Tensor, noise: LossNoise, y: Tensor | None = None
    ) -> Tensor:
        """`[B]` per-sample ||eps_hat - z||^2 for given draws (uses noise.step)."""
        if noise.step is None:
            raise ValueError("DDPMLoss needs noise drawn by DDPMLoss.sample_noise (step is None)")
        t_tab, sa_tab, s_tab = self._tables(x0)
        step = noise.step
        t = t_tab[step]
        sqrt_abar = expand_like(sa_tab[step], x0)
        std = expand_like(s_tab[step], x0)
        x = sqrt_abar * x0 + std * noise.z
        # The model's own sigma(t_i) equals sqrt(1 - abar_i) up to rounding, so this is
        # -sqrt(1 - abar_i) score(x_i, t_i) in the stable eps form.
        with unchecked_times():  # DDPM's t_i with alpha(t_i)^2 = abar_i reach t = 1.0034 > T
            eps_hat = noise_prediction(model, self.sde, x, t, _apply_dropout(model, y, noise.drop))
        return _reduce((eps_hat - noise.z) ** 2, self.reduce_mean)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values) for checkpoints."""
        return {
            "name": "ddpm",
            "reduce_mean": self.reduce_mean,
            "label_dropout": self.label_dropout,
        }

    def __repr__(self) -> str:
        return f"DDPMLoss({self.sde!r}, reduce_mean={self.reduce_mean})"


def build_loss(sde: SDE, config: dict[str, Any]) -> DSMLoss | DDPMLoss:
    """Rebuild a loss from its `config()` dict (as stored in checkpoints)."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    if name == "dsm":
        return DSMLoss(sde, **cfg)
    if name == "ddpm":
        return DDPMLoss(sde, **cfg)
    raise ValueError(f"loss config name must be 'dsm' or 'ddpm', got {name!r}")
