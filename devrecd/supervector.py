"""GMM-UBM and MAP-adapted mean supervectors: the one implementation for the closed-set ``gsv-svm``
baseline and the open-set ``gsv`` scorer.

* Frames: the 39 classic dims of the one frontend (MFCC c1..c12, logE, delta, delta-delta),
  standardised with the UBM's training statistics.
* UBM: a diagonal-covariance GMM (``mixtures`` components, EM by scikit-learn) over development frames.
* Supervector of a set of frames: the UBM means MAP-adapted (relevance factor ``r``:
  ``alpha_k = n_k / (n_k + r)``), minus the UBM means, scaled by ``sqrt(w_k) / sigma_k`` (the
  KL-divergence kernel of Campbell et al. 2006), stacked into one ``mixtures * 39`` vector.

The fitted model is plain arrays (:meth:`Ubm.to_arrays` / :meth:`Ubm.from_arrays`): posteriors are
computed here with numpy, so scoring needs neither scikit-learn nor the object that was fitted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.features import N_BASE

DIMS = slice(0, 3 * N_BASE)  # MFCC c1..c12, logE, delta, delta-delta: the 39 classic dims
RELEVANCE = 16.0  # MAP relevance factor (Reynolds et al. 2000)
_ARRAYS = ("feat_mean", "feat_scale", "weights", "means", "variances")


@dataclass(frozen=True)
class Ubm:
    """A fitted universal background model (all arrays float64)."""

    feat_mean: np.ndarray  # (39,) frame standardisation
    feat_scale: np.ndarray  # (39,)
    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, 39)
    variances: np.ndarray  # (K, 39) diagonal covariances

    @property
    def mixtures(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        """Length of a supervector."""
        return int(self.means.size)

    @classmethod
    def fit(cls, windows: Sequence[np.ndarray], *, mixtures: int = 64, seed: int = 0,
            max_frames: int = 200_000) -> Ubm:
        """EM on the frames of ``windows`` (each an (n, frames, 73) array of one recording, or (frames, 73))."""
        from sklearn.mixture import GaussianMixture

        parts = [np.asarray(w, dtype=np.float64)[..., DIMS].reshape(-1, DIMS.stop) for w in windows if len(w)]
        if not parts:
            raise DatasetError("a UBM needs frames; none were given", reason="ubm_data")
        frames = np.concatenate(parts)
        if len(frames) < 10 * mixtures:
            raise DatasetError(f"{len(frames)} frames are too few for a {mixtures}-mixture UBM "
                               f"(need at least {10 * mixtures})", reason="ubm_data")
        mean, scale = frames.mean(axis=0), frames.std(axis=0) + 1e-8
        frames = (frames - mean) / scale
        if len(frames) > max_frames:  # the UBM needs coverage, not every frame
            frames = frames[np.random.default_rng(seed).choice(len(frames), max_frames, replace=False)]
        gmm = GaussianMixture(mixtures, covariance_type="diag", max_iter=100, reg_covar=1e-3,
                              random_state=seed).fit(frames)
        return cls(mean, scale, gmm.weights_.astype(np.float64), gmm.means_.astype(np.float64),
                   gmm.covariances_.astype(np.float64))

    def frames(self, feats: np.ndarray) -> np.ndarray:
        """(..., 73) raw features -> (n_frames, 39) standardised frames."""
        x = np.asarray(feats, dtype=np.float64)[..., DIMS].reshape(-1, DIMS.stop)
        return (x - self.feat_mean) / self.feat_scale

    def posteriors(self, frames: np.ndarray) -> np.ndarray:
        """(n, K) component responsibilities of standardised frames."""
        prec = 1.0 / self.variances
        log_p = (-0.5 * (frames ** 2 @ prec.T - 2.0 * frames @ (self.means * prec).T
                         + np.sum(self.means ** 2 * prec, axis=1))
                 - 0.5 * np.sum(np.log(2.0 * np.pi * self.variances), axis=1) + np.log(self.weights))
        log_p -= log_p.max(axis=1, keepdims=True)
        p = np.exp(log_p)
        return p / p.sum(axis=1, keepdims=True)

    def supervector(self, feats: np.ndarray, relevance: float = RELEVANCE) -> np.ndarray:
        """(K * 39,) normalised MAP mean offsets of ALL frames of ``feats`` ((n, frames, 73) or (frames, 73))."""
        x = self.frames(feats)
        post = self.posteriors(x)
        n_k = post.sum(axis=0)
        f_k = post.T @ x
        alpha = (n_k / (n_k + relevance))[:, None]
        # MAP mean minus UBM mean = alpha * (first-order mean - UBM mean).
        offset = alpha * (f_k / np.maximum(n_k, 1e-10)[:, None] - self.means)
        return (offset * np.sqrt(self.weights)[:, None] / np.sqrt(self.variances)).ravel()

    def window_supervectors(self, windows: np.ndarray, relevance: float = RELEVANCE) -> np.ndarray:
        """(n, K * 39): one supervector per window of an (n, frames, 73) array."""
        out = np.empty((len(windows), self.dim))
        for i, w in enumerate(windows):
            out[i] = self.supervector(w, relevance)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k), dtype=np.float64) for k in _ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Ubm:
        """From :meth:`to_arrays` output (e.g. an npz); shapes are checked."""
        try:
            ubm = cls(**{k: np.asarray(arrays[k], dtype=np.float64) for k in _ARRAYS})
        except KeyError as exc:
            raise DatasetError(f"UBM arrays lack {exc.args[0]!r}", reason="ubm_format") from None
        k, d = ubm.means.shape
        if (ubm.variances.shape != (k, d) or ubm.weights.shape != (k,) or d != DIMS.stop
                or ubm.feat_mean.shape != (d,) or ubm.feat_scale.shape != (d,)
                or not np.all(ubm.variances > 0) or not np.all(ubm.weights > 0)):
            raise DatasetError(f"UBM arrays have inconsistent shapes or values (means {ubm.means.shape})",
                               reason="ubm_format")
        return ubm

    def fingerprint(self) -> str:
        """sha256 over every parameter (a registry is bound to one UBM)."""
        h = hashlib.sha256()
        for k in _ARRAYS:
            h.update(k.encode())
            h.update(np.ascontiguousarray(getattr(self, k), dtype=np.float64).tobytes())
        return h.hexdigest()
