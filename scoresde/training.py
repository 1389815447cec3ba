"""`Trainer`: fits a score model with a loss of `scoresde.losses`, reproducibly.

One training step: draw a batch (indices from the trainer's own seeded CPU generator),
draw the loss noise (times, z, label-dropout mask, from a second seeded generator on the
model's device), loss.backward(), clip the gradient norm, AdamW step, linear learning-rate
warm-up, EMA update of the weights. Everything random comes from those two generators, so
runs are reproducible, and a checkpoint (model, EMA, optimizer, scheduler, grad scaler,
step, loss history, the RNG states and the configuration) resumes *bit-exactly* on CPU.

Checkpoints are written atomically and validated before they touch the trainer (a bad one
raises `CheckpointError` and leaves the trainer and the files unchanged): `scoresde.checkpoints`.

Multi-process: under `torchrun` (or with `distributed=True`) the network is wrapped in
DistributedDataParallel; each rank draws the same global batch of `batch_size` samples
and its noise and keeps its slice (see `scoresde.distributed`), so K processes compute
what one process computes on the same global batch. Only rank 0 writes checkpoints, shows
progress and runs the callback.

Mixed precision (`torch.autocast`, bf16 or fp16 with a GradScaler) is used only on CUDA.

`build_model` / `build_sde` (`scoresde.recipes`, re-exported here) make a model from names,
and record that spec so `Trainer.from_checkpoint(path)` can rebuild it from a checkpoint alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scoresde import distributed as sdist
from scoresde._batches import _IterableBatches, _TensorBatches, check_features, make_batches
from scoresde._stopping import TrainingDivergedError, TrainingInterrupted, _StopSignals
from scoresde._typing import Tensor
from scoresde._validation import check_positive, check_positive_int
from scoresde.checkpoints import (  # noqa: F401 - re-exported: their home was this module
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LATEST,
    TEMP_FILE_PATTERNS,
    CheckpointError,
    LoadedModel,
    TrainerCheckpoints,
    _atomic_save,
    _check_checkpoint_dir,
    check_spec_fits,
    load_model,
    read_checkpoint,
    remove_stale_temp_files,
)
from scoresde.data import DataScaler
from scoresde.nets.score_model import ScoreModel
from scoresde.recipes import (  # noqa: F401 - re-exported: their home was this module
    NET_NAMES,
    SDE_NAMES,
    _model_from_spec,
    build_model,
    build_sde,
    model_spec,
    sde_config,
)
from scoresde.runlog import MetricsLog, tensorboard_available

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


class Trainer(TrainerCheckpoints):
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
        self._set_optimisation(
            lr, weight_decay, betas, batch_size, warmup_steps, decay_steps, min_lr_ratio
        )
        self._set_stabilisation(grad_clip, ema_decay, ema_warmup)
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

        self.optimizer, self.scheduler = self._make_optimizer()
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
    def _set_optimisation(
        self,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        batch_size: int,
        warmup_steps: int,
        decay_steps: int | None,
        min_lr_ratio: float,
    ) -> None:
        """Check and keep the AdamW and learning-rate schedule settings."""
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

    def _set_stabilisation(
        self, grad_clip: float | None, ema_decay: float, ema_warmup: bool
    ) -> None:
        """Check and keep the gradient clipping and EMA settings."""
        self.grad_clip = None if not grad_clip else check_positive("grad_clip", grad_clip)
        self.ema_decay = check_positive("ema_decay", ema_decay, allow_zero=True)
        if self.ema_decay >= 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.ema_warmup = bool(ema_warmup)

    def _make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over the trainable parameters and its learning-rate schedule."""
        # foreach=True: the multi-tensor update (torch picks it only on CUDA by default).
        optimizer = torch.optim.AdamW(
            self._params,
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
            foreach=True,
        )
        # A lambda (not the bound method) so the scheduler state holds no callable.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: self._lr_factor(n))
        return optimizer, scheduler

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
        return make_batches(data, labels, self.batch_size, self._data_gen)

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
                / DataLoader yielding x or (x, labels) batches (restarted when spent: no generator;
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
        check_features(self.model, batches)
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

    def __repr__(self) -> str:
        return (
            f"Trainer(step={self.step}, batch_size={self.batch_size}, lr={self.lr}, "
            f"device={self.device}, world_size={self.dist.world_size})"
        )
