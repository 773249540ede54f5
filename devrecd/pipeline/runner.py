"""The runner: bounded queues, decode + feature workers, inference threads, one verdict writer.

::

    submit(path) -> jobs (bounded)
      -> workers (watch.workers): open read-only, hash, decode block by block, features (stages),
                                  dedupe against the journal, open-set verdict (registry.path)
      -> Batcher (bounded) -> inference threads (batcher.streams): backend.infer on batches across files
                              (each file's features in chunks, as they are computed)
      -> messages -> writer thread (writer.py): verdict records, committed in groups to the
                     journal + verdict log (Recorder), metrics

The stages hand the writer typed messages (:class:`Judged`, :class:`Chunk`, :class:`FeaturesDone`,
:class:`Scored`, :class:`Duplicate`, :class:`Failed`, :class:`Stop`). Every terminal state is written
by the one writer thread (:class:`~devrecd.pipeline.writer.VerdictWriter`, in groups: one journal
transaction and one fsync of each file for all the verdicts ready at once), so the journal and
verdict-log ordering needs no further locking; the writer only writes: scoring, open set included,
runs in the parallel stages, and a file's features are released once they are inferred.
A bad file becomes a ``failed`` record with its reason and never stops the other files.

Storage: when the journal or the verdict log cannot be written (a full disk, a read-only file system),
no file fails and no thread ends: the thread that needs the write retries (:class:`StorageRetry`)
until it succeeds or the pipeline stops; :attr:`Pipeline.storage_error` says why meanwhile.

Chunks: a file's features go on chunk by chunk as they are computed, never held whole: to the
batcher (a closed-set model; the writer gathers each chunk's probabilities, :class:`Chunk`, until
:class:`FeaturesDone` said how many windows there are) and to the registry scorer's accumulator
(every kind has one); only a scorer without one takes a file's features whole. Open set only
(:class:`~devrecd.pipeline.serving.OpenSetOnly`): no network, no batcher; the scorer's verdict is it.

Duplicates: a worker asks the journal once per file whether the same content was judged before.
Two files of the same content in flight at once are both inferred; the writer then asks the journal
again for the second to finish, and only for such contents.

Worker processes (``processes``, :mod:`devrecd.pipeline.procs`): each worker thread hands its files
to its own child process, which opens, decodes, featurises and judges them (the per-file CPU work);
the thread keeps the journal, the bookkeeping and the batcher, so the rest is as described here.

The three kinds of thread share the in-flight bookkeeping here (files and contents in flight, under
one lock); the writer's record-keeping is :mod:`devrecd.pipeline.writer`'s.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

from devrecd.audio import open_stream
from devrecd.backends.base import Backend
from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.metrics import Metrics
from devrecd.pipeline.batcher import Batcher, Unit
from devrecd.pipeline.jobs import Chunk, Duplicate, Failed, FeaturesDone, Job, Judged, Message, Scored, Stop, found_instead
from devrecd.pipeline.journal import Entry, Journal, Recorder, VerdictLog
from devrecd.pipeline.procs import CRASHED, ChildCrashed, ChildFailed, WorkerProcess, prepare_in_child
from devrecd.pipeline.retry import Liveness, StorageRetry, Stopped
from devrecd.pipeline.serving import Judge, OpenSetOnly, RegistryJudging
from devrecd.pipeline.threads import inference_streams, one_blas_thread
from devrecd.pipeline.verdict import model_validation
from devrecd.pipeline.writer import VerdictWriter
from devrecd.stages import Failure, failure_of, stream_features

__all__ = ["Liveness", "Pipeline", "StorageRetry", "Stopped", "inference_streams", "one_blas_thread"]
log = logging.getLogger("devrecd.pipeline")

class Pipeline:
    """Judges submitted files once each; see the module docstring."""

    def __init__(self, cfg: Config, backend: Backend | OpenSetOnly, *, journal: Journal, verdict_log: VerdictLog | None,
                 metrics: Metrics, device: str = "cpu", rejudge_duplicates: bool | None = None,
                 on_record: Callable[[dict], None] | None = None, liveness: Liveness | None = None,
                 judge: RegistryJudging | None = None, roots: Sequence[str] | None = None,
                 processes: bool = False) -> None:
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
        # One judge shared by the in-process workers (a RegistryJudge matches a new condition outside its
        # lock, so they do not take turns at it); worker processes load their own.
        self._judging = judge
        self.backend = backend
        self.labels = tuple(backend.labels)
        self.backend_info = backend.describe()
        # What the served model was validated on (conditions, SNR range): every closed-set verdict is held to it.
        self.validation = model_validation(cfg.backend, self.backend_info)
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
        # processes (watch.processes, see procs.py): each worker thread's files judged in its own child process
        self._children = [WorkerProcess(f"devrecd-worker-{i}", self.cfg, judging=judge is not None, stopping=self._stop,
                                        adopt_frontend=isinstance(backend, OpenSetOnly))
                          for i in range(max(1, cfg.watch.workers))] if processes else []
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
        for child in self._children:
            child.start()  # each loads the scorer while the others start
        for child in self._children:
            child.usable()  # ready before the pipeline is: the first files do not wait for a load
        for i in range(max(1, self.cfg.watch.workers)):
            self._threads.append(threading.Thread(target=self._worker, args=(i,), name=f"devrecd-decode-{i}", daemon=True))
        self.streams = 0 if self.batcher is None else inference_streams(self.cfg, self.backend)
        for i in range(self.streams):
            self._threads.append(threading.Thread(target=self._infer_loop, name=f"devrecd-infer-{i}", daemon=True))
        self._writer = threading.Thread(target=VerdictWriter(self).run, name="devrecd-writer", daemon=True)
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
        for child in self._children:
            child.close()
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
            cfg.watch, workers=self.cfg.watch.workers, processes=self.cfg.watch.processes, queue_size=self.cfg.watch.queue_size,
            state_dir=self.cfg.watch.state_dir))
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

    def _worker(self, i: int) -> None:
        if self.keep_on_device:  # each worker on its own CUDA stream: its waits are for its own work only
            import torch

            with torch.cuda.stream(torch.cuda.Stream(torch.device(self.device))):
                self._work(None)
        else:
            self._work(self._children[i] if self._children else None)

    def _work(self, child: WorkerProcess | None) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                self._tick(True)  # idle with nothing in flight is alive (the open-set-only path has no batcher ticks)
                continue
            if job is None:  # a wake-up: the loop looks at the stop flag
                continue
            try:
                if child is not None and child.usable():
                    prepare_in_child(self, child, job)
                else:
                    self._prepare(job, self._judging)
            except Stopped:  # not finished: stays unfinished in the journal, resumed at the next start
                self._release(job)
            except ChildFailed as exc:  # the file's failure, in its worker process
                if exc.internal:
                    log.error("internal error on a file", extra={"path": job.path, "traceback": exc.internal})
                self._failed(job, exc.failure, exc.resolved_path)
            except ChildCrashed as exc:  # its worker process died under it: the next file gets a new one
                log.error("worker process crashed on a file", extra={"path": job.path, "error": str(exc)})
                self._failed(job, Failure(CRASHED, f"{exc}; the file is not judged again by itself"), None)
            except Exception as exc:  # noqa: BLE001 - one file's surprise must not stop the daemon
                if not isinstance(exc, DevrecdError):
                    log.exception("internal error on a file", extra={"path": job.path})
                self._failed(job, failure_of(exc), getattr(exc, "resolved_path", None))
            self.liveness.stamp()

    def _failed(self, job: Job, f: Failure, resolved_path: str | None) -> None:
        job.resolved_path = job.resolved_path or resolved_path
        if f.sha256 is None and job.sha256 is not None:  # failed after the file was hashed
            f = replace(f, sha256=job.sha256, size=job.size)
        if f.sha256 is None:
            found_instead(self.journal, job)
        self._results.put(Failed(job, f))

    def _prepare(self, job: Job, judging: RegistryJudging | None) -> None:
        """The per-file stage in this thread, with ``judging`` (the registry judge, or None: no registry)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        confine = None if self.roots is None or cfg.watch.follow_external_links else self.roots
        # Features go on chunk by chunk as they are computed, never held whole: to the batcher (a
        # closed-set model), to the registry scorer's accumulator (a registry), or to both. Only a
        # scorer without an accumulator takes a recording's features whole.
        accumulated = judging.accumulator() if judging is not None else None
        chunked = self.batcher is not None and (judging is None or accumulated is not None)
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
        if judging is not None:  # the registry's verdict, here in the parallel workers
            t1 = time.perf_counter()
            if accumulated is not None:  # fed chunk by chunk: the features were never held whole
                fields = judging.judge(accumulated, job.recording)
            else:
                as_is = self.judge_on_device or not hasattr(feats, "cpu")
                fields = judging.judge(feats if as_is else feats.cpu().numpy(), job.recording)
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
