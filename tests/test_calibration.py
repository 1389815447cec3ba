"""Sampler calibrations saved with the model (scoresde.calibration, ScoreModel.calibrate):
the NFE are counted, the result round-trips through save_pretrained / from_pretrained, it is
used only for exactly the configuration it was tuned for, and `scoresde sample` uses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scoresde import DDIMSampler, DPMSolverSampler, SASolverSampler
from scoresde.calibration import (
    CALIBRATION_NAME,
    Calibration,
    calibrate,
    calibrated_sampler,
    find_calibration,
)
from scoresde.checkpoints import CheckpointError
from scoresde.cli import main
from scoresde.nets import ScoreModel
from scoresde.samplers.schedules import pathwise_error, pf_ode_reference
from scoresde.sdes import VESDE, VPSDE
from scoresde.toy import GaussianMixture
from scoresde.training import build_model


def _model(dim: int = 2) -> ScoreModel:
    model = build_model(VPSDE(), "mlp", (dim,), net_kwargs={"hidden": 16, "num_blocks": 1})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-trivial score: perturb the (near-zero) residual network
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def calibrated_model() -> ScoreModel:
    torch.manual_seed(0)
    model = _model()
    model.calibrate(DPMSolverSampler(model.sde, 4), num_pilot=48, max_evals=25)
    return model


def test_nfe_is_counted_and_the_grid_is_no_worse_on_the_pilots() -> None:
    model = _model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    cal = model.calibrate(DPMSolverSampler(model.sde, 4, order=2), num_pilot=32, max_evals=20)
    assert cal.nfe == len(calls) > 20 * 3  # 20 sampler runs of >= 3 evaluations + the reference
    assert cal.num_pilot == 32 and cal.sampler == "dpm" and cal.num_steps == 4
    assert cal.settings["order"] == 2 and cal.settings["corrector"] is True
    assert cal.sde == {"name": "vp", **{k: v for k, v in model.sde.config().items() if k != "name"}}
    assert cal.pilot_error <= cal.initial_error
    grid = cal.grid()
    assert grid.shape == (5,) and float(grid[0]) == model.sde.T and float(grid[-1]) == 1e-3
    assert bool((grid[1:] < grid[:-1]).all())
    assert model.calibrations == [cal]
    # Calibrating the same configuration again replaces it; another one is added.
    again = model.calibrate(DPMSolverSampler(model.sde, 4, order=2), num_pilot=8, max_evals=4)
    other = model.calibrate(DPMSolverSampler(model.sde, 3), num_pilot=8, max_evals=4)
    assert model.calibrations == [again, other]


def test_round_trip_through_save_pretrained(tmp_path: Path, calibrated_model) -> None:
    model = calibrated_model
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == [
        CALIBRATION_NAME,
        "config.json",
        "model.safetensors",
    ]
    loaded = ScoreModel.from_pretrained(folder)
    assert loaded.calibrations == model.calibrations  # floats exactly (JSON repr)
    sampler, cal = calibrated_sampler(loaded, DPMSolverSampler(loaded.sde, 4))
    assert cal == model.calibrations[0]
    assert torch.equal(sampler.time_grid, cal.grid()) and sampler.order == 3
    # Saving the model again without calibrations removes the stale file (new weights).
    loaded.calibrations = []
    loaded.save_pretrained(folder)
    assert not (folder / CALIBRATION_NAME).exists()
    assert ScoreModel.from_pretrained(folder).calibrations == []


def test_only_the_exact_configuration_uses_it(calibrated_model) -> None:
    model = calibrated_model
    cals, sde = model.calibrations, model.sde
    assert find_calibration(cals, DPMSolverSampler(sde, 4)) is not None
    for other in (
        DPMSolverSampler(sde, 5),  # another step count
        DPMSolverSampler(sde, 3),
        DPMSolverSampler(sde, 4, order=2),  # another setting
        DPMSolverSampler(sde, 4, corrector=False),
        DPMSolverSampler(sde, 4, eps=1e-2),
        DPMSolverSampler(sde, 4, time_grid="logsnr"),  # another default grid
        DPMSolverSampler(sde, 4, time_grid=torch.linspace(1, 1e-3, 5)),  # the user's own grid
        DPMSolverSampler(VPSDE(beta_max=15.0), 4),  # another SDE
        DDIMSampler(sde, 4),  # another sampler
        SASolverSampler(sde, 4),
    ):
        assert find_calibration(cals, other) is None, other
        sampler, cal = calibrated_sampler(model, other)
        assert sampler is other and cal is None


def test_refuses_stochastic_samplers_and_bad_files(tmp_path: Path, calibrated_model) -> None:
    model = calibrated_model
    with pytest.raises(ValueError, match="deterministic"):
        model.calibrate(DPMSolverSampler(model.sde, 4, stochastic=True), num_pilot=4)
    with pytest.raises(ValueError, match="deterministic"):
        model.calibrate(DDIMSampler(model.sde, 4, eta=0.5), num_pilot=4)
    with pytest.raises(ValueError, match="deterministic"):
        model.calibrate(SASolverSampler(model.sde, 4), num_pilot=4)
    folder = model.save_pretrained(tmp_path / "m")
    data = json.loads((folder / CALIBRATION_NAME).read_text())
    data["calibrations"][0]["time_grid"] = [1.0, 0.5, 0.7, 0.1, 0.001]  # not decreasing
    (folder / CALIBRATION_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="strictly decreasing"):
        ScoreModel.from_pretrained(folder)
    (folder / CALIBRATION_NAME).write_text("{")
    with pytest.raises(CheckpointError):
        ScoreModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="time_grid"):
        Calibration.from_dict({**model.calibrations[0].to_dict(), "time_grid": [1.0, 0.001]})


def test_a_calibrated_grid_helps_on_fresh_draws_of_an_exact_model() -> None:
    """Held out: tuned on pilots of one seed, evaluated on another (a 3-D mixture, VE SDE;
    neither is used by the benchmarks' tuning)."""
    torch.manual_seed(0)
    gm = GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2]),
        torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.5], [0.0, -1.5, 1.0]]),
        torch.tensor([0.05, 0.1, 0.02]),
    )
    sde = VESDE(sigma_max=5.0)

    score = gm.score_fn(sde)

    sampler = DPMSolverSampler(sde, 6)
    cal = calibrate(score, sampler, data_shape=(3,), num_pilot=128, max_evals=60)
    x_T = sde.prior_sampling((256, 3), generator=torch.Generator().manual_seed(9))
    x_T = x_T.to(torch.float64)
    ref = pf_ode_reference(sde, score, x_T)
    default = pathwise_error(sampler, score, x_T, ref)
    tuned = pathwise_error(cal.make_sampler(sde), score, x_T, ref)
    assert cal.pilot_error < cal.initial_error
    assert tuned < 0.9 * default, (tuned, default)  # measured: .263 against .329


