"""Evidence intake: open safely, hash, decode block by block to mono float32, resample only when needed.

Rules (each one a decision a forensic examiner can read back from the verdict):

* One way in: :func:`open_evidence`. The path is opened read-only and non-blocking (``O_RDONLY |
  O_NONBLOCK``, ``O_NOATIME`` where allowed, ``O_NOFOLLOW`` on the resolved path) and checked with
  ``fstat`` on the open descriptor, so a FIFO, socket, device or directory (or a link to one, or a
  file swapped for one after it was queued) is refused with a reason and can never block a reader.
  A symbolic link that leaves the allowed folders is refused when the caller confines it; where a
  link is followed, the resolved path is recorded.
* The bytes are hashed in one streamed pass (SHA-256), then decoded from the same descriptor; if the
  file's size or mtime changed in between, it is refused (``changed``): the hash recorded with a
  verdict is the hash of what was judged.
* Caps are checked before anything is allocated: bytes (``stat``), header duration, decoded samples
  (frames x channels, ``audio.max_decoded_samples``) and a plausible sample rate (4 kHz - 384 kHz).
* Decoding is block-wise: each block is checked for non-finite samples, metered per channel
  (:mod:`devrecd.audio.levels`: a clipped channel is flagged even when the mix is not), mixed to
  mono and resampled to the model rate before the next is read, so memory
  is the mono model-rate result (or, streamed, nothing but a block), whatever the channel count.
* WAV/FLAC/OGG/MP3 and friends are decoded by libsndfile (``soundfile``); everything else phones
  write (m4a/AAC, AMR-NB/WB, 3gp, Opus in MP4/WebM...) by FFmpeg through PyAV.
* Integrity findings are flags, not refusals, wherever audio decodes (``Recording.integrity``):
  ``md5_mismatch`` (a FLAC whose decoded samples do not match the MD5 its STREAMINFO stores; the MD5
  is computed block by block as the samples are decoded, skipped when the stored MD5 is all zeros),
  ``truncated`` (an Ogg stream whose last page is cut short or lacks the end-of-stream flag, seen in
  the file's tail kept by the hashing pass; a FLAC that ends inside a frame) and
  ``header_length_mismatch`` (an RF64 ``ds64`` chunk that claims more frames than the data chunk
  holds; a FLAC whose STREAMINFO declares more samples than its whole frames hold). Where libsndfile
  stops short of a FLAC's declared length, FFmpeg decodes the rest from the same descriptor
  (:func:`_flac_rest`). A WAV whose data chunk is cut short is still refused (``corrupt``):
  libsndfile would read what is there without a word.
* Channels are mixed to mono by averaging them (``audio.mix = "mean"``) or by taking the first
  (``"first"``). Averaging is the default because a phone's stereo pair shares one ADC clock and
  codec, and averaging keeps both microphones' contribution.
* The native rate is kept when it equals the model's. Otherwise the audio is resampled with soxr
  (``VHQ`` by default) and ``Recording.resampled`` is True: the recording chain IS the fingerprint,
  so this is reported, never hidden.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Generator, Iterator, Sequence

import numpy as np

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
from devrecd.audio.levels import LevelMeter, rms_dbfs
from devrecd.audio.settings import AudioConfig

if TYPE_CHECKING:
    from devrecd.audio.condition import Condition

_READ_CHUNK = 1 << 20
_TAIL_BYTES = 1 << 17  # the file's last bytes, kept by the hashing pass (an Ogg page is at most 65307)
INTEGRITY_FLAGS = ("md5_mismatch", "truncated", "header_length_mismatch")
BLOCK_FRAMES = 1 << 16  # frames decoded at a time (2 MB of float32 at 8 channels)
MIN_RATE, MAX_RATE = 4_000, 384_000  # sample rates any recording device writes

__all__ = ["Recording", "EvidenceStream", "open_evidence", "open_stream", "read_evidence", "rms_dbfs",
           "sha256_file", "sniff_container", "to_mono", "read_file_bytes", "decode_bytes", "MIN_RATE", "MAX_RATE"]


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
    levels: dict | None = None  # rms_dbfs, peak, dc_offset, clip_fraction, flags (see devrecd.audio.levels)
    resolved_path: str | None = None  # where a followed symbolic link led
    # The samples the condition is measured on when ``samples`` is only a stand-in (a streamed file):
    # the recording's first devrecd.audio.condition.ANALYSIS_SECONDS.
    excerpt: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Integrity findings on the file's structure: {"flags": [...], "notes": [...]} (see INTEGRITY_FLAGS).
    integrity: dict | None = None

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
        out = {
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
            "levels": self.levels,
            "integrity": self.integrity or {"flags": [], "notes": []},
            "condition": self.condition.to_json(),
        }
        if self.resolved_path:
            out["resolved_path"] = self.resolved_path
        return out


# --- opening ---------------------------------------------------------------------------------

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def open_evidence(path: str | os.PathLike, *, confine: Sequence[str] | None = None) -> tuple[int, os.stat_result, str | None]:
    """Open an evidence file read-only without ever blocking; -> (fd, fstat, resolved path or None).

    ``confine``: folders a symbolic link may lead into (None: follow links anywhere). Anything that
    is not a regular file once open is refused with :class:`NotAFile`; the caller closes the fd.
    """
    path = os.fspath(path)
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        if os.path.islink(path):
            raise MissingAudio(path, "a symbolic link to nothing (dangling)") from None
        raise MissingAudio(path, "no such file (it may have been moved or deleted)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkLoop(path, "a symbolic link loop") from None
        raise UnreadableAudio(path, f"cannot resolve: {exc.strerror or exc}") from None
    abspath = os.path.abspath(path)
    resolved = real if real != abspath else None
    if resolved and confine is not None and not _inside(real, [os.path.realpath(r) for r in confine]):
        raise ExternalLink(path, f"a symbolic link to {real}, outside the watched folders "
                                 "(watch.follow_external_links = false)")
    try:
        pre = os.stat(real)
    except OSError as exc:
        raise MissingAudio(path, f"vanished while opened: {exc.strerror or exc}") from None
    if not stat.S_ISREG(pre.st_mode):
        raise NotAFile(path, f"{_kind(pre.st_mode)}, not a regular file" + (f" (link to {real})" if resolved else ""))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        try:
            fd = os.open(real, flags | noatime)
        except PermissionError:
            if not noatime:
                raise
            fd = os.open(real, flags)  # O_NOATIME needs ownership; plain read-only is still fine
    except FileNotFoundError:
        raise MissingAudio(path, "no such file (it may have been moved or deleted)") from None
    except PermissionError:
        raise UnreadableAudio(path, "permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the resolved path became a link after it was resolved
            raise ChangedAudio(path, "replaced by a symbolic link while it was opened") from None
        raise UnreadableAudio(path, f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for a FIFO/device/... after the check above
            raise NotAFile(path, f"{_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st, resolved


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed, read-only (through :func:`open_evidence`)."""
    fd, _, _ = open_evidence(path)
    try:
        return _hash_fd(fd, math.inf)[0]
    finally:
        os.close(fd)


