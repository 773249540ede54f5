"""Evidence intake: open read-only, hash, decode to mono float32, resample only when needed.

Rules (each one a decision a forensic examiner can read back from the verdict):

* The file is opened read-only (``O_RDONLY``, with ``O_NOATIME`` where the OS allows it) and read
  once; the SHA-256 is computed over exactly the bytes that are then decoded, so the hash recorded
  with a verdict is the hash of what was judged even if the file changes afterwards.
* Size and duration caps are checked before decoding (from ``stat`` and from the container header).
* WAV/FLAC/OGG/MP3 and friends are decoded by libsndfile (``soundfile``); everything else phones
  write (m4a/AAC, AMR-NB/WB, 3gp, Opus in MP4/WebM...) by FFmpeg through PyAV.
* Channels are mixed to mono by averaging them (``audio.mix = "mean"``) or by taking the first
  (``"first"``). Averaging is the default because a phone's stereo pair shares one ADC clock and
  codec, and averaging keeps both microphones' contribution.
* The native rate is kept when it equals the model's. Otherwise the audio is resampled with soxr
  (``VHQ`` by default) and ``Recording.resampled`` is True: the recording chain IS the fingerprint,
  so this is reported, never hidden.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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
from devrecd.config import AudioConfig

if TYPE_CHECKING:
    from devrecd.audio.condition import Condition

_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Recording:
    """A decoded recording, mono float32 in [-1, 1] at ``sample_rate``."""

    path: str
    sha256: str
    size: int  # bytes
    samples: np.ndarray = field(repr=False)
    sample_rate: int  # rate of ``samples`` (the model's)
    native_rate: int  # the file's own rate
    channels: int  # channels in the file (before mixing)
    codec: str  # e.g. "PCM_16", "FLAC", "aac", "amr_nb"
    container: str  # e.g. "WAV", "mov,mp4,m4a,3gp,3g2,mj2"
    decoder: str  # "soundfile" or "pyav"
    resampled: bool

    @cached_property
    def condition(self) -> Condition:
        """The recording's condition (:class:`devrecd.audio.condition.Condition`), measured once."""
        from devrecd.audio.condition import measure_condition

        return measure_condition(self)

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return len(self.samples) / self.sample_rate

    def describe(self) -> dict:
        """Everything but the samples, for verdicts and sidecars."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
            "duration": round(self.duration, 6),
            "sample_rate": self.sample_rate,
            "native_rate": self.native_rate,
            "channels": self.channels,
            "codec": self.codec,
            "container": self.container,
            "decoder": self.decoder,
            "resampled": self.resampled,
            "condition": self.condition.to_json(),
        }


def read_evidence(path: str | os.PathLike, sample_rate: int, cfg: AudioConfig | None = None) -> Recording:
    """Open, hash, decode, check and (only if needed) resample one recording.

    Raises a subclass of :class:`~devrecd.audio.errors.AudioError` that says exactly why a file
    cannot be judged.
    """
    cfg = cfg or AudioConfig()
    path = Path(path)
    data = read_bytes(path, cfg.max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    samples, native_rate, channels, codec, container, decoder = _decode(path, data, cfg)

    if samples.shape[0] == 0:
        raise EmptyAudio(path, "the file holds no audio samples")
    mono = _to_mono(samples, cfg.mix, path)
    duration = len(mono) / native_rate
    if duration < cfg.min_seconds:
        raise TooShortAudio(path, f"{duration:.2f} s of audio, the minimum is {cfg.min_seconds:.2f} s")
    if duration > cfg.max_seconds:
        raise TooLongAudio(path, f"{duration:.0f} s of audio, the cap is {cfg.max_seconds:.0f} s (audio.max_seconds)")
    level = rms_dbfs(mono)
    if level < cfg.silence_dbfs:
        what = "digital silence" if level == -math.inf else f"RMS level {level:.1f} dBFS"
        raise SilentAudio(path, f"{what}, below the silence threshold {cfg.silence_dbfs:.0f} dBFS")

    resampled = native_rate != sample_rate
    if resampled:
        import soxr

        mono = soxr.resample(mono, native_rate, sample_rate, quality=cfg.resample_quality).astype(np.float32)
    return Recording(
        path=str(path), sha256=digest, size=len(data), samples=np.ascontiguousarray(mono, dtype=np.float32),
        sample_rate=sample_rate, native_rate=native_rate, channels=channels, codec=codec,
        container=container, decoder=decoder, resampled=resampled,
    )


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """Read a file read-only in one pass, with typed errors for every way that can fail."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        try:
            fd = os.open(path, flags | noatime)
        except PermissionError:
            if not noatime:
                raise
            fd = os.open(path, flags)  # O_NOATIME needs ownership; plain read-only is still fine
    except FileNotFoundError:
        raise MissingAudio(path, "no such file (it may have been moved or deleted)") from None
    except IsADirectoryError:
        raise UnreadableAudio(path, "is a directory, not a file") from None
    except PermissionError:
        raise UnreadableAudio(path, "permission denied") from None
    except OSError as exc:
        raise UnreadableAudio(path, f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            raise UnreadableAudio(path, "not a regular file")
        if st.st_size == 0:
            raise EmptyAudio(path, "the file is empty (0 bytes)")
        if st.st_size > max_bytes:
            raise TooLongAudio(path, f"{st.st_size} bytes, the cap is {max_bytes} bytes (audio.max_bytes)")
        with os.fdopen(os.dup(fd), "rb", buffering=0) as fh:
            buf = bytearray()
            while chunk := fh.read(_READ_CHUNK):
                buf += chunk
                if len(buf) > max_bytes:
                    raise TooLongAudio(path, f"grew past the cap of {max_bytes} bytes while being read")
    except IsADirectoryError:
        raise UnreadableAudio(path, "is a directory, not a file") from None
    except OSError as exc:
        raise UnreadableAudio(path, f"read failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not buf:
        raise EmptyAudio(path, "the file is empty (0 bytes)")
    return bytes(buf)


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed, read-only."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level in dB relative to full scale (a full-scale square wave is 0 dBFS)."""
    if x.size == 0:
        return -math.inf
    ms = float(np.mean(np.square(x, dtype=np.float64)))
    return 10.0 * math.log10(ms) if ms > 0 else -math.inf


def _to_mono(samples: np.ndarray, mix: str, path: Path) -> np.ndarray:
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if mix == "first":
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
    if mix == "mean":
        return samples.mean(axis=1, dtype=np.float32)
    raise AudioError(path, f"audio.mix must be 'mean' or 'first', not {mix!r}")


# --- decoders --------------------------------------------------------------------------------

# Leading bytes of containers we know; used to tell "damaged X" from "not audio at all".
_MAGIC = (
    (0, b"RIFF", "WAV"), (0, b"RF64", "WAV"), (0, b"fLaC", "FLAC"), (0, b"OggS", "OGG"),
    (0, b"ID3", "MP3"), (0, b"#!AMR", "AMR"), (4, b"ftyp", "MP4"), (0, b"FORM", "AIFF"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"), (0, b"caff", "CAF"),
)


def sniff_container(data: bytes) -> str | None:
    """Name of the container the leading bytes announce, if any."""
    for offset, magic, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "MPEG audio"
    return None


def _decode(path: Path, data: bytes, cfg: AudioConfig):
    """-> (samples (n,) or (n, ch) float32, rate, channels, codec, container, decoder)."""
    try:
        return _decode_soundfile(path, data, cfg)
    except _NotForThisDecoder:
        pass
    try:
        return _decode_pyav(path, data, cfg)
    except _NotForThisDecoder as exc:
        known = sniff_container(data)
        if known:
            raise CorruptAudio(path, f"looks like {known} but cannot be decoded: {exc}") from None
        raise UnsupportedAudio(path, f"not a recognised audio format ({exc})") from None


class _NotForThisDecoder(Exception):
    """This decoder cannot open the bytes at all; let the next one try."""


def _decode_soundfile(path: Path, data: bytes, cfg: AudioConfig):
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _NotForThisDecoder(str(exc)) from None
    if info.samplerate <= 0:
        raise CorruptAudio(path, "the header gives no sample rate")
    if info.frames / info.samplerate > cfg.max_seconds:
        raise TooLongAudio(path, f"header says {info.frames / info.samplerate:.0f} s, the cap is {cfg.max_seconds:.0f} s")
    if info.format in ("WAV", "WAVEX", "RF64"):
        _check_riff(path, data)
    # int16 read + scale is ~5x cheaper than libsndfile's float conversion for 16-bit PCM.
    as_int16 = info.subtype == "PCM_16"
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="int16" if as_int16 else "float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise CorruptAudio(path, f"{info.format}/{info.subtype} decoding failed: {exc}") from None
    if len(samples) < info.frames:
        raise CorruptAudio(path, f"truncated: header promises {info.frames} frames, only {len(samples)} decode")
    if as_int16:
        samples = samples.astype(np.float32) * np.float32(1.0 / 32768.0)
    return (samples[:, 0] if samples.shape[1] == 1 else samples), rate, info.channels, info.subtype, info.format, "soundfile"


def _check_riff(path: Path, data: bytes) -> None:
    """libsndfile quietly reads what is there of a truncated WAV; refuse it instead."""
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if cid == b"data":
            available = len(data) - pos - 8
            # 0 and 0xFFFFFFFF are "size unknown" (streamed / RF64); they cannot be checked.
            if size not in (0, 0xFFFFFFFF) and available < size:
                raise CorruptAudio(path, f"truncated WAV: the data chunk declares {size} bytes, {available} are present")
            return
        pos += 8 + size + (size & 1)


def _decode_pyav(path: Path, data: bytes, cfg: AudioConfig):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise _NotForThisDecoder(str(exc)) from None
    with container:
        streams = container.streams.audio
        if not streams:
            known = container.format.name
            raise UnsupportedAudio(path, f"the {known} container has no audio stream")
        stream = streams[0]
        ctx = stream.codec_context
        if ctx.name is None or not ctx.codec:
            raise UnsupportedAudio(path, "no decoder for this audio codec")
        header_seconds = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / 1e6 if container.duration else 0.0)
        if header_seconds > cfg.max_seconds:
            raise TooLongAudio(path, f"header says {header_seconds:.0f} s, the cap is {cfg.max_seconds:.0f} s")
        rate = ctx.sample_rate
        if not rate:
            raise CorruptAudio(path, "the stream gives no sample rate")
        max_samples = int(cfg.max_seconds * rate) + rate
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                arr = frame.to_ndarray()
                arr = _planar_float(arr, frame.format.name, frame.format.is_planar, len(frame.layout.channels))
                chunks.append(arr)
                total += arr.shape[0]
                if total > max_samples:
                    raise TooLongAudio(path, f"more than {cfg.max_seconds:.0f} s of audio (audio.max_seconds)")
        except av.error.FFmpegError as exc:
            raise CorruptAudio(path, f"{ctx.name} decoding failed after {total / rate:.2f} s: {exc}") from None
        if not chunks:
            raise EmptyAudio(path, f"the {ctx.name} stream decodes to no samples")
        samples = np.concatenate(chunks, axis=0)
        channels = samples.shape[1]
        if header_seconds and total / rate < 0.9 * header_seconds - 0.5:
            raise CorruptAudio(path, f"truncated: header says {header_seconds:.2f} s, only {total / rate:.2f} s decode")
        return (samples[:, 0] if channels == 1 else samples), rate, channels, ctx.name, container.format.name, "pyav"


def _planar_float(arr: np.ndarray, fmt: str, planar: bool, channels: int) -> np.ndarray:
    """A decoded frame as (samples, channels) float32 in [-1, 1]."""
    if planar:
        arr = arr.reshape(channels, -1).T
    else:
        arr = arr.reshape(-1, channels)
    if arr.dtype == np.int16:
        return arr.astype(np.float32) * np.float32(1 / 32768)
    if arr.dtype == np.int32:
        return (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    return arr.astype(np.float32, copy=False)
