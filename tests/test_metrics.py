"""scoresde.metrics against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import metrics
from scoresde.toy import GaussianMixture, benchmark_mixture_2d


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sliced_wasserstein_identical_sets_is_zero() -> None:
    x = torch.randn(300, 3, generator=_gen(), dtype=torch.float64)
    sw = metrics.sliced_wasserstein(x, x[torch.randperm(300, generator=_gen(1))], generator=_gen())
    assert float(sw) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("m", [200, 500])  # equal sizes and quantile interpolation
def test_sliced_wasserstein_of_a_shift_in_1d_is_the_shift(m: int) -> None:
    x = torch.randn(200, 1, generator=_gen(), dtype=torch.float64)
    if m == 200:
        y = x + 0.7
    else:  # a larger set of the same law, shifted: W2 -> shift up to the sampling error
        y = torch.randn(m, 1, generator=_gen(3), dtype=torch.float64) + 0.7
    sw = float(metrics.sliced_wasserstein(x, y, num_projections=4, generator=_gen()))
    assert sw == pytest.approx(0.7, abs=1e-12 if m == 200 else 0.15)


def test_sliced_wasserstein_of_a_shift_in_nd_is_its_projected_rms() -> None:
    # Shifting by c: W2 of each projection is |theta.c|; E[(theta.c)^2] = |c|^2 / D.
    x = torch.randn(400, 4, generator=_gen(), dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    sw = float(metrics.sliced_wasserstein(x, x + c, num_projections=4000, generator=_gen()))
    assert sw == pytest.approx(float(c.norm()) / 2.0, rel=0.03)


def test_rms_error() -> None:
    x = torch.zeros(10, 2, dtype=torch.float64)
    y = torch.full((10, 2), 3.0, dtype=torch.float64)
    assert float(metrics.rms_error(x, y)) == pytest.approx(3 * math.sqrt(2))
    with pytest.raises(ValueError, match="paired"):
        metrics.rms_error(x, y[:5])


def test_frechet_between_gaussians_matches_the_formula() -> None:
    # Commuting (diagonal) covariances: d^2 = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    d = metrics.frechet_distance_from_moments(
        mu1.double(), torch.diag(a).double(), mu2.double(), torch.diag(b).double()
    )
    expected = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    assert float(d) == pytest.approx(float(expected), rel=1e-12)
    # Non-commuting: compare with the eigen-decomposition of C1 C2 computed another way.
    g = _gen()
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    B = torch.randn(4, 4, generator=g, dtype=torch.float64)
    c1, c2 = A @ A.T + 0.1 * torch.eye(4), B @ B.T + 0.1 * torch.eye(4)
    cross = torch.linalg.eigvals(c1 @ c2).real.clamp(min=0).sqrt().sum()
    expected = torch.trace(c1) + torch.trace(c2) - 2 * cross
    z = torch.zeros(4, dtype=torch.float64)
    assert float(metrics.frechet_distance_from_moments(z, c1, z, c2)) == pytest.approx(
        float(expected), rel=1e-9
    )


def test_frechet_of_samples_converges_to_the_gaussian_value() -> None:
    g = _gen()
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    y = 2.0 * torch.randn(20000, 2, generator=g, dtype=torch.float64) + 1.0
    # N(0, I) vs N(1, 4 I): 2 (mean) + 2 (1 - 2)^2 = 4.
    assert float(metrics.frechet_distance(x, y)) == pytest.approx(4.0, rel=0.03)
    assert float(metrics.frechet_distance(x, x)) == pytest.approx(0.0, abs=1e-9)


def test_mode_weight_error_of_true_samples_is_within_mc_error() -> None:
    mix = benchmark_mixture_2d()
    x = mix.sample(20000, generator=_gen(), dtype=torch.float64)
    tv = float(metrics.mode_weight_error(x, mix))
    # soft assignment: each w_hat_k is a mean of N terms in [0, 1] (s.e. <= 0.5 / sqrt(N)), so
    # TV = 1/2 sum_k |w_hat_k - w_k| over 3 components is a few times 0.75 / sqrt(N).
    assert tv < 4 * 0.75 / math.sqrt(20000)
    # A sampler that drops a mode has TV = its weight.
    only_two = x[mix.responsibilities(x).argmax(1) != 1]
    assert float(metrics.mode_weight_error(only_two, mix, reduction="max")) > 0.15


def test_mode_weight_error_hard_assignment_on_separated_modes() -> None:
    mix = GaussianMixture([0.25, 0.75], [[-5.0, 0.0], [5.0, 0.0]], [0.1, 0.1])
    x = torch.tensor([[-5.0, 0.0]] * 3 + [[5.0, 0.0]] * 1, dtype=torch.float64)
    # weights seen 0.75/0.25 against 0.25/0.75: TV 0.5, max 0.5.
    assert float(metrics.mode_weight_error(x, mix, assignment="hard")) == pytest.approx(0.5)
    assert float(metrics.mode_weight_error(x, mix, reduction="max")) == pytest.approx(0.5)


def test_mean_log_density_of_a_gaussian_is_minus_its_entropy() -> None:
    mix = GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.3], [0.3, 0.5]]])
    x = mix.sample(20000, generator=_gen(), dtype=torch.float64)
    res = metrics.mean_log_density(x, mix)
    logdet = math.log(0.5 - 0.09)
    entropy = 0.5 * (2 * (1 + math.log(2 * math.pi)) + logdet)
    assert float(-res.mean) == pytest.approx(entropy, abs=4 * float(res.stderr))
    # The s.e. of log p for a 2-D Gaussian: std of chi2_2 / 2 = 1, so 1 / sqrt(N).
    assert float(res.stderr) == pytest.approx(1 / math.sqrt(20000), rel=0.05)


def test_sampling_floor() -> None:
    mix = benchmark_mixture_2d()
    floor = metrics.sampling_floor(
        mix,
        1000,
        lambda x, y: metrics.sliced_wasserstein(x, y, generator=_gen()),
        4,
        generator=_gen(),
    )
    assert floor.values.shape == (4,)
    assert 0.0 < floor.mean < 0.2 and floor.std >= 0.0


def test_bad_arguments() -> None:
    x = torch.randn(10, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="features"):
        metrics.sliced_wasserstein(x, torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_projections"):
        metrics.sliced_wasserstein(x, x, num_projections=0)
    with pytest.raises(TypeError, match="x"):
        metrics.frechet_distance([1.0], x)
    with pytest.raises(ValueError, match="reduction"):
        metrics.mode_weight_error(x, benchmark_mixture_2d(), reduction="l3")
    with pytest.raises(ValueError, match="rank"):
        metrics.mean_log_density(torch.randn(10), benchmark_mixture_2d())
