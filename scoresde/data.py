"""Loading a user's data into a tensor `[N, *D]`, and scaling it for training.

`load_data(source)` accepts a torch tensor, a numpy array, a `.npy` / `.npz` / `.pt` file,
a `.csv` / `.tsv` table (header detected, numeric columns only), a folder of images, or
the name of a toy set (`scoresde.toy.make_dataset`), and returns
`(x, labels)` with x a floating-point tensor `[N, *D]` (rank >= 2) and labels a long
tensor `[N]` or None. It does not rescale: images come back with their raw pixel values
(0..255) so that the scaling is an explicit, saved step.

`DataScaler` is that step: an affine map x -> (x - shift) / scale fitted to the data
("minmax": onto [-1, 1]; "standard": zero mean, unit std; either over all entries or per
feature), with `transform` / `inverse_transform` and `state_dict` / `from_state_dict`
so a checkpoint keeps it and samples can be mapped back to data units.

`load_digits_split()` is scikit-learn's 8x8 digits (shipped with the package, no download)
split deterministically into train and test sets, scaled to [-1, 1].

Every failure is a clear exception: FileNotFoundError for a missing path, ValueError for a
wrong key, an empty folder, non-finite values or a bad shape, TypeError for non-numeric
data.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from scoresde._typing import Tensor
from scoresde._validation import check_choice, check_finite_rows, check_positive_int

__all__ = ["load_data", "load_digits_split", "DataScaler", "DigitsSplit", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLE_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


def _to_tensor(name: str, array: Any, dtype: torch.dtype) -> Tensor:
    """A numeric array-like -> floating tensor `[N, *D]`, rank >= 2, finite."""
    if torch.is_tensor(array):
        t = array.detach()
    else:
        arr = np.asarray(array)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
        ):
            raise TypeError(f"{name} must hold numbers, got an array of dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.ndim < 2:
        raise ValueError(
            f"{name} must have shape [N, *D] with rank >= 2 (one row per sample), got shape "
            f"{tuple(t.shape)}; reshape 1-D data with x.reshape(-1, 1)"
        )
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    check_finite_rows(name, t)  # in the source's own precision, before the cast
    cast = t.to(dtype)
    if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
        bad = ~torch.isfinite(cast.reshape(cast.shape[0], -1)).all(dim=1)
        row = int(bad.nonzero()[0])
        big = float(t[row].abs().max())
        raise ValueError(
            f"{name} holds values beyond the range of {dtype}: row {row} (of {int(bad.sum())} "
            f"such rows) has {big:.3g}; load it with dtype=torch.float64 (or rescale it first)"
        )
    return cast


def _to_labels(name: str, labels: Any, n: int) -> Tensor:
    y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise TypeError(f"{name} must be integer class labels, got non-integer floats")
    elif y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{name} must be integer class labels, got dtype {y.dtype}")
    y = y.reshape(-1).long()
    if y.shape[0] != n:
        raise ValueError(f"{name} must have one label per sample ({n}), got {y.shape[0]}")
    if (y < 0).any():
        raise ValueError(f"{name} must be >= 0, got minimum {int(y.min())}")
    return y


class _KeyChoiceError(ValueError):
    """A key that the file does not hold (reported as it is by `_read_file`)."""


def _read_file(path: Path, what: str, read: Any) -> Any:
    """read(), with a corrupt or unreadable file reported as one ValueError naming it
    (np.load and torch.load raise UnpicklingError, BadZipFile, RuntimeError, ...)."""
    try:
        return read()
    except (_KeyChoiceError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # already clear: a wrong key, a missing file, ...
    except Exception as err:
        text = str(err).strip()
        first = text.splitlines()[0].split(". ")[0] if text else ""
        raise ValueError(
            f"{str(path)!r} is not {what} that can be read (corrupt, truncated or another "
            f"format): {type(err).__name__}{': ' + first[:200] if first else ''}"
        ) from err


def _load_npz(path: Path, key: str | None, labels_key: str | None) -> tuple[Any, Any]:
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        if key is None:
            if len(keys) != 1:
                raise _KeyChoiceError(
                    f"key must name the array to load from {path} (it holds {keys}), got None"
                )
            key = keys[0]
        for k, what in ((key, "key"), (labels_key, "labels_key")):
            if k is not None and k not in keys:
                raise _KeyChoiceError(f"{what} {k!r} is not in {path}; available keys: {keys}")
        return f[key], (None if labels_key is None else f[labels_key])


def _image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (one walk), sorted, leaving out sub-folders that hold a
    scoresde run (`latest.pt`) or an exported model (config + weights): their plots are not
    data (a --ckpt-dir inside the image folder would otherwise feed the run's own loss.png
    and samples back as images)."""
    from scoresde.checkpoints import LATEST  # imported here: checkpoints imports this module
    from scoresde.pretrained import CONFIG_NAME, WEIGHTS_NAME

    found = list(folder.rglob("*"))
    runs = {
        p.parent
        for p in found
        if p.name == LATEST or (p.name == WEIGHTS_NAME and (p.parent / CONFIG_NAME).is_file())
    }
    runs.discard(folder)
    return sorted(
        p
        for p in found
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(r in p.parents for r in runs)
    )


