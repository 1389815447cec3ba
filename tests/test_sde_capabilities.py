"""What an SDE can do is asked of the SDE: its DDPM chain (or none), variance preservation,
its checkpoint config, a copy with another N, g^2 and sigma^2 in closed form. No module
outside scoresde/sdes.py tests an SDE's class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from scoresde import DDPMLoss
from scoresde.interop.diffusers import scoresde_model_as_diffusers_eps
from scoresde.sdes import SDE, VESDE, VPSDE, CosineVPSDE, SubVPSDE
from scoresde.toy import benchmark_mixture_2d
from scoresde.training import build_sde, sde_config

F64 = torch.float64
BUILT_IN = [VPSDE(beta_min=0.2, beta_max=15.0, N=50), SubVPSDE(N=70), VESDE(0.02, 30.0, N=40)]
BUILT_IN += [CosineVPSDE(N=60, s=0.01)]


@pytest.mark.parametrize("sde", BUILT_IN, ids=lambda s: type(s).__name__)
def test_ddpm_chain_is_the_kernel_at_matched_times(sde: SDE) -> None:
    """has_ddpm_chain <=> the chain's q(x_i | x_0) = N(sqrt(abar) x0, (1 - abar) I) is the
    SDE's own kernel at the time of equal alpha: true for VP and cosine VP only."""
    abar = sde.alphas_cumprod if hasattr(sde, "alphas_cumprod") else None
    if abar is None:  # VE: SMLD's chain, no abar at all
        assert not sde.has_ddpm_chain and sde.ddpm_alphas_cumprod() is None
        return
    c = 0.5 * torch.log(abar)  # log alpha at the matched time
    t = sde.t_from_log_mean_coeff(c).clamp(0.0, sde.T)
    inner = t < sde.T
    gap = (sde.sigma(t[inner]) ** 2 - (1 - abar[inner])).abs().max()
    assert sde.has_ddpm_chain == bool(gap < 1e-9)
    assert sde.variance_preserving == sde.has_ddpm_chain
    if sde.has_ddpm_chain:
        assert torch.equal(sde.ddpm_alphas_cumprod(), abar)
        assert torch.equal(sde.ddpm_alphas_cumprod(25), sde.with_N(25).alphas_cumprod)
    else:  # sub-VP: its std 1 - alpha^2 is far from the chain's sqrt(1 - abar)
        assert gap > 1e-2 and sde.ddpm_alphas_cumprod() is None


def test_sub_vp_has_no_ddpm_chain_anywhere() -> None:
    """DDPMLoss and the diffusers adapter agree: sub-VP has no DDPM chain of its own; the
    adapter takes one explicitly (e.g. DDPM's) and then works by SNR matching."""
    sub = SubVPSDE()
    with pytest.raises(TypeError, match="SubVPSDE"):
        DDPMLoss(sub)
    score = benchmark_mixture_2d().score_fn(sub)
    with pytest.raises(ValueError, match="SubVPSDE has no DDPM-style discrete chain"):
        scoresde_model_as_diffusers_eps(score, sub)
    eps_model = scoresde_model_as_diffusers_eps(score, sub, alphas_cumprod=VPSDE().alphas_cumprod)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(eps_model(x, torch.tensor(500))).all()
    for sde in (VPSDE(), CosineVPSDE()):  # both have one: the defaults work
        DDPMLoss(sde)
        scoresde_model_as_diffusers_eps(benchmark_mixture_2d().score_fn(sde), sde)


@pytest.mark.parametrize("sde", BUILT_IN, ids=lambda s: type(s).__name__)
def test_config_round_trip_and_with_n(sde: SDE) -> None:
    cfg = sde.config()
    assert sde_config(sde) == cfg
    rebuilt = build_sde(**cfg)
    assert type(rebuilt) is type(sde) and repr(rebuilt) == repr(sde)
    other = sde.with_N(17)
    assert type(other) is type(sde) and other.N == 17
    t = torch.linspace(0.01, 1.0, 9, dtype=F64)
    torch.testing.assert_close(other.sigma(t), sde.sigma(t), rtol=0, atol=0)
    # g^2 and sigma^2 without square roots agree with the squares.
    torch.testing.assert_close(sde.diffusion_sq(t), sde.diffusion_coef(t) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.sigma_sq(t), sde.sigma(t) ** 2, rtol=1e-12, atol=0)


def test_custom_sde_config_and_with_n() -> None:
    class Mine(VESDE):
        name = None

    sde = Mine()
    assert sde.config() == {"name": "Mine", "custom": True}
    with pytest.raises(TypeError, match="built-in"):
        sde.with_N(10)


def test_no_isinstance_on_sde_classes_outside_sdes_module() -> None:
    """Capabilities are asked of the SDE, so a new SDE needs no edits elsewhere."""
    root = Path(__file__).resolve().parents[1] / "scoresde"
    pattern = re.compile(
        r"isinstance\([^)]*\b(VPSDE|SubVPSDE|VESDE|CosineVPSDE)\b|type\(\w+\) is (not )?"
        r"(VPSDE|SubVPSDE|VESDE|CosineVPSDE)\b"
    )
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        if path.name != "sdes.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
