"""`ScoreModel`: a network wrapped into a score function s(x, t) ~ grad_x log p_t(x).

Preconditioning (why the default is "gaussian")
------------------------------------------------
A raw network asked for eps = (x - alpha x0) / sigma must, at high noise, reproduce
eps ~ sigma x / (alpha^2 + sigma^2): nearly the identity of x. It learns that only where
training put x, i.e. for |x| up to ~3 under the prior; on the prior's tail it extrapolates,
and its error there is not damped by the probability-flow ODE (N(0, I) flows onto itself)
but amplified on the way to the data: an eps error e near t = T is an x0 error e / alpha(T)
(~150 e for VP). Euler–Maruyama's drift contracts there and hides it.

With `preconditioning="gaussian"` (EDM-style, Karras et al. 2022, written for every
parameterization and every SDE) the network only predicts a normalised *residual* over the
optimal denoiser of Gaussian data N(0, sigma_data^2 I):

    out_p(x, t) = c_skip_p(t) x + c_out_p(t) F(c_in(t) x, t),   c_in = 1 / s_d,
    s_d(t) = sqrt(alpha^2 sigma_data^2 + sigma^2)  (the std of x_t for such data),

with c_skip_p x = E[p | x] and c_out_p = std(p | x) for that Gaussian:

    p        c_skip_p                                c_out_p
    "eps"    sigma / s_d^2                           alpha sigma_data / s_d
    "x0"     alpha sigma_data^2 / s_d^2              sigma sigma_data / s_d
    "v"      alpha sigma (1 - sigma_data^2) / (s s_d^2)   s sigma_data / s_d
    "score"  -1 / s_d^2                              alpha sigma_data / (sigma s_d)

(s = sqrt(alpha^2 + sigma^2)). F = 0 gives the exact score -x / s_d^2 of N(0, sigma_data^2)
data at every t; the part of eps that is the identity at high noise is exact for every x,
and the network's error enters eps scaled by alpha sigma_data / s_d -> 0 as t -> T. Under
the eps-MSE loss (`DSMLoss` "sigma2") the four parameterizations then regress the same
unit-variance target up to sign and differ only in the units of `network_output`; "x0" is
exactly EDM's c_skip / c_out / c_in, and with sigma_data = 1 "v" is raw v-prediction.

`preconditioning="none"` keeps the raw meaning (the network output *is* the
parameterization's quantity, the input x / s if `scale_input`): what pretrained DDPM
eps-networks and checkpoints made before this option expect.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn

from scoresde._typing import Tensor
from scoresde._validation import (
    broadcast_time,
    check_choice,
    check_data,
    check_positive,
    check_time,
    expand_like,
)
from scoresde.sdes import SDE

PARAMETERIZATIONS = ("score", "eps", "x0", "v")
PRECONDITIONINGS = ("gaussian", "none")


class ScoreModel(nn.Module):
    """score(x `[B, *D]`, t `[B]`) from a network `net(x, t)` (or `net(x, t, y)`).

    With x = alpha x0 + sigma eps (the SDE's kernel), the model output in each
    parameterization (`network_output`) means:
      - "score": the score itself;
      - "eps": the noise, score = -eps / sigma;
      - "x0": the clean data, score = (alpha x0 - x) / sigma^2;
      - "v": v = (alpha eps - sigma x0) / s, s = sqrt(alpha^2 + sigma^2) (Salimans & Ho's
        v-prediction, normalised so it has unit scale for every SDE; s = 1 for VP), so
        eps = (sigma x + alpha s v) / s^2.

    Args:
        net: the network `net(x, t)` or `net(x, t, y)`, output shaped like x.
        sde: the SDE whose kernel (alpha, sigma) defines the parameterizations.
        parameterization: "eps" (default, DDPM), "x0", "v" or "score".
        scale_input: feed the network x / s_d(t) (EDM's c_in; see `preconditioning`) so
            its input has unit scale at every t.
        preconditioning: "gaussian" (default): the network predicts a normalised residual
            over the optimal denoiser of N(0, sigma_data^2 I) data (see the module
            docstring): a zero network is already the exact score of that Gaussian, and
            every parameterization samples as well with ODE solvers as with SDE solvers.
            "none": the network output is the parameterization's quantity itself, the input
            is x / s (raw DDPM semantics; what old checkpoints and pretrained DDPM
            eps-networks mean).
        sigma_data: the data's standard deviation per entry that "gaussian" assumes (1 for
            standardised data, ~0.5 for images in [-1, 1]); unused with "none".
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        parameterization: str = "eps",
        scale_input: bool = True,
        preconditioning: str = "gaussian",
        sigma_data: float = 1.0,
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
        self.preconditioning = check_choice("preconditioning", preconditioning, PRECONDITIONINGS)
        self.sigma_data = check_positive("sigma_data", sigma_data)
        # Sampler calibrations fitted for these weights (`calibrate`); saved by
        # `save_pretrained` as calibration.json, restored by `from_pretrained`.
        self.calibrations: list[Any] = []

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
        `self.calibrations` (see `calibrate`), if any, go to `path/calibration.json`.
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

    def calibrate(
        self, sampler: Any, *, data_shape: tuple[int, ...] | None = None, **kwargs: Any
    ) -> Any:
        """Tune `sampler`'s time grid for this model once (`scoresde.calibration.calibrate`:
        `optimize_time_grid` on pilot draws, its NFE counted) and keep the result in
        `self.calibrations` (replacing one for the same configuration), so that
        `save_pretrained` saves it and `scoresde sample` uses it. Returns the `Calibration`.

        Args:
            sampler: a deterministic fixed-step sampler of this model's SDE with its default
                grid, e.g. `DPMSolverSampler(model.sde, 10)`.
            data_shape: one sample's shape (default: the model spec's, if it is complete).
            kwargs: `method` ("grid"; "solver": also fit a bespoke multistep solver;
                "ems": DPM-Solver-v3 with statistics of this model and a grid searched for
                it; see `scoresde.calibration.calibrate`), `num_pilot` (2048), `max_evals`,
                `fit_pilots`, `fit_iterations`, `fit_batch` (pilots per Adam step of the
                fit; default all), `test_pilots` (fresh draws that decide whether the fit
                or the v3 plan is kept; 16384), `ems_pilots` (trajectories for the
                statistics; 1024), `generator`, `device` and `dtype` (default: the weights').
        """
        from scoresde.calibration import calibrate

        if data_shape is None:
            from scoresde.recipes import model_spec

            spec = model_spec(self) or {}
            data_shape = tuple(spec.get("data_shape") or ())
            if not data_shape or 0 in data_shape:
                raise ValueError("data_shape is not known from the model spec: pass it")
        param = next(self.parameters(), None)
        if param is not None:  # the pilots and the reference solve in the weights' dtype
            kwargs.setdefault("dtype", param.dtype)
            kwargs.setdefault("device", param.device)
            if kwargs["dtype"] != torch.float64:  # dopri5 at rtol 1e-7 needs float64
                kwargs.setdefault("reference_rtol", 1e-5)
        cal = calibrate(self, sampler, data_shape=tuple(data_shape), **kwargs)
        keep = [c for c in self.calibrations if not c.matches(sampler)]
        self.calibrations = [*keep, cal]
        return cal

    def _coefficients(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha = expand_like(self.sde.alpha(t), x)
        sigma = expand_like(self.sde.sigma(t), x)
        return alpha, sigma, torch.sqrt(alpha**2 + sigma**2)

    def preconditioner(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(c_in, c_skip, c_out), each broadcastable to x `[B, *D]`, with

            network_output(x, t) = c_skip x + c_out net(c_in x, t).

        "none": (1 / s or 1, 0, 1). "gaussian": the table in the module docstring.
        """
        t = broadcast_time(t, x)
        alpha, sigma, s = self._coefficients(x, t)
        if self.preconditioning == "none":
            c_in = 1 / s if self.scale_input else torch.ones_like(s)
            return c_in, torch.zeros_like(s), torch.ones_like(s)
        sd = self.sigma_data
        s_d2 = (alpha * sd) ** 2 + sigma**2
        s_d = torch.sqrt(s_d2)
        c_in = 1 / s_d if self.scale_input else torch.ones_like(s_d)
        p = self.parameterization
        if p == "eps":
            return c_in, sigma / s_d2, alpha * sd / s_d
        if p == "x0":
            return c_in, alpha * sd**2 / s_d2, sigma * sd / s_d
        if p == "v":
            return c_in, alpha * sigma * (1 - sd**2) / (s * s_d2), s * sd / s_d
        return c_in, -1 / s_d2, alpha * sd / (sigma * s_d)  # "score"

    def _raw(self, x: Tensor, t: Tensor, y: Tensor | None, c_in: Tensor) -> Tensor:
        weight = next((p for p in self.net.parameters() if p.is_floating_point()), None)
        if weight is not None and weight.dtype != x.dtype and not torch.is_autocast_enabled():
            # torch's own error ("mat1 and mat2 must have the same dtype") names neither
            raise TypeError(
                f"x is {x.dtype} but the model's weights are {weight.dtype}: convert the "
                f"model (model.to({x.dtype})) or pass x as {weight.dtype}"
            )
        inp = c_in * x
        out = self.net(inp, t) if y is None else self.net(inp, t, y)
        if out.shape != x.shape:
            raise ValueError(
                f"net output must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}"
            )
        return out

    def network_output(self, x: Tensor, t: Any, y: Tensor | None = None) -> Tensor:
        """The model's output in its parameterization (eps, x0, v or score), shaped like x:
        the network output itself with preconditioning "none", c_skip x + c_out net(c_in x)
        with "gaussian"."""
        check_data("x", x)
        t = broadcast_time(t, x)
        c_in, c_skip, c_out = self.preconditioner(x, t)
        raw = self._raw(x, t, y, c_in)
        if self.preconditioning == "none":
            return raw
        return c_skip * x + c_out * raw

    def noise_prediction(self, x: Tensor, t: Any, y: Tensor | None = None) -> Tensor:
        """eps_hat = -sigma score `[B, *D]`, without dividing by a small sigma and multiplying
        it back: with "gaussian" preconditioning eps_hat = sigma x / s_d^2 +- alpha
        sigma_data / s_d net(...) directly (+ for "eps" and "v", - for "x0" and "score")."""
        check_data("x", x)
        t = broadcast_time(t, x)
        alpha, sigma, s = self._coefficients(x, t)
        p = self.parameterization
        if self.preconditioning == "gaussian":
            sd = self.sigma_data
            s_d2 = (alpha * sd) ** 2 + sigma**2
            s_d = torch.sqrt(s_d2)
            raw = self._raw(x, t, y, 1 / s_d if self.scale_input else torch.ones_like(s_d))
            sign = 1.0 if p in ("eps", "v") else -1.0
            return sigma / s_d2 * x + (sign * sd) * alpha / s_d * raw
        out = self.network_output(x, t, y)
        if p == "eps":
            return out
        if p == "score":
            return -sigma * out
        if p == "x0":
            return (x - alpha * out) / sigma
        return (sigma * x + alpha * s * out) / s**2  # "v"

    def output_to_score(self, out: Tensor, x: Tensor, t: Any) -> Tensor:
        """Convert a model output in this parameterization (`network_output`) to a score."""
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
        """The model output (`network_output`) this parameterization needs for `score`."""
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
        """The score estimate, shaped like x. t must be in [0, T] (a ValueError otherwise,
        checked for Python numbers and CPU tensors)."""
        check_time(t, self.sde.T)
        t = broadcast_time(t, x)
        if self.preconditioning == "gaussian" and self.parameterization != "score":
            # -eps_hat / sigma: one division, no cancellation through x0 at small sigma.
            return -self.noise_prediction(x, t, y) / expand_like(self.sde.sigma(t), x)
        return self.output_to_score(self.network_output(x, t, y), x, t)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())