def test_cli_sample_uses_a_matching_calibration(tmp_path: Path, capsys, calibrated_model) -> None:
    folder = calibrated_model.save_pretrained(tmp_path / "m")
    common = ["--num-samples", "16", "--seed", "2", "--sampler", "dpm"]

    def run(name: str, *extra: str) -> tuple[np.ndarray, str]:
        out = tmp_path / f"{name}.npz"
        assert main(["sample", str(folder), *common, "--out", str(out), *extra]) == 0
        return np.load(out)["samples"], capsys.readouterr().out

    tuned, said = run("a", "--steps", "4")
    assert "time grid: calibrated dpm grid (4 steps" in said
    plain, said = run("b", "--steps", "4", "--no-calibration")
    assert "time grid: quadratic (default; --no-calibration" in said
    assert not np.allclose(tuned, plain)  # the grid made a difference
    _, said = run("c", "--steps", "5")
    assert "time grid: quadratic (default; no calibration matches, the model has: dpm 4 steps)" in (
        said
    )
    # The CLI's samples are those of the calibrated sampler itself.
    sampler, cal = calibrated_sampler(calibrated_model, DPMSolverSampler(calibrated_model.sde, 4))
    assert cal is not None
    again, _ = run("d", "--steps", "4")
    assert np.array_equal(again, tuned)


def test_a_v3_calibration_of_a_network_is_saved_and_used_by_the_cli(tmp_path: Path, capsys) -> None:
    """method="ems" on a network (its Jacobian probed through autograd): the plan travels in
    calibration.json and `scoresde sample` runs it."""
    from scoresde.samplers.ems import EMSSampler

    model = _model()
    cal = model.calibrate(DPMSolverSampler(model.sde, 4), method="ems", num_pilot=32,
                          max_evals=10, ems_pilots=32, test_pilots=32)  # fmt: skip
    assert cal.extra["test_pilots"] == 32
    kept = cal.extra["test_error"] < cal.extra["test_initial_error"]
    assert kept == (cal.ems is not None) == ("rejected_ems" not in cal.extra)
    folder = model.save_pretrained(tmp_path / "m")
    loaded = ScoreModel.from_pretrained(folder)
    assert loaded.calibrations == [cal]
    sampler, used = calibrated_sampler(loaded, DPMSolverSampler(loaded.sde, 4))
    assert used == cal and isinstance(sampler, EMSSampler) == (cal.ems is not None)
    out = tmp_path / "s.npz"
    args = ["sample", str(folder), "--num-samples", "8", "--seed", "2", "--steps", "4"]
    assert main([*args, "--sampler", "dpm", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert ("DPM-Solver-v3" in said) == (cal.ems is not None)
    assert np.isfinite(np.load(out)["samples"]).all()
