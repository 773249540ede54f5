"""The one calibration of a score into a likelihood ratio, the decision taken from it, and the
figures forensic practice reports (EER, minDCF, Cllr).

Conventions (fixed here so that every figure is comparable):

* A *trial* is one (questioned recording, enrolled device) pair with a score; it is a *target*
  trial when the recording was made by that device. Higher scores mean "more likely the same device".
* Likelihood ratios are **log10** everywhere (verdicts, ``compare``, the report):
  ``log10 LR = slope * score + offset``, fitted by logistic regression with the classes weighted
  equally (so the log-odds are log LRs whatever the trial counts), and BOUNDED to the empirical
  lower and upper bounds (ELUB, Vergeer et al., Science & Justice 56, 2016) of held-out LRs: never
  an LR the trial counts cannot support.
* The decision follows from the LR (:class:`Decision`): accept the best candidate when its bounded
  LR reaches the Bayes threshold ``(C_fa / C_miss) * (1 - P) / P`` of a stated prior and costs; an
  open-set false-acceptance-rate quantile is an explicit alternative rule, expressed as an LR
  threshold too. A verdict and its LR therefore cannot disagree.
* FAR (false acceptance rate) is the fraction of non-target trials accepted, FRR the fraction of
  targets rejected. minDCF uses the NIST SRE operating point unless told otherwise
  (``P_target = 0.01``, ``C_miss = C_fa = 1``), normalised so that 1.0 = no better than always rejecting.
* Cllr (Brummer & du Preez 2006) is in bits: 0 is perfect, 1 is a system that always says LR = 1.

The figures and the fits the calibration is made of (logistic regression, ELUB bounds) are
:mod:`devrecd.openset.measures`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from devrecd import __version__
from devrecd.errors import ArtifactError
from devrecd.openset.measures import (
    LN10,
    P_TARGET,
    CalibrationError,
    cllr,
    cllr_min,
    eer,
    elub_bounds,
    fit_balanced,
    min_dcf,
    threshold_for_far,
)

DECISION_RULES = ("bayes", "far")


@dataclass(frozen=True)
class Decision:
    """How a verdict follows from the best candidate's LR (``[registry]`` ``decision``, ``prior``,
    ``cost_miss``, ``cost_false_alarm``, ``target_far``).

    ``bayes`` (default): ``prior`` is the probability that ONE OF the N enrolled devices made the
    questioned recording, shared equally, so that a candidate's prior is ``p = prior / N``; the
    candidate is named when ``LR >= (C_fa / C_miss) * (1 - p) / p`` (Bayes decision for "this device
    or not"). With the defaults (prior 0.5, equal costs) that is LR >= 2N - 1: LR >= 1 for a single
    reference device, LR >= 49 with 25 enrolled (each enrolled device is one more chance for an
    unknown phone to look like one). The prior and costs belong to the court; the examiner states
    the ones used. ``far``: the LR at the score whose open-set false-acceptance rate on the
    calibration's impostors is ``far`` (explicit option; a quantile of a few hundred impostors is
    noisy)."""

    rule: str = "bayes"
    prior: float = 0.5
    cost_miss: float = 1.0
    cost_false_alarm: float = 1.0
    far: float = 0.01

    def __post_init__(self) -> None:
        if self.rule not in DECISION_RULES:
            raise CalibrationError(f"decision rule must be one of {', '.join(DECISION_RULES)}, not {self.rule!r}")
        if not (0.0 < self.prior < 1.0 and self.cost_miss > 0 and self.cost_false_alarm > 0 and 0.0 <= self.far < 1.0):
            raise CalibrationError("decision: need 0 < prior < 1, costs > 0 and 0 <= far < 1")

    def bayes_log10_threshold(self, n_candidates: int = 1) -> float:
        """log10 of the LR a candidate needs among ``n_candidates`` enrolled devices."""
        p = self.prior / max(1, int(n_candidates))
        return math.log10(self.cost_false_alarm / self.cost_miss * (1.0 - p) / p)

    def describe(self, n_candidates: int | None = None) -> str:
        if self.rule == "far":
            return f"open-set FAR {self.far:g} on the calibration's impostors"
        n = "N" if n_candidates is None else str(n_candidates)
        return (f"Bayes decision: prior {self.prior:g} that one of the {n} enrolled devices made the recording, "
                f"C_miss {self.cost_miss:g}, C_fa {self.cost_false_alarm:g}"
                + (f" (accept when log10 LR >= {self.bayes_log10_threshold(n_candidates):+.3f})"
                   if n_candidates is not None else ""))

    @classmethod
    def from_config(cls, registry_cfg: Any) -> Decision:
        return cls(rule=registry_cfg.decision, prior=registry_cfg.prior, cost_miss=registry_cfg.cost_miss,
                   cost_false_alarm=registry_cfg.cost_false_alarm, far=registry_cfg.target_far)


# --- the calibration ---------------------------------------------------------------------------

FORMAT = "devrecd-calibration/2"
FOLDS = 5  # cross-validation folds (by recording) of the held-out LRs
PRIOR_TRIALS = 100.0  # weight of a development calibration when a case calibration is fitted toward it
HP = "the questioned recording was made with the reference device"
HD = "the questioned recording was made with another device of the relevant population"
METHOD = ("logistic regression (classes weighted equally), ELUB bounds on held-out LRs "
          f"({FOLDS}-fold by recording)")


@dataclass(frozen=True)
class Calibration:
    """A fitted score -> bounded log10 LR map, the decision taken from it, and what it was fitted on.

    The one calibration of the product: verdicts (``log10_lr``, ``decision``), ``devrecd compare``
    and the case report all read it; a scorer's development calibrations and a registry's case
    calibrations are of this class, one per comparison condition.
    """

    slope: float  # log10 LR = slope * score + offset
    offset: float
    lower: float  # ELUB bounds on log10 LR
    upper: float
    decision: dict[str, Any]  # Decision fields, n_candidates, "log10_threshold" (bounded LR at or above it: accept)
    threshold: float  # the raw score where the decision flips (shown; decisions use the LR)
    metrics: dict[str, Any]  # held-out: counts, EER, minDCF, Cllr, Cllr_min, misleading rates, FAR/FRR
    conditions: dict[str, Any] = field(default_factory=dict)  # channels, durations, SNRs, codecs of the trials
    population: dict[str, Any] = field(default_factory=dict)  # the relevant population (devices, recordings)
    scorer: dict[str, Any] = field(default_factory=dict)  # identity of the scorer (kind, fingerprint)
    basis: str = ""  # "development, cross-fitted ..." | "case trials ..." | "case trials, regularised toward ..."
    scores: list[float] = field(default_factory=list)  # every trial's score ...
    labels: list[int] = field(default_factory=list)  # ... 1 = same device (Hp), 0 = different (Hd)
    heldout_log10_lrs: list[float] = field(default_factory=list)  # ... its held-out, bounded log10 LR
    # Per questioned recording, its best held-out bounded LR over the devices that did not make it: what
    # it scores when its own device is not enrolled (the far rule's basis, the open-set FAR).
    open_set_log10_lrs: list[float] = field(default_factory=list)
    method: str = METHOD
    hp: str = HP
    hd: str = HD
    fitted_at: str = ""
    software_version: str = __version__
    format: str = FORMAT

    def log10_lr(self, score: float | np.ndarray) -> tuple[Any, Any]:
        """``(bounded, unbounded)`` log10 LR of a score (or of an array of scores)."""
        raw = self.slope * np.asarray(score, dtype=np.float64) + self.offset
        bounded = np.clip(raw, self.lower, self.upper)
        return (float(bounded), float(raw)) if np.ndim(raw) == 0 else (bounded, raw)

    @property
    def log10_threshold(self) -> float:
        return float(self.decision["log10_threshold"])

    @property
    def decidable(self) -> bool:
        """False when the decision threshold lies outside the bounds: no LR the data support can
        cross it (above the upper bound), or every one does (below the lower bound)."""
        return not self.decision.get("beyond_bounds", False)

    def accepts(self, bounded_log10_lr: float) -> bool:
        """The decision on the LR as reported (:data:`LR_DECIMALS` decimals): it reaches the
        threshold, and the threshold lies within the bounds."""
        return self.decidable and bool(round(float(bounded_log10_lr), LR_DECIMALS) >= self.log10_threshold)

    def with_decision(self, decision: Decision, n_candidates: int = 1) -> Calibration:
        """The same LR map under another decision rule, for ``n_candidates`` enrolled devices, with the
        decision's held-out error rates measured again. The decision cites the calibration as fitted
        (``decision.fitted_sha256``), the hash of the stored file."""
        fitted = self.decision.get("fitted_sha256") or self.sha256
        fields = _decision_fields(decision, self.slope, self.offset, self.lower, self.upper,
                                  np.asarray(self.open_set_log10_lrs, np.float64), n_candidates)
        fields["decision"]["fitted_sha256"] = fitted
        metrics = {**self.metrics, **_decision_metrics(fields["decision"]["log10_threshold"],
                                                       np.asarray(self.heldout_log10_lrs), np.asarray(self.labels),
                                                       np.asarray(self.open_set_log10_lrs))}
        return replace(self, metrics=metrics, **fields)

    @property
    def fitted_sha256(self) -> str:
        """The hash of the calibration as fitted and stored (before a serving-time decision)."""
        return self.decision.get("fitted_sha256") or self.sha256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sha256(self) -> str:
        """Content hash (canonical JSON): what a verdict, a comparison or a report cites."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Everything but the per-trial arrays, with the hash."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in ("scores", "labels", "heldout_log10_lrs", "open_set_log10_lrs")}
        return {**d, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """From :meth:`to_dict` (a registry's, a scorer file's, ``lr-calibration.json``); ArtifactError otherwise."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ArtifactError(f"not a devrecd calibration (format {FORMAT!r} expected, found {found!r}): "
                                "calibrations made before version 2 must be fitted again (`devrecd calibrate`)",
                                reason="calibration_format")
        known = set(cls.__dataclass_fields__)
        try:
            cal = cls(**{k: v for k, v in data.items() if k in known})
            numbers = [float(cal.slope), float(cal.offset), float(cal.lower), float(cal.upper),
                       float(cal.threshold), float(cal.decision["log10_threshold"])]
        except (TypeError, KeyError, ValueError) as exc:
            raise ArtifactError(f"calibration is malformed: {exc}", reason="calibration_format") from None
        if not all(math.isfinite(v) for v in numbers) or not cal.lower <= 0.0 <= cal.upper or cal.slope <= 0:
            raise ArtifactError("calibration is malformed: non-finite numbers, bounds that do not enclose 0, or a "
                                "non-positive slope", reason="calibration_format")
        return cal

    def save(self, path: Any) -> Any:
        from devrecd.fsutil import atomic_write

        return atomic_write(path, json.dumps(self.to_dict(), indent=1))


def load_calibration(path: Any) -> Calibration:
    """Read a calibration JSON file (``devrecd calibrate`` writes ``lr-calibration.json``)."""
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"calibration {path} is unreadable: {exc}", reason="calibration_format") from None
    return Calibration.from_dict(data)


def _fit(tar: np.ndarray, non: np.ndarray, prior: Calibration | None) -> tuple[float, float]:
    """``(slope, offset)`` of log10 LR on these trials (toward ``prior``'s map when given).

    The scores are centred on the middle of the two class means first, so that slope and offset are
    nearly uncorrelated and the prior pulls each toward the development map independently (on raw
    scores in [0, 1] the two are so correlated that the regularised map could land outside both)."""
    mid = 0.5 * (float(np.mean(tar)) + float(np.mean(non)))
    centre = None if prior is None else (
        np.array([prior.slope * LN10, (prior.offset + prior.slope * mid) * LN10]), PRIOR_TRIALS)
    coef, intercept = fit_balanced(tar[:, None] - mid, non[:, None] - mid, prior=centre)
    slope = float(coef[0]) / LN10
    return slope, float(intercept) / LN10 - slope * mid


def _bounding_trials(held: np.ndarray, labels: np.ndarray, prior: Calibration | None, slope: float,
                     offset: float) -> tuple[np.ndarray, np.ndarray]:
    """The held-out LRs and labels the ELUB bounds are taken on: the trials' own, and, when the map
    was regularised toward ``prior`` (a development calibration), the development trials too.

    A map that stands on the development trials and the case trials together is bounded by both:
    the development trials' held-out LRs, moved by what the case trials changed in the map at their
    scores (``new(s) - dev(s)``), beside the case trials' held-out LRs. Few case trials then cannot
    shrink the bounds below what the development trials support (16 case trials bound the LR at
    log10(13) at most, under the Bayes threshold of a 7-device registry); misleading case trials
    still pull them in, and many case trials dominate them, as they dominate the map."""
    if prior is None or not prior.labels:
        return held, labels
    dev_scores = np.asarray(prior.scores, np.float64)
    moved = np.asarray(prior.heldout_log10_lrs, np.float64) + (slope - prior.slope) * dev_scores + (offset - prior.offset)
    return np.concatenate([held, moved]), np.concatenate([labels, np.asarray(prior.labels, int)])


def heldout_log10_lrs(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, folds: int = FOLDS,
                      prior: Calibration | None = None) -> np.ndarray:
    """Every trial's log10 LR from a calibration fitted on the other folds (folds by ``groups``)."""
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
        slope, offset = _fit(scores[train & (labels == 1)], scores[train & (labels == 0)], prior)
        out[~train] = slope * scores[~train] + offset
    return out


LR_DECIMALS = 4  # log10 LRs are reported, and decided, at this precision


def _on_grid(t: float) -> float:
    """``t`` rounded UP onto the reported LRs' grid: an LR as reported passes iff it is >= this."""
    step = 10.0 ** -LR_DECIMALS
    return round(math.ceil(round(t / step, 6)) * step, LR_DECIMALS)


def _decision_fields(decision: Decision, slope: float, offset: float, lower: float, upper: float,
                     open_set_lrs: np.ndarray, n_candidates: int = 1) -> dict[str, Any]:
    if decision.rule == "far":
        if open_set_lrs.size == 0:
            raise CalibrationError("the far rule needs the held-out LRs of open-set impostors (a calibration fitted "
                                   "before they were stored: fit it again)")
        # Chosen on the impostors' held-out, bounded LRs as reported: the FAR holds for what a verdict
        # compares, on recordings the map was not fitted on. It holds for registries of the calibration's
        # size (n_candidates), not for larger ones.
        # One grid step above the highest impostor LR that must be rejected.
        excluded = threshold_for_far(np.round(open_set_lrs, LR_DECIMALS), decision.far)
        t = round(math.floor(round(excluded / 10.0 ** -LR_DECIMALS, 6)) * 10.0 ** -LR_DECIMALS + 10.0 ** -LR_DECIMALS,
                  LR_DECIMALS)
    else:
        t = _on_grid(decision.bayes_log10_threshold(n_candidates))
    return {"decision": {**asdict(decision), "n_candidates": int(n_candidates), "log10_threshold": t,
                         "beyond_bounds": bool(not lower <= t <= upper)},
            "threshold": float((t - offset) / slope)}


def _decision_metrics(t: float, heldout: np.ndarray, labels: np.ndarray, open_set: np.ndarray) -> dict[str, Any]:
    """Error rates of the decision at ``t`` on held-out, bounded LRs: pairwise FRR and FAR, and the
    open-set FAR (recordings whose best LR over other devices passes)."""
    lr = np.round(heldout, LR_DECIMALS)
    out = {"frr": float(np.mean(lr[labels == 1] < t)), "far": float(np.mean(lr[labels == 0] >= t))}
    if open_set.size:
        out.update(open_set_far=float(np.mean(np.round(open_set, LR_DECIMALS) >= t)), n_open_set=int(open_set.size))
    return out


def fit_calibration(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, decision: Decision | None = None,
                    rows: np.ndarray | None = None, prior: Calibration | None = None,
                    scorer: dict[str, Any] | None = None, population: dict[str, Any] | None = None,
                    conditions: dict[str, Any] | None = None, basis: str = "", folds: int = FOLDS,
                    n_candidates: int = 1) -> Calibration:
    """Fit, bound and validate the calibration of trials (see the module docstring).

    ``groups``: the recording each trial belongs to (its trials stay in one cross-validation fold).
    ``prior``: a development calibration of the same scorer and condition; the fit is regularised
    toward it with the weight of :data:`PRIOR_TRIALS` trials (few case trials cannot move it far,
    many can). ``rows``: the questioned recording (row of a trial matrix) of each trial, default
    ``groups``: each row's best held-out LR over the devices that did not make it is its open-set
    impostor LR (the ``far`` rule's basis, the open-set FAR). ``n_candidates``: the enrolled devices
    the trials were scored against (the Bayes threshold's share of the prior; a verdict recomputes
    it for its registry).
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
        raise CalibrationError(f"a calibration needs at least 2 target and 2 non-target trials (got {n_tar} and {n_non})")
    held = heldout_log10_lrs(s, y, g, folds=folds, prior=prior)
    slope, offset = _fit(s[y == 1], s[y == 0], prior)
    if not slope > 0:
        raise CalibrationError("the calibration's slope is not positive: these scores do not separate same-device "
                               "from different-device trials")
    lower, upper = (round(b, 4) for b in elub_bounds(*_bounding_trials(held, y, prior, slope, offset)))
    held_b = np.clip(held, lower, upper)
    r = g if rows is None else np.asarray(rows).ravel()
    open_set = np.array([held_b[(r == row) & (y == 0)].max() for row in np.unique(r[y == 0])])
    fields = _decision_fields(decision or Decision(), slope, offset, lower, upper, open_set, n_candidates)
    tar_b, non_b = held_b[y == 1], held_b[y == 0]
    metrics = {
        "n_target": n_tar, "n_nontarget": n_non, "folds": int(min(folds, np.unique(g).size)),
        "eer": eer(s[y == 1], s[y == 0]), "min_dcf": min_dcf(s[y == 1], s[y == 0]), "min_dcf_p_target": P_TARGET,
        "cllr": cllr(tar_b, non_b), "cllr_min": cllr_min(s[y == 1], s[y == 0]),
        "cllr_raw_scores": cllr(s[y == 1], s[y == 0]),  # the scores taken as log10 LRs, uncalibrated
        "misleading_hp": int(np.sum(tar_b < 0)), "misleading_hp_rate": float(np.mean(tar_b < 0)),
        "misleading_hd": int(np.sum(non_b > 0)), "misleading_hd_rate": float(np.mean(non_b > 0)),
        **_decision_metrics(fields["decision"]["log10_threshold"], held_b, y, open_set),
    }
    metrics["cllr_cal"] = metrics["cllr"] - metrics["cllr_min"]
    return Calibration(slope=slope, offset=offset, lower=lower, upper=upper, metrics=metrics,
                       conditions=dict(conditions or {}), population=dict(population or {}), scorer=dict(scorer or {}),
                       basis=basis or ("case trials, regularised toward the development calibration"
                                       if prior is not None else "trials as given"),
                       scores=[round(float(v), 6) for v in s], labels=[int(v) for v in y],
                       heldout_log10_lrs=[round(float(v), 6) for v in held_b],
                       open_set_log10_lrs=[round(float(v), 6) for v in open_set],
                       fitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields)


def fit_trial_blocks(target: np.ndarray, nontarget: np.ndarray, groups_target: Sequence[Any],
                     groups_nontarget: Sequence[Any], **kwargs: Any) -> Calibration:
    """:func:`fit_calibration` of separate target / non-target score arrays."""
    s = np.concatenate([np.asarray(target, np.float64).ravel(), np.asarray(nontarget, np.float64).ravel()])
    y = np.r_[np.ones(np.size(target), int), np.zeros(np.size(nontarget), int)]
    g = np.concatenate([np.asarray(groups_target, dtype=object), np.asarray(groups_nontarget, dtype=object)])
    return fit_calibration(s, y, g.astype(str), **kwargs)
