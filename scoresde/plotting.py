"""Plots a person would rather look at than read: 2-D samples next to the data, image grids,
loss curves and error-vs-NFE curves.

Everything draws on `matplotlib.figure.Figure` objects rendered by the Agg canvas, so no
window opens, pyplot's global state is never touched and the active backend of an
interactive session is left alone. Each `plot_*` function writes a PNG and returns its path;
the `draw_*` functions draw into an axes you pass, for composing your own figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from scoresde._typing import Tensor

__all__ = [
    "new_figure",
    "save_figure",
    "draw_scatter",
    "draw_image_grid",
    "draw_loss",
    "plot_samples_2d",
    "plot_image_grid",
    "plot_loss",
    "plot_error_vs_nfe",
]


def new_figure(width: float, height: float) -> Any:
    """A `matplotlib.figure.Figure` of `width` x `height` inches attached to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(
    fig: Any, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `fig` as a PNG to `path` (parent folders are created) and return the path.
    `metadata`: PNG text entries (keyword -> text) stored in the file.

    The file is written to a temporary file of its own (two processes saving the same plot
    never share one) and renamed, so a reader never sees half a PNG; on failure it is removed.
    It gets the permissions a plain open() would give it (`scoresde._atomic.atomic_write`).
    """
    from scoresde._atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", bbox_inches="tight", metadata=metadata)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def _points(x: Any, name: str) -> Tensor:
    """x as a float64 CPU tensor `[N, 2]` (any `[N, 2]` tensor or array)."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2], got {tuple(t.shape)}")
    return t


def _limits(sets: Sequence[Tensor], margin: float = 0.15) -> tuple[float, float, float, float]:
    """Common axis limits covering the 0.5%..99.5% quantiles of all finite points, so a few
    far-off samples (a diverged trajectory) do not shrink everything else to a dot."""
    pts = torch.cat([s[torch.isfinite(s).all(dim=1)] for s in sets])
    if pts.shape[0] == 0:
        return -1.0, 1.0, -1.0, 1.0
    lo = torch.quantile(pts, 0.005, dim=0)
    hi = torch.quantile(pts, 0.995, dim=0)
    pad = (hi - lo).clamp_min(1e-6) * margin
    (x0, y0), (x1, y1) = (lo - pad).tolist(), (hi + pad).tolist()
    return x0, x1, y0, y1


