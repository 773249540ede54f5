"""The paper's two strongest classical baselines (Table V), on OUR frontend's features.

* ``mfcc-svm``: per window, mean and standard deviation over its 128 frames of the 13 base dims
  (MFCC c1..c12 + logE) and their deltas (52 numbers), standardised, RBF SVM.
* ``gsv-svm``: a 64-mixture diagonal GMM-UBM on the training frames' 39 MFCC-family dims (base,
  delta, delta-delta, standardised); per window the UBM means are MAP-adapted (relevance factor
  16) and stacked into a Gaussian supervector, normalised by the UBM's weights and deviations
  (the KL-divergence kernel), linear SVM.

Both take the (n, 128, 73) windows that :mod:`devrecd.features` computes, so there is no second
feature implementation: ``fit(list of per-recording arrays, labels)``, ``predict_proba(windows)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.features import SLICE_DELTA, SLICE_LOGE, SLICE_MFCC


def _stack(train_feats: Sequence[np.ndarray], train_labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-recording windows and repeat each recording's label over its windows."""
    if len(train_feats) != len(train_labels):
        raise DatasetError(f"{len(train_feats)} feature arrays but {len(train_labels)} labels", reason="baseline")
    if len(set(train_labels)) < 2:
        raise DatasetError("a classifier needs at least two devices in the training data", reason="baseline")
    x = np.concatenate([np.asarray(f, dtype=np.float32) for f in train_feats])
    y = np.concatenate([np.full(len(f), lab, dtype=object) for f, lab in zip(train_feats, train_labels)])
    return x, y


def _calibrated_svc(kernel: str, c: float, seed: int):
    """An SVM with Platt-scaled probabilities (sklearn >= 1.9 replaces ``SVC(probability=True)`` by this)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    svc = SVC(kernel=kernel, C=c, gamma="scale", random_state=seed)
    return CalibratedClassifierCV(svc, method="sigmoid", ensemble=False,
                                  cv=StratifiedKFold(3, shuffle=True, random_state=seed))


def mfcc_statistics(feats: np.ndarray) -> np.ndarray:
    """(n, 52): mean and std over frames of MFCC c1..c12, logE and their deltas."""
    feats = np.asarray(feats, dtype=np.float64)
    base = np.concatenate([feats[..., SLICE_MFCC], feats[..., SLICE_LOGE], feats[..., SLICE_DELTA]], axis=-1)
    return np.concatenate([base.mean(axis=1), base.std(axis=1)], axis=-1)


class MfccSvm:
    """MFCC statistics + RBF SVM."""

    name = "mfcc-svm"

    def __init__(self, *, c: float = 10.0, seed: int = 0) -> None:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), _calibrated_svc("rbf", c, seed))

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_

    def fit(self, train_feats: Sequence[np.ndarray], train_labels: Sequence[str]) -> MfccSvm:
        x, y = _stack(train_feats, train_labels)
        self.model.fit(mfcc_statistics(x), y)
        return self

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        """(n_windows, n_classes) probabilities, columns in ``classes_`` (sorted label) order."""
        return self.model.predict_proba(mfcc_statistics(feats))


class GsvSvm:
    """64-mixture GMM-UBM, MAP-adapted mean supervectors (:mod:`devrecd.supervector`), linear SVM."""

    name = "gsv-svm"

    # C = 100: the MAP offsets are small (alpha ~ 0.1 with 128 frames per window); C = 1 underfits
    # (86% of CCNU windows instead of 100%).
    def __init__(self, *, mixtures: int = 64, relevance: float = 16.0, c: float = 100.0, seed: int = 0,
                 max_ubm_frames: int = 200_000) -> None:
        self.mixtures = mixtures
        self.relevance = relevance
        self.c = c
        self.seed = seed
        self.max_ubm_frames = max_ubm_frames

    @property
    def classes_(self) -> np.ndarray:
        return self.svm.classes_

    def fit(self, train_feats: Sequence[np.ndarray], train_labels: Sequence[str]) -> GsvSvm:
        from devrecd.supervector import Ubm

        x, y = _stack(train_feats, train_labels)
        self.ubm = Ubm.fit([x], mixtures=self.mixtures, seed=self.seed, max_frames=self.max_ubm_frames)
        self.svm = _calibrated_svc("linear", self.c, self.seed)
        self.svm.fit(self.supervectors(x), y)
        return self

    def refit_classifier(self, train_feats: Sequence[np.ndarray], train_labels: Sequence[str]) -> GsvSvm:
        """A copy with this UBM and a new SVM fitted on other recordings (e.g. the same training
        recordings through a codec: matched-condition training without learning the UBM again)."""
        import copy

        x, y = _stack(train_feats, train_labels)
        other = copy.copy(self)
        other.svm = _calibrated_svc("linear", self.c, self.seed).fit(self.supervectors(x), y)
        return other

    def supervectors(self, feats: np.ndarray) -> np.ndarray:
        """(n, mixtures * 39) normalised MAP-adapted mean supervectors, one per window."""
        return self.ubm.window_supervectors(np.asarray(feats), self.relevance)

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        """(n_windows, n_classes) probabilities, columns in ``classes_`` (sorted label) order."""
        return self.svm.predict_proba(self.supervectors(np.asarray(feats)))


BASELINES = {"mfcc-svm": MfccSvm, "gsv-svm": GsvSvm}


def make_baseline(name: str, *, seed: int = 0) -> MfccSvm | GsvSvm:
    """A fresh baseline classifier by name (``mfcc-svm`` or ``gsv-svm``)."""
    try:
        return BASELINES[name](seed=seed)
    except KeyError:
        raise DatasetError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})", reason="baseline") from None


def recording_accuracy(probas: Sequence[np.ndarray], labels: Sequence[str], classes: Sequence[str]) -> tuple[float, float]:
    """(window accuracy, recording accuracy); a recording's scores are the mean of its windows'."""
    classes = np.asarray(classes)
    correct_w = total_w = correct_r = 0
    for p, lab in zip(probas, labels):
        correct_w += int(np.sum(classes[p.argmax(axis=1)] == lab))
        total_w += len(p)
        correct_r += int(classes[p.mean(axis=0).argmax()] == lab)
    return correct_w / max(1, total_w), correct_r / max(1, len(labels))
