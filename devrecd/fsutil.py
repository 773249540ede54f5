"""Atomic file writes and private state files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or a new file in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 mode: int | None = None, fsync: bool = True) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a callback that writes to a binary file) to a
    temporary file beside ``path``, fsync it, rename it into place (atomic on POSIX), then fsync
    the folder so that the rename itself is durable. ``mode`` is applied whatever the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


def private_file(path: str | os.PathLike, mode: int = 0o600, flags: int = os.O_RDWR) -> int:
    """Open (creating if needed) a state file and set ``mode`` on it whatever the umask; -> fd."""
    fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd
