"""Score calibration and the figures forensic practice reports: EER, minDCF, Cllr, LLRs, thresholds.

Conventions (fixed here so every figure is comparable):

* A *trial* is one (questioned recording, enrolled device) pair with a score; it is a *target*
  trial when the recording was made by that device. Higher scores mean "more likely the same device".
* A trial is accepted when ``score >= threshold``. FAR (false acceptance rate) is the fraction of
  non-target trials accepted; FRR (false rejection / miss rate) the fraction of targets rejected.
* Log-likelihood ratios are natural logs: ``llr = ln p(score | same device) / p(score | different)``.
* minDCF uses the NIST SRE operating point unless told otherwise: ``P_target = 0.01``,
  ``C_miss = 1``, ``C_fa = 1``, normalised by the cost of the best trivial system
  ``min(C_miss * P_target, C_fa * (1 - P_target))`` (so 1.0 = no better than always rejecting).
* Cllr (Brummer & du Preez 2006) is in bits: 0 is perfect, 1 is a system that always says LR = 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from devrecd.errors import DevrecdError

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


def cllr(target_llr: np.ndarray, nontarget_llr: np.ndarray) -> float:
    """Log-likelihood-ratio cost in bits of natural-log LLRs."""
    tar, non = _trials(target_llr, nontarget_llr)
    return _cllr_unchecked(tar, non)


def _cllr_unchecked(tar: np.ndarray, non: np.ndarray) -> float:
    # log2(1 + e^-x) computed stably with logaddexp (exact for +-inf too).
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


@dataclass(frozen=True)
class Calibration:
    """A fitted score -> LLR map, the open-set threshold, and the figures of the calibration set."""

    slope: float  # llr = slope * score + offset
    offset: float
    threshold: float  # raw-score threshold: best score below it -> "unknown device"
    target_far: float  # the false-acceptance rate the threshold was chosen for
    far: float  # FAR of that threshold on the scores it was chosen on (see threshold_basis)
    frr: float  # target trials below the threshold
    eer: float
    min_dcf: float
    cllr: float  # of the calibrated LLRs on the calibration set (optimistic: same data)
    cllr_min: float  # after the best monotone (PAV) calibration: the discrimination-only part
    n_target: int
    n_nontarget: int
    p_target: float = P_TARGET
    c_miss: float = C_MISS
    c_fa: float = C_FA
    # "open-set": FAR counts recordings of a device that is not enrolled whose BEST score passes
    # (what the verdict rule does); "pairwise": FAR counts single non-target trials.
    threshold_basis: str = "pairwise"
    n_open_set: int = 0  # open-set impostor recordings the threshold was chosen on

    def llr(self, scores: np.ndarray | float) -> np.ndarray:
        """Natural-log likelihood ratio of raw scores."""
        return self.slope * np.asarray(scores, dtype=np.float64) + self.offset

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**data)


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


def fit_llr(target: np.ndarray, nontarget: np.ndarray) -> tuple[float, float]:
    """Logistic-regression calibration (Brummer's linear recipe): ``llr = a * score + b``.

    Classes are weighted equally, so the fitted log-odds are log-likelihood ratios at an
    effective prior of 0.5 (no prior offset to remove). Nearly unregularised: the two parameters
    are well determined by any realistic number of trials.
    """
    tar, non = _trials(target, nontarget)
    coef, intercept = fit_balanced(tar[:, None], non[:, None])
    return float(coef[0]), intercept


def fit_balanced(target: np.ndarray, nontarget: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`fit_logistic` of target (label 1) against non-target (label 0) rows, classes weighted
    equally and nearly unregularised (sklearn's ``LogisticRegression(C=1e6, class_weight="balanced")``)."""
    x = np.concatenate([target, nontarget])
    y = np.concatenate([np.ones(len(target)), np.zeros(len(nontarget))])
    weight = np.concatenate([np.full(len(target), 0.5 / len(target)), np.full(len(nontarget), 0.5 / len(nontarget))])
    return fit_logistic(x, y, weight, l2=1e-6 / len(x))  # sklearn's C=1e6 on len(x) trials


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, *, l2: float = 1e-6,
                 max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Weighted logistic regression by Newton's method: ``(coef, intercept)`` minimising
    ``sum_i weight_i * logloss_i + l2 / 2 * |coef|^2`` (intercept not penalised).

    The few parameters of a calibration are fitted here in numpy, so that ``devrecd calibrate``
    needs neither scikit-learn nor lir (which pulls scikit-learn, scipy, pandas and matplotlib).
    With weights summing to 1 and ``l2 = 1 / (C n)`` it is sklearn's ``LogisticRegression(C,
    class_weight="balanced")`` on n trials (tests compare the two); the tiny penalty keeps separable
    trials finite.
    """
    x = np.asarray(x, dtype=np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    w = weight / weight.sum()

    def objective(beta: np.ndarray) -> float:
        z = design @ beta
        return float(w @ (np.logaddexp(0.0, z) - y * z) + 0.5 * (penalty * beta) @ beta)

    beta = np.zeros(design.shape[1])
    value = objective(beta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ beta)))  # the logistic function, without overflow
        grad = design.T @ (w * (p - y)) + penalty * beta
        hess = (design * (w * p * (1.0 - p))[:, None]).T @ design + np.diag(penalty) + 1e-12 * np.eye(len(beta))
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


def calibrate(target: np.ndarray, nontarget: np.ndarray, *, open_set_nontarget: np.ndarray | None = None,
              target_far: float = 0.01, p_target: float = P_TARGET, c_miss: float = C_MISS,
              c_fa: float = C_FA) -> Calibration:
    """Fit the LLR map, pick the threshold for ``target_far`` and measure the calibration set.

    ``open_set_nontarget``: for recordings whose device is not (or is taken out of) the registry,
    their best score over the enrolled devices. The verdict accepts a recording when its BEST
    score passes, so the threshold is chosen on these when given ("open-set" FAR); otherwise on the
    pairwise non-target trials, which understates how often an unknown device is accepted.
    """
    tar, non = _trials(target, nontarget)
    slope, offset = fit_llr(tar, non)
    basis = non if open_set_nontarget is None else _trials(tar, open_set_nontarget)[1]
    thr = threshold_for_far(basis, target_far)
    return Calibration(
        slope=slope, offset=offset, threshold=thr, target_far=float(target_far),
        far=float(np.mean(basis >= thr)), frr=float(np.mean(tar < thr)),
        eer=eer(tar, non), min_dcf=min_dcf(tar, non, p_target=p_target, c_miss=c_miss, c_fa=c_fa),
        cllr=cllr(slope * tar + offset, slope * non + offset), cllr_min=cllr_min(tar, non),
        n_target=int(tar.size), n_nontarget=int(non.size), p_target=p_target, c_miss=c_miss, c_fa=c_fa,
        threshold_basis="pairwise" if open_set_nontarget is None else "open-set",
        n_open_set=0 if open_set_nontarget is None else int(basis.size),
    )
