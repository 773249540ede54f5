"""Directory sources: inotify (through watchdog) or polling, an initial scan, and a stability check.

A file is handed over only when it is *stable*: size and mtime unchanged for ``stable_seconds``
(a file whose mtime is already that old counts at once, since every write moves the mtime) and,
where the kernel can tell, no process holds it open for writing (a read lease is refused then).

Every entry with an audio name is handed over, not only regular files: a FIFO, socket, device, a
folder named ``x.wav``, a symbolic link loop or a link out of the watched folders is handed over at
once (it has no content to wait for) and the pipeline records it as failed with its reason; it is
never opened in a way that could block.

Polling is used where inotify cannot see changes: ``polling = "auto"`` polls folders on network and
FUSE file systems (NFS, SMB/CIFS, sshfs... changes made by another client raise no inotify event),
``always``/``never`` force it. If inotify cannot be set up (e.g. out of watches) the folder is polled
with a warning instead of being left unwatched.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from devrecd.audio.files import wanted
from devrecd.config import WatchConfig
from devrecd.errors import ConfigError

log = logging.getLogger("devrecd.watch")

# File systems where inotify misses changes made elsewhere (or that cannot be watched at all).
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre", "gpfs", "beegfs",
    "davfs", "ncpfs", "sshfs", "virtiofs", "vboxsf", "vmhgfs",
})

Submit = Callable[[str, int, int], None]  # path, size, mtime_ns; may block (backpressure)
Vanished = Callable[[str, int, int], None]


def fs_type(path: str | os.PathLike, mounts: str = "/proc/mounts") -> str:
    """The file-system type of the mount holding ``path`` ('' when unknown)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


