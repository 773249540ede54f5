"""A simulated recording device: a seeded chain of what shapes a phone's fingerprint, in physical order.

    speech at the mouth
      -> room            (synthetic impulse response + ambient noise: per recording, not per device)
      -> mic and port    (high-pass, resonant peaks, low-pass roll-off)
      -> self-noise, hum (device-coloured noise floor, mains hum with harmonics)
      -> AGC/compressor  (level follower with the device's attack/release, max gain, threshold/ratio)
      -> clipping        (soft tanh or hard, at the device's ceiling)
      -> ADC             (resampled to the device's internal rate by its resampling filter, DC offset)
      -> quantiser       (bit depth, none/rectangular/TPDF dither)
      -> encoder         (AAC, AMR-NB, Opus, MP3 or none, at the device's bit rate; FFmpeg via PyAV)
      -> decoded back to PCM at the corpus rate

A :class:`DeviceChain` holds plain numbers only (it is written to ``devices.json``).
:func:`sample_model` draws a phone model, :func:`sample_unit` a physical unit of that model (a
slightly different copy), and :func:`render` applies a chain to speech with per-recording
variation drawn from the recording's own generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from devrecd.errors import DevrecdError

# Encoders a phone may use: codec -> (PyAV encoder, container, encoder rates, bit rates).
CODECS: dict[str, tuple[str, str, tuple[int, ...], tuple[int, ...]]] = {
    "pcm": ("", "", (), ()),
    "aac": ("aac", "adts", (44100, 48000), (64000, 96000, 128000)),
    "amr_nb": ("libopencore_amrnb", "amr", (8000,), (7950, 10200, 12200)),
    "opus": ("libopus", "ogg", (48000,), (24000, 32000, 48000)),
    "mp3": ("libmp3lame", "mp3", (44100,), (64000, 96000, 128000)),
}
# Relative frequency of each encoder among simulated phones (voice-recorder apps mostly store AAC).
CODEC_WEIGHTS = {"pcm": 0.2, "aac": 0.4, "amr_nb": 0.1, "opus": 0.15, "mp3": 0.15}
ADC_RATES = (16000, 32000, 44100, 48000)
RESAMPLER_QUALITIES = ("LQ", "MQ", "HQ", "VHQ")  # soxr filters: the ADC's decimator differs by phone


class SynthError(DevrecdError):
    """The simulator cannot render a recording (e.g. an encoder is missing from FFmpeg)."""

    reason = "synth"


@dataclass(frozen=True)
class DeviceChain:
    """Every parameter of one simulated device (JSON-serialisable)."""

    name: str
    model: int  # phone model index; units of one model share everything but small tolerances
    unit: int
    # microphone and port
    highpass_hz: float
    highpass_order: int
    resonances: tuple[tuple[float, float, float], ...]  # (centre Hz, gain dB, Q) peaking filters
    lowpass_hz: float
    lowpass_order: int
    shelf_hz: float  # broad tilt of the capsule: a high shelf at this corner ...
    shelf_db: float  # ... with this gain
    # noise floor
    noise_dbfs: float  # self-noise RMS level
    noise_tilt_db_oct: float  # colour: spectral slope of the self-noise
    hum_hz: float  # 50 or 60 Hz mains
    hum_dbfs: float
    hum_harmonics_db: tuple[float, ...]  # level of harmonics 2, 3, ... relative to the fundamental
    # AGC / compressor
    agc_target_dbfs: float
    agc_max_gain_db: float
    agc_attack_ms: float
    agc_release_ms: float
    comp_threshold_dbfs: float
    comp_ratio: float
    # clipping
    clip_kind: str  # "soft" | "hard"
    clip_level: float  # ceiling (linear, <= 1)
    # ADC
    adc_rate: int
    adc_quality: str  # soxr quality of the ADC's resampling filter
    dc_offset: float
    bit_depth: int
    dither: str  # "none" | "rect" | "tpdf"
    # encoder
    codec: str
    bitrate: int
    codec_rate: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceChain:
        data = dict(data)
        data["resonances"] = tuple(tuple(r) for r in data["resonances"])
        data["hum_harmonics_db"] = tuple(data["hum_harmonics_db"])
        return cls(**data)


@dataclass(frozen=True)
class Variation:
    """How much one recording differs from the next on the same device (and in which room)."""

    level_dbfs: float = -31.0  # speech level at the microphone (CCNU recordings: -34 dBFS +- 5 after the phone)
    gain_db: float = 2.0  # +- speech level at the microphone
    noise_db: float = 1.5  # +- self-noise level
    response_jitter: float = 0.01  # relative jitter of filter frequencies
    resonance_gain_db: float = 0.5  # +- gain of each resonance
    rt60: tuple[float, float] = (0.15, 0.6)  # room reverberation time range, seconds
    drr_db: tuple[float, float] = (3.0, 15.0)  # direct-to-reverberant ratio range
    ambient_snr_db: tuple[float, float] = (30.0, 45.0)  # room noise below the speech
    # The playback loudspeaker of a recording session (one for every phone, as in CCNU_Mobile, where
    # one recording is played to all phones): a small speaker's bass roll-off and presence rise.
    playback_highpass_hz: float = 450.0  # 0 = speech reaches the room as recorded (no loudspeaker)
    playback_order: int = 2
    playback_presence_db: float = 6.0  # high shelf at playback_presence_hz
    playback_presence_hz: float = 2500.0
    # The session's long-term spectrum beyond that loudspeaker: (Hz, dB) points of an equaliser
    # applied to the played speech (every phone of the session hears it alike). () = flat.
    session_eq: tuple[tuple[float, float], ...] = (
        (200.0, -5.4), (290.0, -8.4), (390.0, -8.2), (500.0, -6.8), (620.0, -10.5), (760.0, -10.5), (920.0, -3.1),
        (1090.0, 1.5), (1280.0, 4.1), (1480.0, 2.0), (1710.0, 2.3), (1960.0, 2.4), (2240.0, -0.8), (2560.0, -1.9),
        (2890.0, -0.1), (3260.0, 1.0), (3680.0, 6.1), (4130.0, 7.4), (4630.0, 11.5), (5190.0, 9.7), (5820.0, 10.2),
        (6490.0, 4.6), (7240.0, -3.3))
    # Each phone keeps one place in the room for the whole session (as in CCNU_Mobile): its room
    # impulse response is drawn once per device; False = a new room for every recording.
    fixed_place: bool = True


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sample_model(rng: np.random.Generator, model: int, spread: float = 1.0) -> DeviceChain:
    """Draw a phone model. ``spread`` scales how far models lie from a typical phone (continuous parameters)."""

    def around(centre: float, half_width: float, lo: float = -math.inf, hi: float = math.inf) -> float:
        # A large spread widens the ranges, but never past what a real phone can be (lo, hi): the
        # draw is uniform over the part of the widened range inside (lo, hi). (Clipping piled a
        # third of the draws onto the bounds at spread 2.5: resonances at exactly 300 Hz or 15 kHz
        # and +-15 dB, high-passes at 600 Hz, the same surplus of 250-350 Hz energy on many phones.)
        a, b = max(lo, centre - spread * half_width), min(hi, centre + spread * half_width)
        return float(rng.uniform(a, b)) if b > a else float(np.clip(centre, lo, hi))

    codec = str(rng.choice(list(CODEC_WEIGHTS), p=np.array(list(CODEC_WEIGHTS.values()))))
    _, _, rates, bitrates = CODECS[codec]
    codec_rate = int(rng.choice(rates)) if rates else 0
    adc_rate = 8000 if codec == "amr_nb" else int(rng.choice(ADC_RATES))
    n_res = int(rng.integers(2, 6))
    resonances = tuple(sorted(
        (round(math.exp(around(math.log(3000.0), math.log(5.0), math.log(300.0), math.log(15000.0))), 1),
         round(around(2.0, 9.0, -15.0, 15.0), 2), round(_log_uniform(rng, 0.7, 5.0), 2))
        for _ in range(n_res)
    ))
    return DeviceChain(
        name=f"m{model:02d}_u1", model=model, unit=1,
        highpass_hz=round(math.exp(around(math.log(140.0), math.log(2.2), math.log(30.0), math.log(600.0))), 1),
        highpass_order=int(rng.integers(1, 5)),
        resonances=resonances,
        lowpass_hz=round(around(13000.0, 2500.0, 3800.0, 16000.0), 1),
        lowpass_order=int(rng.integers(2, 9)),
        shelf_hz=round(_log_uniform(rng, 800.0, 4000.0), 1),
        shelf_db=round(around(0.0, 6.0, -12.0, 12.0), 2),
        noise_dbfs=round(around(-72.0, 4.0, -90.0, -45.0), 2),
        noise_tilt_db_oct=round(around(-1.5, 2.5, -6.0, 3.0), 2),
        hum_hz=50.0 if rng.random() < 0.8 else 60.0,
        hum_dbfs=round(around(-80.0, 12.0, -110.0, -55.0), 2),
        hum_harmonics_db=tuple(round(float(x), 2) for x in rng.uniform(-30.0, -3.0, size=4)),
        agc_target_dbfs=round(around(-22.0, 5.0, -32.0, -12.0), 2),
        agc_max_gain_db=round(around(14.0, 9.0, 0.0, 30.0), 2),
        agc_attack_ms=round(_log_uniform(rng, 1.0, 30.0), 2),
        agc_release_ms=round(_log_uniform(rng, 50.0, 1000.0), 1),
        comp_threshold_dbfs=round(around(-12.0, 6.0, -24.0, -1.0), 2),
        comp_ratio=round(_log_uniform(rng, 1.5, 8.0), 2),
        clip_kind="soft" if rng.random() < 0.6 else "hard",
        clip_level=round(float(rng.uniform(0.6, 0.99)), 3),
        adc_rate=adc_rate,
        adc_quality=str(rng.choice(RESAMPLER_QUALITIES)),
        dc_offset=round(float(rng.normal(0.0, 0.002)), 5),
        bit_depth=int(rng.choice((14, 16, 16, 24))),
        dither=str(rng.choice(("none", "rect", "tpdf"))),
        codec=codec,
        bitrate=int(rng.choice(bitrates)) if bitrates else 0,
        codec_rate=codec_rate,
    )


def sample_unit(model: DeviceChain, rng: np.random.Generator, unit: int, tolerance: float = 1.0) -> DeviceChain:
    """Another physical unit of ``model``: same design, manufacturing tolerances only. ``tolerance``
    scales them (1: high-pass +-5%, resonance frequencies +-3% and gains +-1 dB, low-pass +-3%,
    shelf +-0.5 dB, noise +-2 dB, hum +-3 dB, AGC target +-1 dB)."""
    t = tolerance
    return replace(
        model,
        name=f"m{model.model:02d}_u{unit}", unit=unit,
        highpass_hz=round(model.highpass_hz * rng.uniform(1 - 0.05 * t, 1 + 0.05 * t), 1),
        resonances=tuple((round(f * rng.uniform(1 - 0.03 * t, 1 + 0.03 * t), 1),
                          round(float(np.clip(g + rng.uniform(-t, t), -15.0, 15.0)), 2), q)
                         for f, g, q in model.resonances),
        lowpass_hz=round(min(16000.0, model.lowpass_hz * rng.uniform(1 - 0.03 * t, 1 + 0.03 * t)), 1),
        shelf_db=round(model.shelf_db + rng.uniform(-0.5 * t, 0.5 * t), 2),
        noise_dbfs=round(model.noise_dbfs + rng.uniform(-2.0 * t, 2.0 * t), 2),
        hum_dbfs=round(model.hum_dbfs + rng.uniform(-3.0 * t, 3.0 * t), 2),
        agc_target_dbfs=round(model.agc_target_dbfs + rng.uniform(-t, t), 2),
        dc_offset=round(float(rng.normal(0.0, 0.002)), 5),
    )


# --- the chain's stages ------------------------------------------------------------------------

def peaking_sos(freq: float, gain_db: float, q: float, rate: int) -> np.ndarray:
    """RBJ-cookbook peaking EQ biquad as one second-order section."""
    a = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * freq / rate
    alpha = math.sin(w0) / (2.0 * q)
    b = np.array([1 + alpha * a, -2 * math.cos(w0), 1 - alpha * a])
    den = np.array([1 + alpha / a, -2 * math.cos(w0), 1 - alpha / a])
    return np.concatenate([b / den[0], den / den[0]])[None]


def high_shelf_sos(freq: float, gain_db: float, rate: int) -> np.ndarray:
    """RBJ-cookbook high shelf (slope 1) as one second-order section."""
    a = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * freq / rate
    cw, alpha = math.cos(w0), math.sin(w0) / math.sqrt(2.0)
    sa = 2.0 * math.sqrt(a) * alpha
    b = np.array([a * ((a + 1) + (a - 1) * cw + sa), -2 * a * ((a - 1) + (a + 1) * cw), a * ((a + 1) + (a - 1) * cw - sa)])
    den = np.array([(a + 1) - (a - 1) * cw + sa, 2 * ((a - 1) - (a + 1) * cw), (a + 1) - (a - 1) * cw - sa])
    return np.concatenate([b / den[0], den / den[0]])[None]


def response_sos(chain: DeviceChain, rate: int) -> np.ndarray:
    """The microphone/port response as second-order sections at ``rate``."""
    from scipy.signal import butter

    nyq = rate / 2.0
    parts = [butter(chain.highpass_order, min(chain.highpass_hz, 0.45 * rate) / nyq, "highpass", output="sos")]
    parts.append(high_shelf_sos(chain.shelf_hz, chain.shelf_db, rate))
    parts += [peaking_sos(f, g, q, rate) for f, g, q in chain.resonances if f < 0.45 * rate]
    if chain.lowpass_hz < 0.95 * nyq:
        parts.append(butter(chain.lowpass_order, chain.lowpass_hz / nyq, "lowpass", output="sos"))
    return np.concatenate(parts)


def room_impulse(rng: np.random.Generator, rate: int, var: Variation) -> np.ndarray:
    """A synthetic room: direct path, a few early reflections, an exponentially decaying diffuse tail."""
    rt60 = rng.uniform(*var.rt60)
    n = int(rt60 * rate)
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # -60 dB at rt60
    # Air and wall absorption: the tail loses highs as it decays (one-pole low-pass, fixed per room).
    from scipy.signal import lfilter

    pole = rng.uniform(0.2, 0.7)
    tail = lfilter([1.0 - pole], [1.0, -pole], tail)
    onset = int(rng.uniform(0.002, 0.008) * rate)  # first reflection after the direct sound
    tail[:onset] = 0.0
    for _ in range(int(rng.integers(3, 8))):  # early reflections
        tail[int(rng.uniform(0.002, 0.03) * rate) % n] += rng.uniform(-0.6, 0.6)
    drr = rng.uniform(*var.drr_db)
    tail *= math.sqrt(10.0 ** (-drr / 10.0) / max(float(np.sum(tail**2)), 1e-12))
    tail[0] = 1.0  # the direct path
    return tail


def coloured_noise(rng: np.random.Generator, n: int, rate: int, tilt_db_oct: float) -> np.ndarray:
    """Unit-RMS Gaussian noise whose spectrum slopes by ``tilt_db_oct`` dB per octave around 1 kHz."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / rate), 20.0)
    spec *= 10.0 ** (tilt_db_oct * np.log2(f / 1000.0) / 20.0)
    x = np.fft.irfft(spec, n)
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


