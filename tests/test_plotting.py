"""scoresde.plotting: PNGs are written without touching pyplot, image grids place and scale
pixels correctly, axis limits ignore far-off outliers, and bad shapes are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scoresde import plotting
from scoresde.plotting import _grid_array, _limits, _smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_grid_places_each_image_and_scales_by_value_range() -> None:
    images = torch.zeros(3, 1, 2, 2)
    images[1] = 1.0
    images[2] = 3.0  # beyond the range: clipped to white
    grid = _grid_array(images, nrow=2, value_range=(-1.0, 1.0), pad=1)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)  # 2 rows x 2 columns of 2x2 + padding
    np.testing.assert_allclose(grid[1:3, 1:3, 0], 0.5)  # image 0: value 0 -> grey
    np.testing.assert_allclose(grid[1:3, 4:6, 0], 1.0)  # image 1, first row, second column
    np.testing.assert_allclose(grid[4:6, 1:3, 0], 1.0)  # image 2 clipped
    np.testing.assert_allclose(grid[4:6, 4:6, 0], 1.0)  # the empty cell stays white
    auto = _grid_array(images, nrow=3, pad=0)  # the batch's own range: 0 -> black, 3 -> white
    np.testing.assert_allclose(auto[:, :2, 0], 0.0)
    np.testing.assert_allclose(auto[:, 4:, 0], 1.0)


def test_limits_ignore_outliers() -> None:
    pts = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(0))
    pts[0] = torch.tensor([1e6, -1e6])
    pts[1] = torch.tensor([float("nan"), 0.0])
    x0, x1, y0, y1 = _limits([pts])
    assert -5 < x0 < -2 and 2 < x1 < 5 and -5 < y0 < -2 and 2 < y1 < 5


def test_smooth_is_a_trailing_mean() -> None:
    v = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    assert _smooth(v, 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_plots_write_pngs(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    pts = {"a": torch.randn(200, 2, generator=g), "b": torch.randn(200, 2, generator=g)}
    paths = [
        plotting.plot_samples_2d(pts, tmp_path / "s.png", data=pts["a"], losses=[3.0, 2.0, 1.0]),
        plotting.plot_image_grid(torch.rand(10, 3, 5, 5), tmp_path / "rgb.png", title="rgb"),
        plotting.plot_loss(torch.linspace(1, 0.1, 50), tmp_path / "loss.png"),
        plotting.plot_error_vs_nfe(
            {"euler": [(10, 0.3), (20, 0.16)], "heun": [(20, 0.1), (40, 0.03)]},
            tmp_path / "sub" / "err.png",
            reference=0.01,
        ),
    ]
    for path in paths:
        assert path.is_file() and _png(path)
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically, nothing left behind


def test_a_failed_save_keeps_the_old_png_and_leaves_no_temp_file(tmp_path: Path) -> None:
    class Broken:
        def savefig(self, f, **kwargs) -> None:
            f.write(b"half a png")
            raise RuntimeError("renderer crashed")

    (tmp_path / "p.png").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="renderer crashed"):
        plotting.save_figure(Broken(), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes() == b"old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.png"]


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        plotting.plot_samples_2d({"x": torch.zeros(5, 3)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="C in"):
        plotting.plot_image_grid(torch.zeros(2, 4, 5, 5), tmp_path / "x.png")
    with pytest.raises(ValueError, match="value_range"):
        plotting.plot_image_grid(torch.zeros(2, 1, 5, 5), tmp_path / "x.png", value_range=(1, 0))
    with pytest.raises(ValueError, match="at least one"):
        plotting.plot_samples_2d({}, tmp_path / "x.png")
