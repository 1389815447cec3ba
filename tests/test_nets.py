"""Tests of scoresde.nets: ScoreModel's parameterizations, MLPScoreNet, time embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scoresde import VESDE, VPSDE, CosineVPSDE, MLPScoreNet, ScoreModel, SubVPSDE
from scoresde.nets import PARAMETERIZATIONS, FourierTimeEmbedding, SinusoidalTimeEmbedding
from scoresde.nets.embedding import make_time_embedding
from scoresde.toy import benchmark_mixture_2d, random_mixture

F64 = torch.float64
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(), "cosine": CosineVPSDE()}
SHAPES = [(8, 2), (8, 3, 2, 2)]


def expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


class FnNet(nn.Module):
    """A parameter-free network given by a function of (input, t)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(x, t)


def exact_output(param, score, x, alpha, sigma):
    """The network output that represents `score` (closed forms, written out here):
    eps = -sigma score; x0 = (x + sigma^2 score) / alpha (Tweedie);
    v = (alpha eps - sigma x0) / sqrt(alpha^2 + sigma^2)."""
    if param == "score":
        return score
    eps = -sigma * score
    x0 = (x + sigma**2 * score) / alpha
    return {
        "eps": eps,
        "x0": x0,
        "v": (alpha * eps - sigma * x0) / torch.sqrt(alpha**2 + sigma**2),
    }[param]


