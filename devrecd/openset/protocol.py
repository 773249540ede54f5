"""The leave-phones-out open-set protocol: folds, trials and the figures reported for them.

Every trained part of an open-set system (UBM, embedder, NAP, score normalisation cohort, fusion
weights, calibration and threshold) is trained on the *development* phones of a fold and measured
on its *test* phones, which none of them has seen:

* Folds: the phones are shuffled with a seed and cut into ``n_folds`` groups; each group is the
  test set of one fold, the rest its development set. Every phone is unseen in exactly one fold
  per seed; several seeds give several partitions.
* Recordings: segments :data:`REFERENCE_GROUPS` of a phone are its references (enrolment),
  :data:`QUESTIONED_GROUPS` its questioned recordings (different speech).
* Development trials (calibration, fusion): development phones enrolled from their references,
  their questioned recordings scored against every development profile.
* Test trials: test phones enrolled likewise; every questioned test recording against every test
  profile (pairwise targets/non-targets: EER, minDCF, Cllr); and the open-set verdicts with each
  test phone in turn NOT enrolled (profiles are independent, so this is the score matrix without
  that column): its recordings must be called unknown, the others named and accepted.

Used by ``benchmarks/openset.py``; other benchmarks (e.g. re-encoded recordings) reuse the folds
and :func:`open_set_outcomes` / :func:`trial_figures` so their figures mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.openset.calibration import Calibration
from devrecd.openset.measures import cllr, cllr_min, eer, min_dcf
from devrecd.openset.vectors import unit

REFERENCE_GROUPS = ("1", "2")
QUESTIONED_GROUPS = ("3", "4", "5")


@dataclass(frozen=True)
class Fold:
    """One partition cell: ``test`` phones are unseen by everything trained on ``dev``."""

    seed: int
    index: int
    dev: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"seed{self.seed}-fold{self.index}"


def phone_folds(devices: Sequence[str], *, n_folds: int = 3, seeds: Sequence[int] = (0, 1, 2)) -> list[Fold]:
    """Leave-phones-out folds: for each seed a shuffled partition of ``devices`` into ``n_folds`` test sets."""
    phones = sorted(set(devices))
    if n_folds < 2 or len(phones) < 2 * n_folds:
        raise DatasetError(f"{len(phones)} devices cannot make {n_folds} folds with >= 2 test devices each",
                           reason="protocol")
    out = []
    for seed in seeds:
        order = [phones[i] for i in np.random.default_rng(seed).permutation(len(phones))]
        for k in range(n_folds):
            test = tuple(sorted(order[k::n_folds]))
            out.append(Fold(seed, k, tuple(p for p in phones if p not in test), test))
    return out


@dataclass
class TrialMatrix:
    """Questioned recordings (rows) scored against enrolled profiles (columns)."""

    profiles: list[str]
    devices: list[str]  # true device of each row
    scores: np.ndarray  # (rows, profiles)

    @property
    def is_target(self) -> np.ndarray:
        return np.asarray(self.devices)[:, None] == np.asarray(self.profiles)[None, :]

    @property
    def target(self) -> np.ndarray:
        return self.scores[self.is_target]

    @property
    def nontarget(self) -> np.ndarray:
        return self.scores[~self.is_target]

    @property
    def open_set(self) -> np.ndarray:
        """Per row, its best score over the OTHER profiles (the score it gets when its device is not enrolled)."""
        best = np.where(self.is_target, -np.inf, self.scores).max(axis=1)
        return best[np.isfinite(best)]

    def map(self, fn: Any) -> TrialMatrix:
        """The same trials with ``fn(scores)`` (e.g. a calibration's LLR map)."""
        return TrialMatrix(self.profiles, self.devices, np.asarray(fn(self.scores)))


def profile_vectors(ref_vectors: dict[str, list[np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """Sorted profile names and their vectors: the unit-length mean of the references' unit vectors
    (what :class:`devrecd.openset.registry.DeviceProfile` computes)."""
    names = sorted(ref_vectors)
    return names, np.stack([unit(unit(np.stack(ref_vectors[n])).mean(axis=0)) for n in names])


def trial_matrix(scorer: Any, refs: dict[str, list[np.ndarray]], questioned: Sequence[tuple[str, np.ndarray]]
                 ) -> TrialMatrix:
    """Score ``(device, vector)`` questioned recordings against profiles built from ``refs`` with ``scorer``."""
    names, prof = profile_vectors(refs)
    q = np.stack([v for _, v in questioned])
    return TrialMatrix(names, [d for d, _ in questioned], scorer.score(q, prof))


@dataclass
class Outcomes:
    """Open-set verdict counts (numerator, denominator)."""

    named_accepted: list[int] = field(default_factory=lambda: [0, 0])
    rank1: list[int] = field(default_factory=lambda: [0, 0])
    unknown_rejected: list[int] = field(default_factory=lambda: [0, 0])

    def add(self, other: Outcomes) -> None:
        for k in ("named_accepted", "rank1", "unknown_rejected"):
            a, b = getattr(self, k), getattr(other, k)
            a[0] += b[0]
            a[1] += b[1]

    def to_dict(self) -> dict[str, Any]:
        return {k: {"k": v[0], "n": v[1], "rate": round(v[0] / v[1], 4) if v[1] else None}
                for k, v in (("named_accepted", self.named_accepted), ("rank1", self.rank1),
                             ("unknown_rejected", self.unknown_rejected))}


def open_set_outcomes(trials: TrialMatrix, threshold: float) -> Outcomes:
    """Each profile in turn left out of the registry: its recordings must be rejected ("unknown"),
    the other enrolled devices' recordings named (best profile) and accepted (score >= threshold)."""
    out = Outcomes()
    names, devices, s = trials.profiles, np.asarray(trials.devices), trials.scores
    for j, left_out in enumerate(names):
        keep = [i for i in range(len(names)) if i != j]
        sub = s[:, keep]
        best = sub.argmax(axis=1)
        best_score = sub[np.arange(len(sub)), best]
        for r, dev in enumerate(devices):
            if dev == left_out:
                out.unknown_rejected[0] += int(best_score[r] < threshold)
                out.unknown_rejected[1] += 1
            elif dev in names:
                right = names[keep[best[r]]] == dev
                out.rank1[0] += int(right)
                out.rank1[1] += 1
                out.named_accepted[0] += int(right and best_score[r] >= threshold)
                out.named_accepted[1] += 1
    return out


def trial_figures(target_llr: np.ndarray, nontarget_llr: np.ndarray) -> dict[str, Any]:
    """EER, minDCF, Cllr and Cllr_min of calibrated LLR trials, with the trial counts."""
    tar, non = np.asarray(target_llr, float), np.asarray(nontarget_llr, float)
    return {"eer": round(eer(tar, non), 5), "min_dcf": round(min_dcf(tar, non), 4),
            "cllr": round(cllr(tar, non), 4), "cllr_min": round(cllr_min(tar, non), 4),
            "n_target": int(tar.size), "n_nontarget": int(non.size)}


def s_norm(trials: TrialMatrix, query_cohort: np.ndarray, profile_cohort: np.ndarray,
           query_exclude: np.ndarray | None = None, profile_exclude: np.ndarray | None = None,
           top: int = 0) -> TrialMatrix:
    """Symmetric score normalisation (S-norm; AS-norm with ``top`` > 0: only the ``top`` highest cohort scores).

    ``query_cohort`` (rows, C) and ``profile_cohort`` (profiles, C): scores of each query / profile
    against the cohort recordings. ``*_exclude`` (same shapes, bool): cohort entries to ignore (the
    same device as the query or profile, when the cohort comes from the same phones).
    """
    def stats(c: np.ndarray, excl: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        c = np.where(excl, np.nan, c) if excl is not None else c.astype(float)
        if top:
            c = -np.sort(-np.nan_to_num(c, nan=-np.inf), axis=1)[:, :top]
        return np.nanmean(c, axis=1), np.nanstd(c, axis=1) + 1e-9

    mq, sq = stats(query_cohort, query_exclude)
    mp, sp = stats(profile_cohort, profile_exclude)
    s = trials.scores
    return TrialMatrix(trials.profiles, trials.devices,
                       0.5 * ((s - mq[:, None]) / sq[:, None] + (s - mp[None, :]) / sp[None, :]))


def calibration_summary(cal: Calibration) -> dict[str, Any]:
    """The development calibration's decision and its held-out figures on the development trials."""
    m = cal.metrics
    return {"threshold": round(cal.threshold, 5), "log10_threshold": cal.log10_threshold,
            "bounds": [cal.lower, cal.upper], "dev_far": round(m["far"], 4), "dev_frr": round(m["frr"], 4),
            "dev_open_set_far": round(m.get("open_set_far", float("nan")), 4), "dev_eer": round(m["eer"], 4),
            "dev_cllr": round(m["cllr"], 4), "n_target": m["n_target"], "n_nontarget": m["n_nontarget"],
            "n_open_set": m.get("n_open_set", 0)}
