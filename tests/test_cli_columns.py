"""Table columns by name: a run trained on a CSV/TSV with a header records the names of the
columns it read, and `likelihood` and `train --resume` read another table with a header
(any table suffix, any column order) by those names; a table without the names is refused
naming them and the file. Header-less tables, array files and older runs read by position."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import SMALL, run_cli

from scoresde.training import Trainer, read_checkpoint

FAST = [*SMALL, "--plot-every", "0"]
SCORE = ["--num-points", "20", "--rtol", "1e-2", "--quiet", "--device", "cpu"]


_run = run_cli


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("scoresde: error: "), lines
    return lines[0]


def _write(path: Path, header: str | None, rows: np.ndarray) -> Path:
    sep = "," if path.suffix == ".csv" else "\t"
    lines = [] if header is None else [header.replace(",", sep)]
    path.write_text("\n".join(lines + [sep.join(repr(float(v)) for v in r) for r in rows]) + "\n")
    return path


def _bpd(argv: list[str], capsys: pytest.CaptureFixture[str]) -> float:
    assert _run(["likelihood", *argv, *SCORE]) == 0
    out = capsys.readouterr().out
    return float(re.search(r": (-?[0-9.]+) \+- ", out).group(1))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv (header a,b: a ~ 10 + 3 z, b ~ -4 + z / 2), test points as test.npy and as
    tables with the columns swapped, and the runs 'plain' (no --key) and 'keyed' (--key a,b)
    of 10 steps on train.csv."""
    root = tmp_path_factory.mktemp("columns")
    rng = np.random.default_rng(0)
    _write(root / "train.csv", "a,b", rng.normal(size=(200, 2)) * [3.0, 0.5] + [10.0, -4.0])
    test = rng.normal(size=(20, 2)) * [3.0, 0.5] + [10.0, -4.0]
    np.save(root / "test.npy", test)
    for suffix in (".csv", ".tsv", ".tab"):
        _write(root / f"swapped{suffix}", "b,a", test[:, ::-1])
    _write(root / "extra.csv", "c,b,a", np.concatenate([test[:, :1] * 0, test[:, ::-1]], 1))
    for run, key in (("plain", []), ("keyed", ["--key", "a,b"])):
        argv = ["train", str(root / "train.csv"), *key, "--ckpt-dir", str(root / run)]
        assert _run([*argv, "--steps", "10", *FAST]) == 0
    return root


def _data_args(run: Path) -> dict:
    return read_checkpoint(run)["config"]["user"]["cli"]["data_args"]


def test_a_run_on_a_table_with_a_header_records_its_column_names(made: Path) -> None:
    from scoresde.cli._columns import _recorded_columns

    assert _data_args(made / "plain")["columns"] == ["a", "b"]
    assert _data_args(made / "keyed")["columns"] == ["a", "b"]
    table = made / "extra.csv"
    assert _recorded_columns(table, None) == ["c", "b", "a"]
    assert _recorded_columns(table, "a,c") == ["a", "c"]
    assert _recorded_columns(table, [2, "b"]) == ["a", "b"]  # positions become names
    assert _recorded_columns(made / "test.npy", None) is None
    assert _recorded_columns("two_moons", None) is None
    headerless = _write(made / "headerless_probe.csv", None, np.ones((3, 2)))
    assert _recorded_columns(headerless, None) is None
    twice = made / "twice.csv"
    twice.write_text("a,a,b\n1,2,3\n")  # a name that is not unique cannot be read by name
    assert _recorded_columns(twice, "a,b") is None


@pytest.mark.parametrize("run", ["plain", "keyed"])
@pytest.mark.parametrize("table", ["swapped.csv", "swapped.tsv", "swapped.tab", "extra.csv"])
def test_likelihood_reads_a_table_by_the_column_names_of_training(
    made: Path, run: str, table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _bpd([str(made / run), str(made / "test.npy")], capsys)
    assert _bpd([str(made / run), str(made / table)], capsys) == expected
    # --key given: the user's choice, by position as before.
    assert _bpd([str(made / run), str(made / table), "--key", "0,1"], capsys) != expected


def test_likelihood_refuses_a_table_without_the_training_columns(
    made: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _write(made / "other.tsv", "b,c", np.ones((5, 2)))
    assert _run(["likelihood", str(made / "plain"), str(other), *SCORE]) == 1
    line = _error(capsys)
    assert repr(str(other)) in line and "no column 'a'" in line and "--key" in line
    twice = made / "twice_a.csv"
    twice.write_text("a,b,a\n1,2,3\n4,5,6\n")
    assert _run(["likelihood", str(made / "plain"), str(twice), *SCORE]) == 1
    assert "holds the column 'a' 2 times" in _error(capsys)


def test_headerless_tables_and_older_runs_read_by_position(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = np.load(made / "test.npy")
    run = made / "plain"
    expected = _bpd([str(run), str(made / "test.npy")], capsys)
    headerless = _write(tmp_path / "test.csv", None, test)
    assert _bpd([str(run), str(headerless)], capsys) == expected
    # A run that records no column names (written before they were) reads by position.
    old = tmp_path / "old"
    old.mkdir()
    ckpt = torch.load(run / "latest.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["user"]["cli"]["data_args"].pop("columns", None)
    torch.save(ckpt, old / "latest.pt")
    assert _bpd([str(old), str(made / "swapped.csv")], capsys) != expected
    assert _bpd([str(old), str(headerless)], capsys) == expected


def test_a_positional_key_of_training_applies_to_every_table_suffix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(100, 3)) * [3.0, 0.5, 1.0] + [10.0, -4.0, 0.0]
    _write(tmp_path / "train.csv", None, train)
    run = tmp_path / "run"
    argv = ["train", str(tmp_path / "train.csv"), "--key", "1,0", "--ckpt-dir", str(run)]
    assert _run([*argv, "--steps", "5", *FAST]) == 0
    capsys.readouterr()
    expected = _bpd([str(run), str(tmp_path / "train.csv")], capsys)
    tsv = _write(tmp_path / "train.tsv", None, train)
    assert _bpd([str(run), str(tsv)], capsys) == expected


def test_resume_reads_a_table_by_the_column_names_of_training(
    made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(made / "plain", run)
    seen = []
    fit = Trainer.fit

    def spy(self: Trainer, data: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(self.data_scaler.inverse_transform(data.double()))
        return fit(self, data, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    argv = ["--ckpt-dir", str(run), "--resume", *FAST]
    assert _run(["train", str(made / "swapped.tsv"), *argv, "--steps", "12"]) == 0
    test = torch.from_numpy(np.load(made / "test.npy"))
    assert torch.allclose(seen[-1], test, atol=1e-4)  # columns a, b: not b, a
    data_args = _data_args(run)
    assert data_args["columns"] == ["a", "b"] and data_args["data"].endswith("swapped.tsv")
    # A table without the run's columns is refused, naming them and the file.
    other = _write(tmp_path / "other.csv", "b,c", np.ones((5, 2)))
    assert _run(["train", str(other), *argv, "--steps", "14"]) == 1
    line = _error(capsys)
    assert repr(str(other)) in line and "no column 'a'" in line
    assert read_checkpoint(run)["step"] == 12
