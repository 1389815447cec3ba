"""Atomic file writes: write a temporary file in the target's folder, fsync it, os.replace.

A reader never sees half a file and a crash mid-write leaves the previous file intact. The
temporary file is created with mode 0o666 filtered by the process umask (and the folder's
default ACL), exactly the permissions a plain `open(path, "w")` would give the file, so an
atomic write is not owner-only where an ordinary one would be shared
(`tempfile.mkstemp` creates 0o600, and os.replace keeps that mode).

Temporary names are `.{name}.{8 random characters}{suffix}` (the patterns of
`scoresde.checkpoints.TEMP_FILE_PATTERNS` rely on that shape).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "create_temp_file"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_FLAGS |= getattr(os, "O_CLOEXEC", 0)


def create_temp_file(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """Create a new empty file `.{path.name}.XXXXXXXX{suffix}` next to `path`, with the mode
    a plain open() gives a new file (0o666 & ~umask). Returns (open fd, its path)."""
    for _ in range(100):
        name = f".{path.name}.{secrets.token_hex(4)}{suffix}"
        tmp = os.path.join(path.parent, name)
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name next to {str(path)!r}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (not possible everywhere)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file `tmp` (a path) in `path`'s folder, give
    it the mode a plain open() would (whatever `write` did to it), fsync it, and os.replace
    it onto `path`; on any failure the temporary file is removed and the
    error propagates. `path`'s folder must exist. Returns `path` as a Path."""
    path = Path(path)
    fd, tmp = create_temp_file(path)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask
    finally:
        os.close(fd)
    try:
        write(tmp)
        # Some writers replace the file they are given with one of their own (safetensors'
        # save_file leaves it 0o600): the mode a plain open() gives is restored.
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)
    return path
