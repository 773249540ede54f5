"""The frontend against an independent implementation (librosa filterbank, scipy DCT, numpy FFT,
python_speech_features deltas) on real speech and real phone recordings."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from devrecd.audio import cut_windows, read_evidence
from devrecd.config import ConfigError
from devrecd.features import (
    FEATURE_DIM,
    SLICE_DELTA,
    SLICE_DELTA2,
    SLICE_FBANK,
    SLICE_LOGE,
    SLICE_MFCC,
    Frontend,
    FrontendConfig,
    extract,
)


def reference_features(clip: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """The 73 dims computed with numpy/scipy/librosa/python_speech_features, float64."""
    import librosa
    from python_speech_features import delta as psf_delta

    x = clip.astype(np.float64)
    y = np.append(x[0], x[1:] - cfg.preemphasis * x[:-1])
    hop, win = cfg.hop_length, cfg.win_length
    left = (win - hop) // 2
    right = (cfg.n_frames - 1) * hop + win - len(y) - left
    y = np.pad(y, (left, max(0, right)), mode="reflect")
    frames = np.stack([y[i * hop : i * hop + win] for i in range(cfg.n_frames)])
    frames = frames * np.hamming(win)
    energy = (frames**2).sum(axis=1)
    power = np.abs(np.fft.rfft(frames, n=cfg.fft_size)) ** 2
    mel = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.fft_size, n_mels=34, fmin=0.0,
                              fmax=cfg.sample_rate / 2, htk=True, norm=None, dtype=np.float64)
    fbank = power @ mel.T
    if cfg.level == "clip":  # every energy relative to the clip's mean frame energy
        level = energy.mean()
        if level > 0:
            energy, fbank = energy / level, fbank / level
    mfcc = scipy.fft.dct(np.log(np.maximum(fbank, cfg.log_floor)), type=2, norm="ortho", axis=1)[:, 1:13]
    base = np.concatenate([mfcc, np.log(np.maximum(energy, cfg.log_floor))[:, None]], axis=1)
    d1 = psf_delta(base, cfg.delta_width)
    d2 = psf_delta(d1, cfg.delta_width)
    return np.concatenate([base, d1, d2, fbank], axis=1)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape == (128, FEATURE_DIM)
    # log-domain dims: absolute tolerance; pre-Fbank spans decades: relative tolerance
    for sl, name in ((SLICE_MFCC, "mfcc"), (SLICE_LOGE, "logE"), (SLICE_DELTA, "delta"), (SLICE_DELTA2, "delta2")):
        np.testing.assert_allclose(ours[:, sl], ref[:, sl], atol=2e-3, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(ours[:, SLICE_FBANK], ref[:, SLICE_FBANK], rtol=2e-4,
                               atol=1e-6 * ref[:, SLICE_FBANK].max(), err_msg="pre-Fbank")


@pytest.mark.parametrize("clip_seconds", [2.0, 10.0])
def test_matches_reference_on_real_speech(librispeech_dir, clip_seconds):
    cfg = FrontendConfig(clip_seconds=clip_seconds)
    path = max(sorted(librispeech_dir.glob("*/*/*.flac"))[:40], key=lambda p: p.stat().st_size)
    rec = read_evidence(path, cfg.sample_rate)  # 16 kHz FLAC -> 32 kHz
    clip = rec.samples[: cfg.clip_samples]
    ours = extract(clip[None], Frontend(cfg))[0]
    _assert_close(ours, reference_features(clip, cfg))


def test_unnormalised_frontend_matches_reference(librispeech_dir):
    """level="none" (what models made before level normalisation computed) is the same reference
    without the division."""
    cfg = FrontendConfig(level="none")
    path = sorted(librispeech_dir.glob("*/*/*.flac"))[3]
    clip = read_evidence(path, cfg.sample_rate).samples[: cfg.clip_samples]
    _assert_close(extract(clip[None], Frontend(cfg))[0], reference_features(clip, cfg))


def test_features_do_not_move_with_recording_level(ccnu_dir):
    """Real phone recordings scaled by -30 to +10 dB: every dim of the normalised features is that of
    the recording as it was (the log-energy ones included; float32 rounding apart), while the
    unnormalised logE moves by the gain (what lost quieter recordings their phone). Re-quantising a
    quiet recording to 16 bit adds white noise at -101 dBFS that fills a phone's empty bands: that
    is noise, matched by condition matching (tests of the open-set verdicts), not a level effect."""
    cfg = FrontendConfig()
    new, old = Frontend(cfg), Frontend(FrontendConfig(level="none"))
    for path in sorted(ccnu_dir.glob("*.wav"))[::9]:
        clips = cut_windows(read_evidence(path, cfg.sample_rate).samples, cfg.clip_samples, cfg.clip_samples)
        base = extract(clips, new)
        for gain in (-30.0, -20.0, 6.0, 10.0):
            moved = extract(clips * np.float32(10 ** (gain / 20)), new)
            for sl in (SLICE_MFCC, SLICE_LOGE, SLICE_DELTA, SLICE_DELTA2):
                np.testing.assert_allclose(moved[..., sl], base[..., sl], atol=2e-3, err_msg=f"{path.name} {gain}")
            np.testing.assert_allclose(moved[..., SLICE_FBANK], base[..., SLICE_FBANK], rtol=1e-3,
                                       atol=1e-6 * base[..., SLICE_FBANK].max(), err_msg=f"{path.name} {gain}")
        quiet = extract(clips * np.float32(0.1), old)[..., SLICE_LOGE]
        assert np.median(extract(clips, old)[..., SLICE_LOGE] - quiet) == pytest.approx(np.log(100.0), abs=0.01)


def test_frontends_recorded_before_level_normalisation_are_served_as_they_were():
    """An artifact's frontend without ``level`` computed absolute energies: from_dict gives
    level="none", and its recorded fingerprint (computed without the key) still matches."""
    legacy = {k: v for k, v in FrontendConfig().to_dict().items() if k != "level"}
    import hashlib
    import json

    old_fingerprint = hashlib.sha256(json.dumps(legacy, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    cfg = FrontendConfig.from_dict(legacy)
    assert cfg.level == "none" and cfg.fingerprint() == old_fingerprint
    assert FrontendConfig().level == "clip" and FrontendConfig().fingerprint() != old_fingerprint
    assert FrontendConfig.from_dict(FrontendConfig().to_dict()) == FrontendConfig()
    with pytest.raises(ConfigError, match="level"):
        FrontendConfig(level="loud")


def test_matches_reference_on_real_phone_recordings(ccnu_dir):
    cfg = FrontendConfig()
    frontend = Frontend(cfg)
    files = sorted(ccnu_dir.glob("*.wav"))[::7]  # a spread of devices
    assert len(files) >= 10
    for path in files:
        rec = read_evidence(path, cfg.sample_rate)
        clips = cut_windows(rec.samples, cfg.clip_samples, cfg.clip_samples)
        ours = extract(clips, frontend)
        assert np.isfinite(ours).all()
        for k in (0, len(clips) - 1):
            _assert_close(ours[k], reference_features(clips[k], cfg))


def test_layout_and_meaning_of_dims(ccnu_dir):
    """Unnormalised, logE tracks loudness and pre-Fbank is linear in power; normalised (the default)
    neither moves with gain; deltas of a constant signal vanish."""
    cfg = FrontendConfig()
    frontend = Frontend(cfg)
    rec = read_evidence(next(ccnu_dir.glob("*_1.wav")), cfg.sample_rate)
    clip = rec.samples[: cfg.clip_samples]
    a, b = extract(np.stack([clip, 0.5 * clip]), Frontend(FrontendConfig(level="none")))
    np.testing.assert_allclose(a[:, SLICE_LOGE] - b[:, SLICE_LOGE], np.log(4.0), atol=1e-3)
    np.testing.assert_allclose(a[:, SLICE_FBANK] / b[:, SLICE_FBANK], 4.0, rtol=1e-3)
    np.testing.assert_allclose(a[:, SLICE_MFCC], b[:, SLICE_MFCC], atol=1e-3)  # gain-invariant (c0 dropped)
    a, b = extract(np.stack([clip, 0.5 * clip]), frontend)
    np.testing.assert_allclose(a[:, SLICE_LOGE], b[:, SLICE_LOGE], atol=1e-4)
    np.testing.assert_allclose(a[:, SLICE_FBANK], b[:, SLICE_FBANK], rtol=1e-4, atol=1e-9)
    assert np.mean(np.exp(a[:, SLICE_LOGE])) == pytest.approx(1.0, rel=1e-3)  # relative to the clip's mean energy
    rng = np.random.default_rng(0)
    tone = np.sin(2 * np.pi * 1000 * np.arange(cfg.clip_samples) / cfg.sample_rate) + 1e-4 * rng.standard_normal(cfg.clip_samples)
    f = extract(tone.astype(np.float32)[None], frontend)[0]
    assert np.abs(f[4:-4, SLICE_DELTA][:, -1]).max() < 0.01  # delta-logE of a stationary tone
    assert np.abs(f[4:-4, SLICE_DELTA2][:, -1]).max() < 0.01
    band = int(np.argmax(f[64, SLICE_FBANK]))
    lo, hi = frontend._mel[:, band].nonzero()[0][[0, -1]] * cfg.sample_rate / cfg.fft_size
    assert lo <= 1000 <= hi  # the 1 kHz tone lands in the band that covers 1 kHz


def test_batched_equals_one_by_one_and_numpy_equals_torch(ccnu_dir):
    """The one implementation on numpy (serving) and on torch (training, GPU): float32-equal features."""
    cfg = FrontendConfig()
    frontend = Frontend(cfg)
    rec = read_evidence(sorted(ccnu_dir.glob("*.wav"))[0], cfg.sample_rate)
    clips = cut_windows(rec.samples, cfg.clip_samples, cfg.clip_samples // 2)
    on_torch = frontend(torch.from_numpy(np.ascontiguousarray(clips)))
    assert isinstance(on_torch, torch.Tensor) and on_torch.dtype == torch.float32
    on_numpy = frontend(clips)
    assert isinstance(on_numpy, np.ndarray) and on_numpy.dtype == np.float32
    single = extract(clips, frontend, chunk=1)
    np.testing.assert_allclose(on_numpy, single, rtol=1e-6, atol=1e-6)
    # log-domain dims to an absolute, pre-Fbank energies to a relative float32 tolerance
    np.testing.assert_allclose(on_torch.numpy()[..., :SLICE_FBANK.start], on_numpy[..., :SLICE_FBANK.start], atol=2e-4)
    np.testing.assert_allclose(on_torch.numpy()[..., SLICE_FBANK], on_numpy[..., SLICE_FBANK], rtol=1e-4,
                               atol=1e-6 * float(on_numpy[..., SLICE_FBANK].max()))


@pytest.mark.parametrize("cfg", [FrontendConfig(), FrontendConfig(clip_seconds=10.0), FrontendConfig(clip_seconds=3.3),
                                 FrontendConfig(fmin=300.0, fmax=3400.0, n_fft=2048)])
def test_numpy_mel_blocks_are_the_mel_product(cfg):
    """The numpy path multiplies the mel matrix block by block, skipping only its zeros: the blocks
    tile the bins, hold every non-zero, and give the dense product to float32 rounding."""
    frontend = Frontend(cfg)
    mel = frontend._mel
    covered = np.zeros_like(mel)
    edges = [b[:2] for b in frontend._numpy.mel_blocks]
    assert edges[0][0] == 0 and edges[-1][1] == mel.shape[0] and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    for b0, b1, c0, c1, block in frontend._numpy.mel_blocks:
        covered[b0:b1, c0:c1] = mel[b0:b1, c0:c1]
        covered[b0:b1, -1] = mel[b0:b1, -1]
        np.testing.assert_array_equal(block, mel[b0:b1, [*range(c0, c1), -1]])
    np.testing.assert_array_equal(covered, mel)
    power = np.random.default_rng(0).exponential(size=(2, cfg.n_frames, mel.shape[0])).astype(np.float32)
    exact = power.astype(np.float64) @ mel.astype(np.float64)
    np.testing.assert_allclose(frontend._numpy.fbank(power), exact, rtol=1e-5)


def test_threads_share_a_frontend(ccnu_dir):
    """The daemon's workers share one Frontend: threads running at once get their own answers."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = FrontendConfig()
    frontend = Frontend(cfg)
    paths = sorted(ccnu_dir.glob("*.wav"))[:4]
    clips = [cut_windows(read_evidence(p, cfg.sample_rate).samples, cfg.clip_samples, cfg.clip_samples)[:6]
             for p in paths]
    expected = [Frontend(cfg)(c) for c in clips]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for a, b in zip(pool.map(frontend, clips), expected):
                np.testing.assert_array_equal(a, b)


