"""The frontend's numpy path (serving on the CPU): the steps of :class:`devrecd.features.Frontend`'s
array-API code up to the pre-Fbank energies (pre-emphasis, reflect padding, framing, window, real
FFT, ``|.|^2``, mel product), written into a per-thread workspace instead of fresh arrays.

- The framing is a strided view (no gather) and the FFT's zero padding is written once; nothing
  the size of a spectrum is allocated per call (fresh multi-MB arrays are fresh pages: the faults
  cost as much as the arithmetic).
- The waveform is pre-emphasised and windowed in float32, as the torch path does, and transformed
  in float64. In the near-empty bands of a frame (-90 dB and below its strongest band, e.g. above
  8 kHz in speech recorded at 16 kHz) the float32 rounding of the pre-emphasised samples is itself
  a sizeable part of the band's energy: on LibriSpeech 10 s clips the log-domain dims are 8.5e-4
  off a float64 reference (7.6e-6 with the pre-emphasis and window in float64, which cost ~10% of
  the frontend's time); on real phone recordings, whose noise fills every band, far less.
- The real FFT is ducc0's (the vectorised successor of numpy's own pocketfft, by its author;
  ~5x numpy's float64 ``rfft`` on this path's 8192-point frames, the same numbers to 1e-15) when
  it is installed, numpy's otherwise.
- The mel product runs block by block (:func:`mel_blocks`): the products the dense matmul would
  spend on the triangles' zeros (~80% of them) are skipped.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

FRAME_TILE = 32  # frames windowed, transformed and squared together (their spectra stay in cache)


def cpu_chunk(cfg: Any) -> int:
    """Clips per numpy call for a :class:`~devrecd.features.FrontendConfig`: about 1 MB of FFT input
    (one 10 s clip, four 2 s clips), so that the spectra stay in cache and the per-thread workspace
    stays a few MB."""
    return max(1, (1 << 18) // (cfg.n_frames * cfg.fft_size))


def mel_blocks(mel: np.ndarray, grain: int, call_cost: int) -> list[tuple[int, int, int, int]]:
    """Bin ranges ``[b0, b1)`` covering a (bins, bands + 1) mel matrix, each with the bands ``[c0, c1)``
    whose triangles are non-zero in it (the last column, dense, goes with every block). The numpy path
    multiplies these blocks only: every product it skips is a zero of the matrix. Ranges start on
    multiples of ``grain`` bins and are chosen (shortest path) to minimise the entries multiplied
    plus ``call_cost`` entries per block (the price of one more small product)."""
    bins, n_bands = mel.shape[0], mel.shape[1] - 1
    nonzero = mel[:, :-1] != 0
    has = nonzero.any(axis=1)
    first = np.where(has, nonzero.argmax(axis=1), n_bands)  # first band non-zero in each bin
    last = np.where(has, n_bands - nonzero[:, ::-1].argmax(axis=1), 0)  # one past its last
    cuts = [*range(0, bins, grain), bins]
    lo = [int(first[a:b].min()) for a, b in zip(cuts, cuts[1:])]  # per grain of bins
    hi = [int(last[a:b].max()) for a, b in zip(cuts, cuts[1:])]
    cost, back = [0.0] + [math.inf] * (len(cuts) - 1), [(0, 0, 0)] * len(cuts)
    for j in range(1, len(cuts)):
        c0, c1 = n_bands, 0
        for i in range(j - 1, -1, -1):  # block [cuts[i], cuts[j]): its bands are [c0, c1)
            c0, c1 = min(c0, lo[i]), max(c1, hi[i])
            c = cost[i] + (cuts[j] - cuts[i]) * (max(0, c1 - c0) + 1) + call_cost
            if c < cost[j]:
                cost[j], back[j] = c, (i, c0, c1) if c1 > c0 else (i, 0, 0)
    blocks, j = [], len(cuts) - 1
    while j:
        i, c0, c1 = back[j]
        blocks.append((cuts[i], cuts[j], c0, c1))
        j = i
    return blocks[::-1]


_FFT: list[Any] = []  # [ducc0.fft or None], imported on first use


def rfft_into(frames: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = rfft(frames)`` along the last axis (float64 -> complex128, unnormalised), on
    this thread only: ducc0's when installed (it releases the GIL), numpy's otherwise."""
    if not _FFT:
        try:
            import ducc0.fft as fft
        except ImportError:
            fft = None
        _FFT.append(fft)
    if _FFT[0] is not None:
        _FFT[0].r2c(frames, axes=(frames.ndim - 1,), out=out, nthreads=1)
    else:
        np.fft.rfft(frames, axis=-1, out=out)


