"""The `scoresde` command line: `demo`, `train`, `sample`, `likelihood` and `bench`.

    scoresde demo                          # train on 8 Gaussians, compare five solvers, PNG
    scoresde train two_moons --steps 5000 --ckpt-dir runs/moons
    scoresde sample runs/moons --sampler dpm --steps 20 --num-samples 5000 --out moons.npz
    scoresde likelihood runs/moons two_moons --num-points 2000
    scoresde bench --quick

Every subcommand has `--help`. A user's mistake (a bad path, option value, corrupt
checkpoint or unknown data set) prints one line `scoresde: error: <reason>` to stderr and
exits with status 2 (usage) or 1 (runtime failure), without a traceback.

Each subcommand imports what it needs (samplers, training, matplotlib, the benchmark engine)
when it runs, so a problem in one part of the library breaks only the commands that use it.
Under `torchrun`, `train` trains data-parallel; only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser"]

PROG = "scoresde"
SDE_NAMES = ("vp", "subvp", "ve", "cosine")
NET_NAMES = ("auto", "mlp", "unet")
PARAMETERIZATIONS = ("eps", "v", "x0", "score")
PRECONDITIONINGS = ("gaussian", "none")  # scoresde.nets.score_model (not imported: fast --help)
PRETRAINED_DIR = "model"  # `train` exports the EMA model here (ScoreModel.save_pretrained)


# --- argument parsing ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (`scoresde: error: ...`), status 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {' '.join(message.split())}{hint}\n")


def _checked_number(convert: Any, ok: Any, expected: str) -> Any:
    """An argparse `type`: convert the text, then check it, with a one-line reason."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked_number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked_number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked_number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 32,64, got {text!r}"
        )
    return values


