"""AdaptiveSDESampler: the per-sample Brownian path with memory (rejection sampling with
memory), unbiased samples on N(0, I) (the published algorithm's redraw-on-rejection gives
std ~1.26-1.5), the exact mixture on every SDE, honest per-sample NFE accounting, batch
invariance, validation."""

from __future__ import annotations

import pytest
import torch
from _fast_samplers import SDES, assert_mixture, draw

from scoresde import VESDE, VPSDE
from scoresde.guidance import inpaint
from scoresde.samplers import AdaptiveSDESampler, NonFiniteError
from scoresde.samplers._brownian import BrownianTree
from scoresde.toy import GaussianMixture, random_mixture

CPU = torch.device("cpu")


def _tree(samples: torch.Tensor, dim: int, T: float = 1.0) -> BrownianTree:
    return BrownianTree((7, 11), samples, dim, T, device=CPU, dtype=torch.float64)


def test_the_brownian_tree_is_a_brownian_motion_at_any_times() -> None:
    """W(s) ~ N(0, s) (W(0) = 0), increments over disjoint intervals at random, non-dyadic
    times are independent N(0, length), down to 1e-6; entries are independent."""
    n, dim, T = 20000, 2, 1.1
    tree, gen = _tree(torch.arange(n), dim, T), torch.Generator().manual_seed(0)
    s, t, r = (torch.rand(3, n, generator=gen, dtype=torch.float64) * T).sort(dim=0).values
    w_s, w_t, w_r = tree.query(None, s), tree.query(None, t), tree.query(None, r)
    a = (w_s / s.sqrt()[:, None], (w_t - w_s) / (t - s).sqrt()[:, None])
    b = (w_r - w_t) / (r - t).sqrt()[:, None]
    for z in (*a, b):
        assert z.var(0) == pytest.approx(torch.ones(dim, dtype=torch.float64), rel=0.04)
        assert z.mean(0).abs().max() < 4 / n**0.5
    for u, v in [(a[0][:, 0], a[1][:, 0]), (a[1][:, 0], b[:, 0]), (b[:, 0], b[:, 1])]:
        assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.03
    assert float(tree.query(None, torch.zeros(n, dtype=torch.float64)).abs().max()) == 0.0
    h = 1e-6
    small = tree.query(None, s + h) - w_s
    assert float(small.pow(2).mean()) / h == pytest.approx(1.0, rel=0.04)


def test_the_brownian_tree_is_a_function_of_sample_and_time_only() -> None:
    """Any order of queries, any subset of rows, any batch holding the sample: same values."""
    n, dim = 6, 3
    tree = _tree(torch.arange(n), dim)
    q = torch.tensor([0.7, 0.2, 0.5, 1.0, 0.3, 0.0], dtype=torch.float64)
    first = tree.query(None, q)
    tree.query(None, q.flip(0))
    idx = torch.tensor([4, 1, 2])
    torch.testing.assert_close(tree.query(idx, q[idx]), first[idx], rtol=0, atol=0)
    shifted = _tree(torch.arange(3, 5), dim)  # samples 3 and 4 of a larger run
    torch.testing.assert_close(shifted.query(None, q[3:5]), first[3:5], rtol=0, atol=0)
    other_key = BrownianTree((7, 12), torch.arange(n), dim, 1.0, device=CPU, dtype=torch.float64)
    assert not torch.equal(other_key.query(None, q)[:3], first[:3])


