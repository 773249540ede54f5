"""Noise-matched development calibrations, on real CCNU phones: the trials are made as a verdict
compares a noisy recording (references brought to its measured noise), classed by measured SNR,
and a noisy verdict is judged under the calibration of its SNR class (or, for a scorer without
one, under its condition's own calibration and the SNR check)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from devrecd.openset.scoring import (
    NOISE_LEVELS,
    calibration_key,
    calibration_keys,
    noise_level,
    parse_calibration_key,
)

RATE = 32000
PHONES = ["Apple_air1", "Honor9 STF-ALOO", "IPHONEX", "ZTE C880A", "huawei_nova", "nubia_Z11"]


def test_calibration_keys_name_the_snr_class_and_fall_back():
    assert [noise_level(s) for s in (-5, 9.9, 14.9, 15.0, 15.1, 24.9, 25.0, 40)] == [10, 10, 10, 10, 20, 20, 20, 30]
    assert calibration_key("clean", 10.0) == "clean"
    assert calibration_key("clean", 3.0, 21.4) == "clean/snr20/short"
    assert calibration_key("amrnb", None, 9.0) == "amrnb/snr10"
    assert calibration_keys("clean", 10.0, 27.0) == ["clean/snr30", "clean"]
    assert calibration_keys("clean", 2.5) == ["clean/short"]
    for key in ("clean", "clean/short", "clean/snr20", "clean/snr10/short", "amrnb/short"):
        channel, level, short = parse_calibration_key(key)
        assert calibration_key(channel, 3.0 if short else None, level) == key
    assert parse_calibration_key("opus32/snr30/short") == ("opus32", 30, True)


def _read(ccnu_dir: Path, phone: str, seg: int) -> np.ndarray:
    import soundfile as sf

    x, rate = sf.read(ccnu_dir / f"{phone}_{seg}.wav", dtype="float32")
    assert rate == RATE
    return x


@pytest.fixture(scope="module")
def dev(ccnu_dir):
    """A small GSV scorer (4 phones, segments 1-3) and the noise trials' view of 6 real phones."""
    from devrecd.config import Config
    from devrecd.features import extract
    from devrecd.openset.noisetrials import DevAudio
    from devrecd.openset.scorers import GsvScorer
    from devrecd.audio.windows import cut_windows
    from devrecd.stages import frontend_for, hop_samples

    cfg = Config()
    fe = frontend_for(cfg.frontend)
    hop = hop_samples(cfg.audio.hop_seconds, cfg.frontend.sample_rate)

    def features(x: np.ndarray) -> np.ndarray:
        return extract(cut_windows(np.asarray(x, np.float32), cfg.frontend.clip_samples, hop), fe)

    recs = [(p, s) for p in PHONES for s in range(1, 6)]
    samples = [_read(ccnu_dir, p, s) for p, s in recs]
    train = [i for i, (p, s) in enumerate(recs) if p in PHONES[:4] and s <= 3]
    scorer = GsvScorer.train([features(samples[i]) for i in train], [recs[i][0] for i in train], cfg.frontend,
                             mixtures=4, nap_dims=2, seed=0)
    audio = DevAudio(samples=lambda i: samples[i], features=features, rate=RATE)
    return scorer, audio, recs, features, cfg


def test_noisy_rows_are_matched_like_a_verdict_and_classed_by_measured_snr(dev):
    from devrecd.audio.noise import measure_noise, needs_matching
    from devrecd.openset.noisetrials import noisy_rows, noisy_version

    scorer, audio, recs, _, _ = dev
    devices = [p for p, _ in recs]
    refs = [i for i, (p, s) in enumerate(recs) if p in PHONES[4:] and s <= 2]
    questioned = [i for i, (p, s) in enumerate(recs) if p in PHONES[4:] and s == 4]
    rows = noisy_rows(scorer, audio, devices, refs, questioned, noise_level, draws=4, seed=3)
    assert rows and len(rows) <= 4 * len(questioned)
    for r in rows:
        assert r.level == noise_level(r.snr_db) and r.level in NOISE_LEVELS
        assert r.trials.profiles == sorted(PHONES[4:]) and r.trials.scores.shape == (1, 2)
        assert r.trials.devices == [devices[r.recording]]
    # Exactly the versions the verdict's rule matches are kept, each under its measured SNR.
    ref_noise = [measure_noise(audio.samples(i), RATE) for i in refs]
    kept = []
    for q in questioned:
        for d in range(4):
            prof = measure_noise(noisy_version(audio.samples(q), audio, q, d, 3), RATE)
            if needs_matching(prof, ref_noise)[0]:
                kept.append((q, round(prof.snr_db, 1)))
    assert [(r.recording, r.snr_db) for r in rows] == kept
    again = noisy_rows(scorer, audio, devices, refs, questioned, noise_level, draws=4, seed=3)
    assert all(np.array_equal(a.trials.scores, b.trials.scores) for a, b in zip(rows, again))  # deterministic
    # Short versions: each draw cut to the given lengths, measured as cut.
    short = noisy_rows(scorer, audio, devices, refs, questioned[:1], noise_level, cuts=(2.0, 4.0), draws=2, seed=3)
    assert all(r.recording == questioned[0] for r in short) and len(short) <= 4


