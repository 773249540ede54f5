"""Audio intake: read-only evidence and hashing (evidence.py), decoding (decode.py: the stream; decoders.py;
headers.py), levels, windows. See :mod:`devrecd.audio.decode`."""

from devrecd.audio.decode import EvidenceStream, Recording, open_stream, read_evidence
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
from devrecd.audio.evidence import open_evidence, sha256_file
from devrecd.audio.headers import sniff_container
from devrecd.audio.levels import Level, LevelMeter, measure, rms_dbfs
from devrecd.audio.windows import StreamWindower, cut_windows, window_starts

__all__ = [
    "AudioError", "ChangedAudio", "CorruptAudio", "EmptyAudio", "EvidenceStream", "ExternalLink", "ImplausibleRate",
    "Level", "LevelMeter", "LinkLoop", "MissingAudio", "NonFiniteAudio", "NotAFile", "Recording", "SilentAudio",
    "StreamWindower", "TooLongAudio", "TooShortAudio", "UnreadableAudio", "UnsupportedAudio", "cut_windows",
    "measure", "open_evidence", "open_stream", "read_evidence", "rms_dbfs", "sha256_file", "sniff_container",
    "window_starts",
]
