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
from scoresde.samplers._brownian import BrownianMemory
from scoresde.toy import GaussianMixture, random_mixture


def _accept_all(path: BrownianMemory, t: torch.Tensor, q: float, seed: int) -> torch.Tensor:
    """Query W(q) on every row and accept (q at or below every row's time)."""
    qq = torch.full_like(t, q)
    gen = torch.Generator().manual_seed(seed)
    w = path.query(None, t, qq, torch.randn(path.w.shape, generator=gen, dtype=torch.float64))
    path.commit(None, qq, w, torch.ones_like(t, dtype=torch.bool))
    t.fill_(q)
    return w


def test_brownian_memory_is_a_brownian_motion_under_selection() -> None:
    """Queries accepted or rejected by the values they reveal (the selection that biases a
    redraw-on-rejection scheme) still give one Brownian path: W(s) ~ N(0, T - s) with
    independent increments, and a revealed point returns its stored value exactly."""
    n, dim, T = 20000, 2, 1.1
    gen = torch.Generator().manual_seed(0)
    path = BrownianMemory(n, dim, device=torch.device("cpu"), dtype=torch.float64)
    t = torch.full((n,), T, dtype=torch.float64)

    def step(q: torch.Tensor, keep) -> tuple[torch.Tensor, torch.Tensor]:
        w = path.query(None, t, q, torch.randn(n, dim, generator=gen, dtype=torch.float64))
        ok = keep(w)
        path.commit(None, q, w, ok)
        t.copy_(torch.where(ok, q, t))
        return w, ok

    w_a, ok_a = step(torch.full_like(t, 0.6), lambda w: w[:, 0] > 0)  # keep W(0.6) > 0 only
    # Rejected rows retry closer (a bridge to the stored W(0.6)); accepted rows go on.
    q_b = torch.full_like(t, 0.9).masked_fill_(ok_a, 0.5)
    w_b, ok_b = step(q_b, lambda w: w[:, 1] > 0)
    # Rows at t = 0.9 ask for 0.6 again (stored: returned exactly); the others jump to 0.45,
    # past revealed points for some, and are rejected when W(0.45) < 0 (stored below them).
    again = t == 0.9
    q_c = torch.full_like(t, 0.45).masked_fill_(again, 0.6)
    w_c, ok_c = step(q_c, lambda w: again | (w[:, 0] >= 0))
    assert torch.equal(w_c[again], w_a[again]) and bool(again.any())
    assert path.times.shape[1] >= 2 and bool((~ok_c).any())  # memory of several points
    # Read W at fixed times below every row's time.
    w = {s: _accept_all(path, t, s, seed=100 + i) for i, s in enumerate((0.45, 0.4, 0.2))}
    for s, ws in w.items():
        assert ws.var(0) == pytest.approx(torch.full((dim,), T - s), rel=0.05), s
        assert ws.mean(0).abs().max() < 4 * ((T - s) / n) ** 0.5
    inc1, inc2 = w[0.4] - w[0.45], w[0.2] - w[0.4]
    assert inc1.var(0) == pytest.approx(torch.full((dim,), 0.05), rel=0.05)
    assert inc2.var(0) == pytest.approx(torch.full((dim,), 0.2), rel=0.05)
    for a, b in [(inc1[:, 0], inc2[:, 0]), (w[0.45][:, 0], inc1[:, 0]), (inc1[:, 0], inc1[:, 1])]:
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.03
    # The selected values stay: E[W(0.6) | accepted at 0.6] is positive, and W(0.45) of
    # those rows still continues from them (the path was not redrawn).
    assert float(w_a[ok_a, 0].min()) > 0
    rows = ok_a & ok_b
    assert (w[0.45][rows] - w_b[rows]).var(0) == pytest.approx(torch.full((dim,), 0.05), rel=0.1)


def test_brownian_memory_subset_queries_match_full_queries() -> None:
    """Querying a subset of rows (idx) gives those rows' values from the full query."""
    n, dim = 6, 3
    full = BrownianMemory(n, dim, device=torch.device("cpu"), dtype=torch.float64)
    part = BrownianMemory(n, dim, device=torch.device("cpu"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    t = torch.ones(n, dtype=torch.float64)
    idx = torch.tensor([4, 1, 2])
    for q_val in (0.7, 0.8, 0.5, 0.75, 0.3):
        q = torch.full((n,), q_val, dtype=torch.float64).minimum(t)
        z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        w = full.query(None, t, q, z)
        ok = w[:, 0] > -0.3
        full.commit(None, q, w, ok)
        w_sub = part.query(idx, t[idx], q[idx], z[idx])
        part.commit(idx, q[idx], w_sub, ok[idx])
        torch.testing.assert_close(w_sub, w[idx], rtol=0, atol=0)
        t = torch.where(ok, q, t)


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
