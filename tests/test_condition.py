"""Conditions and channels on real CCNU recordings passed through each codec the bundled FFmpeg has."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from devrecd.audio import read_evidence
from devrecd.audio.channel import CHANNELS, ChannelError, ChannelUnavailable, get_channel
from devrecd.audio.transmit import apply_channel, available_channels, encode_file, encoder_available
from devrecd.audio.condition import condition_channel, measure_band

RATE = 32000
SUFFIX = {"adts": ".aac", "ogg": ".opus", "amr": ".amr", "mp3": ".mp3"}


@pytest.fixture(scope="module")
def speech(ccnu_dir) -> np.ndarray:
    x, rate = sf.read(ccnu_dir / "Apple_air1_1.wav", dtype="float32")
    assert rate == RATE
    return x[: 5 * RATE]


def test_original_recording_is_broadband(ccnu_dir):
    cond = read_evidence(ccnu_dir / "Honor9 STF-ALOO_1.wav", RATE).condition
    assert cond.lossless and not cond.band_limited and cond.channel == ""
    assert cond.band_high_hz > 12000 and cond.native_rate == RATE and cond.channels == 1
    assert 500_000 < cond.bitrate < 530_000  # 16-bit mono at 32 kHz plus the header


@pytest.mark.parametrize("name", [n for n, c in CHANNELS.items() if c.encoder])
def test_codec_file_condition(name, speech, tmp_path):
    ch = CHANNELS[name]
    if not encoder_available(ch.encoder):
        with pytest.raises(ChannelUnavailable, match=ch.encoder):
            encode_file(speech, RATE, ch)
        return
    path = tmp_path / f"q{SUFFIX[ch.container]}"
    path.write_bytes(encode_file(speech, RATE, ch))
    rec = read_evidence(path, RATE)
    cond = rec.condition
    assert cond.channel == name  # codec and nearest bit rate recognised
    assert cond.native_rate == ch.rate and not cond.lossless
    assert abs(cond.bitrate - ch.bitrate) / ch.bitrate < 0.15
    assert rec.describe()["condition"]["channel"] == name
    if name == "amrnb":
        assert cond.band_limited and 3400 <= cond.band_high_hz <= 4100


def test_transcoded_wav_keeps_its_band_limit(speech, tmp_path):
    """An AMR-NB or telephone-band recording saved as a 32 kHz WAV is still recognised as narrowband."""
    for name in ("amrnb", "tel"):
        y = apply_channel(get_channel(name), speech, RATE)
        path = tmp_path / f"{name}.wav"
        sf.write(path, y, RATE, subtype="PCM_16")
        cond = read_evidence(path, RATE).condition
        assert cond.lossless and cond.band_limited, (name, cond)
        assert 3300 <= cond.band_high_hz <= 4100, (name, cond)
        if name == "tel":
            assert cond.channel == "tel" and 250 <= cond.band_low_hz <= 400
        else:
            assert cond.channel.startswith("band") and cond.band_low_hz == 0.0
            assert condition_channel(cond).high_hz == pytest.approx(cond.band_high_hz, abs=0.5)


@pytest.mark.parametrize("subtype", ["ULAW", "ALAW", "GSM610", "IMA_ADPCM", "MS_ADPCM"])
def test_a_call_in_a_codec_without_a_channel_is_read_as_band_limited_not_broadband(subtype, ccnu_dir, tmp_path):
    """G.711 (mu-law, A-law), GSM 6.10 and ADPCM WAV files at 8 kHz (call recorders, telephony
    systems) are neither lossless nor a codec of the channel table. Only lossless files used to get
    their measured band (and G.711 only when PyAV decoded it, as ``pcm_mulaw``): through soundfile a
    telephone-band call had ``band_limited`` true yet no channel, and was compared with broadband
    references as if it were broadband, under the clean calibration. Real phones' segment 4 through
    the telephone band."""
    for phone in ("IPHONEX", "vivo_Y11t", "ZTE C880A"):
        x, rate = sf.read(ccnu_dir / f"{phone}_4.wav", dtype="float32")
        call = soxr.resample(apply_channel(get_channel("tel"), x, rate), rate, 8000)
        path = tmp_path / f"{phone}-{subtype}.wav"
        sf.write(path, call, 8000, subtype=subtype)
        cond = read_evidence(path, RATE).condition
        assert cond.codec == subtype and not cond.lossless, cond
        assert cond.band_limited and cond.channel, (phone, subtype, cond.channel)
        channel = condition_channel(cond)
        assert channel is not None and 3300 <= channel.high_hz <= 4000, (phone, subtype, cond.channel)


def _band_power_db(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64))) ** 2 / len(x) ** 2
    f = np.fft.rfftfreq(len(x), 1.0 / RATE)
    return float(10.0 * np.log10(spec[(f >= lo) & (f < hi)].sum() + 1e-30))


def test_a_band_limited_file_gives_the_channel_as_it_stores_it(speech, tmp_path):
    """A telephone-band call saved as a 16-bit WAV at 32 kHz: its channel is ``tel`` stored at 32 kHz
    (references then carry the same quantiser noise above the band); at 8 kHz, or as a float file,
    the channel itself. Codecs never carry a storage rate."""
    from devrecd.audio.channel import stored_as

    y = apply_channel(get_channel("tel"), speech, RATE)
    for rate, subtype, stored in ((RATE, "PCM_16", RATE), (8000, "PCM_16", 0), (RATE, "FLOAT", 0)):
        path = tmp_path / f"tel-{rate}-{subtype}.wav"
        import soxr

        sf.write(path, soxr.resample(y, RATE, rate, quality="VHQ") if rate != RATE else y, rate, subtype=subtype)
        ch = condition_channel(read_evidence(path, RATE).condition)
        assert ch.name == "tel" and ch.stored_rate == stored, (rate, subtype, ch)
        assert ch.key == ("tel" if not stored else f"tel@{stored}")
    amr = CHANNELS["amrnb"]
    assert stored_as(amr, "PCM_16", RATE) is amr and stored_as(CHANNELS["tel"], "PCM_24", RATE) is CHANNELS["tel"]


def test_quiet_16_bit_pcm_is_stored_at_its_level(speech, tmp_path):
    """A 16-bit file whose speech lies under QUIET_PCM16_DBFS: a broadband one is the storage
    channel (compared under ``clean``), a band limit carries the level too; louder, a float file
    or a codec: as before. The level is on the STORED_LEVEL_STEP_DB grid and in the cache key."""
    from devrecd.audio.channel import QUIET_PCM16_DBFS, STORED_LEVEL_STEP_DB, stored_as

    quiet = np.round(speech * 10 ** (-30 / 20) * 32768) / 32768
    for x, subtype, level in ((speech, "PCM_16", None), (quiet, "PCM_16", "quiet"), (quiet, "FLOAT", None)):
        path = tmp_path / f"{subtype}-{level}.wav"
        sf.write(path, x, RATE, subtype=subtype)
        cond = read_evidence(path, RATE).condition
        ch = condition_channel(cond)
        if level is None:
            assert ch is None, (subtype, cond.speech_dbfs)
            continue
        assert cond.speech_dbfs < QUIET_PCM16_DBFS
        assert (ch.name, ch.is_storage, ch.rate, ch.stored_rate) == ("clean", True, RATE, RATE)
        assert ch.stored_level_dbfs % STORED_LEVEL_STEP_DB == 0 and abs(ch.stored_level_dbfs - cond.speech_dbfs) <= 1.0
        assert ch.key == f"clean@{RATE}@{ch.stored_level_dbfs:g}dBFS" and "speech brought to" in ch.storage
        # the same file at 48 kHz is another storage: its copies are another key
        import soxr

        path48 = tmp_path / f"{subtype}-{level}-48k.wav"
        sf.write(path48, np.round(soxr.resample(x, RATE, 48000) * 32768) / 32768, 48000, subtype=subtype)
        ch48 = condition_channel(read_evidence(path48, RATE).condition)
        assert ch48.stored_rate == 48000 and ch48.key != ch.key and "48000 Hz" in ch48.storage
    tel = stored_as(CHANNELS["tel"], "PCM_16", RATE, -60.3)
    assert (tel.stored_rate, tel.stored_level_dbfs, tel.key) == (RATE, -60.0, f"tel@{RATE}@-60dBFS")
    assert stored_as(CHANNELS["amrnb"], "PCM_16", RATE, -60.0) is CHANNELS["amrnb"]
    assert stored_as(None, "PCM_16", RATE, QUIET_PCM16_DBFS + 1) is None and stored_as(None, "PCM_16", RATE, None) is None
    # digital silence is not a level to store at
    assert condition_channel({"channel": "", "codec": "PCM_16", "native_rate": RATE, "speech_dbfs": -140.0}) is None


def test_the_storage_channel_brings_a_copy_to_the_level_and_the_16_bit_grid(ccnu_dir):
    """Through the storage channel a recording comes back at the stored speech level (its condition's
    measure), on the 16-bit grid, with the quantiser's floor in the bands it had left empty (ZTE
    C880A: nothing above ~14 kHz)."""
    from dataclasses import replace

    from devrecd.audio.channel import PCM16_STORAGE
    from devrecd.audio.noise import measure_noise

    speech = sf.read(ccnu_dir / "ZTE C880A_1.wav", dtype="float32")[0][: 5 * RATE]
    ch = replace(PCM16_STORAGE, rate=RATE, stored_level_dbfs=-64.0)
    y = apply_channel(ch, speech, RATE)
    assert len(y) == len(speech) and abs(measure_noise(y, RATE).speech_dbfs - (-64.0)) < 0.2  # + the quantiser's power
    grid = y.astype(np.float64) * 32768
    assert np.array_equal(grid, np.round(grid))
    quantiser = 10.0 * np.log10((1 / 32768) ** 2 / 12 * (15800 - 15000) / (RATE / 2))
    assert _band_power_db(speech * 10 ** ((-64.0 - measure_noise(speech, RATE).speech_dbfs) / 20), 15000, 15800) < quantiser - 10
    assert quantiser - 6 < _band_power_db(y, 15000, 15800) < quantiser + 1  # less where speech rounds to silence


def test_a_band_limit_stored_at_a_higher_rate_has_its_quantiser_noise_above_the_band(speech):
    """Through ``tel`` stored at 32 kHz, the bands above 4 kHz hold 16-bit quantiser noise (white
    at -101 dBFS over the whole band, -103 dB in 5-15 kHz, where the signal is above the LSB; less
    where it rounds to digital silence); stored at 8 kHz they hold nothing."""
    from dataclasses import replace

    tel = get_channel("tel")
    plain = apply_channel(tel, speech, RATE)
    stored = apply_channel(replace(tel, stored_rate=RATE), speech, RATE)
    white = 10.0 * np.log10((1 / 32768) ** 2 / 12 * (15000 - 5000) / (RATE / 2))
    assert white - 6 < _band_power_db(stored, 5000, 15000) < white + 1
    assert _band_power_db(plain, 5000, 15000) < white - 30  # -138 dB: the resampler's and float32's floor
    assert abs(_band_power_db(stored, 500, 3000) - _band_power_db(plain, 500, 3000)) < 0.01  # the band itself: the same


def test_channel_keeps_length_and_time_alignment(speech):
    for name in available_channels():
        y = apply_channel(get_channel(name), speech, RATE)
        assert y.shape == speech.shape and y.dtype == np.float32
        # Codec delay is removed: the output correlates best with the input at lag 0.
        seg = slice(RATE, 3 * RATE)
        lags = range(-40, 41)
        c = [float(np.dot(np.roll(y, -lag)[seg], speech[seg])) for lag in lags]
        assert abs(list(lags)[int(np.argmax(c))]) <= 2, name


def test_channel_changes_the_signal_as_the_codec_does(speech):
    y = apply_channel(get_channel("amrnb"), speech, RATE)
    band = measure_band(y, RATE)
    assert band.high_limited and band.high_hz < 4100
    assert measure_band(speech, RATE).high_hz > 12000


def test_channel_errors(speech):
    with pytest.raises(ChannelError, match="unknown channel"):
        get_channel("gsm")
    with pytest.raises(ChannelError, match="mono"):
        apply_channel(get_channel("tel"), np.zeros((10, 2)), RATE)
    with pytest.raises(ChannelError, match="band limit"):
        encode_file(speech, RATE, get_channel("tel"))


# --- the numpy signal processing of the serving path, against scipy (the training extra has it) ---

def test_welch_and_median_smooth_equal_scipy(speech):
    """The condition's long-term spectrum and its smoothing are scipy's welch and median_filter,
    in numpy: equal to 1e-12 relative on real speech, short and odd-length input included."""
    scipy_signal = pytest.importorskip("scipy.signal")
    from scipy.ndimage import median_filter

    from devrecd.audio.condition import _median_smooth, welch_psd

    x = speech.astype(np.float64)
    for n, nper in ((len(x), 2048), (3001, 2048), (700, 256)):
        nper = min(nper, n)
        f, p = welch_psd(x[:n], RATE, nper)
        f_ref, p_ref = scipy_signal.welch(x[:n], RATE, nperseg=nper, noverlap=nper // 2, detrend="constant")
        np.testing.assert_array_equal(f, f_ref)
        np.testing.assert_allclose(p, p_ref, rtol=1e-12, atol=0)
        level = 10 * np.log10(p + 1e-30)
        np.testing.assert_array_equal(_median_smooth(level, 5), median_filter(level, size=5, mode="nearest"))


def test_condition_quantile_is_numpys_without_importing_numpy_ma():
    """The band measurement's own quantile (np.median/np.percentile import numpy.ma, ~40 ms of a
    one-shot identify) equals numpy's default method: odd and even counts, rows and the whole."""
    import subprocess
    import sys

    from devrecd.audio.condition import _quantile

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 6, 101, 1000):
        v = rng.normal(size=n)
        assert _quantile(0.5, v) == pytest.approx(np.median(v), rel=1e-15, abs=1e-15)
        assert _quantile(0.9, v) == pytest.approx(np.percentile(v, 90), rel=1e-15, abs=1e-15)
    m = rng.normal(size=(50, 5))
    np.testing.assert_allclose(_quantile(0.5, m, axis=1), np.median(m, axis=1), rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="no values"):
        _quantile(0.5, np.zeros(0))
    code = ("import sys, numpy as np; from devrecd.audio.condition import measure_band; "
            "measure_band(np.random.default_rng(0).normal(size=32000).astype('float32'), 16000); "
            "print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_band_limit_equals_butterworth_filtfilt(speech):
    """Band-limit channels filter as scipy's butter(8) + sosfiltfilt did: equal away from the
    ends (1e-6 of full scale, well below the 16-bit step the channel then rounds to), within 1e-3 of
    full scale in the first and last 50 ms (the two pad the edges differently)."""
    scipy_signal = pytest.importorskip("scipy.signal")
    from devrecd.audio.transmit import butterworth_zero_phase, resample

    x = resample(speech.astype(np.float64), RATE, 8000)
    nyq = 4000.0
    for low, high in ((300.0, 3400.0), (0.0, 3000.0), (150.0, 0.98 * nyq)):
        sos = (scipy_signal.butter(8, [low / nyq, high / nyq], "bandpass", output="sos") if low
               else scipy_signal.butter(8, high / nyq, "lowpass", output="sos"))
        want = scipy_signal.sosfiltfilt(sos, x)
        got = butterworth_zero_phase(x, 8000, low, high)
        assert got.shape == want.shape
        assert np.abs(got - want)[400:-400].max() < 1e-6
        assert np.abs(got - want).max() < 1e-3


def test_codec_delay_alignment_finds_the_lag():
    from devrecd.audio.transmit import _align

    rng = np.random.default_rng(1)
    ref = rng.standard_normal(20000)
    for lag in (0, 7, 333, 1600):
        late = np.concatenate([0.1 * rng.standard_normal(lag), ref + 0.01 * rng.standard_normal(len(ref))])
        np.testing.assert_array_equal(_align(late, ref, max_lag=1600), late[lag: lag + len(ref)])


def test_welch_psd_of_decoded_float32_in_many_groups_equals_scipy_float64():
    """welch_psd takes the excerpt as decoded (float32) and casts group by group: over several
    groups of segments it is scipy's one-call Welch spectrum of the float64 excerpt."""
    scipy_signal = pytest.importorskip("scipy.signal")
    from devrecd.audio.condition import welch_psd

    x = np.random.default_rng(0).standard_normal(1024 * (3 * 256) + 777).astype(np.float32)
    f, p = welch_psd(x, 32000, 2048)
    f_ref, p_ref = scipy_signal.welch(x.astype(np.float64), 32000, nperseg=2048, noverlap=1024, detrend="constant")
    np.testing.assert_array_equal(f, f_ref)
    np.testing.assert_allclose(p, p_ref, rtol=1e-12, atol=0)


def test_a_quiet_band_limit_falls_onto_the_quantiser_floor_and_is_found(ccnu_dir, tmp_path):
    """A call saved as a 32 kHz 16-bit WAV and 30 dB quieter (an editor, a messaging app) falls from its
    band onto the quantiser's floor, 10-42 dB under the band rather than the 30 dB of the cliff rule:
    the 30 dB rule found 6 of the 15 phones' AMR-NB calls and 9 of their telephone bands. Onto that
    floor, below 5 kHz, a 10 dB fall is a band limit: every one of the 15 is found, with its band,
    and no broadband recording, 0 to 40 dB quieter, is read as band-limited that was not before.
    Saved with TPDF dither (the floor 4.8 dB higher) too, and the record says an edge was on the floor."""
    from devrecd.audio.condition import measure_condition, quantiser_floor_db

    assert quantiser_floor_db(16, RATE) == pytest.approx(-143.1, abs=0.05)

    rng = np.random.default_rng(0)

    def condition(y: np.ndarray, gain: float, dither: bool = False):
        path = tmp_path / "q.wav"
        v = y.astype(np.float64) * 10 ** (gain / 20) * 32768
        if dither:  # TPDF: the floor 4.8 dB higher
            v += rng.uniform(-0.5, 0.5, v.shape) + rng.uniform(-0.5, 0.5, v.shape)
        sf.write(path, np.clip(np.round(v), -32768, 32767).astype(np.int16), RATE, subtype="PCM_16")
        return measure_condition(read_evidence(path, RATE))

    found = {"amrnb": 0, "tel": 0, "tel, both edges": 0, "on floor": 0, "dithered": 0}
    phones = sorted(ccnu_dir.glob("*_4.wav"))
    for f in phones:
        x = sf.read(f, dtype="float32")[0]
        for name in ("amrnb", "tel"):
            c = condition(apply_channel(get_channel(name), x, RATE), -30)
            found[name] += c.band_limited and 3300 < c.band_high_hz < 4000
            found["tel, both edges"] += name == "tel" and c.channel == "tel"
            # The record says why a shallow drop is a band limit: the edge lies on the quantiser floor.
            found["on floor"] += c.band_limited and c.band_on_floor and c.band_high_drop_db < 30
            d = condition(apply_channel(get_channel(name), x, RATE), -30, dither=True)
            found["dithered"] += d.band_limited and 3300 < d.band_high_hz < 4000
        assert not condition(x, -30, dither=True).band_limited, f.stem
        for gain in (0, -20, -40):
            c = condition(x, gain)
            assert not c.band_limited or c.band_high_hz > 7000, (f.stem, gain, c.channel)  # the steep roll-offs known before
            assert not c.band_on_floor, (f.stem, gain)
    assert found["amrnb"] == found["tel"] == len(phones) and found["tel, both edges"] >= len(phones) - 3, found
    assert found["on floor"] >= len(phones), found  # most of the 30 quiet calls: their drops are under 30 dB
    assert found["dithered"] >= 2 * len(phones) - 1, found  # 9 of 30 with a margin of 3 dB
    # A float file has no such floor: the rule is for integer PCM only.
    path = tmp_path / "f.wav"
    sf.write(path, apply_channel(get_channel("tel"), sf.read(phones[0], dtype="float32")[0], RATE) * 10 ** (-30 / 20),
             RATE, subtype="FLOAT")
    floated = measure_condition(read_evidence(path, RATE))
    assert floated.band_high_drop_db >= 30 and not floated.band_on_floor  # far below the band: the cliff rule


def test_lower_cliff_is_the_bin_by_bin_search():
    """The lower band edge, found for every candidate bin at once, is the bin-by-bin search it
    replaced (the lowest 150-1000 Hz bin whose next k bins' median is LOW_CLIFF_DB above every bin
    from 50 Hz to k/2 below it): the same edge and depth, bit for bit, with and without a cliff."""
    from devrecd.audio.condition import LOW_CLIFF_DB, LOW_CLIFF_HZ, _lower_cliff, _quantile

    def one_bin_at_a_time(level, f, k):
        lo0 = max(1, int(np.searchsorted(f, 50.0)))
        for i in range(len(level) - 3 * k):
            if f[i] < 150.0:
                continue
            if f[i] > 1000.0:
                break
            inside = float(_quantile(0.5, level[i: i + k]))
            below = float(level[lo0:max(lo0 + 1, i - k // 2)].max())
            if inside - below >= LOW_CLIFF_DB:
                band = float(_quantile(0.5, level[i: i + 3 * k]))
                return i + int(np.flatnonzero(level[i: i + 3 * k] >= band - 10.0)[0]), band - below
        return 0, 0.0

    rng = np.random.default_rng(0)
    edges = 0
    for rate, nper in ((32000, 2048), (8000, 512), (8000, 64), (2000, 16)):
        f = np.fft.rfftfreq(nper, 1.0 / rate)
        k = max(2, int(round(LOW_CLIFF_HZ / f[1])))
        for _ in range(100):
            level = rng.normal(size=len(f)) * rng.uniform(1, 30)
            level[f < rng.uniform(100, 1200)] -= rng.uniform(0, 80)
            expected = one_bin_at_a_time(level, f, k)
            assert _lower_cliff(level, f, k) == expected
            edges += expected[0] != 0
    assert 50 < edges < 350  # both outcomes covered