def agc(x: np.ndarray, chain: DeviceChain, rate: int) -> np.ndarray:
    """Level follower (attack/release) on 2 ms blocks, gain towards the target, then compression."""
    block = max(1, int(0.002 * rate))
    nb = len(x) // block
    if nb == 0:
        return x
    env = 10.0 * np.log10(np.mean(x[: nb * block].reshape(nb, block) ** 2, axis=1) + 1e-12)
    a_att = 1.0 - math.exp(-block / (chain.agc_attack_ms * 1e-3 * rate))
    a_rel = 1.0 - math.exp(-block / (chain.agc_release_ms * 1e-3 * rate))
    level = np.empty(nb)
    cur = float(np.max(env[: max(1, nb // 50)]))
    # The recursion is inherently sequential; 5000 blocks for 10 s is cheap in Python.
    for i, e in enumerate(env.tolist()):
        cur += (a_att if e > cur else a_rel) * (e - cur)
        level[i] = cur
    gain = np.clip(chain.agc_target_dbfs - level, -30.0, chain.agc_max_gain_db)
    over = level + gain - chain.comp_threshold_dbfs
    gain -= np.maximum(over, 0.0) * (1.0 - 1.0 / chain.comp_ratio)
    centres = (np.arange(nb) + 0.5) * block
    return x * 10.0 ** (np.interp(np.arange(len(x)), centres, gain) / 20.0)


def clip(x: np.ndarray, kind: str, level: float) -> np.ndarray:
    if kind == "soft":
        return level * np.tanh(x / level)
    return np.clip(x, -level, level)


def quantise(x: np.ndarray, bits: int, dither: str, rng: np.random.Generator) -> np.ndarray:
    """Round to ``bits`` with optional dither (rectangular or triangular, 1 LSB)."""
    scale = 2.0 ** (bits - 1)
    if dither == "rect":
        d = rng.uniform(-0.5, 0.5, len(x))
    elif dither == "tpdf":
        d = rng.uniform(-0.5, 0.5, len(x)) + rng.uniform(-0.5, 0.5, len(x))
    else:
        d = 0.0
    return np.clip(np.round(x * scale + d), -scale, scale - 1) / scale


def encode_decode(x: np.ndarray, rate: int, codec: str, bitrate: int) -> tuple[np.ndarray, int]:
    """Encode mono float samples with a phone codec in memory and decode them back: (samples, rate)."""
    if codec == "pcm":
        return x, rate
    from devrecd.audio.channel import ChannelError
    from devrecd.audio.transmit import codec_round_trip  # the one codec implementation

    encoder, fmt, _, _ = CODECS[codec]
    try:
        return codec_round_trip(x, rate, encoder, fmt, bitrate)
    except ChannelError as exc:
        raise SynthError(f"the {codec} encoder ({encoder}) failed: {exc}", reason="synth_encoder") from None


def _resample(x: np.ndarray, rate_in: int, rate_out: int, quality: str) -> np.ndarray:
    if rate_in == rate_out:
        return x
    import soxr

    return soxr.resample(x, rate_in, rate_out, quality=quality)


def playback_sos(var: Variation, rate: int) -> np.ndarray | None:
    """The session's playback loudspeaker as second-order sections (None: no loudspeaker)."""
    from scipy.signal import butter

    if var.playback_highpass_hz <= 0:
        return None
    return np.concatenate([butter(var.playback_order, var.playback_highpass_hz / (rate / 2.0), "highpass", output="sos"),
                           high_shelf_sos(var.playback_presence_hz, var.playback_presence_db, rate)])


def session_eq_fir(var: Variation, rate: int, taps: int = 1023) -> np.ndarray | None:
    """The session equaliser (:attr:`Variation.session_eq`) as a linear-phase FIR at ``rate`` (None: flat).
    Between the points the gain is interpolated in dB; outside them it holds the end points' gain."""
    from scipy.signal import firwin2

    if not var.session_eq:
        return None
    pts = sorted((float(f), float(g)) for f, g in var.session_eq if 0.0 < f < rate / 2.0)
    if not pts:
        return None
    grid = np.linspace(0.0, rate / 2.0, 513)
    gain_db = np.interp(grid, [f for f, _ in pts], [g for _, g in pts])
    return firwin2(taps, grid, 10.0 ** (gain_db / 20.0), fs=rate)


def render(speech: np.ndarray, rate: int, chain: DeviceChain, rng: np.random.Generator,
           var: Variation = Variation(), out_rate: int | None = None,
           room_rng: np.random.Generator | None = None) -> np.ndarray:
    """Record ``speech`` (float, at ``rate``) on the device: float32 samples at ``out_rate`` (default ``rate``).
    ``room_rng``: where the room impulse response is drawn from (the device's place in a session's
    room, :attr:`Variation.fixed_place`); default ``rng`` (a new room per recording)."""
    from scipy.signal import fftconvolve, sosfilt

    out_rate = out_rate or rate
    n = len(speech)
    x = np.asarray(speech, dtype=np.float64)
    speaker = playback_sos(var, rate)
    if speaker is not None:  # the session's loudspeaker plays the speech
        x = sosfilt(speaker, x)
    eq = session_eq_fir(var, rate)
    if eq is not None:  # linear phase: shifted back by its delay, so clip k stays aligned across phones
        x = fftconvolve(x, eq)[len(eq) // 2: len(eq) // 2 + n]
    level = var.level_dbfs + rng.uniform(-var.gain_db, var.gain_db)
    x = x / max(float(np.sqrt(np.mean(x**2))), 1e-9) * 10.0 ** (level / 20.0)
    # Room: reverberation (the device's place, or the recording's room) and ambient noise.
    x = fftconvolve(x, room_impulse(rng if room_rng is None else room_rng, rate, var))[:n]
    speech_rms = float(np.sqrt(np.mean(x**2)))
    ambient = coloured_noise(rng, n, rate, rng.uniform(-6.0, -2.0))  # rooms are brown-ish
    x = x + ambient * speech_rms * 10.0 ** (-rng.uniform(*var.ambient_snr_db) / 20.0)
    # Microphone and port, with this recording's small response jitter (temperature, grip, angle).
    j = var.response_jitter
    jittered = replace(chain, resonances=tuple(
        (f * (1.0 + rng.uniform(-j, j)), g + rng.uniform(-var.resonance_gain_db, var.resonance_gain_db), q)
        for f, g, q in chain.resonances))
    x = sosfilt(response_sos(jittered, rate), x)
    # Self-noise and hum are electrical: added after the acoustic response.
    noise_level = 10.0 ** ((chain.noise_dbfs + rng.uniform(-var.noise_db, var.noise_db)) / 20.0)
    x = x + noise_level * coloured_noise(rng, n, rate, chain.noise_tilt_db_oct)
    t = np.arange(n) / rate
    hum = np.sin(2 * math.pi * chain.hum_hz * t + rng.uniform(0, 2 * math.pi))
    for k, rel_db in enumerate(chain.hum_harmonics_db, start=2):
        hum += 10.0 ** (rel_db / 20.0) * np.sin(2 * math.pi * k * chain.hum_hz * t + rng.uniform(0, 2 * math.pi))
    x = x + hum * 10.0 ** (chain.hum_dbfs / 20.0) * math.sqrt(2.0)
    x = agc(x, chain, rate)
    x = clip(x, chain.clip_kind, chain.clip_level)
    # ADC: the converter's own rate and decimation filter, then its DC offset and word length.
    x = _resample(x, rate, chain.adc_rate, chain.adc_quality) + chain.dc_offset
    x = quantise(x, chain.bit_depth, chain.dither, rng)
    rate_now = chain.adc_rate
    if chain.codec != "pcm":
        x = _resample(x, rate_now, chain.codec_rate, chain.adc_quality)
        x, rate_now = encode_decode(x, chain.codec_rate, chain.codec, chain.bitrate)
    y = _resample(x, rate_now, out_rate, "VHQ")  # the export step: corpus rate
    want = int(round(n * out_rate / rate))
    y = np.pad(y, (0, max(0, want - len(y))))[:want]
    return np.clip(y, -1.0, 1.0).astype(np.float32)
