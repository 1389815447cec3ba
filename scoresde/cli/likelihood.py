"""`scoresde likelihood`: bits/dim of data under a model (probability-flow ODE)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from scoresde.cli._columns import _columns_key, _table_columns
from scoresde.cli._common import (
    _PER_POINT_MARK,
    _check_output_path,
    _check_replaceable,
    _common,
    _load_checkpoint,
    _overwrite_option,
    _per_batch,
    _positive_float,
    _positive_int,
    _save_npz,
    _say,
    _setup_torch,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `likelihood` subcommand."""
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
        help="array name inside a .npz/.pt file; for .csv/.tsv the columns to use (a,b,c); "
        "default: the run's (a table with a header: the training columns, by name)",
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
    _overwrite_option(p, "replace a --per-point file that 'scoresde likelihood' did not write")
    _common(p)
    p.set_defaults(func=_cmd_likelihood)
    return p


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


def _same_kind_of_file(source: str, stored: dict) -> bool:
    """Whether `source` is a file of the kind (suffix; every table suffix is one kind) the
    run was trained on, so that the run's --key (an array name, or table columns) applies."""
    from scoresde.data import TABLE_EXTENSIONS

    def kind(path: str) -> str:
        suffix = Path(path).suffix.lower()
        return ".csv" if suffix in TABLE_EXTENSIONS else suffix

    trained = stored.get("data")
    return trained is not None and kind(source) != "" and kind(source) == kind(trained)


def _training_key(args: argparse.Namespace, source: str, key: Any, stored: dict) -> Any:
    """No --key given: the columns of training, by name, of a table with a header (in any
    column order); else the run's --key for a file of the kind it was trained on."""
    by_name = _columns_key(source, stored.get("columns"))
    if by_name is not None:
        if args.data is not None and by_name != _table_columns(source):
            _say(args, f"reading the columns {by_name} of {source!r} by name, as in training")
        return by_name
    if key is None and stored.get("key") is not None and _same_kind_of_file(source, stored):
        key = stored["key"]  # the same array / columns as in training, e.g. of a test file
        _say(args, f"reading --key {key!r} of {source!r}, as in training (pass --key to change)")
    return key


def _cmd_likelihood(args: argparse.Namespace) -> int:
    import torch

    from scoresde import distributed as sdist
    from scoresde.data import load_data
    from scoresde.likelihood import dequantization_offset

    device = _setup_torch(args)
    if args.data_range is not None and args.num_bins is None:  # was silently ignored
        raise ValueError("--data-range is only used with --num-bins (discrete data)")
    per_point = None if args.per_point is None else Path(args.per_point)
    if per_point is not None:  # before any work, as `sample --out`: np.savez adds .npz
        if per_point.suffix != ".npz":
            raise ValueError(f"--per-point must name an .npz file, got {args.per_point!r}")
        _check_output_path("--per-point", per_point)
        _check_replaceable(per_point, "--per-point", _PER_POINT_MARK, args.overwrite)
    info, device = sdist.setup(None, device)  # under torchrun: join the process group
    model, scaler, cfg = _load_checkpoint(args.checkpoint, device, ema=not args.no_ema)
    data_shape = tuple(cfg["model"]["data_shape"])
    stored = ((cfg.get("user") or {}).get("cli") or {}).get("data_args") or {}
    source, key = args.data, args.key
    if source is None:  # the training data, read the way `train` read it
        source, key = _recorded_data(args, stored, key)
    if args.key is None:
        key = _training_key(args, source, key, stored)
    # Images are resized to the training size unless --image-size says otherwise.
    image_size = args.image_size if args.image_size is not None else stored.get("image_size")
    x, _ = load_data(
        source, key=key, n=args.num, image_size=image_size, seed=args.seed + 1, dtype=torch.float64
    )
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
        x = scaler.transform(x)  # in float64: a large data offset keeps its digits
    weights_dtype = next(model.parameters()).dtype
    # Global batches of --batch-size shared out over the processes under torchrun, with
    # per-point Hutchinson probes: the values are those of one process.
    res = sdist.log_likelihood(
        model,
        model.sde,
        x.to(device=device, dtype=weights_dtype),
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
    batches = math.ceil(bpd.numel() / args.batch_size)
    calls = f" per batch, {nfe} over {batches} batches" if batches > 1 else ""
    print(
        f"{bpd.numel()} points of {source}: {mean:.4f} +- {se:.4f} bits/dim "
        f"({what}; {trace} trace, {_per_batch(nfe, batches)} NFE{calls})"
    )
    if per_point is not None:
        _save_npz(
            per_point,
            "--per-point",
            _PER_POINT_MARK,
            logp=(logp - log_det).numpy(),
            bpd=bpd.numpy(),
        )
        _say(args, f"per-point values -> {per_point}")
    sdist.shutdown()
    return 0
