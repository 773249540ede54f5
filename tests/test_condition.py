"""Conditions and channels on real CCNU recordings passed through each codec the bundled FFmpeg has."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from devrecd.audio import read_evidence
from devrecd.audio.channel import (
    CHANNELS,
    ChannelError,
    ChannelUnavailable,
    apply_channel,
    available_channels,
    encode_file,
    encoder_available,
    get_channel,
)
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


def test_band_spectrum_in_pieces_is_welchs_spectrum():
    """The long-term spectrum is computed over pieces of whole segments (bounded memory); averaged
    with their segment counts it is scipy's one-call Welch spectrum of the whole excerpt."""
    from scipy.signal import welch

    from devrecd.audio.condition import _WELCH_PIECE, _welch

    x = np.random.default_rng(0).standard_normal(2048 * (3 * _WELCH_PIECE) + 777).astype(np.float32)
    f, p = welch(x.astype(np.float64), 32000, nperseg=2048, noverlap=1024, detrend="constant")
    f2, p2 = _welch(x, 32000, 2048)
    assert np.array_equal(f, f2) and np.allclose(p2, p, rtol=1e-12, atol=0)
