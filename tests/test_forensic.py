"""Likelihood-ratio maths: the ENFSI scale, lir's calibrator, ELUB bounds, held-out validity, conditions."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from devrecd.forensic.lr import Calibration, assess, condition_mismatch, load_calibration
from devrecd.forensic.verbal import ENFSI_SCALE, scale_rows, verbal
from devrecd.openset.measures import CalibrationError, cllr
from devrecd.openset.calibration import fit_calibration as fit_lr_calibration

pytest.importorskip("lir")

SCORER = {"kind": "embedder", "fingerprint": "f" * 64}
WAV = {"native_rates": [32000], "codecs": ["pcm_s16le"], "containers": ["wav"], "duration_min": 8.0,
       "duration_max": 11.0, "recordings": 30}


def test_verbal_scale_bands_both_propositions() -> None:
    assert verbal(0.0) == verbal(0.2) == "no support for either proposition"  # LR 1 .. < 2
    assert verbal(math.log10(2)) == "weak support for Hp"
    assert verbal(0.999) == "weak support for Hp" and verbal(1.0) == "moderate support for Hp"
    assert verbal(2.5) == "moderately strong support for Hp"
    assert verbal(3.0) == "strong support for Hp" and verbal(4.0) == verbal(5.99) == "very strong support for Hp"
    assert verbal(6.0) == verbal(12.0) == "extremely strong support for Hp"
    assert verbal(-1.5) == "moderate support for Hd" and verbal(-0.1) == "no support for either proposition"
    assert verbal(-3.0, hd="the defence proposition") == "strong support for the defence proposition"
    with pytest.raises(ValueError):
        verbal(float("inf"))
    lows = [lo for lo, _ in ENFSI_SCALE]
    assert lows == sorted(lows) and [r["lr"] for r in scale_rows()][-1] == "> 1,000,000"


def _trials(rng: np.random.Generator, n_rec: int, n_dev: int, sep: float = 0.35):
    """Cosine-like scores: each recording against every device, its own device scoring higher."""
    dev = np.arange(n_rec) % n_dev
    s = rng.normal(0.2, 0.1, (n_rec, n_dev))
    target = dev[:, None] == np.arange(n_dev)[None, :]
    s[target] = rng.normal(0.2 + sep, 0.1, n_rec)
    return s.ravel(), target.ravel().astype(int), np.repeat(np.arange(n_rec), n_dev)


def test_the_calibration_reproduces_lirs_logistic_calibrator() -> None:
    """The one calibration's map (numpy, no lir at run time) equals NFI lir's LogitCalibrator."""
    from lir.algorithms.logistic_regression import LogitCalibrator

    s, y, g = _trials(np.random.default_rng(0), 40, 8)
    cal = fit_lr_calibration(s, y, g)
    lir_llr = LogitCalibrator(C=1e6, max_iter=10000, tol=1e-12).fit(s, y).transform(s)
    assert np.allclose(cal.slope * s + cal.offset, lir_llr, atol=1e-5)
    assert cal.slope > 0


def test_calibrated_lrs_on_held_out_trials() -> None:
    """Fit on one set of recordings, test on others: LR > 1 for targets, < 1 for non-targets, mostly;
    calibration lowers Cllr below that of the raw scores; the ELUB bound caps the LR."""
    rng = np.random.default_rng(1)
    cal = fit_lr_calibration(*_trials(rng, 60, 15), scorer=SCORER, population={"description": "test"}, conditions=WAV)
    s, y, _ = _trials(rng, 45, 15)  # held out
    llr = np.array([cal.log10_lr(v)[0] for v in s])
    assert np.mean(llr[y == 1] > 0) > 0.85 and np.mean(llr[y == 0] < 0) > 0.9
    assert cllr(llr[y == 1], llr[y == 0]) < cllr(s[y == 1], s[y == 0])  # the raw scores taken as log10 LRs
    m = cal.metrics
    assert 0 <= m["cllr_min"] <= m["cllr"] + 1e-9 and m["cllr"] < 0.5
    assert (m["n_target"], m["n_nontarget"], m["folds"]) == (60, 60 * 14, 5)
    # ELUB: never beyond what the counts support, and the cap applies.
    assert -math.log10(61) <= cal.lower < 0 < cal.upper <= math.log10(60 * 14 + 1)
    bounded, raw = cal.log10_lr(5.0)
    assert raw > cal.upper and bounded == cal.upper
    bounded, raw = cal.log10_lr(-5.0)
    assert raw < cal.lower and bounded == cal.lower
    assert max(cal.heldout_log10_lrs) <= cal.upper and min(cal.heldout_log10_lrs) >= cal.lower


def test_few_trials_give_tight_bounds() -> None:
    """With 8 recordings x 4 devices an LR of a million is not reportable, however separable the scores."""
    s, y, g = _trials(np.random.default_rng(2), 8, 4, sep=3.0)
    cal = fit_lr_calibration(s, y, g, scorer=SCORER, population={}, conditions=WAV)
    assert cal.upper <= math.log10(24 + 1) and cal.lower >= -math.log10(8 + 1)
    assert cal.log10_lr(10.0)[1] > 6 and cal.log10_lr(10.0)[0] == cal.upper
    with pytest.raises(CalibrationError, match="at least 2 target"):
        fit_lr_calibration([0.1, 0.2, 0.9], [0, 0, 1], [0, 1, 2], scorer=SCORER, population={}, conditions=WAV)


def test_assess_withholds_the_lr_when_it_cannot_be_given(tmp_path) -> None:
    cal = fit_lr_calibration(*_trials(np.random.default_rng(3), 30, 10), scorer=SCORER, population={}, conditions=WAV)
    rec = {"native_rate": 32000, "codec": "pcm_s16le", "duration": 9.0}
    ok = assess(cal, 0.7, rec, SCORER)
    assert ok["lr_withheld"] is None and ok["log10_lr"] > 0 and ok["verbal"].endswith("for Hp")
    assert ok["lr"] == pytest.approx(10 ** ok["log10_lr"], rel=1e-3)
    assert assess(None, 0.7, rec, SCORER)["lr_withheld"].startswith("no calibration")
    other = assess(cal, 0.7, rec, {**SCORER, "fingerprint": "0" * 64})
    assert other["log10_lr"] is None and "another scorer" in other["lr_withheld"]
    amr = assess(cal, 0.7, {**rec, "codec": "amr_nb", "native_rate": 8000}, SCORER)
    assert amr["log10_lr"] is None and "amr_nb" in amr["lr_withheld"] and "8000" in amr["lr_withheld"]
    short = assess(cal, 0.7, {**rec, "duration": 3.0}, SCORER)
    assert short["log10_lr"] is not None and "duration 3.0 s" in short["condition_warnings"][0]
    assert condition_mismatch(rec, WAV) == ([], [])
    # Round trip through the file `devrecd calibrate` writes; the hash names the content.
    cal.save(tmp_path / "lr.json")
    back = load_calibration(tmp_path / "lr.json")
    assert back == cal and back.sha256 == cal.sha256
    assert Calibration.from_dict({**cal.to_dict(), "slope": cal.slope + 1}).sha256 != cal.sha256


def test_report_of_plain_recordings_with_a_calibration(ccnu_dir, tmp_path) -> None:
    """Recordings named without any verdict: inventory only, validation from the given calibration."""
    import json

    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.report import SCHEMA_PATH

    cal = fit_lr_calibration(*_trials(np.random.default_rng(4), 30, 10), scorer=SCORER,
                             population={"description": "30 recordings of 10 devices", "trial_devices": ["a", "b"]},
                             conditions=WAV)
    cal.save(tmp_path / "lr.json")
    wav = sorted(ccnu_dir.glob("*_5.wav"))[0]
    result = CliRunner().invoke(app, ["report", str(wav), "--out", str(tmp_path / "rep"), "--calibration",
                                      str(tmp_path / "lr.json"), "--case-id", "X-1"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    (entry,) = doc["inventory"]
    assert entry["outcome"] == "not judged" and entry["integrity"]["status"] == "verified"
    assert entry["native_rate"] == 32000 and entry["levels"]["rms_dbfs"] < 0 and doc["recordings"] == []
    assert doc["validation"]["metrics"]["n_target"] == 30 and doc["validation"]["calibration"]["sha256"] == cal.sha256
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "X-1" in html and html.count("data:image/png;base64,") == 2 and "http" not in html.lower()
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "calibration-det.png", "calibration-tippett.png", "report.html", "report.json"]
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 1 and "no such file or folder" in bad.output


def test_compare_with_the_shipped_gsv_scorer_on_real_phones(ccnu_dir, tmp_path) -> None:
    """The shipped GSV scorer through the one scorer interface: references = segments 1-2 of one
    phone; its own segment 5 scores above segment 5 of every other phone. An LR calibration of another
    scorer is not applied; the shipped scorer's own development calibration of the condition is."""
    import json

    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.config import load_config
    from devrecd.forensic.compare import Comparer, compare
    from devrecd.openset.scorers import default_gsv_path, load_gsv

    cfg = load_config(env={}, overrides={"audio.hop_seconds": 1.0})
    scorer = load_gsv(default_gsv_path())[0]
    comparer = Comparer(scorer, cfg)
    device = "Apple_air1"
    refs = comparer.references(device, [ccnu_dir / f"{device}_1.wav", ccnu_dir / f"{device}_2.wav"])
    assert refs.profile.shape == (scorer.ubm.dim,) and np.isclose(np.linalg.norm(refs.profile), 1.0)
    questioned = [ccnu_dir / f"{device}_5.wav"] + [p for p in sorted(ccnu_dir.glob("*_5.wav"))
                                                   if not p.name.startswith(device)][:5]
    other_cal = fit_lr_calibration(*_trials(np.random.default_rng(5), 30, 10), scorer=SCORER, population={},
                                   conditions=WAV)
    recs = compare(comparer, questioned, refs, other_cal)
    assert [r["outcome"] for r in recs] == ["compared"] * len(questioned)
    same, others = recs[0]["score"], [r["score"] for r in recs[1:]]
    assert same > max(others), (same, others)
    for r in recs:
        assert r["scorer"]["kind"] == "gsv" and r["scorer"]["fingerprint"] == scorer.fingerprint
        assert r["log10_lr"] is None and "another scorer" in r["lr_withheld"]
        assert len(r["window_scores"]) == len(r["window_starts"]) > 0 and r["condition"]["native_rate"] == 32000
        assert re.fullmatch(r"[0-9a-f]{64}", r["sha256"])
    # Each questioned recording was featurised once for the whole run.
    assert len(comparer._cache) == 2 + len(questioned)
    # The CLI without --model or --registry uses the shipped GSV scorer and its development calibration
    # of the recordings' condition (clean, whole): a bounded LR, for the right phone above 1.
    result = CliRunner().invoke(app, ["compare", str(questioned[0]), str(questioned[1]), "--reference",
                                      str(ccnu_dir / f"{device}_1.wav"), "--reference", str(ccnu_dir / f"{device}_2.wav"),
                                      "--reference-device", device, "--format", "json"], env={"DEVRECD_AUDIO__HOP_SECONDS": "1.0"})
    assert result.exit_code == 0, result.output
    cli = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["score"] for r in cli] == pytest.approx([same, others[0]], abs=1e-6)
    assert all(r["lr_withheld"] is None and r["calibration"]["basis"].startswith("development") for r in cli)
    assert cli[0]["log10_lr"] > 0 > cli[1]["log10_lr"] and cli[0]["calibration"]["conditions"]["condition"] == "clean"
    bad = CliRunner().invoke(app, ["compare", str(questioned[0]), "--reference", str(questioned[1]), "--scorer", "bogus"])
    assert bad.exit_code == 2 and "Invalid value for '--scorer'" in bad.output  # a choice: a usage error


