"""diffusers interop: use diffusers' eps-models with scoresde samplers, and scoresde score
models with diffusers' schedulers.

diffusers (optional: `pip install scoresde[bench]` or `pip install diffusers`) is imported
lazily, only by the functions that need it; the adapters themselves work with any
eps-model called as `model(x, timestep)`.

Noise levels. A diffusers eps-model is trained on a discrete chain: at integer timestep k
(0 <= k < M), x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps with abar_k = alphas_cumprod[k].
A scoresde sampler evaluates the score at continuous times t with the SDE's kernel
x_t = alpha(t) x0 + sigma(t) eps. The two meet where the noise levels agree, i.e. where the
log-SNRs agree: lambda(t) = log(alpha(t)^2 / sigma(t)^2) and lambda_k = log(abar_k /
(1 - abar_k)). Matching log-SNRs (rather than a formula in t such as k = t (N - 1) or
k = round(t N - 1)) is exact for every schedule and every SDE: VP, cosine VP, sub-VP and
VE alike (for non-VP kernels x is rescaled by s(t) = sqrt(alpha^2 + sigma^2), EDM's c_in, to
the VP scale the model was trained on). On VPSDE() with DDPM's 1000-step chain, the largest
|log abar| mismatch over t in [1e-3, 1] is 0.010 for the nearest level in log-SNR, against
0.068 for Song et al.'s k = floor(t (N - 1)) and 0.078 for k = round(t N - 1): the continuous
VP kernel at t = (k + 1) / N is not exactly DDPM's abar_k (log abar differs by up to 0.068,
the sum of beta_i^2 / 2 that the continuous limit drops).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    broadcast_time,
    check_choice,
    check_data,
    check_positive_int,
    expand_like,
)
from scoresde.sdes import SDE, VPSDE

__all__ = [
    "score_fn_from_diffusers",
    "scoresde_model_as_diffusers_eps",
    "vpsde_to_ddpm_scheduler_config",
    "vpsde_from_diffusers_scheduler",
    "ddpm_scheduler",
    "DiffusersScoreFn",
    "DiffusersEpsModel",
    "TIMESTEP_MODES",
]

TIMESTEP_MODES = ("nearest", "interpolate", "float")


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this function needs diffusers, an optional dependency of scoresde: "
            "pip install 'scoresde[bench]' (or pip install diffusers)"
        ) from err
    return diffusers


# --- the discrete noise levels ---------------------------------------------------------------


def _default_alphas_cumprod(sde: SDE, num_train_timesteps: int) -> Tensor:
    """The discrete chain a DDPM-style model of `sde` was trained on, with M timesteps."""
    abar = sde.ddpm_alphas_cumprod(num_train_timesteps)
    if abar is None:
        # Sub-VP and VE: their kernels are not a DDPM chain (`SDE.has_ddpm_chain`).
        raise ValueError(
            f"{type(sde).__name__} has no DDPM-style discrete chain; pass alphas_cumprod= (a "
            "tensor [M] or a diffusers scheduler, e.g. VPSDE().alphas_cumprod for DDPM's) to "
            "say which noise levels the model was trained on"
        )
    return abar


def _as_alphas_cumprod(value: Any) -> Tensor:
    if hasattr(value, "alphas_cumprod") and not torch.is_tensor(value):
        value = value.alphas_cumprod  # a diffusers scheduler
    try:
        abar = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"alphas_cumprod must be a tensor [M] or a scheduler with .alphas_cumprod, got "
            f"{type(value).__name__}"
        ) from None
    if abar.ndim != 1 or abar.numel() < 2:
        raise ValueError(f"alphas_cumprod must be 1-D with >= 2 entries, got {tuple(abar.shape)}")
    if not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
        raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1)")
    return abar


class _NoiseLevels:
    """The model's discrete log-SNRs lambda_k = log(abar_k / (1 - abar_k)) (decreasing in k),
    and the map between a log-SNR and a fractional timestep (linear between the levels)."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = alphas_cumprod.to(torch.float64)
        self.M = abar.numel()
        self.log_snr = torch.log(abar) - torch.log1p(-abar)
        self._neg = -self.log_snr  # increasing, for searchsorted
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def tables(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.log_snr.to(device=like.device, dtype=like.dtype),
                self._neg.to(device=like.device, dtype=like.dtype),
            )
        return self._cache[key]

    def index(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """(lower integer level `[B]` int64, fraction w in [0, 1] towards the next level) with
        lambda = (1 - w) lambda_lo + w lambda_hi; clamped to the table's ends."""
        table, neg = self.tables(lam)
        hi = torch.searchsorted(neg, (-lam).contiguous()).clamp(1, self.M - 1)
        lo = hi - 1
        w = (table[lo] - lam) / (table[lo] - table[hi])
        return lo, w.clamp(0.0, 1.0)

    def log_snr_at(self, k: Tensor) -> Tensor:
        """lambda at a (fractional) timestep k `[B]`, linear between integer levels."""
        table, _ = self.tables(k)
        k = k.clamp(0, self.M - 1)
        lo = k.floor().long().clamp(max=self.M - 2)
        return torch.lerp(table[lo], table[lo + 1], k - lo.to(k.dtype))


def _model_dtype(model: Any) -> torch.dtype | None:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.dtype
    return None


def _unwrap_output(out: Any) -> Tensor:
    """diffusers models return an output object with `.sample` (or a tuple with
    return_dict=False); plain eps-models a tensor."""
    if hasattr(out, "sample") and torch.is_tensor(out.sample):
        return out.sample
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if torch.is_tensor(out):
        return out
    raise TypeError(f"the model must return a tensor or an object with .sample, got {out!r}")


# --- diffusers eps-model -> scoresde score_fn ------------------------------------------------


class DiffusersScoreFn:
    """A diffusers eps-model as a scoresde score_fn(x `[B, *D]`, t `[B]`) -> `[B, *D]`.

    See `score_fn_from_diffusers`. Attributes: `model`, `sde`, `timesteps` (the mode),
    `num_train_timesteps`.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        sde: SDE,
        alphas_cumprod: Tensor,
        timesteps: str,
        model_kwargs: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.sde = sde
        self.timesteps = timesteps
        self.levels = _NoiseLevels(alphas_cumprod)
        self.num_train_timesteps = self.levels.M
        self.model_kwargs = dict(model_kwargs)
        self._vp_scale = sde.variance_preserving

    def _eps(self, x: Tensor, k: Tensor) -> Tensor:
        dtype = _model_dtype(self.model) or x.dtype
        out = _unwrap_output(self.model(x.to(dtype), k, **self.model_kwargs))
        if out.shape != x.shape:
            raise ValueError(
                f"the model must return eps shaped like its input {tuple(x.shape)}, got "
                f"{tuple(out.shape)}"
            )
        return out.to(x.dtype)

    def __call__(self, x: Tensor, t: Any) -> Tensor:
        t = broadcast_time(t, x)
        lam = self.sde.log_snr(t)
        lo, w = self.levels.index(lam)
        if self._vp_scale:
            x_vp, scale = x, None  # alpha^2 + sigma^2 = 1
        else:
            scale = expand_like(torch.sqrt(self.sde.alpha(t) ** 2 + self.sde.sigma(t) ** 2), x)
            x_vp = x / scale
        table, _ = self.levels.tables(lam)
        if self.timesteps == "nearest":
            k = torch.where(w < 0.5, lo, lo + 1)
            eps = self._eps(x_vp, k)
            lam_used = table[k]  # the DISCRETE level the model saw
        elif self.timesteps == "float":
            eps = self._eps(x_vp, lo.to(x.dtype) + w)
            lam_used = lam
        else:  # "interpolate": both neighbouring levels in one call on the doubled batch
            both = self._eps(torch.cat([x_vp, x_vp]), torch.cat([lo, lo + 1]))
            eps = torch.lerp(both[: x.shape[0]], both[x.shape[0] :], expand_like(w, x))
            lam_used = lam
        # sigma_vp = sqrt(1 - abar) = sqrt(sigmoid(-lambda)); score = -eps / (s sigma_vp).
        sigma_vp = expand_like(torch.sigmoid(-lam_used).sqrt(), x)
        if scale is not None:
            sigma_vp = sigma_vp * scale
        return -eps / sigma_vp

    def __repr__(self) -> str:
        return (
            f"DiffusersScoreFn(model={type(self.model).__name__}, sde={self.sde!r}, "
            f"timesteps={self.timesteps!r}, num_train_timesteps={self.num_train_timesteps})"
        )


def score_fn_from_diffusers(
    model: Callable[..., Any],
    sde: SDE,
    num_train_timesteps: int | None = None,
    *,
    alphas_cumprod: Any = None,
    timesteps: str = "nearest",
    model_kwargs: Mapping[str, Any] | None = None,
) -> DiffusersScoreFn:
    """Wrap a diffusers eps-model (e.g. `UNet2DModel`; its output's `.sample` is used) or any
    `model(x, timestep) -> eps` as a scoresde score_fn for the continuous SDE `sde`.

    The time t maps to the model's timestep whose noise level matches: the log-SNR
    lambda(t) of the SDE is located in the model's discrete log-SNRs lambda_k (module
    docstring). Then

        score(x, t) = -eps(x / s, k) / (s sqrt(1 - abar_k)),   s = sqrt(alpha(t)^2 + sigma(t)^2)

    (s = 1 for VP and cosine VP), with the DISCRETE abar_k of the level the model saw.

    Args:
        model: the eps-model, called as `model(x, timesteps, **model_kwargs)` with x in the
            model's dtype and timesteps `[B]` on x's device (int64, or float for "float").
            The result is returned in x's dtype.
        sde: the SDE the sampler integrates (VPSDE for DDPM-trained models; any SDE works).
        num_train_timesteps: M, the model's number of training timesteps (default `sde.N`);
            the default chain is that of `sde` with N = M (VP/sub-VP: DDPM's linear betas;
            cosine VP: its own chain).
        alphas_cumprod: the model's own noise levels, a tensor `[M]` or a diffusers
            scheduler; overrides the default chain (needed for VESDE, or a model trained
            with another schedule, e.g. diffusers' "squaredcos_cap_v2").
        timesteps: "nearest" (default: the integer timestep nearest in log-SNR, one model
            call; level mismatch <= half a step), "float" (the fractional timestep, for
            models with a continuous time embedding such as UNet2DModel: one call, exact
            level), or "interpolate" (eps linearly interpolated between the two neighbouring
            integer timesteps: one call on a doubled batch).
        model_kwargs: extra keyword arguments for every model call (e.g. class_labels).
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, timesteps), got {model!r}")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
    check_choice("timesteps", timesteps, TIMESTEP_MODES)
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(
            f"model_kwargs must be a mapping or None, got {type(model_kwargs).__name__}"
        )
    if alphas_cumprod is not None:
        abar = _as_alphas_cumprod(alphas_cumprod)
        if num_train_timesteps is not None and num_train_timesteps != abar.numel():
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps!r} does not match alphas_cumprod "
                f"with {abar.numel()} entries"
            )
    else:
        m = sde.N if num_train_timesteps is None else num_train_timesteps
        abar = _default_alphas_cumprod(sde, check_positive_int("num_train_timesteps", m, minimum=2))
    return DiffusersScoreFn(model, sde, abar, timesteps, model_kwargs or {})