class NumpyPath:
    """The pre-Fbank energies and frame energy (B, T, bands + 1) of numpy float32 clips (module docstring)."""

    def __init__(self, cfg: Any, window: np.ndarray, mel: np.ndarray, padding: tuple[int, int]) -> None:
        self.cfg, self.padding = cfg, padding
        self.window = np.asarray(window, np.float32)
        self.n_out = mel.shape[1]
        bins = mel.shape[0]
        rows = cpu_chunk(cfg) * cfg.n_frames  # frames per product
        self.mel_blocks = [(b0, b1, c0, c1, np.ascontiguousarray(mel[b0:b1, [*range(c0, c1), -1]]))
                           for b0, b1, c0, c1 in mel_blocks(mel, max(8, bins // 64), (1 << 18) // rows)]
        self._local = threading.local()  # each thread's workspace

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fbank(self.power(x))

    def power(self, x: np.ndarray) -> np.ndarray:
        """|FFT|^2 (B, T, n_fft/2 + 1) float32 of float32 clips ``x`` (B, clip_samples)."""
        cfg = self.cfg
        hop, win, n, batch, t = cfg.hop_length, cfg.win_length, cfg.clip_samples, x.shape[0], cfg.n_frames
        ws = self._workspace(batch)
        left, right = self.padding
        y = ws["y"][:batch]
        mid = y[:, left : left + n]
        np.multiply(x[:, :-1], np.float32(cfg.preemphasis), out=ws["tmp"][:batch])
        np.subtract(x[:, 1:], ws["tmp"][:batch], out=mid[:, 1:])
        mid[:, 0] = x[:, 0]
        y[:, :left] = mid[:, left:0:-1]
        if right:
            y[:, left + n :] = mid[:, n - 2 : n - right - 2 : -1] if n - right - 2 >= 0 else mid[:, n - 2 :: -1]
        frames = np.lib.stride_tricks.sliding_window_view(y, win, axis=1)[:, : (t - 1) * hop + 1 : hop]
        padded = ws["frames"][:batch]  # (B, FRAME_TILE, n_fft): zeros past ``win`` written once
        spec = ws["spec"][:batch]
        power = ws["power"][:batch]
        # FRAME_TILE frames at a time: their frames and spectra (~2 MB for 10 s clips) stay in cache
        # from the window to the power instead of streaming 16 MB through memory.
        for a in range(0, t, FRAME_TILE):
            k = min(FRAME_TILE, t - a)
            np.multiply(frames[:, a : a + k], self.window, out=padded[:, :k, :win])
            rfft_into(padded[:, :k], spec[:, :k])
            parts = spec[:, :k].view(np.float64)
            np.square(parts, out=parts)
            np.add(parts[..., 0::2], parts[..., 1::2], out=power[:, a : a + k], casting="same_kind")
        return power

    def _workspace(self, batch: int) -> dict[str, np.ndarray]:
        """This thread's buffers for up to ``batch`` clips (grown when needed, never shrunk; at most
        cpu_chunk clips, so a few MB per thread)."""
        ws = getattr(self._local, "ws", None)
        if ws is None or ws["y"].shape[0] < batch:
            cfg = self.cfg
            left, right = self.padding
            bins = cfg.fft_size // 2 + 1
            tile = min(FRAME_TILE, cfg.n_frames)
            ws = {"y": np.empty((batch, left + cfg.clip_samples + right), np.float32),
                  "tmp": np.empty((batch, cfg.clip_samples - 1), np.float32),
                  "frames": np.zeros((batch, tile, cfg.fft_size), np.float64),
                  "spec": np.empty((batch, tile, bins), np.complex128),
                  "power": np.empty((batch, cfg.n_frames, bins), np.float32)}
            self._local.ws = ws
        return ws

    def fbank(self, power: np.ndarray) -> np.ndarray:
        """``power @ mel`` (B, T, bands + 1) float32, block by block (:func:`mel_blocks`)."""
        rows = power.reshape(-1, power.shape[-1])
        out = np.zeros((rows.shape[0], self.n_out), np.float32)
        for b0, b1, c0, c1, block in self.mel_blocks:
            part = rows[:, b0:b1] @ block
            out[:, c0:c1] += part[:, :-1]
            out[:, -1] += part[:, -1]
        return out.reshape(*power.shape[:-1], -1)
