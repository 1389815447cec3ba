"""`Trainer`: fits a score model with a loss of `scoresde.losses`, reproducibly.

One training step: draw a batch (indices from the trainer's own seeded CPU generator),
draw the loss noise (times, z, label-dropout mask, from a second seeded generator on the
model's device), loss.backward(), clip the gradient norm, AdamW step, linear learning-rate
warm-up, EMA update of the weights. Everything random comes from those two generators, so
runs are reproducible, and a checkpoint (model, EMA, optimizer, scheduler, grad scaler,
step, loss history, the RNG states and the configuration) resumes *bit-exactly* on CPU.

Checkpoints are written atomically (torch.save to a temporary file in the same folder,
flush + fsync, os.replace), so a crash mid-write leaves the previous `latest.pt` intact.
Reading validates the file before touching the trainer: random bytes, a torch file that
is not a scoresde checkpoint and a checkpoint of another architecture raise
`CheckpointError` and leave both the trainer and the files unchanged.

Multi-process: under `torchrun` (or with `distributed=True`) the network is wrapped in
DistributedDataParallel; each rank draws the same global batch of `batch_size` samples
and its noise and keeps its slice (see `scoresde.distributed`), so K processes compute
what one process computes on the same global batch. Only rank 0 writes checkpoints, shows
progress and runs the callback.

Mixed precision (`torch.autocast`, bf16 or fp16 with a GradScaler) is used only on CUDA.

`build_model` / `build_sde` make a model from names (for the CLI), and record that spec so
`Trainer.from_checkpoint(path)` can rebuild everything from a checkpoint alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from scoresde import distributed as sdist
from scoresde._validation import check_choice, check_positive, check_positive_int
from scoresde.data import DataScaler
from scoresde.losses import build_loss
from scoresde.nets.embedding import FourierTimeEmbedding
from scoresde.nets.mlp import MLPScoreNet
from scoresde.nets.score_model import ScoreModel
from scoresde.nets.unet import UNet
from scoresde.runlog import MetricsLog, tensorboard_available
from scoresde.samplers.base import NonFiniteError
from scoresde.sdes import SDE, VESDE, VPSDE, CosineVPSDE, SubVPSDE

Tensor = torch.Tensor

__all__ = [
    "Trainer",
    "CheckpointError",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "build_sde",
    "build_model",
    "sde_config",
    "read_checkpoint",
    "load_model",
    "model_spec",
    "check_spec_fits",
    "LoadedModel",
    "SDE_NAMES",
    "NET_NAMES",
]

CHECKPOINT_FORMAT = "scoresde.checkpoint"
CHECKPOINT_VERSION = 1
LATEST = "latest.pt"


class CheckpointError(ValueError):
    """A file that is not a readable scoresde checkpoint, or one that does not fit the model."""


class TrainingInterrupted(KeyboardInterrupt):
    """`fit` stopped on SIGINT (Ctrl-C) or SIGTERM after finishing its current step, with a
    checkpoint saved when the Trainer has a checkpoint_dir. Attributes: `signum`, `step`,
    `checkpoint` (the path written, or None). A KeyboardInterrupt, so an uncaught one
    stops a script as Ctrl-C always did."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"training interrupted by {name} at step {step}; {saved}")


class _StopSignals:
    """While active (in the main thread), SIGINT and SIGTERM only set `signum`, so `fit` can
    finish the current step, save and stop; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError, OSError):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now, without saving
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


class TrainingDivergedError(NonFiniteError):
    """The loss or the weights became NaN/Inf. Training stopped; no checkpoint holding
    non-finite weights was written, so the last one on disk is the last good state."""


# --- building models from names ---------------------------------------------------------------

SDE_NAMES: dict[str, type[SDE]] = {
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "cosine": CosineVPSDE,
}
NET_NAMES = ("mlp", "unet")


def build_sde(name: str, **kwargs: Any) -> SDE:
    """An SDE by name: "vp", "subvp", "ve" or "cosine", with its constructor's kwargs."""
    check_choice("sde", name, tuple(SDE_NAMES))
    return SDE_NAMES[name](**kwargs)