def _load_images(folder: Path, image_size: int | tuple[int, int] | None, mode: str | None):
    from PIL import Image  # pillow comes with matplotlib

    files = _image_files(folder)
    if not files:
        raise ValueError(
            f"the folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    images = []
    for p in files:
        with Image.open(p) as im:
            images.append(im.copy())
    if mode is None:  # grayscale if every image is, else RGB
        mode = "L" if all(im.mode in ("L", "1", "I;16", "I") for im in images) else "RGB"
    check_choice("mode", mode, ("L", "RGB"))
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    arrays = []
    for im in images:
        im = im.convert(mode)
        if image_size is not None:
            im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        first = {}  # one file of each size, to say which images differ
        for a, p in zip(arrays, files, strict=True):
            first.setdefault(a.shape, p.relative_to(folder).as_posix())
        sizes = ", ".join(f"{list(k)} ({first[k]}, ...)" for k in shapes[:4])
        raise ValueError(
            f"images in {folder} have different sizes: {sizes}; pass image_size=(H, W) "
            "(--image-size S on the command line) to resize them"
        )
    # Labels from sub-folder names (ImageFolder layout) when every image sits in one.
    parents = [p.parent for p in files]
    labels = None
    if all(par != folder for par in parents):
        classes = sorted({par.relative_to(folder).parts[0] for par in parents})
        if len(classes) > 1:
            index = {c: i for i, c in enumerate(classes)}
            labels = np.array([index[p.relative_to(folder).parts[0]] for p in files])
    return np.stack(arrays), labels


# --- CSV / TSV tables ----------------------------------------------------------------------------


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_rows(
    path: Path, delimiter: str, limit: int | None = None
) -> tuple[list[list[str]], list[int]]:
    """The non-empty rows of a delimited text file (the first `limit` of them) and their
    line numbers (1-based)."""
    rows, lines = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: drop a BOM (Excel)
        reader = csv.reader(f, delimiter=delimiter)
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            rows.append([cell.strip() for cell in row])
            lines.append(reader.line_num)
            if limit is not None and len(rows) >= limit:
                break
    return rows, lines


def _has_header(first: list[str], second: list[str] | None) -> bool:
    """A header row has text where the data below it has numbers (or is all text), so a
    headerless table with a text column is not mistaken for one."""
    text = [not _is_number(cell) for cell in first]
    return all(text) or (
        second is not None and any(t and _is_number(v) for t, v in zip(text, second, strict=True))
    )


def _chosen_columns(
    path: Path, names: list[str], header: bool, key: Any, label_index: int | None
) -> list[int]:
    """The indices of the feature columns: those `key` names (see `_load_table`), else every
    column but the labels and a pandas index."""
    if key is None:
        # A first column with an empty header is the row index pandas' `to_csv` writes, not
        # a feature (pick it explicitly with `key` if it is one).
        skip = {0} if header and names[0].strip() == "" and len(names) > 1 else set()
        return [i for i in range(len(names)) if i != label_index and i not in skip]
    wanted = key.split(",") if isinstance(key, str) else list(key)
    return [
        _select_column(path, "key", k.strip() if isinstance(k, str) else k, names) for k in wanted
    ]


def _select_column(path: Path, what: str, name: Any, names: list[str]) -> int:
    """The index of a column given by header name or by 0-based position."""
    if isinstance(name, str) and name in names:
        return names.index(name)
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        index = int(name)
        if 0 <= index < len(names):
            return index
    raise ValueError(
        f"{what} {name!r} is not a column of {path}; columns: {names} (or 0-based positions "
        f"0..{len(names) - 1})"
    )


def _label_column(values: list[str]) -> np.ndarray:
    """Class labels from a column: integers as they are, anything else as sorted categories."""
    if all(_is_number(v) and float(v).is_integer() for v in values):
        return np.array([int(float(v)) for v in values])
    categories = {c: i for i, c in enumerate(sorted(set(values)))}
    return np.array([categories[v] for v in values])


def _numeric_column(path: Path, name: str, values: list[str], lines: list[int]) -> np.ndarray:
    """One column as float64, refusing text (naming the column) and missing, NaN or Inf
    values (naming the line)."""
    try:
        column = np.array(values, dtype=np.float64)  # fast path: every cell is a number
    except ValueError:
        bad = [(line, v) for line, v in zip(lines, values, strict=True) if not _is_number(v)]
        line, value = bad[0]
        if value == "":
            raise ValueError(
                f"{path}: line {line}, column {name!r} is empty (a missing value); fill or "
                "drop that row"
            ) from None
        if len(bad) > len(values) // 2:
            raise ValueError(
                f"{path}: column {name!r} is not numeric (e.g. {value!r} on line {line}); only "
                "numeric columns can be modelled: drop it, or select the numeric columns with "
                "key= (--key a,b,c)"
            ) from None
        raise ValueError(
            f"{path}: line {line}, column {name!r}: {value!r} is not a number"
        ) from None
    finite = np.isfinite(column)
    if not finite.all():
        i = int(np.argmin(finite))
        raise ValueError(
            f"{path}: line {lines[i]}, column {name!r} holds a non-finite value "
            f"({values[i]!r}); NaN and Inf are not data a model can learn"
        )
    return column


def _load_table(
    path: Path, delimiter: str, key: Any, labels_key: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """A CSV/TSV file -> (x `[N, F]` float64, labels `[N]` or None).

    The first row is a header when any of its cells is not a number. `key` picks the
    feature columns (names or 0-based positions, as a list or a comma-separated string;
    default: every column but the labels and a first column with an empty header, the
    index that pandas writes), `labels_key` the column of class labels.
    """
    rows, lines = _read_rows(path, delimiter)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    width = len(rows[0])
    for row, line in zip(rows, lines, strict=True):
        if len(row) != width:
            raise ValueError(
                f"{path}: line {line} has {len(row)} fields, the first row has {width} (is the "
                f"delimiter {delimiter!r} right?)"
            )
    header = _has_header(rows[0], rows[1] if len(rows) > 1 else None)
    if header:
        names, rows, lines = rows[0], rows[1:], lines[1:]
        if not rows:
            raise ValueError(f"{path} has a header but no data rows")
    else:
        names = [str(i) for i in range(width)]
    label_index = (
        None if labels_key is None else _select_column(path, "labels_key", labels_key, names)
    )
    chosen = _chosen_columns(path, names, header, key, label_index)
    if not chosen:
        raise ValueError(f"{path}: no feature columns left (columns: {names})")
    columns = list(zip(*rows, strict=True))
    x = np.stack([_numeric_column(path, names[i], list(columns[i]), lines) for i in chosen], axis=1)
    labels = None if label_index is None else _label_column(list(columns[label_index]))
    return x, labels


def load_data(
    source: Any,
    *,
    labels: Any = None,
    key: str | None = None,
    labels_key: str | None = None,
    n: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    mode: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor | None]:
    """Load data as `(x [N, *D], labels [N] long or None)`, unscaled.

    Args:
        source: a torch tensor or numpy array `[N, *D]`; a path to a `.npy`, `.npz`
            (choose the array with `key`, labels with `labels_key`) or `.pt` file (a tensor,
            or a dict of tensors chosen by `key` / `labels_key`); a `.csv` / `.tsv` table
            (`[N, F]`; a first row with any non-numeric cell is the header; `key` picks
            feature columns by name or 0-based position, as a list or "a,b,c"; `labels_key`
            names a column of class labels, text categories numbered in sorted order; a
            first column with an empty header, the index pandas' `to_csv` writes, is not a
            feature unless `key` picks it; a non-numeric feature column or a missing / NaN /
            Inf value is refused, naming the column and line); a folder of images
            (`[N, C, H, W]` pixel values 0..255; labels from class sub-folders when there
            are several; a sub-folder holding a scoresde run or exported model is skipped); or
            a toy-set name of `scoresde.toy.make_dataset` ("two_moons",
            "digits", ...), for which `n` samples are drawn with `seed` ("digits" without
            `n` gives the 1797 images, scaled to [-1, 1], with labels).
        labels: labels `[N]` for in-memory data.
        image_size: resize images to (H, W) (an int for square).
        mode: "L" (grayscale) or "RGB" for images; default: grayscale if all images are.
        dtype: floating dtype of x.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    y = labels
    if torch.is_tensor(source) or isinstance(source, np.ndarray):
        x = source
    elif isinstance(source, (str, os.PathLike)):
        from scoresde.toy import DATASETS, load_digits_images, make_dataset

        path = Path(source)
        if isinstance(source, str) and source in DATASETS and not path.exists():
            if source == "digits" and n is None:
                images, y = load_digits_images()
                return (images / 8.0 - 1.0).to(dtype), y
            count = check_positive_int("n", 10_000 if n is None else n)
            g = torch.Generator().manual_seed(seed)
            return make_dataset(source, count, generator=g, dtype=dtype), None
        if not path.exists():
            raise FileNotFoundError(
                f"source {str(source)!r} is neither an existing file or folder nor a toy set "
                f"name ({', '.join(sorted(DATASETS))})"
            )
        suffix = path.suffix.lower()
        if path.is_dir():
            x, y = _load_images(path, image_size, mode)
        elif suffix == ".npy":
            if key is not None:
                raise ValueError(
                    f"key is only used for .npz/.pt/.csv/.tsv files, got key={key!r} for {path}"
                )
            x = _read_file(path, "a .npy array", lambda: np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            x, y = _read_file(path, "an .npz archive", lambda: _load_npz(path, key, labels_key))
        elif suffix in TABLE_EXTENSIONS:
            x, y = _load_table(path, TABLE_EXTENSIONS[suffix], key, labels_key)
        elif suffix in (".pt", ".pth"):
            obj = _read_file(
                path,
                "a torch file of tensors",
                lambda: torch.load(path, map_location="cpu", weights_only=True),
            )
            if isinstance(obj, dict):
                keys = list(obj)
                if key is None or key not in obj:
                    raise ValueError(f"key must be one of {keys} for {path}, got {key!r}")
                if labels_key is not None and labels_key not in obj:
                    raise ValueError(f"labels_key must be one of {keys}, got {labels_key!r}")
                x, y = obj[key], (None if labels_key is None else obj[labels_key])
            else:
                x = obj
        else:
            raise ValueError(
                f"source {str(path)!r}: unsupported file type {suffix!r}; use .npy, .npz, .pt, "
                ".csv, .tsv or a folder of images"
            )
    else:
        raise TypeError(
            "source must be a tensor, a numpy array, a path or a toy-set name, got "
            f"{type(source).__name__}"
        )
    x = _to_tensor("data", x, dtype)
    y = None if y is None else _to_labels("labels", y, x.shape[0])
    if n is not None:  # the first n samples
        n = check_positive_int("n", n)
        x, y = x[:n], (None if y is None else y[:n])
    return x, y


class DigitsSplit(NamedTuple):
    """scikit-learn digits: x `[N, 1, 8, 8]` in [-1, 1], labels `[N]` long."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DigitsSplit:
    """The 1797 8x8 digits split into train/test by a seeded permutation (deterministic for
    a given seed), pixel levels 0..16 mapped affinely to [-1, 1]."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from scoresde.toy import load_digits_images

    images, labels = load_digits_images()
    x = (images / 8.0 - 1.0).to(dtype)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return DigitsSplit(x[train], labels[train], x[test], labels[test])


class DataScaler:
    """x -> (x - shift) / scale and back.

    kind "minmax": maps [min, max] of the data (or of a given `data_range`) onto [-1, 1];
    "standard": zero mean and unit standard deviation. `per_feature=True` fits one
    (shift, scale) per entry of D (e.g. per coordinate of tabular data) instead of one
    for the whole tensor. shift and scale are `[*D]` (or scalars) float64 tensors.
    """

    def __init__(
        self,
        kind: str = "minmax",
        *,
        per_feature: bool = False,
        data_range: tuple[float, float] | None = None,
    ) -> None:
        self.kind = check_choice("kind", kind, ("minmax", "standard"))
        self.per_feature = bool(per_feature)
        self.shift: Tensor | None = None
        self.scale: Tensor | None = None
        if data_range is not None:
            if kind != "minmax":
                raise ValueError(f"data_range is only used with kind='minmax', got kind={kind!r}")
            lo, hi = (float(v) for v in data_range)
            if not hi > lo:
                raise ValueError(
                    f"data_range must be (low, high) with high > low, got {data_range!r}"
                )
            self.shift = torch.tensor((hi + lo) / 2, dtype=torch.float64)
            self.scale = torch.tensor((hi - lo) / 2, dtype=torch.float64)

    @property
    def fitted(self) -> bool:
        return self.shift is not None

    def fit(self, x: Tensor) -> DataScaler:
        """Fit shift and scale on x `[N, *D]`; returns self."""
        x = _to_tensor("x", x, torch.float64)
        dims = 0 if self.per_feature else tuple(range(x.ndim))
        if self.kind == "minmax":
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
            self.shift, self.scale = (hi + lo) / 2, (hi - lo) / 2
        else:
            self.shift, self.scale = x.mean(dim=dims), x.std(dim=dims)
        # A constant feature would give scale 0; leave it unscaled instead of dividing by 0.
        self.scale = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        return self

    def fit_transform(self, x: Tensor) -> Tensor:
        return self.fit(x).transform(x)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.fitted:
            raise RuntimeError("DataScaler is not fitted: call fit(x) or pass data_range")
        return (
            self.shift.to(device=x.device, dtype=x.dtype),
            self.scale.to(device=x.device, dtype=x.dtype),
        )

    def transform(self, x: Tensor) -> Tensor:
        """(x - shift) / scale, shaped like x `[N, *D]`."""
        shift, scale = self._params(x)
        return (x - shift) / scale

    def inverse_transform(self, x: Tensor) -> Tensor:
        """x * scale + shift: model space back to data units."""
        shift, scale = self._params(x)
        return x * scale + shift

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors (safe for `torch.load(weights_only=True)`)."""
        return {
            "kind": self.kind,
            "per_feature": self.per_feature,
            "shift": None if self.shift is None else self.shift.clone(),
            "scale": None if self.scale is None else self.scale.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataScaler:
        """The scaler saved by `state_dict`."""
        if not isinstance(state, dict) or not {"kind", "shift", "scale"} <= set(state):
            raise ValueError(f"not a DataScaler state dict: {state!r}")
        scaler = cls(state["kind"], per_feature=bool(state.get("per_feature", False)))
        for name in ("shift", "scale"):
            v = state[name]
            setattr(scaler, name, None if v is None else torch.as_tensor(v, dtype=torch.float64))
        return scaler

    def __repr__(self) -> str:
        return (
            f"DataScaler(kind={self.kind!r}, per_feature={self.per_feature}, fitted={self.fitted})"
        )
