"""What travels through the runner: a file's :class:`Job`, and the typed messages the stages hand
the writer thread (:class:`Judged`, :class:`Chunk`, :class:`FeaturesDone`, :class:`Scored`, :class:`Duplicate`,
:class:`Failed`, :class:`Stop`); :func:`found_instead`: a failed job's journal row keyed as the watcher keys
what is at its path now."""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from devrecd.pipeline.journal import Entry, Journal, JournalError
from devrecd.stages import Failure

log = logging.getLogger("devrecd.pipeline")


@dataclass
class Job:
    """One file on its way through the pipeline."""

    entry_id: int
    path: str
    taken: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    recording: dict | None = None
    starts: np.ndarray | None = None  # window start times (s)
    resolved_path: str | None = None  # where a followed symbolic link led (also for failures)
    content: str | None = None  # sha256 while the runner counts it among the contents in flight
    sha256: str | None = None  # of the whole file, once it was opened and hashed (kept for a later failure)
    size: int | None = None
    open_set: dict | None = None  # the registry's verdict fields, beside the closed-set one
    # Judged by the closed-set model alone, a file goes to the batcher in chunks as its features are
    # computed (its features are never held whole). The writer gathers the chunks' window
    # probabilities here until all ``windows`` (known once the last chunk was computed) are in.
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first window, probabilities)
    windows_done: int = 0
    windows: int | None = None
    started: float | None = None  # monotonic time its first window entered a batch
    infer_seconds: float = 0.0
    enqueued: float | None = None  # (worker) monotonic time its first chunk was queued
    blocked: float = 0.0  # (worker) seconds spent waiting for room in the batcher: not decoding
    closed: bool = False  # (writer) its record is written: results still arriving for it are dropped


@dataclass(frozen=True)
class Judged:
    """Closed-set window probabilities of a file (and its open-set fields on the job)."""

    job: Job
    probs: np.ndarray


@dataclass(frozen=True)
class Chunk:
    """Closed-set window probabilities of one chunk of a file, from window ``first`` on."""

    job: Job
    first: int
    probs: np.ndarray
    started: float  # monotonic time its first window entered a batch
    infer_seconds: float


@dataclass(frozen=True)
class FeaturesDone:
    """The last chunk of a file was queued: it has ``windows`` windows in all."""

    job: Job
    windows: int


@dataclass(frozen=True)
class Scored:
    """Open set only: the registry's verdict fields are the verdict."""

    job: Job
    fields: dict


@dataclass(frozen=True)
class Duplicate:
    """The same content was judged before as ``original``."""

    job: Job
    original: Entry


@dataclass(frozen=True)
class Failed:
    """The file cannot be judged."""

    job: Job
    failure: Failure


@dataclass(frozen=True)
class Stop:
    """The writer's last message."""


Message = Union[Judged, Chunk, FeaturesDone, Scored, Duplicate, Failed, Stop]


def found_instead(journal: Journal, job: Job) -> None:
    """Nothing could be read, and what is at the path is not a regular file (a FIFO, socket or
    link that replaced the queued file): the row takes that entry's version (``lstat``, as the
    watcher keys such entries) before its failure is recorded, so the watcher seeing the same
    entry does not make a second row and a second record for it."""
    try:
        if stat.S_ISREG(os.stat(job.path).st_mode):
            return  # a regular file: the row's version is the watcher's, nothing to revise
    except OSError:
        pass  # a link loop or a dangling link: keyed by lstat too
    try:
        st = os.lstat(job.path)
    except OSError:
        return  # nothing there any more: nothing the watcher can see again
    try:
        journal.revise_version(job.entry_id, st.st_size, st.st_mtime_ns)
    except JournalError as exc:  # at worst the entry gets a second record when it is seen again
        log.warning("cannot revise a journal row", extra={"path": job.path, "error": str(exc)})
