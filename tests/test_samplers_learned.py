"""Bespoke multistep solvers (scoresde.samplers.learned, calibrate(method="solver")): the
recursion reproduces DPM-Solver++ exactly, a fit lowers the pathwise error on fresh draws of
an exact model, and the fitted solver round-trips through the calibration file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scoresde import DDIMSampler, DPMSolverSampler
from scoresde.calibration import (
    Calibration,
    calibrate,
    calibrated_sampler,
    load_calibrations,
    save_calibrations,
)
from scoresde.samplers import LearnedMultistepSampler
from scoresde.samplers.learned import fit_multistep, unrolled
from scoresde.samplers.schedules import pathwise_error, pf_ode_reference
from scoresde.sdes import VESDE, VPSDE, SubVPSDE
from scoresde.toy import GaussianMixture
from scoresde.training import build_model


def _mixture(dim: int, k: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.3 * torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.ones(k, dtype=torch.float64), means, stds**2)


def _score(gm: GaussianMixture, sde):
    return gm.score_fn(sde)


@pytest.mark.parametrize(
    "sde, kw",
    [
        (VPSDE(), dict(order=3)),
        (VPSDE(), dict(order=2, corrector=False)),
        (VESDE(), dict(order=3, time_grid="logsnr")),
        (SubVPSDE(), dict(order=1)),
        (VPSDE(), dict(order=3, interpolation="t", time_grid="karras")),
    ],
)
def test_unrolled_recursion_is_the_dpm_solver(sde, kw) -> None:
    gm = _mixture(3, 4, seed=21)
    score = _score(gm, sde)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = z * sde.prior_std
    dpm = DPMSolverSampler(sde, 7, **kw)
    learned = LearnedMultistepSampler(sde, *unrolled(dpm))
    a = dpm.sample(score, None, x_init=z)
    b = learned.sample(score, None, x_init=z)
    assert learned.nfe == dpm.nfe == 7
    torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)


def _draws(sde, score, eps: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """768 prior draws in 3-D and their tight probability-flow solves to eps."""
    x = torch.randn(768, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, pf_ode_reference(sde, score, x, eps, rtol=1e-8)


def _fit_case(mixture_seed: int, pilot_seed: int):
    """(sde, exact score of a 3-component 3-D mixture no setting was chosen on, a 6-step
    DPMSolverSampler, pilots and their references)."""
    sde = VPSDE()
    score = _score(_mixture(3, 3, seed=mixture_seed), sde)
    dpm = DPMSolverSampler(sde, 6)
    return sde, score, dpm, *_draws(sde, score, dpm.eps, pilot_seed)


def test_fit_lowers_the_error_on_fresh_draws_of_an_exact_model() -> None:
    sde, score, dpm, pilots, ref = _fit_case(33, 8)
    fitted, info = fit_multistep(score, sde, unrolled(dpm), pilots, ref, iterations=120)
    assert info["error"] < info["initial_error"] and info["gradients"] == 120
    fresh, fresh_ref = _draws(sde, score, dpm.eps, 9)
    before = pathwise_error(dpm, score, fresh, fresh_ref)
    after = pathwise_error(fitted, score, fresh, fresh_ref)
    assert after < 0.7 * before, (before, after)
    assert fitted.nfe == 6 and fitted.times[0] == sde.T
    assert all(a > b for a, b in zip(fitted.times, fitted.times[1:], strict=False))


def test_minibatch_fit_lowers_the_error_on_fresh_draws() -> None:
    sde, score, dpm, pilots, ref = _fit_case(34, 10)
    sizes = []

    def count(x, t):
        sizes.append(x.shape[0])
        return score(x, t)

    fitted, info = fit_multistep(count, sde, unrolled(dpm), pilots, ref, iterations=150,
                                 batch_size=96)  # fmt: skip
    assert info["error"] < info["initial_error"] and info["gradients"] == 150
    assert sizes.count(96) == 150 * 6  # every training pass on a batch; validations on 192
    fresh, fresh_ref = _draws(sde, score, dpm.eps, 11)
    before = pathwise_error(dpm, score, fresh, fresh_ref)
    after = pathwise_error(fitted, score, fresh, fresh_ref)
    assert after < 0.8 * before, (before, after)
    with pytest.raises(ValueError, match="batch_size"):
        fit_multistep(score, sde, unrolled(dpm), pilots, ref, batch_size=0)


def test_calibrate_solver_round_trips_and_is_used(tmp_path: Path) -> None:
    sde = VPSDE()
    gm = _mixture(2, 3, seed=44)
    score = _score(gm, sde)
    sampler = DPMSolverSampler(sde, 5)
    gen = torch.Generator().manual_seed(2)
    cal = calibrate(
        score,
        sampler,
        data_shape=(2,),
        method="solver",
        num_pilot=64,
        max_evals=30,
        fit_pilots=1024,
        fit_iterations=60,
        test_pilots=512,
        generator=gen,
    )
    assert cal.extra["fit_pilots"] == 1024 and cal.extra["test_pilots"] == 512
    assert cal.extra["fit_backward_passes"] == 60 * 5
    assert cal.nfe > 60 * 5  # grid runs, the references and the fit's forward passes
    # (With 256 pilots and 40 steps the held-out quarter favoured a fit that is worse on
    # fresh draws, .088 -> .106; the test pilots reject that one.)
    assert cal.solver is not None, cal.extra  # kept: it beats the grid on the test pilots
    assert cal.extra["test_error"] < cal.extra["test_initial_error"]
    assert "bespoke" in cal.describe()
    save_calibrations(tmp_path / "c.json", [cal])
    (back,) = load_calibrations(tmp_path / "c.json")
    assert back == cal
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = cal.make_sampler(sde).sample(score, None, x_init=z)
    b = back.make_sampler(sde).sample(score, None, x_init=z)
    assert torch.equal(a, b) and isinstance(back.make_sampler(sde), LearnedMultistepSampler)

    class Holder:
        calibrations = [back]

    Holder.sde = sde
    used, which = calibrated_sampler(Holder(), DPMSolverSampler(sde, 5))
    assert which is back and isinstance(used, LearnedMultistepSampler)
    assert calibrated_sampler(Holder(), DPMSolverSampler(sde, 6))[1] is None


def test_the_fit_is_kept_only_for_a_gain_on_fresh_test_pilots(monkeypatch) -> None:
    """The keep-or-reject decision is made on the test pilots (drawn after the fit's, never
    seen by the fit): its recorded errors and z are those of the grid and the candidate on
    them, and a rejected candidate is recorded, the same as the one that would be kept."""
    import scoresde.calibration as calibration
    from scoresde.samplers.learned import _gain_z

    sde = VPSDE()
    score = _score(_mixture(2, 4, seed=57), sde)
    sampler = DPMSolverSampler(sde, 4)
    kw = dict(data_shape=(2,), method="solver", num_pilot=48, max_evals=20, fit_pilots=192)
    kw.update(fit_iterations=30, test_pilots=384)
    cal = calibrate(score, sampler, generator=torch.Generator().manual_seed(8), **kw)
    drawn = calibration._solver_pilots(
        "dpm", sampler, (2,), 48, 192, 30, None, 384, torch.Generator().manual_seed(8), None,
        torch.float64,
    )  # fmt: skip
    x_test = drawn[192:]
    assert drawn.shape == (576, 2)
    ref = pf_ode_reference(sde, score, x_test, sampler.eps)  # alone, as calibrate solves it
    candidate = cal.solver or cal.extra["rejected_solver"]
    grid = DPMSolverSampler(sde, 4, time_grid=cal.grid())
    sq = [
        (s.sample(score, None, x_init=x_test) - ref).flatten(1).square().sum(1)
        for s in (grid, LearnedMultistepSampler(sde, **candidate))
    ]
    assert cal.extra["test_initial_error"] == pytest.approx(float(sq[0].mean().sqrt()), rel=1e-9)
    assert cal.extra["test_error"] == pytest.approx(float(sq[1].mean().sqrt()), rel=1e-9)
    z = _gain_z(sq[0], sq[1], moved=True)
    assert cal.extra["test_gain_z"] == pytest.approx(z, rel=1e-6)
    assert (cal.solver is not None) == (z > 2 and sq[1].mean() < sq[0].mean())
    monkeypatch.setattr(calibration, "_MIN_GAIN_Z", math.inf)
    strict = calibrate(score, sampler, generator=torch.Generator().manual_seed(8), **kw)
    assert strict.solver is None and strict.extra["rejected_solver"] == candidate
    assert "bespoke" not in strict.describe()


def test_the_fit_does_not_depend_on_the_number_of_test_pilots() -> None:
    """The test pilots are drawn after the fit's and reference-solved apart from them, so
    more test pilots change the keep decision's power, never the candidate fitted."""
    sde = VPSDE()
    score = _score(_mixture(3, 5, seed=61), sde)
    sampler = DPMSolverSampler(sde, 4)
    kw = dict(data_shape=(3,), method="solver", num_pilot=48, max_evals=20, fit_pilots=160)
    fits = [
        calibrate(score, sampler, fit_iterations=25, test_pilots=n,
                  generator=torch.Generator().manual_seed(4), **kw)
        for n in (64, 640)
    ]  # fmt: skip
    assert [c.extra["test_pilots"] for c in fits] == [64, 640]
    assert fits[0].time_grid == fits[1].time_grid
    candidates = [c.solver or c.extra["rejected_solver"] for c in fits]
    assert candidates[0] == candidates[1]
    for key in ("solver_initial_error", "solver_error", "solver_gain_z"):
        assert fits[0].extra[key] == fits[1].extra[key]
    assert fits[0].extra["test_error"] != fits[1].extra["test_error"]