def test_rejects_wrong_clip_length():
    frontend = Frontend(FrontendConfig())
    with pytest.raises(ValueError, match="64000 samples"):
        frontend(np.zeros((1, 1000), dtype=np.float32))


def test_config_validation_and_fingerprint():
    cfg = FrontendConfig()
    assert (cfg.clip_samples, cfg.hop_length, cfg.win_length, cfg.fft_size) == (64000, 500, 1000, 1024)
    long = FrontendConfig(clip_seconds=10.0)
    assert (long.hop_length, long.win_length, long.fft_size) == (2500, 5000, 8192)
    assert FrontendConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.fingerprint() == FrontendConfig().fingerprint() != long.fingerprint()
    assert "clip_seconds: 2.0 != 10.0" in cfg.describe_mismatch(long)
    assert cfg.describe_mismatch(FrontendConfig(level="none")) == "level: 'clip' != 'none'"  # one side unrecorded
    for bad in ({"n_frames": 64}, {"preemphasis": 1.5}, {"window": "kaiser"}, {"fmax": 40000.0},
                {"clip_seconds": 0.01}, {"n_fft": 512}):
        with pytest.raises(ConfigError):
            FrontendConfig(**bad)
    with pytest.raises(ConfigError, match="unknown parameter"):
        FrontendConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.gpu
def test_cuda_matches_cpu(ccnu_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = FrontendConfig()
    frontend = Frontend(cfg)
    rec = read_evidence(sorted(ccnu_dir.glob("*.wav"))[0], cfg.sample_rate)
    clips = cut_windows(rec.samples, cfg.clip_samples, cfg.clip_samples)
    cpu = extract(clips, frontend, device="cpu")
    gpu = extract(clips, frontend, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_the_fft_library_gives_numpys_rfft():
    """The numpy path's real FFT (ducc0's when installed) is numpy's rfft to float64 rounding."""
    from devrecd.features_numpy import rfft_into

    frames = np.zeros((2, 3, 8192))
    frames[..., :5000] = np.random.default_rng(0).standard_normal((2, 3, 5000))
    out = np.empty((2, 3, 4097), np.complex128)
    rfft_into(frames[:, :2], out[:, :2])  # strided views, as the workspace's tiles are
    expected = np.fft.rfft(frames[:, :2], axis=-1)
    assert np.abs(out[:, :2] - expected).max() <= 1e-12 * np.abs(expected).max()