def _hash_fd(fd: int, max_bytes: float) -> tuple[str, int, bytes, bytes]:
    """-> (sha256, bytes read, first 64 bytes, last ``_TAIL_BYTES`` bytes); stops (raising
    OverflowError) past ``max_bytes``."""
    h = hashlib.sha256()
    n, head, prev, last = 0, b"", b"", b""
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, _READ_CHUNK):
        if not head:
            head = chunk[:64]
        h.update(chunk)
        n += len(chunk)
        if n > max_bytes:
            raise OverflowError(n)
        prev, last = last, chunk
    tail = last if len(last) >= _TAIL_BYTES else (prev + last)[-_TAIL_BYTES:]
    return h.hexdigest(), n, head, tail


# --- the stream ------------------------------------------------------------------------------

class EvidenceStream:
    """An opened, hashed evidence file whose audio is decoded on demand, block by block.

    Use as a context manager. :meth:`blocks` yields mono float32 at ``sample_rate``; after the
    last block it raises the error of a file that cannot be judged (too short, silent, changed...).
    Every :class:`AudioError` raised carries the file's sha256 and size once they are known.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, cfg: AudioConfig | None = None, *,
                 confine: Sequence[str] | None = None) -> None:
        self.cfg = cfg or AudioConfig()
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.sha256: str | None = None
        self.size: int | None = None
        self.resolved_path: str | None = None
        self.native_rate = 0
        self.channels = 0
        self.codec = self.container = self.decoder = ""
        self.expected_frames = 0  # at the model rate, from the header (0: unknown)
        self.n_samples = 0  # mono samples at the model rate yielded so far
        self.meter = LevelMeter()  # per channel, before the mix: the levels and flags of the verdict
        self.mix_meter = LevelMeter()  # the mono mix the model hears: the silence check
        self._mix_channel: int | None = None  # channels that cancel in the mean: the louder one instead
        self._mix_decided = False
        self.integrity_findings: list[tuple[str, str]] = []  # (flag, note) from the bytes; the decoder adds its own
        self.mix_flags: list[str] = []  # what the mix did (channels_cancel), added to the levels' flags
        # The first ANALYSIS_SECONDS at the model rate, kept for the condition (bounded: 15 MB at 32 kHz).
        self._excerpt = np.empty(0, np.float32)
        self._excerpt_n = 0
        self._fd = -1
        try:
            self._open(confine)
        except AudioError as exc:
            self.close()
            raise self.tag(exc) from None
        except BaseException:
            self.close()  # whatever a decoder raised, the descriptor is not leaked
            raise

    def tag(self, exc: AudioError) -> AudioError:
        """Attach what is known of the file (sha256, size, resolved path) to an error about it."""
        exc.sha256, exc.size, exc.resolved_path = self.sha256, self.size, self.resolved_path
        return exc

    def _open(self, confine: Sequence[str] | None) -> None:
        cfg, path = self.cfg, self.path
        self._fd, self._st, self.resolved_path = open_evidence(path, confine=confine)
        if self._st.st_size > cfg.max_bytes:
            raise TooLongAudio(path, f"{self._st.st_size} bytes, the cap is {cfg.max_bytes} bytes (audio.max_bytes)")
        try:
            self.sha256, self.size, head, tail = _hash_fd(self._fd, cfg.max_bytes)
        except OverflowError:
            raise TooLongAudio(path, f"grew past the cap of {cfg.max_bytes} bytes while being read (audio.max_bytes)") from None
        except OSError as exc:
            raise UnreadableAudio(path, f"read failed: {exc.strerror or exc}") from None
        if self.size == 0:
            raise EmptyAudio(path, "the file is empty (0 bytes)")
        self._head = head
        if head[:4] == b"OggS":
            self.integrity_findings += _check_ogg_tail(tail, self.size)
        self._fh = os.fdopen(os.dup(self._fd), "rb")
        self._source = _open_decoder(path, self._fh, head, cfg)
        self.native_rate, self.channels = self._source.rate, self._source.channels
        self.codec, self.container, self.decoder = self._source.codec, self._source.container, self._source.decoder
        if self._source.frames:
            self.expected_frames = int(math.ceil(self._source.frames * sample_ratio(self.native_rate, self.sample_rate)))

    @property
    def resampled(self) -> bool:
        return self.native_rate != self.sample_rate

    @property
    def duration(self) -> float:
        return self.n_samples / self.sample_rate

    def blocks(self) -> Iterator[np.ndarray]:
        """Mono float32 blocks at the model rate; checks the whole recording after the last block."""
        cfg, path = self.cfg, self.path
        try:
            resampler = None
            if self.resampled:
                import soxr

                resampler = soxr.ResampleStream(self.native_rate, self.sample_rate, 1, dtype="float32",
                                                quality=cfg.resample_quality)
            native = 0
            for raw in self._source.blocks():
                if not np.isfinite(raw).all():
                    bad = int(np.count_nonzero(~np.isfinite(raw)))
                    nan = int(np.count_nonzero(np.isnan(raw)))
                    at = f"in the block at {native / self.native_rate:.2f} s"
                    if not nan and str(self.codec).upper() == "DOUBLE":  # finite float64 beyond float32's range
                        raise NonFiniteAudio(path, f"{bad} out-of-range sample(s) {at}: 64-bit float values beyond "
                                                   f"+-3.4e38 (full scale is 1.0)")
                    raise NonFiniteAudio(path, f"{bad} NaN or infinite sample(s) {at}")
                mono = self._mono(raw)
                native += len(mono)
                if native / self.native_rate > cfg.max_seconds:
                    raise TooLongAudio(path, f"more than {cfg.max_seconds:.0f} s of audio (audio.max_seconds)")
                self.meter.update(raw)
                self.mix_meter.update(mono)
                out = resampler.resample_chunk(mono, last=False) if resampler is not None else mono
                if len(out):
                    self._keep_excerpt(out)
                    self.n_samples += len(out)
                    yield out
            if native == 0:
                raise EmptyAudio(path, "the file holds no audio samples")
            if resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                if len(tail):
                    self._keep_excerpt(tail)
                    self.n_samples += len(tail)
                    yield tail
            self._check_end(native)
        except AudioError as exc:
            raise self.tag(exc) from None

    def _mono(self, raw: np.ndarray) -> np.ndarray:
        """The block mixed to mono (``audio.mix``). A mean of channels that cancel (L = -R: the mix
        far below every channel that carries signal) would be silence the recording does not hold:
        from the first block with signal on, such a file takes its louder channel instead, and its
        verdict says ``channels_cancel``."""
        if self._mix_channel is not None:
            return np.ascontiguousarray(raw[:, self._mix_channel], dtype=np.float32)
        mono = to_mono(raw, self.cfg.mix, self.path)
        if not self._mix_decided and raw.ndim == 2 and raw.shape[1] > 1 and self.cfg.mix == "mean":
            power = np.einsum("ij,ij->j", raw, raw, dtype=np.float64) / len(raw)
            if power.max() > 10 ** (self.cfg.silence_dbfs / 10):  # the first block with signal decides
                self._mix_decided = True
                if float(np.dot(mono, mono)) / len(mono) < power.max() * CANCEL_RATIO:
                    self._mix_channel = int(np.argmax(power))
                    self.mix_flags.append("channels_cancel")
                    return np.ascontiguousarray(raw[:, self._mix_channel], dtype=np.float32)
        return mono

    def _keep_excerpt(self, block: np.ndarray) -> None:
        from devrecd.audio.condition import ANALYSIS_SECONDS

        cap = int(ANALYSIS_SECONDS * self.sample_rate)
        if self._excerpt_n >= cap:
            return
        if not len(self._excerpt):
            self._excerpt = np.empty(min(cap, max(self.expected_frames + 64, len(block))), np.float32)
        take = block[: cap - self._excerpt_n]
        if self._excerpt_n + len(take) > len(self._excerpt):
            grown = np.empty(min(cap, max(2 * len(self._excerpt), self._excerpt_n + len(take))), np.float32)
            grown[: self._excerpt_n] = self._excerpt[: self._excerpt_n]
            self._excerpt = grown
        self._excerpt[self._excerpt_n : self._excerpt_n + len(take)] = take
        self._excerpt_n += len(take)

    def _check_end(self, native: int) -> None:
        cfg, path = self.cfg, self.path
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != (self._st.st_size, self._st.st_mtime_ns):
            raise ChangedAudio(path, "the file changed while it was being read; it is read again when it is stable")
        duration = native / self.native_rate
        if duration < cfg.min_seconds:
            raise TooShortAudio(path, f"{duration:.2f} s of audio, the minimum is {cfg.min_seconds:.2f} s (audio.min_seconds)")
        level = self.mix_meter.dbfs
        if level < cfg.silence_dbfs:
            what = "digital silence" if level == -math.inf else f"RMS level {level:.1f} dBFS"
            raise SilentAudio(path, f"{what}, below the silence threshold {cfg.silence_dbfs:.0f} dBFS (audio.silence_dbfs)")
        ac = self.mix_meter.ac_dbfs()
        if ac < cfg.silence_dbfs:  # a constant (DC), however loud, carries no signal
            what = "no AC content at all" if ac == -math.inf else f"RMS level {ac:.1f} dBFS after removing DC"
            raise SilentAudio(path, f"no signal: a constant of {self.mix_meter.dc_offset:+.3f} (DC) with {what}, below "
                                    f"the silence threshold {cfg.silence_dbfs:.0f} dBFS (audio.silence_dbfs)")

    def levels(self) -> dict:
        """The levels block of the verdict (after :meth:`blocks` is exhausted)."""
        c = self.cfg
        out = self.meter.summary(clip_fraction=c.clip_fraction, dc_offset=c.dc_offset, loud_dbfs=c.loud_dbfs)
        out["flags"] = [*out["flags"], *(f for f in self.mix_flags if f not in out["flags"])]
        return out

    def integrity(self) -> dict:
        """The integrity block of the verdict (after :meth:`blocks` is exhausted): flags and notes."""
        flags: list[str] = []
        notes: list[str] = []
        src = getattr(self, "_source", None)
        for flag, note in [*self.integrity_findings, *(src.integrity if src is not None else [])]:
            if flag not in flags:
                flags.append(flag)
            notes.append(note)
        return {"flags": flags, "notes": notes}

    def recording(self, samples: np.ndarray | None = None) -> Recording:
        """The :class:`Recording` (after :meth:`blocks` is exhausted): with the decoded ``samples``, or
        without them (a zero-strided stand-in of the right length, no memory) for its description.
        The one place a Recording is built from a file."""
        excerpt = None
        if samples is None:
            samples = np.broadcast_to(np.zeros(1, np.float32), (self.n_samples,))
            excerpt = self._excerpt[: self._excerpt_n]
        return Recording(path=str(self.path), sha256=self.sha256 or "", size=self.size or 0, samples=samples,
                         sample_rate=self.sample_rate, native_rate=self.native_rate, channels=self.channels,
                         codec=self.codec, container=self.container, decoder=self.decoder, resampled=self.resampled,
                         levels=self.levels(), resolved_path=self.resolved_path, excerpt=excerpt,
                         integrity=self.integrity())

    def describe(self) -> dict:
        """:meth:`Recording.describe` of this file (after :meth:`blocks` is exhausted)."""
        return self.recording().describe()

    def close(self) -> None:
        src = getattr(self, "_source", None)
        if src is not None:
            src.close()
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EvidenceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stream(path: str | os.PathLike, sample_rate: int, cfg: AudioConfig | None = None, *,
                confine: Sequence[str] | None = None) -> EvidenceStream:
    """Open and hash one recording for block-wise decoding (see :class:`EvidenceStream`)."""
    return EvidenceStream(path, sample_rate, cfg, confine=confine)


def read_file_bytes(path: str | os.PathLike, max_bytes: float) -> bytes:
    """The whole content of a file opened as evidence is (:func:`open_evidence`: read-only, never
    blocking, regular files only); :class:`TooLongAudio` past ``max_bytes``."""
    fd, _, _ = open_evidence(path)
    try:
        chunks, n = [], 0
        while chunk := os.read(fd, _READ_CHUNK):
            n += len(chunk)
            if n > max_bytes:
                raise TooLongAudio(Path(path), f"more than {max_bytes:.0f} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_bytes(data: bytes, cfg: AudioConfig | None = None, *, name: str = "<memory>") -> tuple[np.ndarray, int]:
    """Decode audio held in memory (e.g. a codec round trip) with the evidence decoders and their caps:
    (frames, channels) float32 samples at the native rate, and that rate."""
    cfg, path = cfg or AudioConfig(), Path(name)
    src = _open_decoder(path, io.BytesIO(data), data[:64], cfg)
    try:
        blocks = [b for b in src.blocks() if len(b)]
    finally:
        src.close()
    if not blocks:
        raise EmptyAudio(path, "the file holds no audio samples")
    return np.concatenate(blocks), src.rate


def sample_ratio(native: int, target: int) -> float:
    """Samples at ``target`` rate per sample at ``native`` rate."""
    return target / native if native else 1.0


def read_evidence(path: str | os.PathLike, sample_rate: int, cfg: AudioConfig | None = None, *,
                  confine: Sequence[str] | None = None) -> Recording:
    """Open, hash, decode, check and (only if needed) resample one recording into memory.

    Raises a subclass of :class:`~devrecd.audio.errors.AudioError` that says exactly why a file
    cannot be judged.
    """
    with open_stream(path, sample_rate, cfg, confine=confine) as s:
        buf = np.empty(s.expected_frames + 64 if s.expected_frames else sample_rate, dtype=np.float32)
        n = 0
        for block in s.blocks():
            if n + len(block) > len(buf):
                grown = np.empty(max(2 * len(buf), n + len(block)), dtype=np.float32)
                grown[:n] = buf[:n]
                buf = grown
            buf[n : n + len(block)] = block
            n += len(block)
        return s.recording(buf[:n] if n == len(buf) else buf[:n].copy())


CANCEL_RATIO = 1e-4  # mean mix 40 dB below the loudest channel: the channels cancel (L = -R)


def to_mono(samples: np.ndarray, mix: str, path: Path | str) -> np.ndarray:
    """(frames,) or (frames, channels) samples -> float32 mono by ``audio.mix`` (``mean`` or ``first``);
    ``path`` names the source in the error (a file, or the live input)."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.shape[1] == 1:
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
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


