"""The type aliases the package shares, each defined once.

- `Tensor`: `torch.Tensor`.
- `ScoreFn`: a score function s(x `[B, *D]`, t `[B]`) -> `[B, *D]` (a `ScoreModel`, an
  exact mixture score, or any callable of that signature).
- `Callback`: a sampler's per-step `callback(step, t, x)`, which may return a replacement x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, float, Tensor], "Tensor | None"]

__all__ = ["Tensor", "ScoreFn", "Callback"]
