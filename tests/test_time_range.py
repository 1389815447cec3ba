"""Times outside [0, T] are a ValueError naming t, the value and the range (issue: NaN from
VP's g(t < 0) or cosine VP past T was returned silently)."""

from __future__ import annotations

import pytest
import torch

from scoresde import VESDE, VPSDE, CosineVPSDE, MLPScoreNet, ScoreModel, SubVPSDE
from scoresde._validation import unchecked_times

SDES = [VPSDE(), SubVPSDE(), VESDE(), CosineVPSDE()]
IDS = ["vp", "subvp", "ve", "cosine"]
X = torch.randn(4, 2, dtype=torch.float64)


def _calls(sde, t):
    return {
        "marginal_prob": lambda: sde.marginal_prob(X, t),
        "sde": lambda: sde.sde(X, t),
        "discretize": lambda: sde.discretize(X, t),
        "diffusion_coef": lambda: sde.diffusion_coef(torch.as_tensor(t, dtype=torch.float64)),
        "alpha": lambda: sde.alpha(t),
        "sigma": lambda: sde.sigma(t),
    }


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("bad", [-0.1, 1.1])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_out_of_range_times_raise(sde, bad: float, as_tensor: bool) -> None:
    t = bad * sde.T
    if as_tensor:
        t = torch.tensor([0.5, t, 0.2, 0.3], dtype=torch.float64)
    for name, call in _calls(sde, t).items():
        with pytest.raises(ValueError, match=r"t must be in \[0, T\] = \[0, 1\], got t=") as e:
            call()
        assert f"{bad * sde.T:.6g}"[:4] in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_times_in_range_and_at_the_ends_are_accepted(sde) -> None:
    for t in (0, 0.0, sde.T, torch.tensor(sde.T), torch.linspace(0, sde.T, 4, dtype=torch.float64)):
        for name, call in _calls(sde, t).items():
            out = call()
            outs = out if isinstance(out, tuple) else (out,)
            assert all(torch.isfinite(o).all() for o in outs), name
    # float32 round-off just above T is accepted
    sde.marginal_prob(X.float(), torch.full((4,), sde.T, dtype=torch.float32) * (1 + 2e-7))


def test_nan_producing_times_are_caught() -> None:
    """sub-VP's g and VP's g with beta_min = 0 are NaN at any t < 0; cosine's beta past T/t_max."""
    for sde, t in ((SubVPSDE(), -1e-9), (VPSDE(beta_min=0.0), -1e-12), (CosineVPSDE(), 1.01)):
        with unchecked_times():
            assert torch.isnan(sde.diffusion_coef(torch.tensor([t], dtype=torch.float64))).all()
        with pytest.raises(ValueError, match="t must be in"):
            sde.diffusion_coef(torch.tensor([t], dtype=torch.float64))


def test_score_model_rejects_out_of_range_times() -> None:
    sde = VPSDE()
    model = ScoreModel(MLPScoreNet(2, hidden=8, num_blocks=1, embed_dim=8), sde).double()
    assert torch.isfinite(model(X, 0.5)).all()
    assert torch.isfinite(model(X, torch.linspace(1e-3, 1.0, 4, dtype=torch.float64))).all()
    for t in (-0.1, 1.1, torch.tensor([0.5, 0.5, 1.1, 0.5], dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"t must be in \[0, T\]"):
            model(X, t)


def test_unchecked_times_is_scoped() -> None:
    sde = VPSDE()
    with unchecked_times():
        sde.alpha(1.003)
    with pytest.raises(ValueError, match="t must be in"):
        sde.alpha(1.003)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_a_nan_time_is_refused(sde) -> None:
    """A NaN time is no silent NaN (and DDPM's discretize no longer maps it to index 0, a
    finite wrong G)."""
    model = ScoreModel(MLPScoreNet(2, hidden=8, num_blocks=1), sde).double()
    for t in (float("nan"), torch.tensor([0.5, float("nan"), 0.2, 0.3], dtype=torch.float64)):
        calls = dict(_calls(sde, t), model=lambda t=t: model(X, t))
        for name, call in calls.items():
            with pytest.raises(ValueError, match=r"t must be in \[0, T\] .*got t=nan"):
                call()
                pytest.fail(name)
