"""Score -> calibrated, bounded log10 likelihood ratio, and the validity figures of the calibration.

Propositions (source level): Hp "the questioned recording was made with the reference device",
Hd "it was made with another device of the relevant population". A *trial* is one (recording,
device) pair of development data with a score; same device = target (Hp true), else non-target.

Recipe (NFI's ``lir`` does the maths):

1. Logistic-regression calibration (``lir``'s ``LogitCalibrator``, classes weighted equally, so
   the log-odds are log LRs independent of how many trials of each kind there were):
   ``log10 LR = slope * score + offset``. Two parameters are well determined by a few hundred
   trials; KDE needs a bandwidth and isotonic (PAV) a step function with LRs of 0 and infinity
   where the data run out, neither defensible at these trial counts.
2. Held-out LRs: k-fold cross-validation grouped by recording (all trials of a recording in one
   fold), so every development trial gets an LR from a calibrator that did not see it. The
   Tippett plot, Cllr and the rates of misleading evidence are measured on these.
3. Bounds: the empirical lower and upper bound (ELUB, Vergeer et al., Science & Justice 56, 2016;
   ``lir.algorithms.bayeserror.elub``) of the held-out LRs. They can never exceed what the trial
   counts support (upper <= log10(n_nontarget + 1), lower >= -log10(n_target + 1)): no LR of 1e12
   from 40 trials. Every reported LR is clipped to them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from devrecd import __version__
from devrecd.errors import ArtifactError, MissingDependency
from devrecd.openset.calibration import CalibrationError, eer, min_dcf

FORMAT = "devrecd-lr-calibration/1"
FOLDS = 5  # cross-validation folds (by recording) for the held-out LRs
HP = "the questioned recording was made with the reference device"
HD = "the questioned recording was made with another device of the relevant population"
METHOD = "logistic regression (lir LogitCalibrator), ELUB bounds (lir) on 5-fold held-out LRs"


def _lir():
    """Import ``lir`` lazily (a report/comparison dependency, never a serving one)."""
    try:
        from lir.algorithms.bayeserror import elub
        from lir.algorithms.logistic_regression import LogitCalibrator
        from lir.data.models import LLRData
        from lir.metrics import cllr, cllr_min
    except ImportError as exc:
        raise MissingDependency(f"likelihood ratios need NFI's lir package ({exc}): pip install 'devrecd[report]'") from None
    return LogitCalibrator, elub, LLRData, cllr, cllr_min


def fit_logistic(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(slope, offset)`` of ``log10 LR = slope * score + offset`` fitted by lir's LogitCalibrator."""
    LogitCalibrator, *_ = _lir()
    # Nearly unregularised: sklearn's default C=1 would shrink the slope of scores in [-1, 1].
    cal = LogitCalibrator(C=1e6, max_iter=1000).fit(np.asarray(scores, np.float64), np.asarray(labels, int))
    ln10 = math.log(10.0)
    return float(cal._logit.coef_[0, 0]) / ln10, float(cal._logit.intercept_[0]) / ln10


def cllr_bits(log10_lrs: np.ndarray, labels: np.ndarray) -> float:
    """Cllr (bits) of log10 LRs (lir.metrics.cllr)."""
    _, _, LLRData, cllr, _ = _lir()
    return float(cllr(LLRData(features=np.asarray(log10_lrs, np.float64), labels=np.asarray(labels, int))))


def cllr_min_bits(scores: np.ndarray, labels: np.ndarray) -> float:
    """Cllr after the best monotone (PAV) calibration: discrimination alone (lir.metrics.cllr_min)."""
    _, _, LLRData, _, cllr_min = _lir()
    return float(cllr_min(LLRData(features=np.asarray(scores, np.float64), labels=np.asarray(labels, int))))


