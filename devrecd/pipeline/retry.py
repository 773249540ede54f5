"""Waiting on storage and on shutdown: :class:`StorageRetry` (journal and verdict-log writes retried
with backoff while they fail), :class:`Liveness` (when the pipeline last made progress) and
:class:`Stopped` (the pipeline stopped while a file waited).

Storage: when the journal or the verdict log cannot be written (a full disk, a read-only file
system), no file fails and no thread ends: the thread that needs the write (the watcher's submit,
a worker marking a file hashed, the writer committing records) waits and retries with exponential
backoff (:data:`STORAGE_RETRY_MAX_S` at most) until the write succeeds or the pipeline stops.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from devrecd.errors import DevrecdError
from devrecd.metrics import Metrics
from devrecd.pipeline.journal import JournalError

log = logging.getLogger("devrecd.pipeline")
STORAGE_RETRY_MIN_S = 0.2  # first wait after a failed journal/verdict-log write; doubles up to:
STORAGE_RETRY_MAX_S = 10.0


class Liveness:
    """When the pipeline last made progress (or was idle with nothing to do)."""

    def __init__(self) -> None:
        self._t = time.monotonic()

    def stamp(self) -> None:
        self._t = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self._t


class StorageRetry:
    """Writes to the journal and verdict log, retried with exponential backoff while they fail (a full
    disk, a read-only file system; module docstring): :attr:`error` says why meanwhile and
    ``devrecd_storage_writable`` is 0. Shared by the daemon (opening its state folder) and the
    pipeline's threads; ``stop`` ends the waiting (:class:`Stopped`)."""

    def __init__(self, metrics: Metrics, liveness: Liveness, stop: threading.Event) -> None:
        self.metrics, self.liveness, self.stop = metrics, liveness, stop
        self.error: str | None = None  # why the journal/verdict log cannot be written now
        self.retry_max_s = STORAGE_RETRY_MAX_S

    def __call__(self, write: Callable[[], Any], before_retry: Callable[[], Any] | None = None) -> Any:
        """``write()``, retried with backoff while it raises :class:`JournalError`; ``before_retry()``
        returns a result that makes the retry unnecessary (or None). Raises :class:`Stopped` when
        ``stop`` is set meanwhile."""
        delay, failed = STORAGE_RETRY_MIN_S, False
        while True:
            try:
                done = before_retry() if failed and before_retry is not None else None
                result = write() if done is None else done
            except JournalError as exc:
                failed = True
                self._failed(exc)
                if self.stop.wait(delay):
                    raise Stopped() from None
                delay = min(delay * 2, self.retry_max_s)
                continue
            if self.error is not None:
                self.error = None
                self.metrics.storage_writable.set(1)
                log.warning("the journal and verdict log can be written again: resuming")
            return result

    def _failed(self, exc: JournalError) -> None:
        if self.error is None:
            log.error("cannot write the journal or verdict log: files wait until it can be written",
                      extra={"error": str(exc)})
            self.metrics.errors.labels(reason="journal").inc()
        self.error = str(exc)
        self.metrics.storage_writable.set(0)
        self.liveness.stamp()  # waiting on storage on purpose: alive (not ready)


class Stopped(DevrecdError):
    """Shutting down while a file waited for the batcher or for storage; it stays unfinished in the journal."""

    reason = "stopped"

    def __init__(self, message: str = "stopped while waiting (the file stays unfinished, resumed at the next start)") -> None:
        super().__init__(message)