# --- scoresde score_fn -> diffusers eps-model ------------------------------------------------


class DiffusersEpsModel:
    """A scoresde score_fn as a diffusers-style eps-model: `(sample, timestep) -> eps`.

    See `scoresde_model_as_diffusers_eps`.
    """

    def __init__(self, score_fn: ScoreFn, sde: SDE, alphas_cumprod: Tensor) -> None:
        self.score_fn = score_fn
        self.sde = sde
        self.levels = _NoiseLevels(alphas_cumprod)
        self.num_train_timesteps = self.levels.M
        self._vp_scale = sde.variance_preserving

    def __call__(self, sample: Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Tensor:
        x = check_data("sample", sample)
        if torch.is_tensor(timestep):
            k = timestep.to(device=x.device, dtype=x.dtype)
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            k = torch.tensor(float(timestep), device=x.device, dtype=x.dtype)
        else:
            raise TypeError(f"timestep must be a number or a tensor, got {timestep!r}")
        k = broadcast_time(k, x)
        lam = self.levels.log_snr_at(k)
        # The continuous time with the model's noise level, clamped to the SDE's [0, T].
        t = self.sde.t_from_log_snr(lam).clamp(0.0, self.sde.T)
        sigma_vp = expand_like(torch.sigmoid(-lam).sqrt(), x)
        if self._vp_scale:
            return -sigma_vp * self.score_fn(x, t)
        # x is on the VP scale; the SDE's x_t = s x with s = sqrt(alpha^2 + sigma^2), and
        # grad_{x_vp} log p = s grad log p_t(s x_vp).
        scale = expand_like(torch.sqrt(self.sde.alpha(t) ** 2 + self.sde.sigma(t) ** 2), x)
        return -sigma_vp * scale * self.score_fn(x * scale, t)

    def __repr__(self) -> str:
        return (
            f"DiffusersEpsModel(sde={self.sde!r}, num_train_timesteps={self.num_train_timesteps})"
        )


def scoresde_model_as_diffusers_eps(
    score_fn: ScoreFn,
    sde: SDE,
    num_train_timesteps: int | None = None,
    *,
    alphas_cumprod: Any = None,
) -> DiffusersEpsModel:
    """A scoresde score_fn (e.g. a `ScoreModel`) as an eps-model that drives diffusers'
    schedulers: `eps_model(sample, timestep) -> eps` with timestep an int, a float or a
    tensor (`[B]` or 0-d; fractional timesteps of Euler-type schedulers interpolate the
    log-SNR between levels).

        t = t_from_log_snr(lambda_k),   eps = -sqrt(1 - abar_k) s score(s x, t)

    (s = sqrt(alpha(t)^2 + sigma(t)^2), 1 for VP). Returns a plain tensor (schedulers take
    it as `model_output`).

    Args:
        score_fn: s(x `[B, *D]`, t `[B]`).
        sde: the SDE the score was trained for.
        num_train_timesteps, alphas_cumprod: the scheduler's discrete chain, as in
            `score_fn_from_diffusers` (pass the scheduler itself to be sure they agree).
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
    if alphas_cumprod is not None:
        abar = _as_alphas_cumprod(alphas_cumprod)
    else:
        m = sde.N if num_train_timesteps is None else num_train_timesteps
        abar = _default_alphas_cumprod(sde, check_positive_int("num_train_timesteps", m, minimum=2))
    return DiffusersEpsModel(score_fn, sde, abar)


# --- scheduler configs -----------------------------------------------------------------------


def vpsde_to_ddpm_scheduler_config(sde: VPSDE) -> dict[str, Any]:
    """The DDPMScheduler/DDIMScheduler config of a VPSDE's discrete chain: DDPM's linear betas
    beta_i = linspace(beta_min / N, beta_max / N, N), no clipping, eps prediction.

    `DDPMScheduler(**vpsde_to_ddpm_scheduler_config(VPSDE()))` has the alphas_cumprod of
    `VPSDE().alphas_cumprod` (up to diffusers' float32 betas, |diff| < 3e-7).
    """
    if sde.name != "vp":
        raise ValueError(
            f"only VPSDE maps to a DDPM scheduler config (DDPM's linear betas), got "
            f"{type(sde).__name__}; for other SDEs pass the model's alphas_cumprod to "
            "score_fn_from_diffusers / scoresde_model_as_diffusers_eps instead"
        )
    n = sde.N
    return {
        "num_train_timesteps": n,
        "beta_start": sde.beta_0 / n,
        "beta_end": sde.beta_1 / n,
        "beta_schedule": "linear",
        "clip_sample": False,
        "prediction_type": "epsilon",
    }


def vpsde_from_diffusers_scheduler(scheduler_or_config: Any) -> VPSDE:
    """The VPSDE whose discrete chain is a diffusers scheduler's linear beta schedule:
    beta_min = beta_start N, beta_max = beta_end N, N = num_train_timesteps.

    Only `beta_schedule="linear"` is a VPSDE. Other schedules raise ValueError:
    "scaled_linear" (Stable Diffusion's) and "squaredcos_cap_v2" have no VPSDE; scoresde's
    CosineVPSDE is close to the latter but not equal (its t_max = 0.9946 keeps beta(T)
    finite; the log-SNRs differ by up to 0.86 before the last 10 of 1000 steps). For such
    models sample with any SDE and pass the scheduler as `alphas_cumprod=` to
    `score_fn_from_diffusers`: noise levels are matched by log-SNR, so this is exact.

    The SDE does not depend on `prediction_type`; `score_fn_from_diffusers` expects an
    eps-model.

    Args:
        scheduler_or_config: a diffusers scheduler (its `.config`) or a config mapping.
    """
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(config, Mapping):
        raise TypeError(
            "scheduler_or_config must be a diffusers scheduler or a config mapping, got "
            f"{type(scheduler_or_config).__name__}"
        )
    if config.get("trained_betas") is not None:
        raise ValueError("a scheduler with trained_betas has no VPSDE; pass alphas_cumprod=")
    schedule = config.get("beta_schedule", "linear")
    if schedule != "linear":
        raise ValueError(
            f"beta_schedule must be 'linear' to map to a VPSDE, got {schedule!r}; sample with "
            "any SDE (e.g. CosineVPSDE for 'squaredcos_cap_v2') and pass the scheduler as "
            "alphas_cumprod= to score_fn_from_diffusers"
        )
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True changes the linear chain: no VPSDE has it")
    n = check_positive_int("num_train_timesteps", int(config.get("num_train_timesteps", 1000)))
    start = float(config.get("beta_start", 1e-4))
    end = float(config.get("beta_end", 0.02))
    return VPSDE(beta_min=start * n, beta_max=end * n, N=n)


def ddpm_scheduler(sde: VPSDE, **overrides: Any) -> Any:
    """A diffusers `DDPMScheduler` on `sde`'s chain (imports diffusers)."""
    diffusers = _require_diffusers()
    return diffusers.DDPMScheduler(**{**vpsde_to_ddpm_scheduler_config(sde), **overrides})
