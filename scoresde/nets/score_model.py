"""`ScoreModel`: a network wrapped into a score function s(x, t) ~ grad_x log p_t(x)."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn

from scoresde._validation import broadcast_time, check_choice, check_data, expand_like
from scoresde.sdes import SDE

Tensor = torch.Tensor

PARAMETERIZATIONS = ("score", "eps", "x0", "v")


class ScoreModel(nn.Module):
    """score(x `[B, *D]`, t `[B]`) from a network `net(x, t)` (or `net(x, t, y)`).

    With x = alpha x0 + sigma eps (the SDE's kernel), the network output means:
      - "score": the score itself;
      - "eps": the noise, score = -eps / sigma;
      - "x0": the clean data, score = (alpha x0 - x) / sigma^2;
      - "v": v = (alpha eps - sigma x0) / s, s = sqrt(alpha^2 + sigma^2) (Salimans & Ho's
        v-prediction, normalised so it has unit scale for every SDE; s = 1 for VP), so
        eps = (sigma x + alpha s v) / s^2.

    With `scale_input` (default) the network sees x / s, which has unit scale at every t
    for unit-scale data (EDM's c_in); for VP, s = 1 and this is the identity.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        parameterization: str = "eps",
        scale_input: bool = True,
    ) -> None:
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be a callable nn.Module, got {type(net).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
        self.net = net
        self.sde = sde
        self.parameterization = check_choice(
            "parameterization", parameterization, PARAMETERIZATIONS
        )
        self.scale_input = bool(scale_input)

    # --- configuration and saving ---
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The constructor's options besides `net` and `sde` (each stored as an attribute of
        the same name), which `config()` lists and saved models record."""
        params = inspect.signature(cls.__init__).parameters
        return tuple(name for name in params if name not in ("self", "net", "sde"))

    def config(self) -> dict[str, Any]:
        """The constructor options of this model as plain values, e.g.
        `{"parameterization": "v", "scale_input": True}`:
        `ScoreModel(net, sde, **model.config())` wraps the same network the same way."""
        return {name: getattr(self, name) for name in self.option_names()}

    def save_pretrained(self, path: str | os.PathLike, *, data_scaler: Any = None) -> Any:
        """Write `path/config.json` (SDE, network spec, options, data scaling) and
        `path/model.safetensors` (the weights); returns the folder's Path.

        The data scaler is `data_scaler` if given, else `self.data_scaler` (set by
        `from_pretrained`) if any. Needs a model whose spec is known: one made by
        `scoresde.training.build_model`, or an `MLPScoreNet` / `UNet` in a built-in SDE.
        """
        from scoresde.pretrained import save_pretrained

        return save_pretrained(self, path, data_scaler=data_scaler)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: torch.device | str | None = None
    ) -> ScoreModel:
        """The model saved by `save_pretrained` (eval mode, on `device`, default CPU), with
        its `data_scaler` attribute (a `scoresde.data.DataScaler` or None) to map samples
        back to data units. Nothing is unpickled: the configuration is JSON, the weights
        safetensors, and the configuration is checked against the weights' shapes before
        the network is built."""
        from scoresde.pretrained import load_pretrained

        return load_pretrained(path, device=device)

    def _coefficients(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha = expand_like(self.sde.alpha(t), x)
        sigma = expand_like(self.sde.sigma(t), x)
        return alpha, sigma, torch.sqrt(alpha**2 + sigma**2)

    def network_output(self, x: Tensor, t: Any, y: Tensor | None = None) -> Tensor:
        """The raw network output (in the model's parameterization), shaped like x."""
        check_data("x", x)
        t = broadcast_time(t, x)
        _, _, s = self._coefficients(x, t)
        inp = x / s if self.scale_input else x
        out = self.net(inp, t) if y is None else self.net(inp, t, y)
        if out.shape != x.shape:
            raise ValueError(
                f"net output must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}"
            )
        return out

    def output_to_score(self, out: Tensor, x: Tensor, t: Any) -> Tensor:
        """Convert a network output in this parameterization to a score."""
        t = broadcast_time(t, x)
        alpha, sigma, s = self._coefficients(x, t)
        p = self.parameterization
        if p == "score":
            return out
        if p == "eps":
            return -out / sigma
        if p == "x0":
            return (alpha * out - x) / sigma**2
        eps = (sigma * x + alpha * s * out) / s**2  # "v"
        return -eps / sigma

    def score_to_output(self, score: Tensor, x: Tensor, t: Any) -> Tensor:
        """The network output this parameterization would need to produce `score`."""
        t = broadcast_time(t, x)
        alpha, sigma, s = self._coefficients(x, t)
        p = self.parameterization
        if p == "score":
            return score
        eps = -sigma * score
        if p == "eps":
            return eps
        x0 = (x - sigma * eps) / alpha
        if p == "x0":
            return x0
        return (alpha * eps - sigma * x0) / s

    def forward(self, x: Tensor, t: Any, y: Tensor | None = None) -> Tensor:
        """The score estimate, shaped like x."""
        t = broadcast_time(t, x)
        return self.output_to_score(self.network_output(x, t, y), x, t)
