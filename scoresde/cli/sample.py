"""`scoresde sample`: draw samples from a checkpoint or a saved model."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from scoresde.cli._common import (
    _check_output_path,
    _check_sample_outputs,
    _common,
    _load_checkpoint,
    _make_sampler,
    _overwrite_option,
    _per_batch,
    _plot_samples,
    _positive_float,
    _positive_int,
    _save_samples_npz,
    _say,
    _setup_torch,
    _to_data_units,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `sample` subcommand."""
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
    p.add_argument(
        "--rtol",
        type=_positive_float,
        default=None,
        help="tolerance of --sampler adaptive (refused for the others)",
    )
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
        help="samples per batch (1024); the samples do not depend on the number of processes "
        "under torchrun, which share out the batches, nor on the batch size up to rounding "
        "in the network (with --sampler adaptive that rounding can flip step decisions: "
        "samples then move by about the solver's error)",
    )
    p.add_argument("--out", default="samples.npz", help="output .npz (default samples.npz)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="ignore a saved model's calibration.json (by default a time grid calibrated for "
        "exactly this sampler and step count, by ScoreModel.calibrate, is used; the grid used "
        "is printed)",
    )
    _overwrite_option(p, "replace an existing --out file (and the PNG beside it)")
    _common(p)
    p.set_defaults(func=_cmd_sample)
    return p


def _use_calibration(args: argparse.Namespace, model: Any, sampler: Any) -> Any:
    """The sampler with the model's calibrated grid when one matches it (and
    --no-calibration is not given); says which grid is used."""
    from scoresde.calibration import calibrated_sampler

    cals = getattr(model, "calibrations", None) or []
    grid = getattr(sampler, "time_grid", None)
    grid = grid if isinstance(grid, str) else "the sampler's own"
    if not cals:
        if hasattr(sampler, "time_grid"):
            _say(args, f"time grid: {grid} (default; the model holds no calibration)")
        return sampler
    if args.no_calibration:
        _say(args, f"time grid: {grid} (default; --no-calibration: {len(cals)} ignored)")
        return sampler
    tuned, cal = calibrated_sampler(model, sampler)
    if cal is None:
        have = ", ".join(f"{c.sampler} {c.num_steps} steps" for c in cals)
        _say(args, f"time grid: {grid} (default; no calibration matches, the model has: {have})")
        return sampler
    _say(args, f"time grid: {cal.describe()}")
    return tuned


def _cmd_sample(args: argparse.Namespace) -> int:
    from scoresde import distributed as sdist

    device = _setup_torch(args)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must name an .npz file, got {args.out!r}")
    _check_output_path("--out", out)
    _check_sample_outputs(out, args.overwrite)
    info, device = sdist.setup(None, device)  # under torchrun: join the process group
    model, scaler, cfg = _load_checkpoint(args.checkpoint, device, ema=not args.no_ema)
    sampler = _make_sampler(args.sampler, model.sde, args.steps, args.rtol)
    sampler = _use_calibration(args, model, sampler)
    data_shape = tuple(cfg["model"]["data_shape"])
    start = time.perf_counter()
    # Global batches of --batch-size, each with per-sample noise streams: the samples are
    # those of one process whatever the number of processes (see scoresde.distributed).
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
    samples = _to_data_units(scaler, x)  # float64, so a large data offset keeps its digits
    _save_samples_npz(out, samples.numpy())
    title = f"{args.sampler}, NFE {sampler.nfe}"
    png = _plot_samples(samples, out.with_suffix(".png"), title, scaler)
    procs = f" on {info.world_size} processes" if info.enabled else ""
    # NFE per sample path (one batch's score calls), not summed over the batches: the
    # figure that compares solvers, whatever --batch-size.
    batches = len(range(info.rank, math.ceil(args.num / args.batch_size), info.world_size))
    calls = f" per batch ({nfe} score calls over {batches} batches)" if batches > 1 else ""
    _say(
        args,
        f"{args.num} samples of shape {list(data_shape)} with {type(sampler).__name__}: "
        f"NFE {_per_batch(nfe, batches)}{calls}{' on this process' if procs else ''}, "
        f"{seconds:.1f} s{procs} -> {out}" + (f" and {png}" if png is not None else ""),
    )
    sdist.shutdown()
    return 0