def _common(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """Options shared by the subcommands that compute."""
    if seed:
        parser.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default 1 on the CPU: fastest for small models, and "
        "robust to a busy core; raise it for big models on an idle machine)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The full `scoresde` parser (also used by the docs tests to check shell examples)."""
    parser = _Parser(
        prog=PROG,
        description="Score-based generative modelling with SDEs (Song et al., ICLR 2021).",
        epilog="Run 'scoresde <command> --help' for a command's options.",
    )
    from scoresde import __version__

    parser.add_argument("--version", action="version", version=f"scoresde {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True

    # demo ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "demo",
        help="train on a 2-D toy set, compare five solvers, write a PNG",
        description=(
            "Train a small score model (MLPScoreNet, VP SDE) on a 2-D toy set for about a "
            "minute on CPU, sample it with five solvers (predictor-corrector, Euler-Maruyama, "
            "Heun on the probability-flow ODE, DPM-Solver++, adaptive SDE), print a table of "
            "NFE, time and quality, and write demo.png with every solver's samples next to "
            "the data and the loss curve."
        ),
    )
    p.add_argument("--out", default="scoresde-demo", help="output folder (default ./scoresde-demo)")
    p.add_argument(
        "--dataset",
        default="8gaussians",
        help="2-D toy set: 8gaussians (default), mixture3, two_moons, swiss_roll, "
        "checkerboard, circles",
    )
    p.add_argument(
        "--train-steps", type=_positive_int, default=None, help="training steps (4000; 400 quick)"
    )
    p.add_argument("--num", type=_positive_int, default=None, help="samples per solver")
    p.add_argument("--quick", action="store_true", help="a ~15 s run (fewer steps and samples)")
    _common(p)
    p.set_defaults(func=_cmd_demo)

    # train -----------------------------------------------------------------------------------
    p = sub.add_parser(
        "train",
        help="train a score model on a toy set, a .npy/.npz/.pt/.csv/.tsv file or images",
        description=(
            "Train a score model with denoising score matching and write checkpoints (with "
            "EMA weights, the data scaler and everything 'scoresde sample' needs) to "
            "--ckpt-dir, plus a sample plot every --plot-every steps, metrics.csv (step, "
            "loss, lr, grad norm, seconds), TensorBoard events in --ckpt-dir/tensorboard "
            "when tensorboard is installed, and loss.png. At the end the EMA "
            "model is exported to --ckpt-dir/model (config.json + model.safetensors, for "
            "ScoreModel.from_pretrained)."
        ),
    )
    p.add_argument(
        "data",
        help="toy-set name (8gaussians, mixture3, two_moons, swiss_roll, checkerboard, "
        "circles, digits) or a path: .npy, .npz, .pt, .csv, .tsv (numeric columns; a header "
        "row is detected), or a folder of images",
    )
    p.add_argument(
        "--key",
        default=None,
        help="array name inside a .npz/.pt file; for .csv/.tsv the columns to use (a,b,c)",
    )
    p.add_argument("--num-data", type=_positive_int, default=None, help="use N samples of data")
    p.add_argument("--image-size", type=_positive_int, default=None, help="resize images to S x S")
    p.add_argument("--sde", choices=SDE_NAMES, default="vp", help="forward SDE (default vp)")
    p.add_argument(
        "--sigma-max",
        type=_positive_float,
        default=None,
        help="VE SDE's sigma_max (default: the largest distance between training points)",
    )
    p.add_argument(
        "--net",
        choices=NET_NAMES,
        default="auto",
        help="network: mlp for flat data, unet for images [B, C, H, W] (default auto)",
    )
    p.add_argument(
        "--param",
        choices=PARAMETERIZATIONS,
        default="eps",
        help="network output: eps (default, DDPM's), v, x0, score (with the Gaussian "
        "preconditioning every one works with every sampler)",
    )
    p.add_argument(
        "--preconditioning",
        choices=PRECONDITIONINGS,
        default="gaussian",
        help="gaussian (default): the network predicts a residual over the optimal denoiser "
        "of N(0, sigma_data^2) data (EDM-style); none: the raw network output",
    )
    p.add_argument(
        "--sigma-data",
        type=_positive_float,
        default=None,
        help="data std the gaussian preconditioning assumes (default: the std of the scaled "
        "training data)",
    )
    p.add_argument("--hidden", type=_positive_int, default=256, help="MLP width (default 256)")
    p.add_argument(
        "--blocks", type=_positive_int, default=4, help="MLP residual blocks (default 4)"
    )
    p.add_argument(
        "--channels", type=_int_list, default=(32, 64), help="U-Net channels per level (32,64)"
    )
    p.add_argument(
        "--scaling",
        choices=("auto", "minmax", "standard", "none"),
        default="auto",
        help="data scaling: minmax onto [-1, 1] (auto for images), standard: zero mean and "
        "unit variance (auto for other data), none",
    )
    p.add_argument(
        "--per-feature",
        action="store_true",
        help="scale every feature (entry of a sample) separately, e.g. table columns",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=5000, help="training steps in total (default 5000)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=256, help="batch size (256)")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default 1e-3 for the MLP, 2e-4 for the U-Net)",
    )
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights (0.999)")
    p.add_argument("--ckpt-dir", default="scoresde-run", help="checkpoint folder (./scoresde-run)")
    p.add_argument(
        "--ckpt-every", type=_positive_int, default=1000, help="steps between checkpoints (1000)"
    )
    p.add_argument(
        "--plot-every",
        type=_nonneg_int,
        default=None,
        help="write a sample plot every N steps (default: at checkpoints; 0: never)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --ckpt-dir up to --steps, with its stored settings",
    )
    _overwrite_option(p, "start a new run in a --ckpt-dir that is not empty (replacing files)")
    _common(p)
    p.set_defaults(func=_cmd_train)

    # sample ----------------------------------------------------------------------------------
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained checkpoint",
        description=(
            "Sample from a checkpoint written by 'scoresde train' and map the samples back "
            "to data units with the checkpoint's data scaler. Writes an .npz (array "
            "'samples') and a PNG next to it (a scatter for 2-D data, a grid for images)."
        ),
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint file, the --ckpt-dir of 'scoresde train', or a saved model folder "
        "(ScoreModel.save_pretrained: config.json + model.safetensors)",
    )
    from scoresde.samplers import SAMPLERS  # the one registry of sampler names

    p.add_argument("--sampler", choices=list(SAMPLERS), default="dpm", help="solver (default dpm)")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="solver steps (default: pc/em 500, ode 100, ddim/edm 50, dpm 20)",
    )
    p.add_argument("--rtol", type=_positive_float, default=None, help="adaptive tolerance")
    p.add_argument(
        "--num-samples",
        "--num",  # the old name; torchrun takes a bare --num for its own --numa-binding
        dest="num",
        type=_positive_int,
        default=1000,
        help="number of samples (1000)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1024,
        help="samples per batch (1024); the samples do not depend on it (except with --sampler "
        "pc, whose Langevin step size averages over a batch) nor on the number of processes "
        "under torchrun, which share out the batches",
    )
    p.add_argument("--out", default="samples.npz", help="output .npz (default samples.npz)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    _overwrite_option(p, "replace an existing --out file (and the PNG beside it)")
    _common(p)
    p.set_defaults(func=_cmd_sample)

    # likelihood ------------------------------------------------------------------------------
    p = sub.add_parser(
        "likelihood",
        help="bits/dim of data under a trained model (probability-flow ODE)",
        description=(
            "Negative log-likelihood of data under a checkpoint's model by the "
            "probability-flow ODE, reported in bits per dimension (mean and standard error) "
            "in the data's own units."
        ),
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint file, the --ckpt-dir of 'scoresde train', or a saved model folder "
        "(ScoreModel.save_pretrained: config.json + model.safetensors)",
    )
    p.add_argument(
        "data",
        nargs="?",
        default=None,
        help="data to score (toy name or path; default: the training data of the checkpoint)",
    )
    p.add_argument(
        "--key",
        default=None,
        help="array name inside a .npz/.pt file; for .csv/.tsv the columns to use (a,b,c)",
    )
    p.add_argument(
        "--num-points",
        "--num",  # the old name; torchrun takes a bare --num for its own --numa-binding
        dest="num",
        type=_positive_int,
        default=1000,
        help="data points scored (1000)",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="resize images to S x S (default: the size given to 'scoresde train')",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=250,
        help="points per ODE solve (250); under torchrun the processes share out the batches",
    )
    p.add_argument(
        "--trace",
        choices=("exact", "hutchinson"),
        default=None,
        help="divergence: exact (default up to 16 dims) or hutchinson (default above)",
    )
    p.add_argument("--rtol", type=_positive_float, default=1e-5, help="ODE tolerance (1e-5)")
    p.add_argument(
        "--num-bins",
        type=_positive_int,
        default=None,
        help="discrete data with K levels (256 for 8-bit images, 17 for the digits): report "
        "bits/dim of the discrete data (uniform dequantization)",
    )
    p.add_argument(
        "--data-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="lowest and highest level of discrete data (default: the range the minmax "
        "scaler was fitted on)",
    )
    p.add_argument(
        "--per-point",
        default=None,
        metavar="NPZ",
        help="also write the per-point log-likelihoods (nats, data units) and bits/dim to "
        "this .npz (arrays 'logp', 'bpd')",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    _common(p)
    p.set_defaults(func=_cmd_likelihood)

    # bench -----------------------------------------------------------------------------------
    p = sub.add_parser(
        "bench",
        help="run the benchmark suite (solvers against exact scores, peers side by side)",
        description="Run scoresde's benchmarks and write tables and plots to --out.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    p.set_defaults(mode="quick")
    p.add_argument(
        "--suite",
        default="all",
        help="all (default), peers (scoresde next to diffusers/torchsde/torchdiffeq), "
        "exact_score (every solver against exact mixture scores), overhead (per-step cost) "
        "or likelihood (probability-flow log-likelihood against exact densities)",
    )
    p.add_argument("--out", default="scoresde-bench", help="output folder (./scoresde-bench)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)
    return parser


# --- shared helpers -----------------------------------------------------------------------------


def _overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"{what}; default: refuse")


# --- not overwriting a user's files -------------------------------------------------------------

# `sample` marks the .npz files it writes with this zip comment (np.load ignores it), so that
# re-running a command may replace its own output but never a user's file of the same name.
_SAMPLES_MARK = b"scoresde sample output"


def _written_by_sample(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.comment.startswith(_SAMPLES_MARK)
    except (OSError, zipfile.BadZipFile):
        return False


def _check_sample_outputs(out: Path, overwrite: bool) -> None:
    """Refuse (before any work) to replace an --out .npz, or the PNG beside it, that an
    earlier `scoresde sample` did not write, unless --overwrite."""
    if overwrite:
        return
    if out.exists() and not (out.is_file() and _written_by_sample(out)):
        raise ValueError(
            f"--out {str(out)!r} already exists and was not written by 'scoresde sample'; "
            "choose another --out or pass --overwrite to replace it"
        )
    png = out.with_suffix(".png")
    if png.exists() and not out.exists():
        raise ValueError(
            f"{str(png)!r} (the plot written beside --out) already exists; choose another "
            "--out or pass --overwrite to replace it"
        )


def _save_samples_npz(out: Path, samples: Any) -> None:
    """np.savez(out, samples=...) atomically (temp file + os.replace), with the mark of
    `_written_by_sample`."""
    import tempfile
    import zipfile

    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, samples=samples)
        with zipfile.ZipFile(tmp, "a") as z:
            z.comment = _SAMPLES_MARK
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_new_run_folder(ckpt_dir: Path, overwrite: bool) -> None:
    """A new `train` run writes into a new or empty folder; a folder holding a checkpoint is
    continued with --resume; anything else needs --overwrite (files of the same names as
    the run's outputs are then replaced). Stale checkpoint temp files do not count."""
    import fnmatch

    from scoresde.training import LATEST, TEMP_FILE_PATTERNS

    if overwrite or not ckpt_dir.is_dir():
        return
    if (ckpt_dir / LATEST).exists():
        raise ValueError(
            f"{ckpt_dir} already holds a checkpoint; pass --resume to continue it, choose "
            "another --ckpt-dir, or pass --overwrite to start a new run over it"
        )
    files = sorted(
        p.name
        for p in ckpt_dir.iterdir()
        if not any(fnmatch.fnmatch(p.name, pat) for pat in TEMP_FILE_PATTERNS)
    )
    if files:
        shown = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
        raise ValueError(
            f"--ckpt-dir {ckpt_dir} is not empty ({shown}) and holds no scoresde checkpoint; "
            "choose a new or empty folder, or pass --overwrite to write the run there "
            "(replacing files of the same names)"
        )


def _check_ckpt_dir_is_folder(ckpt_dir: Path) -> None:
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(f"--ckpt-dir {str(ckpt_dir)!r} is a file, not a folder")


def _setup_torch(args: argparse.Namespace) -> Any:
    """Resolve --device and apply --threads; returns the torch.device.

    On the CPU the default is ONE thread: the models here are small, and with several
    threads a core that is busy with anything else stalls every operation (we measured
    20 DPM-Solver steps on 500 points take 0.1 s on one thread and 13 s on two, on a
    loaded 2-core machine).
    """
    import torch

    name = getattr(args, "device", "cpu")
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device: not a torch device: {name!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
    threads = getattr(args, "threads", None)
    if threads is None and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    return device


def _generator(seed: int, device: Any) -> Any:
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _say(args: argparse.Namespace, text: str) -> None:
    """A status line on stdout (only from rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def _max_pairwise_distance(x: Any, limit: int = 1000) -> float:
    """Song & Ermon's (2020) choice of sigma_max: the largest distance between two training
    points (on at most `limit` of them), so the prior covers the whole data set."""
    import torch

    flat = x[:limit].reshape(min(limit, x.shape[0]), -1).to(torch.float64)
    return float(torch.cdist(flat, flat).max().clamp_min(1.0))


def _load_training_data(args: argparse.Namespace) -> Any:
    """The training data x `[N, *D]`, unscaled float32 on the CPU."""
    from scoresde.data import load_data

    x, _ = load_data(
        args.data, key=args.key, n=args.num_data, image_size=args.image_size, seed=args.seed
    )
    return x


def _fit_scaler(kind: str, x: Any, per_feature: bool = False) -> Any:
    """The data scaler: minmax onto [-1, 1] for images (rank 4), standardisation otherwise
    (auto); `none` is the identity. One (shift, scale) for the whole tensor unless
    `per_feature`."""
    from scoresde.data import DataScaler

    if kind == "auto":
        kind = "minmax" if x.ndim == 4 else "standard"
    if kind == "none":
        if per_feature:
            raise ValueError("--per-feature needs a scaling, not --scaling none")
        return DataScaler("minmax", data_range=(-1.0, 1.0))  # identity map
    return DataScaler(kind, per_feature=per_feature).fit(x)


def _plot_samples(samples: Any, path: Path, title: str, scaler: Any = None) -> Path | None:
    """A grid for images `[B, C, H, W]` (C = 1 or 3; grey levels from the min-max scaler's
    range when there is one), else a scatter of the first two coordinates of each sample.
    Returns the PNG's path (None for 1-D data)."""
    from scoresde import plotting

    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        value_range = None
        if scaler is not None and scaler.kind == "minmax" and scaler.shift.numel() == 1:
            shift, scale = float(scaler.shift), float(scaler.scale)
            value_range = (shift - scale, shift + scale)
        return plotting.plot_image_grid(samples[:64], path, title=title, value_range=value_range)
    flat = samples.reshape(samples.shape[0], -1)
    if flat.shape[1] < 2:
        return None
    if flat.shape[1] > 2:
        title = f"{title} (coordinates 0 and 1)"
    return plotting.plot_samples_2d({title: flat[:, :2]}, path)


# --- samplers by name ---------------------------------------------------------------------------

DEFAULT_STEPS = {"pc": 500, "em": 500, "ode": 100, "ddim": 50, "dpm": 20, "edm": 50, "sa": 20}


def _make_sampler(name: str, sde: Any, steps: int | None, rtol: float | None = None) -> Any:
    """A sampler object from its registry name (`steps` None: the DEFAULT_STEPS entry)."""
    from scoresde.samplers import SAMPLERS

    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    cls = SAMPLERS[name]
    if name == "adaptive":
        if steps is not None:
            raise ValueError("--steps is not used by --sampler adaptive; set --rtol instead")
        return cls(sde) if rtol is None else cls(sde, rtol=rtol)
    n = DEFAULT_STEPS.get(name) if steps is None else steps
    return cls(sde, num_steps=n)


# --- checkpoints --------------------------------------------------------------------------------


def _load_checkpoint(path: str, device: Any, *, ema: bool = True) -> tuple[Any, Any, dict]:
    """(model on `device` in eval mode, its DataScaler or None, the stored config) from a
    checkpoint file, a `scoresde train` folder or a `save_pretrained` folder (config.json +
    model.safetensors). Raises FileNotFoundError / CheckpointError."""
    from scoresde.pretrained import is_pretrained_dir, load_pretrained, read_pretrained_config
    from scoresde.training import LATEST, load_model

    if is_pretrained_dir(path) and not (Path(path) / LATEST).is_file():
        if not ema:
            raise ValueError(
                f"--no-ema: {path!r} is a saved model with one set of weights (no raw/EMA pair)"
            )
        model = load_pretrained(path, device=device)
        cfg = {"model": read_pretrained_config(path)["model"]}
        return model.requires_grad_(False), model.data_scaler, cfg
    loaded = load_model(path, ema=ema, device=device)
    return loaded.model.requires_grad_(False), loaded.data_scaler, loaded.config


# --- demo ---------------------------------------------------------------------------------------

# Training and sampling budgets of the demo: about a minute of training on a 2-core CPU, and
# a ~15 s variant (--quick) for tests.
_DEMO = {
    "full": dict(steps=4000, hidden=128, blocks=4, num=2000, pc=250, em=250, ode=50, dpm=20),
    "quick": dict(steps=400, hidden=64, blocks=2, num=500, pc=60, em=60, ode=15, dpm=10),
}
_EXACT_MIXTURES = {"8gaussians": "eight_gaussians", "mixture3": "benchmark_mixture_2d"}


def _demo_solvers(sde: Any, cfg: dict[str, int]) -> list[tuple[str, Any]]:
    from scoresde.samplers.adaptive import AdaptiveSDESampler
    from scoresde.samplers.dpm_solver import DPMSolverSampler
    from scoresde.samplers.ode import ODESampler
    from scoresde.samplers.pc import EulerMaruyamaSampler, PCSampler

    return [
        ("PC (reverse diffusion + Langevin)", PCSampler(sde, num_steps=cfg["pc"])),
        ("Euler-Maruyama (reverse SDE)", EulerMaruyamaSampler(sde, num_steps=cfg["em"])),
        ("Heun (probability-flow ODE)", ODESampler(sde, method="heun", num_steps=cfg["ode"])),
        ("DPM-Solver++ (3M)", DPMSolverSampler(sde, num_steps=cfg["dpm"])),
        ("adaptive SDE (rtol 1e-2)", AdaptiveSDESampler(sde)),
    ]


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for r in rows:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from scoresde import plotting, toy
    from scoresde.data import DataScaler
    from scoresde.losses import DSMLoss
    from scoresde.metrics import mean_log_density, sliced_wasserstein
    from scoresde.training import Trainer, build_model

    device = _setup_torch(args)
    name = args.dataset
    two_d = sorted(k for k in toy.DATASETS if k != "digits")
    if name not in two_d:
        raise ValueError(f"--dataset must be a 2-D toy set ({', '.join(two_d)}), got {name!r}")
    cfg = dict(_DEMO["quick" if args.quick else "full"])
    if args.train_steps is not None:
        cfg["steps"] = args.train_steps
    if args.num is not None:
        cfg["num"] = args.num
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet

    # Data, scaled to zero mean and unit variance (the VP prior's scale); samples are mapped
    # back with the same scaler, so every number below is in the data's own units.
    data = toy.make_dataset(name, 20_000, generator=_generator(args.seed, "cpu"))
    scaler = DataScaler("standard").fit(data)
    model = build_model(
        "vp",
        "mlp",
        (2,),
        "v",
        net_kwargs={"hidden": cfg["hidden"], "num_blocks": cfg["blocks"]},
        seed=args.seed,
    )
    trainer = Trainer(
        model,
        DSMLoss(model.sde),
        lr=2e-3,
        batch_size=512,
        warmup_steps=min(100, cfg["steps"] // 10),
        ema_decay=0.995,
        seed=args.seed,
        device=device,
        distributed=False,
        data_scaler=scaler,
    )
    _say(args, f"training MLPScoreNet on {name} ({cfg['steps']} steps, VP SDE, {device})")
    start = time.perf_counter()
    trainer.fit(scaler.transform(data), cfg["steps"], progress=progress)
    train_s = time.perf_counter() - start
    trainer.save(out / "demo_checkpoint.pt")

    sde, score = model.sde, trainer.ema_model
    mixture = getattr(toy, _EXACT_MIXTURES[name])() if name in _EXACT_MIXTURES else None
    fresh = toy.make_dataset(name, cfg["num"], generator=_generator(args.seed + 2, "cpu"))
    fresh2 = toy.make_dataset(name, cfg["num"], generator=_generator(args.seed + 3, "cpu"))

    def quality(x: Any) -> list[str]:
        x = x.detach().to("cpu", torch.float64)
        sw = sliced_wasserstein(x, fresh, generator=_generator(0, "cpu"))
        cells = [f"{float(sw):.3f}"]
        if mixture is not None:
            ld = mean_log_density(x, mixture)
            cells.append(f"{float(ld.mean):.3f} +- {float(ld.stderr):.3f}")
        return cells

    header = ["solver", "NFE", "seconds", "sliced W2"]
    if mixture is not None:
        header.append("mean log p (true mixture)")
    rows = [["fresh data (reference)", "-", "-", *quality(fresh2)]]
    panels: dict[str, Any] = {}
    for label, sampler in _demo_solvers(sde, cfg):
        _say(args, f"sampling: {label}")
        start = time.perf_counter()
        x = sampler.sample(
            score,
            (cfg["num"], 2),
            generator=_generator(args.seed + 1, device),
            device=device,
            progress=progress,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        x = scaler.inverse_transform(x.float()).cpu()
        panels[f"{label}\nNFE {sampler.nfe}"] = x
        rows.append([label, str(sampler.nfe), f"{seconds:.2f}", *quality(x)])

    np.savez(
        out / "samples.npz",
        data=fresh.numpy(),
        **{f"solver{i}": v.numpy() for i, v in enumerate(panels.values())},
    )
    png = plotting.plot_samples_2d(
        panels,
        out / "demo.png",
        data=fresh,
        losses=trainer.history,
        title=f"scoresde demo: {name}, {cfg['steps']} training steps",
        ncols=4,
    )
    print()
    print(_format_table(header, rows))
    print()
    print(f"trained for {train_s:.1f} s; wrote {png} and {out / 'samples.npz'}")
    ckpt = out / "demo_checkpoint.pt"
    print(f"more samples: scoresde sample {ckpt} --sampler pc --num-samples 5000")
    if mixture is not None:
        print(
            "sliced W2: distance to fresh data (the reference row: between two true sets). "
            "mean log p: below the data's own, samples are more spread out than the data; "
            "above it, more concentrated."
        )
    return 0


# --- train --------------------------------------------------------------------------------------


def _net_kwargs(args: argparse.Namespace, net: str) -> dict[str, Any]:
    if net == "mlp":
        return {"hidden": args.hidden, "num_blocks": args.blocks}
    return {"channels": tuple(args.channels)}


def _periodic_plot(ckpt_dir: Path, data_shape: Sequence[int], scaler: Any, seed: int) -> Any:
    """A Trainer callback that samples the EMA model with 20 DPM-Solver++ steps and writes
    `samples_stepXXXXXXX.png` into the checkpoint folder."""
    from scoresde.samplers.dpm_solver import DPMSolverSampler

    num = 64 if len(data_shape) == 3 else 1000

    def callback(trainer: Any) -> None:
        model = trainer.ema_model
        device = next(model.parameters()).device
        sampler = DPMSolverSampler(model.sde, num_steps=20)
        x = sampler.sample(
            model, (num, *data_shape), generator=_generator(seed, device), device=device
        )
        x = scaler.inverse_transform(x.detach().float()).cpu()
        path = ckpt_dir / f"samples_step{trainer.step:07d}.png"
        _plot_samples(x, path, f"step {trainer.step}", scaler)

    return callback


def _cmd_train(args: argparse.Namespace) -> int:
    from scoresde.losses import DSMLoss
    from scoresde.training import Trainer, build_model

    device = _setup_torch(args)
    ckpt_dir = Path(args.ckpt_dir)
    progress = not args.quiet
    _check_ckpt_dir_is_folder(ckpt_dir)
    if not args.resume:
        _check_new_run_folder(ckpt_dir, args.overwrite)
    if args.resume:
        trainer = Trainer.from_checkpoint(ckpt_dir, device=device, distributed=None)
        cli = trainer.user_config.get("cli") or {}
        if not cli:
            raise ValueError(f"{ckpt_dir} was not written by 'scoresde train'; cannot resume")
        data_args = argparse.Namespace(**{**vars(args), **cli["data_args"]})
        x = _load_training_data(data_args)
        scaler = trainer.data_scaler
        _say(args, f"resuming at step {trainer.step} from {ckpt_dir}")
    else:
        x = _load_training_data(args)
        data_shape = tuple(x.shape[1:])
        net = args.net
        if net == "auto":
            net = "unet" if x.ndim == 4 else "mlp"
        scaler = _fit_scaler(args.scaling, x, args.per_feature)
        sde_kwargs: dict[str, Any] = {}
        if args.sde == "ve":
            sde_kwargs["sigma_max"] = (
                args.sigma_max
                if args.sigma_max is not None
                else _max_pairwise_distance(scaler.transform(x))
            )
        elif args.sigma_max is not None:
            raise ValueError(f"--sigma-max is only used with --sde ve, got --sde {args.sde}")
        sigma_data = args.sigma_data
        if sigma_data is None:  # the scaled data's std (1 for standardised data)
            std = float(scaler.transform(x).float().std())
            sigma_data = float(f"{std:.3g}") if math.isfinite(std) and std > 0 else 1.0
        model = build_model(
            args.sde,
            net,
            data_shape,
            args.param,
            sde_kwargs=sde_kwargs,
            net_kwargs=_net_kwargs(args, net),
            seed=args.seed,
            preconditioning=args.preconditioning,
            sigma_data=sigma_data,
        )
        data_args = {
            "data": args.data,
            "key": args.key,
            "num_data": args.num_data,
            "image_size": args.image_size,
            "seed": args.seed,
        }
        trainer = Trainer(
            model,
            DSMLoss(model.sde),
            lr=args.lr if args.lr is not None else (2e-4 if net == "unet" else 1e-3),
            batch_size=args.batch_size,
            ema_decay=args.ema,
            checkpoint_dir=ckpt_dir,
            checkpoint_every=args.ckpt_every,
            seed=args.seed,
            device=device,
            data_scaler=scaler,
            config={"cli": {"data_args": data_args}},
        )
        _say(
            args,
            f"training a {net} score model ({args.param}-prediction, {args.sde} SDE) on "
            f"{args.data}: {x.shape[0]} samples of shape {list(data_shape)}, {trainer.device}",
        )
    remaining = args.steps - trainer.step if args.resume else args.steps
    if remaining <= 0:
        _say(args, f"nothing to do: the checkpoint is at step {trainer.step} >= --steps")
        return 0
    plot_every = args.ckpt_every if args.plot_every is None else args.plot_every
    callback = None
    if plot_every:
        shape = tuple(x.shape[1:])
        callback = _periodic_plot(ckpt_dir, shape, scaler, args.seed)
    trainer.fit(
        scaler.transform(x),
        remaining,
        progress=progress,
        callback=callback,
        callback_every=plot_every or None,
    )
    if trainer.dist.is_main:  # under torchrun, only rank 0 writes files and reports
        from scoresde import plotting
        from scoresde.runlog import read_metrics

        # The loss curve of the whole run (resumed sessions included), from its metrics log.
        plotting.plot_loss(read_metrics(ckpt_dir)["loss"], ckpt_dir / "loss.png")
        if callback is not None and trainer.step % plot_every:
            callback(trainer)  # a plot of the final model as well
        exported = trainer.save_pretrained(ckpt_dir / PRETRAINED_DIR)  # EMA weights + scaler
        _say(
            args,
            f"step {trainer.step}: checkpoint {ckpt_dir / 'latest.pt'}; model for "
            f"ScoreModel.from_pretrained in {exported}",
        )
    from scoresde.distributed import shutdown

    shutdown()  # under torchrun: leave the process group cleanly (a no-op otherwise)
    return 0


# --- sample -------------------------------------------------------------------------------------


def _cmd_sample(args: argparse.Namespace) -> int:
    import warnings

    from scoresde import distributed as sdist
    from scoresde.samplers.pc import BatchDependenceWarning

    device = _setup_torch(args)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must name an .npz file, got {args.out!r}")
    _check_sample_outputs(out, args.overwrite)
    info, device = sdist.setup(None, device)  # under torchrun: join the process group
    model, scaler, cfg = _load_checkpoint(args.checkpoint, device, ema=not args.no_ema)
    sampler = _make_sampler(args.sampler, model.sde, args.steps, args.rtol)
    data_shape = tuple(cfg["model"]["data_shape"])
    start = time.perf_counter()
    # Global batches of --batch-size, each with per-sample noise streams: the samples are
    # those of one process whatever the number of processes (see scoresde.distributed).
    with warnings.catch_warnings():
        # PC's Langevin step depends on the batch: --help says so; the batches themselves do
        # not depend on the number of processes, so torchrun still matches one process.
        warnings.simplefilter("ignore", BatchDependenceWarning)
        x = sdist.sample(
            sampler,
            model,
            args.num,
            data_shape,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            progress=not args.quiet,
            info=info,
        )
    seconds = time.perf_counter() - start
    nfe = sampler.nfe_total
    if x is None:  # not rank 0: its batches went to rank 0
        sdist.shutdown()
        return 0
    samples = x.float().cpu()
    if scaler is not None:
        samples = scaler.inverse_transform(samples)
    _save_samples_npz(out, samples.numpy())
    title = f"{args.sampler}, NFE {sampler.nfe}"
    png = _plot_samples(samples, out.with_suffix(".png"), title, scaler)
    procs = f" on {info.world_size} processes" if info.enabled else ""
    _say(
        args,
        f"{args.num} samples of shape {list(data_shape)} with {type(sampler).__name__}: NFE {nfe}"
        f"{' per process' if procs else ''}, {seconds:.1f} s{procs} -> {out}"
        + (f" and {png}" if png is not None else ""),
    )
    sdist.shutdown()
    return 0


# --- likelihood ---------------------------------------------------------------------------------


def _recorded_data(args: argparse.Namespace, stored: dict, key: str | None) -> tuple[str, Any]:
    """No DATA argument: the data recorded in the checkpoint by `train`, said out loud (a
    toy set is drawn afresh; a file is read again, and must still exist)."""
    from scoresde.toy import DATASETS

    source = stored.get("data")
    if source is None:
        raise ValueError("give the data to score: this checkpoint does not record its data")
    key = key if key is not None else stored.get("key")
    if source in DATASETS and not Path(source).exists():
        what = f"fresh samples of the toy set {source!r} the model was trained on"
    elif Path(source).exists():
        what = f"{source!r}, the training data recorded in the checkpoint"
    else:
        raise FileNotFoundError(
            f"no data given, and the training data recorded in the checkpoint, {source!r}, "
            "does not exist (any more); give the data to score"
        )
    _say(args, f"no data given: scoring {what} (pass DATA to score other data)")
    return source, key


def _cmd_likelihood(args: argparse.Namespace) -> int:
    import torch

    from scoresde import distributed as sdist
    from scoresde.data import load_data
    from scoresde.likelihood import dequantization_offset

    device = _setup_torch(args)
    info, device = sdist.setup(None, device)  # under torchrun: join the process group
    model, scaler, cfg = _load_checkpoint(args.checkpoint, device, ema=not args.no_ema)
    data_shape = tuple(cfg["model"]["data_shape"])
    stored = ((cfg.get("user") or {}).get("cli") or {}).get("data_args") or {}
    source, key = args.data, args.key
    if source is None:  # the training data, read the way `train` read it
        source, key = _recorded_data(args, stored, key)
    # Images are resized to the training size unless --image-size says otherwise.
    image_size = args.image_size if args.image_size is not None else stored.get("image_size")
    x, _ = load_data(source, key=key, n=args.num, image_size=image_size, seed=args.seed + 1)
    if tuple(x.shape[1:]) != data_shape:
        raise ValueError(
            f"data samples have shape {list(x.shape[1:])} but the model was trained on "
            f"{list(data_shape)}"
        )
    dim = math.prod(data_shape)
    trace = args.trace or ("exact" if dim <= 16 else "hutchinson")
    # The model sees y = (x - shift) / scale, so log p_x(x) = log p_y(y) - sum log|scale|
    # (change of variables): bits/dim in the data's own units, whatever the scaling.
    log_det = 0.0
    if scaler is not None:
        log_det = float(scaler.scale.to(torch.float64).expand(data_shape).abs().log().sum())
        x = scaler.transform(x)
    # Global batches of --batch-size shared out over the processes under torchrun, with
    # per-point Hutchinson probes: the values are those of one process.
    res = sdist.log_likelihood(
        model,
        model.sde,
        x.to(device),
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
        info=info,
        trace=trace,
        rtol=args.rtol,
        atol=args.rtol,
    )
    if res is None:  # not rank 0
        sdist.shutdown()
        return 0
    logp, nfe = res
    bpd = (-(logp - log_det) / (dim * math.log(2))).reshape(-1)
    what = "continuous density"
    if args.num_bins is not None:
        lo_hi = args.data_range
        if lo_hi is None:
            if scaler is None or scaler.kind != "minmax" or scaler.shift.numel() != 1:
                raise ValueError("--num-bins needs --data-range LO HI for this checkpoint")
            shift, scale = float(scaler.shift), float(scaler.scale)
            lo_hi = (shift - scale, shift + scale)
        bpd = bpd + dequantization_offset(args.num_bins, tuple(lo_hi))
        what = f"{args.num_bins} levels in [{lo_hi[0]:g}, {lo_hi[1]:g}], uniform dequantization"
    mean = float(bpd.mean())
    se = float(bpd.std() / math.sqrt(bpd.numel())) if bpd.numel() > 1 else float("nan")
    print(
        f"{bpd.numel()} points of {source}: {mean:.4f} +- {se:.4f} bits/dim "
        f"({what}; {trace} trace, {nfe} NFE)"
    )
    if args.per_point is not None:
        import numpy as np

        per_point = Path(args.per_point)
        per_point.parent.mkdir(parents=True, exist_ok=True)
        np.savez(per_point, logp=(logp - log_det).numpy(), bpd=bpd.numpy())
        _say(args, f"per-point values -> {per_point}")
    sdist.shutdown()
    return 0


# --- bench --------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from scoresde.bench import SUITES, run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.suite != "all" and args.suite not in SUITES:
        raise ValueError(f"--suite must be 'all' or one of {', '.join(SUITES)}, got {args.suite!r}")
    out = Path(args.out)
    for suite in SUITES if args.suite == "all" else (args.suite,):
        _say(args, f"benchmark suite {suite} ({args.mode}) -> {out}")
        run(suite, args.mode, out, progress=not args.quiet)
        report = out / f"{suite}.md"
        if report.is_file():
            print(report.read_text())
    return 0


# --- entry point --------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean a user's mistake, not a bug."""
    errors: list[type[BaseException]] = [
        ValueError,
        TypeError,
        OSError,  # missing or unreadable files, unreadable images, a full disk
    ]
    try:
        from scoresde.training import CheckpointError

        errors.append(CheckpointError)
    except ImportError:
        pass
    try:
        from scoresde.samplers.base import NonFiniteError

        errors.append(NonFiniteError)
    except ImportError:
        pass
    return tuple(errors)


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: one line on stderr; status 128 + the signal number (130 for
    Ctrl-C). Training saves a checkpoint first (`TrainingInterrupted`) and says where."""
    signum = getattr(exc, "signum", None)
    if signum is None:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 saves and reports
        return 128 + int(signum)
    hint = "; continue it with --resume" if getattr(exc, "checkpoint", None) else ""
    print(f"{PROG}: {exc}{hint}", file=sys.stderr)
    return 128 + int(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `scoresde` with `argv` (default sys.argv[1:]); returns the exit status.

    Usage errors exit with 2 (through SystemExit, as argparse does); a user's mistake found
    while running returns 1 after printing one line `scoresde: error: <reason>`.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except _user_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


def _entry() -> NoReturn:  # pragma: no cover - thin wrapper for console scripts
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
