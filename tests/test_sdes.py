"""Tests of scoresde.sdes against closed forms written independently here (numpy / math).

Every check is in float64 unless it is about float32; shapes `[B, 2]` and `[B, 3, H, W]`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scoresde import SDE, VESDE, VPSDE, CosineVPSDE, ReverseSDE, SubVPSDE

F64 = torch.float64
SHAPES = [(6, 2), (4, 3, 5, 4)]

SDES = {
    "vp": lambda: VPSDE(),
    "vp_custom": lambda: VPSDE(beta_min=0.5, beta_max=7.0, N=50),
    "subvp": lambda: SubVPSDE(),
    "subvp_custom": lambda: SubVPSDE(beta_min=0.2, beta_max=12.0, N=40),
    "ve": lambda: VESDE(),
    "ve_custom": lambda: VESDE(sigma_min=0.1, sigma_max=5.0, N=20),
    "cosine": lambda: CosineVPSDE(),
    "cosine_custom": lambda: CosineVPSDE(N=100, s=0.02, t_max=0.99),
}
DEFAULT_SDES = ["vp", "subvp", "ve", "cosine"]


# --- independent reference formulas (numpy float64) ------------------------------------------
def ref_alpha_sigma(sde: SDE, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha(t), sigma(t) straight from API.md / Nichol & Dhariwal."""
    if isinstance(sde, VESDE):
        return np.ones_like(t), sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
    if isinstance(sde, CosineVPSDE):

        def fbar(u: np.ndarray) -> np.ndarray:  # alpha-bar before normalisation
            return np.cos((u * sde.t_max + sde.s) / (1 + sde.s) * np.pi / 2) ** 2

        abar = fbar(t) / fbar(np.zeros_like(t))
        # 1 - abar without cancellation at small t:
        # cos^2(th0) - cos^2(th) = sin(th - th0) sin(th + th0).
        th0 = sde.s / (1 + sde.s) * np.pi / 2
        th = (t * sde.t_max + sde.s) / (1 + sde.s) * np.pi / 2
        one_minus_abar = np.sin(th - th0) * np.sin(th + th0) / np.cos(th0) ** 2
        return np.sqrt(abar), np.sqrt(one_minus_abar)
    b0, b1 = sde.beta_0, sde.beta_1
    c = -(t**2) * (b1 - b0) / 4 - t * b0 / 2
    # 1 - exp(2c) as -expm1(2c): the plain difference loses ~1e-16/|2c| relative accuracy,
    # more than the float64 tolerance these references are checked to.
    if isinstance(sde, SubVPSDE):
        return np.exp(c), -np.expm1(2 * c)
    return np.exp(c), np.sqrt(-np.expm1(2 * c))