def test_version_1_files_still_load(tmp_path: Path) -> None:
    entry = dict(
        sampler="dpm",
        num_steps=2,
        settings={"order": 3},
        time_grid=[1.0, 0.5, 0.001],
        base_grid="quadratic",
        sde={"name": "vp"},
        nfe=10,
        num_pilot=4,
        pilot_error=0.1,
        initial_error=0.2,
    )
    path = tmp_path / "c.json"
    data = {"format": "scoresde.calibration", "version": 1, "calibrations": [entry]}
    path.write_text(json.dumps(data))
    (cal,) = load_calibrations(path)
    assert cal.solver is None and cal.time_grid == [1.0, 0.5, 0.001]


def test_score_model_fit_leaves_the_weights_alone() -> None:
    model = build_model(VPSDE(), "mlp", (2,), net_kwargs={"hidden": 16, "num_blocks": 1}).eval()
    before = [p.detach().clone() for p in model.parameters()]
    cal = model.calibrate(
        DPMSolverSampler(model.sde, 4),
        method="solver",
        num_pilot=32,
        max_evals=10,
        fit_pilots=128,
        fit_iterations=10,
        test_pilots=64,
    )
    assert cal.extra["fit_iterations"] == 10 and model.calibrations[-1] is cal
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_arguments_are_named() -> None:
    sde = VPSDE()
    score = _score(_mixture(2, 2, seed=1), sde)
    with pytest.raises(ValueError, match="method"):
        calibrate(score, DPMSolverSampler(sde, 4), data_shape=(2,), method="nope")
    with pytest.raises(ValueError, match="method='solver'"):
        calibrate(score, DDIMSampler(sde, 4), data_shape=(2,), method="solver")
    with pytest.raises(ValueError, match="fit_pilots"):
        calibrate(score, DPMSolverSampler(sde, 4), data_shape=(2,), method="solver", fit_pilots=8)
    with pytest.raises(ValueError, match="fit_batch"):
        calibrate(score, DPMSolverSampler(sde, 4), data_shape=(2,), method="solver", fit_batch=0)
    with pytest.raises(ValueError, match="test_pilots"):
        calibrate(score, DPMSolverSampler(sde, 4), data_shape=(2,), method="solver", test_pilots=1)
    t, r, w, eps = unrolled(DPMSolverSampler(sde, 3))
    bad = [row[:] for row in w]
    bad[0][2] = 1.0
    with pytest.raises(ValueError, match="lower triangular"):
        LearnedMultistepSampler(sde, t, r, bad, eps)
    with pytest.raises(ValueError, match="ratios"):
        LearnedMultistepSampler(sde, t, r[:2], w, eps)
    with pytest.raises(ValueError, match="times"):
        LearnedMultistepSampler(sde, [0.5, 0.7, 0.1], r, w, eps)
    with pytest.raises(ValueError, match="deterministic"):
        unrolled(DPMSolverSampler(sde, 3, stochastic=True))
    with pytest.raises(ValueError, match="solver"):
        Calibration.from_dict(
            dict(
                sampler="dpm",
                num_steps=2,
                settings={},
                time_grid=[1.0, 0.5, 0.001],
                base_grid="quadratic",
                sde={},
                nfe=1,
                num_pilot=1,
                pilot_error=0.1,
                initial_error=0.1,
                solver={"times": [1.0]},
            )
        )


