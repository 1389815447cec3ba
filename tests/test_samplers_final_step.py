"""NaN/Inf after the sampling loop (issue 16.1): a final denoising step, the adaptive
sampler's Tweedie step or PC's last corrector/predictor pair that turns NaN is reported
(NonFiniteError naming the step and the time), never returned as NaN samples; and the
`sample()` arguments that used to slip through (a float64 score in a float32 run,
`batch_invariant="yes"`)."""

from __future__ import annotations

import pytest
import torch

from scoresde import VESDE, VPSDE
from scoresde.samplers import (
    AdaptiveSDESampler,
    DDIMSampler,
    DPMSolverSampler,
    EDMSampler,
    NonFiniteError,
    ODESampler,
    PCSampler,
)
from scoresde.samplers.pc import EulerMaruyamaSampler
from scoresde.toy import benchmark_mixture_2d

GM = benchmark_mixture_2d()


def _samplers(sde):
    return {
        "ode_heun_denoise": ODESampler(sde, "heun", num_steps=4, denoise=True),
        "ode_dopri5_denoise": ODESampler(sde, "dopri5", rtol=1e-3, atol=1e-3, denoise=True),
        "adaptive_defaults": AdaptiveSDESampler(sde),
        "dpm_denoise": DPMSolverSampler(sde, num_steps=5, denoise=True),
        "ddim_denoise": DDIMSampler(sde, num_steps=5, denoise=True),
        "edm_denoise": EDMSampler(sde, num_steps=4, denoise=True),
        "pc": PCSampler(sde, num_steps=30),
        "em": EulerMaruyamaSampler(sde, num_steps=10),
    }


class NaNOnCall:
    """The exact score, except that call number `bad` (1-based) returns NaN."""

    def __init__(self, score_fn, bad: int) -> None:
        self.score_fn, self.bad, self.calls = score_fn, bad, 0

    def __call__(self, x, t):
        self.calls += 1
        out = self.score_fn(x, t)
        return torch.full_like(out, float("nan")) if self.calls == self.bad else out


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=10.0)], ids=["vp", "ve"])
@pytest.mark.parametrize("name", list(_samplers(VPSDE())))
def test_nan_in_the_last_score_evaluation_is_reported(sde, name) -> None:
    sampler = _samplers(sde)[name]
    score = GM.score_fn(sde)
    x = sampler.sample(score, (16, 2), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    last = sampler.nfe
    with pytest.raises(NonFiniteError, match=r"step \d+") as info:
        sampler.sample(NaNOnCall(score, last), (16, 2), generator=torch.Generator().manual_seed(0))
    assert "t = " in str(info.value) or "t in [" in str(info.value)


def test_final_step_message_names_the_denoising_time() -> None:
    sampler = DPMSolverSampler(VPSDE(), num_steps=5, denoise=True, eps=2e-3)
    score = NaNOnCall(GM.score_fn(VPSDE()), 6)  # 5 steps + the denoising call
    with pytest.raises(NonFiniteError, match=r"final step after step 4 .*t = 0\.002"):
        sampler.sample(score, (8, 2), generator=torch.Generator().manual_seed(1))


def test_a_callback_replacing_x_by_nan_at_the_end_is_reported() -> None:
    sampler = DDIMSampler(VPSDE(), num_steps=3)

    def callback(step, t, x):
        return torch.full_like(x, float("nan")) if step == 2 else None

    with pytest.raises(NonFiniteError, match="returned samples"):
        sampler.sample(GM.score_fn(VPSDE()), (4, 2), callback=callback)


@pytest.mark.parametrize("name", ["pc", "ode_heun_denoise", "adaptive_defaults", "dpm_denoise"])
def test_a_float64_score_does_not_turn_a_float32_run_into_float64(name) -> None:
    sampler = _samplers(VPSDE())[name]
    score64 = GM.score_fn(VPSDE())

    def wide(x, t):
        return score64(x.double(), t.double())

    x = sampler.sample(wide, (8, 2), generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32
    same = sampler.sample(
        lambda x, t: wide(x, t).float(), (8, 2), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(x, same)
    with pytest.raises(TypeError, match="floating"):
        sampler.sample(lambda x, t: torch.ones_like(x, dtype=torch.int64), (8, 2))


@pytest.mark.parametrize("value", ["yes", 1, None, "False"])
def test_batch_invariant_must_be_a_bool(value) -> None:
    with pytest.raises(TypeError, match=r"batch_invariant must be a bool.*got"):
        DDIMSampler(VPSDE(), num_steps=2).sample(
            GM.score_fn(VPSDE()), (4, 2), batch_invariant=value
        )


def test_pc_with_langevin_is_batch_invariant_through_reference_particles() -> None:
    """Issue 16.5: PC's Langevin step averages norms over the batch, so batch_invariant=True
    used to warn. It now takes the step from reference particles: sample i is bit-identical
    in batches of 4 and 64 and under sample_offset, with no warning. (Without
    batch_invariant the step still uses the batch: test_samplers_pc checks the formula.)"""
    import warnings

    score = GM.score_fn(VPSDE())
    pc = PCSampler(VPSDE(), num_steps=30)

    def draw(n, **kw):
        gen = torch.Generator().manual_seed(3)
        return pc.sample(score, (n, 2), generator=gen, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small, large = draw(4, batch_invariant=True), draw(64, batch_invariant=True)
        tail = draw(60, batch_invariant=True, sample_offset=4)
    assert torch.equal(small, large[:4]) and torch.equal(tail, large[4:])
    assert pc.nfe == 60 and pc.reference_nfe == 59  # the last predictor step needs no refs
    draw(4)
    assert pc.nfe == 60 and pc.reference_nfe == 0
