"""Shared pieces of the `scoresde` command line: the argument parser's types and common
options, the guards that keep a command from replacing a user's files, torch set-up, data
loading and scaling, plots, samplers by name and model loading. Everything heavy is imported
inside the functions, so `scoresde --help` stays fast."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

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


class _NoteGiven(argparse.Action):
    """Store the value (`const` for a flag, nargs=0) and add the option's dest to
    `args.given`: `train --resume` must tell a value the user typed from a default, to warn
    about the settings it ignores (a default equal to the stored value is no news)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def _common(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """Options shared by the subcommands that compute."""
    if seed:
        parser.add_argument(
            "--seed",
            type=_nonneg_int,
            default=0,
            action=_NoteGiven,
            help="random seed (default 0)",
        )
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


# --- shared helpers -----------------------------------------------------------------------------


def _overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"{what}; default: refuse")


# --- not overwriting a user's files -------------------------------------------------------------

# `sample` and `likelihood` mark the .npz files they write with these zip comments (np.load
# ignores them), so that re-running a command may replace its own output but never a user's
# file of the same name.
_SAMPLES_MARK = b"scoresde sample output"
_PER_POINT_MARK = b"scoresde likelihood output"
_DEMO_MARK = b"scoresde demo output"


def _written_by(path: Path, mark: bytes) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.comment.startswith(mark)
    except (OSError, zipfile.BadZipFile):
        return False


# The PNG text keyword and checkpoint entry that carry the same marks in a plot (written
# with `plotting`'s metadata=) and in a checkpoint (`Trainer.save(extra=)`).
_PNG_MARK_KEY = "scoresde"
_CKPT_MARK_KEY = "written_by"


def _png_written_by(path: Path, mark: bytes) -> bool:
    """Whether the PNG `path` holds the text chunk `_PNG_MARK_KEY` = `mark` (before its
    image data, where matplotlib writes it)."""
    import struct

    wanted = _PNG_MARK_KEY.encode() + b"\0" + mark
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while len(head := f.read(8)) == 8:
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                if f.read(length) == wanted and kind == b"tEXt":
                    return True
                f.seek(4, os.SEEK_CUR)  # the chunk's CRC
    except OSError:
        return False
    return False


def _checkpoint_written_by(path: Path, mark: bytes) -> bool:
    """Whether the torch file `path` is a dict whose `_CKPT_MARK_KEY` entry is `mark`
    (loaded with weights_only and mmap: nothing runs, the tensors are not read)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file, unpickling refused, unreadable
        return False
    return isinstance(obj, dict) and obj.get(_CKPT_MARK_KEY) == mark.decode()


def _check_replaceable(
    path: Path, option: str, mark: bytes, overwrite: bool, written_by: Any = _written_by
) -> None:
    """Refuse (before any work) to replace the file `path` given as `option` unless an
    earlier run of the same command wrote it (`written_by(path, mark)`: `_written_by` for
    an .npz, `_png_written_by`, `_checkpoint_written_by`) or --overwrite is given."""
    if not overwrite and path.exists() and not (path.is_file() and written_by(path, mark)):
        command = mark.decode().split()[1]
        raise ValueError(
            f"{option} {str(path)!r} already exists and was not written by 'scoresde "
            f"{command}'; choose another {option} or pass --overwrite to replace it"
        )


def _check_sample_outputs(out: Path, overwrite: bool) -> None:
    """Refuse (before any work) to replace an --out .npz, or the PNG beside it, that an
    earlier `scoresde sample` did not write, unless --overwrite."""
    _check_replaceable(out, "--out", _SAMPLES_MARK, overwrite)
    if overwrite:
        return
    png = out.with_suffix(".png")
    if png.exists() and not out.exists():
        raise ValueError(
            f"{str(png)!r} (the plot written beside --out) already exists; choose another "
            "--out or pass --overwrite to replace it"
        )


def _check_output_path(option: str, path: Path, *, folder: bool = False) -> None:
    """Before any work: the folder that will hold the output `path` (`path` itself when
    `folder`) exists or can be created, and takes new files; a file output is not a folder.
    Otherwise a bad --out would fail only after the sampling or training, naming a temp file.
    Errors name the option and the user's path."""
    import tempfile

    where = path if folder else path.parent

    def refuse(reason: str) -> NoReturn:
        raise ValueError(f"{option} {str(path)!r}: {reason}")

    if not folder and path.is_dir():
        refuse("is a folder; give a file name")
    for parent in (where, *where.parents):  # the nearest existing one must be a folder
        if parent.exists():
            if not parent.is_dir():
                where_file = "" if parent == path else f"{str(parent)!r} "
                refuse(f"{where_file}is a file, not a folder")
            break
    try:
        where.mkdir(parents=True, exist_ok=True)
        # A probe file: a folder may exist and still refuse new files (read-only, /proc).
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=where)
    except OSError as exc:
        refuse(f"cannot write in the folder {str(where)!r}: {exc.strerror or exc}")
    os.close(fd)
    os.unlink(probe)