def test_times_stay_strictly_decreasing_when_pushed_to_the_end() -> None:
    from scoresde.samplers.learned import _Recursion

    sde = VPSDE()
    start = unrolled(DPMSolverSampler(sde, 6))
    fit = _Recursion(_score(_mixture(2, 2, seed=5), sde), sde, start, torch.zeros(4, 2))
    with torch.no_grad():
        fit.params[2].fill_(100.0)  # every interior time past eps
    fit.project()
    sampler = fit.result()  # raised "times must decrease strictly" before the projection fix
    assert all(a > b for a, b in zip(sampler.times, sampler.times[1:], strict=False))
    assert sampler.times[-1] > sampler.eps


def test_a_fit_that_never_left_the_grid_is_rejected_with_no_gain(monkeypatch) -> None:
    """If no iterate beat the start, the candidate is the grid's own solver: its test z is 0
    (not the rounding noise between two equal samplers) and it is not kept."""
    import scoresde.samplers.learned as learned

    def unmoved(score_fn, sde, start, x_T, x_ref, **kw):
        info = dict(initial_error=0.1, error=0.1, gain_z=0.0, train_error=0.1)
        info.update(iterations=kw["iterations"], gradients=0, best_iteration=-1)
        return LearnedMultistepSampler(sde, *start), info

    monkeypatch.setattr(learned, "fit_multistep", unmoved)
    sde = VPSDE()
    score = _score(_mixture(2, 3, seed=61), sde)
    cal = calibrate(score, DPMSolverSampler(sde, 4), data_shape=(2,), method="solver",
                    num_pilot=32, max_evals=8, fit_pilots=128, fit_iterations=5,
                    test_pilots=64)  # fmt: skip
    assert cal.solver is None and cal.extra["test_gain_z"] == 0.0
    assert cal.extra["test_error"] == pytest.approx(cal.extra["test_initial_error"], rel=1e-9)
