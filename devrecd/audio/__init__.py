"""Audio intake: read-only evidence, hashing, decoding, windows. See :mod:`devrecd.audio.decode`."""

from devrecd.audio.decode import Recording, read_evidence, rms_dbfs, sha256_file, sniff_container
from devrecd.audio.errors import (
    AudioError,
    CorruptAudio,
    EmptyAudio,
    MissingAudio,
    SilentAudio,
    TooLongAudio,
    TooShortAudio,
    UnreadableAudio,
    UnsupportedAudio,
)
from devrecd.audio.windows import cut_windows, window_starts

__all__ = [
    "AudioError", "CorruptAudio", "EmptyAudio", "MissingAudio", "Recording", "SilentAudio",
    "TooLongAudio", "TooShortAudio", "UnreadableAudio", "UnsupportedAudio", "cut_windows",
    "read_evidence", "rms_dbfs", "sha256_file", "sniff_container", "window_starts",
]
