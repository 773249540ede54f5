"""Noise floor, speech level and SNR of a recording, and bringing a clean reference to a noisier one.

Evidence is rarely as clean as the references made on a seized phone: additive noise (a street, a
room full of talkers) fills the spectral valleys that carry the device's own traces, and a quiet
recording re-quantised to 16 bit is, for the same reason, a noisier one (the quantiser's white
noise sits at about -101 dBFS, a fixed level, so 30 dB quieter speech is 30 dB nearer to it).
Forensic practice is to compare like with like: :func:`match_noise` adds to a reference the noise
that the questioned recording has and the reference lacks, so that both are compared at the same
SNR and noise shape (as :mod:`devrecd.openset.matching` does for codecs).

**What is measured** (:func:`measure_noise`, numpy only, deterministic):

* Frames of ``FRAME_SECONDS`` (the next power of two: 1024 samples at 32 kHz), half overlapping,
  periodic Hann window, each frame's mean removed (a DC offset is not noise; the level meter
  reports it). A frame's power is its windowed mean square, read off its one-sided power spectrum
  (Parseval), so frame powers and spectra are one computation. At most ``MAX_FRAMES`` frames are
  analysed, evenly strided over the recording: the cost is bounded whatever its length.
* Frames of digital silence (below ``SILENCE_DBFS``: padding, a gate) are neither speech nor the
  noise under it and are left out; a recording that is all digital silence gets a floor of
  ``SILENCE_DBFS`` and an SNR of 0.
* **Speech level** (``speech_dbfs``): the mean power of the loudest ``LOUD_FRACTION`` of the frames
  (speech and the noise under it; a simple active speech level).
* **Noise floor** (``noise_dbfs``): the mean power of the quietest ``QUIET_FRACTION`` of the frames
  (10%: read speech pauses often; 15% of a CCNU recording already holds quiet speech).
  ``snr_db`` is their difference.
* **Noise spectrum** (``bands_db``): the power spectrum averaged over those quietest frames, in
  ``N_BANDS`` bands equally spaced on the mel scale from 0 Hz to the Nyquist frequency, each as the
  band's power *density* relative to the speech level, expressed as the SNR a white noise of that
  density would have: white noise at 20 dB SNR reads -20 in every band. Relative values make two
  recordings of different levels comparable (the frontend normalises level per clip).

**SNR of added noise** (:func:`add_noise`): ``snr_db`` is the clean signal's speech level as
measured above (mean power of its loudest frames) over the mean power of the added noise. So
:func:`measure_noise` of the result reads close to ``snr_db`` for stationary noise (slightly above:
its loudest frames carry the noise too, +0.4 dB at 10 dB; its quietest frames also carry the
recording's own floor). Babble is not stationary and its quietest frames are quieter than its mean:
its SNR reads higher than it was added at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from devrecd.audio.spectra import hann, power_tiles

FRAME_SECONDS = 0.032  # analysis frame (next power of two in samples)
MAX_FRAMES = 8000  # at most this many frames are analysed (evenly strided): ~128 s of 32 ms frames at half overlap
QUIET_FRACTION = 0.10  # the quietest frames: the noise floor and its spectrum
LOUD_FRACTION = 0.30  # the loudest frames: the speech level
N_BANDS = 32  # mel-spaced bands of the noise spectrum, 0 Hz to Nyquist
SILENCE_DBFS = -140.0  # below: digital silence (no converter writes noise this low; 24-bit LSB noise is -149 dBFS)
QUANTISE_DB = 2.0  # :func:`quantised`: noise spectra this close (per group of bands) are one condition
# :func:`quantised`: groups of N_BANDS // KEY_GROUPS adjacent bands. Every band its own: 8 groups
# at 3 dB gave one key to ten realisations of a white noise, but flattened babble's 8 kHz edge
# within a group, and matched babble at 10 dB SNR lost (EER 6.7% unmatched -> 22.6%; per band: 3.8%).
KEY_GROUPS = N_BANDS
MATCH_MARGIN_DB = 3.0  # :func:`needs_matching`: a questioned recording this much noisier (median over the references) is matched
MAX_NOISE_GAIN = 100.0  # match_noise never adds more than 100 times the speech power (SNR -20 dB)
_SILENCE_POWER = 10.0 ** (SILENCE_DBFS / 10.0)
_BLOCK = 1 << 18  # samples of shaped noise generated at a time


@dataclass(frozen=True)
class NoiseProfile:
    """Speech level, noise floor and the noise spectrum of one recording (see the module docstring)."""

    rate: int  # sample rate the profile was measured at (it defines the bands)
    speech_dbfs: float
    noise_dbfs: float
    bands_db: tuple[float, ...]  # per band: noise density relative to the speech level (white-noise SNR equivalent, dB)

    @property
    def snr_db(self) -> float:
        return self.speech_dbfs - self.noise_dbfs

    def to_json(self) -> dict[str, Any]:
        """The condition's noise fields (rounded, JSON-friendly)."""
        return {"speech_dbfs": round(self.speech_dbfs, 1), "noise_dbfs": round(self.noise_dbfs, 1),
                "snr_db": round(self.snr_db, 1), "noise_bands_db": [round(v, 1) for v in self.bands_db]}

    @classmethod
    def from_json(cls, fields: dict[str, Any], rate: int) -> NoiseProfile:
        """The profile a condition dict records (``rate``: the rate the condition was measured at,
        the model rate of the recording); KeyError/ValueError when the fields are not there."""
        bands = tuple(float(v) for v in fields["noise_bands_db"])
        if len(bands) != N_BANDS:
            raise ValueError(f"a noise spectrum of {len(bands)} bands, expected {N_BANDS}")
        return cls(rate=int(rate), speech_dbfs=float(fields["speech_dbfs"]), noise_dbfs=float(fields["noise_dbfs"]),
                   bands_db=bands)


