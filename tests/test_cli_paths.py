"""The command line's paths: a run stores its data file as an absolute path and `--resume`
reads the DATA it is given (warning about options it ignores); output paths are checked
before any work and errors name the option and the user's path, never a temp file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import SMALL, run_cli

from scoresde.training import read_checkpoint

FAST = [*SMALL, "--plot-every", "0"]


_run = run_cli


def _error(capsys: pytest.CaptureFixture[str], *, no_work: bool = False) -> str:
    """The one error line on stderr; `no_work`: nothing on stdout either (no "training ..."
    or other status line: the command stopped before any work)."""
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("scoresde: error: "), err
    assert not (no_work and out.strip()), out
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with n3.npy (200 samples of 3 numbers) and the run 'rs' of 10 steps on it,
    started from inside the folder with the relative path."""
    root = tmp_path_factory.mktemp("paths")
    np.save(root / "n3.npy", np.random.default_rng(0).standard_normal((200, 3)))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert _run(["train", "n3.npy", "--steps", "10", "--ckpt-dir", "rs", *FAST]) == 0
    return root


@pytest.fixture()
def here(made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of `made` (tests resume its run) with the current folder its 'sub'."""
    root = tmp_path / "root"
    shutil.copytree(made, root)
    (root / "sub").mkdir()
    monkeypatch.chdir(root / "sub")
    return root


def _stored_data(run: Path) -> str:
    return read_checkpoint(run)["config"]["user"]["cli"]["data_args"]["data"]


# --- train --resume and likelihood read the run's data from any folder -------------------------


def test_a_run_stores_its_data_file_absolute_and_a_toy_set_by_name(made: Path, here: Path) -> None:
    assert _stored_data(made / "rs") == str((made / "n3.npy").resolve())
    assert _run(["train", "two_moons", "--steps", "2", "--ckpt-dir", "moons", *FAST]) == 0
    assert _stored_data(Path("moons")) == "two_moons"


def test_resume_from_another_folder_reads_the_data_given(here: Path) -> None:
    argv = ["train", "../n3.npy", "--steps", "15", "--ckpt-dir", "../rs", "--resume", *FAST]
    assert _run(argv) == 0
    assert read_checkpoint(here / "rs")["step"] == 15
    # Without DATA: the stored data; `likelihood` without data as well.
    assert _run(["train", "--steps", "20", "--ckpt-dir", "../rs", "--resume", *FAST]) == 0
    assert read_checkpoint(here / "rs")["step"] == 20
    argv = ["likelihood", "../rs", "--num", "5", "--quiet", "--device", "cpu"]
    assert _run(argv) == 0


def test_resume_refuses_data_of_another_shape(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(here / "n2.npy", np.zeros((50, 2)))
    argv = ["train", "../n2.npy", "--steps", "15", "--ckpt-dir", "../rs", "--resume", *FAST]
    assert _run(argv) == 1
    line = _error(capsys)
    assert "'../n2.npy'" in line and "[2]" in line and "[3]" in line
    assert read_checkpoint(here / "rs")["step"] == 10


def test_resume_of_an_old_run_reads_its_relative_path_from_the_current_folder(
    here: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    latest = here / "rs" / "latest.pt"
    ckpt = torch.load(latest, map_location="cpu", weights_only=True)
    ckpt["config"]["user"]["cli"]["data_args"]["data"] = "n3.npy"  # as runs stored it before
    torch.save(ckpt, latest)
    argv = ["train", "--steps", "15", "--ckpt-dir", str(here / "rs"), "--resume", *FAST]
    assert _run(argv) == 1  # from sub/, n3.npy is not there
    line = _error(capsys)
    assert "'n3.npy'" in line and "give DATA" in line
    monkeypatch.chdir(here)
    assert _run(argv) == 0
    assert _stored_data(here / "rs") == str((here / "n3.npy").resolve())


def test_resume_warns_about_the_options_it_ignores(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--steps", "12", "--ckpt-dir", "../rs", "--resume", "--plot-every", "0"]
    # --hidden 16 and --blocks 1 are the run's own: no news; --lr and --batch-size differ.
    assert _run([*argv, *SMALL, "--lr", "0.01", "--batch-size", "64"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1, warnings
    assert "--lr 0.01" in warnings[0] and "--batch-size 64 (the run's: 32)" in warnings[0]
    assert "--hidden" not in warnings[0] and "--blocks" not in warnings[0]
    assert _run([*argv[:2], "15", *argv[3:], *SMALL]) == 0  # the run's values: no warning
    assert "warning" not in capsys.readouterr().err


# --- output paths: checked before the work, errors name the option -----------------------------


def test_likelihood_per_point_is_an_npz(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["likelihood", "../rs", "../n3.npy", "--num", "5", "--quiet", "--device", "cpu"]
    assert _run([*argv, "--per-point", "pp.txt"]) == 1
    assert "--per-point must name an .npz file" in _error(capsys)
    assert list(Path().iterdir()) == []  # no pp.txt.npz
    assert _run([*argv, "--per-point", "pp.npz"]) == 0
    assert "-> pp.npz" in capsys.readouterr().out
    with np.load("pp.npz") as z:
        assert z["logp"].shape == z["bpd"].shape == (5,)
    assert _run([*argv, "--per-point", "pp.npz"]) == 0  # its own output: replaced
    np.savez("mine.npz", logp=np.zeros(3))  # a user's file of that name: kept
    assert _run([*argv, "--per-point", "mine.npz"]) == 1
    error = _error(capsys)
    assert (
        "--per-point 'mine.npz' already exists and was not written by 'scoresde likelihood'"
        in error
    )
    assert "--overwrite" in error
    assert np.load("mine.npz")["logp"].shape == (3,)
    assert _run([*argv, "--per-point", "mine.npz", "--overwrite"]) == 0
    assert np.load("mine.npz")["logp"].shape == (5,)


def test_likelihood_of_another_file_reads_the_key_of_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "train.npz", feats=rng.standard_normal((100, 2)), ids=np.arange(100))
    np.savez(tmp_path / "test.npz", ids=np.arange(7), feats=rng.standard_normal((7, 2)))
    run = tmp_path / "run"
    argv = ["train", str(tmp_path / "train.npz"), "--key", "feats", "--ckpt-dir", str(run)]
    assert _run([*argv, "--steps", "3", *FAST]) == 0
    argv = ["likelihood", str(run), str(tmp_path / "test.npz"), "--num", "7", "--device", "cpu"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "reading --key 'feats'" in out and "7 points of" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "no-such-run", "--out", "{file}/x.npz"],
        ["likelihood", "no-such-run", "two_moons", "--per-point", "{file}/x.npz"],
        ["demo", "--quick", "--train-steps", "5", "--out", "{file}"],
    ],
)
def test_an_output_under_a_file_is_refused_before_any_work(
    here: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    mine = here / "n3.npy"
    argv = [a.replace("{file}", str(mine)) for a in argv]
    assert _run([*argv, "--quiet", "--device", "cpu"]) == 1
    line = _error(capsys, no_work=True)
    option = argv[-2]
    assert line.startswith(f"scoresde: error: {option} {argv[-1]!r}: "), line
    assert "is a file, not a folder" in line and ".tmp" not in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_in_a_folder_that_takes_no_files_is_refused(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["sample", "../rs", "--out", "/proc/x.npz", "--quiet", "--device", "cpu"]) == 1
    line = _error(capsys)
    assert line.startswith("scoresde: error: --out '/proc/x.npz': cannot write"), line
    assert ".tmp" not in line


def test_an_out_that_is_a_folder_is_refused(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("d.npz").mkdir()
    argv = ["sample", "../rs", "--out", "d.npz", "--overwrite", "--quiet", "--device", "cpu"]
    assert _run(argv) == 1
    assert "--out 'd.npz': is a folder" in _error(capsys)


def test_demo_refuses_fewer_than_two_samples_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--quick", "--num", "1", "--train-steps", "5", "--out", str(tmp_path / "d")]
    assert _run([*argv, "--quiet", "--device", "cpu"]) == 2
    assert "--num: expected an integer >= 2, got '1'" in _error(capsys, no_work=True)
    assert not (tmp_path / "d").exists()


def test_demo_keeps_a_users_samples_npz_and_replaces_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    np.savez(out / "samples.npz", mine=np.arange(3))
    argv = ["demo", "--quick", "--num", "50", "--train-steps", "5", "--out", str(out)]
    argv += ["--quiet", "--device", "cpu"]
    assert _run(argv) == 1
    error = _error(capsys, no_work=True)
    assert "was not written by 'scoresde demo'" in error and "--overwrite" in error
    assert np.load(out / "samples.npz")["mine"].tolist() == [0, 1, 2]
    assert _run([*argv, "--overwrite"]) == 0
    assert _run(argv) == 0  # its own samples.npz now: replaced without --overwrite
    capsys.readouterr()
    assert "data" in np.load(out / "samples.npz")
