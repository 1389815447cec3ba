"""How training stops: cleanly on SIGINT / SIGTERM (`fit` finishes its step, saves and
raises `TrainingInterrupted`), or with `TrainingDivergedError` on NaN/Inf."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

from scoresde.samplers.base import NonFiniteError


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
