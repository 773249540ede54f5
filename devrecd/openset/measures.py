"""What trials measure, and the fits a calibration is made of: below :mod:`devrecd.openset.calibration`.

* Error rates at every threshold, EER, minDCF (the NIST SRE operating point unless told otherwise:
  ``P_target = 0.01``, ``C_miss = C_fa = 1``, normalised so that 1.0 = no better than always
  rejecting), a threshold for an open-set FAR, Cllr in bits (Brummer & du Preez 2006) and its
  minimum after the best monotonic calibration (isotonic regression, PAV).
* The fits: logistic regression with the classes weighted equally (:func:`fit_balanced`, also a
  fusion's weights), and the ELUB bounds (Vergeer et al., Science & Justice 56, 2016) of held-out LRs.

The conventions (targets, log10 LRs, FAR and FRR) are those of :mod:`devrecd.openset.calibration`.
"""

from __future__ import annotations

import math

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

    ``prior = (centre, trials)`` (one score column): regularised toward the map ``centre`` (coef,
    intercept) by Gaussian priors on the log-odds it gives at the two classes' mean scores, each worth
    ``trials`` trials at the most informative point (p = 1/2), against the n_eff trials of the data
    (twice the harmonic mean of the class counts). Independent priors on those two values keep the
    regularised map between the development map and the data's, where a prior on the raw
    (slope, intercept) would couple them.
    """
    x = np.concatenate([target, nontarget])
    y = np.concatenate([np.ones(len(target)), np.zeros(len(nontarget))])
    weight = np.concatenate([np.full(len(target), 0.5 / len(target)), np.full(len(nontarget), 0.5 / len(nontarget))])
    if prior is None:
        return fit_logistic(x, y, weight, l2=1e-6 / len(x))  # sklearn's C=1e6 on len(x) trials
    centre = np.asarray(prior[0], np.float64)
    n_eff = 4.0 / (1.0 / len(target) + 1.0 / len(nontarget))
    # Per class mean: the data's curvature of the log-odds there is at most 0.5 (class weight) * 1/4.
    precision = float(prior[1]) / n_eff * 0.125
    at = np.array([[float(np.mean(target)), 1.0], [float(np.mean(nontarget)), 1.0]])  # log-odds at the means = at @ beta
    return fit_logistic(x, y, weight, prior=(centre, precision * at.T @ at + 1e-12 * np.eye(2)))


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