def test_train_gsv_fits_noise_matched_calibrations_with_their_snr_range(dev):
    from devrecd.openset.calibration import Calibration
    from devrecd.openset.gsvtrain import train_gsv

    _, audio, recs, features, cfg = dev
    feats = [features(audio.samples(i)) for i in range(len(recs))]
    scorer = train_gsv(feats, [p for p, _ in recs], [s for _, s in recs], cfg.frontend, mixtures=4, nap_dims=2,
                       inner=3, seed=0, conditions=["clean", "clean/snr20", "clean/snr10"], audio=audio,
                       noise_draws=(2, 1))
    assert "clean" in scorer.calibrations
    noisy = {k: Calibration.from_dict(v) for k, v in scorer.calibrations.items() if "/snr" in k}
    assert noisy, scorer.calibrations.keys()
    for key, cal in noisy.items():
        c = cal.conditions
        assert c["noise_matched"] is True and c["condition"] == key and c["noise"] == "white"
        assert noise_level(c["snr_db_min"]) == noise_level(c["snr_db_max"]) == parse_calibration_key(key)[1]
        assert cal.metrics["n_target"] > 0 and cal.metrics["n_nontarget"] > 0
    with pytest.raises(Exception, match="noise-matched conditions needs the development audio"):
        train_gsv(feats, [p for p, _ in recs], [s for _, s in recs], cfg.frontend, mixtures=4, nap_dims=2,
                  inner=3, conditions=["clean/snr20"])


def _judge(ccnu_dir: Path, tmp_path: Path, enrolled: list[str]):
    from tests.helpers import shipped_registry
    from devrecd.openset.workflow import RegistryJudge

    cfg = shipped_registry(ccnu_dir, tmp_path, enrolled)
    return RegistryJudge(cfg), cfg


def _noisy_verdict(judge, cfg, ccnu_dir: Path, tmp_path: Path, phone: str, seg: int, snr: float) -> dict:
    import soundfile as sf

    from devrecd.audio.noise import add_noise
    from devrecd.stages import features_for_file

    q = tmp_path / f"{phone}-{seg}-{snr:g}.wav"
    sf.write(q, add_noise(_read(ccnu_dir, phone, seg), RATE, snr, seed=seg), RATE, subtype="PCM_16")
    rec, feats = features_for_file(q, cfg)
    return judge.judge(feats, rec.describe())


def test_a_noisy_verdict_is_judged_under_its_snr_class_and_never_names_an_unknown_phone(ccnu_dir, tmp_path):
    """With the shipped scorer: a recording at 20 dB SNR (references brought to its noise) is judged
    under ``clean/snr20``; noisy recordings of phones nobody enrolled are not named, those of the
    enrolled phones are. Without noise-matched calibrations (a scorer trained before them) the
    condition's own calibration is used, and a recording below its SNR range gets no decision."""
    from devrecd.openset.scoring import INCONCLUSIVE

    judge, cfg = _judge(ccnu_dir, tmp_path, PHONES[:3])
    assert {"clean/snr10", "clean/snr20", "clean/snr30"} <= set(judge.dev_calibrations)  # the shipped scorer carries them
    named, rejected = 0, 0
    for phone in PHONES:
        for seg in (4, 5):
            v = _noisy_verdict(judge, cfg, ccnu_dir, tmp_path, phone, seg, 20.0)
            assert v["comparison"]["noise_matched"] is True
            assert v["open_set"]["condition"] == "clean/snr20" and v["comparison"].get("snr_status") != "outside"
            assert v["open_set"]["calibration_source"] == "scorer's development calibration"
            assert v["condition_status"] == "validated"  # compared under "clean", the calibration's channel
            if phone in PHONES[:3]:
                named += v["device"] == phone
                assert v["device"] in (phone, "unknown device"), v["device"]
            else:
                rejected += v["device"] not in PHONES
    assert rejected >= 5, rejected  # measured: 5 of 6 (nubia_Z11 segment 4: LR 10^0.87 for an enrolled phone)
    assert named >= 5, named
    # A scorer without them: the condition's own calibration, and outside its SNR range no decision.
    judge.dev_calibrations = {k: c for k, c in judge.dev_calibrations.items() if "/snr" not in k}
    v = _noisy_verdict(judge, cfg, ccnu_dir, tmp_path, PHONES[0], 4, 15.0)
    assert v["open_set"]["condition"] == "clean" and v["comparison"]["snr_status"] == "outside"
    assert v["device"] == INCONCLUSIVE and v["log10_lr"] is None


