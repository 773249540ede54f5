"""Exactly once: the journal (:mod:`devrecd.pipeline.journal_store`), the append-only verdict log
(JSONL) and the :class:`Recorder` that commits a verdict to both, in this order.

Exactly once, across kill -9, in groups: the terminal states and full records of a group of verdicts
are committed to the journal FIRST, in one transaction synced to disk (``logged = 0``); then the
group's records are appended to the verdict log as one ``write`` + one ``fsync``; then their rows
are marked ``logged = 1`` (one transaction). A crash before the commit leaves the rows non-terminal
(judged again on restart, nothing was written); a crash after it leaves ``logged = 0``, and
:meth:`Recorder.repair` appends on restart each record the log does not already hold (a crash
during or after the append: the lines written whole are in the log, a torn last line is cut off
before appending). A record is in the log iff its row is terminal, once repaired; a group is one
verdict or many (the writer commits whatever verdicts are ready together: one fsync of each file
for all of them).

Test-only fault injection: with ``DEVRECD_TEST_KILL_AT=after_journal_commit`` in the environment the
process SIGKILLs itself between the journal commit and the verdict-log append; with
``DEVRECD_TEST_KILL_AT=inside_log_append`` it SIGKILLs itself in the append of a group of two or
more records, after writing the first record's line and half of the second's (a torn group), so
that tests can show the repair on restart. Nothing else reads that variable (the storage faults:
:mod:`devrecd.pipeline.journal_store`). A verdict-log append that fails (full disk) cuts what it
wrote off the log again and raises :class:`JournalError`.

The verdict log and the Recorder stay in one module: the exactly-once order above is only checkable
when read together. The journal's names are importable from here too.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

from devrecd.fsutil import private_file
from devrecd.pipeline.journal_store import (  # noqa: F401 - the journal's names, importable from here
    ACTIVE, FAULT_ENV, FILE_FAILURES, JOURNAL_NAME, SCHEMA_VERSION, SUPERSEDABLE, TERMINAL, VERDICT_LOG_NAME, Entry,
    Journal, JournalError, Terminal, _injected_fault)

KILL_ENV = "DEVRECD_TEST_KILL_AT"


def _line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class VerdictLog:
    """Append-only JSON-lines file; each append (one record or a group) is one ``write``, then ``fsync``."""

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
        self.append_many([record])

    def append_many(self, records: Sequence[dict]) -> None:
        """Append ``records`` as one write and one fsync; on failure nothing of them stays in the log."""
        lines = [_line(r) for r in records]
        if not lines:
            return
        data = b"".join(lines)
        with self._lock:
            size = os.fstat(self._fd).st_size
            try:
                if (fault := _injected_fault()) is not None:
                    raise OSError(fault[1], os.strerror(fault[1]))
                if len(lines) > 1 and os.environ.get(KILL_ENV) == "inside_log_append":  # test-only (module docstring)
                    os.write(self._fd, data[: len(lines[0]) + len(lines[1]) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(f"short write ({written} of {len(data)} bytes)")
                os.fsync(self._fd)
            except OSError as exc:
                try:  # lines cut short (the disk filled mid-write) are cut off: the retry appends them whole
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
        return self.commit_many([Terminal(entry_id, state, record, **kw)])[0]

    def commit_many(self, items: Sequence[Terminal]) -> list[dict[str, Any] | None]:
        """Record a group of terminal states (module docstring: one journal transaction, one log
        append, one logged mark); for each, the record as written, or None if it was already terminal."""
        group = []
        for it in items:
            record = {"id": it.entry_id, **it.record}
            earlier = self.journal.superseded(it.entry_id)
            if earlier:
                record["supersedes"] = earlier
            group.append(Terminal(it.entry_id, it.state, record, it.reason, it.duplicate_of, it.sha256))
        done = self.journal.finish_many(group)
        if any(done) and os.environ.get(KILL_ENV) == "after_journal_commit":  # test-only fault injection (module docstring)
            os.kill(os.getpid(), signal.SIGKILL)
        written = [t.record for t, ok in zip(group, done) if ok]
        if self.log is not None:
            self.log.append_many(written)
        self.journal.mark_logged_many([r["id"] for r in written])
        return [t.record if ok else None for t, ok in zip(group, done)]

    def repair(self) -> int:
        """After a crash: append the records committed to the journal but missing from the log."""
        pending = self.journal.unlogged()
        if not pending:
            return 0
        present = self.log.ids() if self.log is not None else set()
        missing = [e.record for e in pending if self.log is not None and e.id not in present and e.record is not None]
        if self.log is not None:
            self.log.append_many(missing)  # type: ignore[arg-type]
        self.journal.mark_logged_many([e.id for e in pending])
        return len(missing)
