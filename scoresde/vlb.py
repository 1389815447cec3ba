"""DDPM's variational bound (Ho et al. 2020) on the discrete chain of a VP-type SDE."""

from __future__ import annotations

import math
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    check_choice,
    check_data,
    check_finite,
    check_positive_int,
    expand_like,
)
from scoresde.bpd import _bin_width, _check_data_range
from scoresde.sdes import SDE

__all__ = ["ddpm_vlb", "DECODERS", "VARIANCES"]


def _check_score_fn(score_fn: Any) -> None:
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (x, t) -> score, got {type(score_fn).__name__}")


def _check_sde(sde: Any) -> None:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")


def _check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


DECODERS = ("gaussian", "discretized")
VARIANCES = ("beta_tilde", "beta")
# Elements of x per score call of `ddpm_vlb` when t_batch is None (timesteps x batch x D).
_VLB_CHUNK_ELEMENTS = 1 << 20


def _chain_times(sde: SDE, abar: Tensor) -> tuple[Tensor, Tensor]:
    """Continuous times t_i `[N]` and input scales k_i `[N]` for the discrete chain.

    The chain's marginal q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I) has log-SNR
    lambda_i = log(abar_i / (1 - abar_i)); t_i = sde.t_from_log_snr(lambda_i) is the time
    with the same SNR, so x_i and the SDE's x_t differ only by the scale
    k_i = alpha(t_i) / sqrt(abar_i), and the chain's score is k_i s(k_i x, t_i). For the
    cosine chain t_i = (i + 1) / N exactly; DDPM's linear chain is noisier than its
    continuous limit (-log(1 - beta) > beta), so neither i / (N - 1) nor (i + 1) / N matches
    its SNR (off by up to 9%) and its last few t_i (SNR ~ 4e-5) are clamped to T.
    For VPSDE and CosineVPSDE, k_i = 1 up to rounding (and the clamp).
    """
    lam = torch.log(abar) - torch.log1p(-abar)
    t = sde.t_from_log_snr(lam).clamp(0.0, sde.T)
    return t, sde.alpha(t) / abar.sqrt()


