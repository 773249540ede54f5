"""The decoders: a file's bytes -> (frames, channels) float32 blocks at the native rate, with the
header facts (rate, channels, length, codec) checked against the caps before any sample is decoded.

* WAV/FLAC/OGG/MP3 and friends are decoded by libsndfile (``soundfile``); everything else phones
  write (m4a/AAC, AMR-NB/WB, 3gp, Opus in MP4/WebM...) by FFmpeg through PyAV (:func:`open_decoder`
  tries them in that order and names what neither opens).
* Caps: header duration, decoded samples (frames x channels, ``audio.max_decoded_samples``) and a
  plausible sample rate (4 kHz - 384 kHz) (:func:`check_caps`).
* Integrity findings of the decoders (``Source.integrity``): ``md5_mismatch`` (a FLAC whose decoded
  samples do not match the MD5 its STREAMINFO stores; computed block by block as the samples are
  decoded, skipped when the stored MD5 is all zeros), ``truncated`` (a FLAC that ends inside a
  frame) and ``header_length_mismatch`` (a FLAC whose STREAMINFO declares more samples than its
  whole frames hold). Where libsndfile stops short of a FLAC's declared length, FFmpeg decodes the
  rest from the same descriptor (:func:`_flac_rest`). What the raw headers say is
  :mod:`devrecd.audio.headers`'.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Generator, Iterator

import numpy as np

from devrecd.audio.errors import (
    AudioError,
    CorruptAudio,
    EmptyAudio,
    ImplausibleRate,
    TooLongAudio,
    UnsupportedAudio,
)
from devrecd.audio.headers import check_riff, declared_rate, flac_streaminfo, sniff_container
from devrecd.audio.settings import AudioConfig

BLOCK_FRAMES = 1 << 16  # frames decoded at a time (2 MB of float32 at 8 channels)
MIN_RATE, MAX_RATE = 4_000, 384_000  # sample rates any recording device writes


class Source:
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


def check_caps(path: Path, rate: int, channels: int, seconds: float, cfg: AudioConfig, what: str) -> None:
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


def open_decoder(path: Path, fh, head: bytes, cfg: AudioConfig) -> Source:
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
            declared = declared_rate(fh)
            if declared and not MIN_RATE <= declared <= MAX_RATE:
                raise ImplausibleRate(path, f"the {known} header says {declared} Hz; recordings are "
                                            f"{MIN_RATE}-{MAX_RATE} Hz (no decoder opens it)") from None
            raise CorruptAudio(path, f"looks like {known} but cannot be decoded: {exc}") from None
        raise UnsupportedAudio(path, f"not a recognised audio format ({exc})") from None


class _NotForThisDecoder(Exception):
    """This decoder cannot open the bytes at all; let the next one try."""


class _SoundfileSource(Source):
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
            check_caps(path, self.rate, self.channels, self.frames / max(1, self.rate), cfg, "header")
            if self.container in ("WAV", "WAVEX", "RF64"):
                self.integrity += check_riff(path, fh)
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


class _PyAVSource(Source):
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
            check_caps(path, self.rate, self.channels, self.header_seconds, cfg, "stream")
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


def decode_bytes(data: bytes, cfg: AudioConfig | None = None, *, name: str = "<memory>") -> tuple[np.ndarray, int]:
    """Decode audio held in memory (e.g. a codec round trip) with the evidence decoders and their caps:
    (frames, channels) float32 samples at the native rate, and that rate."""
    cfg, path = cfg or AudioConfig(), Path(name)
    src = open_decoder(path, io.BytesIO(data), data[:64], cfg)
    try:
        blocks = [b for b in src.blocks() if len(b)]
    finally:
        src.close()
    if not blocks:
        raise EmptyAudio(path, "the file holds no audio samples")
    return np.concatenate(blocks), src.rate
