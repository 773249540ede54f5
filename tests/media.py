"""Test helpers that make real encoded media (m4a/AAC, AMR-NB, 3gp) with FFmpeg through PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


# Bit rates of the test media: FFmpeg's defaults for these encoders.
_BITRATES = {"aac": 128_000, "libopencore_amrnb": 12_200}


def encode(samples: np.ndarray, rate: int, path: Path, *, codec: str, fmt: str, out_rate: int) -> Path:
    """Encode mono float samples to ``path`` with an FFmpeg encoder (e.g. aac/ipod, libopencore_amrnb/amr),
    through the product's own encoder (:func:`devrecd.audio.transmit.encode`)."""
    from devrecd.audio.transmit import encode as encode_bytes
    from devrecd.audio.transmit import resample

    y = resample(samples, rate, out_rate) if out_rate != rate else samples
    path.write_bytes(encode_bytes(np.asarray(y), out_rate, codec, fmt, _BITRATES.get(codec, 64_000)))
    return path


def first_flac(librispeech_dir: Path) -> Path:
    return sorted(librispeech_dir.glob("*/*/*.flac"))[0]


def speech(librispeech_dir: Path) -> tuple[np.ndarray, int]:
    x, sr = sf.read(first_flac(librispeech_dir), dtype="float32")
    return x, sr
