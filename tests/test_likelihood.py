"""Tests of scoresde.likelihood against closed forms: exact mixture densities, Gaussian bin
probabilities, and DDPM's bound written out term by term."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import flow
from scoresde import likelihood as L
from scoresde.nets import MLPScoreNet, ScoreModel
from scoresde.sdes import VESDE, VPSDE, CosineVPSDE, SubVPSDE
from scoresde.toy import GaussianMixture, benchmark_mixture_2d, random_mixture

F64 = torch.float64
EPS = 1e-5

SDES = {
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "cosine": CosineVPSDE,
}


def _points(mix, n: int, seed: int = 0) -> torch.Tensor:
    return mix.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- probability-flow log-likelihood -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("dim", [2, 16])
def test_exact_trace_matches_mixture_density(name: str, dim: int) -> None:
    """logp is the exact log p_eps(x) up to the prior's mismatch with p_T (solver error tiny)."""
    sde = SDES[name]()
    mix = benchmark_mixture_2d() if dim == 2 else random_mixture(16)
    x = _points(mix, 24 if dim == 2 else 12)
    log_p = mix.log_prob_fn(sde)
    exact = log_p(x, EPS)
    res = L.log_likelihood(mix.score_fn(sde), sde, x, trace="exact", rtol=1e-6, atol=1e-6)
    assert res.logp.shape == (x.shape[0],) and res.z.shape == x.shape
    assert res.logp.dtype == F64
    # logp = prior_logp(z) + delta; with the true p_T in place of the prior the only error
    # left is the solver's. This also pins the sign of the divergence integral.
    assert torch.allclose(res.logp, res.prior_logp + res.delta_logp, atol=1e-12)
    solver_err = (res.delta_logp + log_p(res.z, sde.T) - exact).abs()
    assert solver_err.max() < 1e-3, solver_err.max()
    err = (res.logp - exact).abs()
    if name == "ve":
        # The prior N(0, sigma_max^2) differs from p_T by up to ~0.04 nats (2-D) and ~0.09
        # (16-D) at these points: the model's error, not the solver's (checked above).
        assert err.max() / dim < 0.02 and err.mean() / dim < 0.006, err
    elif dim == 2:
        assert err.max() < 0.02, err.max()
    else:
        assert err.max() / dim < 0.005, err.max()
    if name != "ve":
        assert err.mean() / dim < 0.005
    assert torch.allclose(res.bpd, -res.logp / (dim * math.log(2)))
    assert res.nfe > 0 and res.vjps == res.nfe * dim


@pytest.mark.parametrize(
    ("name", "dim"), [("vp", 2), ("subvp", 2), ("ve", 2), ("cosine", 2), ("vp", 16), ("ve", 16)]
)
def test_sigma_time_variable_is_the_same_likelihood(name: str, dim: int) -> None:
    """time_variable="sigma" (EDM's ODE in sigma / alpha, y = x / alpha) is an exact change
    of variables: its solver error against the exact log p_eps is as small as the t solve's,
    and both solves agree on logp and z far below the tolerance's scale."""
    sde = SDES[name]()
    mix = benchmark_mixture_2d() if dim == 2 else random_mixture(16, seed=3)
    x = _points(mix, 8 if dim == 2 else 4, seed=7)
    log_p = mix.log_prob_fn(sde)
    score = mix.score_fn(sde)
    kw = dict(trace="exact", rtol=1e-6, atol=1e-6)
    res_t = L.log_likelihood(score, sde, x, **kw)
    res_s = L.log_likelihood(score, sde, x, time_variable="sigma", **kw)
    assert res_s.logp.dtype == F64 and res_s.z.shape == x.shape
    assert torch.allclose(res_s.logp, res_s.prior_logp + res_s.delta_logp, atol=1e-12)
    solver_err = (res_s.delta_logp + log_p(res_s.z, sde.T) - log_p(x, EPS)).abs()
    assert solver_err.max() < 1e-3, solver_err.max()
    assert (res_s.logp - res_t.logp).abs().max() < 1e-3
    assert (res_s.z - res_t.z).abs().max() < 1e-3 * sde.prior_std
    assert res_s.vjps == res_s.nfe * dim


