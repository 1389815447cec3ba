"""Adapters to other libraries: torchsde and torchdiffeq (exported here) and diffusers
(`scoresde.interop.diffusers`, imported on demand: diffusers is a heavy import)."""

from scoresde.interop.torch_solvers import (
    ProbabilityFlowODE,
    TorchsdeReverseSDE,
    to_torchdiffeq,
    to_torchsde,
)

__all__ = ["to_torchsde", "to_torchdiffeq", "TorchsdeReverseSDE", "ProbabilityFlowODE"]
