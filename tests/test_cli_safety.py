"""The command line never loses a user's work (issue 16): a diverging `train` fails with a
non-zero exit and writes no NaN checkpoint, outputs are not overwritten without
--overwrite, an interrupt saves a checkpoint, and mistakes are caught before the work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scoresde.cli import main
from scoresde.training import read_checkpoint

SMALL = ["--hidden", "16", "--blocks", "1", "--batch-size", "32", "--quiet", "--device", "cpu"]


def _run(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code or 0)


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
