"""Atomic file writes, private state files and the hash of a model file."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from devrecd.errors import ArtifactError


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
    the folder so that the rename itself is durable. ``mode`` is applied whatever the umask; without
    it the file gets what any file the user makes gets (0666 less the umask): a model's contract,
    a scorer file or a report must be readable by whoever may read the files written beside it
    (a service user, a colleague), which a temporary file's 0600 would silently prevent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # With an explicit mode the temporary file is private until that mode is set: nobody can open
    # it meanwhile and keep reading through their descriptor.
    fd, tmp = _new_file(path, 0o600 if mode is not None else 0o666)
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
        _rename(tmp, path, fsync=fsync)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def move_into_place(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename a finished file ``tmp`` (written beside ``path`` by someone else's writer, e.g. an
    exporter that takes a file name) over ``path`` the way :func:`atomic_write` does: its data
    fsynced, the rename atomic on POSIX, the folder fsynced so that the rename is durable."""
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return _rename(tmp, path, fsync=True)


def _rename(tmp: str | os.PathLike, path: str | os.PathLike, *, fsync: bool) -> Path:
    os.replace(tmp, path)
    if fsync:
        fsync_dir(Path(path).parent)
    return Path(path)


def _new_file(path: Path, mode: int) -> tuple[int, str]:
    """A new, uniquely named temporary file beside ``path``, created with ``mode`` less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"))
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:  # another writer's temporary name: draw again
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def private_file(path: str | os.PathLike, mode: int = 0o600, flags: int = os.O_RDWR) -> int:
    """Open (creating if needed) a state file and set ``mode`` on it whatever the umask; -> fd."""
    fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sha256_artifact(path: str | os.PathLike, what: str = "model file") -> str:
    """SHA-256 of a model file (checkpoint, ONNX or ORT model, engine, contract, parity features),
    streamed. A missing or unreadable one is an :class:`~devrecd.errors.ArtifactError` that names it
    (``model_missing`` / ``model_unreadable``); evidence is hashed by
    :func:`devrecd.audio.sha256_file`, through the evidence open."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        raise ArtifactError(f"{what} not found: {path}", reason="model_missing") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {what} {path}: {exc.strerror or exc}", reason="model_unreadable") from None
