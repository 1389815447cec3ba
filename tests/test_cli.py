"""The `scoresde` command line: help everywhere, the demo end to end, train -> sample ->
likelihood on a 2-D set and on the 8x8 digits, and one-line errors for a user's mistakes."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import run_cli

from scoresde.cli import build_parser, main
from scoresde.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUBCOMMANDS = ("demo", "train", "sample", "likelihood", "bench")


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


_run = run_cli


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("scoresde: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ("", *SUBCOMMANDS))
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, "--help"] if command else ["--help"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: scoresde {command}".rstrip())
    if not command:
        for name in SUBCOMMANDS:
            assert name in out


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.out, args.dataset, args.quick) == ("scoresde-demo", "8gaussians", False)
    args = build_parser().parse_args(["bench", "--full", "--suite", "peers"])
    assert (args.mode, args.suite) == ("full", "peers")
    assert build_parser().parse_args(["bench"]).mode == "quick"


# --- demo ---------------------------------------------------------------------------------------


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert _run(["demo", "--quick", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert _is_png(out / "demo.png")
    # The table: a header, the reference row and one row per solver with its NFE.
    assert "NFE" in text and "sliced W2" in text and "mean log p" in text
    for label in ("PC (reverse", "Euler-Maruyama", "Heun", "DPM-Solver++", "adaptive SDE"):
        row = next(ln for ln in text.splitlines() if ln.startswith(label))
        cells = row.split()
        nfe = next(c for c in cells if c.isdigit())
        assert int(nfe) > 0
    saved = np.load(out / "samples.npz")
    solvers = [k for k in saved.files if k.startswith("solver")]
    assert len(solvers) == 5
    for key in solvers:
        x = saved[key]
        assert x.shape == (500, 2) and np.isfinite(x).all()
        # Mapped back to data units: the 8 modes sit on a circle of radius 2. Even after
        # the quick run's 400 steps the samples form that ring (not the unit-scale prior).
        radius = np.linalg.norm(x, axis=1)
        assert 1.5 < np.median(radius) < 2.5, (key, np.median(radius))


def test_demo_rejects_image_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _run(["demo", "--dataset", "digits", "--out", str(tmp_path)]) == 1
    assert "2-D toy set" in _one_error_line(capsys.readouterr().err)


# --- train -> sample -> likelihood ----------------------------------------------------------


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MLP trained for 60 steps on two moons (with plots every 30 steps)."""
    run = tmp_path_factory.mktemp("cli") / "moons"
    argv = ["train", "two_moons", "--ckpt-dir", str(run), "--steps", "60"]
    argv += ["--batch-size", "64", "--hidden", "32", "--blocks", "1", "--plot-every", "30"]
    assert _run([*argv, "--quiet", "--threads", "1", "--device", "cpu"]) == 0
    return run


def test_train_writes_checkpoint_and_plots(run_2d: Path) -> None:
    from scoresde.training import read_checkpoint

    ckpt = read_checkpoint(run_2d)
    assert ckpt["step"] == 60
    assert ckpt["config"]["model"]["net"] == "mlp"
    assert ckpt["config"]["data_scaler"]["kind"] == "standard"
    assert _is_png(run_2d / "samples_step0000030.png")
    assert _is_png(run_2d / "samples_step0000060.png")
    assert _is_png(run_2d / "loss.png")


def test_train_resume_continues(run_2d: Path, tmp_path: Path) -> None:
    import shutil

    from scoresde.training import read_checkpoint

    run = tmp_path / "resumed"
    shutil.copytree(run_2d, run)
    argv = ["train", "two_moons", "--ckpt-dir", str(run), "--steps", "70", "--resume"]
    assert _run([*argv, "--quiet", "--plot-every", "0", "--device", "cpu"]) == 0
    assert read_checkpoint(run)["step"] == 70


