"""The journal's SQLite store: durable per-file job state (WAL), its rows and transitions.

States: ``seen`` -> ``hashed`` -> one terminal state: ``judged``, ``failed`` (with a reason) or
``duplicate`` (same content as an earlier judged file). A row is keyed by the file's path and, once
read, its content sha256; size and mtime tell a file that changed at the same path from one seen before.

One current record per path: when a file failed as ``corrupt``/``too_short``/... (typically a copy
still in progress) and a later version of it arrives, the earlier failures are marked
``superseded_by`` the new row; they stay in the journal as history (``devrecd verdicts --history``)
and the new record lists them under ``supersedes``.

The schema carries a version (``PRAGMA user_version``); opening an older journal read-write migrates
it, opening it read-only (:meth:`Journal.open_readonly`, for export from a read-only mount) never writes.

Concurrency: writes go through one connection under one lock; reads through a connection per thread
(WAL: a reader never waits for the writer and sees every commit made before its statement began),
so lookups do not queue behind a commit's fsync. Terminal states are committed in groups
(:meth:`Journal.finish_many`: one transaction, one fsync); the exactly-once order with the verdict
log is :mod:`devrecd.pipeline.journal`'s.

State files are created 0600 (journal) / 0640 (verdict log) whatever the umask. A write that fails
(full disk, read-only file system) raises :class:`JournalError` and changes nothing (the transaction
is rolled back); the runner waits and retries (:class:`~devrecd.pipeline.retry.StorageRetry`).
Test-only: with ``DEVRECD_TEST_STORAGE_FAULT=full:FLAG`` (or ``readonly:FLAG``) every write to the
journal and the verdict log fails as on a full disk (a read-only file system) while the file FLAG
exists (opening the journal for writing included). Nothing else reads that variable.

Failures and who caused them: a ``failed`` row whose reason is a file's (:data:`FILE_FAILURES`: the
audio errors of :mod:`devrecd.audio.errors`) is final for that version of the file; any other reason
(``internal``, ``inference``, ``registry``, ...) came from the daemon's own setup, and
:meth:`Journal.retry_setup_failures` gives such files a new row at the next start (the failure
stays as history, superseded by the new record).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from devrecd.audio.errors import AudioError
from devrecd.errors import DevrecdError
from devrecd.fsutil import private_file

TERMINAL = ("judged", "failed", "duplicate")
ACTIVE = ("seen", "hashed")
SCHEMA_VERSION = 1
# Failures that a later, complete version of the same file replaces (a copy still in progress).
SUPERSEDABLE = ("corrupt", "too_short", "empty", "missing", "changed", "too_long")
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

MAX_READERS = 16  # read connections at most (the pipeline's threads); then the shared one
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


@dataclass(frozen=True)
class Terminal:
    """A terminal state to commit for row ``entry_id`` (:meth:`Journal.finish_many`), with its record."""

    entry_id: int
    state: str
    record: dict
    reason: str | None = None
    duplicate_of: int | None = None
    sha256: str | None = None
    extra: dict = field(default_factory=dict, compare=False)  # not stored: the caller's bookkeeping


def _entry(row: sqlite3.Row | None) -> Entry | None:
    if row is None:
        return None
    d = dict(row)
    d["record"] = json.loads(d["record"]) if d["record"] else None
    d["logged"] = bool(d["logged"])
    d.setdefault("superseded_by", None)  # a version-0 journal read without migration
    return Entry(**d)


class Journal:
    """The SQLite journal. Thread-safe: writes through one connection behind a lock, reads through a
    connection per thread (module docstring; one shared connection for ``:memory:`` and read-only)."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = str(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's read connection
        self._readers: list[sqlite3.Connection] = []  # to close (under their own lock: never the writer's)
        self._readers_lock = threading.Lock()
        self._shared_reads = readonly or self.path == ":memory:"
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
            self._superseded_column = any(r[1] == "superseded_by" for r in self._db.execute("PRAGMA table_info(files)"))
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
        with self._lock, self._readers_lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
            self._db.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's read connection (WAL: it never waits for the writer), or the one shared
        connection under the lock (``:memory:``, read-only)."""
        if self._shared_reads:
            with self._lock:
                yield self._db
            return
        db = getattr(self._local, "db", None)
        if db is None and len(self._readers) >= MAX_READERS:  # threads come and go: no connection each
            with self._lock:
                yield self._db
            return
        if db is None:
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
                db.execute("PRAGMA query_only = ON")
            except sqlite3.Error as exc:
                raise JournalError(f"cannot open the journal {self.path}: {exc}") from None
            db.row_factory = sqlite3.Row
            with self._readers_lock:
                self._readers.append(db)
            self._local.db = db
        yield db

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Every row of one query, read to the end (no read transaction is left open)."""
        with self._reading() as db:
            return db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> Entry | None:
        rows = self._rows(sql, args)
        return _entry(rows[0]) if rows else None

    def _many(self, sql: str, args: tuple = ()) -> list[Entry]:
        return [_entry(r) for r in self._rows(sql, args)]  # type: ignore[misc]

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
        current = "" if history or not self._superseded_column else " AND superseded_by IS NULL"
        yield from self._many("SELECT * FROM files WHERE state IN ('judged', 'failed', 'duplicate') AND updated_at >= ?"
                              + current + " ORDER BY updated_at, id", (since,))

    def superseded(self, entry_id: int) -> list[int]:
        """Ids of the earlier failures that row ``entry_id`` superseded."""
        if not self._superseded_column:
            return []
        return [r[0] for r in self._rows("SELECT id FROM files WHERE superseded_by = ? ORDER BY id", (entry_id,))]

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._rows("SELECT state, COUNT(*) FROM files GROUP BY state")}

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
        return self.finish_many([Terminal(entry_id, state, record, reason, duplicate_of, sha256)])[0]

    def finish_many(self, items: Sequence[Terminal]) -> list[bool]:
        """Commit terminal states with their records (``logged = 0``) in one transaction, synced to
        disk (``synchronous=FULL``: one fsync for the group) before any verdict line is appended.
        For each item: False if its row was already terminal (nothing changed for it)."""
        for it in items:
            if it.state not in TERMINAL:
                raise ValueError(f"not a terminal state: {it.state}")
        now = time.time()
        rows = [(it.state, it.reason, it.duplicate_of, json.dumps(it.record, ensure_ascii=False, separators=(",", ":")),
                 it.sha256, now, it.entry_id) for it in items]
        with self._lock:
            try:
                _check_db_fault()
                self._db.execute("PRAGMA synchronous=FULL")  # on disk before the verdict lines are appended
                try:
                    with self._transaction():
                        return [self._db.execute(
                            "UPDATE files SET state = ?, reason = ?, duplicate_of = ?, record = ?, "
                            "sha256 = COALESCE(?, sha256), logged = 0, updated_at = ? "
                            "WHERE id = ? AND state IN ('seen', 'hashed')", args).rowcount == 1 for args in rows]
                finally:
                    self._db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise JournalError(f"journal write failed: {exc}") from None

    def mark_logged(self, entry_id: int) -> None:
        self.mark_logged_many([entry_id])

    def mark_logged_many(self, entry_ids: Sequence[int]) -> None:
        """Rows whose records are in the verdict log: one transaction (not synced: a crash that
        loses it only makes the next start check the log for those records)."""
        ids = list(entry_ids)
        if not ids:
            return
        with self._lock, self._transaction():
            for i in range(0, len(ids), 500):  # well under SQLite's bound on parameters
                part = ids[i : i + 500]
                self._db.execute(f"UPDATE files SET logged = 1 WHERE id IN ({','.join('?' * len(part))})", part)


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

