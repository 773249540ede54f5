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
from devrecd.errors import ArtifactError, DevrecdError

P_TARGET = 0.01  # NIST SRE prior of a target trial for minDCF
C_MISS = 1.0
C_FA = 1.0


class CalibrationError(DevrecdError):
    """Trials that cannot be calibrated (no targets, no non-targets, NaN scores, bad FAR)."""

    reason = "calibration"


def _trials(target: np.ndarray, nontarget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tar = np.asarray(target, dtype=np.float64).ravel()
    non = np.asarray(nontarget, dtype=np.float64).ravel()
    if tar.size == 0 or non.size == 0:
        raise CalibrationError(f"need target and non-target trials (got {tar.size} and {non.size})")
    if not (np.isfinite(tar).all() and np.isfinite(non).all()):
        raise CalibrationError("scores must be finite")
    return tar, non


def error_rates(target: np.ndarray, nontarget: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FRR and FAR at every distinct threshold (plus +inf), accepting ``score >= threshold``.

    Returns ``(thresholds, frr, far)`` with thresholds ascending: FRR rises from 0, FAR falls to 0.
    """
    tar, non = _trials(target, nontarget)
    thresholds = np.unique(np.concatenate([tar, non, [np.inf]]))
    tar_sorted, non_sorted = np.sort(tar), np.sort(non)
    # Trials with score < t are rejected: searchsorted(..., "left") counts them.
    frr = np.searchsorted(tar_sorted, thresholds, side="left") / tar.size
    far = 1.0 - np.searchsorted(non_sorted, thresholds, side="left") / non.size
    return thresholds, frr, far


def eer(target: np.ndarray, nontarget: np.ndarray) -> float:
    """Equal error rate: where FAR and FRR cross, linearly interpolated between operating points."""
    _, frr, far = error_rates(target, nontarget)
    diff = far - frr  # falls from >= 0 to <= 0 as the threshold rises
    i = int(np.argmax(diff <= 0))  # first point where FRR has caught up with FAR
    if i == 0 or diff[i] == 0:
        return float((far[i] + frr[i]) / 2)
    # The crossing lies on the segment between points i-1 and i (the ROC's convex step).
    d0, d1 = diff[i - 1], diff[i]
    w = d0 / (d0 - d1)
    return float(far[i - 1] + w * (far[i] - far[i - 1]))


def min_dcf(target: np.ndarray, nontarget: np.ndarray, *, p_target: float = P_TARGET,
            c_miss: float = C_MISS, c_fa: float = C_FA) -> float:
    """Normalised minimum detection cost over all thresholds (see the module docstring)."""
    if not 0.0 < p_target < 1.0:
        raise CalibrationError("p_target must be in (0, 1)")
    _, frr, far = error_rates(target, nontarget)
    dcf = c_miss * p_target * frr + c_fa * (1.0 - p_target) * far
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


LN10 = math.log(10.0)


def cllr(target_log10_lr: np.ndarray, nontarget_log10_lr: np.ndarray) -> float:
    """Log-likelihood-ratio cost in bits of log10 LRs."""
    tar, non = _trials(target_log10_lr, nontarget_log10_lr)
    return _cllr_unchecked(tar * LN10, non * LN10)


def _cllr_unchecked(tar: np.ndarray, non: np.ndarray) -> float:
    # Of natural-log LRs: log2(1 + e^-x) computed stably with logaddexp (exact for +-inf too).
    c_tar = np.logaddexp(0.0, -tar).mean() / np.log(2.0)
    c_non = np.logaddexp(0.0, non).mean() / np.log(2.0)
    return float((c_tar + c_non) / 2.0)


def cllr_min(target: np.ndarray, nontarget: np.ndarray) -> float:
    """Cllr after the optimal monotone calibration (pool-adjacent-violators), i.e. the part of
    Cllr due to discrimination alone; ``cllr - cllr_min`` is the calibration loss."""
    tar, non = _trials(target, nontarget)
    x = np.concatenate([tar, non])
    y = np.concatenate([np.ones(tar.size), np.zeros(non.size)])
    # Equal total weight per class: the fitted posteriors are then at prior 0.5, so logit = LLR.
    w = np.concatenate([np.full(tar.size, 0.5 / tar.size), np.full(non.size, 0.5 / non.size)])
    p = isotonic_fit(x, y, w)
    with np.errstate(divide="ignore"):
        llr = np.log(p) - np.log1p(-p)  # +-inf where PAV is certain; cllr() handles those exactly
    return _cllr_unchecked(llr[: tar.size], llr[tar.size:])


def threshold_for_far(nontarget: np.ndarray, far: float) -> float:
    """The lowest threshold whose FAR on these non-target scores is at most ``far``."""
    non = np.asarray(nontarget, dtype=np.float64).ravel()
    if non.size == 0 or not np.isfinite(non).all():
        raise CalibrationError("need finite non-target scores to set a threshold")
    if not 0.0 <= far < 1.0:
        raise CalibrationError(f"target false-acceptance rate must be in [0, 1), got {far}")
    desc = np.sort(non)[::-1]
    allowed = int(np.floor(far * non.size + 1e-9))  # non-targets we may accept
    # Just above the (allowed+1)-th highest non-target: it and everything below are rejected.
    return float(np.nextafter(desc[allowed], np.inf))


def isotonic_fit(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The weighted least-squares non-decreasing fit of ``y`` on ``x`` (pool-adjacent-violators),
    evaluated at every ``x``; equal ``x`` share one value (their weighted mean is pooled first).
    What sklearn's ``IsotonicRegression().fit(x, y, weight).predict(x)`` gives, in numpy, so that
    ``calibrate`` needs no scikit-learn (tests compare the two)."""
    ux, inverse = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True)
    wsum = np.bincount(inverse, weights=weight, minlength=len(ux))
    ymean = np.bincount(inverse, weights=weight * y, minlength=len(ux)) / wsum
    # Blocks on a stack: (weighted mean, weight, count); merge while the last two violate the order.
    means, weights, counts = [], [], []
    for m, wt in zip(ymean.tolist(), wsum.tolist()):
        means.append(m), weights.append(wt), counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, c2 = means.pop(), weights.pop(), counts.pop()
            total = weights[-1] + w2
            means[-1] = (means[-1] * weights[-1] + m2 * w2) / total
            weights[-1], counts[-1] = total, counts[-1] + c2
    fitted = np.repeat(np.asarray(means), counts)
    return fitted[inverse]


def fit_balanced(target: np.ndarray, nontarget: np.ndarray, *, prior: tuple[np.ndarray, float] | None = None
                 ) -> tuple[np.ndarray, float]:
    """:func:`fit_logistic` of target (label 1) against non-target (label 0) rows, classes weighted
    equally and nearly unregularised (sklearn's ``LogisticRegression(C=1e6, class_weight="balanced")``).

    ``prior = (centre, trials)``: regularised toward ``centre`` (coef..., intercept) with the weight
    of ``trials`` trials like these (precision = trials / n_eff times the data's Fisher information
    at the centre, n_eff the harmonic mean of the class counts times two): with few trials the
    centre (a development calibration) stands, with many the data speak.
    """
    x = np.concatenate([target, nontarget])
    y = np.concatenate([np.ones(len(target)), np.zeros(len(nontarget))])
    weight = np.concatenate([np.full(len(target), 0.5 / len(target)), np.full(len(nontarget), 0.5 / len(nontarget))])
    if prior is None:
        return fit_logistic(x, y, weight, l2=1e-6 / len(x))  # sklearn's C=1e6 on len(x) trials
    centre = np.asarray(prior[0], np.float64)
    design = np.hstack([np.asarray(x, np.float64), np.ones((len(x), 1))])
    p = 0.5 * (1.0 + np.tanh(0.5 * (design @ centre)))
    fisher = (design * (weight * p * (1.0 - p))[:, None]).T @ design
    n_eff = 4.0 / (1.0 / len(target) + 1.0 / len(nontarget))
    return fit_logistic(x, y, weight, prior=(centre, float(prior[1]) / n_eff * fisher + 1e-9 * np.eye(len(centre))))


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, *, l2: float = 1e-6,
                 max_iter: int = 100, prior: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Weighted logistic regression by Newton's method: ``(coef, intercept)`` minimising
    ``sum_i weight_i * logloss_i + l2 / 2 * |coef|^2`` (intercept not penalised).

    The few parameters of a calibration are fitted here in numpy, so that ``devrecd calibrate``
    needs neither scikit-learn nor lir (which pulls scikit-learn, scipy, pandas and matplotlib).
    With weights summing to 1 and ``l2 = 1 / (C n)`` it is sklearn's ``LogisticRegression(C,
    class_weight="balanced")`` on n trials (tests compare the two); the tiny penalty keeps separable
    trials finite.

    ``prior = (centre, precision)``: a Gaussian prior on all parameters (coef..., intercept) instead
    of the ridge: ``+ 1/2 (beta - centre)' precision (beta - centre)`` (a regularised case
    calibration, :func:`fit_calibration`).
    """
    x = np.asarray(x, dtype=np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    if prior is None:
        centre = np.zeros(design.shape[1])
        precision = np.diag(np.r_[np.full(design.shape[1] - 1, l2), 0.0])
    else:
        centre, precision = np.asarray(prior[0], np.float64), np.asarray(prior[1], np.float64)
    penalty = precision
    w = weight / weight.sum()

    def objective(beta: np.ndarray) -> float:
        z = design @ beta
        d = beta - centre
        return float(w @ (np.logaddexp(0.0, z) - y * z) + 0.5 * d @ penalty @ d)

    beta = centre.copy() if prior is not None else np.zeros(design.shape[1])
    value = objective(beta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ beta)))  # the logistic function, without overflow
        grad = design.T @ (w * (p - y)) + penalty @ (beta - centre)
        hess = (design * (w * p * (1.0 - p))[:, None]).T @ design + penalty + 1e-12 * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        t, trial = 1.0, objective(beta - step)
        while not trial <= value:  # halve the Newton step until the objective does not rise (nan rises)
            t *= 0.5
            if t < 1e-8:
                break
            trial = objective(beta - t * step)
        if not trial <= value:
            break  # no step along this direction lowers it: keep the point (optimal to the arithmetic's precision)
        beta, previous, value = beta - t * step, value, trial
        if previous - value <= 1e-15 * max(1.0, abs(value)) and np.abs(grad).max() < 1e-10:
            break
    if not np.all(np.isfinite(beta)):
        raise CalibrationError("the logistic calibration did not converge (non-finite parameters)")
    return beta[:-1], float(beta[-1])




# --- bounds ------------------------------------------------------------------------------------

def elub_bounds(log10_lrs: np.ndarray, labels: np.ndarray, *, step: float = 0.01) -> tuple[float, float]:
    """Empirical lower and upper bounds (log10) of LRs (Vergeer et al. 2016), one misleading LR of
    each kind added: the most extreme LR thresholds at which the system's expected utility still
    beats the neutral system's. Never beyond ``-log10(n_target + 1)`` and ``log10(n_nontarget + 1)``.
    Numpy, so that calibrating needs no lir; equal to ``lir.algorithms.bayeserror.elub`` (a test
    compares the two)."""
    llr = np.clip(np.asarray(log10_lrs, np.float64), -9.0, 9.0)
    y = np.asarray(labels, int)
    lo_lim = max(float(llr.min()), -math.log10(int(y.sum()) + 1))
    hi_lim = min(float(llr.max()), math.log10(int((1 - y).sum()) + 1))
    k_lo, k_hi = min(0, int(lo_lim // step)), max(0, int(hi_lim // step) + 1)
    thr = np.linspace(k_lo * step, k_hi * step, k_hi - k_lo + 1)
    t = 10.0 ** thr
    def utility(accept: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return 1.0 - accept[yy == 1].mean(axis=0) + t * accept[yy == 0].mean(axis=0)

    # The system with one misleading LR of each kind added (an Hp trial rejected, an Hd trial
    # accepted at every threshold), against the neutral system (LR = 1 for every trial).
    system = utility(np.vstack([10.0 ** llr[:, None] > t[None, :], np.zeros((1, t.size)), np.ones((1, t.size))]),
                     np.concatenate([y, [1, 0]]))
    neutral = utility(np.broadcast_to(1.0 > t[None, :], (llr.size, t.size)), y)
    worse = neutral / system < 1.0
    lower = np.max(thr[(thr <= 0) & worse] + step, initial=float(thr.min()))
    upper = np.min(thr[(thr >= 0) & worse] - step, initial=float(thr.max()))
    return float(min(lower, 0.0)), float(max(upper, 0.0))


# --- the decision ------------------------------------------------------------------------------

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

    def accepts(self, bounded_log10_lr: float) -> bool:
        """The decision: the bounded LR reaches the decision threshold (never beyond the upper bound:
        an LR the data cannot support does not decide)."""
        return bool(bounded_log10_lr >= self.log10_threshold)

    def with_decision(self, decision: Decision, n_candidates: int = 1, open_set: np.ndarray | None = None) -> Calibration:
        """The same LR map under another decision rule, for ``n_candidates`` enrolled devices
        (``open_set``: the impostors' best scores, rule far; else the non-target scores)."""
        return replace(self, **_decision_fields(decision, self.slope, self.offset, self.lower, self.upper,
                                                np.asarray(self.scores), np.asarray(self.labels), open_set, n_candidates))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sha256(self) -> str:
        """Content hash (canonical JSON): what a verdict, a comparison or a report cites."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Everything but the per-trial arrays, with the hash."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("scores", "labels", "heldout_log10_lrs")}
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
    """``(slope, offset)`` of log10 LR on these trials (toward ``prior``'s map when given)."""
    centre = None if prior is None else (np.array([prior.slope * LN10, prior.offset * LN10]), PRIOR_TRIALS)
    coef, intercept = fit_balanced(tar[:, None], non[:, None], prior=centre)
    return float(coef[0]) / LN10, float(intercept) / LN10


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


def _decision_fields(decision: Decision, slope: float, offset: float, lower: float, upper: float,
                     scores: np.ndarray, labels: np.ndarray, open_set: np.ndarray | None,
                     n_candidates: int = 1) -> dict[str, Any]:
    if decision.rule == "far":
        basis = scores[labels == 0] if open_set is None or len(open_set) == 0 else np.asarray(open_set, np.float64)
        if basis.size == 0:
            raise CalibrationError("rule far needs impostor scores")
        # The LR threshold is chosen on the impostors' BOUNDED LRs (what a verdict compares), so that
        # the rule and the reported LR agree even where the bounds flatten the map.
        t = threshold_for_far(np.clip(slope * basis + offset, lower, upper), decision.far)
        thr = (t - offset) / slope
    else:
        t = decision.bayes_log10_threshold(n_candidates)
        thr = (t - offset) / slope
    return {"decision": {**asdict(decision), "n_candidates": int(n_candidates), "log10_threshold": round(float(t), 6),
                         "beyond_bounds": bool(not lower <= t <= upper)},
            "threshold": float(thr)}


def fit_calibration(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, decision: Decision | None = None,
                    open_set: np.ndarray | None = None, prior: Calibration | None = None,
                    scorer: dict[str, Any] | None = None, population: dict[str, Any] | None = None,
                    conditions: dict[str, Any] | None = None, basis: str = "", folds: int = FOLDS,
                    n_candidates: int = 1) -> Calibration:
    """Fit, bound and validate the calibration of trials (see the module docstring).

    ``groups``: the recording each trial belongs to (its trials stay in one cross-validation fold).
    ``prior``: a development calibration of the same scorer and condition; the fit is regularised
    toward it with the weight of :data:`PRIOR_TRIALS` trials (few case trials cannot move it far,
    many can). ``open_set``: per impostor recording its best score over the enrolled devices (the
    ``far`` rule's basis, and the open-set FAR reported). ``n_candidates``: the enrolled devices
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
    lower, upper = (round(b, 4) for b in elub_bounds(held, y))
    held_b = np.clip(held, lower, upper)
    slope, offset = _fit(s[y == 1], s[y == 0], prior)
    if not slope > 0:
        raise CalibrationError("the calibration's slope is not positive: these scores do not separate same-device "
                               "from different-device trials")
    dec = decision or Decision()
    fields = _decision_fields(dec, slope, offset, lower, upper, s, y, open_set, n_candidates)
    t = fields["decision"]["log10_threshold"]
    tar_b, non_b = held_b[y == 1], held_b[y == 0]
    metrics = {
        "n_target": n_tar, "n_nontarget": n_non, "folds": int(min(folds, np.unique(g).size)),
        "eer": eer(s[y == 1], s[y == 0]), "min_dcf": min_dcf(s[y == 1], s[y == 0]), "min_dcf_p_target": P_TARGET,
        "cllr": cllr(tar_b, non_b), "cllr_min": cllr_min(s[y == 1], s[y == 0]),
        "cllr_raw_scores": cllr(s[y == 1], s[y == 0]),  # the scores taken as log10 LRs, uncalibrated
        "misleading_hp": int(np.sum(tar_b < 0)), "misleading_hp_rate": float(np.mean(tar_b < 0)),
        "misleading_hd": int(np.sum(non_b > 0)), "misleading_hd_rate": float(np.mean(non_b > 0)),
        # the decision on held-out LRs: pairwise FRR / FAR, and the open-set FAR of the impostors' best scores
        "frr": float(np.mean(tar_b < t)), "far": float(np.mean(non_b >= t)),
    }
    metrics["cllr_cal"] = metrics["cllr"] - metrics["cllr_min"]
    if open_set is not None and len(open_set):
        metrics["open_set_far"] = float(np.mean(np.clip(slope * np.asarray(open_set) + offset, lower, upper) >= t))
        metrics["n_open_set"] = int(len(open_set))
    return Calibration(slope=slope, offset=offset, lower=lower, upper=upper, metrics=metrics,
                       conditions=dict(conditions or {}), population=dict(population or {}), scorer=dict(scorer or {}),
                       basis=basis or ("case trials, regularised toward the development calibration"
                                       if prior is not None else "trials as given"),
                       scores=[round(float(v), 6) for v in s], labels=[int(v) for v in y],
                       heldout_log10_lrs=[round(float(v), 6) for v in held_b],
                       fitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields)


def fit_trial_blocks(target: np.ndarray, nontarget: np.ndarray, groups_target: Sequence[Any],
                     groups_nontarget: Sequence[Any], **kwargs: Any) -> Calibration:
    """:func:`fit_calibration` of separate target / non-target score arrays."""
    s = np.concatenate([np.asarray(target, np.float64).ravel(), np.asarray(nontarget, np.float64).ravel()])
    y = np.r_[np.ones(np.size(target), int), np.zeros(np.size(nontarget), int)]
    g = np.concatenate([np.asarray(groups_target, dtype=object), np.asarray(groups_nontarget, dtype=object)])
    return fit_calibration(s, y, g.astype(str), **kwargs)