def _case(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64)
    t = 0.05 + 0.95 * torch.rand(shape[0], generator=gen, dtype=F64)
    return x, t, gen


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("shape", SHAPES)
def test_parameterization_round_trips(param, sde_name, shape):
    sde = SDES[sde_name]
    model = ScoreModel(FnNet(lambda x, t: x), sde, parameterization=param)
    x, t, gen = _case(shape)
    out = torch.randn(shape, generator=gen, dtype=F64)
    score = model.output_to_score(out, x, t)
    torch.testing.assert_close(model.score_to_output(score, x, t), out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.output_to_score(model.score_to_output(out, x, t), x, t), out)
    # t as a Python float works too.
    s1 = model.output_to_score(out, x, 0.5)
    torch.testing.assert_close(model.score_to_output(s1, x, 0.5), out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("shape", SHAPES)
def test_parameterizations_recover_conditional_score(sde_name, shape):
    """x = alpha x0 + sigma eps: the true eps, x0 or v all give the score -eps / sigma."""
    sde = SDES[sde_name]
    x0, t, gen = _case(shape)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    alpha, sigma = expand(sde.alpha(t), x0), expand(sde.sigma(t), x0)
    x = alpha * x0 + sigma * eps
    v = (alpha * eps - sigma * x0) / torch.sqrt(alpha**2 + sigma**2)
    if isinstance(sde, VPSDE) and not isinstance(sde, SubVPSDE):
        # For VP, alpha^2 + sigma^2 = 1: Salimans & Ho's v = alpha eps - sigma x0.
        torch.testing.assert_close(v, alpha * eps - sigma * x0, rtol=1e-12, atol=1e-12)
    target = -eps / sigma
    for param, out in [("score", target), ("eps", eps), ("x0", x0), ("v", v)]:
        model = ScoreModel(FnNet(lambda x, t: x), sde, parameterization=param)
        torch.testing.assert_close(model.output_to_score(out, x, t), target, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("scale_input", [True, False])
def test_score_model_with_exact_net_gives_exact_score(param, sde_name, scale_input):
    """preconditioning="none": the network output is the parameterization's quantity."""
    sde = SDES[sde_name]
    gm = random_mixture(12, 3, seed=2)
    score_fn = gm.score_fn(sde)

    def net_fn(inp, t):
        alpha, sigma = expand(sde.alpha(t), inp), expand(sde.sigma(t), inp)
        # With scale_input the network sees x / sqrt(alpha^2 + sigma^2).
        x = inp * torch.sqrt(alpha**2 + sigma**2) if scale_input else inp
        return exact_output(param, score_fn(x, t), x, alpha, sigma)

    model = ScoreModel(
        FnNet(net_fn), sde, parameterization=param, scale_input=scale_input, preconditioning="none"
    )
    gen = torch.Generator().manual_seed(1)
    t = torch.linspace(0.02, 1.0, 10, dtype=F64)
    x0 = gm.sample(10, generator=gen, dtype=F64)
    x = expand(sde.alpha(t), x0) * x0 + expand(sde.sigma(t), x0) * torch.randn(
        x0.shape, generator=gen, dtype=F64
    )
    x = x.reshape(10, 3, 2, 2)
    got = model(x, t)
    assert got.shape == x.shape and got.dtype == F64
    torch.testing.assert_close(got, score_fn(x, t), rtol=1e-9, atol=1e-9)
    # network_output is the raw output in the parameterization.
    alpha, sigma = expand(sde.alpha(t), x), expand(sde.sigma(t), x)
    torch.testing.assert_close(
        model.network_output(x, t), exact_output(param, score_fn(x, t), x, alpha, sigma)
    )


def test_score_model_passes_labels_and_is_a_module():
    net = MLPScoreNet(dim=2, hidden=16, num_blocks=1, embed_dim=8, num_classes=3)
    nn.init.normal_(net.out.weight)
    model = ScoreModel(net, VPSDE())
    assert isinstance(model, nn.Module)
    assert {n for n, _ in model.named_parameters()} == {
        "net." + n for n, _ in net.named_parameters()
    }
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    s_y = model(x, 0.5, y)
    torch.testing.assert_close(model(x, 0.5, torch.full((4,), 3)), model(x, 0.5))
    assert not torch.allclose(s_y, model(x, 0.5))
    model = model.double()
    assert model(x.double(), 0.5).dtype == F64


@pytest.mark.parametrize(
    "shape,dim", [((5, 2), 2), ((5, 7), 7), ((5, 1, 8, 8), 64), ((5, 3, 4, 4), 48)]
)
@pytest.mark.parametrize("time_embedding", ["fourier", "sinusoidal"])
def test_mlp_shapes_dtypes_and_time(shape, dim, time_embedding):
    net = MLPScoreNet(dim, hidden=32, num_blocks=2, time_embedding=time_embedding, embed_dim=16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    # The output layer starts at zero, so an untrained model predicts zero.
    assert torch.equal(net(x, torch.rand(5)), torch.zeros(shape))
    nn.init.normal_(net.out.weight, std=0.1)
    t = torch.full((5,), 0.3)
    out = net(x, t)
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(net(x, 0.3), out)
    torch.testing.assert_close(net(x, torch.tensor(0.3)), out)
    assert not torch.allclose(net(x, 0.7), out)  # t matters
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net64 = net.double()
    out64 = net64(x.double(), t.double())
    assert out64.dtype == F64
    torch.testing.assert_close(out64.float(), out, rtol=1e-4, atol=1e-5)
    model = ScoreModel(net64, SDES["ve"], parameterization="eps")
    assert model(x.double(), t.double()).shape == shape


def test_mlp_null_class_and_errors():
    net = MLPScoreNet(2, hidden=16, num_blocks=1, embed_dim=8, num_classes=4)
    nn.init.normal_(net.out.weight)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net(x, 0.5), net(x, 0.5, torch.full((3,), 4)))
    assert not torch.allclose(net(x, 0.5, torch.tensor([0, 1, 2])), net(x, 0.5))
    with pytest.raises(ValueError, match=r"\by\b"):
        MLPScoreNet(2, hidden=8, num_blocks=1, embed_dim=4)(
            x, 0.5, torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match=r"\bx\b"):
        net(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match=r"\bt\b"):
        net(x, torch.zeros(2))


@pytest.mark.parametrize("dim", [2, 16, 128])
def test_time_embeddings(dim):
    t = torch.tensor([0.0, 1e-3, 0.5, 1.0], dtype=F64)
    four = FourierTimeEmbedding(dim)
    emb = four(t)
    assert emb.shape == (4, dim) and emb.dtype == F64
    half = dim // 2
    torch.testing.assert_close(
        emb[:, :half] ** 2 + emb[:, half:] ** 2, torch.ones(4, half, dtype=F64)
    )
    expected = 2 * math.pi * t[:, None] * four.W.double()[None]
    torch.testing.assert_close(emb, torch.cat([expected.sin(), expected.cos()], 1))
    assert torch.equal(FourierTimeEmbedding(dim).W, four.W)  # fixed seed: reproducible
    sin = SinusoidalTimeEmbedding(dim)
    emb = sin(t)
    assert emb.shape == (4, dim) and emb.dtype == F64
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(half), torch.ones(half)]).double())
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1)).double()
    args = 1000.0 * t[:, None] * freqs[None]
    torch.testing.assert_close(emb, torch.cat([args.sin(), args.cos()], 1), rtol=1e-6, atol=1e-6)
    assert emb.float().dtype == torch.float32 and sin(t.float()).dtype == torch.float32


