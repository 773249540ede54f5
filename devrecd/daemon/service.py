"""The pipeline: bounded queues, decode + feature workers, one inference thread, one verdict writer.

::

    submit(path) -> jobs (bounded) -> workers: read_evidence, hash, dedupe, clips, features
                 -> Batcher (bounded) -> inference thread: backend.infer on batches across files
                 -> results -> writer thread: aggregate, journal + verdict log (Recorder), metrics

Every terminal state is written by the one writer thread, so duplicate detection and the
journal/log ordering need no further locking. A bad file becomes a ``failed`` record with its
reason and never stops the other files.

:class:`Daemon` wraps the pipeline with the watcher, the HTTP endpoints, systemd notifications and
signals (SIGTERM drains, SIGHUP reloads).

Open set only (``registry.path`` set, no ``backend.model``/``backend.engine``): no network is
loaded and no batcher runs; each worker hands its features to the registry's scorer
(:class:`OpenSetOnly`) and the writer records the registry's verdict, through the same journal.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import queue
import signal
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from devrecd.audio import open_stream
from devrecd.config import Config, load_config
from devrecd.daemon.batcher import Batcher, Unit
from devrecd.daemon.journal import Journal, JournalError, Recorder, VerdictLog
from devrecd.daemon.notify import Liveness, WatchdogPinger, notify, watchdog_interval
from devrecd.daemon.verdict import duplicate_record, failed_record, judged_record, open_set_record, with_comparison
from devrecd.contract import check_frontend
from devrecd.errors import ConfigError, DevrecdError
from devrecd.features import FrontendConfig
from devrecd.metrics import Metrics
from devrecd.fsutil import atomic_write, private_file
from devrecd.pipeline import failure_of, frontend_for, resolve_device, stream_features

log = logging.getLogger("devrecd.daemon")

JOURNAL_NAME = "journal.sqlite"
VERDICT_LOG_NAME = "verdicts.jsonl"
LIVE_LOG_NAME = "live.jsonl"  # per-window verdicts of the live input (live.enabled)
STATUS_NAME = "daemon.json"  # pid and endpoint URL of the running daemon (for operators and tests)


class BackendLike(Protocol):
    """What the pipeline needs of a :mod:`devrecd.backends` backend."""

    name: str
    labels: tuple[str, ...]
    frontend: FrontendConfig

    def infer(self, features: Any) -> np.ndarray: ...
    def describe(self) -> dict: ...


class OpenSetOnly:
    """What serves when there is a device registry and no closed-set model: the registry's scorer
    (:class:`~devrecd.openset.workflow.RegistryJudge`) judges each recording's features directly.
    Not a backend: nothing runs on batches, so the pipeline skips the batcher; the frontend is the
    scorer's own (the one its profiles were made with)."""

    name = "open-set-only"
    labels: tuple[str, ...] = ()

    def __init__(self, cfg: Config, *, device: str = "cpu") -> None:
        from devrecd.openset.workflow import RegistryJudge

        self.registry_judge = RegistryJudge(cfg, device=device, adopt_frontend=True)
        self.frontend: FrontendConfig = self.registry_judge.frontend
        self.device = device
        desc = self.registry_judge.scorer.describe()
        self.scorer = {"kind": desc.get("kind"), "fingerprint": desc.get("fingerprint"), "source": desc.get("source"),
                       "frontend_sha256": desc.get("frontend_sha256"), "registry": str(self.registry_judge.registry.path)}
        # One recording at a time: the judge caches condition-matched registries as it meets new
        # conditions; scoring is milliseconds beside decoding, which the workers still do in parallel.
        self._lock = threading.Lock()

    def judge(self, features: np.ndarray, recording: dict | None = None) -> dict:
        """The registry's verdict fields for one recording's raw features."""
        with self._lock:
            return self.registry_judge.judge(features, recording)

    def describe(self) -> dict:
        return {"name": self.name, "closed_set_model": None, "device": self.device,
                "version": f"{self.scorer['kind']} scorer {str(self.scorer['fingerprint'] or '')[:16]}",
                "model_sha256": None, "contract_sha256": None, "scorer": dict(self.scorer)}

    def close(self) -> None:
        """Nothing to release (the registry is read once)."""


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
    # Judged by the closed-set model alone, a file goes to the batcher in chunks as its features are
    # computed (its features are never held whole); the writer gathers the chunks' window
    # probabilities here until all ``windows`` (known once the last chunk was computed) are in.
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first window, probabilities)
    windows_done: int = 0
    windows: int | None = None
    enqueued: float | None = None  # monotonic time its first chunk was queued
    started: float | None = None  # ... and its first window entered a batch
    infer_seconds: float = 0.0
    blocked: float = 0.0  # seconds its worker waited for room in the batcher (not decoding)
    closed: bool = False  # its record is written; results still arriving for it are dropped


