"""Score networks: an MLP for flat data, a small U-Net for images, and `ScoreModel`."""

from scoresde.nets.embedding import FourierTimeEmbedding, SinusoidalTimeEmbedding
from scoresde.nets.mlp import MLPScoreNet, num_parameters
from scoresde.nets.score_model import PARAMETERIZATIONS, ScoreModel
from scoresde.nets.unet import UNet

__all__ = [
    "FourierTimeEmbedding",
    "SinusoidalTimeEmbedding",
    "MLPScoreNet",
    "UNet",
    "ScoreModel",
    "PARAMETERIZATIONS",
    "num_parameters",
]