def sde_config(sde: SDE) -> dict[str, Any]:
    """{"name": ..., constructor kwargs} of a built-in SDE (inverse of `build_sde`)."""
    return sde.config()  # asked of the SDE (scoresde.sdes)


def build_model(
    sde: str | SDE = "vp",
    net: str = "mlp",
    data_shape: Sequence[int] = (2,),
    parameterization: str = "eps",
    *,
    num_classes: int | None = None,
    sde_kwargs: dict[str, Any] | None = None,
    net_kwargs: dict[str, Any] | None = None,
    seed: int | None = 0,
    scale_input: bool = True,
    preconditioning: str = "gaussian",
    sigma_data: float = 1.0,
) -> ScoreModel:
    """A `ScoreModel` from names, e.g. `build_model("vp", "unet", (1, 8, 8))`.

    Args:
        sde: an SDE name ("vp", "subvp", "ve", "cosine"; kwargs in `sde_kwargs`) or an SDE.
        net: "mlp" (`MLPScoreNet(dim=prod(data_shape))`, for any data shape) or "unet"
            (`UNet(in_channels=C)`, data_shape (C, H, W)); extra kwargs in `net_kwargs`.
        data_shape: the shape D of one sample (without the batch dimension).
        parameterization: "eps" (default, as `ScoreModel` and DDPM), "v", "score" or "x0".
            With the default Gaussian preconditioning every one samples as well with the
            probability-flow ODE solvers as with SDE solvers (before it, raw eps- and
            score-networks did not: see docs/solvers.md).
        num_classes: labels for a conditional network (label num_classes = null class).
        seed: seeds the weight initialisation without touching the global RNG (None: use
            the global RNG).
        scale_input, preconditioning, sigma_data: passed to `ScoreModel`. A recorded spec
            without "preconditioning" (checkpoints made before it existed) means "none".

    The returned model carries `model.spec`, the plain-dict recipe that rebuilds it, which
    the Trainer stores in checkpoints.
    """
    data_shape = tuple(int(d) for d in data_shape)
    if not data_shape or any(d < 0 for d in data_shape) or data_shape[0] <= 0:
        raise ValueError(
            "data_shape must be a non-empty tuple of non-negative ints with a positive first "
            f"entry (0 = any size, for the U-Net's H and W), got {data_shape!r}"
        )
    check_choice("net", net, NET_NAMES)
    net_kwargs = dict(net_kwargs or {})
    if isinstance(sde, SDE):
        sde_obj, sde_cfg = sde, sde_config(sde)
    else:
        sde_obj = build_sde(sde, **(sde_kwargs or {}))
        sde_cfg = sde_config(sde_obj)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if net == "mlp":
            network: nn.Module = MLPScoreNet(
                dim=math.prod(data_shape), num_classes=num_classes, **net_kwargs
            )
        else:
            if len(data_shape) != 3:  # (H, W may be 0 in a recorded spec: any size)
                raise ValueError(f"net='unet' needs data_shape (C, H, W), got {data_shape!r}")
            network = UNet(in_channels=data_shape[0], num_classes=num_classes, **net_kwargs)
    model = ScoreModel(
        network,
        sde_obj,
        parameterization,
        scale_input=scale_input,
        preconditioning=preconditioning,
        sigma_data=sigma_data,
    )
    model.spec = {  # type: ignore[attr-defined]
        "sde": sde_cfg,
        "net": net,
        "data_shape": list(data_shape),
        "num_classes": num_classes,
        "net_kwargs": net_kwargs,
        **model.config(),  # parameterization, scale_input, ... (ScoreModel's own options)
    }
    return model


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The `build_model` recipe of a model: its `spec` if `build_model` made it, else one
    read off a `ScoreModel` of a built-in SDE around an `MLPScoreNet` or `UNet`; None for
    anything else (such a model is saved, but must be rebuilt by its author to load)."""
    spec = getattr(model, "spec", None)
    if spec is not None:
        return spec
    if not isinstance(model, ScoreModel) or sde_config(model.sde).get("custom"):
        return None
    net = model.net
    if type(net) is UNet:
        kwargs = dict(net.init_kwargs)
        name, shape = "unet", [kwargs.pop("in_channels"), 0, 0]  # H, W: any
    elif type(net) is MLPScoreNet:
        first = net.time_embed[0]
        kwargs = {
            "hidden": net.inp.out_features,
            "num_blocks": len(net.blocks),
            "time_embedding": "fourier"
            if isinstance(first, FourierTimeEmbedding)
            else "sinusoidal",
            "embed_dim": net.time_embed[1].in_features,
        }
        name, shape = "mlp", [net.dim]
    else:
        return None
    num_classes = kwargs.pop("num_classes", None) if name == "unet" else net.num_classes
    return {
        "sde": sde_config(model.sde),
        "net": name,
        "data_shape": shape,
        "num_classes": num_classes,
        "net_kwargs": kwargs,
        **model.config(),
    }


def _model_from_spec(spec: dict[str, Any], *, meta: bool = False) -> ScoreModel:
    """The model of a `build_model` spec; `meta=True` builds it on the meta device (shapes
    only, no memory), to check a checkpoint's spec against its tensors first."""
    sde_cfg = dict(spec["sde"])
    if sde_cfg.pop("custom", False):
        raise CheckpointError(
            f"the checkpoint's SDE {sde_cfg.get('name')!r} is not built in; build the model "
            "yourself and use trainer.load(path)"
        )
    name = sde_cfg.pop("name")
    sde = build_sde(name, **sde_cfg)  # (outside the meta context: the SDE's own tables)
    # ScoreModel's own options (parameterization, scale_input, ...) go through as they are.
    options = {k: spec[k] for k in ScoreModel.option_names() if k in spec}
    # Specs written before preconditioning existed mean the raw network output.
    options.setdefault("preconditioning", "none")
    with torch.device("meta") if meta else contextlib.nullcontext():
        return build_model(
            sde,
            spec["net"],
            spec["data_shape"],
            num_classes=spec.get("num_classes"),
            net_kwargs=spec.get("net_kwargs"),
            seed=0,  # overwritten by the weights; seeded so the global RNG is untouched
            **options,
        )


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
    """torch.save to a temp file in path's folder, flush + fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (truncated or not a torch file): "
            f"{type(err).__name__}: {err}"
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


# --- the trainer ------------------------------------------------------------------------------


def check_finite_rows(name: str, x: Tensor, where: str = "") -> None:
    """Raise ValueError naming the first row of x `[N, *D]` that holds NaN or Inf."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).squeeze(1)
        raise ValueError(
            f"{name}{where} contains NaN or Inf values: row {int(rows[0])} is the first "
            f"({rows.numel()} of {x.shape[0]} rows); remove or impute them before training"
        )


