"""Audio intake: read-only evidence, hashing, every decoder path, and one test per bad-input class."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import threading

import numpy as np
import pytest
import soundfile as sf

from devrecd.audio import (
    ChangedAudio,
    CorruptAudio,
    EmptyAudio,
    ExternalLink,
    ImplausibleRate,
    LinkLoop,
    MissingAudio,
    NonFiniteAudio,
    NotAFile,
    StreamWindower,
    SilentAudio,
    TooLongAudio,
    TooShortAudio,
    UnsupportedAudio,
    cut_windows,
    open_stream,
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


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.wav").mkdir()
    with pytest.raises(NotAFile, match="directory") as e:
        read_evidence(tmp_path / "d.wav", SR)
    assert e.value.reason == "not_a_file"


def _in_thread_with_timeout(fn, timeout=10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked: a FIFO/device must never be opened in a way that waits"
    return box.get("exc")


def test_fifo_without_a_writer_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)  # no writer: a blocking open() would wait forever
    exc = _in_thread_with_timeout(lambda: read_evidence(fifo, SR))
    assert isinstance(exc, NotAFile) and "FIFO" in exc.detail


def test_socket_device_and_links_to_them_are_refused(tmp_path):
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.wav"))
    try:
        os.symlink("/dev/zero", tmp_path / "zero.wav")
        os.mkfifo(tmp_path / "p")
        os.symlink(tmp_path / "p", tmp_path / "to-fifo.wav")
        for name, kind in (("s.wav", "socket"), ("zero.wav", "character device"), ("to-fifo.wav", "FIFO")):
            exc = _in_thread_with_timeout(lambda: read_evidence(tmp_path / name, SR))
            assert isinstance(exc, NotAFile) and kind in exc.detail, (name, exc)
    finally:
        sock.close()


def test_file_swapped_for_a_fifo_after_the_check_is_refused_by_fstat(tmp_path, monkeypatch, tone):
    """The race of a file replaced after it was looked at: fstat on the open descriptor decides."""
    import devrecd.audio.evidence as evidence

    path = _wav(tmp_path / "v.wav", tone)
    real_stat = os.stat
    swapped = {}

    def stat_then_swap(p, *a, **kw):
        st = real_stat(p, *a, **kw)
        if str(p) == str(path) and not swapped:
            swapped["done"] = True
            os.unlink(path)
            os.mkfifo(path)
        return st

    monkeypatch.setattr(evidence.os, "stat", stat_then_swap)
    exc = _in_thread_with_timeout(lambda: read_evidence(path, SR))
    assert swapped and isinstance(exc, NotAFile) and "FIFO" in exc.detail


def test_symlink_loop_and_external_link(tmp_path, tone):
    os.symlink(tmp_path / "b.wav", tmp_path / "a.wav")
    os.symlink(tmp_path / "a.wav", tmp_path / "b.wav")
    with pytest.raises(LinkLoop):
        read_evidence(tmp_path / "a.wav", SR)
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    target = _wav(outside / "t.wav", tone)
    os.symlink(target, inside / "link.wav")
    with pytest.raises(ExternalLink, match="outside the watched folders"):
        read_evidence(inside / "link.wav", SR, confine=[str(inside)])
    rec = read_evidence(inside / "link.wav", SR)  # unconfined (a file named on the command line): followed
    assert rec.resolved_path == str(target) and rec.describe()["resolved_path"] == str(target)


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



def test_a_real_recording_30_db_quieter_is_judged_and_lsb_noise_is_silent(ccnu_dir, tmp_path):
    """The default audio.silence_dbfs refuses what holds no recording (a 16-bit file of +-1 LSB noise,
    -92 dBFS) and reads the quietest real phone recording made 30 dB quieter and re-quantised to
    16 bit (CCNU's quietest is -42 dBFS RMS: -72 after; the old default of -70 refused it)."""
    levels = {}
    for path in sorted(ccnu_dir.glob("*.wav")):
        x, rate = sf.read(path, dtype="float64")
        levels[path] = (10 * np.log10(np.mean(x**2)), x, rate)
    _, x, rate = min(levels.values(), key=lambda v: v[0])
    quiet = _wav(tmp_path / "quiet.wav", np.round(x * 10 ** (-30 / 20) * 32767) / 32767, rate=rate)
    rec = read_evidence(quiet, rate, AudioConfig())
    level = 10 * np.log10(np.mean(rec.samples.astype(np.float64) ** 2))
    assert level < -70, level
    lsb = _wav(tmp_path / "lsb.wav", np.random.default_rng(0).integers(-1, 2, 3 * SR).astype(np.int16), rate=SR)
    with pytest.raises(SilentAudio, match="audio.silence_dbfs"):
        read_evidence(lsb, SR, AudioConfig())

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


def test_stream_windower_cuts_exactly_the_clips_of_cut_windows():
    rng = np.random.default_rng(0)
    for n in (1, 100, 1023, 1024, 1025, 1500, 5000, 12345):
        for clip, hop in ((1024, 512), (1024, 1024), (1000, 300), (500, 700)):
            x = rng.standard_normal(n).astype(np.float32)
            w = StreamWindower(clip, hop)
            got = np.concatenate([w.feed(x[i : i + 333]) for i in range(0, n, 333)] + [w.finish()])
            np.testing.assert_array_equal(got, cut_windows(x, clip, hop), err_msg=f"{n} {clip} {hop}")
            assert w.starts == window_starts(n, clip, hop).tolist()


def test_streamed_features_equal_the_in_memory_path(tmp_path):
    """The daemon's block-wise path (never holding the samples) gives the features of features_for_file."""
    from devrecd.config import load_config
    from devrecd.stages import features_for_file, stream_features

    cfg = load_config(None, env={})
    rate = 44100  # resampled on the way, in blocks
    t = np.arange(int(7.3 * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(1).standard_normal(len(t))).astype(np.float32)
    path = _wav(tmp_path / "st.wav", np.stack([x, 0.5 * x], 1), rate=rate)
    rec, ref = features_for_file(path, cfg)
    with open_stream(path, cfg.frontend.sample_rate, cfg.audio) as s:
        feats, starts = stream_features(s, cfg)
        assert s.describe() == rec.describe()
    np.testing.assert_array_equal(feats, ref)
    hop = int(cfg.audio.hop_seconds * SR)
    np.testing.assert_allclose(starts, window_starts(len(rec.samples), cfg.frontend.clip_samples, hop) / SR)
    # The device path (features left as a torch tensor for a GPU backend) runs the same stages; on the CPU here.
    spent: dict = {}
    with open_stream(path, cfg.frontend.sample_rate, cfg.audio) as s:
        on_dev, starts2 = stream_features(s, cfg, device="cpu", on_device=True, timings=spent)
    # torch's float32 kernels sum in another order than numpy's, and may change it with the threads they
    # get (a fresh-clone run under load: 164 of 37,376 values off by up to 4.8e-5, all deltas near 0,
    # where cancellation magnifies it): parity within float32 rounding of the log energies, not bits.
    np.testing.assert_allclose(on_dev.numpy(), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(starts2, starts)
    assert {"h2d", "frontend", "features"} <= set(spent)


# --- hostile headers and samples -------------------------------------------------------------

def test_nan_and_inf_samples_are_nonfinite_not_silent_or_judged(tmp_path, tone):
    for bad in (np.nan, np.inf, -np.inf):
        x = tone.copy()
        x[SR : SR + 10] = bad
        path = _wav(tmp_path / f"nf{bad}.wav", x, subtype="FLOAT")
        with pytest.raises(NonFiniteAudio, match="NaN or infinite") as e:
            read_evidence(path, SR)
        assert e.value.reason == "nonfinite"
        assert e.value.sha256 == hashlib.sha256(path.read_bytes()).hexdigest(), "bytes were read: hash recorded"
    all_nan = _wav(tmp_path / "allnan.wav", np.full(3 * SR, np.nan, np.float32), subtype="FLOAT")
    with pytest.raises(NonFiniteAudio):
        read_evidence(all_nan, SR)


def _set_wav_rate(path, rate):
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"fmt "
    channels, bits = struct.unpack("<H", data[22:24])[0], struct.unpack("<H", data[34:36])[0]
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", rate * channels * bits // 8)
    path.write_bytes(bytes(data))
    return path


def test_implausible_sample_rates_are_refused_before_decoding(tmp_path, tone):
    for rate in (1, 3999, 384_001, 2_000_000_000):
        path = _set_wav_rate(_wav(tmp_path / f"r{rate}.wav", tone[:2000]), rate)
        with pytest.raises(ImplausibleRate, match=f"{rate} Hz") as e:
            read_evidence(path, SR)
        assert e.value.reason == "implausible_rate" and e.value.size == path.stat().st_size
    ok = _set_wav_rate(_wav(tmp_path / "r8k.wav", tone), 8000)  # a real phone rate: resampled, judged
    assert read_evidence(ok, SR).native_rate == 8000


def test_a_rate_no_decoder_opens_is_reported_implausible_not_corrupt(tmp_path, tone):
    """4 GHz does not fit the signed rate of either decoder: the header's own field names the reason."""
    for rate in (4_000_000_000, 0xFFFFFFFF):
        data = bytearray(_wav(tmp_path / "x.wav", tone[:2000]).read_bytes())
        data[24:28] = struct.pack("<I", rate)  # the byte rate field is left as it was
        path = tmp_path / f"r{rate}.wav"
        path.write_bytes(bytes(data))
        with pytest.raises(ImplausibleRate, match=f"says {rate} Hz") as e:
            read_evidence(path, SR)
        assert e.value.sha256 == hashlib.sha256(bytes(data)).hexdigest()
    # with a plausible rate, the same kind of damage is still reported as corrupt
    data = bytearray((tmp_path / "x.wav").read_bytes())
    data[22:24] = struct.pack("<H", 0)  # no channels
    (tmp_path / "ch0.wav").write_bytes(bytes(data))
    with pytest.raises(CorruptAudio):
        read_evidence(tmp_path / "ch0.wav", SR)


def test_decoded_samples_are_capped_from_the_header_before_allocating(tmp_path):
    """A small FLAC of many channels (a decompression bomb) is refused by frames x channels, not bytes."""
    path = tmp_path / "bomb.flac"
    sf.write(path, np.zeros((48000 * 20, 8), np.int16), 48000, format="FLAC")
    assert path.stat().st_size < 200_000
    with pytest.raises(TooLongAudio, match="audio.max_decoded_samples"):
        read_evidence(path, SR, AudioConfig(max_decoded_samples=48000 * 20 * 8 - 1))


def test_levels_and_flags_are_reported_on_abnormal_input(tmp_path, tone):
    rec = read_evidence(_wav(tmp_path / "ok.wav", tone), SR)
    assert rec.levels["flags"] == [] and rec.describe()["levels"]["rms_dbfs"] == pytest.approx(-13.5, abs=0.1)
    dc = read_evidence(_wav(tmp_path / "dc.wav", tone * 0.3 + 0.5, subtype="FLOAT"), SR)
    assert "dc_offset" in dc.levels["flags"] and dc.levels["dc_offset"] == pytest.approx(0.5, abs=1e-3)
    noise = np.random.default_rng(0).uniform(-1, 1, 3 * SR).astype(np.float32)
    assert "loud" in read_evidence(_wav(tmp_path / "noise.wav", noise), SR).levels["flags"]
    square = np.sign(tone).astype(np.float32)
    assert "clipping" in read_evidence(_wav(tmp_path / "clip.wav", square), SR).levels["flags"]
    # A float file written at int32 scale (a writer that forgot to normalise): judged, flagged. (1e30 is
    # refused: test_hostile.py, test_absurd_float_samples_are_refused_before_any_computation.)
    huge = read_evidence(_wav(tmp_path / "huge.wav", tone * 2.0**31, subtype="FLOAT"), SR)
    assert "over_full_scale" in huge.levels["flags"] and "loud" in huge.levels["flags"]


def test_levels_are_measured_per_channel_before_the_mix(tmp_path, tone):
    """A clipped channel averaged with a clean one is not clipped in the mix; the verdict still says
    so, with the worst channel's figures and which channel it is. The live meter is the same one."""
    from devrecd.audio.levels import measure

    clipped = np.sign(tone).astype(np.float32)  # full-scale square: every sample at full scale
    quiet = (0.1 * tone).astype(np.float32)
    stereo = np.stack([quiet, clipped], axis=1)
    mix = stereo.mean(axis=1)
    assert np.abs(mix).max() < 0.6, "the mix itself is nowhere near full scale"
    rec = read_evidence(_wav(tmp_path / "one clipped.wav", stereo), SR)
    lv = rec.levels
    assert "clipping" in lv["flags"] and (lv["channel"], lv["channels"]) == (1, 2)
    assert lv["clip_fraction"] > 0.99 and lv["peak"] == pytest.approx(1.0, abs=1e-4)
    # a DC offset on the second channel only, the first one clean
    dc = np.stack([quiet, quiet + 0.4], axis=1)
    lv = read_evidence(_wav(tmp_path / "dc right.wav", dc, subtype="FLOAT"), SR).levels
    assert lv["flags"] == ["dc_offset"] and lv["channel"] == 1 and lv["dc_offset"] == pytest.approx(0.4, abs=1e-3)
    # mono: channel 0 of 1, figures as before
    lv = read_evidence(_wav(tmp_path / "mono.wav", quiet), SR).levels
    assert (lv["channel"], lv["channels"], lv["flags"]) == (0, 1, [])
    # the live input's meter on a two-channel window: the clipped channel makes it "clipped"
    assert measure(mix, silence_dbfs=-70, clip_fraction=0.01).status == "ok"
    win = measure(stereo, silence_dbfs=-70, clip_fraction=0.01)
    assert win.status == "clipped" and win.clip_fraction > 0.99


def test_live_windows_are_metered_per_captured_channel(tone):
    """Two captured channels at 16 kHz (resampled to the model's 32 kHz), the second clipped from
    4 s on: the windows over the clipped part are reported clipped though the mix never is."""
    from devrecd.live import SampleRing, Windower

    cap = 16000
    t = np.arange(8 * cap) / cap
    clean = (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    other = clean.copy()
    other[4 * cap:] = np.sign(other[4 * cap:])  # full scale from 4 s
    frames = np.stack([clean, other], axis=1)
    ring = SampleRing(len(frames) + cap, channels=2)
    ring.mark_gap(cap)
    win = Windower(ring, model_rate=SR, window=SR, hop=SR, silence_dbfs=-60, clip_fraction=0.01)
    windows = []
    for i in range(0, len(frames), 1000):  # blocks as a sound card delivers them
        ring.write(frames[i:i + 1000], now=float(i))
        windows += win.pump()
    assert len(windows) >= 6
    assert np.abs(np.concatenate([w.samples for w in windows])).max() < 0.7, "the mix is never clipped"
    status = {round(w.start): w.level.status for w in windows}
    assert [status[k] for k in (0, 1, 2)] == ["ok"] * 3 and [status[k] for k in (5, 6)] == ["clipped"] * 2, status


def test_failed_reads_carry_the_hash_of_the_bytes_read(tmp_path, tone):
    path = _wav(tmp_path / "short.wav", tone[: SR // 2])
    with pytest.raises(TooShortAudio, match="audio.min_seconds") as e:
        read_evidence(path, SR)
    assert (e.value.sha256, e.value.size) == (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
    silent = _wav(tmp_path / "s.wav", np.zeros(3 * SR, np.float32))
    with pytest.raises(SilentAudio, match="audio.silence_dbfs"):
        read_evidence(silent, SR)


def test_a_file_that_changes_while_read_is_refused(tmp_path, tone):
    path = _wav(tmp_path / "grow.wav", tone)
    s = open_stream(path, SR)
    try:
        with open(path, "ab") as fh:  # appended after hashing, before decoding
            fh.write(b"\0" * 100)
        with pytest.raises(ChangedAudio):
            for _ in s.blocks():
                pass
    finally:
        s.close()


def test_stereo_oddities_dc_only_and_float64_overflow_get_their_own_reasons(tmp_path, tone):
    """Speech on the left and digital silence on the right is flagged dead_channel; L = x, R = -x is
    no "digital silence" (the mean cancels: the louder channel is judged, flagged channels_cancel); a
    constant at full scale carries no signal (silent); a finite float64 sample beyond float32's range
    is named as out of range, not as NaN or infinite."""
    speech = (0.1 * tone).astype(np.float32)  # about -23 dBFS
    zero = np.zeros_like(speech)
    lv = read_evidence(_wav(tmp_path / "left only.wav", np.stack([speech, zero], axis=1)), SR).levels
    assert "dead_channel" in lv["flags"], lv
    both = read_evidence(_wav(tmp_path / "both.wav", np.stack([speech, speech], axis=1)), SR).levels
    assert "dead_channel" not in both["flags"] and "channels_cancel" not in both["flags"]
    rec = read_evidence(_wav(tmp_path / "inverted.wav", np.stack([speech, -speech], axis=1), subtype="FLOAT"), SR)
    assert "channels_cancel" in rec.levels["flags"]
    assert np.allclose(rec.samples, speech, atol=1e-6), "the first (louder or equal) channel, not the cancelled mean"
    with pytest.raises(SilentAudio, match=r"no signal: a constant of \+1\.000 \(DC\)") as e:
        read_evidence(_wav(tmp_path / "dc.wav", np.ones(3 * SR, np.float32), subtype="FLOAT"), SR)
    assert e.value.reason == "silent"
    x = tone.astype(np.float64)
    x[SR: SR + 4] = 1e300  # finite in float64
    with pytest.raises(NonFiniteAudio, match=r"4 out-of-range sample\(s\) .* 64-bit float values beyond") as e:
        read_evidence(_wav(tmp_path / "f64.wav", x, subtype="DOUBLE"), SR)
    assert "NaN" not in str(e.value)
