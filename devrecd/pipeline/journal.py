"""Durable per-file job state (SQLite, WAL) and the append-only verdict log (JSONL).

States: ``seen`` -> ``hashed`` -> one terminal state: ``judged``, ``failed`` (with a reason) or
``duplicate`` (same content as an earlier judged file). A row is keyed by the file's path and, once
read, its content sha256; size and mtime tell a file that changed at the same path from one seen before.

Exactly once, across kill -9: the terminal state and the full record are committed to the journal
FIRST (``logged = 0``), then the record is appended to the verdict log as one ``write`` + ``fsync``,
then the row is marked ``logged = 1``. A crash before the commit leaves the row non-terminal (it is
judged again on restart, nothing was written); a crash after it leaves ``logged = 0``, and
:meth:`Recorder.repair` appends the line on restart unless the log already holds it (a crash between
the append and the mark). A torn last line (power loss mid-write) is cut off before appending.

One current record per path: when a file failed as ``corrupt``/``too_short``/... (typically a copy
still in progress) and a later version of it arrives, the earlier failures are marked
``superseded_by`` the new row; they stay in the journal as history (``devrecd verdicts --history``)
and the new record lists them under ``supersedes``.

The schema carries a version (``PRAGMA user_version``); opening an older journal read-write migrates
it, opening it read-only (:meth:`Journal.open_readonly`, for export from a read-only mount) never writes.

State files are created 0600 (journal) / 0640 (verdict log) whatever the umask.

Test-only fault injection: with ``DEVRECD_TEST_KILL_AT=after_journal_commit`` in the environment the
process SIGKILLs itself between the journal commit and the verdict-log append, so that tests can show
the repair on restart. With ``DEVRECD_TEST_STORAGE_FAULT=full:FLAG`` (or ``readonly:FLAG``), every
write to the journal and the verdict log fails as on a full disk (a read-only file system) while the
file FLAG exists (opening the journal for writing included), so that tests can fill and free "the
disk" deterministically. Nothing else reads those variables.

A write that fails (full disk, read-only file system) raises :class:`JournalError` and changes
nothing: a transaction is rolled back, a verdict line cut short is cut off the log again. The
runner then waits and retries (:class:`~devrecd.pipeline.runner.Pipeline`); nothing is lost.

Failures and who caused them: a ``failed`` row whose reason is a file's (:data:`FILE_FAILURES`: the
audio errors of :mod:`devrecd.audio.errors`) is final for that version of the file; any other reason
(``internal``, ``inference``, ``registry``, ...) came from the daemon's own setup, and
:meth:`Journal.retry_setup_failures` gives such files a new row at the next start (the failure
stays as history, superseded by the new record).

The journal, the verdict log and the :class:`Recorder` that commits to both stay in one module: the
exactly-once order above is only checkable when read together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from devrecd.audio.errors import AudioError
from devrecd.errors import DevrecdError
from devrecd.fsutil import private_file

TERMINAL = ("judged", "failed", "duplicate")
ACTIVE = ("seen", "hashed")
SCHEMA_VERSION = 1
# Failures that a later, complete version of the same file replaces (a copy still in progress).
SUPERSEDABLE = ("corrupt", "too_short", "empty", "missing", "changed", "too_long")
KILL_ENV = "DEVRECD_TEST_KILL_AT"
FAULT_ENV = "DEVRECD_TEST_STORAGE_FAULT"  # test-only (module docstring): KIND:FLAG, KIND full or readonly
_FAULTS = {"full": ("database or disk is full", errno.ENOSPC), "readonly": ("attempt to write a readonly database", errno.EROFS)}


def _subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


# Failures the file itself caused: final for that version of the file. Every other failure reason
# is the daemon's (its setup, a bug): retried at the next start.
FILE_FAILURES = frozenset(c.reason for c in _subclasses(AudioError))


def _injected_fault() -> tuple[str, int] | None:
    """The storage fault the test-only environment variable injects now, if any (module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, _, flag = spec.partition(":")
    return _FAULTS.get(kind) if flag and os.path.exists(flag) else None


def _check_db_fault() -> None:
    if (fault := _injected_fault()) is not None:
        raise sqlite3.OperationalError(fault[0])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    duplicate_of INTEGER,
    record TEXT,
    logged INTEGER NOT NULL DEFAULT 0,
    seen_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    superseded_by INTEGER
);
CREATE INDEX IF NOT EXISTS files_path ON files(path);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256, state);
CREATE INDEX IF NOT EXISTS files_state ON files(state);
CREATE INDEX IF NOT EXISTS files_unlogged ON files(logged) WHERE logged = 0;
"""

JOURNAL_NAME = "journal.sqlite"  # the journal's file in a daemon's state folder
VERDICT_LOG_NAME = "verdicts.jsonl"  # the verdict log's


class JournalError(DevrecdError):
    """The journal or verdict log cannot be opened or written."""

    reason = "journal"


@dataclass(frozen=True)
class Entry:
    """One journal row."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    state: str
    reason: str | None
    duplicate_of: int | None
    record: dict | None
    logged: bool
    seen_at: float
    updated_at: float
    superseded_by: int | None = None


