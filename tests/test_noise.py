"""Noise as a condition, on real CCNU phones: measured SNR, references brought to a noisy questioned
recording's noise, and verdicts that say so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devrecd.audio.noise import (
    N_BANDS,
    NoiseProfile,
    add_noise,
    match_noise,
    measure_noise,
    noise_excess_db,
    noise_key,
)

RATE = 32000
PHONES = ["Apple_air1", "Honor9 STF-ALOO", "IPHONEX", "ZTE C880A", "huawei_nova"]


def _read(ccnu_dir: Path, phone: str, seg: int) -> np.ndarray:
    import soundfile as sf

    x, rate = sf.read(ccnu_dir / f"{phone}_{seg}.wav", dtype="float32")
    assert rate == RATE
    return x


def _talkers(librispeech_dir: Path, n: int = 6) -> list[np.ndarray]:
    import soundfile as sf
    import soxr

    out, seen = [], set()
    for p in sorted(librispeech_dir.rglob("*.flac")):
        if p.name.split("-")[0] not in seen:
            seen.add(p.name.split("-")[0])
            x, r = sf.read(p, dtype="float32")
            out.append(soxr.resample(x, r, RATE))
        if len(out) == n:
            return out
    pytest.skip(f"fewer than {n} LibriSpeech speakers in {librispeech_dir}")


@pytest.mark.parametrize("snr", [10.0, 20.0])
def test_measured_snr_of_added_white_noise(ccnu_dir, snr):
    x = _read(ccnu_dir, "IPHONEX", 4)
    clean = measure_noise(x, RATE)
    assert clean.snr_db > snr + 5  # the phone's own recording is much cleaner than the noise added
    noisy = measure_noise(add_noise(x, RATE, snr, kind="white", seed=1), RATE)
    assert abs(noisy.snr_db - snr) < 1.5, noisy.snr_db
    # white noise reads flat: every band at about -snr relative to the speech level
    assert np.all(np.abs(np.asarray(noisy.bands_db[4:]) + snr) < 3.0), noisy.bands_db
    assert abs(noisy.speech_dbfs - clean.speech_dbfs) < 1.0  # the speech level is the speech's


def test_babble_is_measured_and_needs_talkers(ccnu_dir, librispeech_dir):
    x = _read(ccnu_dir, "huawei_nova", 4)
    talkers = _talkers(librispeech_dir)
    y = add_noise(x, RATE, 10.0, kind="babble", seed=3, babble=talkers)
    assert np.array_equal(y, add_noise(x, RATE, 10.0, kind="babble", seed=3, babble=talkers))  # deterministic
    m = measure_noise(y, RATE)
    # babble's quietest frames are quieter than its mean: read higher than added, but far below clean
    assert 8.0 < m.snr_db < 20.0 and m.snr_db < measure_noise(x, RATE).snr_db - 10
    with pytest.raises(ValueError, match="at least two talkers"):
        add_noise(x, RATE, 10.0, kind="babble", seed=3, babble=talkers[:1])
    with pytest.raises(ValueError, match="unknown noise kind"):
        add_noise(x, RATE, 10.0, kind="pink", seed=3)


def test_digital_silence_is_not_the_noise_floor(ccnu_dir):
    x = _read(ccnu_dir, "IPHONEX", 4)
    ref = measure_noise(x, RATE)
    padded = np.concatenate([np.zeros(5 * RATE, np.float32), x, np.zeros(5 * RATE, np.float32)])
    m = measure_noise(padded, RATE)  # half of it digital zeros: the floor under the speech is unchanged
    assert abs(m.noise_dbfs - ref.noise_dbfs) < 1.0 and abs(m.snr_db - ref.snr_db) < 1.0
    silent = measure_noise(np.zeros(RATE, np.float32), RATE)
    assert all(np.isfinite([silent.speech_dbfs, silent.noise_dbfs, silent.snr_db, *silent.bands_db]))
    assert json.loads(json.dumps(silent.to_json()))["snr_db"] == 0.0


def test_match_noise_brings_a_clean_reference_to_a_noisy_target(ccnu_dir):
    ref = _read(ccnu_dir, "IPHONEX", 1)
    target = measure_noise(add_noise(_read(ccnu_dir, "IPHONEX", 4), RATE, 15.0, kind="white", seed=2), RATE)
    before = measure_noise(ref, RATE)
    assert noise_excess_db(target, before) > 6
    matched = match_noise(ref, RATE, target, seed=7)
    after = measure_noise(matched, RATE)
    assert abs(after.snr_db - target.snr_db) < 1.0, (after.snr_db, target.snr_db)
    assert noise_excess_db(target, after) < 0.5 and noise_excess_db(after, target) < 1.0  # same shape
    assert np.array_equal(matched, match_noise(ref, RATE, target, seed=7))  # deterministic given the seed
    assert not np.array_equal(matched, match_noise(ref, RATE, target, seed=8))
    # a reference already as noisy as the target comes back unchanged
    noisier = add_noise(ref, RATE, 5.0, kind="white", seed=4)
    assert match_noise(noisier, RATE, target, seed=7) is noisier
    with pytest.raises(ValueError, match="Hz"):
        match_noise(ref, 16000, target, seed=7)


def test_match_noise_fills_empty_bands_like_16_bit_requantisation(ccnu_dir):
    """A quiet recording re-quantised to 16 bit has white quantisation noise in the bands the phone
    left empty: the matched reference gets white noise there, at the same relative level."""
    x = _read(ccnu_dir, "ZTE C880A", 4)  # nothing above ~14 kHz: its top bands are 80 dB below its speech
    quiet = (np.round(x * 10 ** (-30 / 20) * 32768) / 32768).astype(np.float32)
    target = measure_noise(quiet, RATE)
    clean = measure_noise(x, RATE)
    top = slice(N_BANDS - 3, N_BANDS)
    lsb = 10 * np.log10(2.0**-30 / 12)  # quantisation noise power of 16 bit, dBFS
    assert np.all(np.asarray(clean.bands_db[top]) < -70)
    # the quantiser's white noise, relative to the quieter speech level
    assert np.all(np.abs(np.asarray(target.bands_db[top]) - (lsb - target.speech_dbfs)) < 3.0), target.bands_db
    ref = _read(ccnu_dir, "ZTE C880A", 1)
    after = measure_noise(match_noise(ref, RATE, target, seed=1), RATE)
    assert np.all(np.abs(np.asarray(after.bands_db[top]) - np.asarray(target.bands_db[top])) < 2.0)


def test_profile_json_and_keys(ccnu_dir):
    x = _read(ccnu_dir, "Apple_air1", 4)
    m = measure_noise(x, RATE)
    back = NoiseProfile.from_json(json.loads(json.dumps(m.to_json())), RATE)
    assert np.allclose(back.bands_db, m.bands_db, atol=0.05) and abs(back.snr_db - m.snr_db) < 0.1
    # the key is the relative noise spectrum: the same recording at another level is the same condition
    assert noise_key(measure_noise(x * 0.25, RATE)) == noise_key(m)
    assert noise_key(measure_noise(add_noise(x, RATE, 10, seed=0), RATE)) != noise_key(m)
    with pytest.raises(ValueError, match="bands"):
        NoiseProfile.from_json({**m.to_json(), "noise_bands_db": [0.0]}, RATE)


def test_condition_records_noise(ccnu_dir, tmp_path):
    import soundfile as sf

    from devrecd.audio import read_evidence

    x = _read(ccnu_dir, "huawei_nova", 5)
    sf.write(tmp_path / "q.wav", add_noise(x, RATE, 12.0, seed=5), RATE, subtype="PCM_16")
    cond = read_evidence(tmp_path / "q.wav", RATE).describe()["condition"]
    assert abs(cond["snr_db"] - 12.0) < 1.5 and cond["speech_dbfs"] > cond["noise_dbfs"]
    assert len(cond["noise_bands_db"]) == N_BANDS and json.loads(json.dumps(cond)) == cond
    assert read_evidence(ccnu_dir / "huawei_nova_5.wav", RATE).describe()["condition"]["snr_db"] > 25


def _registry(ccnu_dir: Path, tmp_path: Path):
    from tests.helpers import shipped_registry

    return shipped_registry(ccnu_dir, tmp_path, PHONES)


def test_verdicts_on_noisy_evidence_are_noise_matched_and_named(ccnu_dir, tmp_path):
    """Judged through the registry judge: a noisy questioned recording's verdict says it was
    noise-matched, with both SNRs; matching names the right phones where unmatched scoring does not."""
    import soundfile as sf

    from devrecd.openset.workflow import RegistryJudge
    from devrecd.stages import features_for_file

    cfg = _registry(ccnu_dir, tmp_path)
    on = RegistryJudge(cfg)
    off = RegistryJudge(cfg.with_overrides({"registry.match_conditions": False}))
    right = {"on": 0, "off": 0}
    margin = {"on": [], "off": []}
    for i, phone in enumerate(PHONES):
        for seg in (4, 5):
            q = tmp_path / f"q-{i}-{seg}.wav"
            sf.write(q, add_noise(_read(ccnu_dir, phone, seg), RATE, 15.0, seed=10 * i + seg), RATE, subtype="PCM_16")
            rec, feats = features_for_file(q, cfg)
            for name, judge in (("on", on), ("off", off)):
                v = judge.judge(feats, rec.describe())
                right[name] += int(v["candidate"] == phone)
                scores = {row["device"]: row["score"] for row in v["top_k"]}
                best_other = max(s for d, s in scores.items() if d != phone) if len(scores) > 1 else -1.0
                margin[name].append(scores.get(phone, -1.0) - best_other)
                c = v["comparison"]
                if name == "on":
                    assert c["noise_matched"] is True and abs(c["questioned_snr_db"] - 15.0) < 1.5
                    lo, hi = c["references_snr_db"]
                    assert 20 < lo <= hi  # the references as enrolled: clean
                    mlo, mhi = c["matched_references_snr_db"]
                    assert abs(mlo - c["questioned_snr_db"]) < 2 and abs(mhi - c["questioned_snr_db"]) < 2
                else:
                    assert c["noise_matched"] is False and "match_conditions" in c["noise_note"]
    assert right["on"] >= 9 and right["on"] > right["off"], right
    assert np.mean(margin["on"]) > np.mean(margin["off"]), margin
    # Clean questioned recordings: one as clean as the references is compared as it is; the noisiest
    # phone of the five (IPHONEX, 28 dB) lies just above the margin, so the others' references are
    # matched to it, but its own are as noisy: it is compared with them as they are, and named.
    from devrecd.openset.matching import NOISE_MARGIN_DB

    for phone, matched in (("huawei_nova", False), ("IPHONEX", True)):
        rec, feats = features_for_file(ccnu_dir / f"{phone}_4.wav", cfg)
        v = on.judge(feats, rec.describe())
        c = v["comparison"]
        assert c["noise_matched"] is False and c["questioned_snr_db"] > 25, c
        assert (c["noise_excess_db"] > NOISE_MARGIN_DB) is matched and v["candidate"] == phone
        assert (phone in c.get("compared_as_is", [])) is matched, c  # (Honor9 STF-ALOO's are as noisy too)
        if matched:
            assert all(t["noise_matched"] is (t["device"] not in c["compared_as_is"]) for t in v["top_k"])
            assert any(t["noise_matched"] for t in v["top_k"])


def test_compare_brings_reference_files_to_the_questioned_noise(ccnu_dir, tmp_path):
    """``devrecd compare``'s path: reference files against a noisy questioned recording of the same
    phone score higher once brought to its noise; the record says so."""
    import soundfile as sf

    from devrecd.config import Config
    from devrecd.forensic.compare import Comparer, compare
    from devrecd.openset.scorers import default_gsv_path, load_gsv

    scorer, _ = load_gsv(default_gsv_path())
    q = tmp_path / "q.wav"
    sf.write(q, add_noise(_read(ccnu_dir, "huawei_nova", 4), RATE, 12.0, seed=3), RATE, subtype="PCM_16")
    refs = [ccnu_dir / f"huawei_nova_{s}.wav" for s in (1, 2)]
    records = {}
    for on in (True, False):
        comparer = Comparer(scorer, Config().with_overrides({"registry.match_conditions": on}))
        records[on] = compare(comparer, [q], comparer.references("huawei_nova", refs), None)[0]
    c = records[True]["comparison"]
    assert c["noise_matched"] is True and abs(c["questioned_snr_db"] - 12.0) < 1.5 and c["references_snr_db"][0] > 25
    assert all(abs(v - c["questioned_snr_db"]) < 2 for v in c["matched_references_snr_db"])
    assert records[False]["comparison"]["noise_matched"] is False
    assert records[True]["score"] > records[False]["score"] + 0.3, (records[True]["score"], records[False]["score"])


def test_matched_references_are_cached_per_noise_key_and_bounded(ccnu_dir, tmp_path):
    from devrecd.config import Config
    from devrecd.openset.matching import ConditionMatcher, ReferenceStore

    cfg = Config()
    store = ReferenceStore(tmp_path / "refs")
    sha = store.put(ccnu_dir / "IPHONEX_1.wav")
    matcher = ConditionMatcher(store, cfg.frontend, cfg.audio, noise_cache=2)
    x = _read(ccnu_dir, "IPHONEX", 4)
    targets = [measure_noise(add_noise(x, RATE, snr, seed=0), RATE) for snr in (8.0, 14.0, 20.0)]
    first = matcher.noise_matched(sha, None, targets[0])
    # the same questioned recording at another gain (or judged again) is the same condition: work reused
    again = measure_noise(add_noise(x, RATE, 8.0, seed=0) * 0.3, RATE)
    assert noise_key(again) == noise_key(targets[0]) and matcher.noise_matched(sha, None, again) is first
    assert abs(first[1] - targets[0].snr_db) < 1.5  # the matched reference's measured SNR
    matcher.noise_matched(sha, None, targets[1])
    matcher.noise_matched(sha, None, targets[2])  # three conditions, room for two: the oldest is dropped
    recomputed = matcher.noise_matched(sha, None, targets[0])
    assert recomputed is not first and np.array_equal(recomputed[0], first[0])  # and comes back the same (seeded)
    # the reference's own noise profile is measured once and kept on disk
    assert list((store.root / "conditions" / "clean").glob(f"{sha}.noise-*.json"))


def test_references_measured_as_a_short_recording(ccnu_dir, monkeypatch):
    """excerpt_seconds: the length on a 0.5 s grid, at least 1 s, None from EXCERPT_BELOW_SECONDS on.
    measure_noise_as: whole when not short or not longer than one excerpt; otherwise the median over
    excerpts (each measured on its own), at most MAX_EXCERPTS of them."""
    from devrecd.audio import noise as N

    assert [N.excerpt_seconds(d) for d in (None, 0.3, 1.9, 2.74, 4.99, 5.0, 30.0)] == [None, 1.0, 2.0, 2.5, 5.0, None, None]
    x = _read(ccnu_dir, "Apple_air1", 1)
    assert N.measure_noise_as(x, RATE, None) == measure_noise(x, RATE)
    assert N.measure_noise_as(x[: 3 * RATE], RATE, 3.0) == measure_noise(x[: 3 * RATE], RATE)  # one excerpt: whole
    y = x[: 5 * RATE]  # under two excerpts: the first and the last 3 s (overlapping)
    ends = [measure_noise(y[: 3 * RATE], RATE), measure_noise(y[-3 * RATE:], RATE)]
    assert np.allclose(N.measure_noise_as(y, RATE, 3.0).bands_db, np.median([p.bands_db for p in ends], axis=0))
    n = 3 * RATE
    parts = [measure_noise(x[s:s + n], RATE) for s in range(0, (len(x) // n) * n, n)]
    got = N.measure_noise_as(x, RATE, 3.0)
    assert got.speech_dbfs == pytest.approx(float(np.median([p.speech_dbfs for p in parts])))
    assert np.allclose(got.bands_db, np.median([p.bands_db for p in parts], axis=0))
    long = np.tile(x, 8)  # 80 s: 26 excerpts of 3 s, MAX_EXCERPTS measured
    calls = []
    real = N.measure_noise
    monkeypatch.setattr(N, "measure_noise", lambda y, rate: calls.append(len(y)) or real(y, rate))
    N.measure_noise_as(long, RATE, 3.0)
    assert len(calls) == N.MAX_EXCERPTS and set(calls) == {n}


def test_frame_spectra_are_float64_periodograms_of_the_strided_frames(monkeypatch):
    """The noise's frame spectra (computed a tile at a time, float32 frames cast on the way) are the
    float64 one-sided periodograms of the evenly strided frames, mean removed, Hann windowed, to
    1e-12: more frames than MAX_FRAMES (strided), several tiles, and a recording shorter than a frame."""
    from devrecd.audio import noise

    def reference(x, nfft, max_frames):
        x = np.concatenate([x, np.zeros(max(0, nfft - len(x)), x.dtype)]).astype(np.float64)
        starts = np.arange(0, len(x) - nfft + 1, nfft // 2)
        starts = starts[np.linspace(0, len(starts) - 1, min(len(starts), max_frames)).astype(int)]
        w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(nfft) / nfft)
        seg = np.stack([x[s: s + nfft] - x[s: s + nfft].mean() for s in starts]) * w
        p = np.abs(np.fft.rfft(seg, axis=1)) ** 2 / (nfft * np.sum(w**2))
        p[:, 1:-1] *= 2.0
        return p

    monkeypatch.setattr(noise, "MAX_FRAMES", 300)
    rng = np.random.default_rng(0)
    for n, nfft in ((512 * 700 + 99, 1024), (4000, 1024), (700, 1024), (3001, 64)):
        x = (0.1 * rng.standard_normal(n) + 0.01).astype(np.float32)
        got = noise._frame_spectra(x, nfft)
        want = reference(x, nfft, 300)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
