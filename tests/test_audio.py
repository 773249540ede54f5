"""Audio intake: read-only evidence, hashing, every decoder path, and one test per bad-input class."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat

import numpy as np
import pytest
import soundfile as sf

from devrecd.audio import (
    CorruptAudio,
    EmptyAudio,
    MissingAudio,
    SilentAudio,
    TooLongAudio,
    TooShortAudio,
    UnreadableAudio,
    UnsupportedAudio,
    cut_windows,
    read_evidence,
    window_starts,
)
from devrecd.config import AudioConfig
from tests.media import encode, speech

SR = 32000


def _wav(path, samples, rate=SR, subtype="PCM_16"):
    sf.write(path, samples, rate, subtype=subtype)
    return path


@pytest.fixture()
def tone():
    t = np.arange(3 * SR) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_real_phone_recording_is_hashed_and_left_untouched(ccnu_dir, tmp_path):
    src = sorted(ccnu_dir.glob("*.wav"))[0]
    path = tmp_path / src.name
    shutil.copy2(src, path)
    before = os.stat(path)
    rec = read_evidence(path, SR)
    after = os.stat(path)
    assert rec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec.size == before.st_size
    assert (after.st_mtime_ns, after.st_size, after.st_mode) == (before.st_mtime_ns, before.st_size, before.st_mode)
    assert (rec.native_rate, rec.sample_rate, rec.resampled, rec.decoder) == (32000, 32000, False, "soundfile")
    ref, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(rec.samples, ref, atol=1e-7)


def test_read_only_file_is_readable(tmp_path, tone):
    path = _wav(tmp_path / "ro.wav", tone)
    os.chmod(path, stat.S_IRUSR)
    assert read_evidence(path, SR).duration == pytest.approx(3.0)


def test_other_rates_are_resampled_and_reported(librispeech_dir):
    path = sorted(librispeech_dir.glob("*/*/*.flac"))[0]
    rec = read_evidence(path, SR)
    info = sf.info(path)
    assert (rec.native_rate, rec.resampled, rec.container) == (16000, True, "FLAC")
    assert rec.duration == pytest.approx(info.duration, abs=1e-3)


def test_phone_formats_m4a_amr_3gp(librispeech_dir, tmp_path):
    x, sr = speech(librispeech_dir)
    cases = {
        "clip.m4a": ("aac", "ipod", 44100, "aac"),
        "clip.amr": ("libopencore_amrnb", "amr", 8000, "amrnb"),
        "clip.3gp": ("libopencore_amrnb", "3gp", 8000, "amrnb"),
    }
    for name, (codec, fmt, rate, decoded_codec) in cases.items():
        path = encode(x, sr, tmp_path / name, codec=codec, fmt=fmt, out_rate=rate)
        rec = read_evidence(path, SR)
        assert (rec.decoder, rec.codec, rec.native_rate, rec.resampled) == ("pyav", decoded_codec, rate, True), name
        assert rec.duration == pytest.approx(len(x) / sr, abs=0.1), name
        # the decoded audio is the speech, not noise: its 0.1 s loudness envelope follows the source's
        import soxr

        src = soxr.resample(x, sr, SR)
        n = (min(len(src), len(rec.samples)) // 3200) * 3200
        envelope = [np.abs(a[:n]).reshape(-1, 3200).mean(1) for a in (rec.samples, src)]
        assert np.corrcoef(*envelope)[0, 1] > 0.9, name


def test_stereo_is_mixed_by_the_documented_rule(tmp_path, tone):
    stereo = np.stack([tone, np.zeros_like(tone)], axis=1)
    path = _wav(tmp_path / "st.wav", stereo, subtype="FLOAT")
    mean = read_evidence(path, SR)
    first = read_evidence(path, SR, AudioConfig(mix="first"))
    assert mean.channels == 2
    np.testing.assert_allclose(mean.samples, tone / 2, atol=1e-6)
    np.testing.assert_allclose(first.samples, tone, atol=1e-6)


# --- one test per bad-input class ------------------------------------------------------------

def test_missing(tmp_path):
    with pytest.raises(MissingAudio, match="no such file") as e:
        read_evidence(tmp_path / "gone.wav", SR)
    assert e.value.reason == "missing"


def test_unreadable_directory(tmp_path):
    (tmp_path / "d.wav").mkdir()
    with pytest.raises(UnreadableAudio, match="directory") as e:
        read_evidence(tmp_path / "d.wav", SR)
    assert e.value.reason == "unreadable"


def test_unreadable_fifo(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # keep a writer so opening does not block
    try:
        with pytest.raises(UnreadableAudio, match="not a regular file"):
            read_evidence(fifo, SR)
    finally:
        os.close(fd)


def test_empty_file(tmp_path):
    (tmp_path / "e.wav").write_bytes(b"")
    with pytest.raises(EmptyAudio, match="0 bytes") as e:
        read_evidence(tmp_path / "e.wav", SR)
    assert e.value.reason == "empty"


def test_wav_with_no_samples(tmp_path):
    path = _wav(tmp_path / "n.wav", np.zeros(0, dtype=np.float32))
    with pytest.raises(EmptyAudio, match="no audio samples"):
        read_evidence(path, SR)


def test_truncated_wav(tmp_path, tone):
    path = _wav(tmp_path / "t.wav", tone)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptAudio, match="truncated WAV") as e:
        read_evidence(path, SR)
    assert e.value.reason == "corrupt"


def test_truncated_m4a(librispeech_dir, tmp_path):
    x, sr = speech(librispeech_dir)
    path = encode(x, sr, tmp_path / "c.m4a", codec="aac", fmt="ipod", out_rate=44100)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptAudio):
        read_evidence(path, SR)


def test_corrupt_header(tmp_path, tone):
    path = _wav(tmp_path / "h.wav", tone)
    data = bytearray(path.read_bytes())
    data[12:40] = os.urandom(28)  # smash the fmt chunk
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptAudio, match="looks like WAV"):
        read_evidence(path, SR)


def test_unsupported_format(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file with a .wav name\n" * 200)
    with pytest.raises(UnsupportedAudio, match="not a recognised audio format") as e:
        read_evidence(path, SR)
    assert e.value.reason == "unsupported"


def test_container_without_audio(tmp_path):
    import av

    path = tmp_path / "video.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(UnsupportedAudio, match="no audio stream"):
        read_evidence(path, SR)


def test_silent(tmp_path):
    path = _wav(tmp_path / "s.wav", np.zeros(3 * SR, dtype=np.float32))
    with pytest.raises(SilentAudio, match="digital silence") as e:
        read_evidence(path, SR)
    assert e.value.reason == "silent"
    quiet = _wav(tmp_path / "q.wav", (1e-5 * np.random.default_rng(0).standard_normal(3 * SR)).astype(np.float32), subtype="FLOAT")
    with pytest.raises(SilentAudio, match="dBFS"):
        read_evidence(quiet, SR)


def test_too_short(tmp_path, tone):
    path = _wav(tmp_path / "short.wav", tone[: SR // 2])
    with pytest.raises(TooShortAudio, match="0.50 s") as e:
        read_evidence(path, SR)
    assert e.value.reason == "too_short"


def test_too_long_by_duration_and_by_size(tmp_path, tone):
    path = _wav(tmp_path / "long.wav", tone)
    with pytest.raises(TooLongAudio, match="cap is 2 s") as e:
        read_evidence(path, SR, AudioConfig(max_seconds=2.0, min_seconds=1.0))
    assert e.value.reason == "too_long"
    with pytest.raises(TooLongAudio, match="audio.max_bytes"):
        read_evidence(path, SR, AudioConfig(max_bytes=1000))
    huge = tmp_path / "huge.wav"  # sparse: the cap is enforced from stat, nothing is read
    with open(huge, "wb") as fh:
        fh.truncate(3 * 1024**3)
    with pytest.raises(TooLongAudio, match="bytes"):
        read_evidence(huge, SR)


# --- windows ---------------------------------------------------------------------------------

def test_windows_cover_the_recording():
    assert window_starts(10, 4, 4).tolist() == [0, 4, 6]  # tail of 2 >= hop/2: one more, end-aligned
    assert window_starts(9, 4, 4).tolist() == [0, 4]  # tail of 1 < 2: dropped
    assert window_starts(4, 4, 2).tolist() == [0]
    x = np.arange(10, dtype=np.float32)
    w = cut_windows(x, 4, 4)
    assert w.shape == (3, 4) and w[-1].tolist() == [6, 7, 8, 9]
    short = cut_windows(np.arange(3, dtype=np.float32), 5, 5)
    assert short.tolist() == [[0, 1, 2, 0, 1]]  # wrap-padded
