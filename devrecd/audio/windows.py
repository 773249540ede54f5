"""Cutting a recording into the fixed-length clips the network takes.

Rule: clips of ``clip`` samples every ``hop`` samples from the start. If the last clip leaves an
uncovered tail of at least half a hop, one more clip is added that ends exactly at the last
sample (so the end of a recording is never silently dropped). A recording shorter than one clip
(allowed only when ``audio.min_seconds`` is below the clip length) is wrap-padded: repeated
from its start until it fills one clip.
"""

from __future__ import annotations

import numpy as np


def window_starts(n_samples: int, clip: int, hop: int) -> np.ndarray:
    """Start offsets of the clips cut from ``n_samples`` samples."""
    if clip <= 0 or hop <= 0:
        raise ValueError("clip and hop must be positive")
    if n_samples <= clip:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, n_samples - clip + 1, hop, dtype=np.int64)
    tail = n_samples - (starts[-1] + clip)
    if tail >= hop / 2:
        starts = np.append(starts, n_samples - clip)
    return starts


def cut_windows(samples: np.ndarray, clip: int, hop: int) -> np.ndarray:
    """(n_windows, clip) float32 clips; a view into ``samples`` where possible."""
    samples = np.asarray(samples, dtype=np.float32)
    if len(samples) < clip:
        return np.resize(samples, clip)[None]  # wrap-pad a short recording
    starts = window_starts(len(samples), clip, hop)
    view = np.lib.stride_tricks.sliding_window_view(samples, clip)
    return view[starts]


class StreamWindower:
    """The same clips as :func:`cut_windows`, cut from a recording fed block by block.

    Only the samples a future clip still needs are kept (at most one clip plus one block), so a
    long recording is windowed without ever being held whole.
    """

    def __init__(self, clip: int, hop: int) -> None:
        if clip <= 0 or hop <= 0:
            raise ValueError("clip and hop must be positive")
        self.clip, self.hop = clip, hop
        self._buf = np.zeros(0, np.float32)
        self._offset = 0  # absolute index of _buf[0]
        self._next = 0  # next clip start
        self.total = 0
        self.starts: list[int] = []

    def feed(self, block: np.ndarray) -> np.ndarray:
        """Add samples; -> the (k, clip) clips now complete (k may be 0)."""
        self._buf = np.concatenate([self._buf, np.asarray(block, dtype=np.float32)])
        self.total += len(block)
        out = []
        while self._next + self.clip <= self.total:
            lo = self._next - self._offset
            out.append(self._buf[lo : lo + self.clip])
            self.starts.append(self._next)
            self._next += self.hop
        clips = np.stack(out) if out else np.zeros((0, self.clip), np.float32)
        keep = max(0, min(self._next, self.total - self.clip))  # the tail clip may need the last `clip`
        if keep > self._offset:
            self._buf = self._buf[keep - self._offset :].copy()
            self._offset = keep
        return clips

    def finish(self) -> np.ndarray:
        """-> the last clips: the wrap-padded clip of a short recording, or the clip ending at the last sample."""
        n = self.total
        if n == 0:
            return np.zeros((0, self.clip), np.float32)
        if n < self.clip:
            self.starts.append(0)
            return np.resize(self._buf, self.clip)[None]  # wrap-pad, as cut_windows does
        last = self.starts[-1]
        if n > self.clip and n - (last + self.clip) >= self.hop / 2:
            self.starts.append(n - self.clip)
            lo = n - self.clip - self._offset
            return self._buf[lo : lo + self.clip][None].copy()
        return np.zeros((0, self.clip), np.float32)
