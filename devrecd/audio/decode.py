"""Evidence intake: open safely, hash, decode block by block to mono float32, resample only when needed.

Rules (each one a decision a forensic examiner can read back from the verdict):

* One way in: :func:`~devrecd.audio.evidence.open_evidence` (read-only, never blocking, regular
  files only; :mod:`devrecd.audio.evidence`).
* The bytes are hashed in one streamed pass (SHA-256), then decoded from the same descriptor; if the
  file's size or mtime changed in between, it is refused (``changed``): the hash recorded with a
  verdict is the hash of what was judged.
* Caps are checked before anything is allocated: bytes (``stat``), then what the header says
  (:mod:`devrecd.audio.decoders`: duration, decoded samples, a plausible sample rate).
* Decoding is block-wise: each block is checked for non-finite or absurd samples
  (:data:`MAX_SAMPLE_MAGNITUDE`: refused before any level, condition or feature), metered per channel
  (:mod:`devrecd.audio.levels`: a clipped channel is flagged even when the mix is not), mixed to
  mono and resampled to the model rate before the next is read, so memory
  is the mono model-rate result (or, streamed, nothing but a block), whatever the channel count.
* The decoders are :mod:`devrecd.audio.decoders` (libsndfile, then FFmpeg through PyAV); what the
  raw headers declare is :mod:`devrecd.audio.headers`.
* Integrity findings are flags, not refusals, wherever audio decodes (``Recording.integrity``,
  :data:`INTEGRITY_FLAGS`): ``md5_mismatch``, ``truncated`` and ``header_length_mismatch``, from the
  headers (Ogg tail, RF64 ``ds64``) and the decoders (FLAC). A WAV whose data chunk is cut short is
  still refused (``corrupt``).
* Channels are mixed to mono by averaging them (``audio.mix = "mean"``) or by taking the first
  (``"first"``). Averaging is the default because a phone's stereo pair shares one ADC clock and
  codec, and averaging keeps both microphones' contribution.
* The native rate is kept when it equals the model's. Otherwise the audio is resampled with soxr
  (``VHQ`` by default) and ``Recording.resampled`` is True: the recording chain IS the fingerprint,
  so this is reported, never hidden.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from devrecd.audio.condition import ANALYSIS_SECONDS, Condition, measure_condition
from devrecd.audio.decoders import open_decoder
from devrecd.audio.errors import (
    AudioError,
    ChangedAudio,
    EmptyAudio,
    NonFiniteAudio,
    SilentAudio,
    TooLongAudio,
    TooShortAudio,
    UnreadableAudio,
)
from devrecd.audio.evidence import hash_fd, open_evidence
from devrecd.audio.headers import check_ogg_tail
from devrecd.audio.levels import LevelMeter
from devrecd.audio.settings import AudioConfig

INTEGRITY_FLAGS = ("md5_mismatch", "truncated", "header_length_mismatch")

__all__ = ["Recording", "EvidenceStream", "open_stream", "read_evidence", "to_mono", "INTEGRITY_FLAGS"]


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

    @property
    def condition(self) -> Condition:
        """The recording's condition (:class:`devrecd.audio.condition.Condition`), measured once.

        Cached in the instance, not with ``functools.cached_property``: before Python 3.12 that
        takes one lock per class, so every recording's measurement waited for any other's."""
        cached = self.__dict__.get("_condition")
        if cached is None:
            cached = self.__dict__["_condition"] = measure_condition(self)
        return cached

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
        self._excerpt: SampleBuffer | None = None
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
            self.sha256, self.size, head, tail = hash_fd(self._fd, cfg.max_bytes)
        except OverflowError:
            raise TooLongAudio(path, f"grew past the cap of {cfg.max_bytes} bytes while being read (audio.max_bytes)") from None
        except OSError as exc:
            raise UnreadableAudio(path, f"read failed: {exc.strerror or exc}") from None
        if self.size == 0:
            raise EmptyAudio(path, "the file is empty (0 bytes)")
        self._head = head
        if head[:4] == b"OggS":
            self.integrity_findings += check_ogg_tail(tail, self.size)
        self._fh = os.fdopen(os.dup(self._fd), "rb")
        self._source = open_decoder(path, self._fh, head, cfg)
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
                self._check_samples(raw, native)
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

    def _check_samples(self, raw: np.ndarray, native: int) -> None:
        """Refuse a block holding samples that are not numbers, or numbers no recording holds (at or
        beyond :data:`MAX_SAMPLE_MAGNITUDE`), before anything (levels, mix, condition, features)
        computes on them. One pass when the block is sane: its peak (NaN when a sample is NaN)."""
        if not raw.size:
            return
        peak = float(np.max(np.abs(raw)))
        if peak < MAX_SAMPLE_MAGNITUDE:
            return
        path, at = self.path, f"in the block at {native / self.native_rate:.2f} s"
        finite = np.isfinite(raw)
        if not finite.all():
            bad = int(np.count_nonzero(~finite))
            if not np.isnan(raw).any() and str(self.codec).upper() == "DOUBLE":  # finite float64 beyond float32's range
                raise NonFiniteAudio(path, f"{bad} out-of-range sample(s) {at}: 64-bit float values beyond "
                                           f"+-3.4e38 (full scale is 1.0)")
            raise NonFiniteAudio(path, f"{bad} NaN or infinite sample(s) {at}")
        bad = int(np.count_nonzero(np.abs(raw) >= MAX_SAMPLE_MAGNITUDE))
        raise NonFiniteAudio(path, f"{bad} out-of-range sample(s) {at}: float values up to {peak:.3g}, beyond "
                                   f"+-{MAX_SAMPLE_MAGNITUDE:.0e} (full scale is 1.0): no recording holds them")

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
        if self._excerpt is None:
            self._excerpt = SampleBuffer(self.expected_frames + 64, cap=int(ANALYSIS_SECONDS * self.sample_rate))
        self._excerpt.append(block[: self._excerpt.room])

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
            excerpt = self._excerpt.samples() if self._excerpt is not None else np.empty(0, np.float32)
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
        buf = SampleBuffer(s.expected_frames + 64 if s.expected_frames else sample_rate)
        for block in s.blocks():
            buf.append(block)
        return s.recording(buf.samples(trim=True))


class SampleBuffer:
    """Mono float32 samples appended block by block into one array that doubles when full, up to
    ``cap`` samples when given (an append past it is refused: take at most :attr:`room`); the array
    is made at the first append, ``size`` samples (or the block's length, when longer)."""

    def __init__(self, size: int, *, cap: int | None = None) -> None:
        self._buf = np.empty(0, np.float32)
        self._size, self.cap, self.n = size, cap, 0

    @property
    def room(self) -> int | None:
        """Samples that may still be appended (None: no cap)."""
        return None if self.cap is None else max(0, self.cap - self.n)

    def append(self, block: np.ndarray) -> None:
        need = self.n + len(block)
        if self.cap is not None and need > self.cap:
            raise ValueError(f"{need} samples are past the buffer's cap of {self.cap}")
        if need > len(self._buf):
            size = max(2 * len(self._buf), self._size, need)
            grown = np.empty(size if self.cap is None else min(self.cap, size), np.float32)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = block
        self.n = need

    def samples(self, *, trim: bool = False) -> np.ndarray:
        """The samples so far: a view of the array, or (``trim``) an array of exactly them (a copy only
        when the array holds spare room)."""
        out = self._buf[: self.n]
        return out.copy() if trim and self.n != len(self._buf) else out


# Float samples at or beyond this magnitude are refused (``nonfinite``, "out-of-range sample(s)"): 200 dB
# above full scale, 4.7x a float file written at int32 scale (2.1e9, judged and flagged over_full_scale).
# Measured: the frontend's float32 power overflows from about 1e18 (a 1 kHz sine, 2 s windows), and
# samples of 1e30 reached it as RuntimeWarnings (overflow, invalid mel product and division) before
# the non-finite features were refused; the level-normalised features are the same up to 1e17.
MAX_SAMPLE_MAGNITUDE = 1e10

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