BAD = [
    (
        lambda: ScoreModel(FnNet(lambda x, t: x), VPSDE(), parameterization="noise"),
        ValueError,
        "parameterization",
    ),
    (
        lambda: ScoreModel(FnNet(lambda x, t: x), VPSDE(), parameterization=None),
        ValueError,
        "parameterization",
    ),
    (lambda: ScoreModel(3, VPSDE()), TypeError, "net"),
    (lambda: ScoreModel(FnNet(lambda x, t: x), "vp"), TypeError, "sde"),
    (
        lambda: ScoreModel(FnNet(lambda x, t: x[:, :1]), VPSDE())(torch.zeros(2, 2), 0.5),
        ValueError,
        "net",
    ),
    (
        lambda: ScoreModel(FnNet(lambda x, t: x), VPSDE())(
            torch.zeros(2, 2, dtype=torch.long), 0.5
        ),
        TypeError,
        "x",
    ),
    (lambda: ScoreModel(FnNet(lambda x, t: x), VPSDE())(torch.zeros(2), 0.5), ValueError, "x"),
    (
        lambda: ScoreModel(FnNet(lambda x, t: x), VPSDE())(torch.zeros(2, 2), torch.zeros(3)),
        ValueError,
        "t",
    ),
    (lambda: MLPScoreNet(0), ValueError, "dim"),
    (lambda: MLPScoreNet(2, hidden=0), ValueError, "hidden"),
    (lambda: MLPScoreNet(2, num_blocks=0), ValueError, "num_blocks"),
    (lambda: MLPScoreNet(2, time_embedding="learned"), ValueError, "time_embedding"),
    (lambda: MLPScoreNet(2, embed_dim=7), ValueError, "embed_dim"),
    (lambda: MLPScoreNet(2, num_classes=0), ValueError, "num_classes"),
    (lambda: FourierTimeEmbedding(5), ValueError, "dim"),
    (lambda: SinusoidalTimeEmbedding(1), ValueError, "dim"),
    (lambda: make_time_embedding("gaussian", 8), ValueError, "time_embedding"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_arguments(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


def test_exact_mixture_model_on_2d_benchmark():
    """The exact eps-model of the PEERS.md mixture, wrapped in ScoreModel, is the exact score
    at t near 0 and at T (the ends where the parameterizations are most fragile)."""
    sde = VPSDE()
    gm = benchmark_mixture_2d()
    model = ScoreModel(FnNet(gm.eps_fn(sde)), sde, parameterization="eps", preconditioning="none")
    x = gm.sample(64, generator=torch.Generator().manual_seed(0), dtype=F64)
    for t in [1e-3, 1.0]:
        torch.testing.assert_close(model(x, t), gm.score_fn(sde)(x, t), rtol=1e-12, atol=1e-12)


def test_score_model_follows_x_device():
    net = MLPScoreNet(dim=12, hidden=8, num_blocks=1, embed_dim=8).to("meta")
    for param in PARAMETERIZATIONS:
        model = ScoreModel(net, CosineVPSDE(), parameterization=param)
        out = model(torch.zeros(3, 3, 2, 2, device="meta"), torch.rand(3))
        assert out.device.type == "meta" and out.shape == (3, 3, 2, 2)


def gaussian_precond(param, alpha, sigma, sd):
    """(c_in, c_skip, c_out) of the "gaussian" preconditioning, from first principles: for
    x0 ~ N(0, sd^2 I), x = alpha x0 + sigma eps has variance s_d^2 = alpha^2 sd^2 + sigma^2,
    E[x0 | x] = alpha sd^2 x / s_d^2, std(x0 | x) = sd sigma / s_d; every parameterization
    is an affine map of x0 given x, which carries mean and std over."""
    s_d2 = alpha**2 * sd**2 + sigma**2
    s_d = torch.sqrt(s_d2)
    mean_x0, std_x0 = alpha * sd**2 / s_d2, sd * sigma / s_d
    # p = a x + b x0 for each parameterization, as in exact_output:
    s = torch.sqrt(alpha**2 + sigma**2)
    a, b = {
        "x0": (0.0, 1.0),
        "eps": (1 / sigma, -alpha / sigma),
        "score": (-1 / sigma**2, alpha / sigma**2),
        "v": (alpha / (sigma * s), -(alpha**2 + sigma**2) / (sigma * s)),
    }[param]
    return 1 / s_d, a + b * mean_x0, abs(b) * std_x0


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 1.7])
def test_gaussian_preconditioning(param, sde_name, sigma_data):
    """out = c_skip x + c_out net(c_in x): the coefficients against the Gaussian closed form;
    a zero network is the exact score of N(0, sigma_data^2 I) data at every t; a network
    that outputs the normalised residual (out_exact - c_skip x) / c_out gives the exact
    mixture score; the loss's noise prediction and the score agree."""
    sde = SDES[sde_name]
    t = torch.linspace(0.002, 1.0, 12, dtype=F64)
    x = torch.randn(12, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
    alpha, sigma = expand(sde.alpha(t), x), expand(sde.sigma(t), x)
    want = gaussian_precond(param, alpha, sigma, sigma_data)
    zero = ScoreModel(
        FnNet(lambda inp, tt: torch.zeros_like(inp)), sde, param, sigma_data=sigma_data
    )
    assert zero.preconditioning == "gaussian"  # the default
    for got, ref in zip(zero.preconditioner(x, t), want, strict=True):
        # (the reference's a + b E[x0|x] cancels for "score" at small sigma: rtol 1e-7)
        torch.testing.assert_close(got.expand_as(x), ref.expand_as(x), rtol=1e-7, atol=1e-12)
    gauss_score = -x / (alpha**2 * sigma_data**2 + sigma**2)
    torch.testing.assert_close(zero(x, t), gauss_score, rtol=1e-10, atol=1e-10)

    gm = random_mixture(12, 3, seed=2)
    score_fn = gm.score_fn(sde)

    def net_fn(inp, tt):
        a, s_ = expand(sde.alpha(tt), inp), expand(sde.sigma(tt), inp)
        c_in, c_skip, c_out = gaussian_precond(param, a, s_, sigma_data)
        xx = inp / c_in
        return (exact_output(param, score_fn(xx, tt), xx, a, s_) - c_skip * xx) / c_out

    model = ScoreModel(FnNet(net_fn), sde, param, sigma_data=sigma_data)
    torch.testing.assert_close(model(x, t), score_fn(x, t), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(
        model.network_output(x, t), exact_output(param, score_fn(x, t), x, alpha, sigma)
    )
    torch.testing.assert_close(
        model.noise_prediction(x, t), -sigma * score_fn(x, t), rtol=1e-8, atol=1e-8
    )


def test_v_with_unit_sigma_data_is_already_preconditioned():
    """For sigma_data = 1, "gaussian" v-prediction is exactly raw v-prediction with the input
    scaled by 1/s (c_skip = 0, c_out = 1): why v-models never had the eps-models' problem."""
    net = MLPScoreNet(2, hidden=16, num_blocks=1, embed_dim=8).double()
    nn.init.normal_(net.out.weight, std=0.5)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    t = torch.linspace(0.01, 1.0, 6, dtype=F64)
    for sde in SDES.values():
        a = ScoreModel(net, sde, "v")
        b = ScoreModel(net, sde, "v", preconditioning="none")
        torch.testing.assert_close(a(x, t), b(x, t), rtol=1e-12, atol=1e-12)


def test_preconditioning_arguments():
    with pytest.raises(ValueError, match="preconditioning"):
        ScoreModel(FnNet(lambda x, t: x), VPSDE(), preconditioning="edm2")
    with pytest.raises(ValueError, match="sigma_data"):
        ScoreModel(FnNet(lambda x, t: x), VPSDE(), sigma_data=0.0)
    m = ScoreModel(FnNet(lambda x, t: x), VPSDE(), "x0", preconditioning="none", sigma_data=0.5)
    assert m.config() == {
        "parameterization": "x0",
        "scale_input": True,
        "preconditioning": "none",
        "sigma_data": 0.5,
    }
    assert "preconditioning='none'" in repr(m)


def test_input_of_another_dtype_than_the_weights_is_a_clear_type_error() -> None:
    """A float32 model fed float64 (what samplers do with dtype=torch.float64): a TypeError
    saying what to do, not torch's "mat1 and mat2 must have the same dtype"."""
    model = ScoreModel(MLPScoreNet(2, hidden=8, num_blocks=1), VPSDE())
    x, t = torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x is torch.float64 but the model's weights are "
                                        r"torch.float32.*model.to\(torch.float64\)"):  # fmt: skip
        model(x, t)
    assert model.double()(x, t).dtype == torch.float64
    # the other way round the advice follows x's dtype (it once said model.double() here too)
    with pytest.raises(TypeError, match=r"x is torch.float32 .*model.to\(torch.float32\)\)") as e:
        model(x.float(), t.float())
    assert "double" not in str(e.value)