class _Source:
    """A decoder opened on a file: header facts and a generator of (frames, channels) float32 blocks."""

    rate: int
    channels: int
    frames: int  # from the header; 0 when unknown
    codec: str
    container: str
    decoder: str
    integrity: list[tuple[str, str]]  # (flag, note): integrity findings of the decoder (after blocks())

    def blocks(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _check_caps(path: Path, rate: int, channels: int, seconds: float, cfg: AudioConfig, what: str) -> None:
    """Refuse, before any sample is decoded, what the header says is implausible or too big."""
    if not rate or rate <= 0:
        raise CorruptAudio(path, f"the {what} gives no sample rate")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ImplausibleRate(path, f"the {what} says {rate} Hz; recordings are {MIN_RATE}-{MAX_RATE} Hz")
    if channels < 1:
        raise CorruptAudio(path, f"the {what} gives {channels} channels")
    if seconds > cfg.max_seconds:
        raise TooLongAudio(path, f"header says {seconds:.0f} s, the cap is {cfg.max_seconds:.0f} s (audio.max_seconds)")
    samples = seconds * rate * channels
    if samples > cfg.max_decoded_samples:
        raise TooLongAudio(path, f"header says {seconds:.0f} s x {rate} Hz x {channels} channels = {samples:.3g} samples, "
                                 f"the cap is {cfg.max_decoded_samples:.3g} (audio.max_decoded_samples)")


def _open_decoder(path: Path, fh, head: bytes, cfg: AudioConfig) -> _Source:
    try:
        return _SoundfileSource(path, fh, head, cfg)
    except _NotForThisDecoder:
        pass
    try:
        return _PyAVSource(path, fh, cfg)
    except _NotForThisDecoder as exc:
        known = sniff_container(head)
        if known:
            # A header rate no decoder accepts (e.g. 4 GHz, past a signed 32-bit field) is reported
            # as what it is, not as an undecodable file.
            declared = _declared_rate(fh)
            if declared and not MIN_RATE <= declared <= MAX_RATE:
                raise ImplausibleRate(path, f"the {known} header says {declared} Hz; recordings are "
                                            f"{MIN_RATE}-{MAX_RATE} Hz (no decoder opens it)") from None
            raise CorruptAudio(path, f"looks like {known} but cannot be decoded: {exc}") from None
        raise UnsupportedAudio(path, f"not a recognised audio format ({exc})") from None


def _declared_rate(fh) -> int | None:
    """The sample rate a WAV (RIFF/RF64 ``fmt `` chunk) or FLAC (STREAMINFO) header declares, read
    from the raw bytes; None when there is no such header or it is cut short."""
    fh.seek(0)
    head = fh.read(12)
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        pos, end = 12, fh.seek(0, os.SEEK_END)
        for _ in range(64):  # a few chunks precede "fmt " in practice (ds64, JUNK, bext)
            if pos + 8 > end:
                return None
            fh.seek(pos)
            hdr = fh.read(8)
            if len(hdr) < 8:
                return None
            cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
            if cid == b"fmt ":
                body = fh.read(8)  # format tag, channels, sample rate
                return struct.unpack("<I", body[4:8])[0] if len(body) == 8 else None
            pos += 8 + size + (size & 1)
        return None
    if head[:4] == b"fLaC":
        fh.seek(0)
        info = flac_streaminfo(fh.read(42))
        return info["rate"] if info else None
    return None


def flac_streaminfo(head: bytes) -> dict | None:
    """The STREAMINFO of a FLAC file from its first 42 bytes (magic, block header, 34-byte body):
    rate, channels, bits per sample, total samples (0: unknown) and the MD5 of the decoded samples
    (16 zero bytes: not computed by the encoder); None when the bytes are not that."""
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
        return None
    b = head[8:42]
    return {"rate": b[10] << 12 | b[11] << 4 | b[12] >> 4, "channels": (b[12] >> 1 & 7) + 1,
            "bits": ((b[12] & 1) << 4 | b[13] >> 4) + 1,
            "total_samples": (b[13] & 0xF) << 32 | int.from_bytes(b[14:18], "big"), "md5": bytes(b[18:34])}


def _check_ogg_tail(tail: bytes, size: int) -> list[tuple[str, str]]:
    """An Ogg file cut short: its last page is incomplete, or complete without the end-of-stream
    flag that every finished logical stream ends with. ``tail``: the file's last bytes."""
    at = len(tail)
    while (at := tail.rfind(b"OggS", 0, at)) >= 0:
        hdr = tail[at : at + 27]
        if hdr[4:5] not in (b"", b"\0"):
            continue  # version 0 is the only one: "OggS" inside a packet, look further back
        cut = f"Ogg: the last page (at byte {size - len(tail) + at}) is cut short"
        if len(hdr) < 27 or len(tail) < at + 27 + hdr[26]:
            return [("truncated", f"{cut} inside its header")]
        nseg = hdr[26]
        end = at + 27 + nseg + sum(tail[at + 27 : at + 27 + nseg])
        if end > len(tail):
            return [("truncated", f"{cut}: {len(tail) - at} of {end - at} bytes are present")]
        if end < len(tail) or hdr[5] & 0x04:
            return []  # ends with the end-of-stream flag (bytes after the last page are not a cut)
        granule = struct.unpack("<q", hdr[6:14])[0]
        return [("truncated", f"Ogg: the last page (granule position {granule}) lacks the end-of-stream "
                              "flag: the stream stops before its end")]
    return []


class _NotForThisDecoder(Exception):
    """This decoder cannot open the bytes at all; let the next one try."""


class _SoundfileSource(_Source):
    decoder = "soundfile"

    def __init__(self, path: Path, fh, head: bytes, cfg: AudioConfig) -> None:
        import soundfile as sf

        self.path, self._fh, self.integrity = path, fh, []
        fh.seek(0)
        try:
            self._sf = sf.SoundFile(fh)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise _NotForThisDecoder(str(exc)) from None
        self.rate, self.channels, self.frames = self._sf.samplerate, self._sf.channels, self._sf.frames
        self.codec, self.container = self._sf.subtype, self._sf.format
        # FLAC: the STREAMINFO MD5 of the decoded samples is checked as they are decoded, from the
        # integers at the file's own width (8/16/24 bits; libsndfile reads them left-aligned).
        self._md5 = self._md5_want = None
        self._bits = 0
        info = flac_streaminfo(head) if self.container == "FLAC" else None
        if info and any(info["md5"]) and {8: "PCM_S8", 16: "PCM_16", 24: "PCM_24"}.get(info["bits"]) == self.codec:
            self._md5, self._md5_want, self._bits = hashlib.md5(), info["md5"], info["bits"]
        try:
            _check_caps(path, self.rate, self.channels, self.frames / max(1, self.rate), cfg, "header")
            if self.container in ("WAV", "WAVEX", "RF64"):
                self.integrity += _check_riff(path, fh)
        except AudioError:
            self._sf.close()
            raise

    def blocks(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        # int16 read + scale is ~5x cheaper than libsndfile's float conversion for 16-bit PCM.
        md5, bits = self._md5, self._bits
        dtype = "int32" if bits == 24 else "int16" if self.codec == "PCM_16" or md5 else "float32"
        scale = np.float32(1.0 / 2147483648.0 if dtype == "int32" else 1.0 / 32768.0)
        got = 0
        while True:
            try:
                block = self._sf.read(BLOCK_FRAMES, dtype=dtype, always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                if self.container == "FLAC":  # the frames libsndfile cannot reach: _flac_rest
                    break
                raise CorruptAudio(self.path, f"{self.container}/{self.codec} decoding failed after "
                                              f"{got / self.rate:.2f} s: {exc}") from None
            if not len(block):
                break
            got += len(block)
            if md5 is not None:
                md5.update(_pcm_le(block, bits))
            yield block if dtype == "float32" else block.astype(np.float32) * scale
        if got < self.frames and self.container == "FLAC":
            finding = yield from _flac_rest(self.path, self._fh, got, self.frames)
            self.integrity += [finding] if finding else []
            return  # the STREAMINFO MD5 covers the samples it declares, not those present: not compared
        if got < self.frames:
            raise CorruptAudio(self.path, f"truncated: header promises {self.frames} frames, only {got} decode")
        if md5 is not None and md5.digest() != self._md5_want:
            self.integrity.append(("md5_mismatch", f"FLAC: the decoded samples' MD5 {md5.hexdigest()} differs from "
                                                   f"the {self._md5_want.hex()} its STREAMINFO stores"))

    def close(self) -> None:
        self._sf.close()


def _flac_rest(path: Path, fh, skip: int, declared: int) -> Generator[np.ndarray, None, tuple[str, str] | None]:
    """The audio of a FLAC after its first ``skip`` frames, where libsndfile stopped short of the
    ``declared`` STREAMINFO total (it gives up at a frame cut short, or seeks for the samples the
    header promises): decoded by FFmpeg (PyAV) from the same read-only descriptor, the first ``skip``
    frames dropped (FLAC is lossless: both decoders give the same integers). Returns the finding:

    * ``truncated``: the file ends inside a frame (the last packet, up to the file's end, does not
      decode): it was cut there, and the audio before the cut is judged;
    * ``header_length_mismatch``: every frame present decodes whole but they hold fewer samples than
      STREAMINFO declares. The bytes cannot tell a cut at a frame boundary from a header written or
      changed to claim more, so the finding states only what is seen (as an RF64's ds64 count);
    * None: FFmpeg decoded every declared sample (libsndfile alone failed).

    A frame that does not decode before the last one (FFmpeg skips it: the next frame's sample number
    jumps) is damage within the audio, not at its end: refused as corrupt, as libsndfile refuses it."""
    import av

    fh.seek(0)
    end, at, rate = os.fstat(fh.fileno()).st_size, 0, 0
    with av.open(fh, mode="r") as container:
        stream = container.streams.audio[0]
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
                if not packet.size:
                    continue
                frames = packet.decode()
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                if packet.pos is None or packet.pos < 0 or packet.pos + packet.size < end:
                    raise CorruptAudio(path, f"FLAC decoding failed after {at / max(1, rate):.2f} s: {exc}") from None
                return ("truncated", f"FLAC: the file ends inside a frame (at byte {end}): {at} of the {declared} "
                                     "samples STREAMINFO declares are present and judged; its MD5 is not checked")
            for frame in frames:
                rate = frame.sample_rate or rate
                if frame.pts is not None and frame.time_base and round(frame.pts * frame.time_base * rate) != at:
                    raise CorruptAudio(path, f"FLAC: a damaged frame within the audio: the samples from {at} on "
                                             f"({at / rate:.2f} s) do not decode")
                arr = _planar_float(frame.to_ndarray(), frame.format.is_planar, len(frame.layout.channels))
                keep, at = arr[max(0, skip - at):], at + len(arr)
                if len(keep):
                    yield keep
    if at >= declared:
        return None
    return ("header_length_mismatch", f"FLAC: STREAMINFO declares {declared} samples, its frames hold {at}, each "
                                      "whole (cut at a frame boundary, or the header claims more): the audio present "
                                      "is judged; its MD5 is not checked")


def _pcm_le(block: np.ndarray, bits: int) -> bytes:
    """Interleaved little-endian signed integers of ``bits`` width (FLAC's MD5 input) from a block
    libsndfile read left-aligned in int16 (8/16 bits) or int32 (24 bits)."""
    if bits == 8:
        return (block >> 8).astype(np.int8).tobytes()
    if bits == 16:
        return block.astype("<i2", copy=False).tobytes()
    return np.ascontiguousarray((block >> 8).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]).tobytes()


def _check_riff(path: Path, fh) -> list[tuple[str, str]]:
    """libsndfile quietly reads what is there of a truncated WAV; refuse it instead. An RF64 whose
    ``ds64`` chunk claims more frames than its data holds is judged with ``header_length_mismatch``.
    -> integrity findings (flag, note)."""
    end = os.fstat(fh.fileno()).st_size
    pos, ds64, block_align = 12, None, 0
    while pos + 8 <= end:
        fh.seek(pos)
        hdr = fh.read(8)
        if len(hdr) < 8:
            return []
        cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        if cid == b"ds64":  # RF64: 64-bit RIFF size, data size and sample (frame) count
            body = fh.read(24)
            ds64 = struct.unpack("<QQQ", body) if len(body) == 24 else None
        elif cid == b"fmt ":
            body = fh.read(14)
            block_align = struct.unpack("<H", body[12:14])[0] if len(body) == 14 else 0
        elif cid == b"data":
            available = end - pos - 8
            # 0 and 0xFFFFFFFF are "size unknown" (streamed / RF64); they cannot be checked.
            if size not in (0, 0xFFFFFFFF) and available < size:
                raise CorruptAudio(path, f"truncated WAV: the data chunk declares {size} bytes, {available} are present")
            if size == 0xFFFFFFFF and ds64 is not None:
                data_size, frames = ds64[1], ds64[2]
                if data_size > available:
                    raise CorruptAudio(path, f"truncated RF64: the ds64 chunk declares {data_size} data bytes, "
                                             f"{available} are present")
                held = min(data_size, available) // block_align if block_align else 0
                if block_align and frames > held:
                    return [("header_length_mismatch", f"RF64: the ds64 chunk claims {frames} frames, the data chunk "
                                                       f"holds {held}")]
            return []
        pos += 8 + size + (size & 1)
    return []


class _PyAVSource(_Source):
    decoder = "pyav"

    def __init__(self, path: Path, fh, cfg: AudioConfig) -> None:
        import av

        self.path, self.cfg, self.integrity = path, cfg, []
        fh.seek(0)
        try:
            self._c = av.open(fh, mode="r")
        except av.error.FFmpegError as exc:
            # FFmpeg's own words without the file-object name it appends (a descriptor number here)
            raise _NotForThisDecoder(exc.strerror or type(exc).__name__) from None
        except (ValueError, OSError) as exc:
            raise _NotForThisDecoder(str(exc)) from None
        try:
            streams = self._c.streams.audio
            if not streams:
                raise UnsupportedAudio(path, f"the {self._c.format.name} container has no audio stream")
            self._stream = stream = streams[0]
            ctx = stream.codec_context
            if ctx is None or ctx.name is None or not ctx.codec:
                raise UnsupportedAudio(path, "no decoder for this audio codec")
            self.header_seconds = float(stream.duration * stream.time_base) if stream.duration else (
                self._c.duration / 1e6 if self._c.duration else 0.0)
            self.rate = ctx.sample_rate
            self.channels = ctx.channels or 1
            self.codec, self.container = ctx.name, self._c.format.name
            _check_caps(path, self.rate, self.channels, self.header_seconds, cfg, "stream")
            self.frames = int(self.header_seconds * self.rate)
        except BaseException:
            self._c.close()
            raise

    def blocks(self) -> Iterator[np.ndarray]:
        import av

        cfg, rate = self.cfg, self.rate
        total = decoded = 0
        try:
            for frame in self._c.decode(self._stream):
                if frame.sample_rate and frame.sample_rate != rate:
                    raise CorruptAudio(self.path, f"the rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
                arr = _planar_float(frame.to_ndarray(), frame.format.is_planar, len(frame.layout.channels))
                if arr.shape[1] != self.channels:
                    # FFmpeg may revise the layout after the first packet; the cap counts what decodes.
                    self.channels = arr.shape[1]
                total += arr.shape[0]
                decoded += arr.size
                if decoded > cfg.max_decoded_samples:
                    raise TooLongAudio(self.path, f"more than {cfg.max_decoded_samples:.3g} decoded samples "
                                                  "(audio.max_decoded_samples)")
                yield arr
        except av.error.FFmpegError as exc:
            raise CorruptAudio(self.path, f"{self.codec} decoding failed after {total / rate:.2f} s: {exc}") from None
        if total == 0:
            raise EmptyAudio(self.path, f"the {self.codec} stream decodes to no samples")
        if self.header_seconds and total / rate < 0.9 * self.header_seconds - 0.5:
            raise CorruptAudio(self.path, f"truncated: header says {self.header_seconds:.2f} s, only {total / rate:.2f} s decode")

    def close(self) -> None:
        self._c.close()


def _planar_float(arr: np.ndarray, planar: bool, channels: int) -> np.ndarray:
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
