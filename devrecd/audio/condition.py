"""The condition of a recording: what the file says (container, codec, bit rate, native rate,
channels) and what the signal says (its effective audio band, measured from the long-term spectrum).

The measured band is what survives re-packaging: an AMR-NB call recording converted to a 32 kHz
WAV still has nothing above ~4 kHz, and a telephone-band recording nothing below ~300 Hz. A codec
or a band limit leaves a *cliff* in the long-term average spectrum (tens of dB within a few hundred
Hz, down to the resampler's or the quantiser's floor), where a microphone's own roll-off is gradual;
the edge and the depth of that cliff are both reported.

:func:`condition_channel` turns a condition into the channel (:mod:`devrecd.audio.channel`) that
references must pass through to be compared like with like with this recording.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from devrecd.audio.channel import CHANNELS, PCM16_CODECS, Channel, band_limit, stored_as
from devrecd.audio.noise import SILENCE_DBFS, NoiseProfile, measure_noise
from devrecd.audio.spectra import hann, power_tiles

ANALYSIS_SECONDS = 120.0  # at most this much audio (spread over the recording) enters the spectrum
_BLOCK_SECONDS = 2.0
REF_BAND = (200.0, 4000.0)  # the speech band the level reference is taken from
EDGE_BELOW_REF_DB = 60.0  # without a cliff, the band ends where the spectrum is this far below the speech level
# A codec or band limit: the spectrum falls CLIFF_DB within CLIFF_HZ and never comes back above
# (band level - CLIFF_DB + BACK_DB) beyond the edge; a microphone's roll-off or a notch does neither.
CLIFF_DB = 30.0
CLIFF_HZ = 400.0
BACK_DB = 10.0
LOW_CLIFF_DB = 40.0  # the lower edge (a 300 Hz telephone high-pass) must be steeper than any phone's own high-pass
# A quiet 16-bit file: a band limit below QUIET_EDGE_HZ whose spectrum falls to the file's own quantiser
# floor (within FLOOR_MARGIN_DB, all the way to the Nyquist frequency) needs only QUIET_CLIFF_DB.
QUIET_EDGE_HZ = 5000.0
QUIET_CLIFF_DB = 10.0
# The floor of a dithered file lies higher: TPDF dither (two uniform LSB draws) adds twice the
# rounding noise's variance, +4.8 dB. Measured on the 15 CCNU phones' AMR-NB and telephone-band
# calls 20 and 30 dB quieter, dithered: 3 dB found 27 of 60, 6 dB 59 of 60, with no broadband
# recording (0 to -40 dB, dithered or not, whole, 3 s, 2 s) read as band-limited that was not at 3 dB.
FLOOR_MARGIN_DB = 6.0
LOW_CLIFF_HZ = 150.0
LOSSLESS = {"PCM_16", "PCM_24", "PCM_32", "PCM_S8", "PCM_U8", "FLOAT", "DOUBLE", "FLAC", "ALAC", "pcm_s16le",
            "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_s16be", "flac", "alac"}
# G.711 companded PCM (mu-law, A-law: 8-bit, 8 kHz, call recorders and telephony systems): not lossless
# although PyAV names it pcm_mulaw / pcm_alaw.
G711 = {"ULAW", "ALAW", "pcm_mulaw", "pcm_alaw"}
# What the two decoders call a codec -> the channels' codec names.
CODEC_ALIASES = {"OPUS": "opus", "libopus": "opus", "MPEG_LAYER_III": "mp3", "mp3float": "mp3",
                 "amr_nb": "amrnb", "libopencore_amrnb": "amrnb", "amr_wb": "amrwb", "libopencore_amrwb": "amrwb",
                 "aac_fixed": "aac", "libfdk_aac": "aac"}
# Decoder codec name -> channels with that encoder (the bit rate picks one).
_CODEC_CHANNELS: dict[str, list[Channel]] = {}
for _c in CHANNELS.values():
    if _c.codec:
        _CODEC_CHANNELS.setdefault(_c.codec, []).append(_c)


@dataclass(frozen=True)
class Band:
    """The effective audio band of a signal, from its long-term average spectrum."""

    low_hz: float  # lowest frequency within the band (a high-pass edge: ~300 Hz for a telephone band)
    high_hz: float  # highest frequency within the band (the codec's or the device's upper edge)
    high_drop_db: float  # how far the spectrum falls within CLIFF_HZ above high_hz
    low_drop_db: float  # how far it falls within CLIFF_HZ below low_hz
    nyquist_hz: float
    high_on_floor: bool = False  # the upper edge falls onto the file's quantiser floor (a quiet 16-bit file)
    low_on_floor: bool = False  # so does the lower edge (a quiet telephone band)

    @property
    def high_limited(self) -> bool:
        """A sharp upper edge below the Nyquist frequency: a codec or a band limit, not a microphone."""
        steep = self.high_drop_db >= (QUIET_CLIFF_DB if self.high_on_floor else CLIFF_DB)
        return steep and self.high_hz < 0.9 * self.nyquist_hz

    @property
    def limited_on_floor(self) -> bool:
        """A limit whose edge lies on the file's quantiser floor (found with the quiet-file rule)."""
        return (self.high_limited and self.high_on_floor) or (self.low_limited and self.low_on_floor)

    @property
    def low_limited(self) -> bool:
        """A sharp lower edge (a telephone band's 300 Hz high-pass)."""
        steep = self.low_drop_db >= (QUIET_CLIFF_DB if self.low_on_floor else LOW_CLIFF_DB)
        return steep and self.low_hz >= 150.0