def test_a_measured_band_limit_outside_the_calibration_withholds_the_lr() -> None:
    """A telephone-band recording re-packaged as a 32 kHz WAV passes the header checks; its measured
    condition does not match a calibration of broadband recordings."""
    from devrecd.forensic.lr import describe_conditions

    broadband = {"native_rate": 32000, "codec": "pcm_s16le", "duration": 9.0, "condition": {"channel": ""}}
    tel = {**broadband, "condition": {"channel": "tel"}}
    conditions = describe_conditions([broadband] * 3)
    assert conditions["channels"] == ["clean"] and conditions["native_rates"] == [32000]
    cal = fit_lr_calibration(*_trials(np.random.default_rng(6), 30, 10), scorer=SCORER, population={},
                             conditions=conditions)
    assert assess(cal, 0.7, broadband, SCORER)["log10_lr"] is not None
    out = assess(cal, 0.7, tel, SCORER)
    assert out["log10_lr"] is None and "measured condition tel" in out["lr_withheld"]
    assert "unknown" in assess(cal, 0.7, {**broadband, "condition": {"channel": "nonsense"}}, SCORER)["lr_withheld"]
    # Calibrations that did not record channels keep working on header facts alone.
    assert assess(fit_lr_calibration(*_trials(np.random.default_rng(6), 30, 10), scorer=SCORER, population={},
                                     conditions=WAV), 0.7, tel, SCORER)["log10_lr"] is not None