def frame_length(rate: int) -> int:
    """Analysis frame in samples: the power of two nearest above ``FRAME_SECONDS``."""
    return 1 << max(6, math.ceil(math.log2(FRAME_SECONDS * rate)))


def band_edges(rate: int, nfft: int) -> np.ndarray:
    """``N_BANDS + 1`` rfft-bin edges of the mel-spaced bands (every band at least one bin wide)."""
    mel_top = 2595.0 * math.log10(1.0 + (rate / 2.0) / 700.0)
    hz = 700.0 * (10.0 ** (np.linspace(0.0, mel_top, N_BANDS + 1) / 2595.0) - 1.0)
    n_bins = nfft // 2 + 1
    edges = np.round(hz / (rate / nfft)).astype(int)
    edges[0], edges[-1] = 0, n_bins
    for i in range(1, len(edges)):  # at least one bin per band, in order
        edges[i] = max(edges[i], edges[i - 1] + 1)
    over = edges[-1] - n_bins
    if over > 0:  # only for very short frames: squeeze the top bands back under n_bins
        edges[-1] = n_bins
        for i in range(len(edges) - 2, 0, -1):
            edges[i] = min(edges[i], edges[i + 1] - 1)
    return edges


def _frame_spectra(x: np.ndarray, nfft: int) -> np.ndarray:
    """One-sided power spectra (frames, nfft//2+1) of at most MAX_FRAMES half-overlapping Hann
    frames of ``x``, evenly strided; each row sums to the frame's (windowed) mean square."""
    step = nfft // 2
    if len(x) < nfft:
        x = np.concatenate([x, np.zeros(nfft - len(x), x.dtype)])
    frames = np.lib.stride_tricks.sliding_window_view(x, nfft)[::step]  # a view: nothing copied
    pick = np.linspace(0, len(frames) - 1, min(len(frames), MAX_FRAMES)).astype(int)
    norm = nfft * float(np.sum(hann(nfft) ** 2))
    out = np.empty((len(pick), nfft // 2 + 1))  # MAX_FRAMES x 513 float64 at most: 33 MB
    for lo, power in power_tiles(frames, pick):
        p = out[lo: lo + len(power)]
        np.divide(power, norm, out=p)
        p[:, 1: (None if nfft % 2 else -1)] *= 2.0  # one-sided
    return out


def _db(p: float) -> float:
    return 10.0 * math.log10(max(p, _SILENCE_POWER))


def measure_noise(samples: np.ndarray, rate: int) -> NoiseProfile:
    """Speech level, noise floor, SNR and noise spectrum of mono ``samples`` at ``rate``."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"measure_noise takes mono samples, got shape {x.shape}")
    nfft = frame_length(rate)
    spectra = _frame_spectra(x, nfft)
    power = spectra.sum(axis=1)
    live = np.flatnonzero(power >= _SILENCE_POWER)
    if not len(live):  # all digital silence
        return NoiseProfile(rate=rate, speech_dbfs=SILENCE_DBFS, noise_dbfs=SILENCE_DBFS,
                            bands_db=(0.0,) * N_BANDS)
    order = live[np.argsort(power[live], kind="stable")]
    n_quiet = max(1, int(round(QUIET_FRACTION * len(order))))
    n_loud = max(1, int(round(LOUD_FRACTION * len(order))))
    speech = float(power[order[-n_loud:]].mean())
    quiet = spectra[order[:n_quiet]].mean(axis=0)
    noise = float(quiet.sum())
    edges = band_edges(rate, nfft)
    n_bins = nfft // 2 + 1
    # per band: density (power per bin) x bins / speech level = the SNR of white noise of that density, inverted
    dens = np.add.reduceat(quiet, edges[:-1]) / np.diff(edges) * n_bins / speech
    bands = tuple(float(10.0 * math.log10(max(d, 1e-30))) for d in np.maximum(dens, _SILENCE_POWER / speech))
    return NoiseProfile(rate=rate, speech_dbfs=_db(speech), noise_dbfs=_db(noise), bands_db=bands)


EXCERPT_BELOW_SECONDS = 5.0  # a questioned recording shorter than this: references measured in excerpts of its length
EXCERPT_STEP_SECONDS = 0.5  # excerpt lengths on this grid (cached per length)
MAX_EXCERPTS = 16  # at most this many excerpts measured (evenly spread): bounded cost


def excerpt_seconds(duration: float | None) -> float | None:
    """The excerpt length references are measured in for a questioned recording of ``duration``
    seconds (:func:`measure_noise_as`), or None (whole: it is not short)."""
    if duration is None or not math.isfinite(float(duration)) or float(duration) >= EXCERPT_BELOW_SECONDS:
        return None
    return max(1.0, EXCERPT_STEP_SECONDS * round(float(duration) / EXCERPT_STEP_SECONDS))


def measure_noise_as(samples: np.ndarray, rate: int, seconds: float | None) -> NoiseProfile:
    """The noise profile of a reference measured as a questioned recording of ``seconds`` is
    (None: whole, :func:`measure_noise`): each excerpt of that length (back to back, at most
    :data:`MAX_EXCERPTS` evenly spread; a reference under two excerpts long: its first and last,
    overlapping; not longer than one: whole) measured on its own, digital silence left out, then per
    band, and for the speech level and floor, the median over the excerpts.

    A short recording holds few pauses: its quietest tenth of frames carries quiet speech, so its
    floor reads higher than a whole recording's of the same phone (the first 3 s of CCNU recordings:
    up to 10 dB in the mean over the bands, against 10 s references), and a clean excerpt would be
    brought to a 'noise' that is only this bias, then judged under a noise-matched calibration.
    Measured alike, references carry the same bias and only real noise counts."""
    x = np.asarray(samples)
    n = int(round(float(seconds) * rate)) if seconds else 0
    if n <= 0 or len(x) <= n:
        return measure_noise(x, rate)
    # Back to back from the start; a recording under two excerpts long: its first and its last (overlapping).
    k = len(x) // n
    starts = (np.array([0, len(x) - n]) if k < 2
              else np.unique(np.linspace(0, (k - 1) * n, min(k, MAX_EXCERPTS)).astype(int)))
    parts = [p for p in (measure_noise(x[s:s + n], rate) for s in starts) if p.speech_dbfs > SILENCE_DBFS]
    if not parts:  # every excerpt digital silence
        return measure_noise(x, rate)
    return NoiseProfile(rate=rate, speech_dbfs=float(np.median([p.speech_dbfs for p in parts])),
                        noise_dbfs=float(np.median([p.noise_dbfs for p in parts])),
                        bands_db=tuple(float(v) for v in np.median([p.bands_db for p in parts], axis=0)))


def noise_excess_db(target: NoiseProfile, reference: NoiseProfile) -> float:
    """How much noisier ``target`` is than ``reference``: the mean over the bands of the amount (dB)
    by which its relative noise spectrum lies above the reference's (0 where it lies below).
    A spectral measure on purpose: quantisation noise filling a phone's empty high bands raises
    the broadband SNR little but changes half the spectrum the scorer sees."""
    _same_rate(target, reference)
    t, r = np.asarray(target.bands_db), np.asarray(reference.bands_db)
    return float(np.maximum(t - r, 0.0).mean())


def needs_matching(target: NoiseProfile, references: Sequence[NoiseProfile],
                   margin_db: float = MATCH_MARGIN_DB) -> tuple[bool, float]:
    """Whether references are brought to ``target``'s noise, and the median over ``references`` of
    :func:`noise_excess_db`: matched when that median is above ``margin_db`` (the questioned
    recording is noisier than the references typically are). The one rule for verdicts
    (:func:`devrecd.openset.matching.resolve_noise`) and the noise-matched development calibrations."""
    import statistics

    if not references:
        return False, 0.0
    excess = float(statistics.median(noise_excess_db(target, r) for r in references))
    return excess > margin_db, excess


def quantised(profile: NoiseProfile, step_db: float = QUANTISE_DB) -> NoiseProfile:
    """``profile`` coarsened to a noise *condition*: the bands grouped by ``KEY_GROUPS`` adjacent
    ones (each group's density: the bands' width-weighted mean), rounded to ``step_db``, every band
    of a group at its group's level (with the defaults every band is its own group: the shape is
    kept). The same recording at another gain, or judged again, lands on the same key, so
    :func:`noise_key` finds its matched references again; two realisations of one noise mostly do
    not (a band crosses a step). :func:`match_noise` on the quantised profile is exactly the
    matching for its key."""
    widths = np.diff(band_edges(profile.rate, frame_length(profile.rate))).astype(np.float64)
    dens = 10.0 ** (np.asarray(profile.bands_db) / 10.0)
    size = N_BANDS // KEY_GROUPS
    group = (dens * widths).reshape(KEY_GROUPS, size).sum(axis=1) / widths.reshape(KEY_GROUPS, size).sum(axis=1)
    levels = step_db * np.round(10.0 * np.log10(group) / step_db)
    bands = tuple(float(v) for v in np.repeat(levels, size))
    return NoiseProfile(rate=profile.rate, speech_dbfs=profile.speech_dbfs, noise_dbfs=profile.noise_dbfs, bands_db=bands)


def noise_key(profile: NoiseProfile, step_db: float = QUANTISE_DB) -> str:
    """A short stable key of the quantised noise spectrum (cache key of matched references)."""
    import hashlib

    q = quantised(profile, step_db)
    text = f"{profile.rate}|{step_db}|{KEY_GROUPS}|" + ",".join(f"{v:g}" for v in q.bands_db)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _same_rate(a: NoiseProfile, b: NoiseProfile) -> None:
    if a.rate != b.rate:
        raise ValueError(f"noise profiles measured at {a.rate} Hz and {b.rate} Hz cannot be compared; "
                         "measure both at the model rate")


def _shaped_noise(n: int, density: np.ndarray, nfft: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of Gaussian noise whose one-sided power per analysis bin (``density``, the
    :func:`measure_noise` scale at frame length ``nfft``) is as given; generated in blocks."""
    n_bins = nfft // 2 + 1
    out = np.empty(n, np.float64)
    for lo in range(0, n, _BLOCK):
        m = min(_BLOCK, n - lo)
        size = max(m, nfft)
        freqs = np.fft.rfftfreq(size) * nfft  # this block's bins on the analysis bin scale
        # Mean square per analysis bin -> per unit of normalised frequency: density * n_bins spread over the band.
        psd = np.interp(freqs, np.arange(n_bins), density) * n_bins
        spec = np.fft.rfft(rng.standard_normal(size)) * np.sqrt(psd)
        out[lo: lo + m] = np.fft.irfft(spec, size)[:m]
    return out