def elub_bounds(log10_lrs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """ELUB (lower, upper) log10 bounds of these LRs (lir.algorithms.bayeserror.elub)."""
    _, elub, *_ = _lir()
    lo, hi = elub(np.array(log10_lrs, dtype=np.float64, copy=True), np.asarray(labels, int), add_misleading=1)
    return float(lo), float(hi)


def heldout_llrs(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Every trial's log10 LR from a calibrator fitted on the other folds (folds by ``groups``)."""
    uniq = np.unique(groups)
    k = min(folds, uniq.size)
    if k < 2:
        raise CalibrationError("held-out LRs need trials of at least two recordings")
    fold_of = {g: i % k for i, g in enumerate(uniq)}
    fold = np.array([fold_of[g] for g in groups])
    out = np.empty(scores.size, dtype=np.float64)
    for f in range(k):
        train = fold != f
        if labels[train].min() == labels[train].max():
            raise CalibrationError(f"fold {f + 1} of {k} leaves no target or no non-target trial to fit on; "
                                   "more calibration recordings are needed")
        slope, offset = fit_logistic(scores[train], labels[train])
        out[~train] = slope * scores[~train] + offset
    return out


def validity(scores: np.ndarray, labels: np.ndarray, log10_lrs: np.ndarray) -> dict[str, Any]:
    """The figures a report shows: trial counts, EER, minDCF, Cllr (raw, calibrated, min), misleading rates."""
    tar, non = scores[labels == 1], scores[labels == 0]
    ltar, lnon = log10_lrs[labels == 1], log10_lrs[labels == 0]
    c = cllr_bits(log10_lrs, labels)
    cmin = cllr_min_bits(scores, labels)
    return {
        "n_target": int(tar.size), "n_nontarget": int(non.size),
        "eer": eer(tar, non), "min_dcf": min_dcf(tar, non), "min_dcf_p_target": 0.01,
        "cllr": c, "cllr_min": cmin, "cllr_cal": c - cmin,
        "cllr_raw_scores": cllr_bits(scores, labels),  # the scores taken as log10 LRs, uncalibrated
        "misleading_hp": int(np.sum(ltar < 0)), "misleading_hp_rate": float(np.mean(ltar < 0)),
        "misleading_hd": int(np.sum(lnon > 0)), "misleading_hd_rate": float(np.mean(lnon > 0)),
    }


def describe_conditions(recordings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Recording conditions of a set of recordings (from ``Recording.describe()``-like dicts)."""
    durations = [float(r["duration"]) for r in recordings if r.get("duration") is not None]
    return {
        "native_rates": sorted({int(r["native_rate"]) for r in recordings if r.get("native_rate")}),
        "codecs": sorted({str(r["codec"]) for r in recordings if r.get("codec")}),
        "containers": sorted({str(r["container"]) for r in recordings if r.get("container")}),
        "duration_min": round(min(durations), 3) if durations else None,
        "duration_max": round(max(durations), 3) if durations else None,
        "recordings": len(recordings),
        # The comparison condition measured on each recording (codec, band: devrecd.audio.condition).
        "channels": sorted({comparison_channel(r["condition"]) for r in recordings if r.get("condition")}),
    }


def comparison_channel(condition: dict[str, Any]) -> str:
    """The comparison condition of a recording's measured condition: ``clean`` (broadband, compared
    as it is), the channel it went through (``amrnb``, ``tel``, ``band300-3400``...), or ``unknown``."""
    from devrecd.openset.matching import CLEAN, questioned_channel

    try:
        channel = questioned_channel(condition)
    except ValueError:
        return "unknown"
    return CLEAN if channel is None else channel.name


def condition_mismatch(recording: dict[str, Any], conditions: dict[str, Any]) -> tuple[list[str], list[str]]:
    """How a recording differs from the calibration conditions: ``(blocking, warnings)``.

    A native rate, codec or measured comparison condition (band limit, lossy channel) the
    calibration never saw blocks the LR (device traces do not survive a change of channel: the
    calibration says nothing about it); a duration outside the calibrated
    range is a warning (the score is still of the same kind, its spread is not).
    """
    blocking, warnings = [], []
    rate, codec, dur = recording.get("native_rate"), recording.get("codec"), recording.get("duration")
    if rate and conditions.get("native_rates") and int(rate) not in conditions["native_rates"]:
        blocking.append(f"native rate {rate} Hz not in the calibration's {conditions['native_rates']}")
    if codec and conditions.get("codecs") and codec not in conditions["codecs"]:
        blocking.append(f"codec {codec} not in the calibration's {conditions['codecs']}")
    if recording.get("condition") and conditions.get("channels"):
        # A band limit survives re-packaging (an AMR call saved as a 32 kHz WAV): the measured
        # condition, not the header, says whether the calibration covers the recording.
        channel = comparison_channel(recording["condition"])
        if channel not in conditions["channels"]:
            blocking.append(f"measured condition {channel} not in the calibration's {conditions['channels']}")
    lo, hi = conditions.get("duration_min"), conditions.get("duration_max")
    if dur is not None and lo is not None and hi is not None and not lo <= float(dur) <= hi:
        warnings.append(f"duration {float(dur):.1f} s outside the calibration's {lo:.1f}-{hi:.1f} s")
    return blocking, warnings


@dataclass(frozen=True)
class LRCalibration:
    """A fitted score -> log10 LR map with its bounds, data, population and validity figures."""

    slope: float  # log10 LR = slope * score + offset
    offset: float
    lower: float  # ELUB bounds on log10 LR
    upper: float
    scorer: dict[str, Any]  # identity of the scorer whose scores this calibrates (kind, fingerprint, ...)
    population: dict[str, Any]  # the relevant population: devices, recordings, data set, selection
    conditions: dict[str, Any]  # recording conditions of the calibration recordings
    metrics: dict[str, Any]  # validity(): on held-out, bounded LRs
    scores: list[float] = field(default_factory=list)  # every development trial's score ...
    labels: list[int] = field(default_factory=list)  # ... 1 = same device (Hp), 0 = different (Hd)
    heldout_log10_lrs: list[float] = field(default_factory=list)  # ... its held-out, bounded log10 LR
    method: str = METHOD
    hp: str = HP
    hd: str = HD
    fitted_at: str = ""
    software_version: str = __version__
    format: str = FORMAT

    def log10_lr(self, score: float) -> tuple[float, float]:
        """``(bounded, unbounded)`` log10 LR of a score."""
        raw = self.slope * float(score) + self.offset
        return float(min(max(raw, self.lower), self.upper)), float(raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sha256(self) -> str:
        """Content hash (canonical JSON): what a comparison or report cites."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Everything but the per-trial arrays, with the hash."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("scores", "labels", "heldout_log10_lrs")}
        return {**d, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRCalibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"not an LR calibration (format {FORMAT!r} expected)")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ArtifactError(f"LR calibration is malformed: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        from devrecd.fsutil import atomic_write

        return atomic_write(path, json.dumps(self.to_dict(), indent=1))


def load_lr_calibration(path: str | os.PathLike) -> LRCalibration:
    """Read an LR calibration JSON file (``devrecd calibrate`` writes one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"LR calibration {path} is unreadable: {exc}") from None
    return LRCalibration.from_dict(data)


def fit_lr_calibration(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, scorer: dict[str, Any],
                       population: dict[str, Any], conditions: dict[str, Any], folds: int = FOLDS) -> LRCalibration:
    """Fit, bound and validate an LR calibration on development trials (see the module docstring).

    ``groups``: the recording each trial belongs to (its trials stay in one cross-validation fold).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=int).ravel()
    g = np.asarray(groups).ravel()
    if not (s.size == y.size == g.size):
        raise CalibrationError(f"scores, labels and groups differ in length ({s.size}, {y.size}, {g.size})")
    if not np.isfinite(s).all():
        raise CalibrationError("scores must be finite")
    n_tar, n_non = int(np.sum(y == 1)), int(np.sum(y == 0))
    if n_tar < 2 or n_non < 2:
        raise CalibrationError(f"an LR calibration needs at least 2 target and 2 non-target trials (got {n_tar} and {n_non})")
    held = heldout_llrs(s, y, g, folds)
    lower, upper = (round(b, 4) for b in elub_bounds(held, y))
    held_b = np.clip(held, lower, upper)
    slope, offset = fit_logistic(s, y)
    return LRCalibration(
        slope=slope, offset=offset, lower=lower, upper=upper, scorer=dict(scorer), population=dict(population),
        conditions=dict(conditions), metrics={**validity(s, y, held_b), "folds": int(min(folds, np.unique(g).size))},
        scores=[round(float(v), 6) for v in s], labels=[int(v) for v in y],
        heldout_log10_lrs=[round(float(v), 6) for v in held_b],
        fitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def assess(cal: LRCalibration | None, score: float, recording: dict[str, Any], scorer: dict[str, Any]) -> dict[str, Any]:
    """The LR part of a comparison: bounded log10 LR, LR, verbal equivalent, or why none is given."""
    from devrecd.forensic.verbal import verbal

    if cal is None:
        return {"log10_lr": None, "lr": None, "verbal": None,
                "lr_withheld": "no calibration: run `devrecd calibrate` (an uncalibrated score is not an LR)"}
    if cal.scorer.get("fingerprint") != scorer.get("fingerprint"):
        return {"log10_lr": None, "lr": None, "verbal": None,
                "lr_withheld": f"the calibration was fitted on scores of another scorer "
                               f"({str(cal.scorer.get('fingerprint'))[:12]}, this one {str(scorer.get('fingerprint'))[:12]})"}
    blocking, warnings = condition_mismatch(recording, cal.conditions)
    if blocking:
        return {"log10_lr": None, "lr": None, "verbal": None, "condition_warnings": warnings,
                "lr_withheld": "recording condition outside the calibration: " + "; ".join(blocking)}
    bounded, raw = cal.log10_lr(score)
    return {"log10_lr": round(bounded, 4), "log10_lr_unbounded": round(raw, 4), "lr": float(f"{10 ** bounded:.4g}"),
            "bounded": bool(bounded != raw), "bounds": [cal.lower, cal.upper], "verbal": verbal(bounded),
            "condition_warnings": warnings, "lr_withheld": None}


def fit_from_trials(trials: Any, scorer: dict[str, Any], *, source: dict[str, Any] | None = None,
                    folds: int = FOLDS) -> LRCalibration:
    """An LR calibration from :class:`devrecd.openset.workflow.Trials` (every recording against every
    enrolled device); the relevant population is described from the trials themselves."""
    is_target = trials.is_target
    groups = np.repeat(np.arange(len(trials.recordings)), len(trials.profiles))
    in_trials = sorted(set(trials.devices))
    unenrolled = sorted(set(in_trials) - set(trials.profiles))
    population = {
        "description": (f"{len(trials.recordings)} recordings of {len(in_trials)} devices scored against "
                        f"{len(trials.profiles)} enrolled devices"
                        + (f" ({len(unenrolled)} of them not enrolled: different-source trials only)" if unenrolled else "")),
        "enrolled_devices": list(trials.profiles), "trial_devices": in_trials, "unenrolled_devices": unenrolled,
        "recordings": len(trials.recordings), **(source or {}),
    }
    return fit_lr_calibration(trials.scores.ravel(), is_target.ravel().astype(int), groups, scorer=scorer,
                              population=population, conditions=describe_conditions(trials.conditions), folds=folds)