def test_sigma_time_variable_per_sample_and_hutchinson() -> None:
    """The per-sample solver and Hutchinson's estimator (same probes) in sigma agree with
    their solves in t."""
    sde, mix = SubVPSDE(), benchmark_mixture_2d()
    x, score = _points(mix, 8, seed=2), mix.score_fn(sde)
    ref = L.log_likelihood(score, sde, x, trace="exact", rtol=1e-6, atol=1e-6)
    per = L.log_likelihood(
        score, sde, x, trace="exact", rtol=1e-5, atol=1e-5,
        method="dopri5_per_sample", time_variable="sigma",
    )  # fmt: skip
    assert (per.logp - ref.logp).abs().max() < 1e-2
    hk = dict(rtol=1e-5, atol=1e-5, num_probes=2)
    h_t = L.log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(0), **hk)
    h_s = L.log_likelihood(
        score, sde, x, generator=torch.Generator().manual_seed(0), time_variable="sigma", **hk
    )
    assert (h_s.logp - h_t.logp).abs().max() < 1e-2
    assert (h_s.logp - ref.logp).abs().max() > 1e-3  # the probes' noise, not the exact trace


def test_gaussian_data_closed_form_and_sign() -> None:
    """Zero-mean Gaussian data: p_t = N(0, alpha^2 C + sigma^2 I) is ~ the prior at T, so logp
    must hit the closed form; the wrong sign of the integral would be off by 2 |delta|."""
    sde = VPSDE()
    cov = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.3, -0.1], [0.0, -0.1, 0.05]], dtype=F64)
    gauss = GaussianMixture([1.0], torch.zeros(1, 3, dtype=F64), cov[None])
    x = _points(gauss, 8) * 1.5  # also points in the tails
    res = L.log_likelihood(gauss.score_fn(sde), sde, x, trace="exact", rtol=1e-7, atol=1e-7)
    cov_eps = sde.alpha(EPS) ** 2 * cov + sde.sigma(EPS) ** 2 * torch.eye(3, dtype=F64)
    exact = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=F64), cov_eps).log_prob(x)
    assert (res.delta_logp.abs() > 1.0).all()  # the integral matters here
    assert torch.allclose(res.logp, exact, atol=1e-3), (res.logp - exact).abs().max()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe: str) -> None:
    """The mean of Hutchinson's logp over many points and probes equals the exact mean within
    Monte-Carlo error (3 standard errors)."""
    sde = VPSDE()
    mix = random_mixture(6, seed=1)
    x = _points(mix, 64).repeat(4, 1)  # 256 probes over 64 points
    score = mix.score_fn(sde)
    kw = {"rtol": 1e-5, "atol": 1e-5}
    exact = L.log_likelihood(score, sde, x, trace="exact", **kw).logp
    gen = torch.Generator().manual_seed(0)
    hutch = L.log_likelihood(score, sde, x, probe=probe, generator=gen, **kw).logp
    diff = hutch - exact
    stderr = diff.std() / math.sqrt(diff.numel())
    assert diff.std() > 1e-3  # it is an estimate, with real variance
    assert diff.mean().abs() < 3 * stderr, (diff.mean(), stderr)
    # More probes, less variance.
    hutch4 = L.log_likelihood(score, sde, x, probe=probe, num_probes=4, generator=gen, **kw)
    assert (hutch4.logp - exact).std() < 0.75 * diff.std()
    assert hutch4.vjps == 4 * hutch4.nfe


def test_hutchinson_reproducible_with_generator() -> None:
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    x = _points(mix, 8)
    score = mix.score_fn(sde)
    a = L.log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(5))
    b = L.log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(5))
    c = L.log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.logp, b.logp) and a.nfe == b.nfe
    assert not torch.equal(a.logp, c.logp)