def draw_scatter(
    ax: Any,
    x: Any,
    title: str | None = None,
    *,
    limits: tuple[float, float, float, float] | None = None,
    color: str = "C0",
) -> None:
    """Scatter `[N, 2]` points into `ax` with equal aspect (small dots, for thousands)."""
    pts = _points(x, "x")
    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=1.5, alpha=0.5, color=color, lw=0)
    if limits is not None:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _grid_array(
    images: Any,
    nrow: int | None,
    value_range: tuple[float, float] | None = None,
    pad: int = 1,
) -> Any:
    """Tile `[B, C, H, W]` images (C = 1 or 3) into one `[rows*(H+pad), cols*(W+pad), C]`
    array in [0, 1]: `value_range` (lo, hi) maps onto [0, 1] with clipping; without it, the
    batch's own min and max do (so data in [-1, 1] or [0, 255] alike)."""
    x = torch.as_tensor(images).detach().to("cpu", torch.float64)
    if x.ndim == 3:  # [B, H, W]: one channel
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(
            f"images must have shape [B, C, H, W] with B >= 1 and C in (1, 3), got {tuple(x.shape)}"
        )
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if value_range is None:
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
    x = ((x - lo) / max(hi - lo, 1e-12)).clamp(0.0, 1.0)
    b, c, h, w = x.shape
    cols = nrow if nrow is not None else math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.float64)
    for i in range(b):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def draw_image_grid(
    ax: Any,
    images: Any,
    title: str | None = None,
    nrow: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> None:
    """Draw a grid of `[B, C, H, W]` (or `[B, H, W]`) images into `ax` (see
    `plot_image_grid` for `value_range`)."""
    grid = _grid_array(images, nrow, value_range)
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def _smooth(values: Tensor, window: int) -> Tensor:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or values.numel() < 2:
        return values
    c = torch.cat([values.new_zeros(1), values.cumsum(0)])
    idx = torch.arange(1, values.numel() + 1)
    start = (idx - window).clamp_min(0)
    return (c[idx] - c[start]) / (idx - start)


def draw_loss(ax: Any, losses: Sequence[float] | Tensor, title: str | None = "training loss"):
    """Raw per-step losses (faint) and their moving average, log-scaled when positive."""
    v = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if v.numel() == 0:
        ax.text(0.5, 0.5, "no loss values", ha="center", va="center", transform=ax.transAxes)
        return
    steps = torch.arange(1, v.numel() + 1).numpy()
    ax.plot(steps, v.numpy(), color="C0", alpha=0.25, lw=0.7)
    window = max(1, v.numel() // 50)
    ax.plot(steps, _smooth(v, window).numpy(), color="C0", lw=1.5)
    if bool((v > 0).all()):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)


def plot_samples_2d(
    samples: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    data: Any | None = None,
    losses: Sequence[float] | Tensor | None = None,
    title: str | None = None,
    ncols: int = 4,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """One panel per entry of `samples` (name -> `[N, 2]`), after a "data" panel when `data`
    is given and followed by the loss curve when `losses` is given; all scatter panels share
    axis limits so spreads are comparable. Writes a PNG to `path` and returns it
    (`metadata`: PNG text entries, as in `save_figure`)."""
    panels: list[tuple[str, Tensor]] = []
    if data is not None:
        panels.append(("data", _points(data, "data")))
    panels += [(name, _points(x, f"samples[{name!r}]")) for name, x in samples.items()]
    if not panels:
        raise ValueError("samples must hold at least one sample set (or pass data)")
    limits = _limits([p for _, p in panels])
    n = len(panels) + (losses is not None)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    size = 5.0 if n == 1 else 3.2  # inches per panel
    fig = new_figure(size * ncols, size * nrows)
    for i, (name, pts) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        draw_scatter(ax, pts, name, limits=limits, color="C1" if name == "data" else "C0")
    if losses is not None:
        draw_loss(fig.add_subplot(nrows, ncols, len(panels) + 1), losses)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, metadata=metadata)


def plot_image_grid(
    images: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    nrow: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """A grid of `[B, C, H, W]` images (C = 1 grey or 3 RGB) as a PNG at `path`.

    `value_range` = (black, white), e.g. (-1, 1) or (0, 255): pixel values are mapped onto
    it and clipped, so samples are shown on the data's scale; default: the batch's min/max.
    `nrow`: images per row (default: a square grid).
    """
    grid = _grid_array(images, nrow, value_range)
    h, w = grid.shape[:2]
    scale = 6.0 / max(h, w)
    fig = new_figure(max(2.0, w * scale), max(2.0, h * scale))
    draw_image_grid(fig.add_subplot(1, 1, 1), images, title, nrow, value_range)
    return save_figure(fig, path)


def plot_loss(
    losses: Sequence[float] | Tensor,
    path: str | os.PathLike[str],
    *,
    title: str | None = "training loss",
) -> Path:
    """The training-loss curve (raw and smoothed) as a PNG at `path`."""
    fig = new_figure(5.0, 3.5)
    draw_loss(fig.add_subplot(1, 1, 1), losses, title)
    return save_figure(fig, path)


def plot_error_vs_nfe(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    *,
    ylabel: str = "error",
    title: str | None = None,
    logx: bool = True,
    logy: bool = True,
    reference: float | None = None,
) -> Path:
    """Error against NFE, one line with markers per solver.

    Args:
        curves: solver name -> sequence of (nfe, error) points (sorted by NFE here).
        path: where the PNG goes.
        ylabel, title: labels.
        logx, logy: log-scaled axes (errors of convergent solvers fall as a power of NFE,
            a straight line in log-log; log y needs positive errors).
        reference: an optional horizontal line (e.g. the metric's floor between two true
            sample sets, below which differences are noise).
    """
    fig = new_figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, pts) in enumerate(curves.items()):
        pts = sorted((float(n), float(e)) for n, e in pts)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=4, lw=1.3, label=name, color=f"C{i % 10}")
    if reference is not None:
        ax.axhline(reference, color="0.4", ls="--", lw=1, label="floor")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (score evaluations)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
