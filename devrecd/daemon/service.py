"""The daemon (``devrecd watch``): the host of the pipeline.

It holds the state folder's lock, runs the :class:`~devrecd.pipeline.runner.Pipeline` fed by the
folder :class:`~devrecd.daemon.watcher.Watcher` (and the live input when ``live.enabled``), serves
the HTTP endpoints, talks to systemd, and handles signals (SIGTERM drains, SIGHUP reloads).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from prometheus_client import disable_created_metrics

from devrecd.config import Config, load_config
from devrecd.daemon.http import StatusServer
from devrecd.daemon.notify import WatchdogPinger, notify, watchdog_interval
from devrecd.daemon.signals import SignalRelay
from devrecd.daemon.watcher import Watcher
from devrecd.errors import ConfigError
from devrecd.fsutil import atomic_write, private_file
from devrecd.metrics import Metrics
from devrecd.pipeline.journal import JOURNAL_NAME, VERDICT_LOG_NAME, Journal, Recorder, VerdictLog
from devrecd.pipeline.procs import use_processes
from devrecd.pipeline.runner import Liveness, Pipeline, StorageRetry, Stopped
from devrecd.pipeline.serving import OpenSetOnly, load_served, registry_judge
from devrecd.stages import resolve_device

log = logging.getLogger("devrecd.daemon")

LIVE_LOG_NAME = "live.jsonl"  # per-window verdicts of the live input (live.enabled)
STATUS_NAME = "daemon.json"  # pid and endpoint URL of the running daemon (for operators and tests)
STORAGE_WAIT_EXTEND_S = 60.0  # systemd's start timeout extended by this at each retry of an unwritable state folder


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
        self._signals: SignalRelay | None = None
        self.url: str | None = None  # the HTTP endpoints', once they serve (before the daemon is ready)

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
        cfg = self.cfg
        disable_created_metrics()  # *_created series only add noise to every counter and histogram
        metrics = Metrics()
        liveness = Liveness()
        # The state folder is opened (and written at start) through this: on a full disk or a read-only
        # file system the daemon waits, not ready, retrying with backoff, and starts once it can write.
        storage = StorageRetry(metrics, liveness, self._stop)
        state: dict[str, Any] = {"ready": False, "pipeline": None}
        server = self._status_server(metrics, liveness, storage, state)
        backend = watcher = pinger = journal = verdict_log = None
        try:
            self._install_signals()  # SIGTERM also ends a wait for the state folder
            journal, verdict_log = storage(self._open_state, before_retry=lambda: self._waiting_for_storage(storage))
            device = resolve_device(cfg.backend.device)
            backend = load_served(cfg, metrics, device=device)
            if cfg.live.enabled and isinstance(backend, OpenSetOnly):
                raise ConfigError("live.enabled needs a closed-set model (backend.model): the live input is "
                                  "judged window by window through the batcher")
            judge = None if isinstance(backend, OpenSetOnly) else registry_judge(cfg, device)
            pipeline = Pipeline(cfg, backend, journal=journal, verdict_log=verdict_log, metrics=metrics,
                                device=device, liveness=liveness, judge=judge, roots=self.dirs,
                                processes=use_processes(cfg, device, judge is not None or isinstance(backend, OpenSetOnly)))
            state["pipeline"] = pipeline
            pipeline.start()
            if cfg.live.enabled:  # a sound-card input judged through the same batcher and backend
                self._start_live(state, pipeline, backend, metrics, device)
            retried = storage(journal.retry_setup_failures)  # failures of the setup, not the file: judged again
            if retried:
                log.warning("judging again files that failed for a reason of the daemon's setup, not of the file "
                            "(their failures stay as history: devrecd verdicts --history)", extra={"count": len(retried)})
            resumed = pipeline.resume()
            watcher = Watcher(self.dirs, cfg.watch, pipeline.submit, pipeline.vanished, exclude=[self.state_dir])
            pipeline.extra_pending = watcher.pending
            watcher.start()
            state["ready"] = True
            metrics.ready.set(1)
            interval = watchdog_interval()
            if interval:
                pinger = WatchdogPinger(liveness, interval, max_age=cfg.watch.stall_seconds)
                pinger.start()
            url = self._write_status(server, backend)
            notify("READY=1\nSTATUS=watching " + ", ".join(self.dirs))
            log.info("ready", extra={"dirs": ",".join(self.dirs), "url": url, "backend": backend.name,
                                     "device": device, "inference_streams": pipeline.streams, "resumed": resumed, "polling": ",".join(watcher.polled) or "none"})
            while not self._stop.wait(0.2):
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload(pipeline, watcher)
            return self._drain(state, metrics, watcher, journal)
        except Stopped:  # asked to stop while the state folder could not be written: nothing was lost
            log.info("stopped while waiting for the state folder to be writable")
            return 0
        finally:
            try:
                for part in (pinger, state.get("live"), watcher, state["pipeline"]):
                    if part is not None:
                        part.stop()
                if backend is not None:
                    backend.close()
                if server is not None:
                    server.stop()
                for part in (verdict_log, state.get("live_log"), journal):
                    if part is not None:
                        part.close()
                (self.state_dir / STATUS_NAME).unlink(missing_ok=True)
            finally:
                self._restore_signals()  # last, and whatever the cleanup raised

    def _status_server(self, metrics: Metrics, liveness: Liveness, storage: StorageRetry,
                       state: dict[str, Any]) -> StatusServer | None:
        """The HTTP endpoints (metrics, /healthz, /readyz), serving from before the daemon is ready;
        None with ``metrics.enabled`` off. ``state``: the pipeline, readiness and live input as they come."""
        cfg = self.cfg
        if not cfg.metrics.enabled:
            return None
        stall = cfg.watch.stall_seconds

        def healthy() -> tuple[bool, str]:
            p = state["pipeline"]
            if p is not None and p.in_flight() and liveness.age() > stall:
                return False, f"stalled: no progress for {liveness.age():.0f} s with {p.in_flight()} files in flight"
            return True, "ok"

        def ready() -> tuple[bool, str]:
            p = state["pipeline"]
            error = storage.error or (p.storage_error if p is not None else None)
            if error is not None:
                return False, f"cannot write the state folder (files wait, retried): {error}"
            if not state["ready"]:
                return False, "starting: model loading or sources not running"
            if state.get("live") is not None:
                live_ok, why = state["live"].ready()
                if not live_ok:
                    return False, f"live input: {why}"
            return True, "ready"

        server = StatusServer(metrics.registry, cfg.metrics.address, cfg.metrics.port, healthy=healthy, ready=ready)
        server.start()
        self.url = server.url
        return server

    def _start_live(self, state: dict[str, Any], pipeline: Pipeline, backend: Any, metrics: Metrics, device: str) -> None:
        """The live input (``live.enabled``), its windows judged through the pipeline's batcher; its
        records go to the live log of the state folder."""
        from devrecd.live.source import LiveSource  # only where live.enabled: sounddevice and the capture

        live = LiveSource(self.cfg, pipeline.batcher, labels=backend.labels, backend_info=backend.describe(),
                          metrics=metrics, device=device)
        state["live_log"] = VerdictLog(self.state_dir / LIVE_LOG_NAME)
        live.start(state["live_log"].append)
        state["live"] = live

    def _write_status(self, server: StatusServer | None, backend: Any) -> str | None:
        """The status file of the state folder (pid, endpoint URL, dirs, backend), for operators; -> the URL."""
        status = {"pid": os.getpid(), "url": server.url if server else None, "dirs": self.dirs,
                  "backend": backend.describe(), "started": time.time()}
        try:
            atomic_write(self.state_dir / STATUS_NAME, json.dumps(status, default=str), mode=0o640)
        except OSError as exc:  # for operators only: the daemon serves without it
            log.warning("cannot write the status file", extra={"path": str(self.state_dir / STATUS_NAME),
                                                               "error": exc.strerror or str(exc)})
        return status["url"]

    def _drain(self, state: dict[str, Any], metrics: Metrics, watcher: Watcher, journal: Journal) -> int:
        """Asked to stop: not ready, no new files, the files in flight finished (up to
        ``watch.shutdown_timeout``; the rest resume at the next start). -> the exit code."""
        pipeline = state["pipeline"]
        notify("STOPPING=1")
        state["ready"] = False
        metrics.ready.set(0)
        log.info("stopping: draining in-flight files", extra={"in_flight": pipeline.in_flight(),
                                                              "timeout_s": self.cfg.watch.shutdown_timeout})
        watcher.stop()
        drained = pipeline.drain(self.cfg.watch.shutdown_timeout)
        if not drained:
            log.warning("shutdown timeout: unfinished files resume at the next start",
                        extra={"in_flight": pipeline.in_flight()})
        log.info("stopped", extra={"drained": drained, **journal.counts()})
        return 0

    def _open_state(self) -> tuple[Journal, VerdictLog]:
        """The journal and the verdict log of the state folder, the records a crash kept out of the log
        appended; :class:`~devrecd.pipeline.journal.JournalError` (nothing left open) when they cannot
        be opened or written."""
        journal = Journal(self.state_dir / JOURNAL_NAME)
        verdict_log = None
        try:
            verdict_log = VerdictLog(self.state_dir / VERDICT_LOG_NAME)
            repaired = Recorder(journal, verdict_log).repair()
        except BaseException:
            for part in (verdict_log, journal):
                if part is not None:
                    part.close()
            raise
        if repaired:
            log.warning("appended verdicts a crash kept out of the verdict log", extra={"count": repaired})
        return journal, verdict_log

    @staticmethod
    def _waiting_for_storage(storage: StorageRetry) -> None:
        """Before each retry of the start: systemd's start timeout is extended while the daemon waits
        on purpose (Type=notify), and its status says why."""
        notify(f"EXTEND_TIMEOUT_USEC={int(STORAGE_WAIT_EXTEND_S * 1e6)}\n"
               f"STATUS=waiting for the state folder to be writable: {storage.error}")

    def _install_signals(self) -> None:
        """SIGTERM and SIGINT stop the daemon, SIGHUP reloads it, relayed from a thread of their own
        (:mod:`devrecd.daemon.signals`: an ``Event.set()`` in a signal handler can wait forever)."""
        # Lease breaks are signalled with SIGURG (see watcher.open_for_writing); SIGIO stays
        # ignored as well, since its default action would end the daemon.
        self._signals = SignalRelay({signal.SIGTERM: self._stop, signal.SIGINT: self._stop,
                                     signal.SIGHUP: self._reload}, ignored=(signal.SIGIO,))
        self._signals.install()  # not from another thread (embedded: the caller stops us with request_stop())

    def _restore_signals(self) -> None:
        """The handlers and wakeup fd as they were before :meth:`_install_signals`."""
        if self._signals is not None:
            self._signals.restore()

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
        # What a reload cannot change (loaded once, or sizes of running threads and queues): said, kept.
        fixed = [s for s in ("frontend", "audio", "backend", "metrics", "registry", "live")
                 if getattr(new, s) != getattr(self.cfg, s)]
        fixed += [f"watch.{k}" for k in ("state_dir", "workers", "processes", "queue_size")
                  if getattr(new.watch, k) != getattr(self.cfg.watch, k)]
        fixed += [f"batcher.{k}" for k in ("streams", "max_queued_clips")
                  if getattr(new.batcher, k) != getattr(self.cfg.batcher, k)]
        self.cfg = replace(new, frontend=self.cfg.frontend, audio=self.cfg.audio, backend=self.cfg.backend,
                           metrics=self.cfg.metrics, registry=self.cfg.registry, live=self.cfg.live,
                           watch=pipeline.cfg.watch, batcher=pipeline.cfg.batcher)
        notify("READY=1")
        log.info("configuration reloaded", extra={"log_level": new.log.level, "max_batch": new.batcher.max_batch,
                                                  "max_wait_ms": new.batcher.max_wait_ms,
                                                  "needs_restart": ",".join(fixed) or "none"})