def test_a_noise_matched_comparison_takes_a_noise_matched_calibration_first():
    """The calibration a noise-matched comparison is judged under: the noise-matched one of its SNR
    class (a case calibration is fitted on comparisons with the references as enrolled); without
    one, the condition's own (case first) where the recording lies in its SNR range; else the first
    there is, which the SNR check then withholds."""
    from devrecd.openset.calibration import Calibration
    from devrecd.openset.scoring import CASE, DEVELOPMENT, pick_calibration

    def cal(lo, hi):
        return Calibration(slope=1.0, offset=0.0, lower=-2.0, upper=2.0, decision={}, threshold=0.0, metrics={},
                           conditions={"snr_db_min": lo, "snr_db_max": hi})

    case = {"clean": cal(22.7, 41.7)}
    dev = {"clean": cal(22.7, 41.7), "clean/snr20": cal(15.0, 25.0), "clean/snr30": cal(25.0, 33.5)}
    layers = [(case, CASE), (dev, DEVELOPMENT)]
    for snr, want in ((28.0, (dev["clean/snr30"], DEVELOPMENT, "clean/snr30")),
                      (19.8, (dev["clean/snr20"], DEVELOPMENT, "clean/snr20"))):
        got = pick_calibration(layers, calibration_keys("clean", 10.0, snr), {"snr_db": snr})
        assert got[0] is want[0] and got[1:] == want[1:], (snr, got[1:])
    # Not noise-matched: the case calibration. A scorer without noise-matched ones: the case one, in range.
    assert pick_calibration(layers, calibration_keys("clean", 10.0), {"snr_db": 28.0})[:2] == (case["clean"], CASE)
    old_dev = {"clean": dev["clean"]}
    assert pick_calibration([(case, CASE), (old_dev, DEVELOPMENT)], calibration_keys("clean", 10.0, 28.0),
                            {"snr_db": 28.0})[:2] == (case["clean"], CASE)
    # None covers it: the first there is (the verdict's SNR check withholds its LR).
    assert pick_calibration([(case, CASE)], calibration_keys("clean", 10.0, 12.0), {"snr_db": 12.0})[2] == "clean"
    assert pick_calibration([({}, CASE)], ["clean/snr10", "clean"], None) == (None, "", "clean")


def test_train_gsv_trains_ubm_and_nap_on_noisy_copies_too(dev):
    """With ``Augment(noise_copies=N)`` the final UBM and NAP are trained on every recording and N
    noisy copies of it, each labelled with its phone: exactly ``GsvScorer.train`` of that list, the
    copies drawn apart from the calibration trials' noisy versions and reproducible."""
    from devrecd.openset.gsvtrain import NOISE_COPY_DRAW, Augment, train_gsv
    from devrecd.openset.noisetrials import noisy_version
    from devrecd.openset.scorers import GsvScorer

    _, audio, recs, features, cfg = dev
    feats = [features(audio.samples(i)) for i in range(len(recs))]
    devices, order = [p for p, _ in recs], [s for _, s in recs]
    kw = dict(mixtures=4, nap_dims=2, inner=3, seed=0, conditions=["clean"], audio=audio)
    aug = train_gsv(feats, devices, order, cfg.frontend, augment=Augment(noise_copies=2), **kw)
    copies = [features(np.ascontiguousarray(noisy_version(audio.samples(i), audio, i, NOISE_COPY_DRAW + c, 0),
                                            dtype=np.float32)) for c in range(2) for i in range(len(recs))]
    expected = GsvScorer.train(feats + copies, devices * 3, cfg.frontend, mixtures=4, nap_dims=2, seed=0)
    assert aug.fingerprint == expected.fingerprint
    assert expected.fingerprint != GsvScorer.train(feats, devices, cfg.frontend, mixtures=4, nap_dims=2, seed=0).fingerprint
    assert not np.array_equal(copies[0], features(noisy_version(audio.samples(0), audio, 0, 0, 0)))
    assert Augment(channels=("amrnb",), noise_copies=2).describe() == {"channels": ["amrnb"], "noise_copies": 2}
    with pytest.raises(Exception, match="channel copies needs the development audio"):
        train_gsv(feats, devices, order, cfg.frontend, augment=Augment(channels=("amrnb",)), **kw)
