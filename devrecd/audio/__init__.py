"""Audio intake: read-only evidence, hashing, decoding, levels, windows. See :mod:`devrecd.audio.decode`."""

from devrecd.audio.decode import (
    EvidenceStream,
    Recording,
    open_evidence,
    open_stream,
    read_evidence,
    rms_dbfs,
    sha256_file,
    sniff_container,
)
from devrecd.audio.errors import (
    AudioError,
    ChangedAudio,
    CorruptAudio,
    EmptyAudio,
    ExternalLink,
    ImplausibleRate,
    LinkLoop,
    MissingAudio,
    NonFiniteAudio,
    NotAFile,
    SilentAudio,
    TooLongAudio,
    TooShortAudio,
    UnreadableAudio,
    UnsupportedAudio,
)
from devrecd.audio.levels import Level, LevelMeter, measure
from devrecd.audio.windows import StreamWindower, cut_windows, window_starts

__all__ = [
    "AudioError", "ChangedAudio", "CorruptAudio", "EmptyAudio", "EvidenceStream", "ExternalLink", "ImplausibleRate",
    "Level", "LevelMeter", "LinkLoop", "MissingAudio", "NonFiniteAudio", "NotAFile", "Recording", "SilentAudio",
    "StreamWindower", "TooLongAudio", "TooShortAudio", "UnreadableAudio", "UnsupportedAudio", "cut_windows",
    "measure", "open_evidence", "open_stream", "read_evidence", "rms_dbfs", "sha256_file", "sniff_container",
    "window_starts",
]
