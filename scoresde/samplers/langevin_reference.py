"""The reference particles that make PC's Langevin step size batch-invariant (see
`scoresde.samplers.pc.LangevinCorrector`): a fixed number of samples of their own, from
Philox streams under a key derived from the run's key, evolved by the same predictor and
corrector, whose norms give the step size of every batch drawn with the same seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scoresde._typing import Tensor
from scoresde.samplers.base import CountedScore, NonFiniteGuard, PerSampleNoise, SamplingContext
from scoresde.samplers.philox import PhiloxNormal, derive_key

if TYPE_CHECKING:
    from scoresde.samplers.pc import LangevinCorrector, PCContext, Predictor

__all__ = ["LangevinReference"]


# Up to this many features per sample, the per-sample norms are sqrt((v * v) @ 1) (a BLAS
# matrix-vector product) on the CPU: a reduction over a short inner dimension is slow there
# (10,000 x 2: 20 us instead of vector_norm's 55 us; they break even near 16-32 features).
_MV_NORM_MAX_FEATURES = 16


def _norm_mean(v: Tensor, ones: Tensor | None) -> Tensor:
    """mean_b ||v_b|| over all non-batch dimensions (a 0-d tensor, no host sync); `ones` is
    a vector of ones of the feature count for the matrix-vector path, or None. (A mean, not
    a sum: the sum of a large half-precision batch's norms would overflow.)"""
    flat = v.reshape(v.shape[0], -1)
    if ones is None:
        return torch.linalg.vector_norm(flat, dim=1).mean()
    return torch.mv(flat.square(), ones).sqrt_().mean()


class LangevinReference:
    """The reference particles of a batch-invariant Langevin PC run (see
    `LangevinCorrector`): `count` particles `[R, *D]` drawn from the prior with Philox
    streams under a key derived from the run's, evolved by the same predictor and corrector
    with their own counted score (`nfe`) and their own step sizes."""

    DOMAIN = 1  # derive_key's domain word for these streams

    def __init__(
        self, ctx: SamplingContext, pc: PCContext, count: int, like: Tensor, prior_std: float
    ) -> None:
        if not isinstance(ctx.noise, PerSampleNoise):
            raise TypeError("reference particles need the per-sample noise of batch_invariant")
        self.noise = PhiloxNormal(derive_key(ctx.noise.key, self.DOMAIN))
        self.score = CountedScore(ctx.score.score_fn)
        guard = NonFiniteGuard(like.device)
        own = SamplingContext(self.score, self.noise, guard, None, False, "reference particles")
        self.pc = type(pc)(own, pc.sde, pc.times_tensor, pc.probability_flow)
        shape = (count, *like.shape[1:])
        self.x = self.noise.randn(shape, like.device, like.dtype) * prior_std

    def langevin_step(self, corrector: LangevinCorrector, t: float, step: int) -> Tensor:
        """One Langevin step of the particles; returns their r = mean ||z|| / mean ||s||
        (0-d), which sets the step size e = 2 alpha snr^2 r^2."""
        score = self.pc.score(self.x, t)
        noise = self.pc.randn_like(self.x)
        self.x, ratio = corrector.step(self.x, score, noise, step)
        return ratio

    def predict(self, predictor: Predictor, t: float, step: int) -> None:
        """One predictor step of the particles."""
        self.x, _ = predictor.update(self.pc, self.x, t, step)

    @property
    def nfe(self) -> int:
        return self.score.nfe
