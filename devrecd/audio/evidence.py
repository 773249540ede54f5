"""Evidence files opened safely and hashed: the one way in to a file's bytes.

* :func:`open_evidence` opens the path read-only and non-blocking (``O_RDONLY | O_NONBLOCK``,
  ``O_NOATIME`` where allowed, ``O_NOFOLLOW`` on the resolved path) and checks it with ``fstat`` on
  the open descriptor, so a FIFO, socket, device or directory (or a link to one, or a file swapped
  for one after it was queued) is refused with a reason and can never block a reader. A symbolic
  link that leaves the allowed folders is refused when the caller confines it; where a link is
  followed, the resolved path is recorded.
* The bytes are read in one loop (:func:`read_chunks`): hashed in one streamed pass (SHA-256,
  :func:`hash_fd`, which the decoding of :mod:`devrecd.audio.decode` then follows on the same
  descriptor), or kept whole (:func:`read_file_bytes`), both with a byte cap.

Model files are hashed by :func:`devrecd.fsutil.sha256_artifact`, not here: a missing one is an
artifact error, not missing audio.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
from pathlib import Path
from typing import Iterator, Sequence

from devrecd.audio.errors import ChangedAudio, ExternalLink, LinkLoop, MissingAudio, NotAFile, TooLongAudio, UnreadableAudio

_READ_CHUNK = 1 << 20
TAIL_BYTES = 1 << 17  # the file's last bytes, kept by the hashing pass (an Ogg page is at most 65307)

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def open_evidence(path: str | os.PathLike, *, confine: Sequence[str] | None = None) -> tuple[int, os.stat_result, str | None]:
    """Open an evidence file read-only without ever blocking; -> (fd, fstat, resolved path or None).

    ``confine``: folders a symbolic link may lead into (None: follow links anywhere). Anything that
    is not a regular file once open is refused with :class:`NotAFile`; the caller closes the fd.
    """
    path = os.fspath(path)
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        if os.path.islink(path):
            raise MissingAudio(path, "a symbolic link to nothing (dangling)") from None
        raise MissingAudio(path, "no such file (it may have been moved or deleted)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkLoop(path, "a symbolic link loop") from None
        raise UnreadableAudio(path, f"cannot resolve: {exc.strerror or exc}") from None
    abspath = os.path.abspath(path)
    resolved = real if real != abspath else None
    if resolved and confine is not None and not _inside(real, [os.path.realpath(r) for r in confine]):
        raise ExternalLink(path, f"a symbolic link to {real}, outside the watched folders "
                                 "(watch.follow_external_links = false)")
    try:
        pre = os.stat(real)
    except OSError as exc:
        raise MissingAudio(path, f"vanished while opened: {exc.strerror or exc}") from None
    if not stat.S_ISREG(pre.st_mode):
        raise NotAFile(path, f"{_kind(pre.st_mode)}, not a regular file" + (f" (link to {real})" if resolved else ""))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        try:
            fd = os.open(real, flags | noatime)
        except PermissionError:
            if not noatime:
                raise
            fd = os.open(real, flags)  # O_NOATIME needs ownership; plain read-only is still fine
    except FileNotFoundError:
        raise MissingAudio(path, "no such file (it may have been moved or deleted)") from None
    except PermissionError:
        raise UnreadableAudio(path, "permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the resolved path became a link after it was resolved
            raise ChangedAudio(path, "replaced by a symbolic link while it was opened") from None
        raise UnreadableAudio(path, f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for a FIFO/device/... after the check above
            raise NotAFile(path, f"{_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st, resolved


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed, read-only (through :func:`open_evidence`)."""
    fd, _, _ = open_evidence(path)
    try:
        return hash_fd(fd, math.inf)[0]
    finally:
        os.close(fd)


def read_chunks(fd: int, max_bytes: float) -> Iterator[bytes]:
    """The bytes of ``fd`` from where it stands, a chunk at a time; raises OverflowError (the count
    read) once more than ``max_bytes`` have been read."""
    n = 0
    while chunk := os.read(fd, _READ_CHUNK):
        n += len(chunk)
        if n > max_bytes:
            raise OverflowError(n)
        yield chunk


def hash_fd(fd: int, max_bytes: float) -> tuple[str, int, bytes, bytes]:
    """-> (sha256, bytes read, first 64 bytes, last ``TAIL_BYTES`` bytes); stops (raising
    OverflowError) past ``max_bytes``."""
    h = hashlib.sha256()
    n, head, prev, last = 0, b"", b"", b""
    os.lseek(fd, 0, os.SEEK_SET)
    for chunk in read_chunks(fd, max_bytes):
        if not head:
            head = chunk[:64]
        h.update(chunk)
        n += len(chunk)
        prev, last = last, chunk
    tail = last if len(last) >= TAIL_BYTES else (prev + last)[-TAIL_BYTES:]
    return h.hexdigest(), n, head, tail


def read_file_bytes(path: str | os.PathLike, max_bytes: float) -> bytes:
    """The whole content of a file opened as evidence is (:func:`open_evidence`: read-only, never
    blocking, regular files only); :class:`TooLongAudio` past ``max_bytes``."""
    fd, _, _ = open_evidence(path)
    try:
        return b"".join(read_chunks(fd, max_bytes))
    except OverflowError:
        raise TooLongAudio(Path(path), f"more than {max_bytes:.0f} bytes") from None
    finally:
        os.close(fd)
