"""Classifier-free guidance, classifier guidance and imputation, checked against exact
Gaussian-mixture scores (scoresde.toy): the class-conditional "model" below returns the exact
score of component k's marginal for label k and of the whole mixture for the null label."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import VPSDE
from scoresde.guidance import (
    classifier_free_guidance,
    classifier_log_prob,
    guided_score,
    inpaint,
    pc_inpaint,
)
from scoresde.samplers.ddim import DDIMSampler
from scoresde.samplers.ode import ODESampler
from scoresde.samplers.pc import EulerMaruyamaSampler, PCSampler
from scoresde.toy import GaussianMixture

SDE_ = VPSDE()
# Two correlated components; for the imputation tests coordinate 0 (the known one)
# separates them much more than coordinate 1.
GM = GaussianMixture(
    [0.4, 0.6],
    [[-2.0, -0.5], [2.0, 0.8]],
    [[[0.3, 0.15], [0.15, 0.2]], [[0.25, -0.1], [-0.1, 0.3]]],
)
COMPONENTS = [GaussianMixture([1.0], GM.means[k : k + 1], GM.covs[k : k + 1]) for k in range(2)]


class ExactClassConditional:
    """model(x, t, y): the exact score of component y's marginal (y = 0, 1) or of the full
    mixture (y = 2 = num_classes, the null label, or y=None). Counts calls and rows."""

    num_classes = 2

    def __init__(self, sde=SDE_):
        self.fns = [c.score_fn(sde) for c in COMPONENTS] + [GM.score_fn(sde)]
        self.calls = 0
        self.rows = 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        self.rows += x.shape[0]
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
        out = torch.empty_like(x)
        for k, fn in enumerate(self.fns):
            sel = y == k
            if bool(sel.any()):
                out[sel] = fn(x[sel], t[sel])
        return out


def log_posterior_fn(k, sde=SDE_):
    """log p_t(y = k | x) = log w_k + log N_k,t(x) - log p_t(x), differentiable in x."""
    comp, full = COMPONENTS[k].log_prob_fn(sde), GM.log_prob_fn(sde)
    log_w = math.log(float(GM.weights[k]))
    return lambda x, t: log_w + comp(x, t) - full(x, t)


def _rand_xt(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x, t


def _mode_weights(x):
    return GM.responsibilities(x).mean(0)


# --- classifier-free guidance ----------------------------------------------------------------


def test_cfg_formula_one_batched_call():
    """s_w = s_null + w (s_y - s_null), from ONE model call on the doubled batch."""
    model = ExactClassConditional()
    x, t = _rand_xt()
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    s = classifier_free_guidance(model, y, guidance_scale=3.0)(x, t)
    assert model.calls == 1 and model.rows == 128
    cond = torch.stack(
        [COMPONENTS[int(k)].score_fn(SDE_)(x[i : i + 1], t[i : i + 1])[0] for i, k in enumerate(y)]
    )
    uncond = GM.score_fn(SDE_)(x, t)
    torch.testing.assert_close(s, uncond + 3.0 * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_cfg_edge_cases_and_fallback():
    """w = 1 is the conditional model, w = 0 the unconditional one (one plain call each);
    without a null label the unconditional score is model(x, t)."""
    x, t = _rand_xt()
    model = ExactClassConditional()
    torch.testing.assert_close(
        classifier_free_guidance(model, 1, 1.0)(x, t), COMPONENTS[1].score_fn(SDE_)(x, t)
    )
    torch.testing.assert_close(
        classifier_free_guidance(model, 1, 0.0)(x, t), GM.score_fn(SDE_)(x, t)
    )
    assert model.rows == 128  # 64 rows per call: no doubling at the edges

    def no_null(x, t, y=None):  # a model with no num_classes attribute
        return model(x, t, y)

    s = classifier_free_guidance(no_null, 0, 2.0)(x, t)
    c0, full = COMPONENTS[0].score_fn(SDE_)(x, t), GM.score_fn(SDE_)(x, t)
    torch.testing.assert_close(s, full + 2.0 * (c0 - full))


def test_cfg_with_score_model_mlp():
    """Works with ScoreModel(MLPScoreNet(num_classes=K)); label K is its null class."""
    from scoresde import MLPScoreNet, ScoreModel

    torch.manual_seed(0)
    net = MLPScoreNet(dim=2, hidden=16, num_blocks=1, embed_dim=8, num_classes=3)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    model = ScoreModel(net, SDE_).double()
    x, t = _rand_xt(8)
    with torch.no_grad():
        s = classifier_free_guidance(model, 2, 1.5)(x, t)
        cond = model(x, t, torch.full((8,), 2))
        uncond = model(x, t)  # y=None -> label 3
    torch.testing.assert_close(s, uncond + 1.5 * (cond - uncond))


@pytest.mark.parametrize("w, target, expect", [(1.0, 1, [0.0, 1.0]), (0.0, None, [0.4, 0.6])])
def test_cfg_sampling_exact_model(w, target, expect):
    """CFG with w = 1 samples component 1 (mode weight ~1), w = 0 the mixture (.4/.6): the
    guided run is the run of the exact target score from the same seed. NFE counts guided
    score calls (one network call each)."""
    model = ExactClassConditional()
    sampler = DDIMSampler(SDE_, num_steps=50, eta=1.0)
    x = sampler.sample(
        classifier_free_guidance(model, 1, w),
        (4000, 2),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert sampler.nfe == model.calls == 50
    exact = (GM if target is None else COMPONENTS[target]).score_fn(SDE_)
    ref = sampler.sample(
        exact, (4000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        _mode_weights(x), torch.tensor(expect, dtype=torch.float64), atol=0.03, rtol=0
    )


# --- classifier guidance ---------------------------------------------------------------------


def test_guided_score_is_exact_bayes():
    """score + grad log p_t(y=k | x) = the exact score of component k (Bayes' rule)."""
    x, t = _rand_xt()
    for k in range(2):
        s = guided_score(GM.score_fn(SDE_), log_posterior_fn(k), 1.0)(x, t)
        torch.testing.assert_close(s, COMPONENTS[k].score_fn(SDE_)(x, t), rtol=1e-9, atol=1e-9)
        assert not s.requires_grad


def test_classifier_log_prob_and_no_grad():
    """A classifier with logits log w_j + log N_j,t(x) is the exact posterior; guidance works
    under torch.no_grad (as inside samplers); scale 2 doubles the guidance term."""
    comps = [c.log_prob_fn(SDE_) for c in COMPONENTS]

    def classifier(x, t):
        return torch.stack([comps[j](x, t) + math.log(float(GM.weights[j])) for j in range(2)], 1)

    x, t = _rand_xt()
    with torch.no_grad():
        s = guided_score(GM.score_fn(SDE_), classifier_log_prob(classifier, 0), 2.0)(x, t)
    base = GM.score_fn(SDE_)(x, t)
    target = base + 2.0 * (COMPONENTS[0].score_fn(SDE_)(x, t) - base)
    torch.testing.assert_close(s, target, rtol=1e-9, atol=1e-9)


def test_guided_sampling_selects_component():
    """Sampling the guided score is sampling component 0: the same run as its exact score
    (same seed), mode weight ~1, its mean (50 stochastic DDIM steps; the covariance is off by
    the sampler's own discretization error, ~0.05, so it is not compared)."""
    sampler = DDIMSampler(SDE_, num_steps=50, eta=1.0)
    score = guided_score(GM.score_fn(SDE_), log_posterior_fn(0), 1.0)
    x = sampler.sample(
        score, (3000, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    ref = sampler.sample(
        COMPONENTS[0].score_fn(SDE_),
        (3000, 2),
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-7)
    assert float(_mode_weights(x)[0]) > 0.99
    torch.testing.assert_close(x.mean(0), GM.means[0], atol=0.05, rtol=0)


def test_guidance_argument_errors():
    model = ExactClassConditional()
    with pytest.raises(ValueError, match="guidance_scale"):
        classifier_free_guidance(model, 0, float("nan"))
    with pytest.raises(TypeError, match="y must be"):
        classifier_free_guidance(model, torch.tensor([0.5]), 1.0)
    with pytest.raises(TypeError, match="null_label"):
        classifier_free_guidance(model, 0, 1.0, null_label="none")
    x, t = _rand_xt(4)
    with pytest.raises(ValueError, match=r"y must be an int or have shape \[B\]"):
        classifier_free_guidance(model, torch.tensor([0, 1]), 2.0)(x, t)
    with pytest.raises(ValueError, match="log_likelihood_fn must return"):
        guided_score(GM.score_fn(SDE_), lambda x, t: x.sum())(x, t)
    with pytest.raises(TypeError, match="scale"):
        guided_score(GM.score_fn(SDE_), log_posterior_fn(0), scale="big")


# --- imputation ------------------------------------------------------------------------------


def exact_conditional_x1(gm, x0):
    """p(x1 | x0) of a 2-D mixture: sum_k r_k(x0) N(m_k, v_k) with r_k ~ w_k N(x0; mu_k0, S_k00),
    m_k = mu_k1 + S_k10 / S_k00 (x0 - mu_k0), v_k = S_k11 - S_k10^2 / S_k00.
    Returns (mean, std) of the 1-D mixture."""
    w, mu, S = gm.weights, gm.means, gm.covs
    v0 = S[:, 0, 0]
    r = torch.softmax(w.log() - 0.5 * (x0 - mu[:, 0]) ** 2 / v0 - 0.5 * v0.log(), 0)
    m = mu[:, 1] + S[:, 1, 0] / v0 * (x0 - mu[:, 0])
    v = S[:, 1, 1] - S[:, 1, 0] ** 2 / v0
    mean = (r * m).sum()
    return float(mean), float(((r * (v + m**2)).sum() - mean**2).sqrt())


def _known(x0, n=4000):
    x = torch.zeros(n, 2, dtype=torch.float64)
    x[:, 0] = x0
    return x, torch.tensor([True, False])


@pytest.mark.parametrize("method", [inpaint, pc_inpaint])
def test_pc_imputation_matches_exact_conditional(method):
    """Observe x0 = -2, impute x1 with PC sampling (reverse diffusion + Langevin, 200 steps):
    mean and std of x1 match the exact p(x1 | x0) (-0.500, 0.354). Measured: inpaint
    -0.499 / 0.366, pc_inpaint -0.496 / 0.361 (standard error of the mean ~0.006)."""
    mean, std = exact_conditional_x1(GM, -2.0)
    x_known, mask = _known(-2.0)
    sampler = PCSampler(SDE_, num_steps=200)
    out = method(
        sampler, GM.score_fn(SDE_), x_known, mask, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[:, 0], x_known[:, 0])
    assert sampler.nfe == 400
    assert abs(float(out[:, 1].mean()) - mean) < 0.03
    assert abs(float(out[:, 1].std()) - std) < 0.03


def test_replacement_is_approximate_for_em_and_ode():
    """Replacement is not exact (the unknown coordinate picks its mode while the known one is
    still noisy). At x0 = -2 against the exact (-0.500, 0.354), this run measures
    Euler–Maruyama 500 steps -0.459 / 0.368 and the Heun ODE (100 steps, known_noise="mean")
    -0.369 / 0.427; with 4000 samples the ODE gave -0.366 / 0.431 ("fresh") and -0.344 / 0.488
    ("fixed"). The bounds below hold these with margin."""
    mean, std = exact_conditional_x1(GM, -2.0)
    x_known, mask = _known(-2.0, n=3000)
    gen = torch.Generator().manual_seed(0)
    em = inpaint(
        EulerMaruyamaSampler(SDE_, num_steps=500), GM.score_fn(SDE_), x_known, mask, generator=gen
    )
    assert abs(float(em[:, 1].mean()) - mean) < 0.08 and abs(float(em[:, 1].std()) - std) < 0.06
    ode = inpaint(
        ODESampler(SDE_, method="heun", num_steps=100),
        GM.score_fn(SDE_),
        x_known,
        mask,
        generator=gen,
        known_noise="mean",
    )
    assert abs(float(ode[:, 1].mean()) - mean) < 0.2 and abs(float(ode[:, 1].std()) - std) < 0.15
    # Still conditioned: the unconditional mean of x1 is 0.28.
    assert float(ode[:, 1].mean()) < 0.0


def test_pc_inpaint_equals_inpaint_without_corrector():
    """With no corrector, one replacement per step in both: bit-identical runs."""
    x_known, mask = _known(0.5, n=64)
    outs = [
        fn(
            PCSampler(SDE_, corrector=None, num_steps=50),
            GM.score_fn(SDE_),
            x_known,
            mask,
            generator=torch.Generator().manual_seed(3),
        )
        for fn in (inpaint, pc_inpaint)
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("known_noise", ["fresh", "fixed", "mean"])
def test_inpaint_images_masks_and_determinism(known_noise):
    """[B, C, H, W] data with a broadcast 0/1 mask; the known pixels come back exactly; the
    same seed gives the same output; the user's callback runs after the replacement."""
    from scoresde.toy import random_mixture

    gm = random_mixture(8, 3, seed=1)
    x_known = gm.sample(16, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x_known = x_known.reshape(16, 2, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]])[None]
    seen = []

    def callback(step, t, x):
        seen.append(t)

    def run():
        return inpaint(
            DDIMSampler(SDE_, num_steps=10),
            gm.score_fn(SDE_),
            x_known,
            mask,
            generator=torch.Generator().manual_seed(5),
            known_noise=known_noise,
            callback=callback,
        )

    a, b = run(), run()
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == x_known.shape
    assert torch.equal(a[:, mask[0].bool()], x_known[:, mask[0].bool()])
    assert len(seen) == 20 and torch.isfinite(a).all()


def test_inpaint_argument_errors():
    x_known, mask = _known(0.0, n=4)
    sampler = DDIMSampler(SDE_, num_steps=5)
    score = GM.score_fn(SDE_)
    with pytest.raises(TypeError, match="sampler"):
        inpaint("ddim", score, x_known, mask)
    with pytest.raises(ValueError, match="mask must be boolean or contain only 0 and 1"):
        inpaint(sampler, score, x_known, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="mask of shape"):
        inpaint(sampler, score, x_known, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="known_noise"):
        inpaint(sampler, score, x_known, mask, known_noise="zero")
    with pytest.raises(TypeError, match="PCSampler"):
        pc_inpaint(sampler, score, x_known, mask)
    with pytest.raises(ValueError, match="fixed-step sampler"):
        inpaint(ODESampler(SDE_, method="dopri5"), score, x_known, mask)
    with pytest.raises(ValueError, match="x_init"):
        inpaint(sampler, score, x_known, mask, x_init=torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("method", ["replace", "smc", "repaint", "pc"])
def test_unknown_entries_may_be_nan_but_known_ones_must_be_finite(method):
    """Users mark what they do not know with NaN: ignored, the same samples as with zeros
    there. A NaN on the mask is their error, named as x_known (not blamed on the score)."""
    x_known, mask = _known(0.0, n=4)
    holey = torch.where(mask.expand_as(x_known), x_known, torch.nan)
    score = GM.score_fn(SDE_)

    def run(x):
        if method == "pc":
            return pc_inpaint(PCSampler(SDE_, num_steps=30), score, x, mask,
                              generator=torch.Generator().manual_seed(2))  # fmt: skip
        kw = dict(particles=4) if method == "smc" else {}
        sampler = DDIMSampler(SDE_, num_steps=6, eta=1.0)  # smc and repaint need noise
        return inpaint(sampler, score, x, mask, method=method,
                       generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip

    zeros = torch.where(mask.expand_as(x_known), x_known, 0.0)
    assert torch.equal(run(holey), run(zeros)) and torch.isfinite(run(holey)).all()
    bad = x_known.clone()
    bad[2, mask.expand_as(x_known)[2]] = torch.nan
    with pytest.raises(ValueError, match=r"x_known must be finite.*row 2.*where mask is True"):
        run(bad)
