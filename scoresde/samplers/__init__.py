"""Samplers for the reverse SDE and the probability-flow ODE.

Each sampler is a `Sampler` built from an SDE and its settings, with
`sample(score_fn, shape, *, generator=None, device=None, dtype=None, x_init=None,
progress=False, callback=None, batch_invariant=False)`; after a run, `sampler.nfe` is the
number of score evaluations it made.
"""

from scoresde.samplers import toolkit  # noqa: E402  the solver toolkit (public)
from scoresde.samplers.adaptive import AdaptiveSDESampler
from scoresde.samplers.base import NonFiniteError, Sampler, SamplingContext
from scoresde.samplers.ddim import DDIMSampler
from scoresde.samplers.dpm_solver import DPMSolverSampler
from scoresde.samplers.edm import EDMSampler
from scoresde.samplers.ems import EmpiricalModelStatistics, EMSSampler
from scoresde.samplers.grids import GRIDS, time_grid
from scoresde.samplers.learned import LearnedMultistepSampler
from scoresde.samplers.ode import ODESampler
from scoresde.samplers.pc import (
    Corrector,
    EulerMaruyamaSampler,
    PCContext,
    PCSampler,
    Predictor,
)
from scoresde.samplers.sa_solver import SASolverSampler
from scoresde.samplers.schedules import optimize_time_grid

#: The one registry of samplers: short name (the CLI's `--sampler`) -> sampler class. The
#: CLI, guidance and the benchmarks read it, so a new sampler is one module plus one entry.
SAMPLERS: dict[str, type[Sampler]] = {
    "pc": PCSampler,
    "em": EulerMaruyamaSampler,
    "ode": ODESampler,
    "ddim": DDIMSampler,
    "dpm": DPMSolverSampler,
    "edm": EDMSampler,
    "adaptive": AdaptiveSDESampler,
    "sa": SASolverSampler,
}

__all__ = ["SAMPLERS", "Sampler", "SamplingContext", "NonFiniteError", "time_grid", "GRIDS"]
__all__ += ["DDIMSampler", "DPMSolverSampler", "EDMSampler", "AdaptiveSDESampler"]
__all__ += ["PCSampler", "EulerMaruyamaSampler", "ODESampler", "Predictor", "Corrector"]
__all__ += ["PCContext", "optimize_time_grid", "SASolverSampler", "toolkit"]
__all__ += ["LearnedMultistepSampler", "EMSSampler", "EmpiricalModelStatistics"]
