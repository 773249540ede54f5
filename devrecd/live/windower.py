"""The worker side of capture: ring -> (recording) -> mono -> model rate -> fixed windows.

Windows of ``window`` samples are cut every ``hop`` samples at the model's rate. A window never
spans a discontinuity: at a gap (the ring dropped a block, or the stream was reopened) the
resampler and the partial window are reset and cutting starts again after the gap. When the card
runs at another rate than the model's, a streaming soxr resampler (``audio.resample_quality``)
converts; the rates are reported with every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from devrecd.audio.decode import to_mono  # the file path's channel mixing (audio.mix), not a second copy
from devrecd.audio.levels import Level, measure
from devrecd.live.recorder import SegmentRecorder
from devrecd.live.ring import CaptureRates, SampleRing


@dataclass
class LiveWindow(CaptureRates):
    """One window of live audio at the model's rate, with its level and timing."""

    index: int  # windows cut since start
    start: float  # seconds into the captured stream (dropped audio not counted)
    samples: np.ndarray = field(repr=False)  # (window,) float32 mono at the model's rate
    level: Level
    ended: float | None  # monotonic time its last sample arrived from the card (None if unknown)
    capture_rate: int
    model_rate: int


class Windower:
    """Pulls frames from ``ring`` and cuts :class:`LiveWindow` s; call :meth:`pump` from one thread."""

    def __init__(self, ring: SampleRing, *, model_rate: int, window: int, hop: int, mix: str = "mean",
                 quality: str = "VHQ", silence_dbfs: float = -60.0, clip_fraction: float = 0.01,
                 recorder: SegmentRecorder | None = None) -> None:
        if window <= 0 or hop <= 0:
            raise ValueError("window and hop must be positive")
        self.ring = ring
        self.model_rate = model_rate
        self.window = window
        self.hop = hop
        self.mix = mix
        self.quality = quality
        self.silence_dbfs = silence_dbfs
        self.clip_fraction = clip_fraction
        self.recorder = recorder
        self.capture_rate = 0  # unknown until the first gap that names a rate (the stream's open)
        self.discontinuities = 0
        self._gap_seen = 0
        self._count = 0
        self._resampler = None
        self._seg_dev_start = 0  # ring position where the current contiguous segment began
        self._seg_offset = 0  # model-rate samples of earlier segments (for ``start``)
        self._fed = 0  # model-rate samples produced in this segment
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0  # segment model-rate index of _buf[0]
        self._next = 0  # segment model-rate index of the next window's start
        # The captured channels before the mix, at the capture rate, kept for as long as a window
        # still needs them: levels are measured per channel (a clipped channel mixed with a clean
        # one is not clipped in the mix), with the meter files use.
        self._raw = np.zeros((0, 1), dtype=np.float32)
        self._raw_start = 0  # segment capture-rate index of _raw[0]

    def pump(self) -> list[LiveWindow]:
        """Consume everything the ring holds now; return the windows it completes."""
        ring = self.ring
        lo = ring.consumed
        hi = lo + ring.available()
        out: list[LiveWindow] = []
        pos = lo
        k = self._gap_seen
        while k < ring.gap_count:
            g = ring.gap(k)
            if g is None:  # more gaps than the log keeps happened since the last pump: restart here
                k = ring.gap_count
                self._break(pos, 0)
                continue
            gpos, rate = g
            if gpos > hi:
                break  # after what we are about to read: the next pump handles it
            if gpos > pos:
                out += self._feed(ring.take(gpos - pos), pos)
                pos = gpos
            self._break(pos, rate)
            k += 1
        self._gap_seen = k
        if hi > pos:
            out += self._feed(ring.take(hi - pos), pos)
        return out

    def close(self) -> None:
        """Close the current recording segment (if recording)."""
        if self.recorder is not None:
            self.recorder.cut()

    # --- internals -------------------------------------------------------------------------

    def _break(self, pos: int, rate: int) -> None:
        """A discontinuity at ring position ``pos``; ``rate`` > 0 when the audio after it has a new rate."""
        if rate > 0:
            self.capture_rate = rate
        if self._fed or self._buf.size:
            self.discontinuities += 1
        self._seg_offset += self._fed
        self._seg_dev_start = pos
        self._fed = 0
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = self._next = 0
        self._raw = np.zeros((0, 1), dtype=np.float32)
        self._raw_start = 0
        self._resampler = None
        if self.recorder is not None:
            self.recorder.cut()  # each segment file is contiguous audio

    def _feed(self, frames: np.ndarray, pos: int) -> list[LiveWindow]:
        if self.capture_rate <= 0:
            raise RuntimeError("the ring holds audio before any stream was opened (no rate known)")
        if self.recorder is not None:
            self.recorder.write(frames, self.capture_rate)
        if not len(self._raw):
            self._raw_start = pos - self._seg_dev_start
            self._raw = np.asarray(frames, dtype=np.float32).reshape(len(frames), -1)
        else:
            self._raw = np.concatenate([self._raw, np.asarray(frames, dtype=np.float32).reshape(len(frames), -1)])
        mono = to_mono(frames, self.mix, "live input")
        if self.capture_rate != self.model_rate:
            if self._resampler is None:
                import soxr

                self._resampler = soxr.ResampleStream(self.capture_rate, self.model_rate, 1, dtype="float32",
                                                      quality=self.quality)
            mono = self._resampler.resample_chunk(mono)
        self._fed += len(mono)
        self._buf = np.concatenate([self._buf, mono]) if self._buf.size else np.asarray(mono, dtype=np.float32)
        out = []
        while self._next + self.window <= self._buf_start + len(self._buf):
            i = self._next - self._buf_start
            samples = self._buf[i:i + self.window].copy()
            end = self._next + self.window  # segment model-rate index just after the last sample
            seg_end = math.ceil(end * self.capture_rate / self.model_rate)
            dev_end = self._seg_dev_start + seg_end
            raw = self._raw[self._next * self.capture_rate // self.model_rate - self._raw_start : seg_end - self._raw_start]
            out.append(LiveWindow(
                index=self._count, start=(self._seg_offset + self._next) / self.model_rate, samples=samples,
                level=measure(raw if len(raw) else samples, silence_dbfs=self.silence_dbfs,
                              clip_fraction=self.clip_fraction, mix=samples),
                ended=self.ring.arrival_time(dev_end), capture_rate=self.capture_rate, model_rate=self.model_rate))
            self._count += 1
            self._next += self.hop
        drop = min(self._next - self._buf_start, len(self._buf))
        if drop > 0:  # keep only what a future window can still use
            self._buf = self._buf[drop:]
            self._buf_start += drop
        drop = min(self._next * self.capture_rate // self.model_rate - self._raw_start, len(self._raw))
        if drop > 0:
            self._raw = self._raw[drop:]
            self._raw_start += drop
        return out