def _entry(row: sqlite3.Row | None) -> Entry | None:
    if row is None:
        return None
    d = dict(row)
    d["record"] = json.loads(d["record"]) if d["record"] else None
    d["logged"] = bool(d["logged"])
    d.setdefault("superseded_by", None)  # a version-0 journal read without migration
    return Entry(**d)


class Journal:
    """The SQLite journal. Thread-safe: one connection behind a lock (writes are tiny and rare)."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = str(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = _connect_readonly(self.path)
            else:
                if self.path != ":memory:":
                    _check_db_fault()  # opening writes (the schema, the WAL): it fails as writes do
                    try:
                        os.close(private_file(self.path, 0o600))  # sqlite gives the WAL and shm files this mode
                    except OSError as exc:
                        raise JournalError(f"cannot open the journal {self.path}: {exc.strerror or exc}") from None
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.row_factory = sqlite3.Row
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"the journal {self.path} has schema version {version}; this devrecd reads up "
                                   f"to {SCHEMA_VERSION} (upgrade devrecd)")
            if not readonly:
                if self.path != ":memory:":
                    self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL survives kill -9 (the WAL is in the OS); only the terminal commit must also
                # survive a power loss before its verdict line does, so finish() syncs.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate(version)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from None

    @classmethod
    def open_readonly(cls, path: str | os.PathLike) -> Journal:
        """Open for reading only (``mode=ro``): works on a read-only mount and never writes."""
        return cls(path, readonly=True)

    def _migrate(self, version: int) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` (a fresh journal is created at it)."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(files)")}
        if cols and "superseded_by" not in cols:  # version 0: no history of superseded failures
            self._db.execute("ALTER TABLE files ADD COLUMN superseded_by INTEGER")
        self._db.executescript(_SCHEMA)
        if version != SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple = ()) -> Entry | None:
        with self._lock:
            return _entry(self._db.execute(sql, args).fetchone())

    def _many(self, sql: str, args: tuple = ()) -> list[Entry]:
        with self._lock:
            return [_entry(r) for r in self._db.execute(sql, args).fetchall()]  # type: ignore[misc]

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                _check_db_fault()
                return self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise JournalError(f"journal write failed: {exc}") from None

    # --- queries -------------------------------------------------------------------------------

    def get(self, entry_id: int) -> Entry | None:
        return self._one("SELECT * FROM files WHERE id = ?", (entry_id,))

    def latest(self, path: str) -> Entry | None:
        """The newest row for ``path`` (any state)."""
        return self._one("SELECT * FROM files WHERE path = ? ORDER BY id DESC LIMIT 1", (path,))

    def judged_with(self, sha256: str, *, exclude: int | None = None) -> Entry | None:
        """The first judged row with this content, if any."""
        return self._one("SELECT * FROM files WHERE sha256 = ? AND state = 'judged' AND id != ? ORDER BY id LIMIT 1",
                         (sha256, -1 if exclude is None else exclude))

    def active(self) -> list[Entry]:
        """Rows not yet in a terminal state (to resume after a restart)."""
        return self._many("SELECT * FROM files WHERE state IN ('seen', 'hashed') ORDER BY id")

    def unlogged(self) -> list[Entry]:
        return self._many("SELECT * FROM files WHERE logged = 0 AND state IN ('judged', 'failed', 'duplicate') ORDER BY id")

    def finished(self, since: float = 0.0, *, history: bool = False) -> Iterator[Entry]:
        """Terminal rows updated at or after ``since`` (unix time), oldest first: the current record
        of each file version, and with ``history`` also the failures a later version superseded."""
        current = "" if history or not self._has_superseded() else " AND superseded_by IS NULL"
        yield from self._many("SELECT * FROM files WHERE state IN ('judged', 'failed', 'duplicate') AND updated_at >= ?"
                              + current + " ORDER BY updated_at, id", (since,))

    def superseded(self, entry_id: int) -> list[int]:
        """Ids of the earlier failures that row ``entry_id`` superseded."""
        if not self._has_superseded():
            return []
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM files WHERE superseded_by = ? ORDER BY id", (entry_id,))]

    def _has_superseded(self) -> bool:
        with self._lock:
            return any(r[1] == "superseded_by" for r in self._db.execute("PRAGMA table_info(files)"))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM files GROUP BY state")}

    # --- transitions ---------------------------------------------------------------------------

    def see(self, path: str, size: int, mtime_ns: int) -> tuple[Entry, bool]:
        """Record that ``path`` (with this size and mtime) is to be judged.

        Returns ``(entry, new)``; ``new`` is False when the same version of the file already has a
        row (terminal: nothing to do; active: resume it).
        """
        with self._lock:
            row = _entry(self._db.execute("SELECT * FROM files WHERE path = ? ORDER BY id DESC LIMIT 1",
                                          (path,)).fetchone())
            if row is not None and (row.state in ACTIVE or (row.size, row.mtime_ns) == (size, mtime_ns)):
                return row, False
            now = time.time()
            with self._transaction():  # the new row and the marks on the old ones: one commit
                cur = self._db.execute(
                    "INSERT INTO files (path, size, mtime_ns, state, seen_at, updated_at) VALUES (?, ?, ?, 'seen', ?, ?)",
                    (path, size, mtime_ns, now, now))
                marks = ",".join("?" * len(SUPERSEDABLE))
                # Also re-point rows that an earlier partial version had superseded: the newest
                # version lists every failure it replaces.
                self._db.execute(
                    f"UPDATE files SET superseded_by = ? WHERE path = ? AND id < ? AND state = 'failed' "
                    f"AND reason IN ({marks}) AND (superseded_by IS NULL OR superseded_by IN ("
                    f"SELECT id FROM files WHERE path = ? AND state = 'failed' AND reason IN ({marks})))",
                    (cur.lastrowid, path, cur.lastrowid, *SUPERSEDABLE, path, *SUPERSEDABLE))
            return _entry(self._db.execute("SELECT * FROM files WHERE id = ?", (cur.lastrowid,)).fetchone()), True  # type: ignore[return-value]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` around the block: a failure rolls it back cleanly
        (:meth:`_rollback`) and a storage error is a :class:`JournalError`."""
        try:
            _check_db_fault()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed: {exc}") from None

    def _rollback(self) -> None:
        """End a failed transaction. SQLite has already rolled it back itself after some errors (a
        full disk during COMMIT): then there is nothing to roll back, and no error to raise over the
        one that failed the transaction."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def retry_setup_failures(self) -> list[Entry]:
        """A new row (``seen``) for every current failure that the daemon's setup caused rather than
        the file (reason not in :data:`FILE_FAILURES`), superseding it: judged again once the
        setup is fixed, the failure kept as history. Returns the new rows."""
        marks = ",".join("?" * len(FILE_FAILURES))
        with self._lock:
            try:
                _check_db_fault()
                rows = [_entry(r) for r in self._db.execute(
                    f"SELECT * FROM files f WHERE state = 'failed' AND superseded_by IS NULL AND reason NOT IN ({marks}) "
                    "AND id = (SELECT MAX(id) FROM files WHERE path = f.path) ORDER BY id", tuple(FILE_FAILURES))]
            except sqlite3.Error as exc:
                raise JournalError(f"journal write failed: {exc}") from None
            if not rows:
                return []
            now, out = time.time(), []
            with self._transaction():
                for old in rows:
                    assert old is not None
                    cur = self._db.execute("INSERT INTO files (path, size, mtime_ns, state, seen_at, updated_at) "
                                           "VALUES (?, ?, ?, 'seen', ?, ?)", (old.path, old.size, old.mtime_ns, now, now))
                    self._db.execute("UPDATE files SET superseded_by = ? WHERE id = ?", (cur.lastrowid, old.id))
                    out.append(cur.lastrowid)
        return [e for i in out if (e := self.get(i)) is not None]

    def revise_version(self, entry_id: int, size: int, mtime_ns: int) -> None:
        """An unfinished row now describes what was found at its path when it was opened (e.g. a FIFO
        that replaced the queued file), so that seeing that same entry again is not a new version."""
        self._write("UPDATE files SET size = ?, mtime_ns = ?, updated_at = ? WHERE id = ? AND state IN ('seen', 'hashed')",
                    (size, mtime_ns, time.time(), entry_id))

    def mark_hashed(self, entry_id: int, sha256: str, size: int) -> None:
        self._write("UPDATE files SET sha256 = ?, size = ?, state = 'hashed', updated_at = ? WHERE id = ? AND state IN ('seen', 'hashed')",
                    (sha256, size, time.time(), entry_id))

    def finish(self, entry_id: int, state: str, record: dict, *, reason: str | None = None,
               duplicate_of: int | None = None, sha256: str | None = None) -> bool:
        """Commit a terminal state with its record (``logged = 0``). False if already terminal."""
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state}")
        args = (state, reason, duplicate_of, json.dumps(record, ensure_ascii=False, separators=(",", ":")), sha256,
                time.time(), entry_id)
        with self._lock:
            try:
                _check_db_fault()
                self._db.execute("PRAGMA synchronous=FULL")  # on disk before the verdict line is appended
                try:
                    cur = self._db.execute(
                        "UPDATE files SET state = ?, reason = ?, duplicate_of = ?, record = ?, "
                        "sha256 = COALESCE(?, sha256), logged = 0, updated_at = ? "
                        "WHERE id = ? AND state IN ('seen', 'hashed')", args)
                finally:
                    self._db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise JournalError(f"journal write failed: {exc}") from None
        return cur.rowcount == 1

    def mark_logged(self, entry_id: int) -> None:
        self._write("UPDATE files SET logged = 1 WHERE id = ?", (entry_id,))


def _connect_readonly(path: str) -> sqlite3.Connection:
    """``mode=ro``. Without a WAL file (no daemon running, every commit checkpointed) the database
    is opened ``immutable=1`` as well, which creates no WAL index: nothing is written, so this
    works on a read-only mount too."""
    from urllib.parse import quote

    if not os.path.isfile(path):
        raise sqlite3.OperationalError(f"no such file: {path}")
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    if not os.path.exists(path + "-wal"):
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)


class VerdictLog:
    """Append-only JSON-lines file; each record is one ``write`` of one line, then ``fsync``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._fd = private_file(self.path, 0o640, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise JournalError(f"cannot open the verdict log {self.path}: {exc.strerror or exc}") from None
        self._lock = threading.Lock()
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        """Drop a last line without its newline (a write cut short by a power loss)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            data = fh.read()
        os.truncate(self.path, data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            size = os.fstat(self._fd).st_size
            try:
                if (fault := _injected_fault()) is not None:
                    raise OSError(fault[1], os.strerror(fault[1]))
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
            except OSError as exc:
                try:  # a line cut short (the disk filled mid-write) is cut off: the retry appends it whole
                    os.ftruncate(self._fd, size)
                except OSError:
                    pass  # then the next open cuts the torn tail (_cut_torn_tail)
                raise JournalError(f"cannot append to the verdict log {self.path}: {exc}") from None

    def ids(self) -> set[int]:
        """Journal ids of the records already in the log."""
        out: set[int] = set()
        with open(self.path, "rb") as fh:
            for line in fh:
                try:
                    out.add(int(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue  # not one of ours; the log is for humans too
        return out

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


class Recorder:
    """Commits terminal states in the crash-safe order: journal, then log, then the logged mark."""

    def __init__(self, journal: Journal, log: VerdictLog | None) -> None:
        self.journal = journal
        self.log = log

    def commit(self, entry_id: int, state: str, record: dict[str, Any], **kw: Any) -> dict[str, Any] | None:
        """Record a terminal state; returns the record as written (with its ``id``), or None (and
        nothing written) if the entry was already terminal."""
        record = {"id": entry_id, **record}
        earlier = self.journal.superseded(entry_id)
        if earlier:
            record["supersedes"] = earlier
        if not self.journal.finish(entry_id, state, record, **kw):
            return None
        if os.environ.get(KILL_ENV) == "after_journal_commit":  # test-only fault injection (module docstring)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.log is not None:
            self.log.append(record)
        self.journal.mark_logged(entry_id)
        return record

    def repair(self) -> int:
        """After a crash: append the records committed to the journal but missing from the log."""
        pending = self.journal.unlogged()
        if not pending:
            return 0
        present = self.log.ids() if self.log is not None else set()
        appended = 0
        for e in pending:
            if self.log is not None and e.id not in present and e.record is not None:
                self.log.append(e.record)
                appended += 1
            self.journal.mark_logged(e.id)
        return appended
