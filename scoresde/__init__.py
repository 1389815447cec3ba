"""scoresde: continuous-time score-based generative modelling (Song et al., ICLR 2021).

Public names follow the API contract (see README): SDEs, score models, samplers,
likelihoods, losses and training. Everything not exported here is private.
"""

from scoresde.nets import MLPScoreNet, ScoreModel
from scoresde.sdes import SDE, VESDE, VPSDE, CosineVPSDE, ReverseSDE, SubVPSDE

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "CosineVPSDE",
    "ReverseSDE",
    "ScoreModel",
    "MLPScoreNet",
]
