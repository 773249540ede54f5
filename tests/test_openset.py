"""Open set: calibration maths, the registry on disk, scoring, and enrol/identify on real phones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devrecd.config import RegistryConfig
from devrecd.openset.calibration import Calibration, Decision, fit_trial_blocks
from devrecd.openset.measures import (
    CalibrationError,
    cllr,
    cllr_min,
    eer,
    elub_bounds,
    error_rates,
    fit_balanced,
    min_dcf,
    threshold_for_far,
)
from devrecd.openset.registry import Reference, RegistryError, open_registry, recording_embedding
from devrecd.openset.scoring import INCONCLUSIVE, UNKNOWN, calibration_for, identify_with_registry
from devrecd.errors import ArtifactError

# --- calibration maths -----------------------------------------------------------------------

# tar/non hand case: accepting >= 0.7 gives FAR = FRR = 1/3; >= 0.8 gives FRR 1/3, FAR 0.
TAR = np.array([0.9, 0.8, 0.3])
NON = np.array([0.7, 0.4, 0.1])


def test_eer_hand_computed_cases() -> None:
    assert eer(TAR, NON) == pytest.approx(1 / 3)
    assert eer([2.0, 3.0], [0.0, 1.0]) == 0.0  # separable
    assert eer([0.0, 1.0], [2.0, 3.0]) == 1.0  # exactly inverted
    # Interleaved: accepting >= 2 or >= 3 both give FAR = FRR = 1/2.
    assert eer([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.5)


def test_eer_matches_sklearn_roc() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    tar, non = rng.normal(1.5, 1.0, 400), rng.normal(0.0, 1.0, 3000)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(tar.size), np.zeros(non.size)], np.r_[tar, non], drop_intermediate=False)
    fnr = 1 - tpr
    i = int(np.argmax(fnr <= fpr))  # sklearn's curve runs from strict to lenient thresholds
    # Interpolate the crossing on the segment between the two points around it.
    d0, d1 = fpr[i - 1] - fnr[i - 1], fpr[i] - fnr[i]
    w = d0 / (d0 - d1)
    ref = fpr[i - 1] + w * (fpr[i] - fpr[i - 1])
    assert eer(tar, non) == pytest.approx(ref, abs=1e-3)
    # Gaussian theory: EER = Phi(-d'/2) with d' = 1.5 -> 0.2266.
    assert eer(tar, non) == pytest.approx(0.2266, abs=0.03)


def test_error_rates_are_monotone_and_span_0_1() -> None:
    thr, frr, far = error_rates(TAR, NON)
    assert np.all(np.diff(thr) > 0) and np.all(np.diff(frr) >= 0) and np.all(np.diff(far) <= 0)
    assert (frr[0], far[0], frr[-1], far[-1]) == (0.0, 1.0, 1.0, 0.0)


def test_min_dcf_hand_computed() -> None:
    # With P_target 0.5 and unit costs the normalised DCF is FRR + FAR: best 1/3 (threshold 0.8).
    assert min_dcf(TAR, NON, p_target=0.5) == pytest.approx(1 / 3)
    # At the NIST prior 0.01 missing is cheap: normalised cost = min(frr + 99 far, ...) / 1 -> 1/3 at >= 0.8.
    assert min_dcf(TAR, NON) == pytest.approx(1 / 3)
    assert min_dcf([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert min_dcf([0.0, 1.0], [2.0, 3.0]) == pytest.approx(1.0)  # no better than always rejecting


def test_cllr_hand_computed() -> None:
    assert cllr([0.0, 0.0], [0.0]) == pytest.approx(1.0)  # LR = 1 always: 1 bit
    assert cllr([np.log10(3)], [-np.log10(3)]) == pytest.approx(np.log2(4 / 3))  # log10 LRs
    assert cllr([25.0], [-25.0]) < 1e-20
    assert cllr([-np.log10(3)], [np.log10(3)]) == pytest.approx(2.0)  # confidently wrong: log2(4)


def _trials(rng, n_tar: int, n_non: int, mu=(0.8, 0.3), sd=(0.1, 0.15)):
    tar, non = rng.normal(mu[0], sd[0], n_tar), rng.normal(mu[1], sd[1], n_non)
    # one "recording" per 10 trials: the held-out folds keep a recording's trials together
    return fit_trial_blocks, tar, non, np.arange(n_tar) // 10, 10_000 + np.arange(n_non) // 10


def test_cllr_min_is_zero_when_separable_and_bounds_actual_cllr() -> None:
    assert cllr_min([2.0, 3.0], [0.0, 1.0]) == 0.0
    rng = np.random.default_rng(1)
    fit, tar, non, gt, gn = _trials(rng, 500, 500, mu=(2, 0), sd=(1, 1))
    cal = fit(tar, non, gt, gn)
    assert 0 < cal.metrics["cllr_min"] <= cal.metrics["cllr"] < 1.0
    assert cllr(5 * (cal.slope * tar + cal.offset), 5 * (cal.slope * non + cal.offset)) > cal.metrics["cllr"]


def test_logistic_calibration_recovers_the_true_log10_lr() -> None:
    rng = np.random.default_rng(2)
    # Equal-variance Gaussians N(+1, 1) vs N(-1, 1): the true natural-log LR is exactly 2 * score.
    tar, non = rng.normal(1, 1, 20000), rng.normal(-1, 1, 20000)
    coef, offset = fit_balanced(tar[:, None], non[:, None])
    assert coef[0] == pytest.approx(2.0, abs=0.1) and offset == pytest.approx(0.0, abs=0.05)
    # Unbalanced trials: the equal class weighting keeps the LR free of the trial proportions.
    coef2, offset2 = fit_balanced(tar[:2000, None], non[:, None])
    assert coef2[0] == pytest.approx(2.0, abs=0.2) and offset2 == pytest.approx(0.0, abs=0.15)
    cal = fit_trial_blocks(tar[:4000], non[:4000], np.arange(4000) // 10, 10_000 + np.arange(4000) // 10)
    assert cal.slope == pytest.approx(2.0 / np.log(10), abs=0.05)  # the one scale: log10


def test_elub_bounds_equal_lirs_and_never_exceed_the_trial_counts() -> None:
    from lir.algorithms.bayeserror import elub

    for seed in range(6):
        rng = np.random.default_rng(seed)
        n, m = int(rng.integers(5, 300)), int(rng.integers(5, 900))
        llr = np.r_[rng.normal(1.5, 1.2, n), rng.normal(-1.5, 1.0, m)]
        y = np.r_[np.ones(n, int), np.zeros(m, int)]
        ours = elub_bounds(llr, y)
        assert ours == pytest.approx(elub(llr.copy(), y, add_misleading=1))
        assert -np.log10(n + 1) - 0.011 <= ours[0] <= 0.0 <= ours[1] <= np.log10(m + 1) + 0.011


def test_the_decision_follows_the_lr_and_the_bayes_threshold() -> None:
    rng = np.random.default_rng(4)
    fit, tar, non, gt, gn = _trials(rng, 300, 3000)
    cal = fit(tar, non, gt, gn)  # default: prior 0.5, equal costs: accept when LR >= 1
    assert cal.decision["rule"] == "bayes" and cal.log10_threshold == 0.0
    assert cal.lower < 0 < cal.upper and cal.log10_lr(cal.threshold)[1] == pytest.approx(0.0, abs=1e-9)
    for s in np.linspace(0.2, 1.0, 41):  # the decision and the reported (bounded) LR never disagree
        bounded, _ = cal.log10_lr(s)
        assert cal.accepts(bounded) == (bounded >= 0.0)
    strict = cal.with_decision(Decision(prior=0.01))  # a prior of 1 in 100: LR >= 99 needed
    assert strict.log10_threshold == pytest.approx(np.log10(99), abs=1e-4) and strict.threshold > cal.threshold
    # Among 25 enrolled devices each has a prior of 0.5 / 25: LR >= 49 names one.
    many = cal.with_decision(Decision(), n_candidates=25)
    assert many.log10_threshold == pytest.approx(np.log10(49), abs=1e-4) and many.decision["n_candidates"] == 25
    far = cal.with_decision(Decision(rule="far", far=0.01))
    assert np.mean(non >= far.threshold) <= 0.01 and far.log10_threshold == pytest.approx(cal.log10_lr(far.threshold)[1])
    with pytest.raises(CalibrationError):
        Decision(prior=1.0)


def test_a_few_case_trials_regularised_toward_the_development_calibration_do_not_move_it_far() -> None:
    rng = np.random.default_rng(5)
    fit, tar, non, gt, gn = _trials(rng, 400, 4000)
    dev = fit(tar, non, gt, gn)
    # A case set of 4 target and 12 non-target trials, one of them unluckily high: on its own it
    # would say something else; regularised, it stays near the development map.
    ctar, cnon = rng.normal(0.8, 0.1, 4), np.r_[rng.normal(0.3, 0.15, 11), 0.75]
    alone = fit_trial_blocks(ctar, cnon, [0, 1, 2, 3], [4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9])
    held = fit_trial_blocks(ctar, cnon, [0, 1, 2, 3], [4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9], prior=dev)
    assert abs(held.threshold - dev.threshold) < abs(alone.threshold - dev.threshold)
    assert abs(held.threshold - dev.threshold) < 0.03
    assert "regularised" in held.basis
    # Many case trials: the data speak (a shifted population moves the map).
    fit, tar2, non2, gt2, gn2 = _trials(rng, 400, 4000, mu=(0.9, 0.5))
    moved = fit(tar2, non2, gt2, gn2, prior=dev)
    assert moved.threshold > dev.threshold + 0.05


def test_a_few_case_trials_do_not_shrink_the_bounds_below_what_the_development_trials_support() -> None:
    """A 4-device case set (4 target / 12 non-target trials, two non-targets misleadingly high, as two
    similar real phones give): on their own, ELUB bounds of 16 trials cannot reach the Bayes threshold
    of 4 candidates (LR 7), and `calibrate` would make every verdict inconclusive. Regularised toward
    the development calibration, the bounds stand on the development trials too: the misleading case
    trials still pull the upper bound in, but not below what the development trials support."""
    rng = np.random.default_rng(7)
    fit, tar, non, gt, gn = _trials(rng, 45, 180)
    dev = fit(tar, non, gt, gn)
    ctar, cnon = rng.normal(0.85, 0.05, 4), np.r_[rng.normal(0.3, 0.1, 10), 0.74, 0.75]
    groups = ([0, 1, 2, 3], [4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7])
    alone = fit_trial_blocks(ctar, cnon, *groups, n_candidates=4)
    held = fit_trial_blocks(ctar, cnon, *groups, prior=dev, n_candidates=4)
    threshold = np.log10(7)
    assert held.log10_threshold == alone.log10_threshold == pytest.approx(threshold, abs=1e-4)
    assert alone.upper < threshold and not alone.decidable  # the 16 trials alone: nothing can be named
    assert held.decidable and held.upper > threshold
    assert held.upper < dev.upper  # ... yet the misleading case trials are heard
    assert held.accepts(held.log10_lr(float(ctar.min()))[0])  # the case's own targets are named
    # Without a development calibration there is nothing else to stand on: the case trials' own bounds.
    assert alone.upper <= np.log10(len(cnon) + 1)


def test_logistic_fit_never_takes_a_step_that_raises_the_objective(monkeypatch) -> None:
    from devrecd.openset import measures

    rng = np.random.default_rng(3)
    x = np.r_[rng.normal(1, 1, 50), rng.normal(-1, 1, 50)][:, None]
    y = np.r_[np.ones(50), np.zeros(50)]
    weight = np.full(100, 0.01)

    def objective(coef: np.ndarray, intercept: float) -> float:
        z = x @ coef + intercept
        return float(weight @ (np.logaddexp(0.0, z) - y * z))

    good = measures.fit_logistic(x, y, weight)
    assert objective(*good) < objective(np.zeros(1), 0.0)
    # A solver that points uphill: every halving of the step still raises the objective, so the
    # fit must stay where it started rather than take the last, smallest, uphill step.
    solve = np.linalg.solve
    monkeypatch.setattr(measures.np.linalg, "solve", lambda a, b: -solve(a, b))
    coef, intercept = measures.fit_logistic(x, y, weight)
    assert coef.tolist() == [0.0] and intercept == 0.0


def test_threshold_for_far() -> None:
    non = np.linspace(0.1, 1.0, 10)
    t = threshold_for_far(non, 0.2)
    assert np.sum(non >= t) == 2 and 0.8 < t <= 0.9  # accepts 0.9 and 1.0 only
    t0 = threshold_for_far(non, 0.0)
    assert np.sum(non >= t0) == 0 and t0 == pytest.approx(1.0)
    with pytest.raises(CalibrationError):
        threshold_for_far(non, 1.0)
    with pytest.raises(CalibrationError):
        fit_trial_blocks([], non, [], range(10))


def test_calibration_round_trips_and_refuses_what_is_not_one() -> None:
    rng = np.random.default_rng(3)
    fit, tar, non, gt, gn = _trials(rng, 300, 3000)
    cal = fit(tar, non, gt, gn)
    assert cal.metrics["n_target"] == 300 and cal.metrics["n_nontarget"] == 3000
    assert cal.metrics["frr"] == pytest.approx(np.mean(np.array(cal.heldout_log10_lrs[:300]) < 0.0))
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    with pytest.raises(ArtifactError, match="not a devrecd calibration"):
        Calibration.from_dict({"slope": 40.0, "offset": -25.0, "threshold": 0.6})  # the natural-log format of version 1
    with pytest.raises(ArtifactError, match="malformed"):
        Calibration.from_dict({**cal.to_dict(), "upper": float("nan")})


# --- registry ---------------------------------------------------------------------------------

EMB = {"fingerprint": "a" * 64, "arch": "paper", "dim": 4, "source": "test"}


def _ref(sha: str) -> Reference:
    return Reference(sha256=sha * 64, path=f"/refs/{sha}.wav", windows=3, seconds=8.0, enrolled_at="t")


def _windows(direction: list[float], rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    return np.asarray(direction, dtype=np.float64) + rng.normal(0, noise, (3, 4))


def test_recording_embedding_is_unit_mean_of_unit_windows() -> None:
    w = np.array([[3.0, 0, 0, 0], [0, 0.5, 0, 0]])
    e = recording_embedding(w)
    assert np.allclose(e, [np.sqrt(0.5), np.sqrt(0.5), 0, 0])  # window scale does not weigh in
    with pytest.raises(RegistryError):
        recording_embedding(np.zeros((0, 4)))


def test_registry_enrol_save_load_remove(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "reg" / "registry.json"
    reg = open_registry(path, create=True)
    assert reg.enroll("phone A", EMB, [(_ref("1"), _windows([1, 0, 0, 0], rng)), (_ref("2"), _windows([1, 0, 0, 0], rng))]) == (2, 0)
    assert reg.enroll("phone B", EMB, [(_ref("3"), _windows([0, 1, 0, 0], rng))]) == (1, 0)
    # The same file again is not weighed twice.
    assert reg.enroll("phone A", EMB, [(_ref("1"), _windows([1, 0, 0, 0], rng))]) == (0, 1)
    reg.save()
    arrays = list(path.parent.glob("registry.*.npz"))
    assert len(arrays) == 1

    back = open_registry(path)
    assert back.names == ["phone A", "phone B"]
    assert back.profiles["phone A"].counts == {"n_references": 2, "windows": 6, "seconds": 16.0}
    assert np.allclose(back.profiles["phone A"].embeddings, reg.profiles["phone A"].embeddings)
    assert np.allclose(np.linalg.norm(back.profiles["phone A"].mean), 1.0)
    assert back.embedder["fingerprint"] == EMB["fingerprint"]

    back.remove("phone B")
    back.save()
    assert open_registry(path).names == ["phone A"]
    assert list(path.parent.glob("registry.*.npz")) != arrays  # new arrays file, old one deleted
    assert len(list(path.parent.glob("registry.*.npz"))) == 1
    with pytest.raises(RegistryError, match="no device 'phone B'"):
        back.get("phone B")


def test_registry_refuses_another_model_and_detects_damage(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "registry.json"
    reg = open_registry(path, create=True)
    reg.enroll("A", EMB, [(_ref("1"), _windows([1, 0, 0, 0], rng))])
    reg.save()
    with pytest.raises(RegistryError, match="cannot be compared") as err:
        reg.enroll("B", {**EMB, "fingerprint": "b" * 64}, [(_ref("2"), _windows([0, 1, 0, 0], rng))])
    assert err.value.reason == "model_mismatch"
    npz = next(tmp_path.glob("registry.*.npz"))
    npz.write_bytes(npz.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        open_registry(path)
    with pytest.raises(RegistryError, match="no registry"):
        open_registry(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a devrecd registry"):
        open_registry(tmp_path / "junk.json")


def _cal(rng, **kw) -> Calibration:
    return fit_trial_blocks(rng.normal(0.9, 0.05, 50), rng.normal(0.2, 0.1, 200), np.arange(50) // 5,
                            100 + np.arange(200) // 5, **kw)


def test_enrolment_invalidates_calibration_and_calibration_persists(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reg = open_registry(tmp_path / "registry.json", create=True)
    reg.enroll("A", EMB, [(_ref("1"), _windows([1, 0, 0, 0], rng))])
    cal = _cal(rng)
    reg.set_calibrations({"clean": cal}, {"dataset": "x"})
    reg.save()
    back = open_registry(reg.path)
    assert back.calibrations == {"clean": cal} and back.calibration_info == {"dataset": "x"}
    got, source, key = calibration_for(back, "clean", RegistryConfig())
    assert key == "clean"
    assert got.fitted_sha256 == cal.sha256 and got.slope == cal.slope and source.startswith("case calibration")
    assert calibration_for(back, "amrnb", RegistryConfig())[0] is None  # no calibration of that condition
    assert calibration_for(back, "clean", RegistryConfig(use_calibration=False))[0] is None
    assert calibration_for(back, "clean", RegistryConfig(prior=0.01))[0].log10_threshold == pytest.approx(np.log10(99), abs=1e-4)
    back.enroll("B", EMB, [(_ref("2"), _windows([0, 1, 0, 0], rng))])
    assert back.calibrations == {}  # they described the old set of profiles


# --- scoring ----------------------------------------------------------------------------------

def test_identify_with_registry_known_unknown_inconclusive_and_ranking(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reg = open_registry(tmp_path / "registry.json", create=True)
    for name, d in (("A", [1, 0, 0, 0]), ("B", [0, 1, 0, 0]), ("C", [0, 0, 1, 0])):
        reg.enroll(name, EMB, [(_ref(name), _windows(d, rng))])
    cal = _cal(rng)
    v = identify_with_registry(_windows([0.9, 0.3, 0, 0], rng), reg, calibration=cal, k=2)
    assert v["device"] == "A" and v["open_set"]["accepted"] and v["log10_lr"] >= cal.log10_threshold
    assert v["log10_lr"] == v["top_k"][0]["log10_lr"] > v["top_k"][1]["log10_lr"]
    assert [t["device"] for t in v["top_k"]] == ["A", "B"]
    assert v["windows_best"] == ["A", "A", "A"]
    # A device nobody enrolled (the fourth axis) is "unknown device", with its ranked candidates,
    # and its LR is below the decision threshold: the verdict and its LR agree.
    u = identify_with_registry(_windows([0, 0, 0, 1], rng), reg, calibration=cal)
    assert u["device"] == UNKNOWN and u["candidate"] in {"A", "B", "C"} and len(u["top_k"]) == 3
    assert u["log10_lr"] < cal.log10_threshold and not u["open_set"]["accepted"]
    # Without a calibration for the condition: no device is named, the candidates are listed.
    n = identify_with_registry(_windows([0.9, 0.3, 0, 0], rng), reg, calibration=None)
    assert n["device"] == INCONCLUSIVE and n["candidate"] == "A" and n["log10_lr"] is None
    assert "log10_lr" not in n["top_k"][0] and not n["open_set"]["accepted"]
    # A decision threshold beyond the largest LR the calibration supports: nothing can be named or excluded.
    beyond = cal.with_decision(Decision(prior=1e-6))
    assert beyond.decision["beyond_bounds"] and beyond.log10_threshold > beyond.upper
    b = identify_with_registry(_windows([0.9, 0.3, 0, 0], rng), reg, calibration=beyond)
    assert b["device"] == INCONCLUSIVE and b["candidate"] == "A" and not b["open_set"]["decidable"]
    with pytest.raises(RegistryError, match="no enrolled devices"):
        identify_with_registry(_windows([1, 0, 0, 0], rng), open_registry(tmp_path / "e.json", create=True),
                               calibration=cal)


def by_rank(verdict: dict, name: str) -> dict:
    return next(t for t in verdict["top_k"] if t["device"] == name)


def test_profiles_judged_under_their_own_calibrations_are_ranked_by_lr(tmp_path: Path) -> None:
    """Profiles compared under different conditions (some references brought to the questioned
    recording's noise, others as they are) each have their own calibration: the candidates are ranked
    by LR, not by scores of different conditions, and the best one is decided under its own."""
    from dataclasses import replace

    from devrecd.openset.scoring import identify_vectors
    from devrecd.openset.vectors import unit

    rng = np.random.default_rng(0)
    reg = open_registry(tmp_path / "registry.json", create=True)
    for name, d in (("A", [1, 0, 0, 0]), ("B", [0, 1, 0, 0]), ("C", [0, 0, 1, 0])):
        reg.enroll(name, EMB, [(_ref(name), _windows(d, rng))])
    cal = _cal(rng)
    w = _windows([0.9, 0.5, 0, 0], rng)
    query, windows = unit(w.mean(axis=0)), unit(w)
    one = identify_vectors(query, windows, reg, calibration=cal, calibration_source="s")
    # One calibration per profile, all the same: the verdict of the one calibration, field for field.
    assert identify_vectors(query, windows, reg, calibration=[cal] * 3, calibration_source=["s"] * 3) == one
    assert one["device"] == "A" and one["top_k"][1]["device"] == "B"
    # A judged under a calibration that reads its score as weak evidence, B under one that reads its
    # lower score as strong evidence: B is named, with its LR and its calibration's source and hash.
    strict, lenient = replace(cal, offset=cal.offset - 40.0), replace(cal, offset=cal.offset + 40.0)
    v = identify_vectors(query, windows, reg, calibration=[strict, lenient, cal], calibration_source=["a", "b", "c"])
    assert v["device"] == "B" and v["log10_lr"] == lenient.upper and v["open_set"]["calibration_source"] == "b"
    assert v["open_set"]["calibration"] == lenient.fitted_sha256 != strict.fitted_sha256
    by_name = {t["device"]: t for t in v["top_k"]}
    assert by_name["A"]["score"] > by_name["B"]["score"] and by_name["A"]["log10_lr"] == strict.lower
    # Ranked by the unbounded LR: bounds differ between calibrations, and a candidate at a higher
    # lower bound does not outrank a better-scoring one at a lower bound.
    floor = replace(strict, lower=strict.lower + 0.3)
    r = identify_vectors(query, windows, reg, calibration=[strict, floor, strict], calibration_source=["a", "b", "c"])
    assert [t["device"] for t in r["top_k"]][:2] == ["A", "B"] and r["top_k"][0]["log10_lr"] < r["top_k"][1]["log10_lr"]
    # Nothing passes where each candidate's LR is below its own calibration's threshold.
    u = identify_vectors(query, windows, reg, calibration=[strict, strict, cal], calibration_source=["a", "b", "c"])
    assert u["device"] == UNKNOWN and u["log10_lr"] < cal.log10_threshold
    # A candidate whose calibration cannot decide (threshold beyond its bounds) is neither named nor
    # excluded: ranked first, it is passed over for the best-ranked one that passes its own ...
    never = replace(cal, offset=cal.offset + 80.0).with_decision(Decision(prior=1e-6), n_candidates=3)
    assert not never.decidable
    p = identify_vectors(query, windows, reg, calibration=[never, lenient, cal], calibration_source=["a", "b", "c"])
    assert p["top_k"][0]["device"] == "A" and p["device"] == p["candidate"] == "B" and p["open_set"]["accepted"]
    assert p["open_set"]["passed_over"] == ["A"] and p["open_set"]["undecided"] == ["A"]
    # ... and with none passing, the verdict excludes no one: "inconclusive", not "unknown device".
    unsure = replace(strict).with_decision(Decision(prior=1e-6), n_candidates=3)
    i = identify_vectors(query, windows, reg, calibration=[strict, unsure, cal], calibration_source=["a", "b", "c"])
    assert i["device"] == INCONCLUSIVE and i["open_set"]["undecided"] == ["B"] and not i["open_set"]["decidable"]
    assert "passed_over" not in i["open_set"] and "undecided" not in u["open_set"]
    # A decidable candidate rejected under its own calibration is not passed over for a weaker one
    # whose calibration's threshold is lower (thresholds differ under the far rule): nothing is named.
    s_a, s_b = (by_rank(one, n)["score"] for n in ("A", "B"))
    high_bar = replace(cal, slope=1.0, offset=1.0 - s_a, decision={**cal.decision, "log10_threshold": 1.5})  # A: LR 1.0
    low_bar = replace(cal, slope=1.0, offset=0.5 - s_b, decision={**cal.decision, "log10_threshold": 0.3})  # B: LR 0.5
    assert low_bar.decidable and high_bar.decidable
    h = identify_vectors(query, windows, reg, calibration=[high_bar, low_bar, strict], calibration_source=["a", "b", "c"])
    assert h["top_k"][0]["device"] == "A" and h["top_k"][0]["log10_lr"] == pytest.approx(1.0, abs=1e-3)
    assert by_rank(h, "B")["log10_lr"] >= low_bar.log10_threshold  # B would pass its own bar ...
    assert h["device"] == UNKNOWN and h["candidate"] == "A" and "passed_over" not in h["open_set"]  # ... yet A decides
    with pytest.raises(ValueError, match="2 calibrations"):
        identify_vectors(query, windows, reg, calibration=[cal, cal], calibration_source=["a", "b"])


# --- real phones: train a small embedder, enrol, identify, calibrate, CLI ---------------------

HELD_OUT = 2  # phones the embedder never sees (the last two of the first six, by name)


@pytest.fixture(scope="module")
def real_setup(ccnu_dir: Path, feature_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny ``asp`` embedder trained on 4 real phones (segments 1-3); 2 more phones held out of training."""
    from devrecd.config import load_config
    from devrecd.data import CCNU_SPLIT, load_dataset

    cfg = load_config(overrides={"audio.hop_seconds": 1.0, "train.threads": 2,
                                 "train.cache_dir": str(feature_cache_dir)})
    ds = load_dataset(ccnu_dir, split_by_group=CCNU_SPLIT, split_file=tmp_path_factory.mktemp("split") / "s.json")
    phones = list(ds.labels[:6])
    seen, unseen = phones[:-HELD_OUT], phones[-HELD_OUT:]
    embedder = _train_asp(ds, seen, cfg, tmp_path_factory.mktemp("run"), epochs=8, seed=0,
                          hparams={"hidden": 32, "attention": 16, "emb_dim": 32})
    return cfg, ds, phones, seen, unseen, embedder


def _train_asp(ds, devices, cfg, out: Path, *, epochs: int, seed: int, hparams: dict):
    """An ``asp`` embedder with the AAM loss through the one training loop (segments 1-3 of ``devices``)."""
    from devrecd.openset.embedder import Embedder
    from devrecd.train import train, train_options
    from devrecd.train_data import restrict_dataset

    opts = train_options(cfg.train, arch="asp", loss="aam", epochs=epochs, batch_size=32, lr=1e-3,
                         lr_step_epochs=epochs, patience=0, seed=seed, hop_seconds=1.0)
    train(restrict_dataset(ds, devices, splits=("train",)), out, cfg, opts, hparams=hparams)
    return Embedder.load(out)


def test_training_is_deterministic_and_embeddings_have_the_declared_shape(real_setup, tmp_path: Path) -> None:
    cfg, ds, phones, seen, unseen, embedder = real_setup
    hp = {"hidden": 8, "attention": 4, "emb_dim": 8}
    a = _train_asp(ds, seen[:2], cfg, tmp_path / "a", epochs=2, seed=1, hparams=hp)
    b = _train_asp(ds, seen[:2], cfg, tmp_path / "b", epochs=2, seed=1, hparams=hp)
    assert a.fingerprint == b.fingerprint  # same seed, same weights (CPU)
    feats = np.random.default_rng(0).normal(size=(6, 128, 73)).astype(np.float32)
    assert a.embed_features(feats).shape == (6, 8) and a.describe()["dim"] == 8
    assert embedder.fingerprint != a.fingerprint
    from devrecd.errors import ConfigError
    from devrecd.train import train, train_options
    from devrecd.train_data import restrict_dataset

    with pytest.raises(ConfigError, match="angular-margin"):
        train(restrict_dataset(ds, seen[:2], splits=("train",)), tmp_path / "c", cfg,
              train_options(cfg.train, arch="paper", loss="aam", epochs=1))


def test_enrol_unseen_phones_identify_and_reject_unenrolled(real_setup, tmp_path: Path) -> None:
    """Phones never seen in training are enrolled and recognised; a phone not enrolled is 'unknown'."""
    from devrecd.openset.registry import open_registry
    from devrecd.openset.workflow import calibrate_registry, enrol_files, score_recordings

    cfg, ds, phones, seen, unseen, embedder = real_setup
    left_out = unseen[-1]  # never seen in training AND not enrolled
    reg = open_registry(tmp_path / "registry.json", create=True)
    for phone in phones[:-1]:
        refs = [it.path for it in ds.subset("train") if it.device == phone]
        assert enrol_files(reg, embedder, phone, refs, cfg) == (3, 0)
    assert enrol_files(reg, embedder, phones[0], [ds.subset("train")[0].path], cfg) == (0, 1)  # same file again
    reg.save()
    reg = open_registry(reg.path)
    assert reg.names == sorted(phones[:-1]) and reg.embedder["fingerprint"] == embedder.fingerprint

    test = [(str(it.path), it.device) for it in ds.subset("test") if it.device in phones]
    trials = score_recordings(reg, embedder, test, cfg)
    # Rank-1 identification of the enrolled phones, including one the embedder never saw.
    best = [trials.profiles[int(i)] for i in trials.scores.argmax(axis=1)]
    known = [(b, d) for b, d in zip(best, trials.devices) if d != left_out]
    assert np.mean([b == d for b, d in known]) >= 0.8
    assert any(d == unseen[0] and b == d for b, d in known)
    # Target trials score higher than non-target ones on real recordings.
    assert trials.target_scores.mean() > trials.nontarget_scores.mean() + 0.2

    from devrecd.openset.calibration import Decision

    cals = calibrate_registry(reg, {"clean": trials}, decision=Decision())
    cal = cals["clean"]
    assert cal.metrics["n_target"] == len(known) and cal.basis == "case trials"  # an embedder has no development one
    assert cal.metrics["n_open_set"] == len(test) and reg.calibration_info["recordings"] == {"clean": len(test)}
    assert 0.0 <= cal.metrics["eer"] < 0.5 and cal.metrics["cllr_min"] <= cal.metrics["cllr"]
    assert 0.0 <= cal.metrics["open_set_far"] <= 1.0  # held-out: each recording's best LR over other devices
    # The verdict uses the calibration's LR and decision; the registry round-trips it.
    reg.save()
    from devrecd.openset.scoring import calibration_for, identify_with_registry

    back = open_registry(reg.path)
    path = next(p for p, d in test if d == unseen[0])
    _, windows = embedder.embed_file(path, cfg)
    v = identify_with_registry(windows, back, calibration=calibration_for(back, "clean")[0])
    assert v["candidate"] == unseen[0] and v["log10_lr"] is not None and len(v["windows_best"]) == len(windows)
    assert v["open_set"]["accepted"] == (v["log10_lr"] >= 0.0)


def test_embedder_refuses_a_network_without_embed(real_setup) -> None:
    import torch

    cfg = real_setup[0]
    from devrecd.openset.embedder import Embedder

    with pytest.raises(ArtifactError, match="no embed"):
        Embedder(torch.nn.Linear(73, 2), arch="linear", hparams={}, frontend=cfg.frontend,
                 norm_mean=np.zeros(73), norm_std=np.ones(73))


def test_devices_cli_list_show_remove(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from devrecd.cli import app

    rng = np.random.default_rng(0)
    path = tmp_path / "registry.json"
    reg = open_registry(path, create=True)
    reg.enroll("phone A", EMB, [(_ref("1"), _windows([1, 0, 0, 0], rng))])
    reg.enroll("phone B", EMB, [(_ref("2"), _windows([0, 1, 0, 0], rng)), (_ref("3"), _windows([0, 1, 0, 0], rng))])
    reg.save()
    run = CliRunner().invoke
    out = run(app, ["devices", "--registry", str(path)])
    assert out.exit_code == 0 and "2 device(s)" in out.output and "phone B" in out.output
    out = run(app, ["devices", "show", "phone B", "--registry", str(path), "--format", "json"])
    assert out.exit_code == 0 and json.loads(out.output)["n_references"] == 2
    out = run(app, ["devices", "remove", "phone A", "--registry", str(path)])
    assert out.exit_code == 0 and open_registry(path).names == ["phone B"]
    out = run(app, ["devices", "show", "phone A", "--registry", str(path)])
    assert out.exit_code == 1 and "no device 'phone A'" in out.output
    out = run(app, ["devices", "list"], env={"DEVRECD_REGISTRY__PATH": ""})
    assert out.exit_code == 2 and "no registry" in out.output  # a missing option: a usage error


def test_a_threshold_outside_the_bounds_decides_nothing_and_serving_keeps_the_fitted_far() -> None:
    rng = np.random.default_rng(11)
    fit, tar, non, gt, gn = _trials(rng, 200, 2000)
    cal = fit(tar, non, gt, gn)
    # A prior so strong that the threshold lies below the lower bound: every LR would pass; no decision.
    low = cal.with_decision(Decision(prior=0.9999))
    assert low.log10_threshold < low.lower and not low.decidable and not low.accepts(low.upper)
    # Serving the far rule again (as calibration_for does) gives the threshold it was fitted with, on the
    # stored held-out open-set LRs, and measures its error rates again; it cites the stored calibration.
    far = fit(tar, non, gt, gn, decision=Decision(rule="far", far=0.05))
    again = far.with_decision(Decision(rule="far", far=0.05))
    assert again.log10_threshold == far.log10_threshold and again.metrics["open_set_far"] <= 0.05
    assert again.fitted_sha256 == far.sha256 != again.sha256
    bayes = cal.with_decision(Decision(), n_candidates=25)
    held = np.array(cal.heldout_log10_lrs)
    assert bayes.metrics["frr"] == pytest.approx(np.mean(np.round(held[:200], 4) < bayes.log10_threshold))


def test_the_regularised_case_map_lies_between_the_development_and_the_case_maps() -> None:
    """A case set worth PRIOR_TRIALS trials, from a shifted population: the regularised map's LR at
    the case targets' mean lies between the development map's and the case-only map's."""
    from devrecd.openset.calibration import PRIOR_TRIALS

    rng = np.random.default_rng(12)
    fit, tar, non, gt, gn = _trials(rng, 400, 4000)
    dev = fit(tar, non, gt, gn)
    n = int(PRIOR_TRIALS // 2)
    ctar, cnon = rng.normal(0.9, 0.1, n), rng.normal(0.5, 0.15, n)
    alone = fit_trial_blocks(ctar, cnon, np.arange(n), n + np.arange(n))
    held = fit_trial_blocks(ctar, cnon, np.arange(n), n + np.arange(n), prior=dev)
    for x in (ctar.mean(), cnon.mean()):
        a, b, m = dev.log10_lr(x)[1], alone.log10_lr(x)[1], held.log10_lr(x)[1]
        assert min(a, b) - 1e-9 <= m <= max(a, b) + 1e-9, (x, a, b, m)


def _edit(meta: dict, dotted: str, value: object) -> None:
    """Set (or with value ``...``, delete) ``a.b[0].c`` in a registry JSON."""
    import re

    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", dotted)]
    target = meta
    for k in keys[:-1]:
        target = target[k]
    if value is ...:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


HAND_EDITS = [  # (field, value, what the one-line refusal says)
    ("profiles.0.name", 123, r"profiles\[0\]\.name must be a string, got int 123"),
    ("calibrations.clean.threshold", "0.5", r"calibrations\.clean\.threshold must be a number, got str"),
    ("calibrations.clean.slope", None, r"calibrations\.clean\.slope must be a number, got NoneType null"),
    ("calibrations", [1, 2], r"calibrations must be an object of condition -> calibration, got list"),
    ("calibrations.clean.decision.n_candidates", 2.5, r"calibrations\.clean\.decision\.n_candidates must be an integer"),
    ("calibrations.clean.upper", float("nan"), r"calibrations\.clean\.upper must be a finite number, got nan"),
    ("calibrations.clean.threshold", -1e308, r"calibrations\.clean\.threshold must be in \[-1, 1\]"),
    ("calibrations.clean.decision.prior", 3.0, r"calibrations\.clean\.decision\.prior must be in \(0, 1\), got 3\.0"),
    ("calibrations.clean.decision.rule", "llr0", r"calibrations\.clean\.decision\.rule must be one of bayes, far"),
    ("arrays.sha256", ..., r"arrays\.sha256 is missing"),
    ("arrays.file", "../../../etc/passwd", r"arrays\.file must name a file beside the registry JSON"),
    ("profiles.0.references.0.windows", -4, r"profiles\[0\]\.references\[0\]\.windows must be in \[1, inf\)"),
    ("profiles.1.name", "A", r"profiles\[1\]\.name \"A\" is also profiles\[0\]\.name: device names must be unique"),
]


@pytest.mark.parametrize("field,value,message", HAND_EDITS, ids=[f"{f}={v!r}" for f, v, _ in HAND_EDITS])
def test_a_hand_edited_registry_is_refused_in_one_line_naming_the_field(tmp_path: Path, field: str, value: object,
                                                                        message: str) -> None:
    """The JSON is checked against its schema at load: a refusal naming the field, never a traceback, an
    internal failure per file or a silently changed decision (content_sha256 checked after an edit that
    keeps the schema, and recorded by every verdict)."""
    from devrecd.openset.registry import content_hash

    rng = np.random.default_rng(0)
    path = tmp_path / "registry.json"
    reg = open_registry(path, create=True)
    reg.enroll("A", EMB, [(_ref("1"), _windows([1, 0, 0, 0], rng))])
    reg.enroll("B", EMB, [(_ref("2"), _windows([0, 1, 0, 0], rng))])
    reg.set_calibrations({"clean": _cal(rng)}, {})
    reg.save()
    meta = json.loads(path.read_text())
    assert meta["content_sha256"] == content_hash(meta) == open_registry(path).content_sha256
    _edit(meta, field, value)
    path.write_text(json.dumps(meta))  # content_sha256 no longer matches: refused as changed outside devrecd
    with pytest.raises(ArtifactError, match="changed outside devrecd") as err:
        open_registry(path)
    assert "\n" not in str(err.value)
    del meta["content_sha256"]  # as an earlier devrecd wrote it: the schema alone refuses it
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message) as err:
        open_registry(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_registry_nested_too_deeply_or_re_hashed_by_hand_is_refused(tmp_path: Path) -> None:
    from devrecd.openset.registry import content_hash

    path = tmp_path / "registry.json"
    path.write_text('{"format": "devrecd-registry/1", "profiles": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ArtifactError, match="nested too deeply"):
        open_registry(path)
    from devrecd.openset.registry import Registry

    rng = np.random.default_rng(0)
    reg = Registry(path=path)
    reg.enroll("A", EMB, [(_ref("1"), _windows([1, 0, 0, 0], rng))])
    reg.save()
    meta = json.loads(path.read_text())
    meta["profiles"] += [dict(meta["profiles"][0]), dict(meta["profiles"][0])]
    meta["content_sha256"] = content_hash(meta)  # a consistent hash does not make three "A" acceptable
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"profiles\[1\]\.name \"A\" is also profiles\[0\]\.name: device names must be unique \(and 1 more"):
        open_registry(path)
