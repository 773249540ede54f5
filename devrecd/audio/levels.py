"""Level, peak, DC offset and clipping of audio: one meter for evidence files and live windows.

Files are measured block by block as they are decoded (the meter keeps running sums, never the
samples), live windows one window at a time. A file whose level is abnormal is still judged, but
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
    """RMS level in dB relative to full scale (a full-scale square wave is 0 dBFS)."""
    meter = LevelMeter()
    meter.update(x)
    return meter.dbfs


class LevelMeter:
    """Running level statistics of a mono signal fed in blocks."""

    def __init__(self) -> None:
        self.n = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self.peak = 0.0
        self._clipped = 0

    def update(self, x: np.ndarray) -> None:
        """Add one block (float samples, nominally in [-1, 1])."""
        x = np.asarray(x)
        if x.size == 0:
            return
        x64 = x.astype(np.float64, copy=False)  # one block at a time: float64 only for the sums
        self._sum += float(x64.sum())
        self._sumsq += float(np.dot(x64.ravel(), x64.ravel()))
        mag = np.abs(x)
        self.peak = max(self.peak, float(mag.max()))
        self._clipped += int(np.count_nonzero(mag >= FULL_SCALE))
        self.n += x.size

    @property
    def dbfs(self) -> float:
        """RMS level, dBFS (-inf for digital silence)."""
        ms = self._sumsq / self.n if self.n else 0.0
        return 10.0 * math.log10(ms) if ms > 0 and math.isfinite(ms) else (math.inf if ms > 0 else -math.inf)

    @property
    def dc_offset(self) -> float:
        """Mean sample value."""
        return self._sum / self.n if self.n else 0.0

    @property
    def clip_fraction(self) -> float:
        """Share of samples at full scale."""
        return self._clipped / self.n if self.n else 0.0

    def flags(self, *, clip_fraction: float, dc_offset: float, loud_dbfs: float) -> list[str]:
        """What is abnormal about the signal: ``clipping``, ``over_full_scale``, ``dc_offset``, ``loud``."""
        out = []
        if clip_fraction > 0 and self.clip_fraction >= clip_fraction:
            out.append("clipping")
        if self.peak > 1.0:
            out.append("over_full_scale")  # float samples beyond +-1: not what any converter writes
        if dc_offset > 0 and abs(self.dc_offset) >= dc_offset:
            out.append("dc_offset")
        if self.dbfs > loud_dbfs:
            out.append("loud")
        return out

    def summary(self, *, clip_fraction: float, dc_offset: float, loud_dbfs: float) -> dict:
        """The levels block of a verdict."""
        def num(v: float) -> float | None:
            return round(v, 6) if math.isfinite(v) else None

        return {"rms_dbfs": num(self.dbfs), "peak": num(self.peak), "dc_offset": num(self.dc_offset),
                "clip_fraction": num(self.clip_fraction),
                "flags": self.flags(clip_fraction=clip_fraction, dc_offset=dc_offset, loud_dbfs=loud_dbfs)}


@dataclass(frozen=True)
class Level:
    """What the meter says about one live window."""

    dbfs: float  # RMS level, dBFS (-inf for digital silence)
    peak: float  # max |x|
    clip_fraction: float  # share of samples at full scale
    status: str  # "ok" | "silent" | "clipped"


def measure(x: np.ndarray, *, silence_dbfs: float, clip_fraction: float) -> Level:
    """Level, peak and clipping of a mono window, and whether it is judged (status "ok")."""
    meter = LevelMeter()
    meter.update(np.asarray(x, dtype=np.float32))
    if meter.dbfs < silence_dbfs:
        status = "silent"
    elif "clipping" in meter.flags(clip_fraction=clip_fraction, dc_offset=0.0, loud_dbfs=math.inf):
        status = "clipped"
    else:
        status = "ok"
    return Level(dbfs=meter.dbfs, peak=meter.peak, clip_fraction=meter.clip_fraction, status=status)
