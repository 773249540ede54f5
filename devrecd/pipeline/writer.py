"""The verdict writer: the one thread that turns the stages' messages into verdict records and
commits them, in groups, to the journal and the verdict log (:class:`~devrecd.pipeline.journal.Recorder`).

Group commit: the writer takes every message waiting when it wakes (up to :data:`GROUP_MAX`),
builds each finished file's record, and commits them together: one journal transaction synced to
disk, one append + fsync of the verdict log, one logged mark, whatever the number of verdicts
(the exactly-once order is :mod:`devrecd.pipeline.journal`'s). Under a backlog the fsyncs are paid
once per group instead of once per file; a lone file is a group of one, written at once.

A file leaves the in-flight bookkeeping only once its group is committed, so a worker that hashes
the same content meanwhile still sees it in flight; and before the writer asks the journal which
file of a shared content was judged first, it commits what it holds (the answer may be in it).
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any, Callable

import numpy as np

from devrecd.pipeline.jobs import Chunk, Duplicate, Failed, FeaturesDone, Job, Judged, Message, Scored, Stop
from devrecd.pipeline.journal import TERMINAL, Entry, JournalError, Terminal
from devrecd.pipeline.retry import Stopped
from devrecd.pipeline.verdict import duplicate_record, failed_record, judged_record, open_set_record, with_comparison

log = logging.getLogger("devrecd.pipeline")
GROUP_MAX = 64  # verdicts committed together at most (one transaction, one fsync of each file)


class VerdictWriter:
    """The writer thread's work for ``owner`` (the :class:`~devrecd.pipeline.runner.Pipeline`: its
    result queue, recorder, storage retry, metrics, in-flight bookkeeping and settings)."""

    def __init__(self, owner: Any) -> None:
        self.p = owner
        self._items: list[Terminal] = []  # the group being gathered: records not yet committed
        self._after: list[Callable[[dict], None]] = []  # per item: what follows its commit
        self._jobs: list[tuple[Job, float]] = []  # finished files of the group, with their seconds in the writer

    def run(self) -> None:
        results: queue.Queue[Message] = self.p._results
        while True:
            msgs = [results.get()]
            while len(msgs) < GROUP_MAX and not isinstance(msgs[-1], Stop):
                try:
                    msgs.append(results.get_nowait())
                except queue.Empty:
                    break
            for msg in msgs:
                if not isinstance(msg, Stop):
                    self._take(msg)
            self._flush()
            if isinstance(msgs[-1], Stop):
                return

    def _take(self, msg: Judged | Chunk | FeaturesDone | Scored | Duplicate | Failed) -> None:
        """Build one message's record into the group (or keep a chunk until its file is complete)."""
        job, t0, finished = msg.job, time.perf_counter(), True
        try:
            finished = not job.closed and self._write(msg)  # closed: a chunk of a file whose record is written
        except Stopped:
            pass  # stopped while the journal could not be written: resumed (or repaired) at the next start
        except JournalError as exc:  # the row stays unfinished and is judged again after a restart
            log.error("cannot record a verdict", extra={"path": job.path, "error": str(exc)})
            self.p.metrics.errors.labels(reason="journal").inc()
        except Exception:  # noqa: BLE001
            log.exception("internal error while recording a verdict", extra={"path": job.path})
            self.p.metrics.errors.labels(reason="internal").inc()
        spent = time.perf_counter() - t0
        if finished:
            job.closed = True  # results still arriving for it are dropped
            self._jobs.append((job, spent))
        else:
            self.p.metrics.stage_seconds.labels(stage="writer").observe(spent)

    def _flush(self) -> None:
        """Commit the group (retried while storage fails), then count its verdicts and release its files."""
        items, after, jobs = self._items, self._after, self._jobs
        self._items, self._after, self._jobs = [], [], []
        t0 = time.perf_counter()
        try:
            if items:
                for record, then in zip(self._commit(items), after):
                    if record is not None:
                        self._then(then, record)
        except Stopped:
            pass  # the group stays unfinished in the journal (or is repaired): the next start finishes it
        except JournalError as exc:
            log.error("cannot record verdicts", extra={"files": len(items), "error": str(exc)})
            self.p.metrics.errors.labels(reason="journal").inc()
        except Exception:  # noqa: BLE001
            log.exception("internal error while recording verdicts", extra={"files": len(items)})
            self.p.metrics.errors.labels(reason="internal").inc()
        finally:
            spent = time.perf_counter() - t0
            for job, built in jobs:
                self.p.metrics.stage_seconds.labels(stage="writer").observe(built + spent)
                self.p._release(job)
            self.p.liveness.stamp()

    def _then(self, then: Callable[[dict], None], record: dict) -> None:
        try:
            then(record)
        except Exception:  # noqa: BLE001 - one callback's surprise must not lose the group's others
            log.exception("internal error after recording a verdict", extra={"path": record.get("path")})
            self.p.metrics.errors.labels(reason="internal").inc()

    def _commit(self, items: list[Terminal]) -> list[dict | None]:
        """:meth:`Recorder.commit_many`, retried while storage fails. Records whose journal part went
        through before a verdict-log append failed are finished by the repair, not committed twice."""
        recorder, done = self.p.recorder, {}  # entry id -> the record as written, or None

        def attempt() -> list[dict | None]:
            todo = [it for it in items if it.entry_id not in done]
            done.update(zip((it.entry_id for it in todo), recorder.commit_many(todo)))
            return [done[it.entry_id] for it in items]

        def repaired() -> list[dict | None] | None:
            recorder.repair()  # appends the records the journal holds, unless the log has them
            for it in items:
                entry = None if it.entry_id in done else recorder.journal.get(it.entry_id)
                if entry is not None and entry.state in TERMINAL and entry.logged:
                    done[it.entry_id] = entry.record
            return [done[it.entry_id] for it in items] if len(done) == len(items) else None

        return self.p.storage(attempt, before_retry=repaired)

    def _add(self, item: Terminal, then: Callable[[dict], None]) -> None:
        self._items.append(item)
        self._after.append(then)

    def _judged_first(self, job: Job) -> Entry | None:
        """The file judged first with ``job``'s content while both were in flight, if any."""
        p = self.p
        if p.rejudge or job.content is None:
            return None
        with p._lock:
            shared = job.content in p._shared
        if not shared:
            return None
        if self._items:  # the first may be in the group: committed before the journal is asked
            self._flush()
        return p.journal.judged_with(job.content, exclude=job.entry_id)

    def _write(self, msg: Judged | Chunk | FeaturesDone | Scored | Duplicate | Failed) -> bool:
        """Add one result's record to the group; False while a chunked file still waits for more of its windows."""
        job, p = msg.job, self.p
        if isinstance(msg, Chunk):
            job.chunks.append((msg.first, msg.probs))
            job.windows_done += len(msg.probs)
            job.infer_seconds += msg.infer_seconds
            job.started = msg.started if job.started is None else min(job.started, msg.started)
            return self._finish_chunked(job)
        if isinstance(msg, FeaturesDone):
            job.windows = msg.windows
            return self._finish_chunked(job)
        job.timings["end_to_end"] = time.monotonic() - job.taken
        if isinstance(msg, (Judged, Scored)):
            assert job.recording is not None
            original = self._judged_first(job)
            if original is not None:  # an identical file finished first while this one was in flight
                return self._write(Duplicate(job, original))
            if isinstance(msg, Judged):
                assert job.starts is not None
                record = judged_record(job.recording, msg.probs, p.labels, job.starts, k=p.cfg.watch.top_k,
                                       backend=p.backend_info, timings=job.timings)
                # open set: the registry's verdict, the closed-set one kept beside it
                record = with_comparison(record, job.recording, job.open_set, p.validation)
            else:
                record = open_set_record(job.recording, msg.fields, serving=p.backend_info, timings=job.timings)
            self._add(Terminal(job.entry_id, "judged", record, sha256=job.recording["sha256"]),
                      lambda committed: self._judged(job, committed))
        elif isinstance(msg, Duplicate):
            record = duplicate_record(job.recording or {"path": job.path}, msg.original.record or {"id": msg.original.id},
                                      timings=job.timings)
            self._add(Terminal(job.entry_id, "duplicate", record, duplicate_of=msg.original.id,
                               sha256=(job.recording or {}).get("sha256")),
                      lambda committed: self._duplicate(job, msg.original, committed))
        else:
            f = msg.failure
            rec = job.recording or {}
            record = failed_record(job.path, f.reason, f.detail, timings=job.timings,
                                   sha256=f.sha256 if f.sha256 is not None else rec.get("sha256"),
                                   size=f.size if f.size is not None else rec.get("size"),
                                   resolved_path=job.resolved_path)
            self._add(Terminal(job.entry_id, "failed", record, reason=f.reason, sha256=record["sha256"]),
                      lambda committed: self._failed(job, f, committed))
        return True

    def _finish_chunked(self, job: Job) -> bool:
        """Judge a chunked file once every window's probabilities are in; False until then."""
        if job.windows is None or job.windows_done < job.windows:
            return False
        job.chunks.sort(key=lambda c: c[0])
        probs = np.concatenate([p for _, p in job.chunks])
        job.chunks = []
        if len(probs) != job.windows:
            raise RuntimeError(f"gathered {len(probs)} window probabilities for {job.windows} windows")
        enqueued = job.enqueued if job.enqueued is not None else time.monotonic()
        job.timings["queue"] = max(0.0, (job.started or enqueued) - enqueued)
        job.timings["inference"] = job.infer_seconds
        return self._write(Judged(job, probs))

    # --- after a commit ------------------------------------------------------------------------

    def _judged(self, job: Job, committed: dict) -> None:
        assert job.recording is not None
        self._count("judged", job, committed)
        self.p.metrics.verdicts.labels(device=committed["device"]).inc()
        self.p.metrics.audio_seconds.inc(job.recording["duration"])
        log.debug("judged", extra={"path": job.path, "device": committed["device"], "score": committed["score"]})

    def _duplicate(self, job: Job, original: Entry, committed: dict) -> None:
        self._count("duplicate", job, committed)
        log.info("duplicate", extra={"path": job.path, "of": original.path})

    def _failed(self, job: Job, f: Any, committed: dict) -> None:
        self._count("failed", job, committed)
        self.p.metrics.errors.labels(reason=f.reason).inc()
        log.warning("cannot judge file", extra={"path": job.path, "reason": f.reason, "detail": f.detail,
                                                "sha256": committed["sha256"]})

    def _count(self, outcome: str, job: Job, record: dict) -> None:
        self.p.metrics.files.labels(outcome=outcome).inc()
        for stage, seconds in job.timings.items():
            self.p.metrics.stage_seconds.labels(stage=stage).observe(seconds)
        if self.p.on_record is not None:
            self.p.on_record(record)
