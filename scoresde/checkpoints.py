"""Checkpoints: writing them atomically, reading and validating them, and rebuilding a
model from one.

Checkpoints are written atomically (torch.save to a temporary file in the same folder,
flush + fsync, os.replace), so a crash mid-write leaves the previous `latest.pt` intact;
`remove_stale_temp_files` deletes what a killed run left. Reading validates the file before
touching anything: random bytes, a torch file that is not a scoresde checkpoint and a
checkpoint of another architecture raise `CheckpointError`. A model's spec is checked
against its weights on the meta device before the model is built (`check_spec_fits`).

`TrainerCheckpoints` holds the `Trainer`'s checkpoint methods (config, state_dict, save,
save_pretrained, load, from_checkpoint).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from scoresde._atomic import atomic_write
from scoresde._typing import Tensor
from scoresde._validation import check_device
from scoresde.data import DataScaler
from scoresde.losses import build_loss
from scoresde.nets.score_model import ScoreModel
from scoresde.recipes import _model_from_spec, model_spec, sde_config
from scoresde.sdes import SDE

if TYPE_CHECKING:
    from scoresde.training import Trainer


__all__ = [
    "CheckpointError",
    "LATEST",
    "TEMP_FILE_PATTERNS",
    "read_checkpoint",
    "load_model",
    "check_spec_fits",
    "LoadedModel",
    "remove_stale_temp_files",
]

CHECKPOINT_FORMAT = "scoresde.checkpoint"
CHECKPOINT_VERSION = 1
LATEST = "latest.pt"


class CheckpointError(ValueError):
    """A file that is not a readable scoresde checkpoint, or one that does not fit the model."""


def check_spec_fits(spec: Any, state: Any, what: str = "model") -> None:
    """Raise CheckpointError unless the model a checkpoint's spec describes has exactly the
    keys and shapes of its weights `state`. The model is built on the meta device, so a
    small file cannot make the reader allocate a huge network before the check."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"the checkpoint's model spec is not a dict: {type(spec).__name__}")
    try:
        skeleton = _model_from_spec(spec, meta=True)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"the checkpoint's model spec cannot be built: {err}") from err
    _check_state_compatible(what, skeleton, state)


