"""The training metrics log of a run folder: `metrics.csv`, and TensorBoard events when the
`tensorboard` package is installed.

`metrics.csv` has one row per optimizer step:

    step,loss,lr,grad_norm,seconds
    1,0.98125,2e-06,3.1416,0.0123

`loss` is the step's loss (averaged over processes), `lr` the learning rate the step used,
`grad_norm` the global gradient norm before clipping, `seconds` the training wall-clock time
since the run began (summed over resumed sessions). The file is appended to as training
goes (every `log_every` steps and before each checkpoint), so it is readable while a run is
going on, e.g. with `pandas.read_csv` or `scoresde.runlog.read_metrics`.

Resuming from a checkpoint at step S keeps the rows up to S and drops later ones (steps
trained after that checkpoint by a run that then crashed, which the resumed run trains
again), so the file never holds a step twice; TensorBoard is told the same with
`purge_step`.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics", "COLUMNS", "METRICS_FILE", "TENSORBOARD_DIR"]

COLUMNS = ("step", "loss", "lr", "grad_norm", "seconds")
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """True when `torch.utils.tensorboard` can write events (the tensorboard package)."""
    return importlib.util.find_spec("tensorboard") is not None


def read_metrics(path: str | os.PathLike) -> dict[str, list[float]]:
    """The columns of a `metrics.csv` (or of the one in a run folder) as lists:
    {"step": [...], "loss": [...], ...}; steps as ints."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or tuple(reader.fieldnames) != COLUMNS:
            raise ValueError(f"{str(path)!r} is not a scoresde metrics log (columns {COLUMNS})")
        for row in reader:
            for name in COLUMNS:
                columns[name].append(int(row[name]) if name == "step" else float(row[name]))
    return columns


def _format(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(float(value))


class MetricsLog:
    """Appends rows (step, loss, lr, grad_norm, seconds) to `folder/metrics.csv` and, when
    `tensorboard` (None: if installed), scalars to `folder/tensorboard`.

    `start_step`: the step training resumes from; rows after it are dropped (see the module
    docstring). `resumed_seconds` then gives the `seconds` of the last kept row.
    """

    def __init__(
        self, folder: str | os.PathLike, start_step: int, tensorboard: bool | None = None
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / METRICS_FILE
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resumed_seconds = self._keep_rows_up_to(start_step)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        if self._file.tell() == 0:
            self._file.write(",".join(COLUMNS) + "\n")
            self._file.flush()
        use_tb = tensorboard_available() if tensorboard is None else bool(tensorboard)
        self._tb: Any = None
        if use_tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(self.folder / TENSORBOARD_DIR),
                purge_step=start_step + 1 if start_step > 0 else None,
            )

    def _keep_rows_up_to(self, step: int) -> float:
        """Drop rows after `step` (rewriting the file atomically); the last kept row's
        seconds (0 if none)."""
        if not self.path.is_file():
            return 0.0
        try:
            old = read_metrics(self.path)
        except (ValueError, KeyError):
            raise ValueError(
                f"{str(self.path)!r} exists but is not a scoresde metrics log; move it away"
            ) from None
        keep = [i for i, s in enumerate(old["step"]) if s <= step]
        if len(keep) < len(old["step"]):
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
            with open(tmp, "w", newline="") as f:
                f.write(",".join(COLUMNS) + "\n")
                for i in keep:
                    f.write(
                        ",".join(
                            _format(old[c][i]) if c != "step" else str(old[c][i]) for c in COLUMNS
                        )
                        + "\n"
                    )
            os.replace(tmp, self.path)
        return float(old["seconds"][keep[-1]]) if keep else 0.0

    def write(
        self,
        steps: Sequence[int],
        losses: Sequence[float],
        lrs: Sequence[float],
        grad_norms: Sequence[float],
        seconds: Sequence[float],
    ) -> None:
        """Append one row per step (the sequences have equal lengths)."""
        rows = zip(steps, losses, lrs, grad_norms, seconds, strict=True)
        for step, loss, lr, norm, sec in rows:
            self._file.write(
                f"{int(step)},{_format(loss)},{_format(lr)},{_format(norm)},{_format(sec)}\n"
            )
            if self._tb is not None:
                self._tb.add_scalar("train/loss", loss, step)
                self._tb.add_scalar("train/lr", lr, step)
                self._tb.add_scalar("train/grad_norm", norm, step)
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
