"""Level, peak, DC offset and clipping of audio: one meter for evidence files and live windows.

Files are measured block by block as they are decoded, on each channel before the channels are
mixed (the meter keeps running sums per channel, never the samples), live windows one window at a
time. A file whose level is abnormal is still judged, but
its verdict carries the flags so that an examiner sees the input was not a normal recording; a
live window that is silent or clipped is reported instead of judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A sample at or above this magnitude counts as full scale (int16 full scale is 32767/32768).
FULL_SCALE = 32767.0 / 32768.0


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level of all of ``x`` in dB relative to full scale (a full-scale square wave is 0 dBFS)."""
    meter = LevelMeter()
    meter.update(np.ravel(x))
    return meter.dbfs


_FLAG_ORDER = ("clipping", "over_full_scale", "dc_offset", "loud", "dead_channel", "channels_cancel")
# A channel that never exceeds one 16-bit step while another carries signal is dead (a disconnected
# input, a mono source written to one side): flagged "dead_channel".
DEAD_PEAK = 1.0 / 32768.0


class LevelMeter:
    """Running level statistics of a signal fed in blocks, per channel.

    Blocks are (frames,) for one channel or (frames, channels) before any mixing: a clipped channel
    averaged with a clean one is clipped no more in the mix, so abnormal levels are measured on each
    channel. The scalar properties are those of the worst channel (:meth:`worst_channel`).
    """

    def __init__(self) -> None:
        self._n = np.zeros(0, np.int64)  # frames seen per channel
        self._sum = np.zeros(0)
        self._sumsq = np.zeros(0)
        self._peak = np.zeros(0)
        self._clipped = np.zeros(0, np.int64)

    def update(self, x: np.ndarray) -> None:
        """Add one block (float samples, nominally in [-1, 1])."""
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[:, None]
        if x.size == 0:
            return
        c = x.shape[1]
        if c > len(self._n):  # first block, or a decoder that revised its channel layout
            grow = c - len(self._n)
            self._n, self._clipped = (np.concatenate([a, np.zeros(grow, np.int64)]) for a in (self._n, self._clipped))
            self._sum, self._sumsq, self._peak = (np.concatenate([a, np.zeros(grow)]) for a in (self._sum, self._sumsq, self._peak))
        x64 = x.astype(np.float64, copy=False)  # one block at a time: float64 only for the sums
        self._sum[:c] += x64.sum(axis=0)
        self._sumsq[:c] += np.einsum("ij,ij->j", x64, x64)
        mag = np.abs(x)
        self._peak[:c] = np.maximum(self._peak[:c], mag.max(axis=0))
        self._clipped[:c] += np.count_nonzero(mag >= FULL_SCALE, axis=0)
        self._n[:c] += len(x)

    @property
    def channels(self) -> int:
        return len(self._n)

    @property
    def n(self) -> int:
        """Frames seen (of the channel seen longest)."""
        return int(self._n.max()) if len(self._n) else 0

    def ac_dbfs(self, c: int = 0) -> float:
        """RMS level of channel ``c`` with its DC removed, dBFS (-inf when it carries no AC at all: a
        constant, even one at full scale, is no signal)."""
        n = self._n[c] if len(self._n) > c else 0
        if not n:
            return -math.inf
        mean = self._sum[c] / n
        ms = max(0.0, self._sumsq[c] / n - mean * mean)
        return 10.0 * math.log10(ms) if ms > 1e-20 else -math.inf

    def _dbfs(self, c: int) -> float:
        ms = self._sumsq[c] / self._n[c] if self._n[c] else 0.0
        return 10.0 * math.log10(ms) if ms > 0 and math.isfinite(ms) else (math.inf if ms > 0 else -math.inf)

    def _stats(self, c: int) -> tuple[float, float, float, float]:
        """(RMS dBFS, peak, DC offset, clip fraction) of channel ``c``."""
        n = self._n[c]
        return (self._dbfs(c), float(self._peak[c]), float(self._sum[c] / n) if n else 0.0,
                float(self._clipped[c] / n) if n else 0.0)

    def _channel_flags(self, c: int, clip_fraction: float, dc_offset: float, loud_dbfs: float) -> list[str]:
        dbfs, peak, dc, clipped = self._stats(c)
        out = []
        if clip_fraction > 0 and clipped >= clip_fraction:
            out.append("clipping")
        if peak > 1.0:
            out.append("over_full_scale")  # float samples beyond +-1: not what any converter writes
        if dc_offset > 0 and abs(dc) >= dc_offset:
            out.append("dc_offset")
        if dbfs > loud_dbfs:
            out.append("loud")
        return out

    def worst_channel(self, *, clip_fraction: float = 0.0, dc_offset: float = 0.0, loud_dbfs: float = math.inf) -> int:
        """The channel with the most flags; among equals the most clipped, then the highest peak,
        the largest DC offset and the loudest."""
        if not len(self._n):
            return 0

        def badness(c: int) -> tuple:
            dbfs, peak, dc, clipped = self._stats(c)
            return (len(self._channel_flags(c, clip_fraction, dc_offset, loud_dbfs)), clipped, peak, abs(dc), dbfs)

        return max(range(len(self._n)), key=lambda c: (badness(c), -c))

    def _worst(self) -> tuple[float, float, float, float]:
        return self._stats(self.worst_channel()) if len(self._n) else (-math.inf, 0.0, 0.0, 0.0)

    @property
    def dbfs(self) -> float:
        """RMS level of the worst channel, dBFS (-inf for digital silence)."""
        return self._worst()[0]

    @property
    def peak(self) -> float:
        """Largest |sample| of the worst channel."""
        return self._worst()[1]

    @property
    def dc_offset(self) -> float:
        """Mean sample value of the worst channel."""
        return self._worst()[2]

    @property
    def clip_fraction(self) -> float:
        """Share of the worst channel's samples at full scale."""
        return self._worst()[3]

    def flags(self, *, clip_fraction: float, dc_offset: float, loud_dbfs: float) -> list[str]:
        """What is abnormal on any channel: ``clipping``, ``over_full_scale``, ``dc_offset``, ``loud``."""
        seen = {f for c in range(len(self._n)) for f in self._channel_flags(c, clip_fraction, dc_offset, loud_dbfs)}
        if len(self._n) > 1 and (self._peak <= DEAD_PEAK).any() and (self._peak > DEAD_PEAK).any():
            seen.add("dead_channel")
        return [f for f in _FLAG_ORDER if f in seen]

    def summary(self, *, clip_fraction: float, dc_offset: float, loud_dbfs: float) -> dict:
        """The levels block of a verdict: the worst channel's figures, which channel that is (0 =
        the first) of how many, and the flags of every channel."""
        def num(v: float) -> float | None:
            return round(v, 6) if math.isfinite(v) else None

        worst = self.worst_channel(clip_fraction=clip_fraction, dc_offset=dc_offset, loud_dbfs=loud_dbfs)
        dbfs, peak, dc, clipped = self._stats(worst) if len(self._n) else (-math.inf, 0.0, 0.0, 0.0)
        return {"rms_dbfs": num(dbfs), "peak": num(peak), "dc_offset": num(dc), "clip_fraction": num(clipped),
                "channel": worst, "channels": max(1, self.channels),
                "flags": self.flags(clip_fraction=clip_fraction, dc_offset=dc_offset, loud_dbfs=loud_dbfs)}


