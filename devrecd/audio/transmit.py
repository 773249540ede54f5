"""Transmission: pass audio through a named channel (:mod:`devrecd.audio.channel`: a codec at its bit
rate and native rate, or a band limit) and back to the caller's rate.

One implementation for everything that needs a channel: the device simulator's encoder stage
(:func:`codec_round_trip`), codec/band-limit augmentation in training, condition matching of
references before scoring (:mod:`devrecd.openset.matching`) and ``benchmarks/codecs.py``.

    x at rate r -> soxr (VHQ) to the codec's native rate -> encode (FFmpeg via PyAV, in memory)
      -> decode with the project's one decoder -> soxr back to r -> same length as x

Codec delay (encoder priming, look-ahead) is removed by cross-correlation with the input, so a
channel never shifts the audio in time. An encoder missing from the FFmpeg that PyAV bundles is a
:class:`ChannelUnavailable` error naming it; nothing is substituted for it.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np

from devrecd.audio.channel import CHANNELS, Channel, ChannelError, ChannelUnavailable
from devrecd.audio.decoders import decode_bytes  # the project's one decoder, reused for the round trip
from devrecd.audio.noise import SILENCE_DBFS, measure_noise
from devrecd.audio.settings import AudioConfig

RESAMPLE_QUALITY = "VHQ"  # soxr: the project's resampler everywhere audio changes rate


@lru_cache(maxsize=None)
def encoder_available(encoder: str) -> bool:
    """Whether PyAV's FFmpeg has this audio encoder."""
    import av

    try:
        av.codec.Codec(encoder, "w")
    except Exception:  # av raises UnknownCodecError (a ValueError) or FFmpegError by version
        return False
    return True


def available_channels() -> list[str]:
    """Names of the channels this installation can apply."""
    return [c.name for c in CHANNELS.values() if not c.encoder or encoder_available(c.encoder)]


def resample(x: np.ndarray, rate_in: int, rate_out: int, quality: str = RESAMPLE_QUALITY) -> np.ndarray:
    if rate_in == rate_out:
        return np.asarray(x, dtype=np.float64)
    import soxr

    return soxr.resample(np.asarray(x, dtype=np.float64), rate_in, rate_out, quality=quality)


def encode(x: np.ndarray, rate: int, encoder: str, container: str, bitrate: int) -> bytes:
    """Encode mono float samples (at ``rate``, a rate the encoder takes) in memory: the file's bytes."""
    import av

    if not encoder_available(encoder):
        raise ChannelUnavailable(
            f"the FFmpeg bundled with PyAV {av.__version__} has no {encoder} encoder; this channel cannot be "
            "applied here (install a PyAV built against an FFmpeg with it)")
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)[None]
    buf = io.BytesIO()
    try:
        with av.open(buf, "w", format=container) as out:
            stream = out.add_stream(encoder, rate=rate, layout="mono")
            stream.bit_rate = bitrate
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    except (av.error.FFmpegError, ValueError) as exc:
        raise ChannelError(f"the {encoder} encoder failed at {rate} Hz, {bitrate} bit/s: {exc}") from None
    return buf.getvalue()


def codec_round_trip(x: np.ndarray, rate: int, encoder: str, container: str, bitrate: int) -> tuple[np.ndarray, int]:
    """Encode mono float samples (at ``rate``) in memory and decode them back with the project's decoder.

    Returns (float64 samples, decoded rate). The decoded audio is not delay-compensated.
    """

    data = encode(x, rate, encoder, container, bitrate)
    decoded, out_rate = decode_bytes(data, AudioConfig(min_seconds=0.0), name=f"<{encoder} round trip>")
    if decoded.ndim > 1:
        decoded = decoded.mean(axis=1)
    return decoded.astype(np.float64), int(out_rate)


def encode_file(x: np.ndarray, rate: int, channel: Channel) -> bytes:
    """``x`` (mono, at ``rate``) resampled to the channel's rate and encoded: the bytes of a file in the
    channel's container (a questioned recording as a messaging app or a call recorder would store it)."""
    if not channel.encoder:
        raise ChannelError(f"channel {channel.name!r} is a band limit, not a codec: it has no file format")
    return encode(resample(x, rate, channel.rate), channel.rate, channel.encoder, channel.container, channel.bitrate)