# --- checkpoint files -------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in path's folder, fsync, then os.replace (`atomic_write`:
    the file gets the mode a plain open() would give it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _check_checkpoint_dir(path: str | os.PathLike | None) -> Path | None:
    """checkpoint_dir must be a folder (or not exist yet): refused at once, not at the first
    save after training ran."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path, got {type(path).__name__}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint_dir {str(folder)!r} exists and is not a folder")
    for parent in folder.parents:  # a file where a parent folder should be
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"checkpoint_dir {str(folder)!r}: {str(parent)!r} is a file, not a folder"
                )
            break
    return folder


# The temporary files of `_atomic_save` for latest.pt and step_XXXXXXXX.pt.
TEMP_FILE_PATTERNS = (f".{LATEST}.*.tmp", ".step_*.pt.*.tmp")


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files a run killed while checkpointing left in its folder
    (only those `_atomic_save` names for latest.pt and step_XXXXXXXX.pt). Returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for pattern in TEMP_FILE_PATTERNS:
        for tmp in folder.glob(pattern):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


_REQUIRED_KEYS = ("step", "model", "ema", "optimizer", "scheduler", "rng", "config")


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a scoresde checkpoint (a file, or a folder holding `latest.pt`).

    Raises FileNotFoundError if it does not exist and `CheckpointError` if it is not a
    complete scoresde checkpoint (truncated, random bytes, another program's file).
    Loads with `weights_only=True`: no code from the file is executed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, random bytes, unpickling refusal, ...
        # torch's own text goes on for lines and suggests weights_only=False: its first
        # sentence is enough (the full error stays chained).
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]
        looks_like_data = path.suffix.lower() in (".npy", ".npz", ".csv", ".tsv", ".txt")
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (truncated or not a torch file): "
            f"{type(err).__name__}: {first}"
            + ("; it looks like data: the checkpoint comes first" if looks_like_data else "")
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is a torch file but not a scoresde checkpoint")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {obj.get('version')!r}; this scoresde "
            f"reads version {CHECKPOINT_VERSION}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks the entries {missing}")
    return obj


class LoadedModel(NamedTuple):
    """A trained model rebuilt from a checkpoint: `model` (eval mode), the `data_scaler`
    that maps its samples back to data units (or None) and the stored `config`."""

    model: ScoreModel
    data_scaler: DataScaler | None
    config: dict[str, Any]


def _rebuild_model(
    cfg: dict, path: str | os.PathLike, hint: str, state: Any, what: str
) -> ScoreModel:
    """The ScoreModel of a checkpoint's configuration, once its spec is checked against the
    weights `state` (only models made by `build_model` carry the spec needed to rebuild
    them; `hint` says what to do otherwise)."""
    if not cfg.get("model"):
        raise CheckpointError(
            f"{str(path)!r} holds no model spec (the model was not made by build_model); {hint}"
        )
    check_spec_fits(cfg["model"], state, what)
    return _model_from_spec(cfg["model"])


def load_model(
    path: str | os.PathLike, *, ema: bool = True, device: torch.device | str | None = None
) -> LoadedModel:
    """Rebuild the model of a checkpoint (made with `build_model`) with its EMA weights
    (`ema=True`, the ones to sample from) or its raw weights, for sampling / likelihoods."""
    if device is not None:
        device = check_device("device", device)
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    state = ckpt["ema" if ema else "model"]
    what = "EMA model" if ema else "model"
    hint = "build the model yourself and load_state_dict(read_checkpoint(path)['ema'])"
    model = _rebuild_model(cfg, path, hint, state, what)
    model.load_state_dict(state)
    if device is not None:
        model = model.to(device)
    scaler = cfg.get("data_scaler")
    return LoadedModel(
        model.eval(), None if scaler is None else DataScaler.from_state_dict(scaler), cfg
    )


def _meaning(opts: dict[str, Any]) -> dict[str, Any]:
    """What a ScoreModel's weights mean, canonically: Gaussian-preconditioned v-prediction
    with sigma_data = 1 and input scaling is exactly raw v-prediction (c_skip = 0,
    c_out = 1, c_in = 1/s), so the two read the same weights the same way."""
    out = {
        "parameterization": opts["parameterization"],
        "preconditioning": opts.get("preconditioning", "none"),
        "scale_input": bool(opts.get("scale_input", True)),
    }
    if out["preconditioning"] == "gaussian":
        sd = float(opts.get("sigma_data", 1.0))
        if out["parameterization"] == "v" and sd == 1.0 and out["scale_input"]:
            out["preconditioning"] = "none"
        else:
            out["sigma_data"] = sd
    return out


def _check_same_semantics(model: nn.Module, spec: Any, path: str | os.PathLike) -> None:
    """Raise CheckpointError if a ScoreModel would read the stored weights with another
    meaning (parameterization, preconditioning, sigma_data, input scaling) than they were
    trained with: the state dicts alone cannot tell. A spec without "preconditioning"
    predates it and means "none"."""
    if not isinstance(model, ScoreModel) or not isinstance(spec, dict):
        return
    if "parameterization" not in spec:
        return
    stored, mine = _meaning(spec), _meaning(model.config())
    if mine != stored:
        raise CheckpointError(
            f"{str(path)!r} was trained with {stored}, but the model has {mine}; build the "
            "model with the stored settings or use Trainer.from_checkpoint / load_model"
        )


def _check_state_compatible(what: str, module: nn.Module, state: dict[str, Tensor]) -> None:
    """Raise CheckpointError unless `state` has exactly module's keys and shapes."""
    own = module.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's {what} entry is not a state dict")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: {tuple(getattr(state[k], 'shape', ()))} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(
            f"the checkpoint's {what} does not fit this model (a different architecture?): "
            + "; ".join(parts)
        )


