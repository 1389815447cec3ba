"""The command line keeps the digits of the user's data: files are read and scaled in
float64 and only the scaled data is cast to the model's float32, and samples come back in
float64 data units. Data with a large offset (Unix timestamps near 1.7e9, where float32 has a
spacing of 128) must train, sample and score like the same data without the offset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import SMALL, run_cli

from scoresde.data import load_data
from scoresde.training import read_checkpoint

OFFSET = 1.7e9  # seconds since 1970: float32 steps of 128 here


_run = run_cli


def _table(path: Path, offset: float) -> np.ndarray:
    """300 rows (time, value): times spread over ~100 s after `offset`, in float64."""
    rng = np.random.default_rng(5)
    t = np.round(rng.uniform(0.0, 100.0, 300), 2) + offset
    v = np.round(np.sin(t - offset) + 0.1 * rng.standard_normal(300), 4)
    path.write_text(
        "time,value\n" + "\n".join(f"{a:.2f},{b:.4f}" for a, b in zip(t, v, strict=True)) + "\n"
    )
    return np.stack([t, v], axis=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """The same table with and without the offset, each trained for 20 steps, seed 0."""
    root = tmp_path_factory.mktemp("precision")
    made = {}
    for name, offset in (("plain", 0.0), ("offset", OFFSET)):
        data = _table(root / f"{name}.csv", offset)
        run = root / name
        argv = ["train", str(root / f"{name}.csv"), "--ckpt-dir", str(run), "--steps", "20"]
        assert _run([*argv, "--per-feature", "--plot-every", "0", *SMALL]) == 0
        made[name] = (run, data)
    return made


def test_the_scaler_is_fitted_on_the_float64_data(runs: dict) -> None:
    run, data = runs["offset"]
    scaler = read_checkpoint(run)["config"]["data_scaler"]
    assert torch.as_tensor(scaler["shift"]).tolist() == pytest.approx(data.mean(0), rel=1e-14)
    assert torch.as_tensor(scaler["scale"]).tolist() == pytest.approx(data.std(0, ddof=1), rel=1e-9)


def test_an_offset_leaves_training_and_sampling_unchanged(runs: dict, tmp_path: Path) -> None:
    samples = {}
    for name, (run, _) in runs.items():
        out = tmp_path / f"{name}.npz"
        argv = ["sample", str(run), "--sampler", "ddim", "--steps", "5", "--num", "50"]
        assert _run([*argv, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
        samples[name] = np.load(out)["samples"]
    assert samples["offset"].dtype == np.float64  # data units keep the offset's digits
    times = samples["offset"][:, 0] - OFFSET
    assert len(np.unique(times)) == 50  # not collapsed onto float32's grid of 128 s
    np.testing.assert_allclose(times, samples["plain"][:, 0], atol=1e-4)
    np.testing.assert_allclose(samples["offset"][:, 1], samples["plain"][:, 1], atol=1e-5)


def test_an_offset_leaves_the_likelihood_unchanged(
    runs: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    bpd = {}
    for name, (run, _) in runs.items():
        capsys.readouterr()
        argv = ["likelihood", str(run), "--num", "20", "--rtol", "1e-4", "--device", "cpu"]
        assert _run([*argv, "--quiet"]) == 0
        found = re.search(r"([-\d.]+) \+- [\d.]+ bits/dim", capsys.readouterr().out)
        assert found
        bpd[name] = float(found.group(1))
    assert bpd["offset"] == pytest.approx(bpd["plain"], abs=2e-3)


def test_load_data_names_a_float32_overflow(tmp_path: Path) -> None:
    big = np.array([[1.0, 2.0], [3e39, 4.0]])
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(
        ValueError, match=r"beyond the range of torch.float32: row 1 \(of 1 such rows\) has 3e\+39"
    ):
        load_data(tmp_path / "big.npy")
    x, _ = load_data(tmp_path / "big.npy", dtype=torch.float64)
    assert float(x[1, 0]) == 3e39
    # A NaN in the file is still named as one, before any cast.
    big[0, 1] = np.nan
    np.save(tmp_path / "nan.npy", big)
    with pytest.raises(ValueError, match="rows 0"):
        load_data(tmp_path / "nan.npy")
