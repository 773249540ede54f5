"""Worker processes: the per-file CPU stage of the runner in child processes (``watch.processes``).

The per-file work of an open-set verdict (decode, level meter, condition measurement, features, GSV
statistics, the registry judge with its noise-matched references) is many small numpy calls, part of
them holding the GIL. Measured on 2 idle cores (docs/daemon.md), two worker threads kept 1.4 of them
busy, and two worker processes judged 1.41x their files/s (1.74x the naive loop's, against 1.24x; one
A/B run of two rounds): processes are the default where a registry
judges on the CPU (``watch.processes = "auto"``; ``never`` keeps threads). With worker processes each of the ``watch.workers`` threads of the runner owns one
child process (spawned, its own interpreter) that opens, hashes, decodes and judges the files the
thread hands it; the thread only talks to its child and does what must stay in the one daemon
process: the journal (``mark_hashed``, the duplicate checks), the in-flight bookkeeping, the batcher
(a closed-set model's chunks) and the messages to the writer. The evidence is still opened
read-only, by the child.

One file is a short conversation on the child's pipe (parent ``->``, child ``<-``)::

    -> Task(path, confine, chunked, whole)
    <- ("hashed", sha256, size, resolved_path)      the parent marks it hashed, asks the journal
    -> duplicate?                                   True: nothing is scored or sent for inference
    <- ("chunk", features, first) ...               only ``chunked`` (a closed-set model infers them)
    <- ("described", recording, starts, features, timings)   features only where needed whole
    -> judge?
    <- ("judged", fields, seconds)                  only when asked
    <- ("failed", Failure, resolved_path, traceback)  at any step instead: the file's failure

A child that dies (a crash in a decoder, the OOM killer, a signal) is seen at once (its end of
the pipe closes): that file is recorded as failed (``worker_crashed``), the thread starts a new
child for its next file, and no other file is affected. A conversation the parent abandons (the
pipeline stopping, a journal error) ends the child too, so a new one never starts out of step.
Each child loads the registry's scorer once; children ignore SIGINT/SIGTERM (the daemon stops
them) and exit when the daemon's end of the pipe closes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from devrecd.config import Config
from devrecd.stages import Failure

log = logging.getLogger("devrecd.pipeline")

CRASHED = "worker_crashed"  # the failure reason of a file whose worker process died under it
START_TIMEOUT_S = 300.0  # a child that is not ready by then is given up (the thread judges in-process)


@dataclass(frozen=True)
class Task:
    """One file for a child: where it is, where it may lead, whether its chunks come back."""

    path: str
    confine: list[str] | None
    chunked: bool  # features sent back chunk by chunk (a closed-set model infers them)
    whole: bool  # features sent back whole (the batcher takes the file in one unit)


class ChildFailed(Exception):
    """The file failed in the child (an error the child recorded, not a crash)."""

    def __init__(self, failure: Failure, resolved_path: str | None, internal: str | None) -> None:
        super().__init__(failure.detail)
        self.failure, self.resolved_path, self.internal = failure, resolved_path, internal


class ChildCrashed(Exception):
    """The child process ended in the middle of a file."""


def use_processes(cfg: Config, device: str, judging: bool) -> bool:
    """Whether the runner's per-file stage runs in worker processes (``watch.processes``, default
    ``auto``): ``auto`` = where a registry judges (open set, alone or beside a model) on the CPU;
    ``always`` = on the CPU, a closed-set model alone too; ``never`` = threads. Never on a GPU."""
    mode = cfg.watch.processes
    if mode == "never" or not str(device).startswith("cpu"):
        return False
    return mode == "always" or judging


# --- the child -------------------------------------------------------------------------------

def child_main(conn: Any, cfg: Config, judging: bool, adopt_frontend: bool) -> None:
    """The child process: load the registry's scorer once, then judge files until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from devrecd.logs import setup_logging
    from devrecd.pipeline.threads import one_blas_thread

    setup_logging(cfg.log.level, cfg.log.format)
    one_blas_thread()  # one file per process: the processes are the parallelism
    judge = None
    try:
        if judging:
            from devrecd.openset.workflow import RegistryJudge

            judge = RegistryJudge(cfg, adopt_frontend=adopt_frontend)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which judges in-process instead
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the daemon is gone
        if task is None:
            return
        try:
            _judge_file(conn, task, cfg, judge)
        except (EOFError, BrokenPipeError):
            return
        except Exception as exc:  # noqa: BLE001 - one file's failure, recorded by the parent
            from devrecd.errors import DevrecdError
            from devrecd.stages import failure_of

            internal = None if isinstance(exc, DevrecdError) else traceback.format_exc()
            conn.send(("failed", failure_of(exc), getattr(exc, "resolved_path", None), internal))


