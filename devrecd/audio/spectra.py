"""Power spectra of half-overlapping Hann frames: the one computation under the condition's band
(:func:`devrecd.audio.condition.welch_psd`, 2048-point frames at 32 kHz) and its noise
(:func:`devrecd.audio.noise.measure_noise`, 1024-point frames).

Frames go through in tiles of :data:`TILE` (cast to float64, mean removed, windowed, transformed,
squared) in buffers reused from tile to tile, with the frontend's real FFT
(:func:`devrecd.features_numpy.rfft_into`: ducc0's when installed, numpy's otherwise). Measured on
the CCNU phones (8 s at 32 kHz), the same steps on whole float64 copies of every frame cost ~5 ms
per recording for the band and ~7 ms for the noise, most of it not in the FFT (de-meaning and
windowing whole copies alone took longer than the band's FFTs: 2.4 against 2.0 ms): each step
wrote a fresh multi-MB array and streamed it through memory, where a tile's frames and spectra
(~1 MB at 2048 points) stay in cache. At these sizes ducc0's float64 FFT and numpy's cost the same
(measured): the frontend's is taken so that the code has one real FFT, and one fallback, in one place.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np

from devrecd.features_numpy import rfft_into

# Frames per tile: 32 x 2048 float64 samples and their spectra (~1 MB) stay in a core's 2 MB L2.
# Measured, condition CPU per CCNU recording: 8 -> 6.8 ms, 16 -> 6.2, 32 -> 6.0, 64 -> 6.0, 128 -> 6.2.
TILE = 32


@functools.lru_cache(maxsize=16)
def hann(n: int) -> np.ndarray:
    """The periodic Hann window of ``n`` samples (float64, read-only: cached per length)."""
    w = 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n) / n)
    w.flags.writeable = False
    return w


def power_tiles(frames: np.ndarray, pick: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(first, power)`` per tile of ``frames`` (n_frames, n: a strided view, any float dtype), or of
    its rows ``pick``: ``power[i]`` is ``|rfft(hann(n) * (frame - mean(frame)))|^2`` (float64,
    n // 2 + 1 bins, unnormalised, two-sided) of frame ``first + i``. ``power`` is a buffer reused
    for the next tile: use it (sum it, copy it out) before asking for the next."""
    n = frames.shape[1]
    count = len(frames) if pick is None else len(pick)
    window = hann(n)
    tile = max(1, min(TILE, count))  # no frames: no tiles (and a step of range() above 0)
    seg = np.empty((tile, n))
    spec = np.empty((tile, n // 2 + 1), np.complex128)
    power = np.empty((tile, n // 2 + 1))
    for lo in range(0, count, tile):
        k = min(tile, count - lo)
        s = seg[:k]
        s[...] = frames[lo: lo + k] if pick is None else frames[pick[lo: lo + k]]  # float64 a tile at a time
        np.subtract(s, s.mean(axis=1, keepdims=True), out=s)
        np.multiply(s, window, out=s)
        rfft_into(s, spec[:k])
        parts = spec[:k].view(np.float64)  # real, imaginary interleaved
        np.square(parts, out=parts)
        np.add(parts[:, 0::2], parts[:, 1::2], out=power[:k])
        yield lo, power[:k]