@dataclass(frozen=True)
class Level:
    """What the meter says about one live window."""

    dbfs: float  # RMS level, dBFS (-inf for digital silence)
    peak: float  # max |x|
    clip_fraction: float  # share of samples at full scale
    status: str  # "ok" | "silent" | "clipped"


def measure(x: np.ndarray, *, silence_dbfs: float, clip_fraction: float, mix: np.ndarray | None = None) -> Level:
    """Level, peak and clipping of a window, and whether it is judged (status "ok").

    ``x`` is (frames,) mono or (frames, channels) before the mix: peak and clipping are the worst
    channel's. ``mix``, when given, is the mono window the model hears: its level decides silence
    (as for files); otherwise the worst channel's does.
    """
    meter = LevelMeter()
    meter.update(np.asarray(x, dtype=np.float32))
    worst = meter.worst_channel(clip_fraction=clip_fraction)
    dbfs, peak, _, clipped = meter._stats(worst) if meter.channels else (-math.inf, 0.0, 0.0, 0.0)
    if mix is not None:
        dbfs = rms_dbfs(np.asarray(mix, dtype=np.float32))
    if dbfs < silence_dbfs:
        status = "silent"
    elif "clipping" in meter.flags(clip_fraction=clip_fraction, dc_offset=0.0, loud_dbfs=math.inf):
        status = "clipped"
    else:
        status = "ok"
    return Level(dbfs=dbfs, peak=peak, clip_fraction=clipped, status=status)