def _judge_file(conn: Any, task: Task, cfg: Config, judge: Any) -> None:
    from devrecd.audio import open_stream
    from devrecd.stages import stream_features

    t0 = time.perf_counter()
    spent: dict[str, float] = {}
    waited = 0.0  # on the parent (its answers, room for chunks): not decoding
    accumulated = judge.accumulator() if judge is not None else None
    with open_stream(task.path, cfg.frontend.sample_rate, cfg.audio, confine=task.confine) as stream:
        conn.send(("hashed", stream.sha256, stream.size, stream.resolved_path))
        t1 = time.perf_counter()
        duplicate = conn.recv()
        waited += time.perf_counter() - t1

        def feed(feats: Any, first: int) -> None:
            nonlocal waited
            if accumulated is not None:
                t2 = time.perf_counter()
                accumulated.add(feats)
                spent["scoring"] = spent.get("scoring", 0.0) + time.perf_counter() - t2
            if task.chunked:
                t2 = time.perf_counter()
                conn.send(("chunk", feats, first))
                waited += time.perf_counter() - t2

        sink: Callable[[Any, int], None] | None = None
        if task.chunked or accumulated is not None:
            sink = (lambda feats, first: None) if duplicate else feed
        feats, starts = stream_features(stream, cfg, timings=spent, sink=sink)
        recording = stream.describe()
    spent["decode"] = time.perf_counter() - t0 - spent["features"] - spent.get("scoring", 0.0) - waited
    whole = feats if task.whole and not duplicate else None
    conn.send(("described", recording, starts, whole, spent))
    if not conn.recv():  # not to be judged here (a duplicate, or no registry)
        return
    t1 = time.perf_counter()
    fields = judge.judge(accumulated if accumulated is not None else feats, recording)
    conn.send(("judged", fields, time.perf_counter() - t1))


# --- the parent ------------------------------------------------------------------------------

