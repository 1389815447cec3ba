"""`scoresde train`: train a score model and write checkpoints, plots and the exported model."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scoresde._stopping import TrainingInterrupted
from scoresde.cli._columns import _recorded_columns
from scoresde.cli._common import (
    NET_NAMES,
    PARAMETERIZATIONS,
    PRECONDITIONINGS,
    PRETRAINED_DIR,
    SDE_NAMES,
    _check_ckpt_dir_is_folder,
    _check_new_run_folder,
    _common,
    _fit_scaler,
    _generator,
    _int_list,
    _load_training_data,
    _max_pairwise_distance,
    _nonneg_int,
    _NoteGiven,
    _overwrite_option,
    _plot_samples,
    _positive_float,
    _positive_int,
    _say,
    _setup_torch,
    _to_data_units,
    _warn,
)
from scoresde.cli._resume import _recorded_source, _resumed_run


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `train` subcommand."""
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
    _add_data_options(p)
    _add_model_options(p)
    _add_training_options(p)
    _overwrite_option(p, "start a new run in a --ckpt-dir that is not empty (replacing files)")
    _common(p)
    p.set_defaults(func=_cmd_train, given=frozenset())
    return p


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """`train`'s data and scaling options."""
    p.add_argument(
        "data",
        nargs="?",
        default=None,
        help="toy-set name (8gaussians, mixture3, two_moons, swiss_roll, checkerboard, "
        "circles, digits) or a path: .npy, .npz, .pt, .csv, .tsv (numeric columns; a header "
        "row is detected), or a folder of images; with --resume optional (default: the run's "
        "stored data)",
    )
    p.add_argument(
        "--key",
        action=_NoteGiven,
        default=None,
        help="array name inside a .npz/.pt file; for .csv/.tsv the columns to use (a,b,c)",
    )
    p.add_argument(
        "--num-data",
        action=_NoteGiven,
        type=_positive_int,
        default=None,
        help="use N samples of data",
    )
    p.add_argument(
        "--image-size",
        action=_NoteGiven,
        type=_positive_int,
        default=None,
        help="resize images to S x S",
    )
    p.add_argument(
        "--scaling",
        action=_NoteGiven,
        choices=("auto", "minmax", "standard", "none"),
        default="auto",
        help="data scaling: minmax onto [-1, 1] (auto for images; 0..255 for a folder of "
        "images), standard: zero mean and "
        "unit variance (auto for other data), none",
    )
    p.add_argument(
        "--per-feature",
        action=_NoteGiven,
        nargs=0,
        const=True,
        default=False,
        help="scale every feature (entry of a sample) separately, e.g. table columns",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """`train`'s SDE and network options."""
    p.add_argument(
        "--sde", action=_NoteGiven, choices=SDE_NAMES, default="vp", help="forward SDE (default vp)"
    )
    p.add_argument(
        "--sigma-max",
        action=_NoteGiven,
        type=_positive_float,
        default=None,
        help="VE SDE's sigma_max (default: the largest distance between training points)",
    )
    p.add_argument(
        "--net",
        action=_NoteGiven,
        choices=NET_NAMES,
        default="auto",
        help="network: mlp for flat data, unet for images [B, C, H, W] (default auto)",
    )
    p.add_argument(
        "--param",
        action=_NoteGiven,
        choices=PARAMETERIZATIONS,
        default="eps",
        help="network output: eps (default, DDPM's), v, x0, score (with the Gaussian "
        "preconditioning every one works with every sampler)",
    )
    p.add_argument(
        "--preconditioning",
        action=_NoteGiven,
        choices=PRECONDITIONINGS,
        default="gaussian",
        help="gaussian (default): the network predicts a residual over the optimal denoiser "
        "of N(0, sigma_data^2) data (EDM-style); none: the raw network output",
    )
    p.add_argument(
        "--sigma-data",
        action=_NoteGiven,
        type=_positive_float,
        default=None,
        help="data std the gaussian preconditioning assumes (default: the std of the scaled "
        "training data)",
    )
    p.add_argument(
        "--hidden",
        action=_NoteGiven,
        type=_positive_int,
        default=256,
        help="MLP width (default 256)",
    )
    p.add_argument(
        "--blocks",
        action=_NoteGiven,
        type=_positive_int,
        default=4,
        help="MLP residual blocks (default 4)",
    )
    p.add_argument(
        "--channels",
        action=_NoteGiven,
        type=_int_list,
        default=(32, 64),
        help="U-Net channels per level (32,64)",
    )


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """`train`'s optimisation, checkpoint and plotting options."""
    p.add_argument(
        "--steps", type=_positive_int, default=5000, help="training steps in total (default 5000)"
    )
    p.add_argument(
        "--batch-size", action=_NoteGiven, type=_positive_int, default=256, help="batch size (256)"
    )
    p.add_argument(
        "--lr",
        action=_NoteGiven,
        type=_positive_float,
        default=None,
        help="learning rate (default 1e-3 for the MLP, 2e-4 for the U-Net)",
    )
    p.add_argument(
        "--ema",
        action=_NoteGiven,
        type=float,
        default=0.999,
        help="EMA decay of the weights (0.999)",
    )
    p.add_argument("--ckpt-dir", default="scoresde-run", help="checkpoint folder (./scoresde-run)")
    p.add_argument(
        "--ckpt-every",
        action=_NoteGiven,
        type=_positive_int,
        default=1000,
        help="steps between checkpoints (1000)",
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
        help="continue the run in --ckpt-dir up to --steps, with its stored settings (other "
        "values given are ignored, with a warning); DATA, --key, --num-data and --image-size "
        "given replace the stored ones (the samples' shape must be the run's)",
    )


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
        x = _to_data_units(scaler, x)
        path = ckpt_dir / f"samples_step{trainer.step:07d}.png"
        _plot_samples(x, path, f"step {trainer.step}", scaler)

    return callback


def _warn_far_from_unit_scale(x: Any, sde: str) -> None:
    """--scaling none on data far from unit scale: the VP-type SDEs end in N(0, I) and their
    schedules assume data of about unit size, so training gives samples of the wrong scale."""
    size = float(x.abs().amax())
    spread = float(x.std())
    if size > 20 or spread < 0.02:
        _warn(
            f"--scaling none with data of largest |value| {size:.3g} and std {spread:.3g}: "
            f"the {sde} SDE assumes data of about unit scale (its prior is N(0, I)); use "
            "--scaling auto, or --sde ve"
        )


def _new_run(args: argparse.Namespace, ckpt_dir: Path, device: Any) -> tuple[Any, Any, Any]:
    """(Trainer, unscaled data, scaler) of a new run: load the data, fit the scaler, build
    the model from the options."""
    from scoresde.losses import DSMLoss
    from scoresde.recipes import build_model
    from scoresde.training import Trainer

    x = _load_training_data(args)
    data_shape = tuple(x.shape[1:])
    net = args.net
    if net == "auto":
        net = "unet" if x.ndim == 4 else "mlp"
    from_folder = Path(args.data).is_dir()  # 8-bit images: 0..255 whatever they hold
    scaler = _fit_scaler(args.scaling, x, args.per_feature, (0.0, 255.0) if from_folder else None)
    if args.scaling == "none" and args.sde != "ve":
        _warn_far_from_unit_scale(x, args.sde)
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
        "data": _recorded_source(args.data),  # absolute: --resume may run in another folder
        "key": args.key,
        "columns": _recorded_columns(args.data, args.key),  # a table's, read by name later
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
    return trainer, x, scaler


def _clear_previous_run(ckpt_dir: Path) -> None:
    """Before a new run over an old one (--overwrite): remove the old run's exported model and
    sample grids, which the new run would not all replace (a crash, or other plot steps)."""
    import shutil

    from scoresde.checkpoints import LATEST
    from scoresde.pretrained import is_pretrained_dir

    if not (ckpt_dir / LATEST).is_file():
        return  # not a scoresde run: --overwrite replaces only files of the same names
    if is_pretrained_dir(ckpt_dir / PRETRAINED_DIR):
        shutil.rmtree(ckpt_dir / PRETRAINED_DIR)
    for old in ckpt_dir.glob("samples_step*.png"):
        old.unlink()


def _cmd_train(args: argparse.Namespace) -> int:
    device = _setup_torch(args)
    ckpt_dir = Path(args.ckpt_dir)
    progress = not args.quiet
    _check_ckpt_dir_is_folder(ckpt_dir)
    if not args.resume:
        if args.data is None:
            raise ValueError("give the training data DATA (a toy-set name or a path)")
        _check_new_run_folder(ckpt_dir, args.overwrite)
        _clear_previous_run(ckpt_dir)
    if args.resume:
        trainer, x, scaler = _resumed_run(args, ckpt_dir, device)
    else:
        trainer, x, scaler = _new_run(args, ckpt_dir, device)
    remaining = args.steps - trainer.step if args.resume else args.steps
    if remaining <= 0:
        _say(args, f"nothing to do: the checkpoint is at step {trainer.step} >= --steps")
        return 0
    # "At checkpoints": the run's own interval (a resumed run keeps its stored one).
    plot_every = trainer.checkpoint_every if args.plot_every is None else args.plot_every
    callback = None
    if plot_every:
        shape = tuple(x.shape[1:])
        callback = _periodic_plot(ckpt_dir, shape, scaler, args.seed)
    try:
        trainer.fit(
            scaler.transform(x).float(),  # scaled in float64, then cast
            remaining,
            progress=progress,
            callback=callback,
            callback_every=plot_every or None,
        )
    except TrainingInterrupted as stop:
        # model/ would otherwise keep an older step's export (another run's after --overwrite)
        # next to the new latest.pt.
        if trainer.dist.is_main and stop.checkpoint is not None:
            stop.exported = trainer.save_pretrained(ckpt_dir / PRETRAINED_DIR)
        raise
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

    # Release the DDP-wrapped model first: its reducer holds the process group, whose gloo
    # threads must be joined while the interpreter is alive (left to exit, a rank aborted with
    # "terminate called without an active exception" in ~1 of 12 torchrun runs under load).
    del trainer, callback
    shutdown()  # under torchrun: leave the process group cleanly (a no-op otherwise)
    return 0