def quantiser_floor_db(bits: int, rate: int) -> float:
    """The power spectral density (dB re 1/Hz, full scale 1.0) of rounding to ``bits``-bit PCM at
    ``rate``: white noise of variance step^2 / 12 spread over 0..rate/2 (16 bit at 32 kHz: -143.1)."""
    step = 2.0 ** (1 - bits)
    return 10.0 * math.log10(step * step / 12.0 / (rate / 2.0))


def measure_band(samples: np.ndarray, rate: int, floor_db: float | None = None) -> Band:
    """Measure the effective band of mono ``samples`` at ``rate`` (see the module docstring).

    ``floor_db``: the file's quantiser floor (:func:`quantiser_floor_db`) when it is integer PCM.
    A band limit stored quietly as 16-bit PCM falls to that floor, not tens of dB below its band:
    30 dB quieter, an AMR-NB call saved as a 32 kHz WAV lies 10-42 dB above it just inside its 3.8 kHz
    edge (the 15 CCNU phones) and the 30 dB cliff found 6 of 15 (a telephone band: 9 of 15). Where the
    spectrum sits on that floor from an edge below :data:`QUIET_EDGE_HZ` to the Nyquist frequency, a
    :data:`QUIET_CLIFF_DB` fall is a band limit: broadband CCNU recordings 20-40 dB quieter reach
    the floor at 6.9 kHz at the lowest (40 dB quieter), band-limited ones at 3.4-4.0 kHz."""
    x = _analysis_excerpt(np.asarray(samples), rate)  # float64 tile by tile in welch_psd, not whole
    nper = 1 << max(8, int(round(math.log2(rate / 16.0))))  # ~16 Hz bins: sharp enough for a cliff
    nper = min(nper, 1 << int(math.log2(max(256, len(x)))), len(x))
    f, p = welch_psd(x, rate, nper)
    level = _median_smooth(10.0 * np.log10(p + 1e-30), 5)
    nyq = rate / 2.0
    df = float(f[1] - f[0])
    band = (f >= REF_BAND[0]) & (f <= min(REF_BAND[1], 0.45 * rate))
    ref = float(_quantile(0.9, level[band])) if band.any() else float(level.max())

    hi_i, hi_drop, on_floor = _upper_cliff(level, f, max(2, int(round(CLIFF_HZ / df))), nyq, floor_db)
    if hi_i is None:  # no cliff: where the spectrum has faded far below the speech level
        above = np.flatnonzero(level > ref - EDGE_BELOW_REF_DB)
        hi_i = int(above[-1]) if above.size else len(f) - 1
        k = max(2, int(round(CLIFF_HZ / df)))
        hi_drop = float(_quantile(0.5, level[max(0, hi_i - k): hi_i + 1]) - _quantile(0.5, level[hi_i + 1: hi_i + 1 + k])) \
            if hi_i + 2 < len(level) else 0.0
    # A quiet telephone band: its 300 Hz high-pass falls onto the floor too (looked for only below an
    # upper edge on the floor: a quiet broadband phone's own high-pass can sink into it as well).
    lo_i, lo_drop = _lower_cliff(level, f, max(2, int(round(LOW_CLIFF_HZ / df))), floor_db if on_floor else None)
    return Band(low_hz=round(float(f[lo_i]), 1), high_hz=round(float(f[hi_i]), 1),
                high_drop_db=round(hi_drop, 1), low_drop_db=round(lo_drop, 1), nyquist_hz=nyq,
                high_on_floor=on_floor, low_on_floor=on_floor and lo_drop < LOW_CLIFF_DB)