def test_a_recording_noisier_than_the_calibrations_recordings_is_said_to_be_outside_its_snr_range() -> None:
    """The SNRs of the calibration recordings bound the range it was validated on: a questioned
    recording below it whose references were brought to its noise gets no LR, as a channel the
    calibration never saw (noise-matched comparisons of noisier recordings score above its trials);
    one not matched gets the LR with a warning; one inside the range its LR."""
    from devrecd.forensic.lr import describe_conditions, snr_outside

    recs = [{"duration": 9.0, "condition": {"channel": "", "snr_db": s}} for s in (31.0, 38.5, 44.0)]
    conditions = describe_conditions(recs)
    assert (conditions["snr_db_min"], conditions["snr_db_max"]) == (31.0, 44.0)
    assert snr_outside({"snr_db": 31.0}, conditions) is None  # at the lowest: inside
    noisy = snr_outside({"snr_db": 18.2}, conditions)
    assert noisy and "SNR 18.2 dB below" in noisy and "31.0-44.0 dB" in noisy
    cal = fit_lr_calibration(*_trials(np.random.default_rng(7), 30, 10), scorer=SCORER, conditions=conditions)
    matched = {"duration": 9.0, "condition": {"channel": "", "snr_db": 18.2}, "comparison": {"noise_matched": True}}
    out = assess(cal, 0.7, matched, SCORER)
    assert out["log10_lr"] is None and noisy in out["lr_withheld"]
    # A phone as noisy as its references (nothing matched): the LR, with the statement.
    as_is = assess(cal, 0.7, {**matched, "comparison": {"noise_matched": False}}, SCORER)
    assert as_is["log10_lr"] is not None and as_is["condition_warnings"] == [noisy]
    assert assess(cal, 0.7, {"duration": 9.0, "condition": {"channel": "", "snr_db": 33.0}}, SCORER)["log10_lr"] is not None
    assert snr_outside({"snr_db": 18.2}, {}) is None  # a calibration that measured no SNR says nothing


def test_compare_gives_an_lr_only_under_the_condition_it_compares_under() -> None:
    """``compare`` brings references to a questioned recording's noise, not to its channel: a call
    is compared mismatched and gets no calibration (the channel calibrations were fitted with the
    references matched); a broadband recording gets the clean one, a short one the clean/short one."""
    from devrecd.forensic.compare import calibration_of

    clean, short, amr = (fit_lr_calibration(*_trials(np.random.default_rng(k), 30, 10), scorer=SCORER) for k in (8, 9, 10))
    cals = {"clean": clean, "clean/short": short, "amrnb": amr}
    assert calibration_of(cals, {"condition": {"channel": ""}, "duration": 9.0}) is clean
    assert calibration_of(cals, {"condition": {"channel": ""}, "duration": 3.0}) is short
    assert calibration_of(cals, {"condition": {"channel": "amrnb"}, "duration": 9.0}) is None
    assert calibration_of(amr, {"condition": {"channel": "amrnb"}}) is amr  # one given for every recording
