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
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.features import N_BASE, array_namespace

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

    # The scoring math below is written once against the array API standard (as the frontend is):
    # numpy arrays in (serving) give numpy out; torch tensors (on a GPU: devrecd.supervector_torch)
    # give tensors on their device, computed with the same formulas on the same float64 arrays.

    def _on(self, xp: Any, device: Any) -> dict[str, Any]:
        """The UBM's arrays (and the constants of the posteriors) in library ``xp`` on ``device``."""
        if xp is np:
            return self._numpy_tables
        key = (xp.__name__, str(device))
        tables = self._device_tables.get(key)
        if tables is None:
            tables = {k: xp.asarray(v, device=device) for k, v in self._numpy_tables.items()}
            self._device_tables[key] = tables
        return tables

    @cached_property
    def _numpy_tables(self) -> dict[str, np.ndarray]:
        prec = 1.0 / self.variances
        return {"feat_mean": self.feat_mean, "feat_scale": self.feat_scale, "means": self.means,
                "prec_t": prec.T, "means_prec_t": (self.means * prec).T,
                "const": np.sum(self.means ** 2 * prec, axis=1),
                "half_log_det": 0.5 * np.sum(np.log(2.0 * np.pi * self.variances), axis=1),
                "log_weights": np.log(self.weights),
                "sqrt_weights": np.sqrt(self.weights)[:, None], "sqrt_variances": np.sqrt(self.variances)}

    @cached_property
    def _device_tables(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {}

    def frames(self, feats: Any) -> Any:
        """(..., 73) raw features -> (n_frames, 39) standardised float64 frames (numpy or torch, as given)."""
        xp = array_namespace(feats)
        t = self._on(xp, device_of(feats))
        x = xp.reshape(xp.astype(feats[..., DIMS], xp.float64), (-1, DIMS.stop))
        return (x - t["feat_mean"]) / t["feat_scale"]

    def posteriors(self, frames: Any) -> Any:
        """(..., n, K) component responsibilities of standardised frames (..., n, 39)."""
        xp = array_namespace(frames)
        t = self._on(xp, device_of(frames))
        log_p = (-0.5 * (xp.matmul(frames ** 2, t["prec_t"]) - 2.0 * xp.matmul(frames, t["means_prec_t"]) + t["const"])
                 - t["half_log_det"] + t["log_weights"])
        log_p = log_p - xp.max(log_p, axis=-1, keepdims=True)
        p = xp.exp(log_p)
        return p / xp.sum(p, axis=-1, keepdims=True)

    def stats(self, x: Any) -> tuple[Any, Any]:
        """Zeroth- and first-order statistics of standardised frames ``x`` (..., n, 39): ``n_k`` (..., K),
        the summed responsibilities, and ``f_k`` (..., K, 39), the responsibility-weighted sums of the
        frames. Both are sums over frames: the statistics of a recording are the sums of its parts'
        (:class:`SupervectorAccumulator`)."""
        xp = array_namespace(x)
        post = self.posteriors(x)
        return xp.sum(post, axis=-2), xp.matmul(xp.matrix_transpose(post), x)

    def supervector_from_stats(self, n_k: Any, f_k: Any, relevance: float = RELEVANCE) -> Any:
        """(..., K * 39) normalised MAP mean offsets from statistics :meth:`stats` (``n_k`` (..., K), ``f_k`` (..., K, 39))."""
        xp = array_namespace(n_k)
        t = self._on(xp, device_of(n_k))
        alpha = (n_k / (n_k + relevance))[..., None]
        # MAP mean minus UBM mean = alpha * (first-order mean - UBM mean).
        offset = alpha * (f_k / xp.maximum(n_k, xp.asarray(1e-10, dtype=n_k.dtype, device=device_of(n_k)))[..., None]
                          - t["means"])
        scaled = offset * t["sqrt_weights"] / t["sqrt_variances"]
        return xp.reshape(scaled, (*scaled.shape[:-2], -1))

    def supervectors_of(self, x: Any, relevance: float = RELEVANCE) -> Any:
        """(..., K * 39) normalised MAP mean offsets of standardised frames ``x`` (..., n, 39): one
        supervector per leading index (a batch of windows in one call, on any array library)."""
        return self.supervector_from_stats(*self.stats(x), relevance)

    def supervector(self, feats: Any, relevance: float = RELEVANCE) -> Any:
        """(K * 39,) normalised MAP mean offsets of ALL frames of ``feats`` ((n, frames, 73) or (frames, 73))."""
        return self.supervectors_of(self.frames(feats), relevance)

    def window_supervectors(self, windows: Any, relevance: float = RELEVANCE) -> Any:
        """(n, K * 39): one supervector per window of an (n, frames, 73) array."""
        if not isinstance(windows, np.ndarray):  # a tensor: every window in one batched call
            xp = array_namespace(windows)
            x = self.frames(windows)
            return self.supervectors_of(xp.reshape(x, (windows.shape[0], -1, DIMS.stop)), relevance)
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


def device_of(x: Any) -> Any:
    """The device of an array (``"cpu"`` for numpy)."""
    if isinstance(x, np.ndarray):
        return "cpu"
    from array_api_compat import device

    return device(x)


def unit_rows(x: Any) -> Any:
    """Rows scaled to unit length (zero rows stay zero), float64, numpy or torch as given."""
    xp = array_namespace(x)
    x = xp.astype(x, xp.float64) if x.dtype != xp.float64 else x
    norm = xp.linalg.vector_norm(x, axis=-1, keepdims=True)
    return x / xp.where(norm > 0, norm, xp.ones_like(norm))


def nap_project(sv: Any, nap: Any | None) -> Any:
    """A GSV scorer's recording vector from supervectors (..., D): unit length, the NAP directions
    (D, dims) removed, unit length again (numpy or torch, as given)."""
    sv = unit_rows(sv)
    if nap is not None:
        xp = array_namespace(sv)
        sv = sv - xp.matmul(xp.matmul(sv, nap), xp.matrix_transpose(nap))
    return unit_rows(sv)


class SupervectorAccumulator:
    """A GSV scorer's recording vector and window vectors from a recording's features fed chunk by
    chunk (:meth:`add`), holding the statistics (:meth:`Ubm.stats`: ``n_k``, ``f_k``, a few kB)
    and the chunks' window vectors, never the features: memory does not grow with the frames.

    ``project``: supervectors -> the scorer's vectors (:func:`nap_project` with its basis);
    ``window_vectors``: a chunk's features -> its (n, D) window vectors (numpy); ``to_input``: the
    chunk as the UBM's arrays take it (e.g. a tensor on the scorer's device); ``to_host``: the
    recording vector as numpy. :meth:`result` is what the whole-array scorer gives, up to the
    rounding of summing the statistics in parts (about 1e-15 relative).
    """

    def __init__(self, ubm: Ubm, relevance: float, project: Any, window_vectors: Any, *,
                 to_input: Any = None, to_host: Any = None) -> None:
        self.ubm, self.relevance, self.project, self._window_vectors = ubm, relevance, project, window_vectors
        self.to_input, self.to_host = to_input or (lambda a: a), to_host or (lambda a: a)
        self.n_k: Any = None
        self.f_k: Any = None
        self.windows: list[np.ndarray] = []  # the chunks' window vectors
        self.n_windows = 0

    def add(self, feats: Any) -> None:
        """One chunk of (n, frames, 73) raw features, in the recording's order."""
        if len(feats) == 0:
            return
        x = self.to_input(feats)
        n_k, f_k = self.ubm.stats(self.ubm.frames(x))
        self.n_k, self.f_k = (n_k, f_k) if self.n_k is None else (self.n_k + n_k, self.f_k + f_k)
        self.windows.append(np.asarray(self._window_vectors(x), dtype=np.float64))
        self.n_windows += len(feats)

    def result(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(the recording vector (D,), the window vectors: one (n, D) array per chunk)."""
        if self.n_k is None:
            raise DatasetError("a recording without windows has no supervector", reason="no_windows")
        vector = self.project(self.ubm.supervector_from_stats(self.n_k, self.f_k, self.relevance))
        return np.asarray(self.to_host(vector), dtype=np.float64), list(self.windows)