def test_image_shaped_input() -> None:
    """[B, 1, 4, 4] data gives the same numbers as the flat [B, 16] data."""
    sde = VPSDE()
    mix = random_mixture(16, seed=2)
    flat = _points(mix, 6)
    img = flat.reshape(6, 1, 4, 4)
    score = mix.score_fn(sde)  # flattens inside and returns x's shape
    r_img = L.log_likelihood(score, sde, img, trace="exact", rtol=1e-6, atol=1e-6)
    r_flat = L.log_likelihood(score, sde, flat, trace="exact", rtol=1e-6, atol=1e-6)
    assert r_img.z.shape == img.shape
    assert torch.allclose(r_img.logp, r_flat.logp, atol=1e-8)
    assert torch.allclose(r_img.logp, mix.log_prob_fn(sde)(flat, EPS), atol=0.08)
    gen = torch.Generator().manual_seed(0)
    r_h = L.log_likelihood(score, sde, img, generator=gen, num_probes=2)
    assert r_h.logp.shape == (6,) and torch.isfinite(r_h.logp).all()


def test_exact_trace_in_chunks_for_larger_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact divergence split into several batched VJP chunks gives the same answer."""
    sde = VPSDE()
    mix = random_mixture(16, seed=4)
    x = _points(mix, 4)
    score = mix.score_fn(sde)
    whole = L.log_likelihood(score, sde, x, trace="exact", method="rk4", num_steps=10)
    # The chunking lives in scoresde.flow (the divergence's one home).
    monkeypatch.setattr(flow, "_EXACT_CHUNK_ELEMENTS", 4 * 16 * 5)  # 5 dims per chunk: 4 chunks
    assert len(L._one_hot_chunks(x)) == 4
    split = L.log_likelihood(score, sde, x, trace="exact", method="rk4", num_steps=10)
    assert torch.allclose(whole.logp, split.logp, atol=1e-10)


def test_encode_decode_round_trip() -> None:
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    x = _points(mix, 16)
    score = mix.score_fn(sde)
    res = L.log_likelihood(score, sde, x, trace="exact", rtol=1e-7, atol=1e-7)
    back, nfe = L._flow_map(score, sde, res.z, sde.T, EPS, rtol=1e-7, atol=1e-7)
    assert nfe > 0
    assert (back - x).abs().max() < 1e-4
    z, _ = L._flow_map(score, sde, x, EPS, sde.T, rtol=1e-7, atol=1e-7)
    assert (z - res.z).abs().max() < 1e-4


@pytest.mark.parametrize("method,steps,tol", [("rk4", 100, 0.02), ("heun", 400, 0.03)])
def test_fixed_step_methods(method: str, steps: int, tol: float) -> None:
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    x = _points(mix, 16)
    score = mix.score_fn(sde)
    res = L.log_likelihood(score, sde, x, trace="exact", method=method, num_steps=steps)
    ref = L.log_likelihood(score, sde, x, trace="exact", rtol=1e-7, atol=1e-7)
    per_step = 4 if method == "rk4" else 2
    assert res.nfe == per_step * steps
    assert (res.logp - ref.logp).abs().max() < tol


def test_adaptive_solver_stays_inside_time_range() -> None:
    """The score is never called outside [eps, T] (the cosine schedule is undefined past T)."""
    sde = CosineVPSDE()
    mix = benchmark_mixture_2d()
    score = mix.score_fn(sde)
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.detach().clone())
        return score(x, t)

    res = L.log_likelihood(recording, sde, _points(mix, 8), trace="exact", rtol=1e-3, atol=1e-3)
    ts = torch.cat(seen)
    assert ts.min() >= EPS - 1e-15 and ts.max() <= sde.T + 1e-15
    assert len(seen) == res.nfe and torch.isfinite(res.logp).all()


def test_float32_and_tolerance_convergence() -> None:
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    x = _points(mix, 16)
    score = mix.score_fn(sde)
    exact = mix.log_prob_fn(sde)(x, EPS)
    r32 = L.log_likelihood(score, sde, x.float(), trace="exact", rtol=1e-4, atol=1e-4)
    assert r32.logp.dtype == torch.float32 and r32.z.dtype == torch.float32
    assert (r32.logp.double() - exact).abs().max() < 0.05
    errs, nfes = [], []
    for tol in (1e-3, 1e-5):
        r = L.log_likelihood(score, sde, x, trace="exact", rtol=tol, atol=tol)
        errs.append((r.delta_logp + mix.log_prob_fn(sde)(r.z, 1.0) - exact).abs().max())
        nfes.append(r.nfe)
    assert nfes[1] > nfes[0] and errs[1] < errs[0] and errs[1] < 1e-3


@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_no_graph_and_no_parameter_grads(context: str) -> None:
    torch.manual_seed(0)
    sde = VPSDE()
    model = ScoreModel(MLPScoreNet(dim=2), sde).double()
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    ctx = {
        "grad": torch.enable_grad(),
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
    }[context]
    with ctx:
        res = L.log_likelihood(
            model, sde, x, trace="exact", method="rk4", num_steps=3, generator=None
        )
        hut = L.log_likelihood(model, sde, x, method="euler", num_steps=3)
    for r in (res, hut):
        assert not r.logp.requires_grad and not r.z.requires_grad
        assert torch.isfinite(r.logp).all()
    assert all(p.grad is None for p in model.parameters())


def test_score_independent_of_x_and_progress_bar() -> None:
    """A score that ignores x (the score of N(0, I) at every t is -x; here 0) has zero
    divergence; the progress bar does not change results."""
    sde = VESDE()
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))

    def zero_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    res = L.log_likelihood(zero_score, sde, x, trace="exact", progress=True)
    assert torch.allclose(res.z, x) and torch.allclose(res.delta_logp, torch.zeros(3, dtype=F64))
    assert torch.allclose(res.logp, sde.prior_logp(x))


def test_argument_validation() -> None:
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    score = mix.score_fn(sde)
    x = _points(mix, 2)
    bad = [
        ({"trace": "diag"}, ValueError, "trace"),
        ({"probe": "uniform"}, ValueError, "probe"),
        ({"num_probes": 0}, ValueError, "num_probes"),
        ({"num_probes": 1.5}, TypeError, "num_probes"),
        ({"method": "rk45"}, ValueError, "method"),
        ({"method": "rk4"}, ValueError, "num_steps"),
        ({"method": "dopri5", "num_steps": 10}, ValueError, "num_steps"),
        ({"method": "rk4", "num_steps": 0}, ValueError, "num_steps"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": 1.0}, ValueError, "eps"),
        ({"rtol": -1e-3}, ValueError, "rtol"),
        ({"atol": float("nan")}, ValueError, "atol"),
        ({"generator": 3}, TypeError, "generator"),
        ({"time_variable": "lambda"}, ValueError, "time_variable"),
    ]
    for kwargs, err, word in bad:
        with pytest.raises(err, match=word):
            L.log_likelihood(score, sde, x, **kwargs)
    with pytest.raises(ValueError, match="x"):
        L.log_likelihood(score, sde, x[0])
    with pytest.raises(TypeError, match="score_fn"):
        L.log_likelihood("score", sde, x)
    with pytest.raises(TypeError, match="sde"):
        L.log_likelihood(score, "vp", x)


# --- bits per dimension ------------------------------------------------------------------------


def test_dequantization_offsets_follow_both_conventions() -> None:
    # Song et al. / RealNVP: (k + u) / 256 in [0, 1] -> +8 bits; rescaled to [-1, 1] -> +7.
    assert L.dequantization_offset(256, (0.0, 1.0), "bins") == pytest.approx(8.0)
    assert L.dequantization_offset(256, (-1.0, 1.0), "bins") == pytest.approx(7.0)
    # Levels k / 255 (what image tensors hold): bin width 1/255 or 2/255.
    assert L.dequantization_offset(256, (0.0, 1.0)) == pytest.approx(math.log2(255))
    assert L.dequantization_offset(256, (-1.0, 1.0)) == pytest.approx(math.log2(127.5))
    # scikit-learn digits: 17 levels 0..16 scaled to [-1, 1], bin width 1/8.
    assert L.dequantization_offset(17, (-1.0, 1.0)) == pytest.approx(3.0)
    logp = torch.tensor([-10.0, 5.0], dtype=F64)
    x = torch.zeros(2, 1, 2, 2, dtype=F64)
    bpd = L.bits_per_dim(logp, x, num_bins=17)
    assert torch.allclose(bpd, -logp / (4 * math.log(2)) + 3.0)


def test_bits_per_dim_matches_exact_bin_probabilities() -> None:
    """For a smooth density, P(bin) ~= p(x) Delta^D: compare with the exact Gaussian bin mass."""
    std = 0.3
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), std)
    levels = torch.linspace(-1, 1, 256, dtype=F64)[64:192:7]  # interior levels
    x = torch.stack([levels, levels.flip(0)], dim=1)  # [B, 2]
    width = 2 / 255
    mass = normal.cdf(x + width / 2) - normal.cdf(x - width / 2)
    exact_bpd = -mass.log().sum(1) / (2 * math.log(2))
    logp = normal.log_prob(x).sum(1)
    bpd = L.bits_per_dim(logp, x, num_bins=256, data_range=(-1.0, 1.0))
    assert torch.allclose(bpd, exact_bpd, atol=1e-4)


def test_bits_per_dim_validation() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_bins"):
        L.bits_per_dim(torch.zeros(2), x, num_bins=1)
    with pytest.raises(ValueError, match="data_range"):
        L.bits_per_dim(torch.zeros(2), x, data_range=(1.0, -1.0))
    with pytest.raises(TypeError, match="data_range"):
        L.bits_per_dim(torch.zeros(2), x, data_range=1.0)
    with pytest.raises(ValueError, match="logp"):
        L.bits_per_dim(torch.zeros(3), x)
    with pytest.raises(ValueError, match="convention"):
        L.bits_per_dim(torch.zeros(2), x, convention="centers")


# --- DDPM's variational bound ------------------------------------------------------------------


def test_chain_time_mapping() -> None:
    """The times fed to the score reproduce the chain's alphas_cumprod exactly."""
    cos = CosineVPSDE()
    t, k = L._chain_times(cos, cos.alphas_cumprod)
    grid = torch.arange(1, cos.N + 1, dtype=F64) / cos.N
    assert torch.allclose(t, grid, atol=1e-9) and torch.allclose(k, torch.ones_like(k))
    vp = VPSDE()
    abar = vp.alphas_cumprod
    t, k = L._chain_times(vp, abar)
    inner = t < vp.T
    assert inner.sum() >= vp.N - 5  # only the last few steps (SNR ~ 4e-5) are clamped
    assert torch.allclose(vp.alpha(t[inner]) ** 2, abar[inner], rtol=1e-10)
    i = torch.arange(vp.N, dtype=F64)
    for guess in ((i + 1) / vp.N, i / (vp.N - 1)):
        # Neither textbook mapping matches DDPM's linear chain to better than a few percent.
        assert (vp.alpha(guess) ** 2 / abar - 1).abs().max() > 0.01
    sub = SubVPSDE()
    t, k = L._chain_times(sub, sub.alphas_cumprod)
    snr_sub = sub.alpha(t) ** 2 / sub.sigma(t) ** 2
    snr_chain = sub.alphas_cumprod / (1 - sub.alphas_cumprod)
    assert torch.allclose(snr_sub[:-10], snr_chain[:-10], rtol=1e-8)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_vlb_matches_explicit_formulas(variance: str) -> None:
    """A short chain (N=40) written out with Gaussian KLs and posterior means, same noise."""
    sde = VPSDE(N=40)
    mix = benchmark_mixture_2d()
    score = mix.score_fn(sde)
    x0 = _points(mix, 5)
    B, D = x0.shape
    got, terms = L.ddpm_vlb(
        score,
        sde,
        x0,
        generator=torch.Generator().manual_seed(3),
        variance=variance,
        t_batch=7,
        return_terms=True,
    )
    gen = torch.Generator().manual_seed(3)
    betas, abar = sde.discrete_betas, sde.alphas_cumprod
    alphas = 1 - betas
    t_chain = sde.t_from_log_snr(torch.log(abar / (1 - abar))).clamp(max=1.0)
    total = torch.zeros(B, dtype=F64)
    for i in range(sde.N):
        noise = torch.randn(x0.shape, generator=gen, dtype=F64)
        xi = abar[i].sqrt() * x0 + (1 - abar[i]).sqrt() * noise
        k = sde.alpha(t_chain[i]) / abar[i].sqrt()
        eps = -(1 - abar[i]).sqrt() * k * score(k * xi, t_chain[i])
        mean = (xi - betas[i] / (1 - abar[i]).sqrt() * eps) / alphas[i].sqrt()
        if i == 0:
            dec = torch.distributions.Normal(mean, betas[0].sqrt())
            nll0 = -dec.log_prob(x0).sum(1)
            assert torch.allclose(terms["decoder"], nll0, atol=1e-10)
            total += nll0
            continue
        post_mean = (
            abar[i - 1].sqrt() * betas[i] / (1 - abar[i]) * x0
            + alphas[i].sqrt() * (1 - abar[i - 1]) / (1 - abar[i]) * xi
        )
        post_var = betas[i] * (1 - abar[i - 1]) / (1 - abar[i])
        var = betas[i] if variance == "beta" else post_var
        kl = 0.5 * (
            post_var / var - 1 + torch.log(var / post_var) + (post_mean - mean) ** 2 / var
        ).sum(1)
        total += kl
    prior_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(abar[-1].sqrt() * x0, (1 - abar[-1]).sqrt()),
        torch.distributions.Normal(torch.zeros_like(x0), 1.0),
    ).sum(1)
    total += prior_kl
    assert torch.allclose(terms["prior"], prior_kl, atol=1e-10)
    assert torch.allclose(got, total, rtol=1e-9, atol=1e-9)
    assert torch.allclose(got, terms["prior"] + terms["diffusion"] + terms["decoder"])


