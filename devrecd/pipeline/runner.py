"""The runner: bounded queues, decode + feature workers, inference threads, one verdict writer.

::

    submit(path) -> jobs (bounded)
      -> workers (watch.workers): open read-only, hash, decode block by block, features (stages),
                                  dedupe against the journal, open-set verdict (registry.path)
      -> Batcher (bounded) -> inference threads (batcher.streams): backend.infer on batches across files
                              (each file's features in chunks, as they are computed)
      -> messages -> writer thread: verdict record, journal + verdict log (Recorder), metrics

The stages hand the writer typed messages (:class:`Judged`, :class:`Chunk`, :class:`FeaturesDone`,
:class:`Scored`, :class:`Duplicate`, :class:`Failed`, :class:`Stop`). Every terminal state is written by the one writer thread, so the
journal and verdict-log ordering needs no further locking; the writer only writes: scoring, open set
included, runs in the parallel stages, and a file's features are released once they are inferred.
A bad file becomes a ``failed`` record with its reason and never stops the other files.

Storage: when the journal or the verdict log cannot be written (a full disk, a read-only file
system), no file fails and no thread ends: the thread that needs the write (the watcher's submit,
a worker marking a file hashed, the writer committing a record) waits and retries with exponential
backoff (:data:`STORAGE_RETRY_MAX_S` at most; :class:`StorageRetry`, through which the daemon also
opens its state folder) until the write succeeds or the pipeline stops.
Meanwhile :attr:`Pipeline.storage_error` says why (``/readyz`` is 503, ``devrecd_storage_writable``
0); once space returns everything resumes by itself, each file with exactly one record.

Chunks: judged by the closed-set model alone, a file's features go to the batcher chunk by chunk as
the worker computes them, so no file's features are ever held whole; the writer gathers each chunk's
window probabilities (:class:`Chunk`) and judges the file once the worker has said how many windows
it has (:class:`FeaturesDone`) and all of them are in. A registry's scorer takes the same chunks
as they are computed where it has an accumulator (every kind has: GSV supervector statistics are
sums over frames, an embedder's recording vector a sum of window embeddings, a fusion both), open
set only or beside the model alike, so no file's features are held whole in any mode; only a
scorer without an accumulator would take a file's features whole (and its file the batcher in one unit).

Duplicates: a worker asks the journal once per file whether the same content was judged before.
Two files of the same content in flight at once are both inferred; the writer then asks the journal
again for the second to finish, and only for such contents.

Open set only (:class:`~devrecd.pipeline.serving.OpenSetOnly`): no network is loaded and no batcher
runs; each worker hands its features to the registry's scorer and the writer records its verdict.

Longer than most modules on purpose: the three kinds of thread share the in-flight bookkeeping
(files and contents in flight, under one lock), which is clearest read in one place.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.audio import open_stream
from devrecd.backends.base import Backend
from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.metrics import Metrics
from devrecd.pipeline.batcher import Batcher, Unit
from devrecd.pipeline.jobs import Chunk, Duplicate, Failed, FeaturesDone, Job, Judged, Message, Scored, Stop
from devrecd.pipeline.journal import TERMINAL, Entry, Journal, JournalError, Recorder, VerdictLog
from devrecd.pipeline.serving import Judge, OpenSetOnly, RegistryJudging
from devrecd.pipeline.verdict import duplicate_record, failed_record, judged_record, open_set_record, with_comparison
from devrecd.stages import Failure, failure_of, stream_features

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


class Pipeline:
    """Judges submitted files once each; see the module docstring."""

    def __init__(self, cfg: Config, backend: Backend | OpenSetOnly, *, journal: Journal, verdict_log: VerdictLog | None,
                 metrics: Metrics, device: str = "cpu", rejudge_duplicates: bool | None = None,
                 on_record: Callable[[dict], None] | None = None, liveness: Liveness | None = None,
                 judge: RegistryJudging | None = None, roots: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        # Watched folders: symbolic links leading out of them are refused unless
        # watch.follow_external_links (None: files named by the user, followed anywhere).
        self.roots = list(roots) if roots is not None else None
        if isinstance(backend, OpenSetOnly):  # the registry's verdict alone, on the scorer's own frontend
            judge = backend.registry_judge
            self.cfg = cfg = replace(cfg, frontend=backend.frontend)
        # The open-set verdict against the device registry (registry.path), if configured, and its
        # scorer's accumulator (features taken chunk by chunk), if it has one.
        self.judge: Judge | None = judge.judge if judge is not None else None
        self.accumulator: Callable[[], Any] | None = judge.accumulator if judge is not None else None
        self.backend = backend
        self.labels = tuple(backend.labels)
        self.backend_info = backend.describe()
        self.journal = journal
        self.recorder = Recorder(journal, verdict_log)
        self.metrics = metrics
        self.device = device
        # A GPU backend takes CUDA tensors in place: the frontend's output then stays on the GPU.
        self.keep_on_device = str(device).startswith("cuda") and str(getattr(backend, "input_device", "") or "") \
            .startswith("cuda")
        # Open set only with the scorer on that GPU (the GSV scorer in torch): the features stay there too.
        self.judge_on_device = self.keep_on_device and isinstance(backend, OpenSetOnly)
        self.rejudge = cfg.watch.rejudge_duplicates if rejudge_duplicates is None else rejudge_duplicates
        self.on_record = on_record
        self.liveness = liveness or Liveness()
        # None in the job queue is a wake-up (stop), not a file.
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, cfg.watch.queue_size))
        self._results: queue.Queue[Message] = queue.Queue()  # bounded in effect: fed only by bounded stages
        self._inflight: dict[int, float] = {}
        self._contents: dict[str, int] = {}  # sha256 -> files of that content in flight
        self._shared: set[str] = set()  # contents two files in flight had at once
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when nothing is in flight any more
        self._stop = threading.Event()  # workers/inference: no new work
        self._threads: list[threading.Thread] = []
        self._writer: threading.Thread | None = None
        self.streams = 0
        self._blas_limits: Any = None  # BLAS held to one thread while the pipeline runs (start/stop)
        self.batcher: Batcher | None = None  # open set only: nothing runs on batches
        if not isinstance(backend, OpenSetOnly):
            self.batcher = Batcher(backend.infer, max_batch=cfg.batcher.max_batch, max_wait_s=cfg.batcher.max_wait_ms / 1000,
                                   queue_size=cfg.watch.queue_size, max_clips=cfg.batcher.max_queued_clips,
                                   on_batch=self._on_batch, on_progress=self._tick)
        self.storage = StorageRetry(metrics, self.liveness, self._stop)  # journal/verdict-log writes, retried
        self.extra_pending: Callable[[], int] = lambda: 0  # files sources hold that are not yet admitted
        metrics.queue_depth.set_function(lambda: self.in_flight() + self.extra_pending())
        metrics.oldest_pending_age.set_function(self._oldest_age)

    # --- public --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker, inference and writer threads."""
        self._blas_limits = one_blas_thread()
        for i in range(max(1, self.cfg.watch.workers)):
            self._threads.append(threading.Thread(target=self._worker, name=f"devrecd-decode-{i}", daemon=True))
        self.streams = 0 if self.batcher is None else inference_streams(self.cfg, self.backend)
        for i in range(self.streams):
            self._threads.append(threading.Thread(target=self._infer_loop, name=f"devrecd-infer-{i}", daemon=True))
        self._writer = threading.Thread(target=self._writer_loop, name="devrecd-writer", daemon=True)
        for t in self._threads:
            t.start()
        self._writer.start()

    def submit(self, path: str, size: int | None = None, mtime_ns: int | None = None) -> int | None:
        """Admit a file (blocking while the pipeline is full). Returns its journal id, or None if it
        needs nothing (this version was finished before, or it is already in flight)."""
        if size is None or mtime_ns is None:
            try:
                st = os.stat(path)
                size, mtime_ns = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime_ns = -1, 0  # judged as missing/unreadable by the worker, with the reason
        try:
            entry, _ = self.storage(lambda: self.journal.see(path, size, mtime_ns))
        except Stopped:
            return None  # not recorded: the watcher's next start finds the file again
        if entry.state not in ("seen", "hashed"):
            return None
        return entry.id if self._enqueue(Job(entry.id, path)) else None

    def resume(self) -> int:
        """Re-admit every file the journal has as unfinished (after a crash or a drain timeout)."""
        n = 0
        for entry in self.journal.active():
            n += bool(self._enqueue(Job(entry.id, entry.path)))
        return n

    def vanished(self, path: str, size: int, mtime_ns: int) -> None:
        """A file disappeared before it was stable: recorded as failed (missing), like any bad file."""
        try:
            entry, _ = self.storage(lambda: self.journal.see(path, size, mtime_ns))
        except Stopped:
            return
        if entry.state in ("seen", "hashed") and self._track(entry.id):
            self._results.put(Failed(Job(entry.id, path), Failure("missing", "the file disappeared before it was complete")))

    @property
    def storage_error(self) -> str | None:
        """Why the journal or verdict log cannot be written now (None while writes succeed)."""
        return self.storage.error

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is in flight; True when drained within ``timeout`` seconds."""
        with self._settled:
            # Beyond threading.TIMEOUT_MAX (~292 years) a wait raises OverflowError: no limit then.
            return self._settled.wait_for(lambda: not self._inflight,
                                          None if timeout >= threading.TIMEOUT_MAX else max(0.0, timeout))

    def stop(self) -> None:
        """Stop every thread; unfinished files stay unfinished in the journal (resumed next start)."""
        self._stop.set()
        # Wake the threads blocked on an empty queue now rather than at their next poll.
        for _ in range(max(1, self.cfg.watch.workers)):
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                break  # the others see the stop after their file, or at their next poll
        if self.batcher is not None:
            self.batcher.wake(self.streams)
        for t in self._threads:
            t.join(timeout=10)
        self._results.put(Stop())
        if self._writer is not None:
            self._writer.join(timeout=10)
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
            self._blas_limits = None

    def reconfigure(self, cfg: Config) -> None:
        """Apply reloadable settings (SIGHUP): batcher flush rule, top-k, duplicate policy, watch filters."""
        self.cfg = replace(self.cfg, batcher=replace(cfg.batcher, streams=self.cfg.batcher.streams,
                                                     max_queued_clips=self.cfg.batcher.max_queued_clips), watch=replace(
            cfg.watch, workers=self.cfg.watch.workers, queue_size=self.cfg.watch.queue_size, state_dir=self.cfg.watch.state_dir))
        self.rejudge = cfg.watch.rejudge_duplicates
        if self.batcher is not None:
            self.batcher.configure(max_batch=cfg.batcher.max_batch, max_wait_s=cfg.batcher.max_wait_ms / 1000)

    # --- bookkeeping ---------------------------------------------------------------------------

    def _track(self, entry_id: int) -> bool:
        with self._lock:
            if entry_id in self._inflight:
                return False
            self._inflight[entry_id] = time.monotonic()
            return True

    def _hold_content(self, job: Job, sha256: str) -> None:
        """Count ``job`` among the files of content ``sha256`` in flight (before the journal is asked)."""
        with self._lock:
            n = self._contents.get(sha256, 0)
            if n:
                self._shared.add(sha256)
            self._contents[sha256] = n + 1
            job.content = sha256

    def _release(self, job: Job) -> None:
        """``job`` is finished (or left unfinished for the next start): no longer in flight."""
        with self._lock:
            self._inflight.pop(job.entry_id, None)
            if not self._inflight:
                self._settled.notify_all()
            sha, job.content = job.content, None
            if sha is not None:
                n = self._contents.pop(sha) - 1
                if n:
                    self._contents[sha] = n
                else:
                    self._shared.discard(sha)

    def _enqueue(self, job: Job) -> bool:
        if not self._track(job.entry_id):
            return False
        while True:
            try:
                self._jobs.put(job, timeout=0.2)
                return True
            except queue.Full:
                if self._stop.is_set():
                    self._release(job)
                    return False

    def _oldest_age(self) -> float:
        with self._lock:
            return time.monotonic() - min(self._inflight.values()) if self._inflight else 0.0

    def _tick(self, idle: bool) -> None:
        # Idle counts as alive only when nothing is in flight: a stuck worker must stop the pings.
        if not idle or not self.in_flight():
            self.liveness.stamp()

    def _on_batch(self, clips: int, seconds: float) -> None:
        self.metrics.batch_size.observe(clips)
        self.metrics.clips.inc(clips)

    # --- workers -------------------------------------------------------------------------------

    def _worker(self) -> None:
        if self.keep_on_device:  # each worker on its own CUDA stream: its waits are for its own work only
            import torch

            with torch.cuda.stream(torch.cuda.Stream(torch.device(self.device))):
                self._work()
        else:
            self._work()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                self._tick(True)  # idle with nothing in flight is alive (the open-set-only path has no batcher ticks)
                continue
            if job is None:  # a wake-up: the loop looks at the stop flag
                continue
            try:
                self._prepare(job)
            except Stopped:  # not finished: stays unfinished in the journal, resumed at the next start
                self._release(job)
            except Exception as exc:  # noqa: BLE001 - one file's surprise must not stop the daemon
                if not isinstance(exc, DevrecdError):
                    log.exception("internal error on a file", extra={"path": job.path})
                job.resolved_path = job.resolved_path or getattr(exc, "resolved_path", None)
                f = failure_of(exc)
                if f.sha256 is None and job.sha256 is not None:  # failed after the file was hashed
                    f = replace(f, sha256=job.sha256, size=job.size)
                if f.sha256 is None:
                    self._found_instead(job)
                self._results.put(Failed(job, f))
            self.liveness.stamp()

    def _found_instead(self, job: Job) -> None:
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
            self.journal.revise_version(job.entry_id, st.st_size, st.st_mtime_ns)
        except JournalError as exc:  # at worst the entry gets a second record when it is seen again
            log.warning("cannot revise a journal row", extra={"path": job.path, "error": str(exc)})

    def _prepare(self, job: Job) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        confine = None if self.roots is None or cfg.watch.follow_external_links else self.roots
        # Features go on chunk by chunk as they are computed, never held whole: to the batcher (a
        # closed-set model), to the registry scorer's accumulator (a registry), or to both. Only a
        # scorer without an accumulator takes a recording's features whole.
        accumulated = self.accumulator() if self.accumulator is not None else None
        chunked = self.batcher is not None and (self.judge is None or accumulated is not None)
        original: Entry | None = None
        # Decoded block by block: the recording's samples are never held whole.
        with open_stream(job.path, cfg.frontend.sample_rate, cfg.audio, confine=confine) as stream:
            job.resolved_path = stream.resolved_path
            self.storage(lambda: self.journal.mark_hashed(job.entry_id, stream.sha256 or "", stream.size or 0))
            job.sha256, job.size = stream.sha256, stream.size
            if stream.sha256:
                self._hold_content(job, stream.sha256)
            sink: Callable[[Any, int], None] | None = None
            if chunked or accumulated is not None:
                if not self.rejudge and stream.sha256:
                    original = self.journal.judged_with(stream.sha256, exclude=job.entry_id)
                # A duplicate's chunks are neither inferred nor scored (it is still decoded: its record describes it).
                sink = (lambda feats, first: None) if original is not None else self._sink(job, chunked, accumulated)
            spent: dict[str, float] = {}
            feats, starts = stream_features(stream, cfg, device=self.device, timings=spent,
                                            on_device=self.keep_on_device, sink=sink)
            job.recording = stream.describe()
        job.starts = starts
        job.timings.update(spent)  # features (and on a GPU: h2d, frontend)
        job.timings["decode"] = time.perf_counter() - t0 - job.timings["features"] - job.blocked \
            - job.timings.get("scoring", 0.0)
        if not self.rejudge:
            original = original or self.journal.judged_with(job.recording["sha256"], exclude=job.entry_id)
            if original is not None:  # judged before under another name: no inference needed
                self._results.put(Duplicate(job, original))
                return
        if self.judge is not None:  # the registry's verdict, here in the parallel workers
            t1 = time.perf_counter()
            if accumulated is not None:  # fed chunk by chunk: the features were never held whole
                fields = self.judge(accumulated, job.recording)
            else:
                as_is = self.judge_on_device or not hasattr(feats, "cpu")
                fields = self.judge(feats if as_is else feats.cpu().numpy(), job.recording)
            job.timings["scoring"] = job.timings.get("scoring", 0.0) + time.perf_counter() - t1
            if self.batcher is None:  # open set only: that is the verdict
                self._results.put(Scored(job, fields))
                return
            job.open_set = fields  # before FeaturesDone: the writer reads it once the last chunk is in
        if chunked:  # every chunk is queued: the writer now knows how many windows to wait for
            self._results.put(FeaturesDone(job, len(starts)))
            return
        assert self.batcher is not None
        if not self.batcher.put(Unit(key=job, features=feats), self._stop):
            raise Stopped()

    def _sink(self, job: Job, chunked: bool, accumulated: Any) -> Callable[[Any, int], None]:
        """Where each chunk of ``job``'s features goes as it is computed: the batcher (``chunked``),
        the registry scorer's accumulator (its time counted as ``scoring``), or both."""
        as_is = self.judge_on_device  # features left on the GPU go to the scorer there

        def feed(feats: Any, first: int) -> None:
            if accumulated is not None:
                t0 = time.perf_counter()
                accumulated.add(feats if as_is or not hasattr(feats, "cpu") else feats.cpu().numpy())
                job.timings["scoring"] = job.timings.get("scoring", 0.0) + time.perf_counter() - t0
            if chunked:
                self._put_chunk(job, feats, first)

        return feed

    def _put_chunk(self, job: Job, feats: Any, first: int) -> None:
        """Queue one chunk of a file's features for inference (blocking while the batcher is full)."""
        assert self.batcher is not None
        if job.closed:  # its record is written (e.g. an earlier chunk's batch failed): nothing to infer
            return
        t0 = time.perf_counter()
        if job.enqueued is None:
            job.enqueued = time.monotonic()

        def done(unit: Unit) -> None:  # in an inference thread: the writer gathers the chunks
            assert unit.probs is not None
            self._results.put(Chunk(job, first, unit.probs, unit.started or unit.enqueued, unit.infer_seconds))

        ok = self.batcher.put(Unit(key=job, features=feats, on_done=done), self._stop)
        job.blocked += time.perf_counter() - t0
        if not ok:
            raise Stopped()

    def _infer_loop(self) -> None:
        def deliver(unit: Unit) -> None:
            # The unit (and with it the file's features) is dropped once this batch is done.
            job: Job = unit.key
            assert unit.probs is not None
            job.timings["queue"] = (unit.started or unit.enqueued) - unit.enqueued
            job.timings["inference"] = unit.infer_seconds
            self._results.put(Judged(job, unit.probs))

        def failed(unit: Unit, exc: Exception) -> None:
            log.error("inference failed", extra={"path": unit.key.path, "error": str(exc)})
            self._results.put(Failed(unit.key, Failure("inference", f"{type(exc).__name__}: {exc}")))

        assert self.batcher is not None
        self.batcher.run(self._stop, deliver, failed)

    # --- the writer ----------------------------------------------------------------------------

    def _writer_loop(self) -> None:
        while True:
            msg = self._results.get()
            if isinstance(msg, Stop):
                return
            job = msg.job
            t0 = time.perf_counter()
            finished = True
            try:
                if job.closed:  # a chunk (or a chunk's failure) of a file whose record is written
                    finished = False
                else:
                    finished = self._write(msg)
            except Stopped:
                pass  # stopped while the journal could not be written: resumed (or repaired) at the next start
            except JournalError as exc:
                # The row stays unfinished and is judged again after a restart; keep serving the rest.
                log.error("cannot record a verdict", extra={"path": msg.job.path, "error": str(exc)})
                self.metrics.errors.labels(reason="journal").inc()
            except Exception:  # noqa: BLE001
                log.exception("internal error while recording a verdict", extra={"path": msg.job.path})
                self.metrics.errors.labels(reason="internal").inc()
            finally:
                self.metrics.stage_seconds.labels(stage="writer").observe(time.perf_counter() - t0)
                if finished:
                    job.closed = True
                    self._release(job)
                self.liveness.stamp()

    def _judged_first(self, job: Job) -> Entry | None:
        """The file judged first with ``job``'s content while both were in flight, if any."""
        if self.rejudge or job.content is None:
            return None
        with self._lock:
            shared = job.content in self._shared
        return self.journal.judged_with(job.content, exclude=job.entry_id) if shared else None

    def _write(self, msg: Judged | Chunk | FeaturesDone | Scored | Duplicate | Failed) -> bool:
        """Record one result; False while a chunked file still waits for more of its windows."""
        job = msg.job
        if isinstance(msg, Chunk):
            job.chunks.append((msg.first, msg.probs))
            job.windows_done += len(msg.probs)
            job.infer_seconds += msg.infer_seconds
            job.started = msg.started if job.started is None else min(job.started, msg.started)
            return self._finish_chunked(job)
        if isinstance(msg, FeaturesDone):
            job.windows = msg.windows
            return self._finish_chunked(job)
        if isinstance(msg, (Judged, Scored)):
            assert job.recording is not None
            original = self._judged_first(job)
            if original is not None:  # an identical file finished first while this one was in flight
                return self._write(Duplicate(job, original))
            job.timings["end_to_end"] = time.monotonic() - job.taken
            if isinstance(msg, Judged):
                assert job.starts is not None
                record = judged_record(job.recording, msg.probs, self.labels, job.starts, k=self.cfg.watch.top_k,
                                       backend=self.backend_info, timings=job.timings)
                # open set: the registry's verdict, the closed-set one kept beside it
                record = with_comparison(record, job.recording, job.open_set, self.cfg.backend.validated_conditions)
            else:
                record = open_set_record(job.recording, msg.fields, serving=self.backend_info, timings=job.timings)
            self._commit_judged(job, record)
        elif isinstance(msg, Duplicate):
            job.timings["end_to_end"] = time.monotonic() - job.taken
            record = duplicate_record(job.recording or {"path": job.path}, msg.original.record or {"id": msg.original.id},
                                      timings=job.timings)
            committed = self._commit(job.entry_id, "duplicate", record, duplicate_of=msg.original.id,
                                     sha256=(job.recording or {}).get("sha256"))
            if committed is not None:
                self._count("duplicate", job, committed)
                log.info("duplicate", extra={"path": job.path, "of": msg.original.path})
        else:
            f = msg.failure
            job.timings["end_to_end"] = time.monotonic() - job.taken
            rec = job.recording or {}
            record = failed_record(job.path, f.reason, f.detail, timings=job.timings,
                                   sha256=f.sha256 if f.sha256 is not None else rec.get("sha256"),
                                   size=f.size if f.size is not None else rec.get("size"),
                                   resolved_path=job.resolved_path)
            committed = self._commit(job.entry_id, "failed", record, reason=f.reason, sha256=record["sha256"])
            if committed is not None:
                self._count("failed", job, committed)
                self.metrics.errors.labels(reason=f.reason).inc()
                log.warning("cannot judge file", extra={"path": job.path, "reason": f.reason, "detail": f.detail,
                                                        "sha256": committed["sha256"]})
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

    def _commit_judged(self, job: Job, record: dict) -> None:
        assert job.recording is not None
        committed = self._commit(job.entry_id, "judged", record, sha256=job.recording["sha256"])
        if committed is not None:
            self._count("judged", job, committed)
            self.metrics.verdicts.labels(device=committed["device"]).inc()
            self.metrics.audio_seconds.inc(job.recording["duration"])
            log.debug("judged", extra={"path": job.path, "device": committed["device"], "score": committed["score"]})

    def _commit(self, entry_id: int, state: str, record: dict, **kw: Any) -> dict | None:
        """:meth:`Recorder.commit`, retried while storage fails. A commit whose journal part went
        through before the verdict-log append failed is finished by the repair, not committed twice."""
        def repaired() -> dict | None:
            self.recorder.repair()  # appends the record the journal holds, unless the log has it
            entry = self.journal.get(entry_id)
            return entry.record if entry is not None and entry.state in TERMINAL and entry.logged else None

        return self.storage(lambda: self.recorder.commit(entry_id, state, record, **kw), before_retry=repaired)

    def _count(self, outcome: str, job: Job, record: dict) -> None:
        self.metrics.files.labels(outcome=outcome).inc()
        for stage, seconds in job.timings.items():
            self.metrics.stage_seconds.labels(stage=stage).observe(seconds)
        if self.on_record is not None:
            self.on_record(record)


