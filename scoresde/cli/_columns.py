"""Table columns by name: a run trained on a table file with a header row records the names
of the columns it read (whatever --key chose), and `likelihood` and `train --resume` read a
table with a header (CSV or TSV) by those names, in that order, so that a file with its
columns in another order is not read by position. A header-less table or an array file is
read as before (by position / shape)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _table_header(source: Any) -> list[str] | None:
    """The header row of the table file `source` (a `.csv` / `.tsv` / `.tab` path), or None:
    not such a file, no header row, or not readable as a table (load_data then says why)."""
    import csv

    from scoresde.data import TABLE_EXTENSIONS, _has_header, _read_rows

    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    delimiter = TABLE_EXTENSIONS.get(path.suffix.lower())
    if delimiter is None or not path.is_file():
        return None
    try:
        rows, _ = _read_rows(path, delimiter, limit=2)
    except (OSError, UnicodeError, csv.Error):
        return None
    if not rows or (len(rows) > 1 and len(rows[1]) != len(rows[0])):
        return None
    return rows[0] if _has_header(rows[0], rows[1] if len(rows) > 1 else None) else None


def _table_columns(source: Any, key: Any = None) -> list[str] | None:
    """The header names of the feature columns that `load_data(source, key=key)` reads from
    a table file with a header row, in that order; None for any other source."""
    from scoresde.data import _chosen_columns

    names = _table_header(source)
    if names is None:
        return None
    return [names[i] for i in _chosen_columns(Path(source), names, True, key, None)]


def _recorded_columns(source: Any, key: Any) -> list[str] | None:
    """The column names a run records for the data `source` read with `key`: None when it is
    not a table with a header, or when a name is not unique in the header (such a table
    cannot be read by name)."""
    names = _table_header(source)
    if names is None:
        return None
    columns = _table_columns(source, key)
    if columns is None or any(names.count(c) != 1 for c in columns):
        return None
    return columns


def _columns_key(source: Any, columns: Any) -> list[str] | None:
    """The recorded training `columns`, as the key to read the table `source` by name; None
    when nothing is recorded (an older run) or `source` is not a table with a header.
    Raises ValueError naming the file and the columns it lacks (or holds twice)."""
    if not columns:
        return None
    names = _table_header(source)
    if names is None:
        return None
    columns = [str(c) for c in columns]
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(
            f"{str(source)!r} has no column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)} of the run's training data (its columns: "
            f"{names}; the run was trained on {columns}, read by name); rename the columns, "
            "or pass --key to choose them"
        )
    twice = [c for c in columns if names.count(c) > 1]
    if twice:
        raise ValueError(
            f"{str(source)!r} holds the column {twice[0]!r} {names.count(twice[0])} times; "
            f"the run reads its training columns {columns} by name: rename the copies, or "
            "pass --key to choose the columns"
        )
    return columns
