"""Vector helpers shared by the registry, the scorers and the verdict: a leaf (numpy only)."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): the one unit normalisation of the open set."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)
