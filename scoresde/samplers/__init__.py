"""Samplers for the reverse SDE and the probability-flow ODE.

Each sampler is a `Sampler` built from an SDE and its settings, with
`sample(score_fn, shape, *, generator=None, device=None, dtype=None, x_init=None,
progress=False, callback=None, batch_invariant=False)`; after a run, `sampler.nfe` is the
number of score evaluations it made.
"""

from scoresde.samplers.base import NonFiniteError, Sampler, SamplingContext
from scoresde.samplers.grids import GRIDS, time_grid

__all__ = ["Sampler", "SamplingContext", "NonFiniteError", "time_grid", "GRIDS"]
