"""DSMLoss / DDPMLoss against closed forms: the exact mixture score minimises DSM, the
importance-sampled likelihood loss has the same expectation, DDPM's chain maps onto the
continuous kernel, and the two losses agree on identical draws."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import VESDE, VPSDE, CosineVPSDE, DDPMLoss, DSMLoss, MLPScoreNet, ScoreModel, SubVPSDE
from scoresde._validation import expand_like, unchecked_times
from scoresde.losses import LossNoise, ddpm_timesteps, noise_prediction
from scoresde.toy import benchmark_mixture_2d

SDES = {
    "vp": VPSDE(),
    "subvp": SubVPSDE(),
    "ve": VESDE(sigma_min=0.01, sigma_max=5.0),
    "cosine": CosineVPSDE(),
}
F64 = torch.float64


def _random_model(sde, parameterization: str, dim: int = 2, seed: int = 0) -> ScoreModel:
    """A ScoreModel with a non-zero (randomised) output layer, in float64."""
    torch.manual_seed(seed)
    net = MLPScoreNet(dim, hidden=32, num_blocks=2, embed_dim=16).double()
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return ScoreModel(net, sde, parameterization)


@pytest.mark.parametrize("weighting", ["sigma2", "likelihood", "none"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_dsm_is_minimised_by_the_true_score(sde_name: str, weighting: str) -> None:
    """d/dc E[loss(c s*)] = 2 E[lambda <c s* - target, s*>] / D vanishes at c = 1.

    Per-sample derivatives come from autograd with one scale c_b per sample; their mean is
    compared with its standard error. At c = 0.7 the same estimate must be clearly negative
    (sigma2 and likelihood weighting), so the test can tell the minimiser from a wrong scale.
    """
    sde = SDES[sde_name]
    mix = benchmark_mixture_2d()
    score = mix.score_fn(sde)
    loss = DSMLoss(sde, weighting=weighting)
    g = torch.Generator().manual_seed(1)
    n = 40_000
    x0 = mix.sample(n, generator=g, dtype=F64)
    noise = loss.sample_noise(x0, g)

    def derivative(scale: float) -> tuple[float, float]:
        c = torch.full((n,), scale, dtype=F64, requires_grad=True)
        per = loss.per_sample(lambda x, t: c[:, None] * score(x, t), x0, noise)
        (d,) = torch.autograd.grad(per.sum(), c)
        return d.mean().item(), d.std().item() / math.sqrt(n)

    mean, se = derivative(1.0)
    assert abs(mean) < 4 * se, (mean, se)
    if weighting != "none":
        # With lambda = 1 the per-sample terms scale like 1/sigma^2 (infinite variance as
        # eps -> 0), so only the well-conditioned weightings can show the test's power.
        mean_wrong, se_wrong = derivative(0.7)
        assert mean_wrong < -4 * se_wrong, (mean_wrong, se_wrong)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_dsm_per_sample_matches_the_defining_formula(sde_name: str) -> None:
    """lambda(t) || s(x_t, t) + z / sigma(t) ||^2, averaged over dims, for each weighting."""
    sde = SDES[sde_name]
    mix = benchmark_mixture_2d()
    score = mix.score_fn(sde)
    g = torch.Generator().manual_seed(2)
    x0 = mix.sample(64, generator=g, dtype=F64)
    t = torch.rand(64, generator=g, dtype=F64) * 0.99 + 0.01
    z = torch.randn(64, 2, generator=g, dtype=F64)
    xt = expand_like(sde.alpha(t), x0) * x0 + expand_like(sde.sigma(t), x0) * z
    sq = (score(xt, t) + z / sde.sigma(t)[:, None]).pow(2).mean(1)
    lambdas = {"sigma2": sde.sigma(t) ** 2, "likelihood": sde.diffusion_coef(t) ** 2, "none": 1.0}
    for weighting, lam in lambdas.items():
        got = DSMLoss(sde, weighting=weighting).per_sample(score, x0, LossNoise(t=t, z=z))
        torch.testing.assert_close(got, lam * sq, rtol=1e-10, atol=1e-12)
    summed = DSMLoss(sde, reduce_mean=False).per_sample(score, x0, LossNoise(t=t, z=z))
    torch.testing.assert_close(summed, 2 * sde.sigma(t) ** 2 * sq, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("parameterization", ["eps", "score", "x0", "v"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_stable_eps_form_equals_the_score_form(sde_name: str, parameterization: str) -> None:
    """The direct conversion of a ScoreModel's output equals -sigma * model(x, t)."""
    sde = SDES[sde_name]
    model = _random_model(sde, parameterization)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 2, generator=g, dtype=F64)
    t = torch.rand(32, generator=g, dtype=F64) * 0.999 + 1e-3
    direct = noise_prediction(model, sde, x, t)
    via_score = noise_prediction(lambda x_, t_: model(x_, t_), sde, x, t)
    torch.testing.assert_close(direct, via_score, rtol=1e-9, atol=1e-10)
    if parameterization == "eps":  # no division by sigma at all
        assert torch.equal(direct, model.network_output(x, t))