def _job_of(unit: Unit) -> Job:
    """The job a batcher unit belongs to: a whole file's unit, or one chunk ``(job, first window)``."""
    return unit.key[0] if isinstance(unit.key, tuple) else unit.key


class Pipeline:
    """Judges submitted files once each; see the module docstring."""

    def __init__(self, cfg: Config, backend: BackendLike | OpenSetOnly, *, journal: Journal, verdict_log: VerdictLog | None,
                 metrics: Metrics, device: str = "cpu", rejudge_duplicates: bool | None = None,
                 on_record: Callable[[dict], None] | None = None, liveness: Liveness | None = None,
                 judge: Callable[[np.ndarray, dict], dict] | None = None, roots: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        # Watched folders: symbolic links leading out of them are refused unless
        # watch.follow_external_links (None: files named by the user, followed anywhere).
        self.roots = list(roots) if roots is not None else None
        self.judge = judge  # open-set verdict against the device registry (registry.path), if configured
        if isinstance(backend, OpenSetOnly):  # the registry's verdict alone, on the scorer's own frontend
            self.judge = backend.judge
            self.cfg = cfg = replace(cfg, frontend=backend.frontend)
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
        self.rejudge = cfg.watch.rejudge_duplicates if rejudge_duplicates is None else rejudge_duplicates
        self.on_record = on_record
        self.liveness = liveness or Liveness()
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=max(1, cfg.watch.queue_size))
        self._results: queue.Queue[tuple] = queue.Queue()  # bounded in effect: fed only by bounded stages
        self._inflight: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()  # workers/inference: no new work
        self._threads: list[threading.Thread] = []
        self.batcher: Batcher | None = None  # open set only: nothing runs on batches
        if not isinstance(backend, OpenSetOnly):
            self.batcher = Batcher(backend.infer, max_batch=cfg.batcher.max_batch, max_wait_s=cfg.batcher.max_wait_ms / 1000,
                                   queue_size=cfg.watch.queue_size, max_clips=cfg.batcher.max_queued_clips,
                                   on_batch=self._on_batch, on_progress=self._tick)
        self.extra_pending: Callable[[], int] = lambda: 0  # files sources hold that are not yet admitted
        metrics.queue_depth.set_function(lambda: self.in_flight() + self.extra_pending())
        metrics.oldest_pending_age.set_function(self._oldest_age)

    # --- public --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker, inference and writer threads."""
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
        entry, _ = self.journal.see(path, size, mtime_ns)
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
        entry, _ = self.journal.see(path, size, mtime_ns)
        if entry.state in ("seen", "hashed") and self._track(entry.id):
            self._results.put(("failed", Job(entry.id, path), "missing", "the file disappeared before it was complete",
                               None, None))

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is in flight; True when drained within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while self.in_flight():
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Stop every thread; unfinished files stay unfinished in the journal (resumed next start)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._results.put(("stop",))
        self._writer.join(timeout=10)

    def reconfigure(self, cfg: Config) -> None:
        """Apply reloadable settings (SIGHUP): batcher flush rule, top-k, duplicate policy, watch filters."""
        self.cfg = replace(self.cfg, batcher=replace(cfg.batcher, streams=self.cfg.batcher.streams), watch=replace(
            cfg.watch, workers=self.cfg.watch.workers, queue_size=self.cfg.watch.queue_size, state_dir=self.cfg.watch.state_dir))
        self.rejudge = cfg.watch.rejudge_duplicates
        if self.batcher is not None:
            self.batcher.configure(max_batch=cfg.batcher.max_batch, max_wait_s=cfg.batcher.max_wait_ms / 1000)

    # --- internals -----------------------------------------------------------------------------

    def _track(self, entry_id: int) -> bool:
        with self._lock:
            if entry_id in self._inflight:
                return False
            self._inflight[entry_id] = time.monotonic()
            return True

    def _enqueue(self, job: Job) -> bool:
        if not self._track(job.entry_id):
            return False
        while True:
            try:
                self._jobs.put(job, timeout=0.2)
                return True
            except queue.Full:
                if self._stop.is_set():
                    with self._lock:
                        self._inflight.pop(job.entry_id, None)
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

    def _worker(self) -> None:
        if self.keep_on_device:  # each worker on its own CUDA stream: its waits are for its own work only
            import torch

            with torch.cuda.stream(torch.cuda.Stream(torch.device(self.device))):
                self._work()
        else:
            self._work()

    def _work(self) -> None:
        frontend = frontend_for(self.cfg.frontend)
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._prepare(job, frontend)
            except _Stopped:
                with self._lock:  # not finished: stays unfinished in the journal, resumed at the next start
                    self._inflight.pop(job.entry_id, None)
            except Exception as exc:  # noqa: BLE001 - one file's surprise must not stop the daemon
                if not isinstance(exc, DevrecdError):
                    log.exception("internal error on a file", extra={"path": job.path})
                job.resolved_path = job.resolved_path or getattr(exc, "resolved_path", None)
                f = failure_of(exc)
                if f.sha256 is None:
                    self._found_instead(job)
                self._results.put(("failed", job, f.reason, f.detail, f.sha256, f.size))
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

    def _prepare(self, job: Job, frontend) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        confine = None if self.roots is None or cfg.watch.follow_external_links else self.roots
        # The closed-set model alone: features go to the batcher chunk by chunk as they are computed.
        # The open-set scorer needs a recording's features whole (its recording vector).
        chunked = self.batcher is not None and self.judge is None
        # Decoded block by block: the recording's samples are never held whole.
        with open_stream(job.path, cfg.frontend.sample_rate, cfg.audio, confine=confine) as stream:
            job.resolved_path = stream.resolved_path
            self.journal.mark_hashed(job.entry_id, stream.sha256 or "", stream.size or 0)
            original = None if self.rejudge else self.journal.judged_with(stream.sha256 or "", exclude=job.entry_id)
            sink = None
            if chunked:  # a duplicate's chunks are not inferred (it is still decoded: its record describes it)
                sink = (lambda feats, first: None) if original is not None else (
                    lambda feats, first: self._put_chunk(job, feats, first))
            spent: dict[str, float] = {}
            feats, starts = stream_features(stream, cfg, device=self.device, timings=spent,
                                            on_device=self.keep_on_device, sink=sink)
            job.recording = stream.describe()
        job.starts = starts
        job.timings.update(spent)  # features (and on a GPU: h2d, frontend)
        job.timings["decode"] = time.perf_counter() - t0 - job.timings["features"] - job.blocked
        if not self.rejudge:
            original = original or self.journal.judged_with(job.recording["sha256"], exclude=job.entry_id)
            if original is not None:  # judged before under another name: no inference needed
                self._results.put(("duplicate", job, original))
                return
        if chunked:
            self._results.put(("features_done", job))
            return
        if self.batcher is None:  # open set only: the scorer judges here, in the parallel workers
            t1 = time.perf_counter()
            fields = self.judge(feats.cpu().numpy() if hasattr(feats, "cpu") else feats, job.recording)
            job.timings["scoring"] = time.perf_counter() - t1
            self._results.put(("scored", job, fields))
            return
        if not self.batcher.put(Unit(key=job, features=feats), self._stop):
            raise _Stopped()

    def _put_chunk(self, job: Job, feats: Any, first: int) -> None:
        """Queue one chunk of a file's features for inference (blocking while the batcher is full)."""
        assert self.batcher is not None
        t0 = time.perf_counter()
        if job.enqueued is None:
            job.enqueued = time.monotonic()
        ok = self.batcher.put(Unit(key=(job, first), features=feats), self._stop)
        job.blocked += time.perf_counter() - t0
        if not ok:
            raise _Stopped()

    def _infer_loop(self) -> None:
        def deliver(unit: Unit) -> None:
            self._results.put(("judged", unit))

        def failed(unit: Unit, exc: Exception) -> None:
            job = _job_of(unit)
            log.error("inference failed", extra={"path": job.path, "error": str(exc)})
            self._results.put(("failed", job, "inference", f"{type(exc).__name__}: {exc}", None, None))

        self.batcher.run(self._stop, deliver, failed)

    def _writer_loop(self) -> None:
        while True:
            msg = self._results.get()
            if msg[0] == "stop":
                return
            job: Job = _job_of(msg[1]) if msg[0] == "judged" else msg[1]
            t0 = time.perf_counter()
            finished = True
            try:
                if job.closed:  # a chunk (or a chunk's failure) of a file whose record is written
                    finished = False
                else:
                    finished = self._write(msg)
            except JournalError as exc:
                # The row stays unfinished and is judged again after a restart; keep serving the rest.
                log.error("cannot record a verdict", extra={"path": job.path, "error": str(exc)})
                self.metrics.errors.labels(reason="journal").inc()
            except Exception:  # noqa: BLE001
                log.exception("internal error while recording a verdict", extra={"path": job.path})
                self.metrics.errors.labels(reason="internal").inc()
            finally:
                self.metrics.stage_seconds.labels(stage="writer").observe(time.perf_counter() - t0)
                if finished:
                    job.closed = True
                    with self._lock:
                        self._inflight.pop(job.entry_id, None)
                self.liveness.stamp()

    def _write(self, msg: tuple) -> bool:
        """Record one result; False while a chunked file still waits for more of its windows."""
        kind = msg[0]
        if kind == "judged" and isinstance(msg[1].key, tuple):  # one chunk of a file
            unit: Unit = msg[1]
            job, first = unit.key
            assert unit.probs is not None
            job.chunks.append((first, unit.probs))
            job.windows_done += len(unit)
            job.infer_seconds += unit.infer_seconds
            job.started = min(job.started or math.inf, unit.started or unit.enqueued)
            return self._finish_chunked(job)
        if kind == "features_done":  # the last chunk of a file was queued
            job = msg[1]
            assert job.starts is not None
            job.windows = len(job.starts)
            return self._finish_chunked(job)
        if kind == "judged":
            unit = msg[1]
            assert unit.probs is not None
            self._judged(unit.key, unit.probs, queue_s=(unit.started or unit.enqueued) - unit.enqueued,
                         infer_s=unit.infer_seconds, features=unit.features)
        elif kind == "scored":  # open set only: the registry's verdict is the verdict
            job, fields = msg[1], msg[2]
            assert job.recording is not None
            original = None if self.rejudge else self.journal.judged_with(job.recording["sha256"], exclude=job.entry_id)
            if original is not None:
                self._write(("duplicate", job, original))
                return
            job.timings["end_to_end"] = time.monotonic() - job.taken
            self._commit_judged(job, open_set_record(job.recording, fields, serving=self.backend_info,
                                                     timings=job.timings))
        elif kind == "duplicate":
            job, original = msg[1], msg[2]
            job.timings["end_to_end"] = time.monotonic() - job.taken
            record = duplicate_record(job.recording or {"path": job.path}, original.record or {"id": original.id},
                                      timings=job.timings)
            record = self.recorder.commit(job.entry_id, "duplicate", record, duplicate_of=original.id,
                                          sha256=(job.recording or {}).get("sha256"))
            if record is not None:
                self._count("duplicate", job, record)
                log.info("duplicate", extra={"path": job.path, "of": original.path})
        elif kind == "failed":
            _, job, reason, detail, sha, size = msg
            job.timings["end_to_end"] = time.monotonic() - job.taken
            rec = job.recording or {}
            record = failed_record(job.path, reason, detail, timings=job.timings,
                                   sha256=sha if sha is not None else rec.get("sha256"),
                                   size=size if size is not None else rec.get("size"),
                                   resolved_path=job.resolved_path)
            record = self.recorder.commit(job.entry_id, "failed", record, reason=reason, sha256=record["sha256"])
            if record is not None:
                self._count("failed", job, record)
                self.metrics.errors.labels(reason=reason).inc()
                log.warning("cannot judge file", extra={"path": job.path, "reason": reason, "detail": detail,
                                                        "sha256": record["sha256"]})
        return True

    def _finish_chunked(self, job: Job) -> bool:
        """Judge a chunked file once every window's probabilities are in."""
        if job.windows is None or job.windows_done < job.windows:
            return False
        job.chunks.sort(key=lambda c: c[0])
        probs = np.concatenate([p for _, p in job.chunks])
        assert len(probs) == job.windows, (len(probs), job.windows)
        enqueued = job.enqueued if job.enqueued is not None else time.monotonic()
        self._judged(job, probs, queue_s=max(0.0, (job.started or enqueued) - enqueued), infer_s=job.infer_seconds)
        return True

    def _judged(self, job: Job, probs: np.ndarray, *, queue_s: float, infer_s: float, features: Any = None) -> None:
        """The closed-set verdict of a file from its window probabilities (and, with a registry, the
        open-set verdict from its ``features``)."""
        assert job.recording is not None and job.starts is not None
        original = None if self.rejudge else self.journal.judged_with(job.recording["sha256"], exclude=job.entry_id)
        if original is not None:  # an identical file finished first while this one was in flight
            self._write(("duplicate", job, original))
            return
        job.timings["queue"] = queue_s
        job.timings["inference"] = infer_s
        job.timings["end_to_end"] = time.monotonic() - job.taken
        record = judged_record(job.recording, probs, self.labels, job.starts, k=self.cfg.watch.top_k,
                               backend=self.backend_info, timings=job.timings)
        open_set = None
        if self.judge is not None:  # open set: the registry's verdict, the closed-set one kept beside it
            open_set = self.judge(features.cpu().numpy() if hasattr(features, "cpu") else features, job.recording)
        record = with_comparison(record, job.recording, open_set, self.cfg.backend.validated_conditions)
        self._commit_judged(job, record)

    def _commit_judged(self, job: Job, record: dict) -> None:
        assert job.recording is not None
        record = self.recorder.commit(job.entry_id, "judged", record, sha256=job.recording["sha256"])
        if record is not None:
            self._count("judged", job, record)
            self.metrics.verdicts.labels(device=record["device"]).inc()
            self.metrics.audio_seconds.inc(job.recording["duration"])
            log.debug("judged", extra={"path": job.path, "device": record["device"], "score": record["score"]})

    def _count(self, outcome: str, job: Job, record: dict) -> None:
        self.metrics.files.labels(outcome=outcome).inc()
        for stage, seconds in job.timings.items():
            self.metrics.stage_seconds.labels(stage=stage).observe(seconds)
        if self.on_record is not None:
            self.on_record(record)


