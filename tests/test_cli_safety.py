"""The command line never loses a user's work (issue 16): a diverging `train` fails with a
non-zero exit and writes no NaN checkpoint, outputs are not overwritten without
--overwrite, an interrupt saves a checkpoint, and mistakes are caught before the work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli_helpers import SMALL, run_cli

from scoresde.training import read_checkpoint

_run = run_cli


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("scoresde: error: "), err
    return lines[0]


def test_diverging_train_fails_and_writes_no_nan_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "two_moons", "--lr", "1e6", "--steps", "100", "--ckpt-every", "50"]
    assert _run([*argv, "--ckpt-dir", str(run), *SMALL]) == 1
    assert "training diverged" in _error(capsys)
    latest = run / "latest.pt"
    if latest.exists():  # a checkpoint written before the divergence must be finite
        ckpt = read_checkpoint(latest)
        assert all(torch.isfinite(t).all() for t in ckpt["ema"].values())


def test_ckpt_dir_that_is_a_file_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    argv = ["train", "two_moons", "--steps", "100000", "--ckpt-dir", str(afile), *SMALL]
    assert _run(argv) == 1  # (100000 steps would take minutes: refused before training)
    assert "not a folder" in _error(capsys)
    assert afile.read_text() == "mine"


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("safety") / "moons"
    argv = ["train", "two_moons", "--ckpt-dir", str(run), "--steps", "20", "--plot-every", "0"]
    assert _run([*argv, *SMALL]) == 0
    return run


def test_sample_does_not_overwrite_a_users_files(
    run_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    mine = tmp_path / "mydata.npz"
    np.savez(mine, x=np.arange(6.0))
    before = mine.read_bytes()
    argv = ["sample", str(run_2d), "--steps", "3", "--num", "20", "--quiet", "--device", "cpu"]
    assert _run([*argv, "--out", str(mine)]) == 1
    assert "--overwrite" in _error(capsys)
    assert mine.read_bytes() == before
    # The plot beside --out is a user's file as well when the .npz is not there.
    plot = tmp_path / "fresh.png"
    plot.write_bytes(b"my picture")
    assert _run([*argv, "--out", str(tmp_path / "fresh.npz")]) == 1
    assert "fresh.png" in _error(capsys)
    assert plot.read_bytes() == b"my picture" and not (tmp_path / "fresh.npz").exists()
    # A file sample wrote itself is replaced when the command is run again.
    out = tmp_path / "s.npz"
    assert _run([*argv, "--out", str(out)]) == 0
    assert _run([*argv, "--out", str(out), "--seed", "1"]) == 0
    assert np.load(out)["samples"].shape == (20, 2)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # --overwrite replaces a user's file.
    assert _run([*argv, "--out", str(mine), "--overwrite"]) == 0
    assert list(np.load(mine)) == ["samples"]


def test_train_does_not_write_into_a_folder_of_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "loss.png").write_bytes(b"my plot")
    argv = ["train", "two_moons", "--steps", "3", "--ckpt-dir", str(folder), *SMALL]
    assert _run(argv) == 1
    assert "--overwrite" in _error(capsys)
    assert (folder / "loss.png").read_bytes() == b"my plot"
    assert not (folder / "latest.pt").exists()
    # An empty folder (or one with only stale temp files of a killed run) is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".latest.pt.abc.tmp").write_bytes(b"x")
    assert _run(["train", "two_moons", "--steps", "3", "--ckpt-dir", str(empty), *SMALL]) == 0
    assert read_checkpoint(empty)["step"] == 3
    # A run folder is continued with --resume, or started over with --overwrite.
    assert _run(["train", "two_moons", "--steps", "3", "--ckpt-dir", str(empty), *SMALL]) == 1
    assert "--resume" in _error(capsys)
    again = ["train", "two_moons", "--steps", "2", "--ckpt-dir", str(empty), "--overwrite"]
    assert _run([*again, *SMALL]) == 0
    assert read_checkpoint(empty)["step"] == 2
    assert _run([*argv, "--overwrite"]) == 0
    assert read_checkpoint(folder)["step"] == 3


def test_overwrite_clears_the_old_runs_export_and_sample_grids(tmp_path: Path) -> None:
    """A new run over an old one (--overwrite) left the old model/ (loaded silently by
    from_pretrained if the new run was killed) and the old run's sample grids."""
    run = tmp_path / "run"
    argv = ["train", "two_moons", "--steps", "4", "--ckpt-dir", str(run), *SMALL]
    assert _run([*argv, "--plot-every", "2"]) == 0
    assert (run / "model" / "config.json").is_file() and (run / "samples_step0000002.png").exists()
    (run / "notes.txt").write_text("mine")
    from scoresde.cli.train import _clear_previous_run

    _clear_previous_run(run)  # what --overwrite does before the new run starts
    assert not (run / "model").exists() and not list(run.glob("samples_step*.png"))
    assert (run / "notes.txt").read_text() == "mine" and (run / "latest.pt").is_file()
    again = ["train", "two_moons", "--steps", "3", "--ckpt-dir", str(run), "--overwrite"]
    assert _run([*again, "--plot-every", "0", *SMALL]) == 0
    assert read_checkpoint(run)["step"] == 3 and (run / "model" / "config.json").is_file()
    assert not list(run.glob("samples_step*.png"))


