"""A single-producer / single-consumer sample ring for the audio callback.

The producer (PortAudio's callback thread) only copies a block in and moves ``written`` forward;
the consumer (the windower) only reads and moves ``consumed`` forward. Each index is written by
one side only and published after the data (a plain int store is atomic under the GIL), so no lock
is ever taken and the callback can never block. When the consumer falls behind and a block does
not fit, the block is dropped whole, counted, and its position recorded as a *gap*: the consumer
never sees a window that silently spans missing audio.

Everything is preallocated: the callback allocates nothing but the index arithmetic.
"""

from __future__ import annotations

import numpy as np


class CaptureRates:
    """The card's rate and the model's, for what capture reports (the opened input, each window):
    ``resampled`` when they differ."""

    capture_rate: int
    model_rate: int

    @property
    def resampled(self) -> bool:
        return self.capture_rate != self.model_rate


class SampleRing:
    """Bounded ring of ``(capacity, channels)`` float32 frames, with gap and arrival-time logs."""

    def __init__(self, capacity: int, channels: int = 1, *, gap_slots: int = 256, time_slots: int = 4096) -> None:
        if capacity <= 0 or channels <= 0:
            raise ValueError("capacity and channels must be positive")
        self.capacity = int(capacity)
        self.channels = int(channels)
        self._buf = np.zeros((self.capacity, self.channels), dtype=np.float32)
        self.written = 0  # frames ever accepted (producer only)
        self.consumed = 0  # frames ever taken out (consumer only)
        self.overflows = 0  # blocks dropped because the ring was full (producer only)
        self.dropped_frames = 0
        # Gap log: the ``written`` position at each drop; the audio before and after it is not contiguous.
        self._gaps = np.zeros(gap_slots, dtype=np.int64)
        self._gap_rate = np.zeros(gap_slots, dtype=np.int64)  # > 0: the audio after the gap has this rate
        self.gap_count = 0
        # Arrival log: (end position of a block, monotonic time it arrived), for window latency.
        self._arr_pos = np.zeros(time_slots, dtype=np.int64)
        self._arr_t = np.zeros(time_slots, dtype=np.float64)
        self.arrivals = 0

    # --- producer side (the audio callback) -------------------------------------------------

    def write(self, block: np.ndarray, now: float) -> bool:
        """Copy ``block`` (frames, channels) in; False (and counted) when it does not fit."""
        n = len(block)
        w = self.written
        if n > self.capacity - (w - self.consumed):
            self.overflows += 1
            self.dropped_frames += n
            if self.gap_count == 0 or self._gaps[(self.gap_count - 1) % len(self._gaps)] != w:
                self._log_gap(w, 0)
            return False
        i = w % self.capacity
        first = min(n, self.capacity - i)
        self._buf[i:i + first] = block[:first]
        if first < n:
            self._buf[:n - first] = block[first:]
        k = self.arrivals % len(self._arr_pos)
        self._arr_pos[k] = w + n
        self._arr_t[k] = now
        self.arrivals += 1
        self.written = w + n  # publish last: the consumer only reads below this index
        return True

    def mark_gap(self, rate: int = 0) -> None:
        """Record a discontinuity at the current write position (a reopened stream, at ``rate`` Hz).

        Producer side: call it only while no callback runs (between closing and opening a stream).
        """
        self._log_gap(self.written, rate)

    def _log_gap(self, pos: int, rate: int) -> None:
        k = self.gap_count % len(self._gaps)
        self._gaps[k] = pos
        self._gap_rate[k] = rate
        self.gap_count += 1  # publish last

    # --- consumer side (the windower) --------------------------------------------------------

    def available(self) -> int:
        """Frames written and not yet consumed."""
        return self.written - self.consumed

    def take(self, n: int) -> np.ndarray:
        """Copy out and consume the next ``n`` frames (``n`` <= :meth:`available`)."""
        if n > self.available():
            raise ValueError(f"only {self.available()} frames available, asked for {n}")
        r = self.consumed
        i = r % self.capacity
        first = min(n, self.capacity - i)
        out = np.empty((n, self.channels), dtype=np.float32)
        out[:first] = self._buf[i:i + first]
        if first < n:
            out[first:] = self._buf[:n - first]
        self.consumed = r + n  # frees the space for the producer
        return out

    def gap(self, k: int) -> tuple[int, int] | None:
        """(position, rate or 0) of gap number ``k``; None when it was overwritten in the log."""
        if k < self.gap_count - len(self._gaps) or k >= self.gap_count:
            return None
        i = k % len(self._gaps)
        return int(self._gaps[i]), int(self._gap_rate[i])

    def arrival_time(self, pos: int) -> float | None:
        """Monotonic time at which frame ``pos - 1`` arrived (None when no longer logged)."""
        count = self.arrivals
        slots = len(self._arr_pos)
        lo = max(0, count - slots)
        # Block end positions increase with the block number: binary search the logged window.
        a, b = lo, count
        while a < b:
            mid = (a + b) // 2
            if self._arr_pos[mid % slots] >= pos:
                b = mid
            else:
                a = mid + 1
        if a >= count or (a == lo and lo > 0):
            return None  # not arrived yet, or older than the log (the block before ``lo`` is forgotten)
        return float(self._arr_t[a % slots])
