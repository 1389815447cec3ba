"""Data loading (tensors, arrays, .npy/.npz/.pt files, image folders, toy sets, digits) and
DataScaler round trips, with their error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scoresde.data import DataScaler, load_data, load_digits_split


def test_tensor_and_array_sources() -> None:
    x, y = load_data(np.arange(12).reshape(6, 2), labels=[0, 1, 0, 1, 2, 2])
    assert x.dtype == torch.float32 and x.shape == (6, 2)
    assert y.tolist() == [0, 1, 0, 1, 2, 2]
    x64, none = load_data(torch.ones(3, 1, 4, 4), dtype=torch.float64)
    assert x64.dtype == torch.float64 and none is None
    x3, _ = load_data(np.zeros((10, 3)), n=4)
    assert x3.shape == (4, 3)


def test_npy_npz_and_pt_files(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(20, 3))
    labels = np.arange(20) % 4
    np.save(tmp_path / "a.npy", data)
    np.savez(tmp_path / "b.npz", x=data, y=labels)
    np.savez(tmp_path / "c.npz", data)
    torch.save({"x": torch.as_tensor(data), "y": torch.as_tensor(labels)}, tmp_path / "d.pt")
    x, _ = load_data(tmp_path / "a.npy")
    np.testing.assert_allclose(x.numpy(), data, rtol=1e-6)
    x, y = load_data(str(tmp_path / "b.npz"), key="x", labels_key="y")
    assert x.shape == (20, 3) and y.tolist() == labels.tolist()
    x, _ = load_data(tmp_path / "c.npz")  # a single array needs no key
    assert x.shape == (20, 3)
    x, y = load_data(tmp_path / "d.pt", key="x", labels_key="y", dtype=torch.float64)
    assert torch.equal(x, torch.as_tensor(data)) and y.shape == (20,)


def test_file_errors_are_clear(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_data(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match=r"key 'z' is not in .*available keys: \['x', 'y'\]"):
        load_data(tmp_path / "b.npz", key="z")
    with pytest.raises(ValueError, match="key must name the array"):
        load_data(tmp_path / "b.npz")
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match="must hold numbers"):
        load_data(tmp_path / "s.npy")
    (tmp_path / "t.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_data(tmp_path / "t.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_data(tmp_path / "empty")
    with pytest.raises(ValueError, match="rank >= 2"):
        load_data(np.arange(5.0))
    with pytest.raises(ValueError, match="NaN"):
        load_data(np.array([[1.0, np.nan]]))
    with pytest.raises(TypeError, match="source must be"):
        load_data(3.5)
    with pytest.raises(ValueError, match="one label per sample"):
        load_data(np.zeros((4, 2)), labels=[0, 1])


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for k in range(3):
            arr = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
            Image.fromarray(arr, mode="L").save(tmp_path / cls / f"{k}.png")
    x, y = load_data(tmp_path)
    assert x.shape == (6, 1, 6, 5) and 0 <= x.min() and x.max() <= 255
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    x, _ = load_data(tmp_path, image_size=4, mode="RGB")
    assert x.shape == (6, 3, 4, 4)
    # an exported model's folder (and a run's, with latest.pt) holds plots, not data
    export = tmp_path / "dogs" / "exported"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    Image.fromarray(np.zeros((6, 5), dtype=np.uint8)).save(export / "plot.png")
    x, y = load_data(tmp_path)
    assert x.shape == (6, 1, 6, 5) and y.tolist() == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(tmp_path / "cats" / "big.png")
    with pytest.raises(ValueError, match=r"different sizes: .*cats/big.png.*--image-size"):
        load_data(tmp_path)


def test_toy_sets_and_digits() -> None:
    x, y = load_data("two_moons", n=100, seed=3)
    x2, _ = load_data("two_moons", n=100, seed=3)
    assert x.shape == (100, 2) and y is None and torch.equal(x, x2)
    digits, labels = load_data("digits")
    assert digits.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert digits.min() == -1 and digits.max() == 1


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a = load_digits_split()
    b = load_digits_split()
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    assert abs(a.x_test.shape[0] - 0.2 * 1797) < 1
    assert a.x_train.min() >= -1 and a.x_train.max() <= 1
    assert set(a.y_test.tolist()) == set(range(10))
    # train + test is a partition of the 1797 images: the multisets of (image, label) agree.
    from scoresde.toy import load_digits_images

    images, labels = load_digits_images()

    def rows(x: torch.Tensor, y: torch.Tensor) -> list:
        return sorted(zip(x.reshape(x.shape[0], -1).tolist(), y.tolist(), strict=True))

    split = rows(torch.cat([a.x_train, a.x_test]).double(), torch.cat([a.y_train, a.y_test]))
    assert split == rows(images / 8 - 1, labels)
    c = load_digits_split(seed=1)
    assert not torch.equal(a.y_test, c.y_test)


@pytest.mark.parametrize("kind", ["minmax", "standard"])
@pytest.mark.parametrize("per_feature", [False, True])
def test_scaler_round_trip_and_state(kind: str, per_feature: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    scaler = DataScaler(kind, per_feature=per_feature).fit(x)
    z = scaler.transform(x)
    if kind == "minmax":
        dims = 0 if per_feature else (0, 1)
        torch.testing.assert_close(z.amin(dim=dims), -torch.ones_like(z.amin(dim=dims)))
        torch.testing.assert_close(z.amax(dim=dims), torch.ones_like(z.amax(dim=dims)))
    else:
        dims = 0 if per_feature else (0, 1)
        assert z.mean(dim=dims).abs().max() < 1e-10
        torch.testing.assert_close(z.std(dim=dims), torch.ones_like(z.std(dim=dims)))
    torch.testing.assert_close(scaler.inverse_transform(z), x)
    restored = DataScaler.from_state_dict(scaler.state_dict())
    torch.testing.assert_close(restored.transform(x.float()), z.float())


def test_scaler_fixed_range_and_errors() -> None:
    scaler = DataScaler(data_range=(0, 255))
    torch.testing.assert_close(
        scaler.transform(torch.tensor([[0.0, 255.0]])), torch.tensor([[-1.0, 1.0]])
    )
    with pytest.raises(RuntimeError, match="not fitted"):
        DataScaler().transform(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kind"):
        DataScaler("robust")
    with pytest.raises(ValueError, match="high > low"):
        DataScaler(data_range=(1, 1))
    with pytest.raises(ValueError, match="not a DataScaler state"):
        DataScaler.from_state_dict({"kind": "minmax"})
    const = DataScaler(per_feature=True).fit(torch.tensor([[1.0, 2.0], [1.0, 4.0]]))
    assert torch.isfinite(const.transform(torch.tensor([[1.0, 3.0]]))).all()


# --- CSV / TSV ----------------------------------------------------------------------------------


def test_csv_with_header_and_labels_and_tsv_without(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(
        "height,weight,species\n1.5,60,cat\n\n1.75,80.5,dog\n 2e0 , -3 ,cat\n"
    )
    x, y = load_data(tmp_path / "t.csv", labels_key="species", dtype=torch.float64)
    assert torch.equal(x, torch.tensor([[1.5, 60.0], [1.75, 80.5], [2.0, -3.0]], dtype=x.dtype))
    assert y.tolist() == [0, 1, 0]  # categories numbered in sorted order
    x, _ = load_data(tmp_path / "t.csv", key="weight,height")  # pick and order columns
    assert x[:, 0].tolist() == [60.0, 80.5, -3.0] and x.shape == (3, 2)
    x, _ = load_data(tmp_path / "t.csv", key=[1])
    assert x.shape == (3, 1)
    # No header: every row is data; tabs for .tsv; quoted numbers are numbers.
    (tmp_path / "t.tsv").write_text('1\t2\t3\n4\t"5"\t6\n')
    x, y = load_data(tmp_path / "t.tsv")
    assert x.tolist() == [[1, 2, 3], [4, 5, 6]] and y is None
    # A headerless table with a text column is not taken for a header.
    (tmp_path / "nohead.csv").write_text("1.0,red\n2.0,blue\n")
    x, y = load_data(tmp_path / "nohead.csv", labels_key=1)
    assert x.tolist() == [[1.0], [2.0]] and y.tolist() == [1, 0]


def test_the_index_column_pandas_writes_is_not_a_feature(tmp_path: Path) -> None:
    """`DataFrame.to_csv` starts each row with the index under an empty header cell."""
    (tmp_path / "p.csv").write_text(",a,b,kind\n0,1.5,2,x\n1,3.5,4,y\n2,5.5,6,x\n")
    x, y = load_data(tmp_path / "p.csv", labels_key="kind")
    assert x.tolist() == [[1.5, 2.0], [3.5, 4.0], [5.5, 6.0]] and y.tolist() == [0, 1, 0]
    x, _ = load_data(tmp_path / "p.csv", key=[0, 1])  # picked by position, it is read
    assert x[:, 0].tolist() == [0.0, 1.0, 2.0]
    # A named first column, or a table without a header, keeps every column.
    (tmp_path / "q.csv").write_text("i,a\n0,1\n1,2\n")
    assert load_data(tmp_path / "q.csv")[0].shape == (2, 2)


def test_csv_errors_name_the_column_or_line(tmp_path: Path) -> None:
    def write(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    bad_col = write("a.csv", "x,colour,y\n1,red,2\n3,blue,4\n5,red,6\n")
    with pytest.raises(ValueError, match=r"column 'colour' is not numeric.*line 2"):
        load_data(bad_col)
    with pytest.raises(ValueError, match=r"line 3, column 'y' holds a non-finite value \('nan'\)"):
        load_data(write("b.csv", "x,y\n1,2\n3,nan\n"))
    with pytest.raises(ValueError, match=r"line 4, column 'x' holds a non-finite value \('-inf'\)"):
        load_data(write("c.csv", "x,y\n1,2\n3,4\n-inf,5\n"))
    with pytest.raises(ValueError, match=r"line 3, column 'y' is empty"):
        load_data(write("d.csv", "x,y\n1,2\n3,\n"))
    with pytest.raises(ValueError, match=r"line 4, column 'x': 'oops' is not a number"):
        load_data(write("e.csv", "x,y\n1,2\n3,4\noops,5\n6,7\n"))
    with pytest.raises(ValueError, match=r"line 3 has 3 fields, the first row has 2"):
        load_data(write("f.csv", "x,y\n1,2\n3,4,5\n"))
    with pytest.raises(ValueError, match=r"key 'z' is not a column .*\['x', 'y'\]"):
        load_data(write("g.csv", "x,y\n1,2\n"), key="z")
    with pytest.raises(ValueError, match="no rows"):
        load_data(write("h.csv", "\n\n"))
    with pytest.raises(ValueError, match="header but no data rows"):
        load_data(write("i.csv", "x,y\n"))
