"""`scoresde train --resume`: the resumed run's data, and a warning about the options it
ignores (the model, scaler and optimiser settings are the run's stored ones)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scoresde.cli._columns import _columns_key, _recorded_columns
from scoresde.cli._common import _load_training_data, _say, _warn

# The data options a resumed run takes from the command line when given (else the stored
# ones); DATA itself is the positional `data`, None when not given.
_DATA_OPTIONS = ("key", "num_data", "image_size")


def _recorded_source(source: str) -> str:
    """The data source as a run stores it: an existing file or folder as an absolute path,
    so that --resume and `likelihood` read it from any folder; anything else (a toy-set
    name) as given. load_data reads an existing path before a toy-set name, and so does
    this."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def _resumed_run(args: argparse.Namespace, ckpt_dir: Path, device: Any) -> tuple[Any, Any, Any]:
    """(Trainer, unscaled data, scaler) of the run in `ckpt_dir`, with its stored settings
    and the data given on the command line (else the stored data)."""
    from scoresde.training import Trainer

    trainer = Trainer.from_checkpoint(ckpt_dir, device=device, distributed=None)
    cli = trainer.user_config.get("cli") or {}
    if not cli:
        raise ValueError(f"{ckpt_dir} was not written by 'scoresde train'; cannot resume")
    cfg = trainer.config()
    _warn_ignored(args, _stored_settings(cfg, cli["data_args"]))
    data_shape = tuple(cfg["model"]["data_shape"])
    x, data_args = _resumed_data(args, cli["data_args"], data_shape, ckpt_dir)
    # Later checkpoints record the data read now (absolute), for `likelihood` and --resume.
    trainer.user_config = {**trainer.user_config, "cli": {**cli, "data_args": data_args}}
    _say(args, f"resuming at step {trainer.step} from {ckpt_dir} on {data_args['data']}")
    return trainer, x, trainer.data_scaler


def _resumed_data(
    args: argparse.Namespace, stored: dict[str, Any], data_shape: tuple[int, ...], ckpt_dir: Path
) -> tuple[Any, dict[str, Any]]:
    """(unscaled data, the data_args to store) of a resumed run: DATA, --key, --num-data and
    --image-size when given on the command line, else the stored ones; without --key, a
    table with a header is read by the run's recorded column names. A stored relative
    path (runs stored them so before) is read from the current folder, as it was then."""
    from scoresde.toy import DATASETS

    given = getattr(args, "given", frozenset())
    data_args = {**stored, **{k: getattr(args, k) for k in _DATA_OPTIONS if k in given}}
    if args.data is not None:
        data_args["data"] = args.data
        what = f"DATA {args.data!r}"
    else:
        source = str(data_args["data"])
        if source not in DATASETS and not Path(source).exists():
            raise FileNotFoundError(
                f"the training data stored in {ckpt_dir}, {source!r}, does not exist (a "
                "relative path is read from the current folder); give DATA to resume with"
            )
        what = f"the run's stored data {source!r}"
    read = dict(data_args)
    if "key" not in given:  # a table with a header: the run's columns, by name
        by_name = _columns_key(data_args["data"], stored.get("columns"))
        read["key"] = by_name if by_name is not None else read.get("key")
    x = _load_training_data(argparse.Namespace(**read))
    if tuple(x.shape[1:]) != data_shape:
        raise ValueError(
            f"{what} holds samples of shape {list(x.shape[1:])}, but the run in {ckpt_dir} "
            f"was trained on samples of shape {list(data_shape)}"
        )
    columns = _recorded_columns(data_args["data"], read.get("key"))
    if columns is not None:  # else the stored ones (if any) stay
        data_args["columns"] = columns
    data_args["data"] = _recorded_source(str(data_args["data"]))
    return x, data_args


def _stored_settings(cfg: dict[str, Any], data_args: dict[str, Any]) -> dict[str, Any]:
    """The run's value of each `train` option that --resume takes from the checkpoint, by
    option dest (None: the run has no such setting, e.g. --hidden of a U-Net)."""
    trainer, model = cfg["trainer"], cfg.get("model") or {}
    sde = model.get("sde") or {}
    net_kwargs = model.get("net_kwargs") or {}
    scaler = cfg.get("data_scaler") or {}
    scaling = scaler.get("kind")
    shift, scale = scaler.get("shift"), scaler.get("scale")
    if shift is not None and scale is not None and bool((shift == 0).all() & (scale == 1).all()):
        scaling = "none"  # --scaling none is stored as the identity map
    return {
        "lr": trainer["lr"],
        "batch_size": trainer["batch_size"],
        "ema": trainer["ema_decay"],
        "ckpt_every": trainer["checkpoint_every"],
        "seed": data_args.get("seed", trainer["seed"]),
        "sde": sde.get("name"),
        "sigma_max": sde.get("sigma_max"),
        "net": model.get("net"),
        "param": model.get("parameterization"),
        "preconditioning": model.get("preconditioning", "none"),
        "sigma_data": model.get("sigma_data"),
        "hidden": net_kwargs.get("hidden"),
        "blocks": net_kwargs.get("num_blocks"),
        "channels": tuple(net_kwargs["channels"]) if "channels" in net_kwargs else None,
        "scaling": scaling,
        "per_feature": bool(scaler.get("per_feature", False)),
    }


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "unset" if value is None else str(value)


def _warn_ignored(args: argparse.Namespace, stored: dict[str, Any]) -> None:
    """One line on stderr naming the options given on the command line that differ from
    the run's stored settings, which --resume keeps: silently training with other values
    than the user typed would mislead. 'auto' values choose nothing, so never differ."""
    given = getattr(args, "given", frozenset())
    ignored = []
    for dest, was in stored.items():
        value = getattr(args, dest)
        if dest not in given or value == "auto" or value == was:
            continue
        option = "--" + dest.replace("_", "-")
        typed = option if value is True else f"{option} {_shown(value)}"
        ignored.append(f"{typed} (the run's: {_shown(was)})")
    if ignored:
        _warn("--resume keeps the run's stored settings; ignoring " + ", ".join(ignored))
