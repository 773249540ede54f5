"""Test helpers that make real encoded media (m4a/AAC, AMR-NB, 3gp) with FFmpeg through PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def encode(samples: np.ndarray, rate: int, path: Path, *, codec: str, fmt: str, out_rate: int) -> Path:
    """Encode mono float samples to ``path`` with an FFmpeg encoder (e.g. aac/ipod, libopencore_amrnb/amr)."""
    import av
    import soxr

    y = soxr.resample(samples, rate, out_rate) if out_rate != rate else samples
    pcm = (np.clip(y, -1, 1) * 32767).astype(np.int16)[None]
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=out_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = out_rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def first_flac(librispeech_dir: Path) -> Path:
    return sorted(librispeech_dir.glob("*/*/*.flac"))[0]


def speech(librispeech_dir: Path) -> tuple[np.ndarray, int]:
    x, sr = sf.read(first_flac(librispeech_dir), dtype="float32")
    return x, sr
