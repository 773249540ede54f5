"""Integrity findings at intake: a FLAC whose STREAMINFO MD5 does not match its audio, a FLAC cut short
or claiming more samples than its frames hold, an Ogg cut short and an RF64 whose ds64 chunk claims
more frames than it holds are flagged, and still judged."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soundfile as sf

from devrecd.audio import open_stream, read_evidence
from devrecd.config import load_config
from devrecd.stages import stream_features

SR = 32000


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, env={})


@pytest.fixture(scope="module")
def signal() -> np.ndarray:
    """6 s of a tone in noise (noise keeps a Vorbis stream many pages long)."""
    t = np.arange(6 * SR) / SR
    noise = np.random.default_rng(29).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)


def _judge(path, cfg) -> dict:
    """The file through the intake and the feature stage, as the daemon takes it: its description
    (what flows into the verdict), after checking that features came out."""
    with open_stream(path, cfg.frontend.sample_rate, cfg.audio) as s:
        feats, starts = stream_features(s, cfg)
        assert len(starts) >= 1 and feats.shape[1:] == (128, 73) and np.isfinite(feats).all()
        return s.describe()


def _flac(path, samples, subtype="PCM_16") -> bytearray:
    sf.write(path, samples, SR, format="FLAC", subtype=subtype)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first: its MD5 is bytes 26..41
    return data


def _rf64(samples: np.ndarray, frames_claimed: int | None = None) -> bytes:
    """An RF64 (EBU Tech 3306) built by hand: ds64 (RIFF size, data size, sample count), fmt, data."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    frames = len(samples) if frames_claimed is None else frames_claimed
    fmt = struct.pack("<HHIIHH", 1, 1, SR, SR * 2, 2, 16)
    ds64 = struct.pack("<QQQI", 4 + 8 + 28 + 8 + 16 + 8 + len(pcm), len(pcm), frames, 0)
    body = (b"WAVE" + b"ds64" + struct.pack("<I", len(ds64)) + ds64 + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm)
    return b"RF64" + struct.pack("<I", 0xFFFFFFFF) + body


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_flac_md5_mismatch_is_flagged_and_still_judged(tmp_path, cfg, signal, subtype):
    clean = tmp_path / "clean.flac"
    data = _flac(clean, signal, subtype)
    assert any(data[26:42])  # libsndfile stores the MD5
    bad = tmp_path / "md5.flac"
    data[30] ^= 0x5A  # one byte of the stored MD5
    bad.write_bytes(bytes(data))
    rec = _judge(bad, cfg)
    assert rec["integrity"]["flags"] == ["md5_mismatch"]
    assert data[26:42].hex() in rec["integrity"]["notes"][0]
    assert rec["duration"] == pytest.approx(6.0)
    assert _judge(clean, cfg)["integrity"] == {"flags": [], "notes": []}


def test_flac_md5_of_zeros_is_not_checked(tmp_path, cfg, signal):
    """Encoders that did not compute the MD5 store zeros: nothing to compare, no flag."""
    path = tmp_path / "nomd5.flac"
    data = _flac(path, signal)
    data[26:42] = bytes(16)
    path.write_bytes(bytes(data))
    assert read_evidence(path, SR).describe()["integrity"]["flags"] == []


def _streaminfo_total(data: bytearray, total: int) -> None:
    """Set the STREAMINFO total-samples field (36 bits from byte 21) of a FLAC in place."""
    data[21] = (data[21] & 0xF0) | (total >> 32 & 0xF)
    data[22:26] = (total & 0xFFFFFFFF).to_bytes(4, "big")


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_flac_cut_inside_a_frame_is_flagged_truncated_and_the_audio_present_judged(tmp_path, cfg, signal, subtype):
    """libsndfile stops at a FLAC cut short; the audio before the cut is judged (decoded past that
    point by FFmpeg: the same samples), flagged ``truncated``; the evidence is unchanged."""
    clean = tmp_path / "clean.flac"
    data = _flac(clean, signal, subtype)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(bytes(data[: int(len(data) * 0.6)]))
    before = cut.read_bytes()
    rec = _judge(cut, cfg)
    assert rec["integrity"]["flags"] == ["truncated"], rec["integrity"]
    assert "ends inside a frame" in rec["integrity"]["notes"][0] and "192000 samples" in rec["integrity"]["notes"][0]
    assert 3.0 < rec["duration"] < 3.7  # 60% of the bytes: about 60% of the 6 s
    present = read_evidence(cut, SR).samples
    np.testing.assert_array_equal(present, read_evidence(clean, SR).samples[: len(present)])
    assert cut.read_bytes() == before


