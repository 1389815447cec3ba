"""Bits per dimension of discrete data from a continuous log-density (uniform dequantization)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_choice, check_data, check_finite, check_positive_int

__all__ = ["bits_per_dim", "dequantization_offset"]


def _check_data_range(data_range: Any) -> tuple[float, float]:
    if (
        not isinstance(data_range, Sequence)
        or len(data_range) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data_range)
    ):
        raise TypeError(f"data_range must be a pair of numbers (lo, hi), got {data_range!r}")
    lo, hi = float(data_range[0]), float(data_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be finite with lo < hi, got {data_range!r}")
    return lo, hi


def _bin_width(num_bins: Any, data_range: Any, convention: str) -> float:
    num_bins = check_positive_int("num_bins", num_bins, minimum=2)
    lo, hi = _check_data_range(data_range)
    check_choice("convention", convention, ("levels", "bins"))
    return (hi - lo) / (num_bins - 1 if convention == "levels" else num_bins)


def dequantization_offset(
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    convention: str = "levels",
) -> float:
    """The bits/dim added to -logp / (D ln 2) for discrete data: -log2(Delta).

    Delta is the width of one quantization bin in data units:
      - "levels" (default): the data take the num_bins values lo + k Delta, k = 0..num_bins-1,
        endpoints included, Delta = (hi - lo) / (num_bins - 1). This is how images are
        usually stored (x = 2 k / 255 - 1) and how the digits' 17 levels map to [-1, 1].
        8-bit data in [-1, 1]: log2(127.5) = 6.994; in [0, 1]: log2(255) = 7.994.
      - "bins": [lo, hi] is cut into num_bins bins of width (hi - lo) / num_bins and the
        data are dequantized as (k + u) / num_bins (RealNVP, Song et al.). 8-bit data in
        [0, 1]: the classic +8; in [-1, 1]: +7.
    """
    return -math.log2(_bin_width(num_bins, data_range, convention))


def bits_per_dim(
    logp: Tensor,
    x: Tensor,
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    convention: str = "levels",
) -> Tensor:
    """Bits/dim of discrete data under uniform dequantization, from a continuous log-density.

    If each of the D coordinates of x is one of `num_bins` levels in `data_range` and the
    model's continuous density is roughly constant over a bin of width Delta, the discrete
    probability is P(x) ~= p(x) Delta^D, so

        bpd = -log P(x) / (D ln 2) = -logp / (D ln 2) - log2(Delta).

    Args:
        logp: `[B]` log-density of x in nats (e.g. `log_likelihood(...).logp`).
        x: the data `[B, *D]` (only its shape is read: D = number of dimensions).
        num_bins: number of quantization levels (256 for 8-bit images, 17 for the digits).
        data_range: (lo, hi) the data were scaled to.
        convention: "levels" or "bins", see `dequantization_offset`.

    Returns:
        `[B]` bits per dimension.
    """
    check_finite("x", check_data("x", x))
    if not torch.is_tensor(logp) or logp.ndim != 1 or logp.shape[0] != x.shape[0]:
        shape = tuple(logp.shape) if torch.is_tensor(logp) else type(logp).__name__
        raise ValueError(f"logp must be a tensor of shape [B] = [{x.shape[0]}], got {shape}")
    offset = dequantization_offset(num_bins, data_range, convention)
    dim = x[0].numel()
    return -logp / (dim * math.log(2)) + offset