class WorkerProcess:
    """The child process of one worker thread (started on first use, again after it ended)."""

    def __init__(self, name: str, cfg: Config, *, judging: bool, adopt_frontend: bool, stopping: Any) -> None:
        self.name, self.cfg, self.judging, self.adopt_frontend = name, cfg, judging, adopt_frontend
        self._stopping = stopping  # threading.Event: the pipeline stops (waits end early)
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self.unusable: str | None = None  # why no child can be started (the thread then judges in-process)
        self.restarts = 0

    def start(self) -> None:
        """Start the child (its scorer loads while the caller goes on)."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        parent, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=child_main, name=self.name, daemon=True,
                                 args=(child, self.cfg, self.judging, self.adopt_frontend))
        self._proc.start()
        child.close()  # only the child holds its end: its exit closes the pipe
        self._conn = parent
        self._ready = False

    def usable(self) -> bool:
        """A live, loaded child (started, or started again, as needed); False if none can be had."""
        if self.unusable is not None:
            return False
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self.restarts += 1
                log.warning("worker process ended: starting a new one",
                            extra={"worker": self.name, "exit_code": self._proc.exitcode})
                self._close_conn()
            self.start()
        if not self._ready:
            try:
                msg = self.recv(deadline=time.monotonic() + START_TIMEOUT_S)
            except ChildCrashed as exc:
                msg = ("error", str(exc))
            if msg[0] != "ready":
                self.unusable = str(msg[1])
                log.error("no worker process: judging in the worker thread", extra={"worker": self.name, "error": msg[1]})
                self.close()
                return False
            self._ready = True
        return True

    def send(self, obj: Any) -> None:
        try:
            self._conn.send(obj)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as exc:
            raise ChildCrashed(self._ended()) from exc

    def recv(self, deadline: float | None = None) -> Any:
        """The child's next message; raises :class:`ChildCrashed` if it died, :class:`ChildFailed`
        for the file's failure, and ``Stopped`` if the pipeline stops meanwhile."""
        from devrecd.pipeline.retry import Stopped

        while not self._conn.poll(0.2):
            if self._stopping.is_set():
                raise Stopped()
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise ChildCrashed(self._ended())
            if deadline is not None and time.monotonic() > deadline:
                raise ChildCrashed("the worker process did not answer in time")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise ChildCrashed(self._ended()) from exc
        if msg[0] == "failed":
            raise ChildFailed(*msg[1:])
        return msg

    def expect(self, kind: str) -> Any:
        msg = self.recv()
        if msg[0] != kind:  # out of step: never go on with this child
            self.abandon()
            raise RuntimeError(f"worker process said {msg[0]!r}, expected {kind!r}")
        return msg

    def _ended(self) -> str:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"the worker process judging this file ended ({how})"

    def abandon(self) -> None:
        """End the child in the middle of a file (the next file gets a new one)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._close_conn()
        self._proc = None

    def close(self) -> None:
        """Stop the child: asked first, then ended."""
        if self._proc is None:
            return
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        self._close_conn()
        self._proc = None

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def prepare_in_child(p: Any, child: WorkerProcess, job: Any) -> None:
    """The runner's per-file stage (:meth:`Pipeline._prepare`) with ``child`` doing the work; ``p`` is
    the :class:`~devrecd.pipeline.runner.Pipeline`. What it hands the writer and the batcher is
    what the in-process stage hands them."""
    try:
        _converse(p, child, job)
    except (ChildFailed, ChildCrashed):
        raise  # the child is back at its loop (failed), or gone (crashed)
    except BaseException:
        child.abandon()  # out of step in the middle of a file: never reused
        raise


def _converse(p: Any, child: WorkerProcess, job: Any) -> None:
    from devrecd.pipeline.batcher import Unit
    from devrecd.pipeline.jobs import Duplicate, FeaturesDone, Scored
    from devrecd.pipeline.retry import Stopped

    cfg = p.cfg
    confine = None if p.roots is None or cfg.watch.follow_external_links else list(p.roots)
    accumulating = p.accumulator is not None
    chunked = p.batcher is not None and (p.judge is None or accumulating)
    child.send(Task(job.path, confine, chunked, whole=p.batcher is not None and not chunked))
    _, sha256, size, job.resolved_path = child.expect("hashed")
    p.storage(lambda: p.journal.mark_hashed(job.entry_id, sha256 or "", size or 0))
    job.sha256, job.size = sha256, size
    if sha256:
        p._hold_content(job, sha256)
    original = None
    if (chunked or accumulating) and not p.rejudge and sha256:
        original = p.journal.judged_with(sha256, exclude=job.entry_id)
    child.send(original is not None)  # a duplicate's chunks are neither inferred nor scored
    while (msg := child.recv())[0] == "chunk":
        p._put_chunk(job, msg[1], msg[2])
    if msg[0] != "described":
        raise RuntimeError(f"worker process said {msg[0]!r}, expected 'described'")
    _, job.recording, job.starts, feats, spent = msg
    job.timings.update(spent)  # decode, features, scoring (the accumulator's part): the child's own
    if not p.rejudge:
        original = original or p.journal.judged_with(job.recording["sha256"], exclude=job.entry_id)
    judge = p.judge is not None and original is None
    child.send(judge)
    if original is not None:  # judged before under another name: no inference needed
        p._results.put(Duplicate(job, original))
        return
    if judge:  # the registry's verdict, in the child
        _, fields, seconds = child.expect("judged")
        job.timings["scoring"] = job.timings.get("scoring", 0.0) + seconds
        if p.batcher is None:  # open set only: that is the verdict
            p._results.put(Scored(job, fields))
            return
        job.open_set = fields
    if chunked:
        p._results.put(FeaturesDone(job, len(job.starts)))
        return
    if not p.batcher.put(Unit(key=job, features=feats), p._stop):
        raise Stopped()