def test_eps_model_loss_and_gradients_stay_finite_near_t0() -> None:
    """At t = eps = 1e-5 (sigma ~ 1e-3 for VP) the sigma2 loss of an eps-model is O(1)."""
    sde = VPSDE()
    model = _random_model(sde, "eps").float()
    x0 = torch.randn(16, 2)
    noise = LossNoise(t=torch.full((16,), 1e-5), z=torch.randn(16, 2))
    loss = DSMLoss(sde).per_sample(model, x0, noise).mean()
    loss.backward()
    assert torch.isfinite(loss) and loss < 10
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_importance_sampling_keeps_the_expectation_and_has_uniform_log_snr() -> None:
    sde = VPSDE()
    plain = DSMLoss(sde, weighting="likelihood")
    weighted = DSMLoss(sde, weighting="likelihood", importance_sampling=True)
    # Zero score: per-sample loss = lambda(t)/sigma^2 * mean(z^2), whose expectation is
    # E_t[g^2 / sigma^2] = (log-SNR(eps) - log-SNR(T)) / (T - eps) exactly.
    lam_eps, lam_T = sde.log_snr(torch.tensor([1e-5, 1.0], dtype=F64)).tolist()
    exact = (lam_eps - lam_T) / (1 - 1e-5)
    x0 = torch.zeros(200_000, 2, dtype=F64)

    def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(4)
    noise = weighted.sample_noise(x0, g)
    per = weighted.per_sample(zero, x0, noise)
    assert abs(per.mean().item() - exact) < 4 * per.std().item() / math.sqrt(x0.shape[0])
    # Under the importance distribution the log-SNR of t is uniform on [lam_T, lam_eps].
    u = (sde.log_snr(noise.t) - lam_T) / (lam_eps - lam_T)
    grid = torch.linspace(0, 1, 11, dtype=F64)
    ecdf = (u[:, None] <= grid[None]).double().mean(0)
    assert (ecdf - grid).abs().max() < 0.01
    # For a non-optimal score the importance-sampled estimate matches a quadrature over t
    # of the conditional expectation E[loss | t] (the plain estimate is heavy-tailed: its
    # terms grow like 1/t as t -> eps, so it is compared by its spread only).
    mix = benchmark_mixture_2d()
    score = mix.score_fn(sde)

    def wrong(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.8 * score(x, t)

    grid_t = torch.logspace(-5, 0, 120, dtype=F64)
    cond = []
    for tk in grid_t:
        x0 = mix.sample(2000, generator=g, dtype=F64)
        z = torch.randn(2000, 2, generator=g, dtype=F64)
        t_k = torch.full((2000,), float(tk), dtype=F64)
        cond.append(plain.per_sample(wrong, x0, LossNoise(t=t_k, z=z)).mean())
    quadrature = torch.trapezoid(torch.stack(cond), grid_t).item() / (1 - 1e-5)
    x0 = mix.sample(100_000, generator=g, dtype=F64)
    a = plain.per_sample(wrong, x0, plain.sample_noise(x0, g))
    b = weighted.per_sample(wrong, x0, weighted.sample_noise(x0, g))
    assert abs(b.mean().item() - quadrature) < 0.03 * quadrature, (b.mean(), quadrature)
    assert b.std() < a.std() / 5  # and it is the low-variance one


@pytest.mark.parametrize("sde", [VPSDE(), CosineVPSDE()], ids=["vp", "cosine"])
def test_ddpm_time_mapping_reproduces_the_discrete_kernel(sde) -> None:
    """alpha(t_i)^2 = abar_i to float64 precision; the naive mappings are worse."""
    abar = sde.alphas_cumprod
    N = sde.N
    i = torch.arange(N, dtype=F64)
    t = ddpm_timesteps(sde)
    with unchecked_times():  # VP's t_999 = 1.0034 > T: the schedule's continuation
        torch.testing.assert_close(sde.alpha(t) ** 2, abar, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sde.sigma(t), (1 - abar).sqrt(), rtol=1e-10, atol=0)
        assert (t - (i + 1) / N).abs().max() < 0.004  # close to the (i+1)/N convention

        def std_error(tt: torch.Tensor) -> float:
            return ((sde.sigma(tt) / (1 - abar).sqrt()) - 1).abs().max().item()

        if isinstance(sde, CosineVPSDE):  # its chain is built on the (i+1)/N grid
            torch.testing.assert_close(t, (i + 1) / N, rtol=0, atol=1e-12)
        else:  # measured: (i+1)/N misses sigma of step 0 by 4.9 %, i/(N-1) by 100 %
            assert 0.04 < std_error((i + 1) / N) < 0.06
            assert std_error(i / (N - 1)) > 0.99
            assert std_error(t) < 1e-10


@pytest.mark.parametrize("sde", [VPSDE(), CosineVPSDE()], ids=["vp", "cosine"])
def test_ddpm_loss_equals_dsm_at_the_mapped_times(sde) -> None:
    """Same (x0, i, z): DDPM's ||eps_hat - z||^2 = DSM sigma2 = sigma(t_i)^2 * DSM none."""
    mix = benchmark_mixture_2d()
    g = torch.Generator().manual_seed(5)
    x0 = mix.sample(256, generator=g, dtype=F64)
    ddpm = DDPMLoss(sde)
    noise = ddpm.sample_noise(x0, g)
    with unchecked_times():  # VP's DDPM times reach t_999 = 1.0034 > T
        abar = sde.alphas_cumprod[noise.step]
        # Explicit L_simple with an eps model.
        model = _random_model(sde, "eps")
        x_i = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * noise.z
        eps_hat = model.network_output(x_i, noise.t)
        explicit = (eps_hat - noise.z).pow(2).mean(1)
        torch.testing.assert_close(
            ddpm.per_sample(model, x0, noise), explicit, rtol=1e-9, atol=1e-12
        )
        dsm_noise = LossNoise(t=noise.t, z=noise.z)
        for fn in (model, mix.score_fn(sde)):
            d = ddpm.per_sample(fn, x0, noise)
            s2 = DSMLoss(sde, weighting="sigma2").per_sample(fn, x0, dsm_noise)
            none = DSMLoss(sde, weighting="none").per_sample(fn, x0, dsm_noise)
            torch.testing.assert_close(d, s2, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(d, sde.sigma(noise.t) ** 2 * none, rtol=1e-8, atol=1e-12)


def test_ddpm_loss_rejects_non_vp_sdes() -> None:
    with pytest.raises(TypeError, match="VPSDE or CosineVPSDE"):
        DDPMLoss(VESDE())
    with pytest.raises(TypeError, match="SubVPSDE"):
        DDPMLoss(SubVPSDE())


def test_ddpm_steps_are_uniform_and_loss_is_reproducible() -> None:
    sde = VPSDE()
    loss = DDPMLoss(sde)
    x0 = torch.zeros(50_000, 2)
    steps = loss.sample_noise(x0, torch.Generator().manual_seed(0)).step
    assert steps.min() == 0 and steps.max() == sde.N - 1
    assert abs(steps.double().mean().item() - (sde.N - 1) / 2) < 5
    model = _random_model(sde, "eps")
    x = torch.randn(8, 2, dtype=F64)
    a = loss(model, x, generator=torch.Generator().manual_seed(7))
    b = loss(model, x, generator=torch.Generator().manual_seed(7))
    assert a.ndim == 0 and torch.equal(a, b)


def test_dsm_argument_errors() -> None:
    sde = VPSDE()
    with pytest.raises(ValueError, match="weighting"):
        DSMLoss(sde, weighting="sigma")
    with pytest.raises(ValueError, match="importance_sampling"):
        DSMLoss(sde, weighting="sigma2", importance_sampling=True)
    with pytest.raises(ValueError, match="eps"):
        DSMLoss(sde, eps=1.5)
    with pytest.raises(TypeError, match="sde"):
        DSMLoss("vp")
    with pytest.raises(ValueError, match="label_dropout"):
        DSMLoss(sde, label_dropout=1.0)
    loss = DSMLoss(sde)
    with pytest.raises(ValueError, match="x0"):
        loss(lambda x, t: x, torch.zeros(4))
    with pytest.raises(ValueError, match="y must be"):
        loss(lambda x, t, y=None: x, torch.zeros(4, 2), y=torch.zeros(3, dtype=torch.long))


def test_dsm_reduce_sum_and_shapes_for_images() -> None:
    sde = VPSDE()
    x0 = torch.randn(4, 3, 5, 5, dtype=F64)

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x

    g1, g2 = (torch.Generator().manual_seed(9) for _ in range(2))
    mean = DSMLoss(sde)(score, x0, generator=g1)
    total = DSMLoss(sde, reduce_mean=False)(score, x0, generator=g2)
    torch.testing.assert_close(total, 75 * mean)


def test_label_dropout_replaces_labels_by_the_null_class() -> None:
    sde = VPSDE()
    net = MLPScoreNet(2, hidden=16, num_blocks=1, embed_dim=8, num_classes=3)
    model = ScoreModel(net, sde)
    seen: list[torch.Tensor] = []
    net.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
    y = torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(0))
    DSMLoss(sde, label_dropout=0.25)(model, torch.randn(4000, 2), torch.Generator(), y=y)
    dropped = seen[0] == 3
    assert abs(dropped.double().mean().item() - 0.25) < 0.03
    assert torch.equal(seen[0][~dropped], y[~dropped])
    with pytest.raises(ValueError, match="num_classes"):
        DSMLoss(sde, label_dropout=0.1)(
            lambda x, t, y: x, torch.randn(4, 2), y=torch.zeros(4).long()
        )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_losses_refuse_non_finite_data_naming_the_rows(bad: float) -> None:
    """Data with NaN/Inf used to give a NaN loss without a word."""
    sde = VPSDE()
    x0 = torch.randn(10, 3, 2, dtype=F64)
    x0[7, 1, 0] = bad
    x0[2, 0, 1] = bad
    model = _random_model(sde, "eps", dim=6)
    for loss in (DSMLoss(sde), DDPMLoss(sde), DSMLoss(sde, check_finite=True)):
        with pytest.raises(ValueError, match=r"x0 must be finite.*2 of its 10 rows.*rows 2, 7"):
            loss(model, x0, generator=torch.Generator().manual_seed(0))
    # Finite data is untouched; check_finite=False skips the check (and gives the NaN).
    good = DSMLoss(sde)(model, torch.nan_to_num(x0, posinf=0.0, neginf=0.0))
    assert torch.isfinite(good)
    assert torch.isnan(DSMLoss(sde, check_finite=False)(model, x0))
    with pytest.raises(TypeError, match="check_finite"):
        DSMLoss(sde, check_finite="yes")