def test_sigterm_during_train_saves_a_checkpoint(tmp_path: Path) -> None:
    """Issue 16.4, through a real process: SIGTERM once the first checkpoint exists (so
    training is surely running), then the run stops after its current step, saves it and
    exits with 128 + 15, saying where; --resume continues it."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    argv = ["train", "two_moons", "--steps", "10000000", "--ckpt-every", "20"]
    argv += ["--plot-every", "0", "--ckpt-dir", str(run), "--threads", "1", *SMALL]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scoresde", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "latest.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = err.strip().splitlines()[-1]
    assert "SIGTERM" in line and "--resume" in line and "model exported to" in line, err
    step = int(re.search(r"at step (\d+)", line).group(1))
    ckpt = read_checkpoint(run)
    assert ckpt["step"] == step >= 20 and ckpt["history"].numel() == step
    # model/ is the interrupted step's EMA model, not missing or an older export
    from scoresde import ScoreModel
    from scoresde.training import Trainer

    exported = ScoreModel.from_pretrained(run / "model").state_dict()
    ema = Trainer.from_checkpoint(run, device="cpu", distributed=False).ema_model.state_dict()
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert _run(["train", "two_moons", "--steps", str(step + 2), "--ckpt-dir", str(run),
                 "--resume", *SMALL]) == 0  # fmt: skip
    assert read_checkpoint(run)["step"] == step + 2


def test_likelihood_without_data_says_what_it_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16.5: the recorded training data was read silently."""
    import numpy as np

    points = tmp_path / "points.npy"
    np.save(points, np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    run = tmp_path / "run"
    argv = ["train", str(points), "--steps", "3", "--ckpt-dir", str(run), "--plot-every", "0"]
    assert _run([*argv, *SMALL]) == 0
    capsys.readouterr()
    ll = ["likelihood", str(run), "--num", "4", "--quiet", "--device", "cpu"]
    assert _run(ll) == 0
    out = capsys.readouterr().out
    assert "no data given: scoring" in out and str(points) in out
    points.unlink()
    assert _run(ll) == 1
    assert "recorded in the checkpoint" in _error(capsys)


@pytest.mark.parametrize("kind", ["random.pt", "truncated.pt", "random.npy", "random.npz"])
def test_a_corrupt_data_file_is_one_line(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16.5: a corrupt .pt printed a full traceback (UnpicklingError, BadZipFile...)."""
    from scoresde.data import load_data

    path = tmp_path / kind
    if kind == "truncated.pt":
        torch.save({"x": torch.randn(500, 2)}, path)
        path.write_bytes(path.read_bytes()[:700])
    else:
        path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ValueError, match="corrupt, truncated or another format"):
        load_data(path, key="x" if kind.endswith(".pt") else None)
    argv = ["train", str(path), "--steps", "1", "--ckpt-dir", str(tmp_path / "run"), *SMALL]
    assert _run(argv) == 1
    assert kind in _error(capsys)


def test_scaling_none_warns_on_data_far_from_unit_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data near 1e6 trained with --scaling none gave samples of std ~150 and no word why."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, scale, warned in (("big", 1e6, True), ("unit", 1.0, False)):
        path = tmp_path / f"{name}.npy"
        np.save(path, rng.normal(size=(64, 2)) * scale)
        argv = ["train", str(path), "--scaling", "none", "--steps", "1", "--plot-every", "0"]
        assert _run([*argv, "--ckpt-dir", str(tmp_path / name), *SMALL]) == 0
        err = capsys.readouterr().err
        assert ("warning: --scaling none" in err) is warned, err
