"""Adapters that hand the reverse SDE and the probability-flow ODE to torchsde and
torchdiffeq, for users who want those libraries' solvers (SRK, adjoints, dense output...).

- `to_torchsde(sde, score_fn)`: the reverse SDE dx = [f x - g^2 s] dt + g dw_bar in the
  reversed time s = T - t (torchsde needs increasing times), on flattened states `[B, D]`
  (torchsde needs 2-D states):

      dy = -[f(T - s) y - g(T - s)^2 s(y, T - s)] ds + g(T - s) dW_s,   y(s) = x(T - s).

- `to_torchdiffeq(sde, score_fn)`: the probability-flow ODE dx/dt = f x - g^2 s / 2 as a
  `func(t, x)` for `torchdiffeq.odeint` (decreasing t is fine there), on any `[B, *D]`.

Both count their score evaluations in `.nfe`. Example::

    rsde = to_torchsde(sde, score_fn, data_shape=(1, 8, 8))
    ys = torchsde.sdeint(rsde, rsde.flatten(x_T), rsde.times(eps=1e-3), method="euler",
                         dt=1e-3)
    x0 = rsde.unflatten(ys[-1])

    ode = to_torchdiffeq(sde, score_fn)
    x0 = torchdiffeq.odeint(ode, x_T, torch.tensor([sde.T, 1e-3]), method="dopri5")[-1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    broadcast_time,
    check_choice,
    check_data,
    check_device,
    check_positive,
    expand_like,
)
from scoresde.flow import ProbabilityFlow
from scoresde.sdes import SDE

__all__ = ["TorchsdeReverseSDE", "ProbabilityFlowODE", "to_torchsde", "to_torchdiffeq"]


def _check_common(sde: SDE, score_fn: ScoreFn) -> None:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")


class TorchsdeReverseSDE(nn.Module):
    """The reverse SDE in s = T - t on flat states y `[B, D]`, for `torchsde.sdeint`.

    Attributes `noise_type` ("diagonal", or "additive": g does not depend on y, so torchsde's
    SRK needs 3 instead of 10 drift/diffusion calls per step, at the price of a `[B, D, D]`
    diffusion matrix) and `sde_type` ("ito") are what torchsde reads; `f(s, y)` and
    `g(s, y)` are its drift and diffusion. `data_shape` is the per-sample shape `D...` the
    score expects (default: flat); `flatten`/`unflatten` convert `[B, *D]` <-> `[B, prod D]`.
    """

    sde_type = "ito"

    def __init__(
        self,
        sde: SDE,
        score_fn: ScoreFn,
        data_shape: Sequence[int] | None = None,
        noise_type: str = "diagonal",
    ) -> None:
        super().__init__()
        _check_common(sde, score_fn)
        self.noise_type = check_choice("noise_type", noise_type, ("diagonal", "additive"))
        self.sde = sde
        self.score_fn = score_fn
        if data_shape is not None:
            data_shape = tuple(data_shape)
            if not data_shape or not all(isinstance(d, int) and d > 0 for d in data_shape):
                raise ValueError(f"data_shape must be a tuple of positive ints, got {data_shape}")
        self.data_shape = data_shape
        self.nfe = 0

    def flatten(self, x: Tensor) -> Tensor:
        """`[B, *D]` -> `[B, prod D]` (torchsde's y0)."""
        check_data("x", x)
        return x.reshape(x.shape[0], -1)

    def unflatten(self, y: Tensor) -> Tensor:
        """`[..., B, prod D]` -> `[..., B, *data_shape]` (identity when data_shape is None)."""
        if self.data_shape is None:
            return y
        return y.reshape(*y.shape[:-1], *self.data_shape)

    def times(
        self,
        num_points: int = 2,
        eps: float = 1e-3,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Increasing s-times `[num_points]` from 0 (t = T) to T - eps (t = eps)."""
        if device is not None:
            device = check_device("device", device)
        return torch.linspace(0.0, self.sde.T - eps, num_points, dtype=dtype, device=device)

    def _time(self, s: Tensor, y: Tensor) -> Tensor:
        # Clamped to [0, T]: the score is never evaluated outside it, whatever s torchsde asks.
        return broadcast_time(self.sde.T - s, y).clamp(0.0, self.sde.T)

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        """Drift in s: -[f(t) y - g(t)^2 s(y, t)], t = T - s; y `[B, D]`."""
        t = self._time(s, y)
        x = y if self.data_shape is None else y.reshape(y.shape[0], *self.data_shape)
        score = self.score_fn(x, t).reshape(y.shape)
        self.nfe += 1
        f, g2 = self.sde.reverse_coefficients(t)  # the reverse drift is f y - g^2 score
        return expand_like(g2, y) * score - expand_like(f, y) * y

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        """Diffusion g(T - s): `[B, D]` (diagonal) or `[B, D, D]` (additive)."""
        g = expand_like(self.sde.diffusion_coef(self._time(s, y)), y).expand_as(y)
        return torch.diag_embed(g) if self.noise_type == "additive" else g


class ProbabilityFlowODE(nn.Module):
    """dx/dt = f(t) x - g(t)^2 s(x, t) / 2 (`scoresde.flow.ProbabilityFlow`) as
    `forward(t, x)` for `torchdiffeq.odeint`; x `[B, *D]`, t a float or 0-d tensor.
    `score_fn` (if a module) is a submodule, so `odeint_adjoint` sees its parameters.

    The score is only evaluated on [t_min, T] (default [0, T]): times outside are clamped,
    since torchdiffeq's first-step probe may leave the interval of the solve (pass the end
    time of your solve as `t_min`, or solve with `scoresde.flow.solve`, which never does).
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, t_min: float = 0.0) -> None:
        super().__init__()
        _check_common(sde, score_fn)
        self.sde = sde
        self.score_fn = score_fn
        self.t_min = check_positive("t_min", t_min, allow_zero=True)
        self._flow = ProbabilityFlow(sde, score_fn, t_range=(self.t_min, sde.T))
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out = self._flow(t, x)
        self.nfe += 1
        return out


def to_torchsde(
    sde: SDE,
    score_fn: ScoreFn,
    data_shape: Sequence[int] | None = None,
    noise_type: str = "diagonal",
) -> TorchsdeReverseSDE:
    """The reverse SDE of `sde` driven by `score_fn`, in s = T - t on flattened states, as an
    object `torchsde.sdeint` accepts (see `TorchsdeReverseSDE`)."""
    return TorchsdeReverseSDE(sde, score_fn, data_shape, noise_type)


def to_torchdiffeq(sde: SDE, score_fn: ScoreFn, t_min: float = 0.0) -> ProbabilityFlowODE:
    """The probability-flow ODE of `sde` driven by `score_fn` as a `func(t, x)` for
    `torchdiffeq.odeint`, its score evaluated on [t_min, T] only (see `ProbabilityFlowODE`)."""
    return ProbabilityFlowODE(sde, score_fn, t_min)
