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