def _save_npz(out: Path, option: str, mark: bytes | None = None, **arrays: Any) -> None:
    """np.savez(out, **arrays) atomically (temp file + os.replace), with the zip comment
    `mark` when given (`_written_by`). A failure names `option` and `out`, not the
    temp file."""
    import zipfile

    import numpy as np

    from scoresde._atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, **arrays)
        if mark is not None:
            with zipfile.ZipFile(tmp, "a") as z:
                z.comment = mark

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, write)
    except OSError as exc:
        raise OSError(f"{option} {str(out)!r}: cannot write: {exc.strerror or exc}") from exc


def _save_samples_npz(out: Path, samples: Any) -> None:
    """`sample`'s --out: the array 'samples', with the mark of `_written_by_sample`."""
    _save_npz(out, "--out", _SAMPLES_MARK, samples=samples)


def _check_new_run_folder(ckpt_dir: Path, overwrite: bool) -> None:
    """A new `train` run writes into a new or empty folder; a folder holding a checkpoint is
    continued with --resume; anything else needs --overwrite (files of the same names as
    the run's outputs are then replaced). Stale checkpoint temp files do not count."""
    import fnmatch

    from scoresde.checkpoints import LATEST, TEMP_FILE_PATTERNS

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
        from scoresde._validation import check_device

        device = check_device("--device", name)
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


def _warn(text: str) -> None:
    """A `scoresde: warning: ...` line on stderr (only from rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def _max_pairwise_distance(x: Any, limit: int = 1000) -> float:
    """Song & Ermon's (2020) choice of sigma_max: the largest distance between two training
    points (on at most `limit` of them), so the prior covers the whole data set."""
    import torch

    flat = x[:limit].reshape(min(limit, x.shape[0]), -1).to(torch.float64)
    return float(torch.cdist(flat, flat).max().clamp_min(1.0))


def _load_training_data(args: argparse.Namespace) -> Any:
    """The training data x `[N, *D]`, unscaled float64 on the CPU: the scaler is fitted and
    applied in float64 and only the scaled data is cast to the model's float32 (data with a
    large offset, such as Unix timestamps near 1.7e9, would be quantised to steps of 128 by
    a float32 cast before scaling)."""
    import torch

    from scoresde.data import load_data

    x, _ = load_data(
        args.data,
        key=args.key,
        n=args.num_data,
        image_size=args.image_size,
        seed=args.seed,
        dtype=torch.float64,
    )
    return x


def _to_data_units(scaler: Any, x: Any) -> Any:
    """Model-space samples `[N, *D]` -> data units, float64 on the CPU (the inverse scaling
    in float64, so a large offset keeps its digits)."""
    x = x.detach().cpu().double()
    return x if scaler is None else scaler.inverse_transform(x)


def _fit_scaler(
    kind: str, x: Any, per_feature: bool = False, pixel_range: tuple[float, float] | None = None
) -> Any:
    """The data scaler: minmax onto [-1, 1] for images (rank 4), standardisation otherwise
    (auto); `none` is the identity. One (shift, scale) for the whole tensor unless
    `per_feature`. `pixel_range`: the fixed range of auto's minmax for images read from a
    folder (8-bit: 0..255), not the data's min..max (a dark image set would otherwise be
    stretched, and --num-bins 256 would bin the wrong range)."""
    from scoresde.data import DataScaler

    if kind == "auto" and x.ndim == 4 and pixel_range is not None and not per_feature:
        return DataScaler("minmax", data_range=pixel_range)
    if kind == "auto":
        kind = "minmax" if x.ndim == 4 else "standard"
    if kind == "none":
        if per_feature:
            raise ValueError("--per-feature needs a scaling, not --scaling none")
        return DataScaler("minmax", data_range=(-1.0, 1.0))  # identity map
    return DataScaler(kind, per_feature=per_feature).fit(x)


def _per_batch(nfe: int, batches: int) -> str:
    """The NFE of one batch of `batches` that made `nfe` score calls in all: exact for
    fixed steps, the mean for adaptive solvers (whose batches differ)."""
    mean = nfe / max(batches, 1)
    return f"{mean:.0f}" if mean == int(mean) else f"{mean:.1f}"


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
    if rtol is not None:  # silently ignored before; --steps with adaptive is refused too
        raise ValueError(f"--rtol is only used by --sampler adaptive, not {name}; set --steps")
    n = DEFAULT_STEPS.get(name) if steps is None else steps
    return cls(sde, num_steps=n)


# --- checkpoints --------------------------------------------------------------------------------


def _load_checkpoint(path: str, device: Any, *, ema: bool = True) -> tuple[Any, Any, dict]:
    """(model on `device` in eval mode, its DataScaler or None, the stored config) from a
    checkpoint file, a `scoresde train` folder or a `save_pretrained` folder (config.json +
    model.safetensors). Raises FileNotFoundError / CheckpointError."""
    from scoresde.checkpoints import LATEST, load_model
    from scoresde.pretrained import is_pretrained_dir, load_pretrained, read_pretrained_config

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
