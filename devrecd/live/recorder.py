"""Optional keeping of what was captured: WAV segments, each with its sha256 (off by default).

Segments hold the audio exactly as it came from the sound card (capture rate, every channel,
32-bit float so nothing is rounded), before any resampling or mixing. A segment ends after
``segment_seconds``, at a gap (dropped input: each file is contiguous audio) and at a reopen.
When a segment is closed its sha256 is computed from the file on disk and appended, with its
start time and length, to ``segments.jsonl`` in the same folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from devrecd.audio import sha256_file
from devrecd.errors import ConfigError

MANIFEST = "segments.jsonl"


class SegmentRecorder:
    """Writes captured frames into rotating WAV segments under ``folder``."""

    def __init__(self, folder: str | os.PathLike, *, segment_seconds: float, device: str = "") -> None:
        self.folder = Path(os.path.expanduser(folder))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"live.record_dir {self.folder}: {exc.strerror or exc}") from None
        if segment_seconds <= 0:
            raise ConfigError("live.record_segment_seconds must be > 0")
        self.segment_seconds = segment_seconds
        self.device = device
        self._file = None
        self._path: Path | None = None
        self._frames = 0
        self._limit = 0
        self._rate = 0
        self._started = 0.0
        self.closed: list[dict] = []  # manifest entries of the segments closed so far

    def write(self, frames: np.ndarray, rate: int) -> None:
        """Append (n, channels) float32 frames captured at ``rate``."""
        while len(frames):
            if self._file is None or rate != self._rate or frames.shape[1] != self._file.channels:
                self.cut()
                self._open(rate, frames.shape[1])
            take = min(len(frames), self._limit - self._frames)
            self._file.write(frames[:take])
            self._frames += take
            frames = frames[take:]
            if self._frames >= self._limit:
                self.cut()

    def cut(self) -> dict | None:
        """Close the current segment (if any), hash it and record it in the manifest."""
        if self._file is None:
            return None
        self._file.close()
        self._file = None
        assert self._path is not None
        entry = {"path": self._path.name, "sha256": sha256_file(self._path), "frames": self._frames,
                 "sample_rate": self._rate, "seconds": round(self._frames / self._rate, 6),
                 "started": _utc(self._started), "device": self.device}
        with open(self.folder / MANIFEST, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.closed.append(entry)
        return entry

    def _open(self, rate: int, channels: int) -> None:
        import soundfile as sf

        self._started = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._started)) + f"{int(self._started % 1 * 1000):03d}Z"
        self._path = self.folder / f"live-{stamp}-{len(self.closed):05d}.wav"
        self._rate, self._frames = rate, 0
        self._limit = max(1, int(round(self.segment_seconds * rate)))
        self._file = sf.SoundFile(self._path, "w", samplerate=rate, channels=channels, subtype="FLOAT", format="WAV")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