def test_the_sample_is_continuous_in_the_solvers_decisions() -> None:
    """Every sample integrates one fixed Brownian path: a tighter tolerance (other steps)
    moves samples by about the solver's error, and so does a score perturbed in the 7th digit
    (a network rounding differently for another batch size), which flips accept/reject
    decisions. Before, the noise was drawn per iteration and a sample continued on other
    draws: medians 3.6 and 0.33 here instead of .03 and .035."""
    sde = VPSDE()
    exact = random_mixture(2, 3, scale=2.0, seed=4).score_fn(sde)

    def run(rtol: float, score=exact) -> tuple[torch.Tensor, torch.Tensor]:
        sampler = AdaptiveSDESampler(sde, rtol=rtol, atol=rtol)
        x = sampler.sample(score, (200, 2), generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)  # fmt: skip
        return x, sampler.accepted_steps

    def median_distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm(dim=1).median())

    ref, _ = run(1e-3)
    coarse, steps = run(3e-2)
    mid, _ = run(1e-2)
    assert median_distance(mid, ref) < 0.75 * median_distance(coarse, ref) < 0.075

    def rounded(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = exact(x, t)
        return s * (1 + 1e-7 * torch.sin(1e4 * s))

    perturbed, steps_p = run(3e-2, rounded)
    assert int((steps_p != steps).sum()) > 50  # decisions flipped
    assert median_distance(perturbed, coarse) < 0.1
    assert float((perturbed - coarse).norm(dim=1).quantile(0.9)) < 0.3


@pytest.mark.parametrize(
    ("dim", "sde", "rtol"),
    [(1, VPSDE(), 5e-2), (2, VPSDE(), 1e-2), (1, VESDE(), 5e-2)],
    ids=["1d-vp-5e-2", "2d-vp-1e-2", "1d-ve-5e-2"],
)
def test_standard_normal_std_is_unbiased(dim: int, sde, rtol: float) -> None:
    """N(0, I) data (exact score): std 1 within 3% (n = 8000: sd of the std ~0.8%). Redrawing
    the noise after a rejection, as published, gives ~1.26 (2-D) and ~1.5 (1-D)."""
    gm = GaussianMixture([1.0], torch.zeros(1, dim), torch.ones(1))
    sampler = AdaptiveSDESampler(sde, rtol=rtol)
    x = draw(sampler, sde, n=8000, gm=gm)
    assert (x.std(0) - 1).abs().max() < 0.03, x.std(0)
    assert x.mean(0).abs().max() < 0.04
    assert sampler.rejected_steps.sum() > 0  # the test exercises rejections


@pytest.mark.parametrize(
    ("sde_name", "rtol"), [("vp", 1e-2), ("subvp", 2e-2), ("ve", 2e-2), ("cosine", 2e-2)]
)
def test_mixture_distribution(sde_name: str, rtol: float) -> None:
    sde = SDES[sde_name]
    assert_mixture(draw(AdaptiveSDESampler(sde, rtol=rtol), sde, n=3000))


def test_nfe_is_counted_per_call_on_the_active_subset() -> None:
    """Each call is one NFE and sees only unfinished samples: per accepted step a fresh
    s(x, t) and s(x', t - h), per rejected step only s(x', t - h) (s(x, t) is reused), plus
    the final denoising call on the whole batch."""
    sde = VPSDE()
    gm = random_mixture(3, 2, seed=0)
    rows: list[int] = []
    score = gm.score_fn(sde)

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        return score(x, t)

    sampler = AdaptiveSDESampler(sde, rtol=5e-2)
    x = sampler.sample(counting, (40, 3), generator=torch.Generator().manual_seed(0))
    acc, rej = sampler.accepted_steps, sampler.rejected_steps
    assert x.shape == (40, 3) and acc.shape == rej.shape == (40,)
    assert sampler.nfe == len(rows)
    assert sum(rows) == int(2 * acc.sum() + rej.sum()) + 40
    assert rows[-1] == 40 and min(rows) < 40  # finished samples drop out of the calls
    assert bool((acc > 0).all()) and acc.unique().numel() > 1  # per-sample step sizes


def test_batch_invariance_and_determinism() -> None:
    sde = VPSDE()
    gm = random_mixture(2, 3, seed=1)
    sampler = AdaptiveSDESampler(sde, rtol=5e-2)
    kw = dict(dtype=torch.float64, batch_invariant=True)
    small = sampler.sample(
        gm.score_fn(sde), (5, 2), generator=torch.Generator().manual_seed(3), **kw
    )
    big = sampler.sample(
        gm.score_fn(sde), (12, 2), generator=torch.Generator().manual_seed(3), **kw
    )
    torch.testing.assert_close(small, big[:5], rtol=1e-9, atol=1e-9)
    again = sampler.sample(
        gm.score_fn(sde), (12, 2), generator=torch.Generator().manual_seed(3), **kw
    )
    assert torch.equal(big, again)
    other = sampler.sample(
        gm.score_fn(sde), (12, 2), generator=torch.Generator().manual_seed(4), **kw
    )
    assert not torch.allclose(big, other)


def test_image_shape_float32_and_no_denoise() -> None:
    sde = VPSDE()
    gm = random_mixture(16, 2, seed=2)
    sampler = AdaptiveSDESampler(sde, rtol=5e-2, denoise=False, extrapolate=False)
    x = sampler.sample(gm.score_fn(sde), (6, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, 1, 4, 4) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert sampler.nfe >= 2 * int(sampler.accepted_steps.max())


def test_callback_gets_per_sample_times_and_a_replacement_refreshes_the_score() -> None:
    """The callback sees each sample's own time `[B]` (non-increasing, eps once finished);
    a no-op callback changes nothing (same NFE, same samples); after a replacement (returned
    or in place) the next call re-evaluates s(x, t) at the replaced rows."""
    sde = VPSDE()
    gm = random_mixture(3, 2, seed=0)
    score = gm.score_fn(sde)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((x.clone(), t.clone()))
        return score(x, t)

    def run(callback) -> torch.Tensor:
        calls.clear()
        sampler = AdaptiveSDESampler(sde, rtol=5e-2)
        gen = torch.Generator().manual_seed(0)
        out = sampler.sample(recording, (30, 3), generator=gen, dtype=torch.float64, **callback)
        return out, sampler.nfe

    plain, nfe = run({})
    times: list[torch.Tensor] = []
    noop, nfe_noop = run({"callback": lambda i, t, x: times.append(t.clone())})
    assert torch.equal(plain, noop) and nfe_noop == nfe
    t = torch.stack(times)  # [iterations, B]
    assert t.dtype == torch.float64 and t.shape[1] == 30
    assert bool((t[1:] <= t[:-1]).all()) and torch.equal(
        t[-1], torch.full((30,), 1e-3, dtype=torch.float64)
    )
    assert t[len(t) // 2].unique().numel() > 1  # the samples are at different times

    marks: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def replace(i: int, t: torch.Tensor, x: torch.Tensor):
        if i == 5:  # a new tensor: rows 0-9 moved
            new = x.clone()
            new[:10] += 0.5
            marks[i] = (len(calls), new.clone(), t.clone())
            return new
        if i == 9:  # in place, returning None: rows 20-29 moved
            x[20:] -= 0.5
            marks[i] = (len(calls), x.clone(), t.clone())
        return None

    run({"callback": replace})
    for rows in (range(10), range(20, 30)):
        i = 5 if rows[0] == 0 else 9
        n_calls, x_rep, t_rep = marks[i]
        active = [r for r in rows if t_rep[r] > 1e-3]
        assert active
        # The next call is the refresh of s(x, t): it sees the replaced rows at their times.
        x_next, t_next = calls[n_calls]
        for r in active:
            hit = (x_next == x_rep[r]).all(dim=1) & (t_next == t_rep[r])
            assert bool(hit.any()), (i, r)


def test_progress_bar_and_guard_with_per_sample_times(capsys) -> None:
    sde = VPSDE()
    gm = random_mixture(2, 2, seed=0)
    sampler = AdaptiveSDESampler(sde, rtol=5e-2)
    kw = dict(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    quiet = sampler.sample(gm.score_fn(sde), (8, 2), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    shown = sampler.sample(gm.score_fn(sde), (8, 2), progress=True, **kw)
    assert torch.equal(quiet, shown)
    assert "AdaptiveSDESampler" in capsys.readouterr().err

    def poison(i: int, t: torch.Tensor, x: torch.Tensor):
        # NaN in a finished sample (no score call sees it): the guard reports the times.
        done = t <= 1e-3
        return torch.where(done[:, None], float("nan"), x) if bool(done.any()) else None

    with pytest.raises(NonFiniteError, match=r"after step \d+ \(t in \[0\.001, 0\.\d+\]\)"):
        sampler.sample(gm.score_fn(sde), (8, 2), callback=poison, **kw)


def test_inpainting_uses_per_sample_times() -> None:
    """Impute x1 given x0 = -2 on tests/test_guidance.py's two-component mixture: the exact
    p(x1 | x0) has mean -0.500, std 0.354; replacement with this sampler measured
    -0.468 / 0.392 (EM 500 steps: -0.459 / 0.368; sd of the mean ~0.009)."""
    gm = GaussianMixture(
        [0.4, 0.6],
        [[-2.0, -0.5], [2.0, 0.8]],
        [[[0.3, 0.15], [0.15, 0.2]], [[0.25, -0.1], [-0.1, 0.3]]],
    )
    x_known = torch.zeros(2000, 2, dtype=torch.float64)
    x_known[:, 0] = -2.0
    mask = torch.tensor([True, False])
    sampler = AdaptiveSDESampler(VPSDE(), rtol=5e-2)
    gen = torch.Generator().manual_seed(0)
    out = inpaint(sampler, gm.score_fn(VPSDE()), x_known, mask, generator=gen)
    assert torch.equal(out[:, 0], x_known[:, 0])
    assert abs(float(out[:, 1].mean()) + 0.5) < 0.06
    assert abs(float(out[:, 1].std()) - 0.354) < 0.06


def test_max_iters_is_reported() -> None:
    sampler = AdaptiveSDESampler(VPSDE(), rtol=1e-4, atol=1e-6, max_iters=3)
    gm = random_mixture(2, 2, seed=0)
    with pytest.raises(RuntimeError, match="max_iters=3"):
        sampler.sample(gm.score_fn(VPSDE()), (4, 2), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rtol": 0.0}, ValueError, "rtol"),
        ({"atol": -1.0}, ValueError, "atol"),
        ({"rtol": "1e-2"}, TypeError, "rtol"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"h_init": 0.0}, ValueError, "h_init"),
        ({"safety": 1.5}, ValueError, "safety"),
        ({"exponent": 0.0}, ValueError, "exponent"),
        ({"h_max": -1.0}, ValueError, "h_max"),
        ({"extrapolate": 1}, TypeError, "extrapolate"),
        ({"denoise": "yes"}, TypeError, "denoise"),
        ({"max_iters": 1.5}, TypeError, "max_iters"),
    ],
)
def test_validation(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AdaptiveSDESampler(VPSDE(), **kwargs)