def test_flac_whose_streaminfo_claims_more_samples_than_its_frames_is_flagged_and_judged(tmp_path, cfg, signal):
    """Every frame whole, STREAMINFO declaring twice the samples: ``header_length_mismatch`` (the
    bytes cannot tell a cut at a frame boundary from a header claiming more), the 6 s judged."""
    path = tmp_path / "claims.flac"
    data = _flac(path, signal)
    _streaminfo_total(data, 2 * len(signal))
    path.write_bytes(bytes(data))
    rec = _judge(path, cfg)
    assert rec["integrity"]["flags"] == ["header_length_mismatch"], rec["integrity"]
    assert f"declares {2 * len(signal)} samples, its frames hold {len(signal)}" in rec["integrity"]["notes"][0]
    assert rec["duration"] == pytest.approx(6.0)


def test_flac_damaged_within_its_audio_is_still_refused_as_corrupt(tmp_path, cfg, signal):
    """A frame that does not decode before the file's end is not a cut end: refused, not judged with a gap."""
    from devrecd.audio.errors import CorruptAudio

    path = tmp_path / "damaged.flac"
    data = _flac(path, signal)
    mid = len(data) // 3
    data[mid:mid + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptAudio, match="damaged frame within the audio"):
        _judge(path, cfg)


def test_ogg_cut_in_half_is_flagged_truncated_and_still_judged(tmp_path, cfg, signal):
    clean = tmp_path / "clean.ogg"
    sf.write(clean, signal, SR, format="OGG", subtype="VORBIS")
    data = clean.read_bytes()
    cut = tmp_path / "half.ogg"
    cut.write_bytes(data[: len(data) // 2])
    rec = _judge(cut, cfg)
    assert rec["integrity"]["flags"] == ["truncated"]
    assert 1.5 < rec["duration"] < 4.5
    assert _judge(clean, cfg)["integrity"]["flags"] == []


def test_ogg_whose_last_page_lacks_end_of_stream_is_truncated(tmp_path, signal):
    """Cut exactly at a page boundary: every page is whole, but the stream never ends."""
    clean = tmp_path / "clean.ogg"
    sf.write(clean, signal, SR, format="OGG", subtype="VORBIS")
    data = clean.read_bytes()
    starts = [i for i in range(len(data)) if data.startswith(b"OggS\0", i)]
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(data[: starts[len(starts) * 2 // 3]])
    rec = read_evidence(cut, SR).describe()
    assert rec["integrity"]["flags"] == ["truncated"] and "end-of-stream" in rec["integrity"]["notes"][0]


def test_rf64_ds64_claiming_more_frames_is_flagged_and_still_judged(tmp_path, cfg, signal):
    three = signal[: 3 * SR]
    bad = tmp_path / "big.rf64"
    bad.write_bytes(_rf64(three, frames_claimed=2**39))
    rec = _judge(bad, cfg)
    assert rec["container"] == "RF64"
    assert rec["integrity"]["flags"] == ["header_length_mismatch"]
    assert str(2**39) in rec["integrity"]["notes"][0]
    assert rec["duration"] == pytest.approx(3.0)
    clean = tmp_path / "clean.rf64"
    clean.write_bytes(_rf64(three))
    assert _judge(clean, cfg)["integrity"]["flags"] == []


def test_a_clean_wav_carries_no_integrity_flag(tmp_path, cfg, signal):
    path = tmp_path / "clean.wav"
    sf.write(path, signal, SR, subtype="PCM_16")
    assert _judge(path, cfg)["integrity"] == {"flags": [], "notes": []}


def test_the_report_inventory_carries_the_integrity_flags_within_its_schema(tmp_path, cfg, signal):
    """The verdict's integrity flags reach the report's inventory entry and the recording's flags."""
    import json
    from pathlib import Path

    jsonschema = pytest.importorskip("jsonschema")
    from devrecd.report import collect

    bad = tmp_path / "big.rf64"
    bad.write_bytes(_rf64(signal[: 3 * SR], frames_claimed=2**39))
    rec = {**_judge(bad, cfg), "outcome": "judged"}
    entry = collect.inventory_entry(rec, cfg)
    assert entry["integrity"]["status"] == "verified"
    assert entry["integrity"]["flags"] == ["header_length_mismatch"] and entry["integrity"]["notes"]
    schema = json.loads((Path(collect.__file__).parent / "schema.json").read_text())
    item = schema["properties"]["inventory"]["items"]
    jsonschema.validate({**entry, "n": 1}, {**item, "$defs": schema.get("$defs", {})})