def _check_optimizer_compatible(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise CheckpointError("the checkpoint's optimizer state does not fit this model")
    for mine, theirs in zip(opt.param_groups, groups, strict=True):
        if len(mine["params"]) != len(theirs.get("params", ())):
            raise CheckpointError("the checkpoint's optimizer state does not fit this model")


class TrainerCheckpoints:
    """The `Trainer`'s checkpoint methods (a mixin: the Trainer's state lives in
    scoresde.training)."""

    def config(self) -> dict[str, Any]:
        """The configuration stored in checkpoints (plain Python values and tensors)."""
        model = self.model
        cfg: dict[str, Any] = {
            "trainer": {
                "lr": self.lr,
                "weight_decay": self.weight_decay,
                "betas": list(self.betas),
                "batch_size": self.batch_size,
                "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps,
                "min_lr_ratio": self.min_lr_ratio,
                "grad_clip": self.grad_clip,
                "ema_decay": self.ema_decay,
                "ema_warmup": self.ema_warmup,
                "checkpoint_every": self.checkpoint_every,
                "keep_checkpoints": self.keep_checkpoints,
                "seed": self.seed,
                "log_every": self.log_every,
                "mixed_precision": self.mixed_precision,
                "max_skipped_steps": self.max_skipped_steps,
                "world_size": self.dist.world_size,
            },
            "model": model_spec(model),
            "model_class": type(model).__name__,
            "net_class": type(getattr(model, "net", model)).__name__,
            "parameterization": getattr(model, "parameterization", None),
            "sde": sde_config(model.sde) if isinstance(getattr(model, "sde", None), SDE) else None,
            "loss": self.loss.config() if hasattr(self.loss, "config") else None,
            "data_scaler": None if self.data_scaler is None else self.data_scaler.state_dict(),
            "user": self.user_config,
        }
        return cfg

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: see the module docstring."""
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "data": self._data_gen.get_state(),
            "noise": self._noise_gen.get_state(),
        }
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": None if self._scaler is None else self._scaler.state_dict(),
            "rng": rng,
            "history": torch.tensor(self.history, dtype=torch.float64),
            "config": self.config(),
        }

    def save(
        self, path: str | os.PathLike | None = None, *, extra: dict[str, Any] | None = None
    ) -> Path | None:
        """Write a checkpoint atomically (rank 0 only; other ranks return None).

        Default path: `checkpoint_dir/latest.pt` (plus `step_XXXXXXXX.pt` with
        keep_checkpoints). `extra`: more entries for the checkpoint dict (plain values, e.g.
        a mark of the program that wrote it); they may not replace `state_dict`'s own.
        Returns the path written.
        """
        if not self.dist.is_main:
            return None
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("path is required when the Trainer has no checkpoint_dir")
            target = self.checkpoint_dir / LATEST
        else:
            target = Path(path)
        self._check_finite_weights()
        state = self.state_dict()
        clash = sorted(set(extra or {}) & set(state))
        if clash:
            raise ValueError(f"extra may not replace the checkpoint's entries {clash}")
        state.update(extra or {})
        if path is None and self.keep_checkpoints:
            _atomic_save(state, self.checkpoint_dir / f"step_{self.step:08d}.pt")
        _atomic_save(state, target)
        self._last_saved = (target, self.step)
        return target

    def save_pretrained(self, path: str | os.PathLike) -> Path | None:
        """Export the EMA model and the data scaler as a `ScoreModel.save_pretrained`
        folder (config.json + model.safetensors) that `ScoreModel.from_pretrained` reads
        (rank 0 only; other ranks return None)."""
        if not self.dist.is_main:
            return None
        if not isinstance(self.ema_model, ScoreModel):
            raise TypeError(
                f"save_pretrained needs a ScoreModel, the trainer holds {type(self.model).__name__}"
            )
        ema = self.ema_model
        if getattr(ema, "spec", None) is None and getattr(self.model, "spec", None) is not None:
            ema.spec = self.model.spec  # type: ignore[attr-defined]
        return ema.save_pretrained(path, data_scaler=self.data_scaler)

    def load(self, path: str | os.PathLike) -> Trainer:
        """Restore a checkpoint written by `save` (a file, or a folder with `latest.pt`).

        Everything is validated first; on any error (`CheckpointError`, FileNotFoundError)
        the trainer is left unchanged. Returns self.
        """
        ckpt = read_checkpoint(path, map_location=self.device)
        _check_same_semantics(self.model, ckpt["config"].get("model"), path)
        _check_state_compatible("model", self.model, ckpt["model"])
        _check_state_compatible("EMA model", self.ema_model, ckpt["ema"])
        _check_optimizer_compatible(self.optimizer, ckpt["optimizer"])
        rng = ckpt["rng"]
        if not isinstance(rng, dict) or not {"torch", "data", "noise"} <= set(rng):
            raise CheckpointError("the checkpoint's RNG states are incomplete")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema_model.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self._scaler is not None and ckpt.get("grad_scaler") is not None:
                self._scaler.load_state_dict(ckpt["grad_scaler"])
            torch.set_rng_state(rng["torch"].cpu())
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
            self._data_gen.set_state(rng["data"].cpu())
            self._noise_gen.set_state(rng["noise"].cpu())
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"could not restore {str(path)!r}: {err}") from err
        self.step = int(ckpt["step"])
        self.history = [float(v) for v in ckpt.get("history", torch.zeros(0)).tolist()]
        scaler = ckpt["config"].get("data_scaler")
        if scaler is not None:
            self.data_scaler = DataScaler.from_state_dict(scaler)
        return self

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, loss: Callable[..., Tensor] | None = None, **overrides: Any
    ) -> Trainer:
        """Rebuild model (from the `build_model` spec it was saved with), loss and trainer
        settings from a checkpoint alone, and load it.

        `overrides` replace stored Trainer settings (e.g. checkpoint_dir=, device=,
        distributed=). A model not made by `build_model` cannot be rebuilt: construct it and
        call `Trainer(model, loss, ...).load(path)` instead.
        """
        ckpt = read_checkpoint(path)
        cfg = ckpt["config"]
        hint = "build the model yourself and call trainer.load(path)"
        model = _rebuild_model(cfg, path, hint, ckpt["model"], "model")
        if loss is None:
            if not cfg.get("loss"):
                raise CheckpointError(f"{str(path)!r} holds no loss config; pass loss=")
            loss = build_loss(model.sde, cfg["loss"])
        kwargs = dict(cfg["trainer"])
        kwargs.pop("world_size", None)
        kwargs["betas"] = tuple(kwargs["betas"])
        kwargs["mixed_precision"] = kwargs["mixed_precision"] or False
        if cfg.get("data_scaler") is not None:
            kwargs["data_scaler"] = DataScaler.from_state_dict(cfg["data_scaler"])
        kwargs["config"] = cfg.get("user") or {}
        if "checkpoint_dir" not in overrides and Path(path).is_dir():
            kwargs["checkpoint_dir"] = path
        kwargs.update(overrides)
        return cls(model, loss, **kwargs).load(path)

    resume = from_checkpoint  # the name used by other training libraries

    resume = from_checkpoint  # the name used by other training libraries