def match_noise(samples: np.ndarray, rate: int, target: NoiseProfile, *, seed: int,
                own: NoiseProfile | None = None) -> np.ndarray:
    """``samples`` (a cleaner reference) with Gaussian noise added so that its measured SNR and noise
    shape are ``target``'s: per band, the noise density the target has above the reference's own
    (each relative to its own speech level) is added; where the reference is already as noisy, nothing.
    A reference at least as noisy as the target in every band comes back unchanged (the same array).
    Covers a quiet recording re-quantised to 16 bit: its quantisation noise is white in the target's
    spectrum, so white noise at that relative level is added. Deterministic given ``seed``.
    ``own``: the samples' :func:`measure_noise` when the caller has it (cached), else measured here."""
    x = np.asarray(samples)
    if target.rate != rate:
        raise ValueError(f"the target noise profile was measured at {target.rate} Hz, the samples are at {rate} Hz")
    own = measure_noise(x, rate) if own is None else own
    _same_rate(target, own)
    if own.speech_dbfs <= SILENCE_DBFS:
        return x  # digital silence has no level to be relative to
    t = 10.0 ** (np.asarray(target.bands_db) / 10.0)
    r = 10.0 ** (np.asarray(own.bands_db) / 10.0)
    nfft = frame_length(rate)
    edges = band_edges(rate, nfft)
    width = np.diff(edges) / float(nfft // 2 + 1)  # each band's share of the bins
    # The added noise raises the reference's speech level too (its loudest frames carry it): solve
    # (r_b + a_b) / (1 + A) = t_b with A = sum_b width_b a_b, relative to the reference's speech level.
    gain = 0.0
    for _ in range(20):
        add = np.maximum(t * (1.0 + gain) - r, 0.0)
        new = min(float(np.sum(width * add)), MAX_NOISE_GAIN)
        if abs(new - gain) <= 1e-6 * max(1.0, new):
            break
        gain = new
    add = np.maximum(t * (1.0 + gain) - r, 0.0)
    if not np.any(add > 0):
        return x
    speech = 10.0 ** (own.speech_dbfs / 10.0)
    per_bin = np.repeat(add * speech / (nfft // 2 + 1), np.diff(edges))  # measure_noise's per-bin power
    rng = np.random.default_rng(seed)
    noisy = x.astype(np.float64) + _shaped_noise(len(x), per_bin, nfft, rng)
    return noisy.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


def add_noise(samples: np.ndarray, rate: int, snr_db: float, *, kind: str = "white", seed: int,
              babble: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """``samples`` with ``kind`` noise added at ``snr_db``: the speech level of ``samples`` as
    :func:`measure_noise` measures it, over the added noise's mean power (benchmarks, tests,
    training augmentation).

    ``white``: Gaussian. ``babble``: the sum of the ``babble`` recordings (several talkers at the
    same rate, e.g. LibriSpeech), each at equal level and looped with a random offset to the
    length of ``samples``. Deterministic given ``seed``.
    """
    x = np.asarray(samples)
    n = len(x)
    rng = np.random.default_rng(seed)
    if kind == "white":
        noise = rng.standard_normal(n)
    elif kind == "babble":
        talkers = [np.asarray(b, dtype=np.float64) for b in (babble or []) if len(b)]
        if len(talkers) < 2:
            raise ValueError("babble noise needs at least two talkers' recordings (babble=[...])")
        noise = np.zeros(n)
        for b in talkers:
            b = b - b.mean()
            ms = float(np.mean(b * b))
            if ms <= 0:
                raise ValueError("a babble talker's recording is digital silence")
            idx = (int(rng.integers(len(b))) + np.arange(n)) % len(b)
            noise += b[idx] / math.sqrt(ms)
    else:
        raise ValueError(f"unknown noise kind {kind!r}: white or babble")
    speech = 10.0 ** (measure_noise(x, rate).speech_dbfs / 10.0)
    noise *= math.sqrt(speech * 10.0 ** (-snr_db / 10.0) / max(float(np.mean(noise * noise)), 1e-30))
    out = x.astype(np.float64) + noise
    return out.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


BABBLE_TALKERS = (4, 6)  # babble: this many talkers at once (inclusive range)


def add_drawn_noise(samples: np.ndarray, rate: int, snr_db: float, rng: np.random.Generator, *,
                    talkers: Sequence[np.ndarray] = ()) -> np.ndarray:
    """``samples`` with noise at ``snr_db`` drawn with ``rng``: white noise, or babble of
    :data:`BABBLE_TALKERS` recordings drawn from ``talkers`` when some are given (training copies,
    development trials and training augmentation draw their noise here)."""
    if talkers is not None and len(talkers):
        k = min(len(talkers), int(rng.integers(BABBLE_TALKERS[0], BABBLE_TALKERS[1] + 1)))
        chosen = [talkers[j] for j in rng.choice(len(talkers), size=k, replace=False)]
        return add_noise(samples, rate, snr_db, kind="babble", babble=chosen, seed=int(rng.integers(2**31)))
    return add_noise(samples, rate, snr_db, kind="white", seed=int(rng.integers(2**31)))


__all__ = ["NoiseProfile", "measure_noise", "match_noise", "add_noise", "add_drawn_noise", "BABBLE_TALKERS", "noise_excess_db", "needs_matching", "MATCH_MARGIN_DB", "noise_key", "quantised",
           "band_edges", "frame_length", "N_BANDS"]