def test_vlb_bounds_the_exact_nll_closely() -> None:
    """E[bound] >= E[-log p] (cross-entropy >= entropy), and with the exact score the gap of
    the 1000-step DDPM chain is small."""
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    x = _points(mix, 400, seed=7)
    score = mix.score_fn(sde)
    nll = -mix.log_prob(x)
    gen = torch.Generator().manual_seed(0)
    bound = torch.stack([L.ddpm_vlb(score, sde, x, generator=gen) for _ in range(3)]).mean(0)
    gap = bound - nll
    stderr = gap.std() / math.sqrt(gap.numel())
    assert gap.mean() > -3 * stderr, (gap.mean(), stderr)
    assert gap.mean() < 0.1, gap.mean()
    # DDPM's "fixed small" variance gives a much looser bound on this data (early steps).
    small = L.ddpm_vlb(score, sde, x, generator=gen, variance="beta_tilde")
    assert (small - nll).mean() > gap.mean() + 0.3


def test_vlb_chunking_and_sampled_estimate() -> None:
    sde = CosineVPSDE(N=200)
    mix = benchmark_mixture_2d()
    x = _points(mix, 64)
    score = mix.score_fn(sde)
    a = L.ddpm_vlb(score, sde, x, generator=torch.Generator().manual_seed(1))
    b = L.ddpm_vlb(score, sde, x, generator=torch.Generator().manual_seed(1), t_batch=7)
    assert torch.allclose(a, b, atol=1e-10)
    full = torch.stack(
        [L.ddpm_vlb(score, sde, x, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    )
    gen = torch.Generator().manual_seed(9)
    sampled = torch.stack(
        [L.ddpm_vlb(score, sde, x, generator=gen, num_samples=20) for _ in range(8)]
    )
    diff = sampled.mean() - full.mean()
    stderr = math.sqrt(sampled.var() / sampled.numel() + full.var() / full.numel())
    assert diff.abs() < 3 * stderr, (diff, stderr)


def test_discretized_decoder_is_a_distribution() -> None:
    """Ho et al.'s decoder: probabilities over all levels sum to one, tails stay finite."""
    levels = torch.linspace(-1, 1, 17, dtype=F64)[:, None]  # every level, one dim
    for mean, std in ((0.1, 0.05), (0.99, 0.01), (-3.0, 0.2), (0.5, 1e-3)):
        nll = L._discretized_gaussian_nll(
            levels, torch.full_like(levels, mean), std, -1.0, 1.0, 2 / 16
        )
        assert torch.isfinite(nll).all()
        assert torch.exp(-nll).sum() == pytest.approx(1.0, abs=1e-9)
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    grid = torch.round((_points(mix, 32).clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    vlb = L.ddpm_vlb(
        mix.score_fn(sde),
        sde,
        grid,
        generator=torch.Generator().manual_seed(0),
        decoder="discretized",
    )
    assert torch.isfinite(vlb).all() and (vlb > 0).all()  # -log of a probability mass


def test_vlb_validation() -> None:
    mix = benchmark_mixture_2d()
    x = _points(mix, 2)
    ve = VESDE()
    with pytest.raises(TypeError, match="VESDE"):
        L.ddpm_vlb(mix.score_fn(ve), ve, x)
    vp = VPSDE()
    score = mix.score_fn(vp)
    with pytest.raises(ValueError, match="decoder"):
        L.ddpm_vlb(score, vp, x, decoder="logistic")
    with pytest.raises(ValueError, match="variance"):
        L.ddpm_vlb(score, vp, x, variance="learned")
    with pytest.raises(ValueError, match="t_batch"):
        L.ddpm_vlb(score, vp, x, t_batch=0)
    with pytest.raises(ValueError, match="num_samples"):
        L.ddpm_vlb(score, vp, x, num_samples=0)
    with pytest.raises(ValueError, match="num_bins"):
        L.ddpm_vlb(score, vp, x, decoder="discretized", num_bins=1)


# --- data sets ---------------------------------------------------------------------------------


def test_dataset_log_likelihood() -> None:
    sde = VPSDE()
    mix = benchmark_mixture_2d()
    data = _points(mix, 10)
    score = mix.score_fn(sde)
    kw = {"trace": "exact", "method": "rk4", "num_steps": 20}
    out = L.dataset_log_likelihood(score, sde, data, batch_size=4, progress=False, **kw)
    ref = torch.cat([L.log_likelihood(score, sde, xb, **kw).logp for xb in data.split(4)])
    assert torch.allclose(out.logp, ref)
    assert out.mean_logp == pytest.approx(float(ref.mean()))
    assert out.stderr_logp == pytest.approx(float(ref.std() / math.sqrt(10)))
    assert out.nfe == 3 * 80
    digits = L.dataset_log_likelihood(
        score, sde, data, batch_size=10, num_bins=17, progress=True, **kw
    )
    assert torch.allclose(digits.bpd, -ref / (2 * math.log(2)) + 3.0)


def test_nan_data_is_named_as_the_argument() -> None:
    """A NaN in the user's points is a ValueError naming x / data, before any solve (it used
    to surface as a non-finite probability-flow field, blaming the score)."""
    from scoresde.bpd import bits_per_dim
    from scoresde.vlb import ddpm_vlb

    sde, gm = VPSDE(), benchmark_mixture_2d()
    x = torch.zeros(4, 2, dtype=torch.float64)
    x[1, 0] = torch.nan
    with pytest.raises(ValueError, match=r"x must be finite.*row 1"):
        L.log_likelihood(gm.score_fn(sde), sde, x)
    with pytest.raises(ValueError, match=r"data must be finite.*row 1"):
        L.dataset_log_likelihood(gm.score_fn(sde), sde, x)
    with pytest.raises(ValueError, match=r"x must be finite.*row 1"):
        bits_per_dim(torch.zeros(4, dtype=torch.float64), x)
    with pytest.raises(ValueError, match=r"x must be finite.*row 1"):
        ddpm_vlb(gm.score_fn(sde), sde, x)