def needs_polling(path: str | os.PathLike, mode: str, mounts: str = "/proc/mounts") -> bool:
    """Whether ``path`` should be polled under ``watch.polling = mode``."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if mode != "auto":
        raise ConfigError(f"watch.polling must be auto, always or never, not {mode!r}")
    kind = fs_type(path, mounts)
    return kind in NETWORK_FS or kind.startswith("fuse")



def open_for_writing(path: str) -> bool | None:
    """True if some process has ``path`` open for writing, False if not, None if the kernel won't say.

    Uses a read lease (Linux ``F_SETLEASE``), which the kernel refuses while a writer holds the file.
    A writer that opens the file while the lease is held makes the kernel signal the lease holder;
    that signal is SIGIO by default, whose default action would END THE DAEMON. ``F_SETSIG`` makes
    it SIGURG instead, which is ignored by default and needs no handler (threads cannot install
    one); the lease is released at once anyway, so the writer waits microseconds.
    """
    setlease = getattr(fcntl, "F_SETLEASE", None)
    if setlease is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # no lease on a FIFO or device; the pipeline refuses those
        setsig = getattr(fcntl, "F_SETSIG", None)
        if setsig is None:
            return None  # a lease break would raise SIGIO; better no answer than a dead daemon
        fcntl.fcntl(fd, setsig, signal.SIGURG)
        fcntl.fcntl(fd, setlease, fcntl.F_RDLCK)
        fcntl.fcntl(fd, setlease, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        # EAGAIN: open for writing. EACCES/EINVAL: not our file (no CAP_LEASE) or a file system without leases.
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    finally:
        os.close(fd)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float  # wall time its (size, mtime) was first seen unchanged
    immediate: bool = False  # not a regular file (or a link that is not followed): nothing to wait for


class Watcher:
    """Watches folders and hands stable audio files to ``submit``."""

    def __init__(self, dirs: Iterable[str | os.PathLike], cfg: WatchConfig, submit: Submit,
                 vanished: Vanished | None = None, *, exclude: Iterable[str | os.PathLike] = ()) -> None:
        self.dirs = [os.path.realpath(d) for d in dirs]
        for d in self.dirs:
            if not os.path.isdir(d):
                raise ConfigError(f"watch folder {d} does not exist or is not a folder")
        self.cfg = cfg
        self.submit = submit
        self.vanished = vanished
        self.exclude = [os.path.realpath(e) for e in exclude]
        self._lock = threading.Lock()
        self._candidates: dict[str, _Candidate] = {}
        self._handed: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) already submitted
        self._observer = None
        self._polled: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scanned = threading.Event()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start inotify watches / polling and the stability thread (which does the initial scan)."""
        inotify_dirs = []
        for d in self.dirs:
            if needs_polling(d, self.cfg.polling):
                self._polled.append(d)
            else:
                inotify_dirs.append(d)
        if inotify_dirs:
            self._start_observer(inotify_dirs)
        for d in self._polled:
            log.info("polling folder", extra={"dir": d, "fs": fs_type(d), "interval_s": self.cfg.poll_interval})
        self._thread = threading.Thread(target=self._loop, name="devrecd-watch", daemon=True)
        self._thread.start()

    def _start_observer(self, dirs: list[str]) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # type: ignore[override]
                if event.is_directory:
                    if event.event_type in ("created", "moved"):
                        # A folder moved in (or created with files already in it) brings files
                        # inotify never reported; a folder with an audio name is itself recorded.
                        folder = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
                        watcher.note(folder)
                        watcher._scan_tree(folder)
                    return
                if event.event_type == "moved":
                    watcher._forget(os.fsdecode(event.src_path))
                    watcher.note(os.fsdecode(event.dest_path))
                elif event.event_type in ("created", "modified", "closed"):
                    watcher.note(os.fsdecode(event.src_path))

        observer = Observer()
        for d in dirs:
            try:
                observer.schedule(Handler(), d, recursive=True)
            except OSError as exc:
                log.warning("inotify unavailable, polling instead", extra={"dir": d, "error": str(exc)})
                self._polled.append(d)
        observer.daemon = True
        observer.start()
        self._observer = observer

    @property
    def polled(self) -> tuple[str, ...]:
        """The folders polled instead of watched through inotify (network file systems, fallback)."""
        return tuple(self._polled)

    def stop(self) -> None:
        """Stop watching (files already handed over are not affected)."""
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reconfigure(self, cfg: WatchConfig) -> None:
        """New stability/polling settings and filters (SIGHUP)."""
        self.cfg = cfg

    def wait_scanned(self, timeout: float | None = None) -> bool:
        """True once the initial scan has noted every file already present."""
        return self._scanned.wait(timeout)

    # --- candidates ----------------------------------------------------------------------------

    def _excluded(self, path: str) -> bool:
        return any(path == e or path.startswith(e + os.sep) for e in self.exclude)

    def _external(self, path: str) -> bool:
        real = os.path.realpath(path)
        return not any(real == d or real.startswith(d + os.sep) for d in self.dirs)

    def note(self, path: str) -> None:
        """An entry appeared or changed: track a regular file until it is stable; anything else
        (FIFO, socket, device, folder, link loop, dangling or external link) is handed over at once."""
        if not wanted(path, self.cfg) or self._excluded(path):
            return
        try:
            lst = os.lstat(path)
        except OSError:
            return  # gone already; a later event or scan will tell
        immediate = False
        try:
            st = os.stat(path)
        except OSError:
            st, immediate = lst, True  # a link loop or a dangling link: recorded with its reason
        if not immediate:
            immediate = not _regular(st.st_mode) or (
                stat.S_ISLNK(lst.st_mode) and not self.cfg.follow_external_links and self._external(path))
        key = (lst.st_size, lst.st_mtime_ns) if immediate else (st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._handed.get(path) == key:
                return
            c = self._candidates.get(path)
            if c is None or (c.size, c.mtime_ns) != key or c.immediate != immediate:
                self._candidates[path] = _Candidate(key[0], key[1], time.time(), immediate)

    def _forget(self, path: str) -> None:
        with self._lock:
            self._candidates.pop(path, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._candidates)

    def _scan_tree(self, root: str) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            if self._stop.is_set():
                return
            dirnames[:] = [d for d in dirnames if not self._excluded(os.path.join(dirpath, d))]
            for name in filenames + dirnames:  # a folder (or link to one) named x.wav is recorded too
                self.note(os.path.join(dirpath, name))

    def _loop(self) -> None:
        for d in self.dirs:
            self._scan_tree(d)
        self._scanned.set()
        last_poll = time.monotonic()
        while not self._stop.is_set():
            tick = min(0.25, max(0.02, self.cfg.stable_seconds / 4))
            if self._stop.wait(tick):
                return
            if self._polled and time.monotonic() - last_poll >= self.cfg.poll_interval:
                last_poll = time.monotonic()
                for d in list(self._polled):
                    self._scan_tree(d)
            self._check_stable()

    def _check_stable(self) -> None:
        with self._lock:
            items = list(self._candidates.items())
        now = time.time()
        for path, c in items:
            if self._stop.is_set():
                return
            if c.immediate:
                with self._lock:
                    if self._candidates.get(path) is not c:
                        continue
                    del self._candidates[path]
                    self._handed[path] = (c.size, c.mtime_ns)
                self._hand_over(path, c)
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._forget(path)
                log.info("file vanished before it was stable", extra={"path": path})
                if self.vanished is not None:
                    self.vanished(path, c.size, c.mtime_ns)
                continue
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                with self._lock:
                    self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now)
                continue
            quiet = max(now - c.since, now - st.st_mtime_ns / 1e9)
            if quiet < self.cfg.stable_seconds:
                continue
            if open_for_writing(path):
                continue  # still being written, however slowly
            with self._lock:
                if self._candidates.get(path) is not c:
                    continue  # changed meanwhile
                del self._candidates[path]
                self._handed[path] = (c.size, c.mtime_ns)
            self._hand_over(path, c)

    def _hand_over(self, path: str, c: _Candidate) -> None:
        """``submit`` (which may block: backpressure, or storage that cannot be written). Should it
        fail, the file stays a candidate, handed over again at a later tick: the watch goes on."""
        try:
            self.submit(path, c.size, c.mtime_ns)
        except Exception as exc:  # noqa: BLE001 - the watcher thread must outlive any one file
            log.error("cannot hand a file to the pipeline; retrying", extra={"path": path, "error": str(exc)})
            with self._lock:
                if self._handed.get(path) == (c.size, c.mtime_ns):
                    del self._handed[path]
                self._candidates.setdefault(path, c)
            self._stop.wait(1.0)


def _regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)

