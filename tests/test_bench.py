"""The benchmark engine end to end on a tiny configuration, and the harness validation
against PEERS.md (diffusers DDIM, 10 steps, exact model: ode_err .267 on 10,000 samples)."""

from __future__ import annotations

import json

import pytest
import torch

from scoresde._validation import unchecked_times
from scoresde.bench import run
from scoresde.bench.peers import Problem, peer_methods
from scoresde.bench.targets import make_sde, pf_ode_field, reference_solve
from scoresde.metrics import rms_error
from scoresde.toy import benchmark_mixture_2d

METHODS = ["diffusers DDIM", "diffusers UniPC", "torchsde Euler"]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run("peers", "quick", out, methods=METHODS, steps=[10], n=500)
    return out, results


def test_quick_peers_suite_writes_valid_reports(quick_results) -> None:
    out, results = quick_results
    loaded = json.loads((out / "peers.json").read_text())
    rows = loaded["targets"][0]["rows"]
    assert [r["method"] for r in rows] == METHODS
    assert all("error" not in r and r["finite"] for r in rows)
    # NFE counted by the wrapped score: one per step for DDIM/UniPC; torchsde's Euler adds
    # one call of its own (a shape check of the drift) before stepping.
    assert [r["nfe"] for r in rows] == [10, 10, 11]
    md = (out / "peers.md").read_text()
    assert "| diffusers UniPC |" in md and "ode_err" in md
    assert (out / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["targets"][0]["floor"]["nll"] == pytest.approx(1.258, abs=0.15)


def test_harness_reproduces_peers_md(quick_results) -> None:
    rows = {r["method"]: r for r in quick_results[1]["targets"][0]["rows"]}
    # PEERS.md (10,000 samples): DDIM .267, UniPC .143 at 10 steps; across seeds at 10,000
    # samples they vary by about 3 %; at 500 samples the RMS's own sampling error is larger,
    # so the band is +-20 %.
    assert rows["diffusers DDIM"]["ode_err"] == pytest.approx(0.267, rel=0.2)
    assert rows["diffusers UniPC"]["ode_err"] == pytest.approx(0.143, rel=0.2)
    # stochastic: no ode_err; torchsde Euler at 10 steps leaves the last noise in (NLL >> 1.26).
    assert "ode_err" not in rows["torchsde Euler"]
    assert rows["torchsde Euler"]["nll"] > 3.0


def test_diffusers_model_time_mapping_is_exact() -> None:
    # The eps-model is evaluated at the continuous t with alpha(t)^2 = alphas_cumprod[k].
    from diffusers import DDIMScheduler

    from scoresde.bench.peers import _VP_KW, _t_of_abar

    sde = make_sde("vp")
    abar = DDIMScheduler(**_VP_KW).alphas_cumprod.double()
    t = _t_of_abar(sde, abar)
    with unchecked_times():  # t_999 = 1.0034 > T: the schedule's continuation
        torch.testing.assert_close(sde.alpha(t) ** 2, abar, rtol=1e-12, atol=0)
    # ... which is close to, but not, the common shortcut t = (k + 1) / N.
    k = torch.arange(1000, dtype=torch.float64)
    assert (t - (k + 1) / 1000).abs().max() < 5e-3


def test_reference_field_matches_the_probability_flow_ode() -> None:
    sde, mix = make_sde("subvp"), benchmark_mixture_2d()
    x = mix.sample(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score = mix.score_fn(sde)
    for t in (0.01, 0.3, 0.9):
        expected = sde.reverse(score, probability_flow=True).sde(x, t)[0]
        got = pf_ode_field(sde, mix)(torch.tensor(t, dtype=torch.float64), x)
        torch.testing.assert_close(got, expected)


def test_reference_solve_is_converged_and_deterministic_methods_converge() -> None:
    sde, mix = make_sde("vp"), benchmark_mixture_2d()
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_solve(sde, mix, x_T, 1.0, 1e-3)
    # Its error scales with the tolerance (max ~150 tol here): at 1e-9 it moves by < 1e-6,
    # so the 1e-10 reference is good to ~1e-7, far below every ode_err the suite reports.
    looser = reference_solve(sde, mix, x_T, 1.0, 1e-3, rtol=1e-9, atol=1e-9)
    assert (ref - looser).norm(dim=1).max() < 1e-6
    rk4 = peer_methods()["torchdiffeq rk4"]
    errors = []
    for steps in (20, 40):
        samples, nfe = rk4(Problem(sde, mix), x_T, steps, None)
        assert nfe == 4 * steps
        errors.append(float(rms_error(samples, ref)))
    # A 4th-order method: halving the step cuts the error by ~16 (measured: 0.0008 at 20).
    assert errors[0] < 3e-3 and errors[1] < errors[0] / 6


def test_run_rejects_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="suite"):
        run("nope", "quick", tmp_path)
    with pytest.raises(ValueError, match="mode"):
        run("peers", "slow", tmp_path)
    with pytest.raises(ValueError, match="unknown methods"):
        run("peers", "quick", tmp_path, methods=["no such method"])


def test_likelihood_peer_matches_the_exact_log_density() -> None:
    from scoresde.bench.likelihood import torchdiffeq_log_likelihood
    from scoresde.bench.peers import CountingScore

    sde, mix = make_sde("vp"), benchmark_mixture_2d()
    x = mix.sample(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logp = torchdiffeq_log_likelihood(CountingScore(sde, mix), sde, x, rtol=1e-5)
    # Solver error plus the prior mismatch at T (p_T is not exactly N(0, I)): ~4e-3 nats.
    exact = mix.log_prob_fn(sde)(x, 1e-5)
    assert (logp - exact).abs().max() < 0.03


def test_overhead_counts_steps_with_the_trivial_model() -> None:
    from scoresde.bench.runner import run_overhead

    methods = peer_methods()
    res = run_overhead(
        [methods["diffusers DDIM"], methods["diffusers Heun"]], batch=100, num_steps=4, repeats=1
    )
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["diffusers DDIM"]["nfe_per_step"] == 1.0
    assert rows["diffusers Heun"]["nfe_per_step"] == 7 / 4  # 2 per step, 1 on the last
    assert res["bare_us_per_step"] > 0 and rows["diffusers DDIM"]["ratio_to_bare"] > 0


@pytest.mark.parametrize("kind", ["subvp", "ve"])
def test_other_sdes_share_the_reference(kind: str) -> None:
    # rk4 on the probability-flow ODE of sub-VP / VE converges to the reference solve of the
    # same SDE (the field and the prior scale follow the SDE).
    from scoresde.bench.runner import run_accuracy

    rk4 = peer_methods()["torchdiffeq rk4"]
    block = run_accuracy("mixture2d", [rk4], [10, 40], n=100, sde_kind=kind)
    errs = [r["ode_err"] for r in block["rows"]]
    assert block["sde"] == kind and errs[1] < 2e-3 and errs[1] < errs[0] / 10


def test_overhead_reports_the_noise_floor_and_minimum_times() -> None:
    from scoresde.bench.runner import run_overhead

    res = run_overhead([peer_methods()["diffusers DDIM"]], batch=100, num_steps=3, repeats=2)
    row = res["rows"][0]
    # the update plus a randn of the batch costs more than the update alone, and the
    # reported time (the fastest repeat) is never above the median
    assert res["bare_noise_us_per_step"] > 0 and res["bare_us_per_step"] > 0
    assert row["us_per_step"] <= row["median_us_per_step"]
    # ratios use the references timed interleaved with the method (robust to load changes)
    assert row["ratio_to_bare_noise"] == pytest.approx(
        row["us_per_step"] / row["reference_us"]["noise"]
    )
    assert row["ratio_to_same_update"] == pytest.approx(
        row["us_per_step"] / row["reference_us"]["bare"]
    )
    assert row["stochastic"] is False


def test_best_per_budget_picks_the_lowest_error_within_each_budget() -> None:
    from scoresde.bench.report import best_per_budget

    def row(method, family, nfe, ode_err=None, nll=None):
        r = {"method": method, "family": family, "steps": nfe, "nfe": nfe, "finite": True}
        if ode_err is not None:
            r["ode_err"] = ode_err
        r["nll"] = 1.3 if nll is None else nll
        return r

    block = {
        "floor": {"nll": 1.25},
        "rows": [
            row("a", "scoresde", 10, ode_err=0.1),
            row("a", "scoresde", 20, ode_err=0.01),
            row("b", "scoresde", 12, ode_err=0.05),
            row("p", "diffusers", 10, ode_err=0.2),
            row("p", "diffusers", 20, ode_err=0.08),
            row("s", "scoresde", 50, nll=1.40),
            row("s", "scoresde", 100, nll=1.27),
            row("q", "torchsde", 100, nll=1.20),
            {"method": "broken", "family": "scoresde", "steps": 5, "error": "x"},
        ],
    }
    by_budget = {e["budget"]: e for e in best_per_budget(block, budgets=(5, 10, 15, 100))}
    assert by_budget[5]["ode_scoresde"] is None and by_budget[5]["ode_peer"] is None
    assert by_budget[10]["ode_scoresde"]["ode_err"] == 0.1
    assert by_budget[15]["ode_scoresde"]["method"] == "b"  # 12 NFE fits a budget of 15
    assert by_budget[100]["ode_scoresde"]["ode_err"] == 0.01
    assert by_budget[100]["ode_peer"]["ode_err"] == 0.08
    # stochastic rows are ranked by |NLL - NLL of true samples|: 0.02 beats 0.05
    assert by_budget[100]["sde_scoresde"]["nll"] == 1.27
    assert by_budget[100]["sde_peer"]["method"] == "q"
    assert by_budget[15]["sde_scoresde"] is None


def test_scoresde_samplers_run_in_the_harness() -> None:
    from scoresde.bench.peers import scoresde_methods
    from scoresde.bench.runner import run_accuracy

    methods = scoresde_methods()
    block = run_accuracy(
        "mixture2d",
        [methods["scoresde DPM-Solver++ 2M"], methods["scoresde DDIM eta=1"]],
        [10],
        n=400,
    )
    det, sto = block["rows"]
    # 10 NFE (the corrector reuses the next step's evaluation); measured .080 on 4,000
    # samples, UniPC (the best peer) .143
    assert det["nfe"] == 10 and det["ode_err"] < 0.12
    assert sto["nfe"] == 10 and "ode_err" not in sto and sto["finite"]


def test_likelihood_suite_separates_solver_error_from_prior_mismatch(tmp_path) -> None:
    results = run("likelihood", "quick", tmp_path, n=40)
    rows = {r["setting"]: r for r in results["likelihood"][0]["rows"]}
    per_sample = rows["dopri5_per_sample rtol=atol=0.001"]
    # per-sample steps: a sample alone costs fewer evaluations than the hardest one
    assert per_sample["evals_per_sample"] <= per_sample["nfe"]
    # exact trace at rtol 1e-3: the solver's error (vs a 1e-9 solve) is small ...
    assert per_sample["vs_tight"]["max_abs_err"] < 0.05
    # ... and one Hutchinson probe in 2-D is far noisier than the exact trace
    hutch = rows["dopri5_per_sample rtol=atol=0.001, 1 probe(s)"]
    assert hutch["vs_tight"]["std"] > 10 * per_sample["vs_tight"]["std"]
    assert "| evals/sample |" in (tmp_path / "likelihood.md").read_text()
    # Song et al.'s code on the same points: ratios of time, the exact trace far more accurate
    rows_song = results["song"][0]["rows"]
    base, lean = rows_song[0], rows_song[1]  # Song et al.: 2 model calls per evaluation, 1
    assert base["ratio"] == 1.0 and base["calls"] == 2 * lean["calls"]
    song = {(r["method"], r["setting"], r["dtype"]): r for r in rows_song}
    exact = song[("scoresde exact trace", "dopri5 rtol=atol=0.005", "float64")]
    assert exact["as_accurate"] and exact["mean_abs_err"] < 0.1 * base["mean_abs_err"]
    assert exact["ratio"] > 0
    variables = {r["time_variable"] for r in results["time_variables"][0]["rows"]}
    assert variables == {"t", "sigma"}


def test_cli_bench_quick_mode_writes_every_suite(tmp_path, capsys) -> None:
    """`scoresde bench --quick` (what docs/benchmarks.md calls the CI-size run), end to end."""
    from scoresde.bench import SUITES
    from scoresde.cli import main

    assert main(["bench", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    for suite in SUITES:
        report = json.loads((tmp_path / f"{suite}.json").read_text())
        assert report, suite
        assert (tmp_path / f"{suite}.md").read_text().startswith("#"), suite
        assert (tmp_path / f"{suite}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", suite
    printed = capsys.readouterr().out
    assert "scoresde" in printed and "diffusers" in printed


def test_song_et_al_likelihood_emulation_is_unbiased() -> None:
    """The emulated Song et al. likelihood (scipy RK45, one Hutchinson probe) estimates the
    exact log-density without bias: its mean over 300 samples is within 0.25 nats (the
    single-probe noise is ~1 nat per sample)."""
    pytest.importorskip("scipy")
    from scoresde.bench.likelihood import song_log_likelihood
    from scoresde.bench.peers import CountingScore
    from scoresde.toy import benchmark_mixture_2d

    mix = benchmark_mixture_2d()
    sde = make_sde("vp")
    x = mix.sample(300, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = song_log_likelihood(
        CountingScore(sde, mix), sde, x, rtol=1e-4, generator=torch.Generator().manual_seed(0)
    )
    exact = mix.log_prob_fn(sde)(x, 1e-5)
    assert est.shape == (300,) and torch.isfinite(est).all()
    assert abs(float((est - exact).mean())) < 0.25


def test_quick_overhead_suite_has_no_method_that_fails(monkeypatch, tmp_path) -> None:
    # Every row of `scoresde bench --suite overhead` (quick mode, the default) is measured:
    # each method runs once, untimed, at the quick mode's step count on a tiny batch. At 20
    # steps PCSampler refused the VP chain (betas 20 / N reach 1) and the PC rows read "fails".
    from scoresde.bench import runner
    from scoresde.bench.peers import CountingFn

    class Stop(Exception):
        pass

    seen: dict = {}

    def record(methods, **settings):
        seen.update(settings, methods=list(methods))
        raise Stop

    monkeypatch.setattr(runner, "run_overhead", record)
    with pytest.raises(Stop):
        run("overhead", "quick", tmp_path)
    methods = runner._overhead_methods(seen["methods"])
    names = [m.name for m in methods]
    assert {"scoresde PC", "scoresde PC (no corrector)", "scoresde PC ancestral"} <= set(names)
    problem = Problem(make_sde("vp"), score=CountingFn(lambda x, t: -x))
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    failed = {}
    for method in methods:
        try:
            samples, nfe = method(problem, x_T, seen["num_steps"], torch.Generator().manual_seed(0))
        except Exception as err:
            failed[method.name] = f"{type(err).__name__}: {err}"
            continue
        assert samples.shape == x_T.shape and nfe >= seen["num_steps"], method.name
    assert failed == {}
    assert runner.OVERHEAD_FULL == {"num_steps": 50, "repeats": 15}  # docs/benchmarks.md's run