def _align(y: np.ndarray, ref: np.ndarray, max_lag: int) -> np.ndarray:
    """``y`` shifted by the lag (0..max_lag samples late) that best matches ``ref``, trimmed/padded to len(ref)."""
    n = len(ref)
    if max_lag > 0 and n > 0 and len(y) > 0:
        a = y[: min(n, 1 << 16) + max_lag]
        v = ref[: min(n, 1 << 16, len(a))]
        # c[k] = sum_i a[i + k] v[i] for the lags k = 0 .. len(a) - len(v), by FFT (no circular wrap).
        size = _fft_size(len(a) + len(v) - 1)
        c = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(v, size)), size)[: len(a) - len(v) + 1]
        y = y[int(np.argmax(c[: max_lag + 1])):]
    return np.pad(y, (0, max(0, n - len(y))))[:n]


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: an FFT length numpy's pocketfft computes fast."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35 << max(0, (-(-n // p35) - 1).bit_length())  # p35 * the power of two reaching n
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def butterworth_zero_phase(x: np.ndarray, rate: int, low_hz: float, high_hz: float, order: int = 8) -> np.ndarray:
    """``x`` through a digital Butterworth band pass (``low_hz`` > 0) or low pass of ``order``, run
    forwards and backwards (zero phase), applied in the frequency domain.

    Forward-backward filtering has the gain |H|^2 and no phase; for the bilinear-transform
    Butterworth (scipy's ``butter``) that is 1 / (1 + r^(2 order)) with, in prewarped frequency
    W = tan(pi f / rate), r = W / Wc (low pass) or (W^2 - Wl Wh) / (W (Wh - Wl)) (band pass). The
    signal is extended by 50 ms of odd reflection at both ends (as ``sosfiltfilt`` pads): the FFT's
    circular wrap-around and the edge transients fall into the extensions, which are cut off again;
    tests compare the result with sosfiltfilt.
    """
    n = len(x)
    pad = min(n - 1, max(64, int(0.05 * rate)))  # >> the filter's impulse response at these edges
    ext = np.concatenate([2 * x[0] - x[pad:0:-1], x, 2 * x[-1] - x[-2 : -pad - 2 : -1]])
    size = _fft_size(len(ext))
    w = np.tan(np.pi * np.minimum(np.fft.rfftfreq(size, 1.0 / rate), 0.499999 * rate) / rate)
    wh = math.tan(math.pi * high_hz / rate)
    if low_hz > 0:
        wl = math.tan(math.pi * low_hz / rate)
        with np.errstate(divide="ignore"):
            r = np.abs(w * w - wl * wh) / (w * (wh - wl))  # inf at DC: the band pass blocks it
    else:
        r = w / wh
    with np.errstate(over="ignore"):
        gain = 1.0 / (1.0 + r ** (2 * order))
    y = np.fft.irfft(np.fft.rfft(ext, size) * gain, size)
    return y[pad : pad + n]


def pcm16(y: np.ndarray) -> np.ndarray:
    """``y`` on the grid of 16-bit PCM (the quantiser of a 16-bit file; clipped to full scale)."""
    return np.round(np.clip(y, -1.0, 1.0) * 32767.0) / 32768.0


def at_level(y: np.ndarray, rate: int, speech_dbfs: float) -> np.ndarray:
    """``y`` scaled so that its speech level (:func:`devrecd.audio.noise.measure_noise`'s, the one a
    recording's condition reports) is ``speech_dbfs``; silence stays silence."""
    own = measure_noise(y, rate).speech_dbfs
    return y * 10.0 ** ((speech_dbfs - own) / 20.0) if own > SILENCE_DBFS else y


def _stored(channel: Channel, y: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    """``y`` (at ``rate``, after the channel) as the questioned file stores it: 16-bit PCM at
    :attr:`Channel.stored_rate`, its speech brought to :attr:`Channel.stored_level_dbfs` first."""
    store_rate = channel.stored_rate or rate
    if store_rate == rate and channel.stored_level_dbfs is None:
        return y, rate
    y = resample(y, rate, store_rate)
    if channel.stored_level_dbfs is not None:
        y = at_level(y, store_rate, channel.stored_level_dbfs)
    return pcm16(y), store_rate


def apply_channel(channel: Channel, x: np.ndarray, rate: int) -> np.ndarray:
    """``x`` (mono float, at ``rate``) through ``channel``: float32 at ``rate``, same length."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ChannelError(f"a channel takes non-empty mono audio, got shape {x.shape}")
    if rate <= 0 or channel.rate <= 0:
        raise ChannelError(f"sample rates must be > 0, got {rate} (audio) and {channel.rate} ({channel.name})")
    native = resample(x, rate, channel.rate)
    if channel.encoder:
        y, out_rate = codec_round_trip(native, channel.rate, channel.encoder, channel.container, channel.bitrate)
        y = _align(y, native, max_lag=int(0.2 * out_rate))  # codec delays are well under 200 ms
    else:
        y, out_rate = native, channel.rate
        if not channel.is_storage:
            hi = min(channel.high_hz, 0.98 * channel.rate / 2.0)
            y = butterworth_zero_phase(native, channel.rate, channel.low_hz, hi)  # zero phase: no delay to undo
            y = pcm16(y)  # 16-bit PCM, as a telephone exchange delivers
        y, out_rate = _stored(channel, y, out_rate)
    back = resample(y, out_rate, rate)
    back = np.pad(back, (0, max(0, len(x) - len(back))))[: len(x)]
    return np.clip(back, -1.0, 1.0).astype(np.float32)
