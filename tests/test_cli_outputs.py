"""The command line's output files: written atomically, yet with the permissions a plain
open() gives (0o666 & ~umask, not tempfile's owner-only 0o600), and `demo` replaces only
the files it wrote itself (samples.npz, demo.png, demo_checkpoint.pt)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import SMALL, run_cli

from scoresde._atomic import atomic_write

DEMO = ["demo", "--quick", "--num", "50", "--train-steps", "5", "--quiet", "--device", "cpu"]


_run = run_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_atomic_write_gets_the_mode_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.txt") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temp file


def test_train_sample_and_likelihood_outputs_are_not_owner_only(
    tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    np.save("gauss.npy", np.random.default_rng(0).standard_normal((200, 2)))
    argv = ["train", "gauss.npy", "--steps", "4", "--plot-every", "2", "--ckpt-dir", "p"]
    assert _run([*argv, *SMALL]) == 0
    run = Path("p")
    outputs = [
        run / "latest.pt",
        run / "loss.png",
        run / "metrics.csv",
        run / "model" / "config.json",
        run / "model" / "model.safetensors",
        *run.glob("samples_*.png"),
    ]
    assert len(outputs) > 5  # at least one samples_*.png
    assert _run(["sample", "p", "--num-samples", "20", "--out", "s.npz", *SMALL[-3:]]) == 0
    outputs += [Path("s.npz"), Path("s.png")]
    argv = ["likelihood", "p", "gauss.npy", "--num", "5", "--per-point", "pp.npz"]
    assert _run([*argv, *SMALL[-3:]]) == 0
    outputs.append(Path("pp.npz"))
    assert {str(p): oct(_mode(p)) for p in outputs} == {str(p): "0o644" for p in outputs}


def test_demo_outputs_are_not_owner_only(tmp_path: Path, umask_022: None) -> None:
    out = tmp_path / "d"
    assert _run([*DEMO, "--out", str(out)]) == 0
    modes = {p.name: oct(_mode(p)) for p in out.iterdir()}
    names = ("samples.npz", "demo.png", "demo_checkpoint.pt")
    assert modes == dict.fromkeys(names, "0o644")


@pytest.mark.parametrize("name", ["demo.png", "demo_checkpoint.pt"])
def test_demo_keeps_a_users_file_and_replaces_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / name).write_text("mine\n")
    argv = [*DEMO, "--out", str(out)]
    assert _run(argv) == 1
    std_out, err = capsys.readouterr()
    assert "training" not in std_out  # refused before any work
    assert f"--out {str(out / name)!r} already exists" in err and "--overwrite" in err
    assert (out / name).read_text() == "mine\n"
    assert sorted(p.name for p in out.iterdir()) == [name]
    assert _run([*argv, "--overwrite"]) == 0
    assert (out / name).read_bytes() != b"mine\n"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _run(argv) == 0  # all three are the demo's own now: replaced without --overwrite
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert before.keys() == after.keys() and all(after[k] != before[k] for k in before)
