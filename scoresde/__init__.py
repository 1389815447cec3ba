"""scoresde: continuous-time score-based generative modelling (Song et al., ICLR 2021).

Public names follow the API contract (see README): SDEs, score models, samplers,
likelihoods, losses and training. Everything not exported here is private.
"""

from scoresde.guidance import (
    ConditionalInfo,
    classifier_free_guidance,
    classifier_log_prob,
    guided_score,
    inpaint,
    pc_inpaint,
    smc_sample,
)
from scoresde.likelihood import (
    DatasetLikelihood,
    LikelihoodResult,
    bits_per_dim,
    dataset_log_likelihood,
    ddpm_vlb,
    log_likelihood,
)
from scoresde.losses import DDPMLoss, DSMLoss
from scoresde.nets import MLPScoreNet, ScoreModel, UNet
from scoresde.samplers import (
    AdaptiveSDESampler,
    DDIMSampler,
    DPMSolverSampler,
    EDMSampler,
    EulerMaruyamaSampler,
    ODESampler,
    PCSampler,
    SASolverSampler,
    optimize_time_grid,
)
from scoresde.sdes import SDE, VESDE, VPSDE, CosineVPSDE, ReverseSDE, SubVPSDE
from scoresde.training import Trainer

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
    "UNet",
    "DSMLoss",
    "DDPMLoss",
    "Trainer",
    "log_likelihood",
    "bits_per_dim",
    "ddpm_vlb",
    "dataset_log_likelihood",
    "LikelihoodResult",
    "DatasetLikelihood",
    "classifier_free_guidance",
    "guided_score",
    "classifier_log_prob",
    "inpaint",
    "pc_inpaint",
    "smc_sample",
    "ConditionalInfo",
    "DDIMSampler",
    "DPMSolverSampler",
    "EDMSampler",
    "AdaptiveSDESampler",
    "PCSampler",
    "SASolverSampler",
    "EulerMaruyamaSampler",
    "ODESampler",
    "optimize_time_grid",
]
