"""PCSampler and EulerMaruyamaSampler on exact Gaussian-mixture scores: the samples'
distribution, the reference's update formulas step by step, user plug-ins, validation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GM, TRUE_NLL, assert_mixture, mixture_errors  # noqa: F401

from scoresde import VESDE, VPSDE, CosineVPSDE, SubVPSDE
from scoresde.samplers.pc import (
    Corrector,
    EulerMaruyamaSampler,
    LangevinCorrector,
    PCSampler,
    Predictor,
    with_num_steps,
)
from scoresde.toy import random_mixture

N_SAMPLES = 3000


def draw(sampler, sde, n: int = N_SAMPLES, seed: int = 0, **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sampler.sample(GM.score_fn(sde), (n, 2), generator=gen, dtype=torch.float64, **kw)


SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(), "cosine": CosineVPSDE()}


def test_mixture_check_rejects_wrong_distributions() -> None:
    """The distribution check used below does discriminate: p_t at t = 0.05 (too spread)
    and data shrunk by 10% (too tight) both fail it, fresh data passes."""
    sde = VPSDE()
    gen = torch.Generator().manual_seed(1)
    data = GM.sample(N_SAMPLES, generator=gen, dtype=torch.float64)
    assert_mixture(data)
    for bad in (
        GM.marginal(sde, 0.05).sample(N_SAMPLES, generator=gen, dtype=torch.float64),
        0.9 * data + 0.1 * GM.mean().to(data),
    ):
        with pytest.raises(AssertionError):
            assert_mixture(bad)


# --- distributions ---------------------------------------------------------------------------

PC_CONFIGS = [
    # (sde, predictor, corrector, extra kwargs); 200 steps: correctness, not convergence.
    ("vp", "reverse_diffusion", "langevin", {}),
    ("vp", "euler_maruyama", None, {}),
    ("vp", "ancestral", None, {}),
    ("vp", "reverse_diffusion", "ald", {}),
    ("vp", "reverse_diffusion", "langevin", {"probability_flow": True}),
    ("subvp", "reverse_diffusion", "langevin", {}),  # crashes in the reference
    ("subvp", "ancestral", "langevin", {}),
    ("subvp", "euler_maruyama", None, {}),
    ("ve", "reverse_diffusion", "langevin", {}),
    ("ve", "ancestral", None, {}),
    ("ve", "euler_maruyama", "ald", {}),
    ("cosine", "reverse_diffusion", "langevin", {}),
    ("cosine", "ancestral", None, {}),
]


@pytest.mark.parametrize(("sde_name", "predictor", "corrector", "kw"), PC_CONFIGS)
def test_pc_distribution(sde_name: str, predictor, corrector, kw: dict) -> None:
    sde = SDES[sde_name]
    sampler = PCSampler(sde, predictor, corrector, num_steps=200, **kw)
    x = draw(sampler, sde)
    assert_mixture(x)
    assert sampler.nfe == 200 * (1 + (corrector is not None))


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_pc_langevin_with_reference_particles_samples_the_mixture(sde_name: str) -> None:
    """batch_invariant=True: the Langevin step comes from 256 reference particles; the
    samples still pass the distribution check, and the references cost one call per call."""
    sde = SDES[sde_name]
    sampler = PCSampler(sde, num_steps=200)
    assert_mixture(draw(sampler, sde, seed=5, batch_invariant=True))
    assert sampler.nfe == 400 and sampler.reference_nfe == 399


def test_pc_langevin_reference_particles_16d_batch_invariant() -> None:
    """A 16-D mixture, 32 reference particles: sample i is the same in batches of 3 and 50
    and under sample_offset; other reference counts change it. (To rounding only: this
    mixture's exact score, a batched matmul, is not bitwise row-invariant itself ("ald"
    differs by 3e-6 in float32 too); bit-identity is checked on the 2-D mixture.)"""
    gm = random_mixture(16, 3, scale=1.5, seed=8)
    sde = VPSDE()

    def run(n, refs=32, **kw):
        corr = LangevinCorrector(reference_particles=refs)
        sampler = PCSampler(sde, corrector=corr, num_steps=40)
        gen = torch.Generator().manual_seed(2)
        score = gm.score_fn(sde)
        kw.update(generator=gen, dtype=torch.float64, batch_invariant=True)
        return sampler.sample(score, (n, 16), **kw)

    small, large, tail = run(3), run(50), run(47, sample_offset=3)
    torch.testing.assert_close(small, large[:3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tail, large[3:], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(run(3, refs=33), small, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reference_particles"):
        LangevinCorrector(reference_particles=0)


def test_pc_default_settings_on_vp() -> None:
    """The reference configuration: N = 1000 steps, reverse diffusion + Langevin."""
    sde = VPSDE()
    sampler = PCSampler(sde)
    x = draw(sampler, sde, n=1000)
    err = mixture_errors(x)
    assert err["nll"] < 0.1 and err["weights"] < 0.05, err
    assert sampler.nfe == 2000


@pytest.mark.parametrize("sde_name", list(SDES))
def test_euler_maruyama_sampler_distribution(sde_name: str) -> None:
    sde = SDES[sde_name]
    sampler = EulerMaruyamaSampler(sde, num_steps=200)
    assert_mixture(draw(sampler, sde))
    assert sampler.nfe == 200


def test_euler_maruyama_sampler_other_grid() -> None:
    sde = VPSDE()
    sampler = EulerMaruyamaSampler(sde, num_steps=100, time_grid="quadratic")
    assert_mixture(draw(sampler, sde), nll_tol=0.09)


def test_pc_on_images_shape() -> None:
    """[B, 1, 4, 4] data: a 16-D mixture whose exact score reshapes. The run equals the one on
    flat [B, 16] data, and the samples' NLL under the mixture matches fresh data's."""
    gm = random_mixture(16, 3, scale=1.5, seed=3)
    sde = SubVPSDE()
    sampler = PCSampler(sde, num_steps=200)
    score = gm.score_fn(sde)
    x = sampler.sample(
        score, (1500, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert x.shape == (1500, 1, 4, 4)
    flat = sampler.sample(
        score, (1500, 16), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    torch.testing.assert_close(x.reshape(1500, 16), flat, rtol=1e-9, atol=1e-9)
    data = gm.sample(20000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    nll, ref = -gm.log_prob(x).mean(), -gm.log_prob(data).mean()
    # per-sample NLL sd ~3.0, so the mean of 1500 has sd 0.08 (measured: 10.07 vs 9.85).
    assert abs(float(nll - ref)) < 0.35, (float(nll), float(ref))
    weights = gm.responsibilities(x).mean(0)
    assert (weights - gm.weights).abs().max() < 0.04


# --- the reference's formulas, step by step --------------------------------------------------


def _hand_pc(sde, score_fn, x, gen, *, predictor, corrector, snr=0.16, n_steps=1, denoise=True):
    """Song et al.'s pc_sampler written out with the SDE's discrete tables (float64)."""
    N, T, eps = sde.N, sde.T, 1e-3
    x_mean = x
    for t in torch.linspace(T, eps, N, dtype=torch.float64).tolist():
        i = int(t * (N - 1) / T)
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        if corrector == "langevin":
            alpha = float(sde.alphas[i]) if hasattr(sde, "alphas") else 1.0
            for _ in range(n_steps):
                s = score_fn(x, tt)
                z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                ratio = z.norm(dim=1).mean() / s.norm(dim=1).mean()
                e = 2 * alpha * (snr * ratio) ** 2
                x_mean = x + e * s
                x = x_mean + torch.sqrt(2 * e) * z
        s = score_fn(x, tt)
        if predictor == "reverse_diffusion" and isinstance(sde, VESDE):
            prev = float(sde.discrete_sigmas[i - 1]) if i > 0 else 0.0
            g2 = float(sde.discrete_sigmas[i]) ** 2 - prev**2
            x_mean = x + g2 * s
            x = x_mean + math.sqrt(g2) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        elif predictor == "reverse_diffusion":
            beta = float(sde.discrete_betas[i])
            x_mean = x - (math.sqrt(1 - beta) * x - x) + beta * s
            x = x_mean + math.sqrt(beta) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        elif predictor == "ancestral" and isinstance(sde, VESDE):
            sig = float(sde.discrete_sigmas[i])
            prev = float(sde.discrete_sigmas[i - 1]) if i > 0 else 0.0
            x_mean = x + (sig**2 - prev**2) * s
            std = math.sqrt(prev**2 * (sig**2 - prev**2) / sig**2)
            x = x_mean + std * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        elif predictor == "ancestral":
            beta = float(sde.discrete_betas[i])
            x_mean = (x + beta * s) / math.sqrt(1 - beta)
            x = x_mean + math.sqrt(beta) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        elif predictor == "euler_maruyama":
            f, g = sde.sde(x, tt)
            dt = -T / N
            x_mean = x + (f - g[:, None] ** 2 * s) * dt
            x = x_mean + g[:, None] * math.sqrt(-dt) * torch.randn(
                x.shape, generator=gen, dtype=x.dtype
            )
    return x_mean if denoise else x


@pytest.mark.parametrize(
    ("sde", "predictor", "corrector", "denoise"),
    [
        (VPSDE(N=40), "reverse_diffusion", "langevin", True),
        (VPSDE(N=40), "reverse_diffusion", "langevin", False),
        (VPSDE(N=40), "ancestral", None, True),
        (VPSDE(N=40), "euler_maruyama", None, True),
        (VESDE(N=40), "reverse_diffusion", "langevin", True),
        (VESDE(N=40), "ancestral", "langevin", False),
        (CosineVPSDE(N=40), "ancestral", "langevin", True),
        (SubVPSDE(N=40), "euler_maruyama", "langevin", True),
    ],
)
def test_pc_matches_reference_formulas(sde, predictor, corrector, denoise) -> None:
    score_fn = GM.score_fn(sde)
    sampler = PCSampler(sde, predictor, corrector, n_steps=2, denoise=denoise)
    out = sampler.sample(
        score_fn, (64, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    gen = torch.Generator().manual_seed(5)
    x_T = torch.randn((64, 2), generator=gen, dtype=torch.float64) * sde.prior_std
    ref = _hand_pc(
        sde,
        score_fn,
        x_T,
        gen,
        predictor=predictor,
        corrector=corrector,
        n_steps=2,
        denoise=denoise,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(32, 2), (32, 1, 3, 3), (32, 2, 4, 4)])
def test_langevin_step_is_the_reference_formula(shape: tuple[int, ...]) -> None:
    """One Langevin corrector step against Song et al.'s formula with torch.norm on the
    flattened state: 2-D, 9 features (the matrix-vector norms) and 32 features
    (vector_norm), float64 to round-off and float32 to float32 round-off."""
    sde = with_num_steps(VPSDE(), 100)
    gm = random_mixture(math.prod(shape[1:]), 3, seed=4)
    flat_score = gm.score_fn(sde)

    def score_fn(x, t):
        return flat_score(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        sampler = PCSampler(sde, predictor=None, corrector="langevin", num_steps=100, snr=0.2)
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        steps: list[torch.Tensor] = []

        def keep_first(i, t, x, steps=steps):
            if i == 0:
                steps.append(x.clone())

        sampler.sample(
            score_fn, None, x_init=x0, generator=torch.Generator().manual_seed(2),
            callback=keep_first,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(2)
        t = torch.full((shape[0],), sde.T, dtype=dtype)
        s = score_fn(x0, t)
        z = torch.randn(shape, generator=gen, dtype=dtype)
        z_norm = torch.norm(z.reshape(shape[0], -1), dim=-1).mean()
        s_norm = torch.norm(s.reshape(shape[0], -1), dim=-1).mean()
        e = (0.2 * z_norm / s_norm) ** 2 * 2 * float(sde.alphas[-1])
        expected = x0 + e * s + torch.sqrt(2 * e) * z
        torch.testing.assert_close(steps[0], expected, rtol=tol, atol=tol)


def test_num_steps_uses_the_chain_with_that_many_steps() -> None:
    """num_steps=50 on an N=1000 SDE is the reference run with N=50 (betas rescaled)."""
    a = PCSampler(VPSDE(), num_steps=50)
    b = PCSampler(VPSDE(N=50))
    score = GM.score_fn(VPSDE())
    xa = a.sample(score, (32, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xb = b.sample(score, (32, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(xa, xb)
    for sde in SDES.values():
        rescaled = with_num_steps(sde, 50)
        assert rescaled.N == 50 and type(rescaled) is type(sde)
        torch.testing.assert_close(rescaled.alpha(torch.tensor(0.3)), sde.alpha(torch.tensor(0.3)))


def test_subvp_ancestral_is_the_exact_one_step_transition() -> None:
    """For sub-VP the ancestral step uses the exact kernel over h = T/N; on VP the same
    construction agrees with DDPM's betas to O(h^2)."""
    sde = VPSDE()
    t = torch.tensor([0.5], dtype=torch.float64)
    h = 1.0 / sde.N
    a = sde.alpha(t) / sde.alpha(t - h)
    b2 = sde.sigma(t) ** 2 - a**2 * sde.sigma(t - h) ** 2
    beta = sde.discrete_betas[int(0.5 * (sde.N - 1))]
    assert abs(float(b2) - float(beta)) < 0.02 * float(beta)
    assert abs(float(a) - math.sqrt(1 - float(beta))) < 1e-4


