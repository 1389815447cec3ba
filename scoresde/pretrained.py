"""Saving a trained `ScoreModel` as a folder that loads without unpickling anything.

    model.save_pretrained("my-model")          # my-model/config.json + model.safetensors
    model = ScoreModel.from_pretrained("my-model", device="cuda")
    samples = model.data_scaler.inverse_transform(sampler.sample(model, (64, 2)))

`calibration.json` (only when `model.calibrations` is not empty) holds sampler calibrations
fitted for these weights (`ScoreModel.calibrate`, `scoresde.calibration`); a save without
calibrations removes a stale one.

`config.json` holds the `build_model` spec of the model (`scoresde.recipes.model_spec`:
SDE, network name and kwargs, data shape, class count and ScoreModel's own options such as
the parameterization), the weights' dtype and the `DataScaler` (kind, shift, scale as
numbers) that maps samples back to data units. `model.safetensors` holds the state dict.

Loading reads JSON and the safetensors header, builds the model on the meta device and
compares its parameter names and shapes with the file's before allocating anything, so a
config that does not fit its weights (or asks for a huge network) fails with
`scoresde.checkpoints.CheckpointError` naming the mismatch.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from scoresde._atomic import atomic_write
from scoresde._validation import check_device
from scoresde.data import DataScaler
from scoresde.nets.score_model import ScoreModel

__all__ = ["save_pretrained", "load_pretrained", "is_pretrained_dir", "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT = "scoresde.pretrained"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; refuse to parse anything absurd


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding a `config.json` (as written by `save_pretrained`)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def _scaler_to_json(scaler: DataScaler | None) -> dict[str, Any] | None:
    if scaler is None:
        return None
    if not isinstance(scaler, DataScaler):
        raise TypeError(f"data_scaler must be a DataScaler or None, got {type(scaler).__name__}")
    if not scaler.fitted:
        raise ValueError("data_scaler is not fitted: fit it (or pass data_range) before saving")
    return {
        "kind": scaler.kind,
        "per_feature": scaler.per_feature,
        # float64 values as JSON numbers: repr round-trips them exactly
        "shift": scaler.shift.tolist(),
        "scale": scaler.scale.tolist(),
    }


def save_pretrained(
    model: ScoreModel, path: str | os.PathLike, *, data_scaler: DataScaler | None = None
) -> Path:
    """Write `path/config.json` and `path/model.safetensors` (see the module docstring).

    Args:
        model: a `ScoreModel` whose spec is known (made by `scoresde.recipes.build_model`,
            or an `MLPScoreNet` / `UNet` in a built-in SDE).
        path: the folder (created if needed; the two files in it are replaced).
        data_scaler: saved with the model; default `model.data_scaler` if it has one.
    Returns the folder's Path.
    """
    from safetensors.torch import save_file

    from scoresde.recipes import model_spec

    if not isinstance(model, ScoreModel):
        raise TypeError(f"model must be a ScoreModel, got {type(model).__name__}")
    spec = model_spec(model)
    if spec is None or spec["sde"].get("custom"):
        raise ValueError(
            "save_pretrained needs a model made by scoresde.training.build_model (or an "
            "MLPScoreNet / UNet in a built-in SDE); for other networks save "
            "model.state_dict() with safetensors yourself"
        )
    scaler = data_scaler if data_scaler is not None else getattr(model, "data_scaler", None)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": {**spec, **model.config()},  # the spec, with the model's current options
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "data_scaler": _scaler_to_json(scaler),
        "weights": WEIGHTS_NAME,
    }
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path must be a folder, got the file {str(folder)!r}")
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    atomic_write(
        folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT})
    )
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    _save_calibrations(model, folder)
    return folder


def _save_calibrations(model: ScoreModel, folder: Path) -> None:
    """calibration.json for the model's calibrations; none: remove a stale file (it was
    fitted for the weights just replaced)."""
    from scoresde.calibration import CALIBRATION_NAME, same_config, save_calibrations

    cals = list(getattr(model, "calibrations", None) or [])
    sde = model.sde.config()
    for cal in cals:
        if not same_config(cal.sde, sde):
            raise ValueError(f"a calibration for the SDE {cal.sde} cannot be saved with {sde}")
    if cals:
        save_calibrations(folder / CALIBRATION_NAME, cals)
    else:
        with contextlib.suppress(FileNotFoundError):
            (folder / CALIBRATION_NAME).unlink()


def read_pretrained_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated `config.json` of a saved model folder (raises CheckpointError)."""
    from scoresde.checkpoints import CheckpointError

    folder = Path(path)
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no {CONFIG_NAME} (not a saved model)")
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{str(file)!r} is too large to be a scoresde model config")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{str(file)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{str(file)!r} is not a scoresde model config")
    if config.get("version") != VERSION:
        raise CheckpointError(
            f"{str(file)!r} has version {config.get('version')!r}; this scoresde reads {VERSION}"
        )
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{str(file)!r} holds no model spec")
    return config


def load_pretrained(path: str | os.PathLike, device: torch.device | str | None = None) -> Any:
    """The `ScoreModel` saved in folder `path` (eval mode, on `device`, default CPU), with
    `model.data_scaler` set (a DataScaler or None). See the module docstring."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from scoresde.checkpoints import CheckpointError, check_spec_fits
    from scoresde.recipes import _model_from_spec

    if device is not None:
        device = check_device("device", device)
    folder = Path(path)
    config = read_pretrained_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no {WEIGHTS_NAME}")
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header only: names, shapes
            shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
        check_spec_fits(config["model"], {k: _Shape(v) for k, v in shapes.items()}, "weights")
        model = _model_from_spec(config["model"])
        state = load_file(str(weights), device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"{str(weights)!r} is not a readable safetensors file: {err}") from (
            err
        )
    except CheckpointError as err:
        raise CheckpointError(f"{str(folder)!r}: {err}") from err
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # keep float64 weights float64
        model = model.to(dtypes.pop())
    model.load_state_dict(state)
    try:
        scaler_cfg = config.get("data_scaler")
        scaler = None if scaler_cfg is None else DataScaler.from_state_dict(scaler_cfg)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{str(folder)!r}: bad data_scaler entry: {err}") from err
    model.data_scaler = scaler
    model.calibrations = _load_calibrations(folder)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _load_calibrations(folder: Path) -> list[Any]:
    from scoresde.calibration import CALIBRATION_NAME, load_calibrations

    file = folder / CALIBRATION_NAME
    return load_calibrations(file) if file.is_file() else []


class _Shape:
    """A stand-in tensor for shape checks (only `.shape`)."""

    def __init__(self, shape: torch.Size) -> None:
        self.shape = shape