class _TensorBatches:
    """Global batches of `batch_size` rows drawn with replacement by a seeded generator."""

    def __init__(self, x: Tensor, y: Tensor | None, batch_size: int, gen: torch.Generator):
        self.x, self.y, self.batch_size, self.gen = x, y, batch_size, gen

    def next(self) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=self.gen)
        return self.x[idx], (None if self.y is None else self.y[idx])


class _IterableBatches:
    """Batches from a DataLoader / iterable, restarted when exhausted (one per rank)."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self.it: Iterator[Any] = iter(data)
        self.count = 0  # batches drawn, to name a bad one

    def next(self) -> tuple[Tensor, Tensor | None]:
        try:
            item = next(self.it)
        except StopIteration:
            self.it = iter(self.data)
            try:
                item = next(self.it)
            except StopIteration:
                raise ValueError("data is an empty iterable") from None
        self.count += 1
        if torch.is_tensor(item):
            return self._checked(item), None
        if isinstance(item, (tuple, list)) and len(item) == 2 and torch.is_tensor(item[0]):
            return self._checked(item[0]), item[1]
        if isinstance(item, (tuple, list)) and len(item) == 1 and torch.is_tensor(item[0]):
            return self._checked(item[0]), None
        raise TypeError(
            "an iterable data source must yield tensors x or pairs (x, labels), got "
            f"{type(item).__name__}"
        )

    def _checked(self, x: Tensor) -> Tensor:
        """Refuse NaN/Inf in a batch (CPU batches only: on a device it would cost a sync per
        step; the non-finite-loss check catches those)."""
        if x.device.type == "cpu" and x.ndim >= 1:
            check_finite_rows("data", x, f" (batch {self.count} of the iterable)")
        return x


class Trainer:
    """Trains `model` (a `ScoreModel` or any score-function nn.Module) on `loss`.

    Args:
        model: the model; moved to `device`. Its float dtype (float32/float64) is kept and
            batches are cast to it.
        loss: a `DSMLoss`, `DDPMLoss`, or any callable loss(model, x0, generator=, y=).
        lr, weight_decay, betas: AdamW settings.
        batch_size: the global batch (split over processes under torchrun; must divide by
            the number of processes). Only used for tensor data: iterables yield their own
            batches (one per rank).
        warmup_steps: learning rate rises linearly from lr/warmup_steps to lr.
        decay_steps: if given, after the warm-up the learning rate follows a cosine from lr
            down to `min_lr_ratio * lr`, reached at step `decay_steps` and kept after it
            (None: constant lr, as in Song et al.).
        grad_clip: max global gradient norm (None or 0: no clipping).
        ema_decay: EMA decay of `ema_model`; with `ema_warmup` the decay used at step n is
            min(ema_decay, (1 + n) / (10 + n)), so short runs are not dominated by the init.
        checkpoint_dir: folder for `latest.pt` (every `checkpoint_every` steps and at the end
            of each `fit`); with `keep_checkpoints` also `step_XXXXXXXX.pt` files.
        seed: seeds the trainer's two generators (batches and loss noise).
        device: default cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu.
        mixed_precision: "auto" (bf16 where supported, else fp16, on CUDA only), "bf16",
            "fp16" or False; always off on CPU.
        distributed: None = detect torchrun's environment, True = require, False = off.
        data_scaler: a fitted `DataScaler`, saved in checkpoints (`trainer.data_scaler`) so
            samples can be mapped back to data units.
        config: extra plain-Python information to keep in checkpoints (`config["user"]`).
        log_every: the loss is synchronised (and the progress bar updated) every this many
            steps; `history` holds one float per step.
        max_skipped_steps: what a non-finite loss (or gradient norm) does. 0 (default): stop
            with `TrainingDivergedError` at the next loss synchronisation (no extra device
            sync). K > 0: skip such a step (no weight, optimizer or EMA update; its loss is
            recorded as NaN) and stop after K consecutive skipped steps; costs one device sync
            per step. In either case `save` refuses non-finite model or EMA weights, so a
            diverged run never overwrites a good checkpoint.
        progress: the default of `fit(progress=...)`: a tqdm bar with the loss (rank 0 only).
        tensorboard: with a checkpoint_dir, also write TensorBoard events to
            `checkpoint_dir/tensorboard` (None: when the tensorboard package is installed).
            `checkpoint_dir/metrics.csv` (step, loss, lr, grad_norm, seconds; see
            `scoresde.runlog`) is always written there.

    Attributes: `step` (optimizer steps taken), `model`, `ema_model` (a copy holding the
    EMA weights, in eval mode; sample from it), `optimizer`, `scheduler`, `history`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[..., Tensor],
        *,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        batch_size: int = 128,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        keep_checkpoints: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        mixed_precision: str | bool = "auto",
        distributed: bool | None = None,
        data_scaler: DataScaler | None = None,
        config: dict[str, Any] | None = None,
        log_every: int = 10,
        progress: bool = True,
        max_skipped_steps: int = 0,
        tensorboard: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable (e.g. DSMLoss), got {type(loss).__name__}")
        self.lr = check_positive("lr", lr)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.betas = (float(betas[0]), float(betas[1]))
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
        self.decay_steps = (
            None
            if decay_steps is None
            else check_positive_int("decay_steps", decay_steps, minimum=self.warmup_steps + 1)
        )
        self.min_lr_ratio = check_positive("min_lr_ratio", min_lr_ratio, allow_zero=True)
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.grad_clip = None if not grad_clip else check_positive("grad_clip", grad_clip)
        self.ema_decay = check_positive("ema_decay", ema_decay, allow_zero=True)
        if self.ema_decay >= 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.ema_warmup = bool(ema_warmup)
        self.checkpoint_dir = _check_checkpoint_dir(checkpoint_dir)
        self.checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
        self.keep_checkpoints = bool(keep_checkpoints)
        self.seed = int(seed)
        self.log_every = check_positive_int("log_every", log_every)
        self.max_skipped_steps = check_positive_int(
            "max_skipped_steps", max_skipped_steps, minimum=0
        )
        self._skipped = 0  # consecutive skipped steps (max_skipped_steps > 0)
        self._last_saved: tuple[Path, int] | None = None  # (path, step) of the last save
        self.progress = bool(progress)
        self.tensorboard = None if tensorboard is None else bool(tensorboard)
        if self.tensorboard and not tensorboard_available():
            raise ValueError(
                "tensorboard=True needs the tensorboard package (pip install tensorboard); "
                "use tensorboard=None to write events only when it is installed"
            )
        if data_scaler is not None and not isinstance(data_scaler, DataScaler):
            raise TypeError(f"data_scaler must be a DataScaler, got {type(data_scaler).__name__}")
        self.data_scaler = data_scaler
        self.user_config = dict(config or {})

        self.dist, self.device = sdist.setup(distributed, device)
        if self.checkpoint_dir is not None and self.dist.is_main:
            remove_stale_temp_files(self.checkpoint_dir)
        if self.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes "
                f"({self.dist.world_size})"
            )
        self.mixed_precision = self._resolve_precision(mixed_precision)
        self.model = model.to(self.device)
        self.loss = loss
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("model has no trainable parameters")
        self._ema_params = [
            e
            for e, p in zip(self.ema_model.parameters(), self.model.parameters(), strict=True)
            if p.requires_grad
        ]
        self._train_model = self._wrap_ddp(self.model)

        # foreach=True: the multi-tensor update (torch picks it only on CUDA by default).
        self.optimizer = torch.optim.AdamW(
            self._params,
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
            foreach=True,
        )
        # A lambda (not the bound method) so the scheduler state holds no callable.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: self._lr_factor(n)
        )
        self._scaler = torch.amp.GradScaler("cuda") if self.mixed_precision == "fp16" else None
        # Same seeds on every rank: ranks draw identical global batches and keep slices.
        self._data_gen = torch.Generator().manual_seed(self.seed)
        self._noise_gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        self.step = 0
        self.history: list[float] = []
        # Per-step (step, lr, grad norm, seconds) waiting for the next sync, and the log.
        self._step_log: list[tuple[int, float, Tensor, float]] = []
        self._metrics: MetricsLog | None = None
        self._train_seconds = 0.0
        self._clock: tuple[float, float] = (0.0, 0.0)  # (perf_counter, seconds) at fit start

    # --- setup helpers ---
    def _resolve_precision(self, mixed_precision: str | bool) -> str | None:
        if mixed_precision not in ("auto", "bf16", "fp16", True, False, None):
            raise ValueError(
                "mixed_precision must be 'auto', 'bf16', 'fp16', True or False, got "
                f"{mixed_precision!r}"
            )
        if self.device.type != "cuda" or not mixed_precision:
            return None
        if mixed_precision in ("auto", True):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return str(mixed_precision)

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        """The module the loss calls: the model itself, or (under DDP) a ScoreModel whose
        network is DDP-wrapped, so every network call goes through DDP's forward (needed
        for its gradient all-reduce) while the loss can still use ScoreModel's methods."""
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        if isinstance(model, ScoreModel):
            return ScoreModel(DDP(model.net, device_ids=ids), model.sde, **model.config())
        return DDP(model, device_ids=ids)

    def _lr_factor(self, n: int) -> float:
        """lr multiplier at step n: linear warm-up, then constant or cosine decay."""
        warm = self.warmup_steps
        if n < warm:
            return (n + 1) / warm
        if self.decay_steps is None:
            return 1.0
        progress = min(1.0, (n - warm) / (self.decay_steps - warm))
        lo = self.min_lr_ratio
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def param_dtype(self) -> torch.dtype:
        return self._params[0].dtype

    # --- data ---
    def _batches(self, data: Any, labels: Any) -> _TensorBatches | _IterableBatches:
        if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
            if labels is not None:
                raise ValueError("labels given twice: in data=(x, y) and labels=")
            data, labels = data
        if torch.is_tensor(data):
            if data.ndim < 2 or data.shape[0] == 0:
                raise ValueError(
                    f"data must be a non-empty tensor [N, *D], got {tuple(data.shape)}"
                )
            if not torch.is_floating_point(data):
                raise TypeError(f"data must be floating point, got dtype {data.dtype}")
            check_finite_rows("data", data)
            if labels is not None:
                labels = torch.as_tensor(labels)
                if labels.shape != (data.shape[0],):
                    raise ValueError(
                        f"labels must have shape [N] = [{data.shape[0]}], got {tuple(labels.shape)}"
                    )
                labels = labels.long()
            return _TensorBatches(data, labels, self.batch_size, self._data_gen)
        if labels is not None:
            raise ValueError("labels= is only used with tensor data; iterables yield (x, y)")
        if isinstance(data, Iterable):
            return _IterableBatches(data)
        raise TypeError(
            f"data must be a tensor [N, *D], a pair (x, labels) or an iterable of batches, "
            f"got {type(data).__name__}"
        )

    def _local(self, v: Tensor | None, global_batch: int) -> Tensor | None:
        """This rank's slice of a global-batch tensor."""
        if v is None or not self.dist.enabled:
            return v
        b = global_batch // self.dist.world_size
        return v[self.dist.rank * b : (self.dist.rank + 1) * b]

    # --- one step ---
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mixed_precision is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _compute_loss(self, x: Tensor, y: Tensor | None, tensor_data: bool) -> Tensor:
        x = x.to(device=self.device, dtype=self.param_dtype, non_blocking=True)
        y = None if y is None else y.to(self.device, non_blocking=True)
        loss = self.loss
        if hasattr(loss, "sample_noise") and hasattr(loss, "per_sample"):
            if tensor_data:  # x is the global batch: noise for it, then this rank's slice
                noise = loss.sample_noise(x, self._noise_gen, has_labels=y is not None)
                b = x.shape[0]
                if self.dist.enabled:
                    r, k = self.dist.rank, b // self.dist.world_size
                    noise = noise.slice(r * k, (r + 1) * k)
                x, y = self._local(x, b), self._local(y, b)
            else:  # x is this rank's batch: draw noise for all ranks' batches, keep ours
                k = x.shape[0]
                shape = (k * self.dist.world_size,) + tuple(x.shape[1:])
                full = loss.sample_noise(
                    x.new_empty(shape), self._noise_gen, has_labels=y is not None
                )
                r = self.dist.rank
                noise = full.slice(r * k, (r + 1) * k) if self.dist.enabled else full
            with self._autocast():
                return loss.per_sample(self._train_model, x, noise, y).mean()
        if tensor_data:
            b = x.shape[0]
            x, y = self._local(x, b), self._local(y, b)
        with self._autocast():
            kwargs = {} if y is None else {"y": y}
            return loss(self._train_model, x, generator=self._noise_gen, **kwargs)

    def _train_step(self, x: Tensor, y: Tensor | None, tensor_data: bool) -> Tensor:
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        value = self._compute_loss(x, y, tensor_data)
        self.optimizer.zero_grad(set_to_none=True)
        if self._scaler is not None:
            self._scaler.scale(value).backward()
            self._scaler.unscale_(self.optimizer)
        else:
            value.backward()
        if self.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        else:  # the norm only, for the metrics log (all-reduced grads: the same on all ranks)
            grads = [p.grad for p in self._params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else value.new_zeros(())
        if self.max_skipped_steps and self._skip_nonfinite_step(value, grad_norm):
            self._log_step(lr, grad_norm)
            return torch.full_like(value.detach(), float("nan"))
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._update_ema()
        self._log_step(lr, grad_norm)
        return value.detach()

    def _log_step(self, lr: float, grad_norm: Tensor) -> None:
        """Queue the metrics row of the step just taken (written at the next sync)."""
        start, seconds = self._clock
        self._step_log.append(
            (self.step, lr, grad_norm.detach(), seconds + time.perf_counter() - start)
        )

    def _skip_nonfinite_step(self, value: Tensor, norm: Tensor | None) -> bool:
        """With max_skipped_steps > 0: True (and the step is consumed without any update) when
        the loss or the gradient norm is not finite; raises after too many in a row. One
        device sync. (Under fp16 the GradScaler skips overflowing gradients itself, so only
        the loss is checked then.)"""
        check = value.detach().reshape(1)
        if norm is not None and self._scaler is None:
            check = torch.cat([check, norm.detach().reshape(1).to(check)])
        if bool(torch.isfinite(check).all()):
            self._skipped = 0
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the step count, as with GradScaler
        self.step += 1
        self._skipped += 1
        if self._skipped > self.max_skipped_steps:
            raise TrainingDivergedError(
                f"training stopped at step {self.step}: {self._skipped} consecutive steps had "
                f"a non-finite loss or gradient (max_skipped_steps={self.max_skipped_steps}); "
                + self._divergence_advice()
            )
        return True

    def _divergence_advice(self) -> str:
        last = self._last_saved
        kept = (
            "no checkpoint was written in this session"
            if last is None
            else f"the last good checkpoint ({last[0]}, step {last[1]}) is kept"
        )
        return (
            f"{kept}. Lower the learning rate (lr={self.lr:g}), keep gradient clipping on, or "
            "check the data for outliers"
        )

    def _check_finite_weights(self) -> None:
        """Raise TrainingDivergedError if any model or EMA parameter or buffer holds NaN/Inf
        (one device sync; called before every save)."""
        named = [
            (f"{what}.{name}", t)
            for what, module in (("model", self.model), ("ema", self.ema_model))
            for name, t in (*module.named_parameters(), *module.named_buffers())
            if t.is_floating_point()
        ]
        if not named:
            return
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
        if bad:
            raise TrainingDivergedError(
                f"refusing to write a checkpoint at step {self.step}: non-finite weights in "
                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                + self._divergence_advice()
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- ema + (1 - decay) (theta - ema); buffers are copied."""
        decay = self.ema_decay
        if self.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - decay)
        for b_ema, b in zip(self.ema_model.buffers(), self.model.buffers(), strict=True):
            b_ema.copy_(b)

    # --- the loop ---
    def fit(
        self,
        data: Any,
        num_steps: int,
        *,
        labels: Tensor | None = None,
        progress: bool | None = None,
        callback: Callable[[Trainer], None] | None = None,
        callback_every: int | None = None,
    ) -> list[float]:
        """Take `num_steps` more optimizer steps; returns their losses (also appended to
        `history`).

        Args:
            data: a tensor `[N, *D]` (batches of `batch_size` drawn with replacement by the
                trainer's generator; bit-exact resume), a pair (x, labels), or an iterable
                / DataLoader yielding x or (x, labels) batches (restarted when exhausted;
                under torchrun it must yield this rank's batches, e.g. with a
                DistributedSampler).
            labels: `[N]` class labels for tensor data (conditional models).
            progress: a tqdm bar with the loss (rank 0 only); None: the Trainer's default.
            callback: `callback(trainer)`, called on rank 0 every `callback_every` steps
                (e.g. to plot samples from `trainer.ema_model`).
        """
        num_steps = check_positive_int("num_steps", num_steps, minimum=0)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        every = None
        if callback is not None:
            every = check_positive_int(
                "callback_every", callback_every if callback_every is not None else 1000
            )
        batches = self._batches(data, labels)
        show = self.progress if progress is None else bool(progress)
        tensor_data = isinstance(batches, _TensorBatches)
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, disable=not show or not self.dist.is_main, desc="training")
        losses: list[float] = []
        pending: list[Tensor] = []
        self.model.train()
        self._open_metrics()
        self._clock = (time.perf_counter(), self._train_seconds)
        with _StopSignals() as stop:
            try:
                for _ in range(num_steps):
                    x, y = batches.next()
                    pending.append(self._train_step(x, y, tensor_data))
                    if len(pending) == self.log_every:
                        losses += self._flush(pending, bar)
                    if self.checkpoint_dir is not None and self.step % self.checkpoint_every == 0:
                        losses += self._flush(pending, bar)  # history and metrics are complete
                        self.save()
                    if every is not None and self.step % every == 0 and self.dist.is_main:
                        callback(self)
                    if self._should_stop(stop):
                        break
                losses += self._flush(pending, bar)
            finally:
                bar.close()
                self._close_metrics()
        if self._should_stop(stop, end=True):
            saved = self.save() if self.checkpoint_dir is not None else None
            raise TrainingInterrupted(stop.signum, self.step, saved)
        if self.checkpoint_dir is not None and num_steps > 0:
            self.save()
        return losses

    def _should_stop(self, stop: _StopSignals, end: bool = False) -> bool:
        """Whether a signal asks to stop after this step (no device sync). Under torchrun
        every rank must stop at the same step: they agree by one small all-reduce at
        multiples of log_every and at the end of `fit`."""
        if not self.dist.enabled:
            return stop.signum is not None
        if not end and self.step % self.log_every:
            return False
        flag = torch.tensor([float(stop.signum is not None)], device=self.device)
        asked = bool(sdist.all_reduce_mean(flag, self.dist) > 0)
        if asked and stop.signum is None:
            stop.signum = int(signal.SIGTERM)  # another rank was signalled
        return asked

    def _open_metrics(self) -> None:
        """The metrics log of the run folder (rank 0), resumed at the current step."""
        if self.checkpoint_dir is None or not self.dist.is_main or self._metrics is not None:
            return
        self._metrics = MetricsLog(self.checkpoint_dir, self.step, self.tensorboard)
        if self.step > 0 and self._train_seconds == 0.0:  # resumed: continue the clock
            self._train_seconds = self._metrics.resumed_seconds

    def _close_metrics(self) -> None:
        self._step_log.clear()
        self._train_seconds = self._clock[1] + time.perf_counter() - self._clock[0]
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def _flush(self, pending: list[Tensor], bar: Any) -> list[float]:
        """Synchronise the pending step losses and gradient norms once (one device sync per
        log_every steps) and append them to the history and the metrics log."""
        if not pending:
            return []
        n = len(pending)
        log, self._step_log = self._step_log[:n], self._step_log[n:]
        losses = sdist.all_reduce_mean(torch.stack(pending), self.dist)
        norms = torch.stack([norm.to(losses.dtype) for _, _, norm, _ in log])
        synced = torch.cat([losses, norms]).tolist()
        values = synced[:n]
        pending.clear()
        if self._metrics is not None:
            steps, lrs, _, seconds = zip(*log, strict=True)
            self._metrics.write(steps, values, lrs, synced[n:], seconds)
        self.history += values
        bar.update(len(values))
        bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)
        if not self.max_skipped_steps:  # (skipped steps are NaN on purpose, checked per step)
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                first = self.step - len(values) + bad[0] + 1
                raise TrainingDivergedError(
                    f"training diverged: the loss became non-finite ({values[bad[0]]}) at step "
                    f"{first} ({len(bad)} of the last {len(values)} losses); stopped at step "
                    f"{self.step}; " + self._divergence_advice()
                )
        return values

    # --- checkpoints ---
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

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write a checkpoint atomically (rank 0 only; other ranks return None).

        Default path: `checkpoint_dir/latest.pt` (plus `step_XXXXXXXX.pt` with
        keep_checkpoints). Returns the path written.
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

    def __repr__(self) -> str:
        return (
            f"Trainer(step={self.step}, batch_size={self.batch_size}, lr={self.lr}, "
            f"device={self.device}, world_size={self.dist.world_size})"
        )
