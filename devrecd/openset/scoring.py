"""Open-set identification: a questioned recording's embedding against every enrolled device.

Score = cosine similarity between the recording's embedding (unit-length mean of its unit-length
window embeddings, :func:`~devrecd.openset.registry.recording_embedding`) and each profile's mean
embedding. The verdict is the best-scoring device when its score reaches the open-set threshold,
else :data:`UNKNOWN`, always with the ranked scores (and calibrated LLRs when the registry has a
calibration) so that an examiner sees how close the alternatives were.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from devrecd.config import RegistryConfig
from devrecd.openset.calibration import Calibration
from devrecd.openset.registry import Registry, recording_embedding

UNKNOWN = "unknown device"


def cosine_scores(query: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit-length ``query`` rows (q, D) or (D,) with unit-length ``profiles`` (P, D)."""
    return np.asarray(query, dtype=np.float64) @ np.asarray(profiles, dtype=np.float64).T


def score_matrix(recording_embeddings: np.ndarray, registry: Registry) -> tuple[list[str], np.ndarray]:
    """(n_recordings, n_profiles) cosine scores of unit-length recording embeddings, with profile names."""
    names, means = registry.matrix()
    return names, cosine_scores(recording_embeddings, means)


def development_calibration(registry: Registry) -> Calibration | None:
    """The calibration that travels with the registry's scorer (``devrecd train-gsv``), if any."""
    cal = registry.embedder.get("dev_calibration") if registry.embedder else None
    if not cal:
        return None
    return Calibration.from_dict({k: v for k, v in cal.items() if k in Calibration.__dataclass_fields__})


def effective_calibration(registry: Registry, cfg: RegistryConfig | None = None) -> Calibration | None:
    """The registry's own calibration, else its scorer's development calibration (when calibrations are used)."""
    if cfg is not None and not cfg.use_calibration:
        return None
    return registry.calibration or development_calibration(registry)


def resolve_threshold(registry: Registry, cfg: RegistryConfig) -> tuple[float, str]:
    """The open-set threshold and where it came from: the registry's calibration, its scorer's
    development calibration, or the config."""
    if cfg.use_calibration and registry.calibration is not None:
        return registry.calibration.threshold, f"calibrated (FAR {registry.calibration.target_far:g})"
    dev = development_calibration(registry) if cfg.use_calibration else None
    if dev is not None:
        rule = "LLR 0" if dev.threshold_basis == "llr0" else f"open-set FAR {dev.target_far:g}"
        return dev.threshold, f"scorer's development calibration ({rule})"
    return cfg.threshold, "config registry.threshold"


def identify_with_registry(window_embeddings: np.ndarray, registry: Registry, *, threshold: float,
                           k: int = 5, threshold_source: str = "") -> dict[str, Any]:
    """Verdict fields for one recording from its (n_windows, D) network window embeddings (cosine scores);
    see :func:`identify_vectors`."""
    w = np.asarray(window_embeddings, dtype=np.float64)
    unit_windows = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return identify_vectors(recording_embedding(w), unit_windows, registry, threshold=threshold, k=k,
                            threshold_source=threshold_source)


def identify_vectors(query: np.ndarray, window_vectors: np.ndarray | None, registry: Registry, *,
                     threshold: float, k: int = 5, threshold_source: str = "",
                     score: Callable[[np.ndarray, np.ndarray], np.ndarray] = cosine_scores) -> dict[str, Any]:
    """Verdict fields for one recording from its vector (and per-window vectors) under a scorer's ``score``.

    Returns ``device`` (a profile name or ``"unknown device"``), ``score`` (best score),
    ``llr`` (calibrated natural-log LR of the best device, or None), ``candidate`` (best profile
    even when rejected), ``open_set`` (threshold, its source, registry path and size, scorer kind),
    ``top_k`` (ranked profiles with score and llr) and ``windows_best`` (best profile per window),
    ready to merge into a verdict record.
    """
    names, means = registry.matrix()
    scores = np.asarray(score(np.atleast_2d(query), means), dtype=np.float64)[0]
    order = np.argsort(-scores, kind="stable")
    cal = effective_calibration(registry)
    llrs = cal.llr(scores) if cal is not None else None
    best = int(order[0])
    accepted = bool(scores[best] >= threshold)
    windows_best = [] if window_vectors is None or len(window_vectors) == 0 else \
        [names[int(j)] for j in np.asarray(score(window_vectors, means)).argmax(axis=1)]
    return {
        "device": names[best] if accepted else UNKNOWN,
        "score": round(float(scores[best]), 6),
        "llr": None if llrs is None else round(float(llrs[best]), 4),
        "candidate": names[best],
        "open_set": {"threshold": round(float(threshold), 6), "threshold_source": threshold_source,
                     "accepted": accepted, "registry": str(registry.path), "profiles": len(names),
                     "embedder": registry.embedder.get("fingerprint"), "scorer": registry.kind},
        "top_k": [{"device": names[i], "score": round(float(scores[i]), 6),
                   **({"llr": round(float(llrs[i]), 4)} if llrs is not None else {})}
                  for i in order[: max(1, k)]],
        "windows_best": windows_best,
    }
