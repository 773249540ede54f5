"""Dynamic batching across files: flush at ``max_batch`` clips or when the oldest has waited ``max_wait``.

Any source (files, a live input) puts :class:`Unit` s of feature windows; one or more inference
threads call :meth:`Batcher.run` (several where the backend can run batches at once, e.g. one ONNX
Runtime session per CPU core: batching barely helps this network on a CPU, parallel batches do).
Batches are formed one at a time under a lock and inferred in parallel. A unit bigger than a batch
is split across batches; its probabilities are gathered back and delivered once, in window order,
when the last of its windows is inferred; a unit any of whose batches fails is failed once.
The input queue is bounded in units and in clips (``max_clips``), so producers block when inference
falls behind (backpressure) and the memory it holds is bounded by clips waiting, not by files.

Features are numpy arrays, or torch tensors on the GPU when the frontend ran there and the backend
takes them in place; a batch is gathered on the device of its first tensor (no host round trip).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Unit:
    """One producer's windows (e.g. one file's features) waiting for inference."""

    key: Any
    features: Any  # (n, 128, 73) float32: numpy, or a torch tensor on the backend's GPU
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # monotonic time its first window entered a batch
    probs: np.ndarray | None = None
    done: int = 0
    infer_seconds: float = 0.0  # share of batch inference time attributed to this unit
    failed: bool = False  # one of its batches failed: it is reported once and never delivered
    # Another source sharing the batcher (e.g. live input) routes its own results with these;
    # when unset, the loop's ``deliver`` / ``on_error`` are used.
    on_done: Callable[[Unit], None] | None = None
    on_error: Callable[[Unit, Exception], None] | None = None

    def __len__(self) -> int:
        return len(self.features)


Infer = Callable[[Any], np.ndarray]
Deliver = Callable[[Unit], None]


class Batcher:
    """Bounded queue of units plus the batching loop that each inference thread runs."""

    def __init__(self, infer: Infer, *, max_batch: int, max_wait_s: float, queue_size: int = 64,
                 max_clips: int = 0, on_batch: Callable[[int, float], None] | None = None,
                 on_progress: Callable[[bool], None] | None = None) -> None:
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch  # (clips, seconds) after each batch, for metrics
        self.on_progress = on_progress  # liveness: called with idle=True while waiting, False after a batch
        self._q: queue.Queue[Unit | None] = queue.Queue(maxsize=max(1, queue_size))  # None: a wake-up
        self.max_clips = max_clips  # clips queued at most (0 = no limit); one bigger unit may always enter
        self._queued_clips = 0
        self._room = threading.Condition()
        self._carry: tuple[Unit, int] | None = None  # the rest of a unit split at a batch boundary
        self._forming = threading.Lock()  # one inference thread forms a batch at a time (_carry)
        self._gathering = threading.Lock()  # per-unit results from batches finishing in parallel

    def configure(self, *, max_batch: int, max_wait_s: float) -> None:
        """Change the flush rule (SIGHUP); takes effect with the next batch."""
        self.max_batch, self.max_wait_s = max(1, max_batch), max(0.0, max_wait_s)

    def put(self, unit: Unit, stop: threading.Event | None = None) -> bool:
        """Queue a unit, blocking while the queue is full; False if ``stop`` was set meanwhile (a
        unit that finds room is queued even after stop: the live input's last windows are)."""
        if len(unit) == 0:
            raise ValueError("a unit needs at least one window")
        if self.max_clips:
            with self._room:
                while self._queued_clips and self._queued_clips + len(unit) > self.max_clips:
                    if stop is not None and stop.is_set():
                        return False
                    self._room.wait(0.2)
                self._queued_clips += len(unit)
        while True:
            try:
                self._q.put(unit, timeout=0.2)
                return True
            except queue.Full:
                if stop is not None and stop.is_set():
                    return False

    def wake(self, threads: int) -> None:
        """Wake up to ``threads`` inference threads waiting on an empty queue (after the stop flag
        is set), so that they return now rather than at their next poll."""
        for _ in range(threads):
            try:
                self._q.put_nowait(None)
            except queue.Full:
                return  # the others see the stop at their next poll

    def next_batch(self, stop: threading.Event, poll: float = 0.2) -> list[tuple[Unit, int, int]]:
        """Slices ``(unit, lo, hi)`` of the next batch; empty when ``stop`` is set and nothing waits."""
        with self._forming:
            return self._form_batch(stop, poll)

    def _form_batch(self, stop: threading.Event, poll: float) -> list[tuple[Unit, int, int]]:
        parts: list[tuple[Unit, int, int]] = []
        n, deadline = 0, None
        max_batch = self.max_batch
        while n < max_batch:
            if self._carry is not None:
                unit, off = self._carry
                self._carry = None
            else:
                if deadline is None:
                    timeout = poll
                else:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        break
                try:
                    unit = self._q.get(timeout=min(timeout, poll))
                    if unit is None:  # a wake-up: handled as a poll that found nothing
                        raise queue.Empty
                except queue.Empty:
                    if not parts:
                        if stop.is_set():
                            return parts
                        if self.on_progress is not None and self._q.empty():
                            self.on_progress(True)
                    elif stop.is_set():
                        break  # draining: no point waiting for more
                    continue
                off = 0
            if deadline is None:
                # The wait counts from when the oldest clip arrived, so a unit that queued behind a
                # busy backend goes out at once.
                deadline = unit.enqueued + self.max_wait_s
            take = min(len(unit) - off, max_batch - n)
            parts.append((unit, off, off + take))
            n += take
            if self.max_clips:
                with self._room:
                    self._queued_clips -= take
                    self._room.notify_all()
            if off + take < len(unit):
                self._carry = (unit, off + take)
        return parts

    def run_batch(self, parts: list[tuple[Unit, int, int]], deliver: Deliver) -> None:
        """Infer one batch and deliver every unit it completes."""
        now = time.monotonic()
        for unit, _, _ in parts:
            if unit.started is None:
                unit.started = now
        x = gather([u.features[lo:hi] for u, lo, hi in parts])
        if not _all_finite(x):  # the stages refuse such input; this is the last line of defence
            raise ValueError("non-finite features reached the batcher")
        t0 = time.perf_counter()
        probs = np.asarray(self.infer(x))
        dt = time.perf_counter() - t0
        if probs.shape[0] != len(x):
            raise RuntimeError(f"backend returned {probs.shape[0]} rows for a batch of {len(x)}")
        if self.on_batch is not None:
            self.on_batch(len(x), dt)
        row = 0
        for unit, lo, hi in parts:
            with self._gathering:
                if unit.probs is None:
                    unit.probs = np.empty((len(unit), probs.shape[1]), dtype=np.float32)
                unit.probs[lo:hi] = probs[row:row + hi - lo]
                unit.done += hi - lo
                unit.infer_seconds += dt * (hi - lo) / len(x)
                complete = unit.done == len(unit) and not unit.failed
            row += hi - lo
            if complete:
                (unit.on_done or deliver)(unit)
        if self.on_progress is not None:
            self.on_progress(False)

    def run(self, stop: threading.Event, deliver: Deliver, on_error: Callable[[Unit, Exception], None]) -> None:
        """The inference loop: until ``stop`` is set and the queue is found empty, or a wake-up
        (:meth:`wake`) is reached: units queued before the wake-ups are inferred, a unit queued
        behind them is left (the runner's file then stays unfinished in its journal and is resumed).

        A batch that fails fails each of its units (``on_error``), not the loop.
        """
        while True:
            parts = self.next_batch(stop)
            if not parts:
                return
            try:
                self.run_batch(parts, deliver)
            except Exception as exc:  # noqa: BLE001 - a backend error must not kill the daemon
                for unit in {id(u): u for u, _, _ in parts}.values():
                    with self._forming:  # the unit's remaining windows are not worth inferring
                        if self._carry is not None and self._carry[0] is unit:
                            dropped = len(unit) - self._carry[1]
                            self._carry = None
                            if self.max_clips:  # they leave the queue: their room is free again
                                with self._room:
                                    self._queued_clips -= dropped
                                    self._room.notify_all()
                    with self._gathering:
                        first = not unit.failed
                        unit.failed = True
                    if first:
                        (unit.on_error or on_error)(unit, exc)


def _all_finite(x: Any) -> bool:
    """No NaN or infinity in a batch (numpy, or a torch tensor on its device)."""
    if isinstance(x, np.ndarray):
        return bool(np.isfinite(x).all())
    import torch

    return bool(torch.isfinite(x).all())


def gather(pieces: list[Any]) -> Any:
    """One contiguous float32 batch from slices of units: numpy, or, when any slice is a torch tensor
    (features left on the GPU), a tensor on that tensor's device (numpy slices, e.g. live input, copied there)."""
    tensor = next((p for p in pieces if not isinstance(p, np.ndarray)), None)
    if tensor is None:
        x = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return np.ascontiguousarray(x, dtype=np.float32)
    import torch

    parts = [p if isinstance(p, torch.Tensor) else torch.from_numpy(np.asarray(p, np.float32)) for p in pieces]
    parts = [p.to(tensor.device, torch.float32) for p in parts]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)