def test_train_under_torchrun(tmp_path: Path) -> None:
    from scoresde.training import read_checkpoint

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "scoresde", "train", "two_moons", "--steps", "6", "--batch-size", "32"]
    cmd += ["--hidden", "16", "--blocks", "1", "--ckpt-dir", str(run), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = read_checkpoint(run)
    assert ckpt["step"] == 6 and ckpt["config"]["trainer"]["world_size"] == 2
    assert proc.stdout.count("checkpoint") == 1  # only rank 0 reports
    assert _is_png(run / "loss.png")


def test_train_refuses_to_overwrite(run_2d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["train", "two_moons", "--ckpt-dir", str(run_2d), "--steps", "1"]) == 1
    assert "--resume" in _one_error_line(capsys.readouterr().err)


def test_sample_maps_back_through_the_scaler(run_2d: Path, tmp_path: Path) -> None:
    from scoresde.data import DataScaler
    from scoresde.samplers.dpm_solver import DPMSolverSampler
    from scoresde.training import Trainer

    out = tmp_path / "s.npz"
    argv = ["sample", str(run_2d), "--sampler", "dpm", "--steps", "5", "--num", "100"]
    assert _run([*argv, "--out", str(out), "--seed", "3", "--quiet", "--device", "cpu"]) == 0
    got = np.load(out)["samples"]
    assert got.shape == (100, 2)
    assert _is_png(out.with_suffix(".png"))
    # The same draw by hand: EMA model, same seed, per-sample noise streams (so the
    # samples do not depend on how the command batches them), then the stored data scaler.
    trainer = Trainer.from_checkpoint(run_2d, device="cpu", distributed=False)
    assert isinstance(trainer.data_scaler, DataScaler)
    x = DPMSolverSampler(trainer.ema_model.sde, num_steps=5).sample(
        trainer.ema_model,
        (100, 2),
        generator=torch.Generator().manual_seed(3),
        batch_invariant=True,
    )
    expected = trainer.data_scaler.inverse_transform(x.float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # --batch-size does not change the samples (issue: batches of 7 used to).
    out7 = tmp_path / "s7.npz"
    argv += ["--seed", "3", "--quiet", "--device", "cpu", "--batch-size", "7"]
    assert _run([*argv, "--out", str(out7)]) == 0
    np.testing.assert_allclose(np.load(out7)["samples"], got, rtol=1e-6, atol=1e-6)


def test_every_sampler_runs(run_2d: Path, tmp_path: Path) -> None:
    for name in SAMPLERS:
        out = tmp_path / f"{name}.npz"
        # PC's discrete chain needs betas < 1: more than 20 steps for the VP SDE.
        steps = {"adaptive": [], "pc": ["--steps", "25"]}.get(name, ["--steps", "4"])
        argv = ["sample", str(run_2d), "--sampler", name, *steps, "--num", "50"]
        assert _run([*argv, "--out", str(out), "--quiet", "--device", "cpu"]) == 0, name
        x = np.load(out)["samples"]
        assert x.shape == (50, 2) and np.isfinite(x).all(), name


def test_rtol_is_refused_for_fixed_step_samplers(
    run_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rtol was silently ignored by every sampler but adaptive (whose --steps is refused)."""
    argv = ["sample", str(run_2d), "--sampler", "dpm", "--rtol", "1e-3", "--device", "cpu"]
    assert _run([*argv, "--out", str(tmp_path / "s.npz")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--rtol is only used by --sampler adaptive, not dpm" in line
    assert not (tmp_path / "s.npz").exists()


def test_pc_sample_does_not_depend_on_batch_size(run_2d: Path, tmp_path: Path) -> None:
    """--sampler pc (Langevin corrector) used to take its step size from the batch, so
    --batch-size changed its samples; its reference particles make them the same."""
    argv = ["sample", str(run_2d), "--sampler", "pc", "--steps", "25", "--num", "12"]
    argv += ["--seed", "4", "--quiet", "--device", "cpu"]
    got = {}
    for bs in (12, 5):
        out = tmp_path / f"pc{bs}.npz"
        assert _run([*argv, "--batch-size", str(bs), "--out", str(out)]) == 0
        got[bs] = np.load(out)["samples"]
    assert got[12].shape == (12, 2) and np.isfinite(got[12]).all()
    np.testing.assert_allclose(got[5], got[12], rtol=1e-6, atol=1e-6)


def test_nfe_is_printed_per_batch_not_summed(
    run_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--batch-size 5 made 12 samples of a 4-step sampler print NFE 12 (the sum over the
    3 batches), and likelihood a figure that grew with the number of batches."""
    argv = ["sample", str(run_2d), "--sampler", "em", "--steps", "4", "--num", "12"]
    argv += ["--batch-size", "5", "--out", str(tmp_path / "s.npz"), "--device", "cpu"]
    assert _run(argv) == 0
    assert "NFE 4 per batch (12 score calls over 3 batches)" in capsys.readouterr().out
    argv = ["likelihood", str(run_2d), "--num", "10", "--rtol", "1e-2", "--device", "cpu"]
    assert _run([*argv, "--batch-size", "5", "--quiet"]) == 0
    match = re.search(r"([\d.]+) NFE per batch, (\d+) over 2 batches",
                      capsys.readouterr().out)  # fmt: skip
    assert match and float(match.group(1)) == pytest.approx(int(match.group(2)) / 2, abs=0.05)
    assert _run([*argv, "--batch-size", "10", "--quiet"]) == 0
    assert re.search(r"; exact trace, \d+ NFE\)", capsys.readouterr().out)


def test_likelihood_matches_the_library(run_2d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scoresde.data import load_data
    from scoresde.likelihood import log_likelihood
    from scoresde.training import Trainer

    argv = ["likelihood", str(run_2d), "--num", "40", "--batch-size", "40", "--rtol", "1e-4"]
    assert _run([*argv, "--quiet", "--device", "cpu", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    match = re.search(r"([-\d.]+) \+- ([\d.]+) bits/dim", text)
    assert match, text
    mean, stderr = float(match.group(1)), float(match.group(2))
    assert math.isfinite(mean) and stderr > 0
    # By hand: the checkpoint's data (two_moons, drawn with seed + 1), scaled, the exact
    # trace, then the scaler's log-Jacobian to get back to the data's units.
    trainer = Trainer.from_checkpoint(run_2d, device="cpu", distributed=False)
    x, _ = load_data("two_moons", n=40, seed=1)
    scaler = trainer.data_scaler
    res = log_likelihood(
        trainer.ema_model,
        trainer.ema_model.sde,
        scaler.transform(x),
        trace="exact",
        rtol=1e-4,
        atol=1e-4,
    )
    log_det = 2 * math.log(float(scaler.scale))
    bpd = -(res.logp.double() - log_det) / (2 * math.log(2))
    assert mean == pytest.approx(float(bpd.mean()), abs=1e-4)  # printed to 4 decimals


def test_train_from_npy_file(tmp_path: Path) -> None:
    from scoresde.training import read_checkpoint

    data = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32) * 5 + 10
    np.save(tmp_path / "points.npy", data)
    run = tmp_path / "run"
    argv = ["train", str(tmp_path / "points.npy"), "--ckpt-dir", str(run), "--steps", "5"]
    argv += ["--hidden", "16", "--blocks", "1", "--batch-size", "32", "--quiet"]
    assert _run([*argv, "--device", "cpu"]) == 0
    cfg = read_checkpoint(run)["config"]
    assert cfg["model"]["data_shape"] == [3]
    # eps with the Gaussian preconditioning by default; sigma_data = the scaled data's std
    assert cfg["model"]["parameterization"] == "eps"
    assert cfg["model"]["preconditioning"] == "gaussian"
    assert cfg["model"]["sigma_data"] == pytest.approx(1.0, abs=1e-3)
    # standard scaling of data with mean ~10 and std ~5
    assert float(cfg["data_scaler"]["shift"]) == pytest.approx(float(data.mean()), rel=1e-4)
    out = tmp_path / "s.npz"
    assert _run(["sample", str(run), "--steps", "3", "--num", "20", "--out", str(out)]) == 0
    assert np.load(out)["samples"].shape == (20, 3)
    assert _is_png(out.with_suffix(".png"))  # a scatter of the first two coordinates


def test_train_from_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scoresde.training import read_checkpoint

    rng = np.random.default_rng(1)
    rows = ["a,b,label"] + [
        f"{u:.4f},{3 * v + 7:.4f},x{i % 2}" for i, (u, v) in enumerate(rng.normal(size=(120, 2)))
    ]
    table = tmp_path / "table.csv"
    table.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    argv = ["train", str(table), "--ckpt-dir", str(run), "--steps", "3", "--per-feature"]
    argv += ["--hidden", "16", "--blocks", "1", "--batch-size", "16", "--quiet"]
    # The text column is refused by name, in one line.
    assert _run([*argv, "--device", "cpu"]) == 1
    assert "column 'label' is not numeric" in _one_error_line(capsys.readouterr().err)
    assert _run([*argv, "--device", "cpu", "--key", "a,b"]) == 0
    cfg = read_checkpoint(run)["config"]
    assert cfg["model"]["data_shape"] == [2]
    b = np.array([float(r.split(",")[1]) for r in rows[1:]])
    assert float(cfg["data_scaler"]["shift"][1]) == pytest.approx(b.mean(), rel=1e-4)
    capsys.readouterr()
    assert _run(["likelihood", str(run), "--num", "5", "--rtol", "1e-2", "--quiet"]) == 0
    assert "5 points of" in capsys.readouterr().out  # the recorded CSV and columns re-read


def test_digits_unet_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scoresde.training import read_checkpoint

    run = tmp_path / "digits"
    argv = ["train", "digits", "--ckpt-dir", str(run), "--steps", "3", "--batch-size", "8"]
    argv += ["--channels", "8,16", "--plot-every", "3", "--quiet", "--device", "cpu"]
    assert _run(argv) == 0
    cfg = read_checkpoint(run)["config"]
    assert cfg["model"]["net"] == "unet" and cfg["model"]["data_shape"] == [1, 8, 8]
    assert 0.3 < cfg["model"]["sigma_data"] < 1.0  # min-max scaled digits: mostly -1
    assert _is_png(run / "samples_step0000003.png")
    out = tmp_path / "digits.npz"
    argv = ["sample", str(run), "--sampler", "ddim", "--steps", "3", "--num", "6"]
    assert _run([*argv, "--out", str(out), "--quiet"]) == 0
    images = np.load(out)["samples"]
    assert images.shape == (6, 1, 8, 8) and np.isfinite(images).all()
    assert _is_png(out.with_suffix(".png"))
    capsys.readouterr()
    argv = ["likelihood", str(run), "--num", "4", "--batch-size", "4", "--rtol", "1e-2"]
    assert _run([*argv, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "hutchinson trace" in text  # 64 dims: the default switches to Hutchinson
    cont = re.search(r"4 points of digits: ([-\d.]+) \+- [\d.]+ bits/dim", text)
    assert cont, text
    # The digits have 17 levels in [-1, 1]: the discrete bits/dim add -log2(2 / 16) = 3.
    assert _run([*argv, "--quiet", "--num-bins", "17"]) == 0
    text = capsys.readouterr().out
    disc = re.search(r"4 points of digits: ([-\d.]+) \+- [\d.]+ bits/dim \(17 levels", text)
    assert disc, text
    assert float(disc.group(1)) - float(cont.group(1)) == pytest.approx(3.0, abs=2e-4)


def test_image_folder_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RGB images of 12x12 in class folders, resized to 8x8 by train and likewise by
    likelihood (from the checkpoint's record), pixel values 0..255 scaled to [-1, 1]."""
    from PIL import Image

    from scoresde.training import read_checkpoint

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    run = tmp_path / "run"
    argv = ["train", str(tmp_path / "imgs"), "--image-size", "8", "--steps", "2"]
    argv += ["--batch-size", "4", "--channels", "8", "--ckpt-dir", str(run), "--quiet"]
    assert _run([*argv, "--plot-every", "2"]) == 0
    cfg = read_checkpoint(run)["config"]
    assert cfg["model"]["data_shape"] == [3, 8, 8]
    assert cfg["data_scaler"]["kind"] == "minmax"
    assert _is_png(run / "samples_step0000002.png")
    capsys.readouterr()
    argv = ["likelihood", str(run), "--num", "3", "--rtol", "1e-2", "--num-bins", "256"]
    assert _run([*argv, "--quiet"]) == 0
    assert re.search(
        r"3 points of .*imgs: [-\d.]+ \+- [\d.]+ bits/dim \(256 levels", capsys.readouterr().out
    )


def test_image_folder_scaling_is_0_255_and_a_run_inside_it_is_not_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dark 8-bit images (0..100): auto scaling maps 0..255 (not the fitted 0..100) onto
    [-1, 1], so --num-bins 256 bins the pixel levels; a --ckpt-dir inside the image folder
    (its loss.png and sample grids) is not read back as images by likelihood or --resume."""
    from PIL import Image

    from scoresde.training import read_checkpoint

    rng = np.random.default_rng(1)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        pixels = rng.integers(0, 101, size=(8, 8), dtype=np.uint8)
        Image.fromarray(pixels).save(imgs / f"{i}.png")
    run = imgs / "run"
    argv = ["train", str(imgs), "--steps", "2", "--batch-size", "4", "--channels", "8"]
    assert _run([*argv, "--ckpt-dir", str(run), "--plot-every", "2", "--quiet"]) == 0
    assert _is_png(run / "samples_step0000002.png")
    scaler = read_checkpoint(run)["config"]["data_scaler"]
    assert scaler["kind"] == "minmax"
    assert float(scaler["shift"]) == 127.5 and float(scaler["scale"]) == 127.5
    capsys.readouterr()
    argv = ["likelihood", str(run), "--num", "50", "--rtol", "1e-2", "--num-bins", "256"]
    assert _run([*argv, "--quiet"]) == 0
    assert re.search(r"5 points of .*imgs: .*256 levels in \[0, 255\]", capsys.readouterr().out)
    assert _run(["train", "--resume", "--ckpt-dir", str(run), "--steps", "3", "--quiet"]) == 0
    assert read_checkpoint(run)["step"] == 3


# --- errors: one line, no traceback -------------------------------------------------------------


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["train", "two_moons", "--sde", "bogus"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--sde" in line and "bogus" in line
    assert _run(["sample", "x", "--steps", "-3"]) == 2
    assert "--steps" in _one_error_line(capsys.readouterr().err)
    assert _run([]) == 2
    _one_error_line(capsys.readouterr().err)
    assert _run(["frobnicate"]) == 2
    _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "no_such_set", "--steps", "1"], "no_such_set"),
        (["sample", "/no/such/checkpoint"], "does not exist"),
        (["likelihood", "/no/such/checkpoint"], "does not exist"),
        (["likelihood", "x", "--data-range", "0", "1"], "--data-range is only used with"),
    ],
)
def test_runtime_errors_exit_1(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "train":
        argv = [*argv, "--ckpt-dir", str(tmp_path / "run")]
    assert _run(argv) == 1
    assert words in _one_error_line(capsys.readouterr().err)


def test_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latest.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    assert _run(["sample", str(tmp_path), "--out", str(tmp_path / "s.npz")]) == 1
    assert "checkpoint" in _one_error_line(capsys.readouterr().err)


def test_data_given_where_the_checkpoint_goes(
    run_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Swapped arguments printed torch's paragraph advising weights_only=False."""
    data = tmp_path / "points.npy"
    np.save(data, np.zeros((5, 2)))
    assert _run(["likelihood", str(data), str(run_2d)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "not a readable checkpoint" in line and "the checkpoint comes first" in line
    assert "weights_only" not in line and len(line) < 300


def test_wrong_data_for_checkpoint(run_2d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["likelihood", str(run_2d), "digits", "--num", "2"]) == 1
    assert "shape" in _one_error_line(capsys.readouterr().err)
    assert _run(["sample", str(run_2d), "--out", "x.txt"]) == 1
    assert ".npz" in _one_error_line(capsys.readouterr().err)


def test_python_dash_m_error_has_no_traceback(tmp_path: Path) -> None:
    """`python -m scoresde` runs the CLI, and a user's mistake is one line, status 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "scoresde", "sample", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    _one_error_line(proc.stderr)
