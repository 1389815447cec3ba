"""`ReverseSDE`: the reverse-time SDE (or probability-flow ODE) of a forward `SDE`,
driven by a score function (Song et al., ICLR 2021); made by `SDE.reverse`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import broadcast_time, check_data, expand_like

if TYPE_CHECKING:
    from scoresde.sdes import SDE

__all__ = ["ReverseSDE"]


class ReverseSDE:
    """dx = [f - g^2 score] dt + g dw_bar, or with `probability_flow` the ODE
    dx = [f - g^2 score / 2] dt, integrated from t = T down to 0.

    The drift's coefficients are `SDE.reverse_coefficients`, which every sampler, the
    likelihood and `scoresde.flow` read: the reverse drift is defined there only.
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.forward_sde = sde
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.N = sde.N
        self.T = sde.T

    def sde(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """(reverse drift shaped like x, diffusion `[B]`; zero for the ODE)."""
        check_data("x", x)
        t = broadcast_time(t, x)
        f, c = self.forward_sde.reverse_coefficients(t, self.probability_flow)
        drift = expand_like(f, x) * x - expand_like(c, x) * self.score_fn(x, t)
        diffusion = self.forward_sde.diffusion_coef(t)
        if self.probability_flow:
            diffusion = torch.zeros_like(diffusion)
        return drift, diffusion

    def discretize(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor]:
        """One reverse step of the forward discretization: (f - G^2 score [/2], G or 0)."""
        t = broadcast_time(t, x)
        f, G = self.forward_sde.discretize(x, t)
        score = self.score_fn(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        rev_f = f - expand_like(G**2, x) * score * weight
        rev_G = torch.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G
