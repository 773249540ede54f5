"""Level meter and the two conditions a live window is reported for instead of judged.

A silent window carries no device fingerprint worth scoring (the network would score the noise
floor), and a clipped one carries the clipping more than the device; both are reported with their
level so that an operator sees why no verdict came.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devrecd.audio import rms_dbfs

# A sample at or above this magnitude counts as full scale (int16 full scale is 32767/32768).
FULL_SCALE = 32767.0 / 32768.0


@dataclass(frozen=True)
class Level:
    """What the meter says about one window."""

    dbfs: float  # RMS level, dBFS (-inf for digital silence)
    peak: float  # max |x|
    clip_fraction: float  # share of samples at full scale
    status: str  # "ok" | "silent" | "clipped"


def measure(x: np.ndarray, *, silence_dbfs: float, clip_fraction: float) -> Level:
    """Level, peak and clipping of a mono window, and whether it is judged (status "ok")."""
    x = np.asarray(x, dtype=np.float32)
    level = rms_dbfs(x)
    mag = np.abs(x)
    peak = float(mag.max()) if x.size else 0.0
    clipped = float(np.count_nonzero(mag >= FULL_SCALE)) / max(1, x.size)
    if level < silence_dbfs:
        status = "silent"
    elif clip_fraction > 0 and clipped >= clip_fraction:
        status = "clipped"
    else:
        status = "ok"
    return Level(dbfs=level, peak=peak, clip_fraction=clipped, status=status)
