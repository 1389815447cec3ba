"""Tests of scoresde.toy: exact Gaussian-mixture marginals and scores, named data sets."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import VESDE, VPSDE, CosineVPSDE, SubVPSDE
from scoresde.toy import (
    DATASETS,
    GaussianMixture,
    benchmark_mixture_2d,
    eight_gaussians,
    make_dataset,
    random_mixture,
)

F64 = torch.float64
SDES = {
    "vp": VPSDE(),
    "subvp": SubVPSDE(),
    "ve": VESDE(),
    "cosine": CosineVPSDE(),
    "vp_custom": VPSDE(beta_min=0.5, beta_max=8.0),
    "ve_custom": VESDE(sigma_min=0.05, sigma_max=5.0),
}


def reference_log_prob(gm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """log p(x) from torch.distributions (independent of GaussianMixture's algebra)."""
    mix = torch.distributions.Categorical(probs=gm.weights)
    comp = torch.distributions.MultivariateNormal(gm.means, covariance_matrix=gm.covs)
    return torch.distributions.MixtureSameFamily(mix, comp).log_prob(x)


def autograd_score(log_prob, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob(x).sum(), x)
    return grad


def mixtures():
    """(name, mixture, per-sample shape): 2-D and [3, 2, 2] images (D = 12)."""
    return [
        ("bench2d", benchmark_mixture_2d(), (2,)),
        ("8gauss", eight_gaussians(), (2,)),
        ("rand12_image", random_mixture(12, 3, seed=1), (3, 2, 2)),
    ]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("mix_name", ["bench2d", "8gauss", "rand12_image"])
def test_score_is_gradient_of_log_prob(sde_name, mix_name):
    """score_fn(sde) == grad_x log p_t at per-sample t; == grad of marginal(sde, t).log_prob
    at scalar t; marginal's log_prob == log_prob_fn(sde) == torch.distributions."""
    sde = SDES[sde_name]
    _, gm, per_sample = next(m for m in mixtures() if m[0] == mix_name)
    gen = torch.Generator().manual_seed(0)
    B = 16
    t = torch.cat([torch.tensor([1e-3, 0.01, 0.5, 1.0]), torch.rand(B - 4, generator=gen)]).to(F64)
    x0 = gm.sample(B, generator=gen, dtype=F64)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    x = (a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=F64)).reshape(B, *per_sample)

    score = gm.score_fn(sde)(x, t)
    assert score.shape == x.shape and score.dtype == F64
    log_prob = gm.log_prob_fn(sde)
    expected = autograd_score(lambda y: log_prob(y, t), x)
    torch.testing.assert_close(score, expected, rtol=1e-11, atol=1e-11)

    for k in [0, 2, 3]:  # scalar t: the marginal mixture, checked against torch.distributions
        marg = gm.marginal(sde, float(t[k]))
        xk = x.reshape(B, -1)
        lp = marg.log_prob(xk)
        torch.testing.assert_close(lp, log_prob(x, float(t[k])), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lp, reference_log_prob(marg, xk), rtol=1e-10, atol=1e-10)
        grad = autograd_score(marg.log_prob, xk)
        torch.testing.assert_close(gm.score_fn(sde)(x, float(t[k])).reshape(B, -1), grad)
        torch.testing.assert_close(marg.score(xk), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sde_name", ["vp", "ve", "cosine"])
def test_marginal_moments(sde_name):
    """p_t has mean alpha m and covariance alpha^2 C + sigma^2 I."""
    sde = SDES[sde_name]
    gm = benchmark_mixture_2d()
    t = 0.3
    marg = gm.marginal(sde, t)
    a = float(sde.alpha(torch.tensor(t, dtype=F64)))
    s = float(sde.sigma(torch.tensor(t, dtype=F64)))
    torch.testing.assert_close(marg.mean(), a * gm.mean())
    torch.testing.assert_close(
        marg.covariance(), a**2 * gm.covariance() + s**2 * torch.eye(2, dtype=F64)
    )
    torch.testing.assert_close(marg.weights, gm.weights)


def test_eps_fn_is_minus_sigma_score():
    gm = benchmark_mixture_2d()
    sde = SDES["vp"]
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    eps = gm.eps_fn(sde)(x, t)
    torch.testing.assert_close(
        eps, -sde.sigma(t)[:, None] * gm.score_fn(sde)(x, t), rtol=1e-15, atol=0
    )


def test_log_prob_and_responsibilities_closed_form():
    gm = benchmark_mixture_2d()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * 2
    torch.testing.assert_close(gm.log_prob(x), reference_log_prob(gm, x), rtol=1e-12, atol=1e-12)
    comp = torch.distributions.MultivariateNormal(gm.means, covariance_matrix=gm.covs)
    joint = gm.weights.log() + comp.log_prob(x[:, None, :])
    torch.testing.assert_close(
        gm.responsibilities(x), torch.softmax(joint, 1), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(gm.score(x), autograd_score(gm.log_prob, x), rtol=1e-10, atol=1e-10)


def test_sample_moments_and_reproducibility():
    gm = benchmark_mixture_2d()
    n = 200_000
    x, labels = gm.sample(
        n, generator=torch.Generator().manual_seed(0), dtype=F64, return_labels=True
    )
    assert x.shape == (n, 2) and x.dtype == F64 and labels.shape == (n,)
    cov = gm.covariance()
    # Mean: 5 standard errors; covariance entries: 3% of the scale.
    se = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - gm.mean()).abs() < 5 * se).all()
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.03 * float(cov.abs().max()))
    freq = torch.bincount(labels, minlength=3).to(F64) / n
    torch.testing.assert_close(freq, gm.weights, rtol=0, atol=0.005)
    # Each component's samples have that component's mean.
    for k in range(3):
        torch.testing.assert_close(x[labels == k].mean(0), gm.means[k], rtol=0, atol=0.01)
    again = gm.sample(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(x, again)
    other = gm.sample(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert not torch.equal(x, other)
    x32 = gm.sample(10, generator=torch.Generator().manual_seed(0))
    assert x32.dtype == torch.float32
    torch.testing.assert_close(
        x32, gm.sample(10, generator=torch.Generator().manual_seed(0), dtype=F64).float()
    )


def test_cov_forms_full_diag_isotropic_agree():
    w = [1.0, 3.0]
    means = [[0.0, 1.0, 2.0], [-1.0, 0.5, 0.0]]
    diag = torch.tensor([[0.5, 0.2, 1.0], [0.3, 0.3, 0.3]], dtype=F64)
    full = GaussianMixture(w, means, torch.diag_embed(diag))
    from_diag = GaussianMixture(w, means, diag)
    iso_full = GaussianMixture(
        w, means, torch.diag_embed(torch.tensor([[0.4] * 3, [0.3] * 3], dtype=F64))
    )
    iso = GaussianMixture(w, means, [0.4, 0.3])
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(full.log_prob(x), from_diag.log_prob(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(iso_full.log_prob(x), iso.log_prob(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(full.weights, torch.tensor([0.25, 0.75], dtype=F64))
    assert full.dim == 3 and full.num_components == 2
    sde = SDES["vp"]
    torch.testing.assert_close(full.score_fn(sde)(x, 0.4), from_diag.score_fn(sde)(x, 0.4))


@pytest.mark.parametrize("dim", [16, 64])
def test_random_mixture_high_dim(dim):
    gm = random_mixture(dim, 4, seed=3)
    assert gm.dim == dim and gm.num_components == 4
    assert torch.equal(gm.covs, gm.covs.transpose(-1, -2))
    assert (torch.linalg.eigvalsh(gm.covs) > 0).all()
    assert torch.equal(random_mixture(dim, 4, seed=3).means, gm.means)
    assert not torch.equal(random_mixture(dim, 4, seed=4).means, gm.means)
    sde = SDES["cosine"]
    gen = torch.Generator().manual_seed(0)
    x = gm.sample(8, generator=gen, dtype=F64)
    assert x.shape == (8, dim)
    t = torch.linspace(0.05, 0.95, 8, dtype=F64)
    xt = sde.alpha(t)[:, None] * x + sde.sigma(t)[:, None] * torch.randn(
        x.shape, generator=gen, dtype=F64
    )
    score = gm.score_fn(sde)(xt, t)
    expected = autograd_score(lambda y: gm.log_prob_fn(sde)(y, t), xt)
    torch.testing.assert_close(score, expected, rtol=1e-11, atol=1e-11)
    marg = gm.marginal(sde, 0.5)
    torch.testing.assert_close(
        marg.log_prob(xt), reference_log_prob(marg, xt), rtol=1e-10, atol=1e-9
    )


@pytest.mark.parametrize("sde_name", ["vp", "ve", "subvp", "cosine"])
def test_float32_and_float64(sde_name):
    sde = SDES[sde_name]
    gm = benchmark_mixture_2d()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.linspace(0.05, 1.0, 32, dtype=F64)
    s64 = gm.score_fn(sde)(x, t)
    s32 = gm.score_fn(sde)(x.float(), t.float())
    assert s32.dtype == torch.float32 and s64.dtype == F64
    torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=1e-4 * float(s64.abs().max()))
    lp32 = gm.log_prob_fn(sde)(x.float(), t.float())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), gm.log_prob_fn(sde)(x, t), rtol=1e-5, atol=1e-5)
    # t may be a float, a 0-d tensor or [B]; the answers agree.
    a = gm.score_fn(sde)(x, 0.5)
    b = gm.score_fn(sde)(x, torch.tensor(0.5))
    c = gm.score_fn(sde)(x, torch.full((32,), 0.5, dtype=F64))
    assert torch.equal(a, b) and torch.equal(a, c)


REQUIRED = ["8gaussians", "two_moons", "swiss_roll", "checkerboard", "digits"]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_named_datasets(name):
    n = 500
    x = make_dataset(name, n, generator=torch.Generator().manual_seed(0))
    shape = (n, 1, 8, 8) if name == "digits" else (n, 2)
    assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    again = make_dataset(name, n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    other = make_dataset(name, n, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x, other)
    x64 = make_dataset(name, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert x64.dtype == F64
    torch.testing.assert_close(x64.float(), x)
    assert x.reshape(n, -1).std(0).max() > 0.3  # not collapsed
    assert (x[1:] != x[:1]).any()
    if name == "digits":
        assert x.min() >= -1 and x.max() <= 1
        assert x.min() == -1 and x.max() == 1
        levels = (x64 + 1) / 2 * 16  # 17 grey levels
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-12)
    else:
        assert x.abs().max() < 10


def test_required_datasets_present():
    assert set(REQUIRED) <= set(DATASETS)


def test_eight_gaussians_geometry():
    gm = eight_gaussians(radius=2.0, std=0.1)
    torch.testing.assert_close(gm.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64))
    torch.testing.assert_close(gm.covs, 0.01 * torch.eye(2, dtype=F64).expand(8, 2, 2))
    torch.testing.assert_close(gm.weights, torch.full((8,), 1 / 8, dtype=F64))
    angles = torch.atan2(gm.means[:, 1], gm.means[:, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(8, dtype=F64) * math.pi / 4)


BAD = [
    (lambda: GaussianMixture([-1.0, 2.0], [[0.0], [1.0]], [1.0, 1.0]), ValueError, "weights"),
    (lambda: GaussianMixture([0.0, 0.0], [[0.0], [1.0]], [1.0, 1.0]), ValueError, "weights"),
    (lambda: GaussianMixture([[1.0]], [[0.0]], [1.0]), ValueError, "weights"),
    (lambda: GaussianMixture([float("nan")], [[0.0]], [1.0]), ValueError, "weights"),
    (lambda: GaussianMixture([1.0, 1.0], [[0.0, 1.0]], [1.0, 1.0]), ValueError, "means"),
    (lambda: GaussianMixture([1.0], [0.0, 1.0], [1.0]), ValueError, "means"),
    (lambda: GaussianMixture([1.0], [[float("nan"), 0.0]], [1.0]), ValueError, "means"),
    (lambda: GaussianMixture([1.0], [[0.0, 1.0]], [[1.0, 1.0, 1.0]]), ValueError, "covs"),
    (lambda: GaussianMixture([1.0], [[0.0, 1.0]], [[[1.0, 0.5], [0.0, 1.0]]]), ValueError, "covs"),
    (lambda: GaussianMixture([1.0], [[0.0, 1.0]], [[[1.0, 2.0], [2.0, 1.0]]]), ValueError, "covs"),
    (lambda: GaussianMixture([1.0], [[0.0, 1.0]], [0.0]), ValueError, "covs"),
    (lambda: GaussianMixture([1.0], [[0.0, 1.0]], [float("nan")]), ValueError, "covs"),
    (lambda: make_dataset("mnist", 10), ValueError, "name"),
    (lambda: make_dataset("two_moons", 0), ValueError, "n"),
    (lambda: make_dataset("two_moons", 10, dtype=torch.int64), TypeError, "dtype"),
    (lambda: benchmark_mixture_2d().sample(0), ValueError, "n"),
    (lambda: benchmark_mixture_2d().sample(2.5), TypeError, "n"),
    (lambda: benchmark_mixture_2d().log_prob(torch.zeros(4, 3)), ValueError, "x"),
    (lambda: benchmark_mixture_2d().log_prob(torch.zeros(4)), ValueError, "x"),
    (
        lambda: benchmark_mixture_2d().score_fn(VPSDE())(torch.zeros(4, 2), torch.zeros(3)),
        ValueError,
        "t",
    ),
    (lambda: benchmark_mixture_2d().score_fn("vp"), TypeError, "sde"),
    (lambda: benchmark_mixture_2d().marginal(None, 0.5), TypeError, "sde"),
    (lambda: random_mixture(0), ValueError, "dim"),
    (lambda: random_mixture(2, num_components=0), ValueError, "num_components"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_arguments(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


def test_score_follows_x_device():
    gm = benchmark_mixture_2d()
    x = torch.zeros(4, 2, device="meta", dtype=F64)
    for sde in SDES.values():
        for t in (0.5, torch.rand(4)):
            assert gm.score_fn(sde)(x, t).device.type == "meta"
            assert gm.log_prob_fn(sde)(x, t).device.type == "meta"
    assert gm.log_prob(x).device.type == "meta"


# --- conditional mixtures --------------------------------------------------------------------


def test_conditional_2d_against_numerical_integration():
    """p(x1 | x0 = v) of the benchmark mixture: weights, mean and std against a fine grid
    integral of the joint density; the issue's numbers (x0 = 1.5: mean 0.98, std 0.52)."""
    gm = benchmark_mixture_2d()
    for v in (-1.0, 0.3, 1.5):
        cond = gm.conditional([0], torch.tensor([v]))
        assert cond.dim == 1 and cond.num_components == 3
        grid = torch.linspace(-8, 8, 40001, dtype=F64)
        joint = gm.log_prob(torch.stack([torch.full_like(grid, v), grid], 1)).exp()
        dens = joint / torch.trapezoid(joint, grid)
        mean = torch.trapezoid(dens * grid, grid)
        var = torch.trapezoid(dens * (grid - mean) ** 2, grid)
        torch.testing.assert_close(cond.mean()[0], mean, rtol=0, atol=1e-8)
        torch.testing.assert_close(cond.covariance()[0, 0], var, rtol=1e-7, atol=0)
        torch.testing.assert_close(cond.log_prob(grid[:, None]).exp(), dens, rtol=1e-6, atol=1e-9)
    cond = gm.conditional([0], [1.5])
    assert abs(float(cond.mean()[0]) - 0.98) < 0.005
    assert abs(float(cond.covariance()[0, 0].sqrt()) - 0.52) < 0.005


def test_conditional_is_bayes_rule_in_high_dim_and_batches():
    """log p(x_U | x_M = y) + log p_M(y) = log p(x) for random points of a random 10-D mixture
    (half of the coordinates known, in a shuffled order); a batch of values gives the same
    mixtures as one call per row; the conditional's samples have its moments."""
    gm = random_mixture(10, 5, seed=7)
    g = torch.Generator().manual_seed(0)
    known = [7, 1, 4, 8, 2]
    unknown = [0, 3, 5, 6, 9]
    x = gm.sample(6, generator=g, dtype=F64)
    conds = gm.conditional(known, x[:, known])
    assert isinstance(conds, list) and len(conds) == 6
    marg = GaussianMixture(gm.weights, gm.means[:, known], gm.covs[:, known][:, :, known])
    for i, cond in enumerate(conds):
        pts = x[i : i + 1].repeat(20, 1)
        pts[:, unknown] += 0.5 * torch.randn(20, 5, generator=g, dtype=F64)
        lhs = cond.log_prob(pts[:, unknown]) + marg.log_prob(x[i : i + 1, known])
        torch.testing.assert_close(lhs, reference_log_prob(gm, pts), rtol=1e-9, atol=1e-9)
        one = gm.conditional(known, x[i, known])
        torch.testing.assert_close(one.weights, cond.weights)
        torch.testing.assert_close(one.means, cond.means)
    # The same mask as a bool tensor (values then in increasing index order).
    mask = torch.zeros(10, dtype=torch.bool)
    mask[known] = True
    by_mask = gm.conditional(mask, x[0, mask])
    torch.testing.assert_close(by_mask.means, conds[0].means)
    s = conds[0].sample(40000, generator=g, dtype=F64)
    torch.testing.assert_close(s.mean(0), conds[0].mean(), rtol=0, atol=0.02)


@pytest.mark.parametrize(
    "known, values, exc, match",
    [
        ([0, 0], [1.0, 1.0], ValueError, "distinct"),
        ([5], [1.0], ValueError, "distinct indices"),
        ([0, 1], [1.0, 1.0], ValueError, "between 1 and"),
        ([0], [1.0, 2.0], ValueError, "values must have shape"),
        ([0.5], [1.0], TypeError, "known_index"),
        ([0], [float("nan")], ValueError, "finite"),
    ],
)
def test_conditional_bad_arguments(known, values, exc, match):
    with pytest.raises(exc, match=match):
        benchmark_mixture_2d().conditional(known, values)
