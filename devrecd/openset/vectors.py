"""Vector helpers shared by the registry, the scorers and the verdict: a leaf (numpy only)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): the one unit normalisation of the open set."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def digest(meta: dict[str, Any], arrays: Sequence[np.ndarray]) -> str:
    """A scorer's fingerprint: sha256 of its description (canonical JSON) and its arrays (as float64)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()