def _log_normal_cdf_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, stable in both tails (mirror the upper tail)."""
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


def _discretized_gaussian_nll(
    x0: Tensor, mean: Tensor, std: float, lo: float, hi: float, width: float
) -> Tensor:
    """-log P(x0) `[B]` of Ho et al.'s discretized Gaussian decoder, summed over dims.

    The level x0 owns [x0 - width/2, x0 + width/2]; the lowest level owns (-inf, lo + width/2]
    and the highest [hi - width/2, inf), so the probabilities of all levels sum to 1.
    """
    half = 0.5 * width
    upper = (x0 + half - mean) / std
    lower = (x0 - half - mean) / std
    log_p = _log_normal_cdf_diff(lower, upper)
    log_p = torch.where(x0 < lo + half, torch.special.log_ndtr(upper), log_p)
    log_p = torch.where(x0 > hi - half, torch.special.log_ndtr(-lower), log_p)
    return -log_p.reshape(x0.shape[0], -1).sum(1)


def ddpm_vlb(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    generator: torch.Generator | None = None,
    decoder: str = "gaussian",
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    variance: str = "beta",
    t_batch: int | None = None,
    num_samples: int | None = None,
    return_terms: bool = False,
    progress: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """DDPM's variational bound (Ho et al. 2020, eq. 5) on -log p(x_0), in nats `[B]`.

    The model is the discrete reverse chain of the VP SDE's DDPM discretization
    (`sde.discrete_betas`, `sde.alphas_cumprod`, steps i = 0..N-1, x_i the noisier):

        L = KL(q(x_{N-1} | x_0) || N(0, I))                                  (prior)
          + sum_{i=1}^{N-1} E_q KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))  (diffusion)
          - E_q log p(x_0 | x_{-1})                                           (decoder)

    where x_{-1} := the data and q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I). The
    reverse mean comes from the score: eps = -sqrt(1 - abar_i) s_chain(x_i),
    mu = (x_i - beta_i eps / sqrt(1 - abar_i)) / sqrt(alpha_i), with s_chain from
    `score_fn` at the time of equal SNR (see `_chain_times`). The posterior is
    N(mu~, beta~_i I), beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i), and
    mu~ - mu = beta_i (eps - noise) / sqrt(alpha_i (1 - abar_i)). With the reverse variance
    `variance="beta_tilde"` (DDPM's "fixed small") each KL is
    beta_i |eps - noise|^2 / (2 alpha_i (1 - abar_{i-1})); with "beta" (fixed large, the
    default) it adds
    the variance mismatch D (r - 1 - log r) / 2, r = beta~_i / beta_i.

    Decoder (step 0, std sqrt(beta_0), the same mean formula):
      - "gaussian": -log N(x_0; mu, beta_0 I), a continuous NLL (for real-valued data);
      - "discretized": Ho et al.'s discretized Gaussian over `num_bins` levels in
        `data_range` (levels convention of `bits_per_dim`): -log of a probability, so the
        bound is on the discrete data's -log P; its bits/dim are L / (D ln 2), no offset.

    Each expectation over x_i is estimated with one noise draw per step and sample (from
    `generator`), so the result is an unbiased estimate of the bound. The full sum over all
    N steps is the default (N score calls per sample, batched `t_batch` timesteps per call);
    `num_samples=M` instead estimates the diffusion sum, unbiasedly, from M uniformly drawn
    steps (times (N - 1) / M).

    Args:
        score_fn: s(x `[B, *D]`, t `[B]`) for `sde`.
        sde: a VP-type SDE with a DDPM chain: VPSDE, CosineVPSDE (or SubVPSDE, by SNR
            matching). Others raise TypeError.
        x: data `[B, *D]`.
        generator: source of the forward-process noise (and of the sampled steps).
        decoder: "gaussian" or "discretized".
        num_bins, data_range: the quantization of the data (discretized decoder only).
        variance: reverse-step variance, "beta_tilde" or "beta".
        t_batch: timesteps per score call (None: as many as keep ~1M elements of x per call).
        num_samples: None (exact sum, default) or the number of sampled steps.
        return_terms: also return {"prior": [B], "decoder": [B], "diffusion": [B]}.
        progress: progress bar over the chunks of timesteps.

    Returns:
        `[B]` the bound in nats (and the terms with `return_terms`).
    """
    _check_score_fn(score_fn)
    abar64, betas64 = _check_chain(sde)
    check_finite("x", check_data("x", x))
    check_choice("decoder", decoder, DECODERS)
    check_choice("variance", variance, VARIANCES)
    _check_generator(generator)
    levels = None
    if decoder == "discretized":
        lo, hi = _check_data_range(data_range)
        levels = (lo, hi, _bin_width(num_bins, data_range, "levels"))
    if t_batch is not None:
        t_batch = check_positive_int("t_batch", t_batch)
    if num_samples is not None:
        num_samples = check_positive_int("num_samples", num_samples)

    with torch.no_grad():
        x = x.detach()
        chain = _ChainTables(sde, abar64, betas64, x, variance)
        steps, scale = _steps(chain.N, x, num_samples, generator)
        diffusion, decoder_nll = _diffusion_and_decoder(
            score_fn, chain, x, steps, scale, levels, t_batch, generator, progress
        )
        B, dim = x.shape[0], x[0].numel()
        aN = chain.abar[-1]
        sq = x.reshape(B, -1).pow(2).sum(1)
        prior = 0.5 * (aN * (sq - dim) - dim * torch.log1p(-aN))
        total = prior + diffusion + decoder_nll
    if return_terms:
        return total, {"prior": prior, "diffusion": diffusion, "decoder": decoder_nll}
    return total


def _check_chain(sde: Any) -> tuple[Tensor, Tensor]:
    """(abar `[N]`, betas `[N]`) float64 of the SDE's discrete chain, or TypeError/ValueError."""
    _check_sde(sde)
    abar64 = getattr(sde, "alphas_cumprod", None)
    if not torch.is_tensor(abar64) or not hasattr(sde, "t_from_log_snr"):
        raise TypeError(
            "ddpm_vlb needs a VP-type SDE with a discrete DDPM chain (VPSDE, CosineVPSDE, "
            f"SubVPSDE: attributes discrete_betas/alphas_cumprod), got {type(sde).__name__}"
        )
    betas64 = sde.discrete_betas.to(torch.float64)
    if not bool(((betas64 > 0) & (betas64 < 1)).all()):
        raise ValueError(
            f"ddpm_vlb needs sde.discrete_betas in (0, 1), got range "
            f"[{float(betas64.min())}, {float(betas64.max())}] (N={sde.N} is too small)"
        )
    return abar64, betas64


class _ChainTables:
    """The chain's per-step constants on x's device and dtype (computed in float64 first:
    the chain's products are accurate there): abar, betas, alphas, times and input scales
    (`_chain_times`), and the KL's weight of |eps - noise|^2 and constant for `variance`."""

    def __init__(self, sde: SDE, abar64: Tensor, betas64: Tensor, x: Tensor, variance: str):
        dim = x[0].numel()
        self.N = abar64.shape[0]
        t64, k64 = _chain_times(sde, abar64)
        abar_prev64 = torch.cat([abar64.new_ones(1), abar64[:-1]])
        like = {"device": x.device, "dtype": x.dtype}
        self.abar, self.betas = abar64.to(**like), betas64.to(**like)
        self.t, self.k = t64.to(**like), k64.to(**like)
        self.alphas = 1.0 - self.betas
        self.std0 = math.sqrt(float(betas64[0]))
        # KL weight of |eps - noise|^2 for step i >= 1 (beta~ variance), and for "beta".
        if variance == "beta_tilde":
            weight64 = betas64 / (2 * (1 - betas64) * (1 - abar_prev64))
            const64 = torch.zeros_like(betas64)
        else:
            ratio = (1 - abar_prev64) / (1 - abar64)  # beta~ / beta
            weight64 = betas64 / (2 * (1 - betas64) * (1 - abar64))
            const64 = 0.5 * dim * (ratio - 1 - torch.log(ratio))
        self.weight, self.const = weight64.to(**like), const64.to(**like)


def _steps(
    N: int, x: Tensor, num_samples: int | None, generator: torch.Generator | None
) -> tuple[Tensor, float]:
    """(step indices `[1 + K, B]` with step 0 (the decoder) first, the diffusion sum's
    scale): all N - 1 steps, or `num_samples` drawn per sample (unbiased, times (N-1)/M)."""
    B = x.shape[0]
    if num_samples is None:
        steps = torch.arange(1, N, device=x.device)[:, None].expand(N - 1, B)
        scale = 1.0
    else:
        # Each sample draws its own steps, so the batch mean averages over steps too.
        dev = generator.device if generator is not None else x.device
        steps = torch.randint(1, N, (num_samples, B), generator=generator, device=dev)
        steps = steps.to(x.device)
        scale = (N - 1) / num_samples
    # Step 0 (the decoder) rides along as the first row of the first chunk.
    return torch.cat([torch.zeros(1, B, dtype=steps.dtype, device=x.device), steps]), scale


def _diffusion_and_decoder(
    score_fn: ScoreFn,
    chain: _ChainTables,
    x: Tensor,
    steps: Tensor,
    scale: float,
    levels: tuple[float, float, float] | None,
    t_batch: int | None,
    generator: torch.Generator | None,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """(the diffusion KL sum `[B]`, the decoder's NLL `[B]`), in chunks of timesteps."""
    B, dim = x.shape[0], x[0].numel()
    abar = chain.abar

    def eps_model(xi: Tensor, idx: Tensor) -> Tensor:
        """eps_theta(x_i) for a chunk: xi `[K, B, *D]`, idx `[K, B]` step indices."""
        k = expand_like(chain.k[idx], xi)
        t = chain.t[idx].reshape(-1)
        s = score_fn((k * xi).reshape(-1, *x.shape[1:]), t).reshape(xi.shape)
        return -expand_like((1 - abar[idx]).sqrt(), xi) * k * s

    chunk = t_batch or max(1, _VLB_CHUNK_ELEMENTS // max(1, B * dim))
    diffusion = torch.zeros(B, device=x.device, dtype=x.dtype)
    chunks = list(torch.split(steps, chunk))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="DDPM bound", leave=False)
    for c, idx in enumerate(chunks):
        # One noise draw per step (not per chunk): results do not depend on t_batch.
        noise = torch.stack([_randn_like(x, generator) for _ in range(idx.shape[0])])
        a = expand_like(abar[idx].sqrt(), noise)
        sd = expand_like((1 - abar[idx]).sqrt(), noise)
        xi = a * x[None] + sd * noise  # x_i ~ q(x_i | x_0), [K, B, *D]
        eps_hat = eps_model(xi, idx)
        err = (eps_hat - noise).reshape(idx.shape[0], B, -1).pow(2).sum(-1)
        kl = chain.weight[idx] * err + chain.const[idx]  # [K, B]
        if c == 0:
            decoder_nll = _decoder_nll(chain, x, xi[0], eps_hat[0], levels)
            kl = kl[1:]
        diffusion = diffusion + scale * kl.sum(0)
    return diffusion, decoder_nll


def _decoder_nll(
    chain: _ChainTables,
    x: Tensor,
    x0_noisy: Tensor,
    eps0: Tensor,
    levels: tuple[float, float, float] | None,
) -> Tensor:
    """-log p(x_0 | x_{-1}) `[B]`: step 0's mean mu = (x_0' - beta_0 eps / sqrt(1 - abar_0))
    / sqrt(alpha_0), std sqrt(beta_0); Gaussian (levels None) or discretized."""
    B, dim = x.shape[0], x[0].numel()
    betas, abar, alphas = chain.betas, chain.abar, chain.alphas
    mean = (x0_noisy - betas[0] / (1 - abar[0]).sqrt() * eps0) / alphas[0].sqrt()
    std = chain.std0
    if levels is None:
        z2 = ((x - mean) / std).reshape(B, -1).pow(2).sum(1)
        return 0.5 * z2 + dim * (math.log(std) + 0.5 * math.log(2 * math.pi))
    return _discretized_gaussian_nll(x, mean, std, *levels)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