def test_euler_maruyama_sampler_formula() -> None:
    """Three steps by hand: x <- x - h [f x - g^2 s] + g sqrt(h) z; no noise on the last."""
    sde = SubVPSDE()
    score_fn = GM.score_fn(sde)
    sampler = EulerMaruyamaSampler(sde, num_steps=3, eps=0.1)
    out = sampler.sample(
        score_fn, (16, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((16, 2), generator=gen, dtype=torch.float64)
    grid = torch.linspace(1.0, 0.1, 4, dtype=torch.float64)
    for k in range(3):
        t, h = grid[k], float(grid[k] - grid[k + 1])
        s = score_fn(x, t.expand(16))
        f, g = float(sde.drift_coef(t)), float(sde.diffusion_coef(t))
        x = x - h * (f * x - g**2 * s)
        if k < 2:
            x = x + g * math.sqrt(h) * torch.randn((16, 2), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


# --- user plug-ins ---------------------------------------------------------------------------


class HalfStepEulerPredictor(Predictor):
    """A user's predictor: Euler–Maruyama on the reverse SDE, written from the public API."""

    def update(self, pc, x, t, step):
        f, g = pc.sde.sde(x, t)
        score = pc.score(x, t)
        x_mean = x - (f - g[:, None] ** 2 * score) * pc.dt
        return x_mean + g[:, None] * math.sqrt(pc.dt) * pc.randn_like(x), x_mean


class CountingCorrector(Corrector):
    """A user's corrector: plain Langevin with e = snr * sigma(t)^2 (records its calls)."""

    calls = 0

    def update(self, pc, x, t, step):
        CountingCorrector.calls += 1
        sigma2 = float(pc.sde.sigma(torch.tensor(t))) ** 2
        e = self.snr * sigma2
        x_mean = x
        for _ in range(self.n_steps):
            x_mean = x + e * pc.score(x, t)
            x = x_mean + math.sqrt(2 * e) * pc.randn_like(x)
        return x, x_mean


def test_user_predictor_and_corrector_classes() -> None:
    sde = VPSDE()
    CountingCorrector.calls = 0
    sampler = PCSampler(
        sde, HalfStepEulerPredictor, CountingCorrector, snr=0.05, n_steps=2, num_steps=200
    )
    assert isinstance(sampler.corrector, CountingCorrector)
    assert sampler.corrector.snr == 0.05 and sampler.corrector.n_steps == 2
    assert_mixture(draw(sampler, sde))
    assert CountingCorrector.calls == 200
    assert sampler.nfe == 200 * 3
    # An instance is used as is (its own settings).
    sampler = PCSampler(
        sde, HalfStepEulerPredictor(), LangevinCorrector(snr=0.1, n_steps=1), num_steps=200
    )
    assert_mixture(draw(sampler, sde))


# --- settings and validation -----------------------------------------------------------------


def test_pc_float32_and_determinism() -> None:
    sde = VESDE()
    score = GM.score_fn(sde)
    sampler = PCSampler(sde, num_steps=200)
    x32 = sampler.sample(score, (N_SAMPLES, 2), generator=torch.Generator().manual_seed(0))
    assert x32.dtype == torch.float32 and x32.shape == (N_SAMPLES, 2)
    assert_mixture(x32)
    small = PCSampler(sde, num_steps=20)
    x64 = small.sample(
        score, (8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    again = small.sample(
        score, (8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    other = small.sample(
        score, (8, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    assert x64.dtype == torch.float64 and torch.equal(x64, again)
    assert not torch.allclose(x64, other)


def test_corrector_only_and_predictor_only() -> None:
    sde = VPSDE()
    for pred, corr in (("reverse_diffusion", None), (None, "langevin")):
        sampler = PCSampler(sde, pred, corr, num_steps=30)
        x = draw(sampler, sde, n=16)
        assert torch.isfinite(x).all() and sampler.nfe == 30
    # Too few steps for DDPM's chain (betas beta_max / N >= 1) is refused up front...
    with pytest.raises(ValueError, match="num_steps=10"):
        PCSampler(sde, num_steps=10)
    # ...but Euler–Maruyama without a corrector does not use the chain.
    assert torch.isfinite(draw(PCSampler(sde, "euler_maruyama", None, num_steps=10), sde, 16)).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"predictor": "heun"}, ValueError, "predictor"),
        ({"predictor": 3}, TypeError, "predictor"),
        ({"corrector": "hmc"}, ValueError, "corrector"),
        ({"corrector": LangevinCorrector}, None, None),
        ({"corrector": object()}, TypeError, "corrector"),
        ({"predictor": None, "corrector": None}, ValueError, "both"),
        ({"snr": 0.0}, ValueError, "snr"),
        ({"snr": "big"}, TypeError, "snr"),
        ({"n_steps": 0}, ValueError, "n_steps"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": 1.0}, ValueError, "eps"),
        ({"denoise": 1}, TypeError, "denoise"),
        ({"probability_flow": "yes"}, TypeError, "probability_flow"),
        ({"predictor": "ancestral", "probability_flow": True}, ValueError, "probability-flow"),
    ],
)
def test_pc_validation(kwargs: dict, error, match) -> None:
    if error is None:
        assert isinstance(PCSampler(VPSDE(), **kwargs).corrector, LangevinCorrector)
        return
    with pytest.raises(error, match=match):
        PCSampler(VPSDE(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"denoise": None}, TypeError, "denoise"),
        ({"time_grid": "cubic"}, ValueError, "time_grid"),
        ({"time_grid": [1.0, 0.5, 0.7]}, ValueError, "decreasing"),
    ],
)
def test_euler_maruyama_validation(kwargs: dict, error, match) -> None:
    with pytest.raises(error, match=match):
        EulerMaruyamaSampler(VPSDE(), **kwargs)


def test_sde_type_is_checked() -> None:
    with pytest.raises(TypeError, match="sde"):
        PCSampler("vp")
    with pytest.raises(TypeError, match="sde"):
        EulerMaruyamaSampler(None)


def test_chains_too_short_to_mean_anything_are_refused() -> None:
    """Under VP, 2-5 steps give betas >= 1 and one step gives the degenerate chain [beta_min]
    (its one step leaves near-prior noise): refused for the samplers that use the chain;
    Euler-Maruyama, which does not, still runs (badly, as any 1-step solver)."""
    sde = VPSDE()
    for n in (1, 2, 5):
        with pytest.raises(ValueError, match=rf"num_steps={n} is too few for the discrete chain"):
            PCSampler(sde, num_steps=n)
    with pytest.raises(ValueError, match="a chain of one step is degenerate"):
        PCSampler(sde, num_steps=1, corrector=None)
    x = PCSampler(sde, "euler_maruyama", corrector=None, num_steps=1).sample(
        lambda x, t: -x, (3, 2), generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (3, 2) and torch.isfinite(x).all()