def _upper_cliff(level: np.ndarray, f: np.ndarray, k: int, nyq: float,
                 floor_db: float | None = None) -> tuple[int | None, float, bool]:
    """The lowest upper band edge with a cliff below 0.9 x Nyquist: (bin of the edge, depth in dB,
    whether it falls onto the quantiser floor); below :data:`QUIET_EDGE_HZ`, a fall of
    :data:`QUIET_CLIFF_DB` onto the quantiser floor ``floor_db`` counts as a cliff (:func:`measure_band`)."""
    n = len(level)
    tail_max = np.maximum.accumulate(level[::-1])[::-1]  # max of level[i:]
    if n < 2 * k:
        return None, 0.0, False
    # The median of every run of k bins, level[j:j + k], in one call (one bin at a time, this loop
    # held the GIL for most of a file's condition analysis: the daemon's workers queued on it).
    median_from = _quantile(0.5, np.lib.stride_tricks.sliding_window_view(level, k), axis=1)
    for i in range(k, n - k):
        if f[i] >= 0.9 * nyq:
            break
        inside = float(median_from[i - k])
        drop = inside - float(median_from[i])
        on_floor = (floor_db is not None and f[i] < QUIET_EDGE_HZ
                    and tail_max[min(n - 1, i + k)] <= floor_db + FLOOR_MARGIN_DB)
        if on_floor and drop >= QUIET_CLIFF_DB:
            # Onto the floor: the deepest fall within the next k bins is the cliff (a loud band limit
            # falls 30 dB and more there, as before; a quiet one less).
            ahead = np.arange(i, min(n - k, i + k))
            i = int(ahead[np.argmax(median_from[ahead - k] - median_from[ahead])])
            inside = float(median_from[i - k])
            drop = inside - float(median_from[i])
        elif drop < CLIFF_DB:
            continue
        elif tail_max[min(n - 1, i + k)] > inside - CLIFF_DB + BACK_DB:
            continue  # the spectrum comes back: a notch or a roll-off with a floor, not a band limit
        # The edge: the last bin still within 10 dB (a fall onto the floor of under 20 dB: within
        # half the fall) of the band's level just inside it.
        j = i - k + int(np.flatnonzero(level[i - k: i + k] >= inside - min(10.0, drop / 2))[-1])
        return j, drop, on_floor and drop < CLIFF_DB
    return None, 0.0, False