class Stopped(DevrecdError):
    """Shutting down while a file waited for the batcher or for storage; it stays unfinished in the journal."""

    reason = "stopped"

    def __init__(self, message: str = "stopped while waiting (the file stays unfinished, resumed at the next start)") -> None:
        super().__init__(message)


def one_blas_thread() -> Any:
    """Hold numpy's BLAS (OpenBLAS, MKL, ...) to one thread, process-wide; returns the handle whose
    ``restore_original_limits()`` undoes it (None without threadpoolctl).

    The pipeline parallelises across files: its workers run the frontend's matmuls and the GSV
    scorer's at once, in threads. A multi-threaded OpenBLAS called from two threads serialises them
    on its one thread pool, and its spinning helper threads take the cores from the other worker
    and from ONNX Runtime: measured on 2 cores, 2 workers x the frontend of 2 s clips took 4-5x the
    CPU with OpenBLAS's default 2 threads than with 1 (py-spy on the open-set daemon: the frontend's
    mel matmul was the largest stack, above the FFT)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a base install has it
        return None
    return threadpool_limits(limits=1, user_api="blas")


def inference_streams(cfg: Config, backend: Backend) -> int:
    """How many inference threads run batches at once: ``batcher.streams``, or when 0 (auto) one
    per available core / ``backend.threads``; never more than the backend allows at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = cfg.batcher.streams or max(1, cores // max(1, cfg.backend.threads))
    limit = getattr(backend, "concurrency", 1)
    return max(1, want if limit is None else min(want, limit))