class _Stopped(DevrecdError):
    """Shutting down while a file waited for the batcher; it stays unfinished in the journal."""

    reason = "stopped"


def inference_streams(cfg: Config, backend: BackendLike) -> int:
    """How many inference threads run batches at once: ``batcher.streams``, or when 0 (auto) one
    per available core / ``backend.threads``; never more than the backend allows at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = cfg.batcher.streams or max(1, cores // max(1, cfg.backend.threads))
    limit = getattr(backend, "concurrency", 1)
    return max(1, want if limit is None else min(want, limit))


def load_serving_backend(cfg: Config, metrics: Metrics | None = None) -> BackendLike:
    """Load the configured backend, refuse a frontend mismatch, warm it up, record its identity."""
    if not cfg.backend.model and not cfg.backend.engine:
        raise ConfigError("no model given: pass --model export/NAME.onnx (or set backend.model)")
    from devrecd.backends import load_backend

    backend = load_backend(cfg.backend, cfg.frontend)  # refuses a model trained with another frontend
    try:
        backend.warmup()
    except BaseException:
        backend.close()
        raise
    if metrics is not None:
        metrics.set_backend(backend.describe())
    return backend


def load_served(cfg: Config, metrics: Metrics | None = None, *, device: str = "cpu") -> BackendLike | OpenSetOnly:
    """What the daemon and ``identify`` serve: the configured closed-set backend
    (:func:`load_serving_backend`), or, with a device registry and no model, :class:`OpenSetOnly`."""
    if not cfg.backend.model and not cfg.backend.engine and not cfg.registry.path:
        raise ConfigError("no model given: pass --model export/NAME.onnx (or set backend.model), "
                          "or --registry R (registry.path) for open-set verdicts only")
    if cfg.backend.model or cfg.backend.engine:
        return load_serving_backend(cfg, metrics)
    served = OpenSetOnly(cfg, device=device)
    why = f"no backend.model or backend.engine: open-set verdicts from registry {cfg.registry.path} only"
    if served.frontend.fingerprint() != cfg.frontend.fingerprint():
        why += "; frontend.* replaced by the frontend the registry's scorer was made with"
    # Under the backends' logger, beside the line each closed-set backend choice writes.
    logging.getLogger("devrecd.backends").info("backend selected", extra={"backend": "none", "closed_set_model": "none", "why": why,
                                        "scorer": served.scorer["kind"], "scorer_fingerprint": served.scorer["fingerprint"]})
    j = served.registry_judge
    log.info("open-set verdicts from the device registry",
             extra={"registry": cfg.registry.path, "threshold": j.threshold, "threshold_source": j.threshold_source})
    if metrics is not None:
        metrics.set_backend(served.describe())
    return served


def registry_judge(cfg: Config, device: str) -> Callable[[np.ndarray, dict], dict] | None:
    """The open-set judge when ``registry.path`` is configured (closed-set labels otherwise)."""
    if not cfg.registry.path:
        return None
    from devrecd.openset.workflow import RegistryJudge

    judge = RegistryJudge(cfg, device=device)
    log.info("open-set verdicts from the device registry",
             extra={"registry": cfg.registry.path, "threshold": judge.threshold, "threshold_source": judge.threshold_source})
    return judge.judge


class Daemon:
    """``devrecd watch``: the pipeline fed by folder watchers, with endpoints, notify and signals."""

    def __init__(self, cfg: Config, dirs: Sequence[str], *, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        if not dirs:
            raise ConfigError("nothing to watch: give folders on the command line or in watch.dirs")
        self.cfg = cfg
        self.dirs = [os.path.realpath(d) for d in dirs]
        self.config_path = config_path
        self.overrides = overrides or {}
        self.state_dir = Path(os.path.expanduser(cfg.watch.state_dir)).resolve()
        for d in self.dirs:
            if self.state_dir == Path(d) or Path(d) in self.state_dir.parents:
                raise ConfigError(f"watch.state_dir {self.state_dir} is inside the evidence folder {d}; "
                                  "the daemon never writes into evidence")
        self._stop = threading.Event()
        self._reload = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`); returns the exit code."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = private_file(self.state_dir / "lock", 0o640)
        except OSError as exc:
            raise ConfigError(f"cannot use watch.state_dir {self.state_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise ConfigError(f"another devrecd daemon is using {self.state_dir}") from None
        try:
            return self._serve()
        finally:
            os.close(lock_fd)

    def _serve(self) -> int:
        from devrecd.daemon.http import StatusServer
        from devrecd.daemon.watcher import Watcher

        cfg = self.cfg
        journal = Journal(self.state_dir / JOURNAL_NAME)
        verdict_log = VerdictLog(self.state_dir / VERDICT_LOG_NAME)
        repaired = Recorder(journal, verdict_log).repair()
        if repaired:
            log.warning("appended verdicts a crash kept out of the verdict log", extra={"count": repaired})
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # *_created series only add noise to every counter and histogram
        metrics = Metrics()
        liveness = Liveness()
        stall = cfg.watch.stall_seconds
        state: dict[str, Any] = {"ready": False, "pipeline": None}

        def healthy() -> tuple[bool, str]:
            p = state["pipeline"]
            if p is not None and p.in_flight() and liveness.age() > stall:
                return False, f"stalled: no progress for {liveness.age():.0f} s with {p.in_flight()} files in flight"
            return True, "ok"

        def ready() -> tuple[bool, str]:
            if not state["ready"]:
                return False, "starting: model loading or sources not running"
            if state.get("live") is not None:
                live_ok, why = state["live"].ready()
                if not live_ok:
                    return False, f"live input: {why}"
            return True, "ready"

        server = None
        if cfg.metrics.enabled:
            server = StatusServer(metrics.registry, cfg.metrics.address, cfg.metrics.port, healthy=healthy, ready=ready)
            server.start()
        backend = pipeline = watcher = pinger = None
        try:
            device = resolve_device(cfg.backend.device)
            backend = load_served(cfg, metrics, device=device)
            if cfg.live.enabled and isinstance(backend, OpenSetOnly):
                raise ConfigError("live.enabled needs a closed-set model (backend.model): the live input is "
                                  "judged window by window through the batcher")
            judge = None if isinstance(backend, OpenSetOnly) else registry_judge(cfg, device)
            pipeline = Pipeline(cfg, backend, journal=journal, verdict_log=verdict_log, metrics=metrics,
                                device=device, liveness=liveness, judge=judge, roots=self.dirs)
            state["pipeline"] = pipeline
            pipeline.start()
            if cfg.live.enabled:  # a sound-card input judged through the same batcher and backend
                from devrecd.live.source import LiveSource

                live = LiveSource(cfg, pipeline.batcher, labels=backend.labels, backend_info=backend.describe(),
                                  metrics=metrics, device=device)
                state["live_log"] = VerdictLog(self.state_dir / LIVE_LOG_NAME)
                live.start(state["live_log"].append)
                state["live"] = live
            resumed = pipeline.resume()
            watcher = Watcher(self.dirs, cfg.watch, pipeline.submit, pipeline.vanished, exclude=[self.state_dir])
            pipeline.extra_pending = watcher.pending
            watcher.start()
            self._install_signals()
            state["ready"] = True
            metrics.ready.set(1)
            interval = watchdog_interval()
            if interval:
                pinger = WatchdogPinger(liveness, interval, max_age=stall)
                pinger.start()
            status = {"pid": os.getpid(), "url": server.url if server else None, "dirs": self.dirs,
                      "backend": backend.describe(), "started": time.time()}
            atomic_write(self.state_dir / STATUS_NAME, json.dumps(status, default=str), mode=0o640)
            notify("READY=1\nSTATUS=watching " + ", ".join(self.dirs))
            log.info("ready", extra={"dirs": ",".join(self.dirs), "url": status["url"], "backend": backend.name,
                                     "device": device, "inference_streams": pipeline.streams, "resumed": resumed, "polling": ",".join(watcher._polled) or "none"})
            while not self._stop.wait(0.2):
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload(pipeline, watcher)
            notify("STOPPING=1")
            state["ready"] = False
            metrics.ready.set(0)
            log.info("stopping: draining in-flight files", extra={"in_flight": pipeline.in_flight(),
                                                                  "timeout_s": cfg.watch.shutdown_timeout})
            watcher.stop()
            drained = pipeline.drain(cfg.watch.shutdown_timeout)
            if not drained:
                log.warning("shutdown timeout: unfinished files resume at the next start",
                            extra={"in_flight": pipeline.in_flight()})
            log.info("stopped", extra={"drained": drained, **journal.counts()})
            return 0
        finally:
            for part in (pinger, state.get("live"), watcher, pipeline):
                if part is not None:
                    part.stop()
            if backend is not None:
                backend.close()
            if server is not None:
                server.stop()
            verdict_log.close()
            if state.get("live_log") is not None:
                state["live_log"].close()
            journal.close()
            (self.state_dir / STATUS_NAME).unlink(missing_ok=True)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded (tests, another host program): the caller stops us with request_stop()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        # Lease breaks are signalled with SIGURG (see watcher.open_for_writing); SIGIO stays
        # ignored as well, since its default action would end the daemon.
        signal.signal(signal.SIGIO, signal.SIG_IGN)

    def _do_reload(self, pipeline: Pipeline, watcher) -> None:
        from devrecd.logs import setup_logging

        try:
            new = load_config(self.config_path, overrides=self.overrides)
        except ConfigError as exc:
            log.error("config reload failed, keeping the running configuration", extra={"error": str(exc)})
            return
        notify("RELOADING=1")
        setup_logging(new.log.level, new.log.format)
        pipeline.reconfigure(new)
        watcher.reconfigure(pipeline.cfg.watch)
        fixed = [s for s in ("frontend", "audio", "backend", "metrics") if getattr(new, s) != getattr(self.cfg, s)]
        fixed += [f"watch.{k}" for k in ("state_dir", "workers", "queue_size")
                  if getattr(new.watch, k) != getattr(self.cfg.watch, k)]
        self.cfg = replace(new, frontend=self.cfg.frontend, audio=self.cfg.audio, backend=self.cfg.backend,
                           metrics=self.cfg.metrics, watch=pipeline.cfg.watch)
        notify("READY=1")
        log.info("configuration reloaded", extra={"log_level": new.log.level, "max_batch": new.batcher.max_batch,
                                                  "max_wait_ms": new.batcher.max_wait_ms,
                                                  "needs_restart": ",".join(fixed) or "none"})


def identify_files(cfg: Config, paths: Sequence[str | os.PathLike], *, backend: BackendLike | None = None,
                   metrics: Metrics | None = None, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Judge files once through the same pipeline (no state kept); one record per file, in order.
    With ``registry.path`` and no model, open set only (:func:`load_served`). ``on_record(record)`` is
    called (from the writer thread) as each verdict is made, in the order they finish."""
    metrics = metrics or Metrics()
    device = resolve_device(cfg.backend.device)
    own = backend is None
    served: BackendLike | OpenSetOnly
    if backend is None:
        served = load_served(cfg, metrics, device=device)
    else:
        check_frontend(backend.frontend, cfg.frontend, model=backend.describe().get("model", backend.name))
        served = backend
    journal = Journal(":memory:")
    records: dict[int, dict] = {}
    pipeline = Pipeline(cfg, served, journal=journal, verdict_log=None, metrics=metrics,
                        device=device, rejudge_duplicates=True,
                        on_record=lambda r: (records.__setitem__(r["id"], r), on_record and on_record(r)),
                        judge=None if isinstance(served, OpenSetOnly) else registry_judge(cfg, device))
    pipeline.start()
    try:
        ids = [pipeline.submit(os.path.abspath(p)) for p in paths]
        pipeline.drain(float("inf"))
    finally:
        pipeline.stop()
        journal.close()
        if own:
            served.close()  # type: ignore[union-attr]
    out = []
    for path, i in zip(paths, ids):
        if i is None:
            continue  # the same file named twice: one verdict
        out.append(records.get(i) or failed_record(str(path), "internal", "no verdict was recorded (see the log)",
                                                    timings={}))
    return out