def _lower_cliff(level: np.ndarray, f: np.ndarray, k: int, floor_db: float | None = None) -> tuple[int, float]:
    """A lower band edge with a cliff (>= 150 Hz): (bin, depth in dB); (0, 0.0) when there is none.
    With ``floor_db``, a fall of :data:`QUIET_CLIFF_DB` onto that floor (everything below the edge
    on it) counts too."""
    lo0 = max(1, int(np.searchsorted(f, 50.0)))  # below 50 Hz: DC offset and its leakage, not the band
    # Every candidate edge i (150 to 1000 Hz, 3 k bins above it) at once, the lowest that qualifies
    # taken (one bin at a time, this loop was a fifth of the condition measurement's CPU): inside,
    # the median of level[i:i + k]; below, the maximum of level[lo0:max(lo0 + 1, i - k // 2)].
    first = int(np.searchsorted(f, 150.0))
    stop = min(len(level) - 3 * k, int(np.searchsorted(f, 1000.0, side="right")))
    if first >= stop:
        return 0, 0.0
    inside = _quantile(0.5, np.lib.stride_tricks.sliding_window_view(level[first: stop + k - 1], k), axis=1)
    below = np.maximum.accumulate(level[lo0:])[np.maximum(lo0 + 1, np.arange(first, stop) - k // 2) - 1 - lo0]
    on_floor = below <= floor_db + FLOOR_MARGIN_DB if floor_db is not None else np.zeros(len(below), bool)
    hits = np.flatnonzero(inside - below >= np.where(on_floor, QUIET_CLIFF_DB, LOW_CLIFF_DB))
    if not hits.size:
        return 0, 0.0
    i, below_i = first + int(hits[0]), float(below[hits[0]])
    band = float(_quantile(0.5, level[i: i + 3 * k]))  # the band's own level just above the edge
    j = i + int(np.flatnonzero(level[i: i + 3 * k] >= band - 10.0)[0])
    return j, band - below_i


def _analysis_excerpt(x: np.ndarray, rate: int) -> np.ndarray:
    """At most ANALYSIS_SECONDS of ``x``, as blocks spread evenly over the whole recording."""
    cap = int(ANALYSIS_SECONDS * rate)
    if len(x) <= cap:
        return x
    block = int(_BLOCK_SECONDS * rate)
    n = cap // block
    starts = np.linspace(0, len(x) - block, n).astype(int)
    return np.concatenate([x[s: s + block] for s in starts])


def welch_psd(x: np.ndarray, rate: int, nper: int) -> tuple[np.ndarray, np.ndarray]:
    """Welch's one-sided power spectral density (V^2/Hz) of ``x``: periodic Hann windows of ``nper``
    samples, half overlapping, each segment's mean removed, periodograms averaged (what
    ``scipy.signal.welch(x, rate, nperseg=nper, noverlap=nper // 2)`` computes; tests compare the two).
    Segments are taken a tile at a time (:func:`devrecd.audio.spectra.power_tiles`): a long excerpt
    never needs all of them in memory at once, in float64 or at all."""
    if nper < 2 or len(x) < nper:
        raise ValueError(f"need at least nper >= 2 samples for a spectrum, got nper={nper}, {len(x)} samples")
    step = nper - nper // 2
    segments = np.lib.stride_tricks.sliding_window_view(x, nper)[::step]
    total = np.zeros(nper // 2 + 1)
    for _, power in power_tiles(segments):
        total += power.sum(axis=0)
    psd = total / (len(segments) * rate * float(np.sum(hann(nper) ** 2)))
    psd[1 : (None if nper % 2 else -1)] *= 2.0  # one-sided: every bin but DC (and Nyquist) counts twice
    return np.fft.rfftfreq(nper, 1.0 / rate), psd


def _median_smooth(v: np.ndarray, width: int) -> np.ndarray:
    """Running median of ``width`` (odd) bins, edges repeated (scipy.ndimage's mode 'nearest')."""
    half = width // 2
    padded = np.pad(v, half, mode="edge")
    return _quantile(0.5, np.lib.stride_tricks.sliding_window_view(padded, width), axis=1)


def _quantile(q: float, v: np.ndarray, axis: int | None = None) -> Any:
    """numpy's default ("linear") quantile ``q`` of finite ``v`` along ``axis`` (all of it when
    None), in float64; NaN, infinities and an empty ``v`` are not handled as numpy does.
    Not ``np.median``/``np.percentile``: those import ``numpy.ma`` (~40 ms of a one-shot
    ``identify``'s start) to check for masked arrays."""
    s = np.sort(np.asarray(v, dtype=np.float64), axis=axis)
    axis = -1 if axis is None else axis
    n = s.shape[axis]
    if n == 0:
        raise ValueError("the quantile of no values")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    a, b = np.take(s, lo, axis=axis), np.take(s, min(lo + 1, n - 1), axis=axis)
    return a + (b - a) * (pos - lo)


@dataclass(frozen=True)
class Condition:
    """The condition of one recording, recorded with every verdict."""

    container: str
    codec: str
    decoder: str
    bitrate: int  # average bit rate of the file: size * 8 / duration (bit/s), container overhead included
    native_rate: int
    channels: int
    lossless: bool  # PCM / FLAC / ALAC: the file itself added no coding loss
    band_low_hz: float
    band_high_hz: float
    band_high_drop_db: float
    band_low_drop_db: float
    band_limited: bool  # a sharp edge below the model rate's Nyquist (or a telephone high-pass)
    channel: str  # the channel references must pass through to match this one ("" = none: broadband)
    # Measured on the same samples as the band (devrecd.audio.noise): speech level, noise floor, SNR
    # and the noise spectrum relative to the speech level (what noise matching brings references to).
    speech_dbfs: float
    noise_dbfs: float
    snr_db: float
    noise_bands_db: tuple[float, ...]
    # Seconds of audio the band and the noise were measured on (a long file's excerpt, a live window):
    # a short one is held against references measured in excerpts of this length (noise matching).
    measured_seconds: float = 0.0
    # An edge fell onto the file's own quantiser floor (a quiet 8/16-bit file): it is an edge with a
    # 10 dB drop, not the 30 dB of a loud one (QUIET_CLIFF_DB); says why a shallow drop is a band limit.
    band_on_floor: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["noise_bands_db"] = list(self.noise_bands_db)
        return out

    def noise(self, rate: int) -> NoiseProfile:
        """The recording's noise profile (``rate``: the rate it was measured at, the recording's model rate)."""
        return noise_profile(self.to_json(), rate)


class Decoded(Protocol):
    """What the measurement reads of a decoded recording (a :class:`devrecd.audio.decode.Recording`;
    named here by shape so that this module sits below the decoder that calls it)."""

    samples: np.ndarray
    excerpt: np.ndarray | None
    sample_rate: int
    native_rate: int
    channels: int
    size: int
    codec: str
    container: str
    decoder: str


def measure_condition(rec: Decoded) -> Condition:
    """The condition of a decoded recording (header facts plus the band and the noise measured on its samples)."""
    measured = rec.samples if rec.excerpt is None else rec.excerpt
    band = measure_band(measured, rec.sample_rate, _pcm_floor(rec.codec, rec.native_rate))
    noise = measure_noise(measured, rec.sample_rate).to_json()
    native_seconds = len(rec.samples) / rec.sample_rate
    bitrate = int(round(rec.size * 8 / native_seconds)) if native_seconds > 0 else 0
    lossless = rec.codec in LOSSLESS or (rec.codec.upper().startswith("PCM") and rec.codec not in G711)
    band_limited = band.high_limited or band.low_limited
    channel = _channel_for(rec.codec, bitrate, band)
    return Condition(container=rec.container, codec=rec.codec, decoder=rec.decoder, bitrate=bitrate,
                     native_rate=rec.native_rate, channels=rec.channels, lossless=lossless,
                     band_low_hz=band.low_hz, band_high_hz=band.high_hz, band_high_drop_db=band.high_drop_db,
                     band_low_drop_db=band.low_drop_db, band_limited=band_limited, channel=channel.name if channel else "",
                     speech_dbfs=noise["speech_dbfs"], noise_dbfs=noise["noise_dbfs"], snr_db=noise["snr_db"],
                     noise_bands_db=tuple(noise["noise_bands_db"]), measured_seconds=round(len(measured) / rec.sample_rate, 3),
                     band_on_floor=band.limited_on_floor)


_PCM_BITS = {**dict.fromkeys(PCM16_CODECS, 16), **dict.fromkeys(("PCM_S8", "PCM_U8", "pcm_s8", "pcm_u8"), 8)}


def _pcm_floor(codec: str, native_rate: int) -> float | None:
    """The quantiser floor of an 8- or 16-bit PCM file at its own rate (None for others: 24-bit and
    float files have theirs far below any band, codecs' decoders fill above their band themselves)."""
    bits = _PCM_BITS.get(codec)
    return quantiser_floor_db(bits, native_rate) if bits and native_rate > 0 else None


def noise_profile(condition: Condition | dict[str, Any] | None, rate: int) -> NoiseProfile | None:
    """The noise profile a recording's condition records (``rate``: the rate it was measured at);
    None for a condition measured before noise was (no ``noise_bands_db``)."""
    if condition is None:
        return None
    fields = condition.to_json() if isinstance(condition, Condition) else condition
    if fields.get("noise_bands_db") is None:
        return None
    return NoiseProfile.from_json(fields, rate)


def _channel_for(codec: str, bitrate: int, band: Band) -> Channel | None:
    """The named channel closest to this condition: the file's own codec at the nearest bit rate;
    for any other file (lossless, or a codec with no channel in the table: G.711, GSM 6.10, ADPCM,
    Vorbis...), the measured band limit; none for a broadband one. Until 2026-12-08 only lossless
    files got their measured band: a telephone-band call stored as mu-law, A-law, GSM 6.10 or ADPCM
    WAV (soundfile's ULAW, ALAW, GSM610, IMA_ADPCM, MS_ADPCM, G721_32) was compared as broadband,
    under the clean calibration."""
    known = _CODEC_CHANNELS.get(CODEC_ALIASES.get(codec, codec))
    if known:
        return min(known, key=lambda c: abs(math.log(max(bitrate, 1) / c.bitrate)))
    if band.high_limited or band.low_limited:
        low = band.low_hz if band.low_limited else 0.0
        high = band.high_hz if band.high_limited else 0.95 * band.nyquist_hz
        tel = CHANNELS["tel"]
        if band.low_limited and abs(low - tel.low_hz) < 100 and abs(high - tel.high_hz) < 300:
            return tel
        return band_limit(low, high)
    return None


def condition_channel(cond: Condition | dict[str, Any]) -> Channel | None:
    """The channel a recording of this condition was passed through (None: compare as is), as its
    file stores it (:func:`devrecd.audio.channel.stored_as`: a band limit saved as 16-bit PCM at the
    file's own rate; quiet 16-bit PCM at its speech level, a broadband one as the storage channel)."""
    fields = cond.to_json() if isinstance(cond, Condition) else cond
    name = str(fields.get("channel") or "")
    channel: Channel | None = None
    if name in CHANNELS:
        channel = CHANNELS[name]
    elif name.startswith("band"):
        try:
            low, high = (float(v) for v in name[4:].split("-"))
        except ValueError:
            raise ValueError(f"unknown channel {name!r} in a recording's condition") from None
        channel = band_limit(low, high)
    elif name:
        raise ValueError(f"unknown channel {name!r} in a recording's condition")
    return stored_as(channel, str(fields.get("codec") or ""), int(fields.get("native_rate") or 0),
                     _speech_level(fields.get("speech_dbfs")))


def _speech_level(v: Any) -> float | None:
    """A condition's speech level in dBFS, or None (not measured, or digital silence: nothing to store at)."""
    try:
        level = None if v is None else float(v)
    except (TypeError, ValueError):
        return None
    return level if level is not None and math.isfinite(level) and level > SILENCE_DBFS else None