def ref_f_g2(sde: SDE, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drift coefficient f(t) (drift = f x) and g(t)^2."""
    if isinstance(sde, VESDE):
        sigma = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
        return np.zeros_like(t), sigma**2 * 2 * np.log(sde.sigma_max / sde.sigma_min)
    if isinstance(sde, CosineVPSDE):
        theta = (t * sde.t_max + sde.s) / (1 + sde.s) * np.pi / 2
        beta = np.pi * sde.t_max / (1 + sde.s) * np.tan(theta)
        return -beta / 2, beta
    b0, b1 = sde.beta_0, sde.beta_1
    beta = b0 + t * (b1 - b0)
    if isinstance(sde, SubVPSDE):
        integral = b0 * t + (b1 - b0) * t**2 / 2
        return -beta / 2, beta * -np.expm1(-2 * integral)  # no cancellation at small t
    return -beta / 2, beta


def expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def rand_x(shape, dtype=F64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand_t(batch, lo=1e-3, hi=1.0, seed=1):
    u = torch.rand(batch, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return lo + (hi - lo) * u


def some_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, x- and t-dependent stand-in for a score (any callable is allowed)."""
    return torch.sin(x) * expand(1 + t, x) - 0.3 * x


# --- 1. kernels, drift/diffusion, moment equations ------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("shape", SHAPES)
def test_marginal_prob_matches_closed_form(name, shape):
    sde = SDES[name]()
    x0 = rand_x(shape)
    t = rand_t(shape[0], lo=0.01)
    mean, std = sde.marginal_prob(x0, t)
    a, s = ref_alpha_sigma(sde, t.numpy())
    assert mean.shape == x0.shape and std.shape == (shape[0],)
    assert mean.dtype == std.dtype == F64
    torch.testing.assert_close(mean, expand(torch.from_numpy(a), x0) * x0, rtol=1e-13, atol=0)
    torch.testing.assert_close(std, torch.from_numpy(s), rtol=1e-11, atol=0)
    torch.testing.assert_close(sde.alpha(t), torch.from_numpy(a), rtol=1e-13, atol=0)
    torch.testing.assert_close(sde.sigma(t), torch.from_numpy(s), rtol=1e-11, atol=0)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("shape", SHAPES)
def test_sde_matches_closed_form(name, shape):
    sde = SDES[name]()
    x = rand_x(shape)
    t = rand_t(shape[0], lo=0.0)
    drift, diffusion = sde.sde(x, t)
    f, g2 = ref_f_g2(sde, t.numpy())
    assert drift.shape == x.shape and diffusion.shape == (shape[0],)
    torch.testing.assert_close(drift, expand(torch.from_numpy(f), x) * x, rtol=1e-12, atol=0)
    torch.testing.assert_close(diffusion, torch.from_numpy(np.sqrt(g2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_solves_moment_equations(name):
    """alpha' = f alpha and (sigma^2)' = 2 f sigma^2 + g^2, by autograd and by central
    differences, with f and g read off `sde()`."""
    sde = SDES[name]()
    t = torch.linspace(0.02, 0.98, 25, dtype=F64).requires_grad_(True)
    log_alpha = torch.log(sde.alpha(t))
    var = sde.sigma(t) ** 2
    if log_alpha.requires_grad:
        (dlog_alpha,) = torch.autograd.grad(log_alpha.sum(), t)
    else:  # VE: alpha = 1 is a constant, not a function of t in the graph.
        assert isinstance(sde, VESDE) and torch.equal(log_alpha, torch.zeros_like(log_alpha))
        dlog_alpha = torch.zeros_like(log_alpha)
    (dvar,) = torch.autograd.grad(var.sum(), t)
    t = t.detach()
    ones = torch.ones(t.shape[0], 1, dtype=F64)
    drift, g = sde.sde(ones, t)
    f = drift[:, 0]
    var = var.detach()
    torch.testing.assert_close(dlog_alpha, f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dvar, 2 * f * var + g**2, rtol=1e-10, atol=1e-12)
    # Central differences: independent of autograd, O(h^2) accurate.
    h = 1e-5
    fd_log_alpha = (torch.log(sde.alpha(t + h)) - torch.log(sde.alpha(t - h))) / (2 * h)
    fd_var = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(fd_log_alpha, f, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(fd_var, 2 * f * var + g**2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["cosine", "cosine_custom"])
def test_cosine_beta_is_minus_dlog_alpha2(name):
    sde = SDES[name]()
    t = torch.cat([torch.tensor([0.0, 1e-6]), torch.linspace(0.01, 1.0, 30)]).to(F64)
    t.requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.log(sde.alpha(t) ** 2).sum(), t)
    torch.testing.assert_close(sde.beta(t.detach()), -grad, rtol=1e-10, atol=0)
    # alpha(T)^2 ~ 7e-5 and beta(T) ~ 370 for the defaults, as documented.
    if name == "cosine":
        one = torch.tensor(1.0, dtype=F64)
        assert 6e-5 < float(sde.alpha(one) ** 2) < 8e-5
        assert 300 < float(sde.beta(one)) < 450


@pytest.mark.parametrize("name", DEFAULT_SDES)
def test_small_t_accuracy_float32(name):
    """Near t = 0 the kernel and log-SNR must not lose their digits to cancellation
    (reference: float64 closed form; sigma(t) ~ sqrt(t) or t, tiny)."""
    sde = SDES[name]()
    t64 = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3, 1e-2], dtype=F64)
    t32 = t64.float()
    torch.testing.assert_close(sde.sigma(t32).double(), sde.sigma(t64), rtol=1e-5, atol=0)
    torch.testing.assert_close(sde.log_snr(t32).double(), sde.log_snr(t64), rtol=0, atol=1e-4)


# --- reverse SDE / ODE ----------------------------------------------------------------------
@pytest.mark.parametrize("name", DEFAULT_SDES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_sde_and_probability_flow(name, shape):
    sde = SDES[name]()
    x = rand_x(shape)
    t = rand_t(shape[0])
    drift, g = sde.sde(x, t)
    score = some_score(x, t)
    rev = sde.reverse(some_score)
    assert isinstance(rev, ReverseSDE) and rev.N == sde.N and rev.T == sde.T
    rdrift, rg = rev.sde(x, t)
    torch.testing.assert_close(rdrift, drift - expand(g**2, x) * score, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rg, g, rtol=0, atol=0)
    ode = sde.reverse(some_score, probability_flow=True)
    odrift, og = ode.sde(x, t)
    torch.testing.assert_close(odrift, drift - 0.5 * expand(g**2, x) * score, rtol=1e-14, atol=0)
    assert torch.equal(og, torch.zeros_like(g))


@pytest.mark.parametrize("name", DEFAULT_SDES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_discretize(name, shape):
    sde = SDES[name]()
    x = rand_x(shape)
    t = rand_t(shape[0])
    f, G = sde.discretize(x, t)
    score = some_score(x, t)
    rf, rG = sde.reverse(some_score).discretize(x, t)
    torch.testing.assert_close(rf, f - expand(G**2, x) * score, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rG, G, rtol=0, atol=0)
    of, oG = sde.reverse(some_score, probability_flow=True).discretize(x, t)
    torch.testing.assert_close(of, f - 0.5 * expand(G**2, x) * score, rtol=1e-14, atol=1e-14)
    assert torch.equal(oG, torch.zeros_like(G))


# --- prior ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DEFAULT_SDES + ["ve_custom"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_prior_sampling(name, dtype):
    sde = SDES[name]()
    shape = (2000, 3, 2, 2)
    z = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert z.shape == shape and z.dtype == dtype and z.device.type == "cpu"
    # 24,000 draws: the sample std is within ~0.5% (3 standard errors of 0.46%).
    assert abs(float(z.std()) / sde.prior_std - 1) < 0.015
    assert abs(float(z.mean())) < 0.03 * sde.prior_std
    again = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert torch.equal(z, again)
    other = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert not torch.equal(z, other)
    z2 = sde.prior_sampling([5, 2], device="cpu")
    assert z2.shape == (5, 2) and z2.dtype == torch.get_default_dtype()
    assert sde.prior_sampling(torch.Size([2, 2])).shape == (2, 2)


@pytest.mark.parametrize("name", DEFAULT_SDES)
def test_marginal_at_T_is_close_to_prior(name):
    sde = SDES[name]()
    T = torch.tensor(sde.T, dtype=F64)
    alpha, sigma = float(sde.alpha(T)), float(sde.sigma(T))
    if isinstance(sde, VESDE):
        # alpha = 1 but the data (unit scale) is negligible next to sigma_max = 50.
        assert alpha == 1.0
        assert sigma == pytest.approx(sde.prior_std, rel=1e-13)
    else:
        # VP: alpha(T) = 6.6e-3, sub-VP 6.6e-3, cosine 8.4e-3; sigma(T) within 4e-5 of 1.
        assert alpha < 1e-2
        assert abs(sigma - sde.prior_std) < 1e-4


@pytest.mark.parametrize("name", DEFAULT_SDES + ["ve_custom"])
@pytest.mark.parametrize("shape", SHAPES)
def test_prior_logp_closed_form(name, shape):
    sde = SDES[name]()
    z = rand_x(shape) * sde.prior_std * 1.3
    dist = torch.distributions.Normal(torch.zeros((), dtype=F64), sde.prior_std)
    expected = dist.log_prob(z).reshape(shape[0], -1).sum(1)
    got = sde.prior_logp(z)
    assert got.shape == (shape[0],)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-12)


# --- discretize -----------------------------------------------------------------------------
def _t_grid(N: int) -> torch.Tensor:
    random = torch.rand(40, generator=torch.Generator().manual_seed(5), dtype=F64)
    edges = torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0], dtype=F64)
    return torch.cat([random, edges])


@pytest.mark.parametrize("name", ["vp", "vp_custom"])
@pytest.mark.parametrize("shape", SHAPES)
def test_discretize_vp_is_ddpm(name, shape):
    sde = SDES[name]()
    N = sde.N
    for t in _t_grid(N).split(shape[0]):
        x = rand_x((t.shape[0],) + shape[1:])
        i = np.floor(t.numpy() * (N - 1) / sde.T).astype(int)
        betas = np.linspace(sde.beta_0 / N, sde.beta_1 / N, N)[i]
        f, G = sde.discretize(x, t)
        b = expand(torch.from_numpy(betas), x)
        torch.testing.assert_close(f, torch.sqrt(1 - b) * x - x, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(G, torch.from_numpy(np.sqrt(betas)), rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ["ve", "ve_custom"])
@pytest.mark.parametrize("shape", SHAPES)
def test_discretize_ve_is_smld(name, shape):
    sde = SDES[name]()
    N = sde.N
    sigmas = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** (np.arange(N) / (N - 1))
    torch.testing.assert_close(sde.discrete_sigmas, torch.from_numpy(sigmas), rtol=1e-13, atol=0)
    for t in _t_grid(N).split(shape[0]):
        x = rand_x((t.shape[0],) + shape[1:])
        i = np.floor(t.numpy() * (N - 1) / sde.T).astype(int)
        previous = np.where(i == 0, 0.0, sigmas[np.maximum(i - 1, 0)])
        f, G = sde.discretize(x, t)
        assert torch.equal(f, torch.zeros_like(x))
        expected = np.sqrt(sigmas[i] ** 2 - previous**2)
        torch.testing.assert_close(G, torch.from_numpy(expected), rtol=1e-12, atol=0)
    # sigma_{-1} = 0: the first step adds noise of std sigma_min.
    x = rand_x((1, 2))
    assert float(sde.discretize(x, 0.0)[1]) == pytest.approx(sde.sigma_min, rel=1e-14)


@pytest.mark.parametrize("name", ["subvp", "subvp_custom", "cosine", "cosine_custom"])
@pytest.mark.parametrize("shape", SHAPES)
def test_discretize_euler_maruyama(name, shape):
    sde = SDES[name]()
    x = rand_x(shape)
    t = rand_t(shape[0])
    drift, g = sde.sde(x, t)
    f, G = sde.discretize(x, t)
    torch.testing.assert_close(f, drift / sde.N, rtol=1e-14, atol=0)
    torch.testing.assert_close(G, g * math.sqrt(1 / sde.N), rtol=1e-14, atol=0)


# --- log-SNR ------------------------------------------------------------------------------
LOG_SNR_GRID = [1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99]
LOG_SNR_GRID += [1 - 1e-4, 1 - 1e-6, 1 - 1e-10, 1.0]


@pytest.mark.parametrize("name", list(SDES) + ["vp_constant_beta"])
def test_log_snr_inverse(name):
    sde = VPSDE(beta_min=1.0, beta_max=1.0) if name == "vp_constant_beta" else SDES[name]()
    t = torch.tensor(LOG_SNR_GRID, dtype=F64)
    lam = sde.log_snr(t)
    a, s = ref_alpha_sigma(sde, t.numpy())
    # The closed form loses digits near t = 0 (1 - exp(2c) cancels), so compare from 1e-3.
    far = t >= 1e-3
    torch.testing.assert_close(
        lam[far], torch.from_numpy(2 * np.log(a / s))[far], rtol=1e-10, atol=1e-10
    )
    assert (lam.diff() < 0).all(), "log_snr must decrease in t"
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=0, atol=1e-10)
    lam_grid = torch.linspace(float(lam[-1]), float(lam[0]), 50, dtype=F64)
    torch.testing.assert_close(
        sde.log_snr(sde.t_from_log_snr(lam_grid)), lam_grid, rtol=1e-9, atol=1e-9
    )
    # float32: same round trip, looser.
    t32 = t.float()
    back32 = sde.t_from_log_snr(sde.log_snr(t32))
    assert back32.dtype == torch.float32
    torch.testing.assert_close(back32, t32, rtol=0, atol=1e-6)
    # Python floats work as well.
    assert float(sde.t_from_log_snr(float(sde.log_snr(0.25)))) == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("name", ["vp", "subvp", "cosine"])
def test_log_snr_endpoints(name):
    sde = SDES[name]()
    zero = torch.zeros(1, dtype=F64)
    assert torch.isinf(sde.log_snr(zero)).all() and (sde.log_snr(zero) > 0).all()
    assert torch.equal(sde.t_from_log_snr(torch.tensor([math.inf], dtype=F64)), zero)


# --- 2. DDPM as the VP special case -------------------------------------------------------
def test_vp_defaults_are_ddpm_linear_schedule():
    sde = VPSDE()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    assert torch.equal(sde.discrete_betas, betas)
    assert torch.equal(sde.alphas, 1 - betas)
    assert torch.equal(sde.alphas_cumprod, torch.cumprod(1 - betas, 0))
    # The continuous schedule is beta(t) = N * beta_i on the same linear grid.
    assert sde.beta_0 == pytest.approx(1000 * 1e-4) and sde.beta_1 == pytest.approx(1000 * 0.02)


def _kernel_discrepancy(N: int, mapping: str) -> float:
    sde = VPSDE(N=N)
    i = torch.arange(N, dtype=F64)
    t = (i + 1) / N if mapping == "(i+1)/N" else i / (N - 1)
    return float((sde.alpha(t) ** 2 - sde.alphas_cumprod).abs().max())


def test_ddpm_products_converge_to_vp_kernel():
    """prod_{j<=i}(1 - beta_j) -> alpha(t_i)^2 at rate 1/N. Measured max discrepancy:
    t_i = (i+1)/N: 8.3e-3, 8.1e-4, 8.1e-5 for N = 100, 1000, 10000;
    t_i = i/(N-1) (the map `discretize` uses): 1.6e-2, 1.6e-3, 1.6e-4."""
    for mapping in ["(i+1)/N", "i/(N-1)"]:
        errs = [_kernel_discrepancy(N, mapping) for N in (100, 1000, 10000)]
        for coarse, fine in zip(errs, errs[1:], strict=False):
            assert 8 < coarse / fine < 12.5, (mapping, errs)  # first order: ratio ~10
        assert errs[-1] < 2e-4
    # (i+1)/N is the better map: after step i, i+1 betas have acted.
    assert _kernel_discrepancy(1000, "(i+1)/N") < 0.6 * _kernel_discrepancy(1000, "i/(N-1)")


@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_discretize_mean_is_ddpm_posterior_mean(shape):
    """With score = -eps / sqrt(1 - abar_i), the reverse-diffusion mean x - rev_f equals
    DDPM's mean (x - beta_i eps / sqrt(1 - abar_i)) / sqrt(1 - beta_i) up to O(beta_i^2);
    the ancestral form (x + beta_i score) / sqrt(1 - beta_i) is DDPM's mean exactly."""
    sde = VPSDE()
    gen = torch.Generator().manual_seed(7)
    B = shape[0]
    for idx in [
        torch.arange(B),
        torch.randint(0, 1000, (B,), generator=gen),
        999 - torch.arange(B),
    ]:
        t = idx.to(F64) / (sde.N - 1)
        assert torch.equal(sde._index(t), idx)
        x = torch.randn(shape, generator=gen, dtype=F64)
        eps = torch.randn(shape, generator=gen, dtype=F64)
        beta = expand(sde.discrete_betas[idx], x)
        abar = expand(sde.alphas_cumprod[idx], x)

        def score_fn(x_, t_, eps=eps, abar=abar):
            return -eps / torch.sqrt(1 - abar)

        ddpm_mean = (x - beta * eps / torch.sqrt(1 - abar)) / torch.sqrt(1 - beta)
        rev_f, rev_G = sde.reverse(score_fn).discretize(x, t)
        mean = x - rev_f
        torch.testing.assert_close(rev_G**2, sde.discrete_betas[idx], rtol=1e-14, atol=0)
        # Taylor: coefficient of x differs by beta^2/4, of eps/sqrt(1-abar) by beta^2/2.
        bound = beta**2 * (0.3 * x.abs() + 0.6 * eps.abs() / torch.sqrt(1 - abar)) + 1e-15
        assert ((mean - ddpm_mean).abs() <= bound).all()
        ancestral = (x + beta * score_fn(x, t)) / torch.sqrt(1 - beta)
        torch.testing.assert_close(ancestral, ddpm_mean, rtol=1e-14, atol=1e-14)


# --- 5. properties over shapes, parameters, dtypes and time forms ---------------------------
@st.composite
def sde_cases(draw):
    kind = draw(st.sampled_from(["vp", "subvp", "ve", "cosine"]))
    N = draw(st.integers(2, 2000))
    if kind in ("vp", "subvp"):
        b0 = draw(st.floats(0.01, 2.0))
        b1 = draw(st.floats(b0, 40.0))
        sde = (VPSDE if kind == "vp" else SubVPSDE)(beta_min=b0, beta_max=b1, N=N)
    elif kind == "ve":
        s0 = draw(st.floats(1e-3, 1.0))
        s1 = draw(st.floats(s0 * 1.5, 200.0))
        sde = VESDE(sigma_min=s0, sigma_max=s1, N=N)
    else:
        sde = CosineVPSDE(N=N, s=draw(st.floats(1e-3, 0.05)), t_max=draw(st.floats(0.5, 0.999)))
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    t_form = draw(st.sampled_from(["float", "0d", "vector"]))
    t0 = draw(st.floats(1e-3, 1.0))
    seed = draw(st.integers(0, 2**16))
    return sde, shape, dtype, t_form, t0, seed


def _time(t_form, t0, batch, dtype, seed):
    if t_form == "float":
        return t0
    if t_form == "0d":
        return torch.tensor(t0, dtype=dtype)
    u = torch.rand(batch, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return 1e-3 + (1 - 1e-3) * u


@settings(max_examples=40, deadline=None)
@given(sde_cases())
def test_property_shapes_dtypes_and_consistency(case):
    sde, shape, dtype, t_form, t0, seed = case
    B = shape[0]
    x = rand_x(shape, dtype=dtype, seed=seed)
    t = _time(t_form, t0, B, dtype, seed)
    tv = t if t_form == "vector" else torch.full((B,), t0, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}

    mean, std = sde.marginal_prob(x, t)
    drift, g = sde.sde(x, t)
    f, G = sde.discretize(x, t)
    for out, want in [(mean, shape), (drift, shape), (f, shape)]:
        assert out.shape == want and out.dtype == dtype
    for out in (std, g, G):
        assert out.shape == (B,) and out.dtype == dtype
    # Scalar t is the same as the [B] vector filled with it.
    torch.testing.assert_close(mean, sde.marginal_prob(x, tv)[0], rtol=0, atol=0)
    torch.testing.assert_close(g, sde.sde(x, tv)[1], rtol=0, atol=0)
    # Per-sample rows agree with single-sample calls.
    b = B - 1
    mb, sb = sde.marginal_prob(x[b : b + 1], tv[b])
    torch.testing.assert_close(mb, mean[b : b + 1], rtol=0, atol=0)
    torch.testing.assert_close(sb, std[b : b + 1], rtol=0, atol=0)
    # Consistency with the scalar schedule.
    torch.testing.assert_close(mean, expand(sde.alpha(tv), x) * x, rtol=0, atol=0)
    torch.testing.assert_close(std, sde.sigma(tv), rtol=0, atol=0)
    alpha_ref, sigma_ref = ref_alpha_sigma(sde, tv.double().numpy())
    torch.testing.assert_close(std.double(), torch.from_numpy(sigma_ref), **tol)
    torch.testing.assert_close(sde.alpha(tv).double(), torch.from_numpy(alpha_ref), **tol)
    f_ref, g2_ref = ref_f_g2(sde, tv.double().numpy())
    torch.testing.assert_close(g.double(), torch.from_numpy(np.sqrt(g2_ref)), **tol)
    torch.testing.assert_close(
        drift.double(), expand(torch.from_numpy(f_ref), x) * x.double(), **tol
    )
    if isinstance(sde, (SubVPSDE, CosineVPSDE)):
        torch.testing.assert_close(f, drift / sde.N, rtol=1e-6, atol=0)
        torch.testing.assert_close(G, g / math.sqrt(sde.N), rtol=1e-6, atol=0)
    elif isinstance(sde, VPSDE):
        i = sde._index(tv)
        torch.testing.assert_close(G.double() ** 2, sde.discrete_betas[i], **tol)
    else:
        assert torch.equal(f, torch.zeros_like(x))
    # A zero score leaves the forward drift in the reverse SDE.
    rdrift, rg = sde.reverse(lambda x_, t_: torch.zeros_like(x_)).sde(x, t)
    torch.testing.assert_close(rdrift, drift, rtol=0, atol=0)
    assert rg.dtype == dtype and rg.shape == (B,)
    z = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    assert z.shape == shape and z.dtype == dtype
    assert sde.prior_logp(z).shape == (B,) and sde.prior_logp(z).dtype == dtype


# --- 6. bad arguments ----------------------------------------------------------------------
X = torch.zeros(3, 2)
BAD_CALLS = [
    (lambda: VPSDE(N=0), ValueError, "N"),
    (lambda: VPSDE(N=-5), ValueError, "N"),
    (lambda: VESDE(N=0), ValueError, "N"),
    (lambda: CosineVPSDE(N=-1), ValueError, "N"),
    (lambda: VPSDE(N=10.5), TypeError, "N"),
    (lambda: VPSDE(beta_min=5.0, beta_max=1.0), ValueError, "beta_max"),
    (lambda: SubVPSDE(beta_min=5.0, beta_max=1.0), ValueError, "beta_max"),
    (lambda: VPSDE(beta_min=float("nan")), ValueError, "beta_min"),
    (lambda: VPSDE(beta_max=float("nan")), ValueError, "beta_max"),
    (lambda: VPSDE(beta_max=float("inf")), ValueError, "beta_max"),
    (lambda: VPSDE(beta_min=-0.1), ValueError, "beta_min"),
    (lambda: VPSDE(beta_min="0.1"), TypeError, "beta_min"),
    (lambda: VESDE(sigma_min=1.0, sigma_max=1.0), ValueError, "sigma_max"),
    (lambda: VESDE(sigma_min=2.0, sigma_max=1.0), ValueError, "sigma_max"),
    (lambda: VESDE(sigma_min=0.0), ValueError, "sigma_min"),
    (lambda: VESDE(sigma_min=float("nan")), ValueError, "sigma_min"),
    (lambda: VESDE(sigma_max=float("nan")), ValueError, "sigma_max"),
    (lambda: CosineVPSDE(s=0.0), ValueError, "s"),
    (lambda: CosineVPSDE(t_max=1.0), ValueError, "t_max"),
    (lambda: CosineVPSDE(t_max=float("nan")), ValueError, "t_max"),
    (lambda: VPSDE().sde(X, torch.zeros(4)), ValueError, "t"),
    (lambda: VPSDE().marginal_prob(X, torch.zeros(3, 1)), ValueError, "t"),
    (lambda: VESDE().discretize(X, torch.zeros(2)), ValueError, "t"),
    (lambda: VPSDE().sde(X, "0.5"), TypeError, "t"),
    (lambda: VPSDE().sde(torch.zeros(3, 2, dtype=torch.long), 0.5), TypeError, "x"),
    (lambda: VPSDE().marginal_prob(torch.zeros(3, 2, dtype=torch.long), 0.5), TypeError, "x0"),
    (lambda: VPSDE().discretize(torch.zeros(3, 2, dtype=torch.int32), 0.5), TypeError, "x"),
    (lambda: VESDE().discretize(torch.zeros(3, 2, dtype=torch.int32), 0.5), TypeError, "x"),
    (lambda: SubVPSDE().discretize(torch.zeros(3, 2, dtype=torch.int32), 0.5), TypeError, "x"),
    (lambda: VPSDE().sde(torch.zeros(3), 0.5), ValueError, "x"),
    (lambda: VESDE().marginal_prob(torch.zeros(3), 0.5), ValueError, "x0"),
    (lambda: CosineVPSDE().discretize(torch.zeros(3), 0.5), ValueError, "x"),
    (lambda: VPSDE().sde([[0.0, 1.0]], 0.5), TypeError, "x"),
    (lambda: VPSDE().prior_logp(torch.zeros(3)), ValueError, "z"),
    (lambda: VPSDE().prior_sampling((3,)), ValueError, "shape"),
    (lambda: VPSDE().prior_sampling((0, 2)), ValueError, "shape"),
    (lambda: VPSDE().prior_sampling((3, -2)), ValueError, "shape"),
    (lambda: VPSDE().prior_sampling(3), TypeError, "shape"),
    (lambda: VPSDE().prior_sampling((3, 2.0)), TypeError, "shape"),
    (lambda: VPSDE().prior_sampling((3, 2), dtype=torch.int64), TypeError, "dtype"),
    (lambda: VPSDE().prior_sampling((3, 2), dtype="float32"), TypeError, "dtype"),
    (lambda: VPSDE().prior_sampling((3, 2), generator=0), TypeError, "generator"),
    (lambda: VPSDE().reverse(None), TypeError, "score_fn"),
    (lambda: VESDE().reverse("score", probability_flow=True), TypeError, "score_fn"),
]


@pytest.mark.parametrize("call,exc,name", BAD_CALLS)
def test_bad_arguments_raise_naming_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


def test_repr_names_parameters():
    assert "beta_max=20.0" in repr(VPSDE()) and "N=1000" in repr(VPSDE())
    assert "sigma_max=50.0" in repr(VESDE())
    assert "CosineVPSDE" in repr(CosineVPSDE())


@pytest.mark.parametrize("name", DEFAULT_SDES)
@pytest.mark.parametrize("t_form", ["float", "0d", "vector"])
def test_outputs_follow_x_device(name, t_form):
    """No hard-coded CPU tensors: on the 'meta' device (shapes only) every output follows x."""
    sde = SDES[name]()
    x = torch.zeros(3, 2, 2, device="meta", dtype=F64)
    t = {"float": 0.5, "0d": torch.tensor(0.5), "vector": torch.rand(3)}[t_form]
    outs = [*sde.sde(x, t), *sde.marginal_prob(x, t), *sde.discretize(x, t), sde.prior_logp(x)]
    outs += [*sde.reverse(some_score).sde(x, t), *sde.reverse(some_score, True).discretize(x, t)]
    outs.append(sde.prior_sampling((3, 2), device="meta", dtype=F64))
    assert all(o.device.type == "meta" and o.dtype == F64 for o in outs)


def test_discrete_tables_are_cached_per_dtype():
    sde = VPSDE()
    x = torch.zeros(2, 2)
    sde.discretize(x, 0.5)
    table = sde._table("discrete_betas", x)
    assert table.dtype == torch.float32 and sde._table("discrete_betas", x) is table
    sde.discrete_betas = sde.discrete_betas * 0.5  # a reassigned table is picked up
    torch.testing.assert_close(sde._table("discrete_betas", x), table * 0.5)


def test_vp_with_zero_beta_min_inverts_at_t0():
    sde = VPSDE(beta_min=0.0, beta_max=10.0)
    lam = torch.tensor([math.inf, 3.0, -5.0], dtype=F64)
    t = sde.t_from_log_snr(lam)
    assert float(t[0]) == 0.0
    torch.testing.assert_close(sde.log_snr(t[1:]), lam[1:], rtol=1e-12, atol=0)


def test_time_of_shape_one_and_int_broadcasts():
    sde = VPSDE()
    x = rand_x((4, 3))
    expected = sde.marginal_prob(x, 0.5)
    for t in (torch.tensor([0.5]), torch.tensor(0.5, dtype=torch.float32), torch.full((4,), 0.5)):
        for got, want in zip(sde.marginal_prob(x, t), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(sde.sde(x, 1), sde.sde(x, 1.0), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
