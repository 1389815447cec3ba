"""Old private name of `scoresde.samplers.toolkit` (kept so existing imports work)."""

from scoresde.samplers.toolkit import *  # noqa: F403
from scoresde.samplers.toolkit import Coefficients, check_grid, data_prediction, make_grid

__all__ = ["Coefficients", "check_grid", "data_prediction", "make_grid"]
