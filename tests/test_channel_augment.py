"""Codec / band-limit augmentation of training recordings through the channel module."""

from __future__ import annotations

import numpy as np
import pytest

from devrecd.audio.transmit import encoder_available
from devrecd.config import Config, TrainConfig, load_config
from devrecd.data import Item
from devrecd.errors import ConfigError
from devrecd.features import SLICE_FBANK
from devrecd.train import check_options, train_options
from devrecd.train_data import Augmenter


def _items(ccnu_dir) -> list[Item]:
    return [Item(path=ccnu_dir / f"{name}_1.wav", device=name, group="1", split="train")
            for name in ("Apple_air1", "Honor9 STF-ALOO")]


def test_amrnb_augmentation_band_limits_the_training_windows(ccnu_dir):
    # Absolute energies (level "none"): the channel's effect on each band, not on the clip's level.
    cfg = Config().with_overrides({"frontend.level": "none"})
    clean = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False).epoch_features(0, 1)
    amr = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False, channels=("amrnb",), channel_p=1.0)
    a1, a2 = amr.epoch_features(0, 1), amr.epoch_features(0, 1)
    for c, a, b in zip(clean, a1, a2):
        assert c.shape == a.shape
        np.testing.assert_array_equal(a, b)  # same seed and epoch, same windows
        # The top mel bands (above 4 kHz, linear energies) lose > 20 dB through AMR-NB; the low ones keep their level.
        top = slice(SLICE_FBANK.stop - 10, SLICE_FBANK.stop)
        assert c[..., top].mean() > 100 * a[..., top].mean()
        low = slice(SLICE_FBANK.start + 2, SLICE_FBANK.start + 8)
        assert 0.5 < c[..., low].mean() / a[..., low].mean() < 2.0


def test_channel_probability_zero_is_clean(ccnu_dir):
    cfg = Config()
    clean = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False).epoch_features(0, 1)
    none = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False, channels=("tel",), channel_p=0.0).epoch_features(0, 1)
    for c, n in zip(clean, none):
        np.testing.assert_array_equal(c, n)


def test_channel_augment_config_is_checked():
    with pytest.raises(ConfigError, match="unknown channel 'gsm'"):
        load_config(None).with_overrides({"train.channel_augment": ["gsm"]})
    with pytest.raises(ConfigError, match=r"channel_augment_p must be in \[0, 1\]"):
        load_config(None).with_overrides({"train.channel_augment_p": 1.5})
    opts = train_options(load_config(None).with_overrides({"train.channel_augment": ["aac64", "tel"]}).train)
    assert opts.channel_augment == ("aac64", "tel")
    if not encoder_available("libvo_amrwbenc"):
        with pytest.raises(ConfigError, match="libvo_amrwbenc"):
            check_options(TrainConfig(channel_augment=("amrwb",)))


def test_noise_augmentation_adds_white_noise_at_the_drawn_snr(ccnu_dir):
    """train.noise_augment_p: each recording (p = 1) gets white noise at an SNR drawn in the range,
    measured as the verdicts measure it; the same seed and epoch give the same windows; p = 0 draws
    nothing (the other augmentations' windows stay as they were)."""
    from devrecd.audio.noise import measure_noise

    cfg = Config()
    aug = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False, noise_p=1.0, noise_snr_db=(19.0, 21.0))
    rng = np.random.default_rng(0)
    for rec in aug.waves:
        snr = measure_noise(aug._noisy(rec.samples, rng), rec.sample_rate).snr_db
        assert 18.0 < snr < 23.0, snr  # white noise reads slightly above its added SNR (section 7 of conditions.md)
    a1, a2 = aug.epoch_features(0, 1), aug.epoch_features(0, 1)
    clean = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False).epoch_features(0, 1)
    for c, a, b in zip(clean, a1, a2):
        np.testing.assert_array_equal(a, b)
        assert c.shape == a.shape and not np.array_equal(c, a)
    off = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False, channels=("tel",), channel_p=0.5, noise_p=0.0)
    ref = Augmenter(_items(ccnu_dir), cfg, 2.0, waveform=False, channels=("tel",), channel_p=0.5)
    for x, y in zip(off.epoch_features(3, 2), ref.epoch_features(3, 2)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ConfigError, match="noise_augment_snr_db"):
        load_config(None).with_overrides({"train.noise_augment_snr_db": [30.0, 5.0]})
    with pytest.raises(ConfigError, match=r"noise_augment_p must be in \[0, 1\]"):
        load_config(None).with_overrides({"train.noise_augment_p": 2.0})


def test_noise_augmentation_with_talkers_draws_babble_half_the_time(ccnu_dir, librispeech_dir):
    """train.noise_augment_babble: with talkers given, a noisy copy carries babble of 4-6 of them
    about half the time and white noise otherwise, both at the drawn SNR. Babble from LibriSpeech
    (16 kHz material) leaves the band above 8 kHz almost empty; white noise fills half its power there."""
    from devrecd.audio.noise import measure_noise
    from devrecd.audio.talkers import read_talkers
    from devrecd.train import _babble_talkers

    cfg = Config()
    rate = cfg.frontend.sample_rate
    talkers = read_talkers(librispeech_dir / "librispeech_train-clean-100", rate, cfg.audio, cfg.watch)
    assert len(talkers) >= 6 and all(t.ndim == 1 and len(t) <= 30 * rate for t in talkers)
    aug = Augmenter(_items(ccnu_dir)[:1], cfg, 2.0, waveform=False, noise_p=1.0, noise_snr_db=(19.0, 21.0),
                    talkers=talkers)
    clean = aug.waves[0].samples
    rng = np.random.default_rng(1)
    kinds, speech_dbfs = [], measure_noise(clean, rate).speech_dbfs
    for _ in range(16):
        added = aug._noisy(clean, rng).astype(np.float64) - clean
        assert 18.9 < speech_dbfs - 10 * np.log10(np.mean(added ** 2)) < 21.1  # add_noise's SNR, in the range
        spectrum = np.abs(np.fft.rfft(added)) ** 2
        above_8k = spectrum[len(spectrum) // 2:].sum() / spectrum.sum()
        assert above_8k < 0.05 or 0.4 < above_8k < 0.6, above_8k
        kinds.append("babble" if above_8k < 0.05 else "white")
    assert 3 <= kinds.count("babble") <= 13, kinds
    # Without talkers the random stream is the white-only one of before (runs made then stay reproducible).
    white = Augmenter(_items(ccnu_dir)[:1], cfg, 2.0, waveform=False, noise_p=1.0, noise_snr_db=(19.0, 21.0))
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    from devrecd.audio.noise import add_noise

    r2.random()  # the p draw
    snr = float(r2.uniform(19.0, 21.0))
    np.testing.assert_array_equal(white._noisy(clean, r1), add_noise(clean, rate, snr, seed=int(r2.integers(2**31))))

    assert _babble_talkers("", cfg) == []
    with pytest.raises(ConfigError, match="not a folder"):
        _babble_talkers(str(ccnu_dir / "nowhere"), cfg)
    with pytest.raises(ConfigError, match="at least 2 talkers"):
        _babble_talkers(str(ccnu_dir), Config().with_overrides({"watch.extensions": [".flac"]}))
    with pytest.raises(ConfigError, match="noise_augment_p is 0"):
        load_config(None).with_overrides({"train.noise_augment_babble": str(librispeech_dir)})
