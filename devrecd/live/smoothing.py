"""The running verdict: the last N judged windows aggregated exactly as a file's windows are."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from devrecd.pipeline.verdict import aggregate


@dataclass(frozen=True)
class Running:
    """The smoothed verdict after a window."""

    device: str
    confidence: float  # renormalised geometric-mean probability of ``device`` over the windows
    agreement: float  # share of those windows whose own best device is ``device``
    windows: int  # how many windows it covers (< N during the first N windows)
    validated: bool = True  # every one of them was judged inside the model's validation


class RunningVerdict:
    """Keeps the probabilities of the last ``n`` judged windows (silent/clipped ones never enter)."""

    def __init__(self, labels: Sequence[str], n: int) -> None:
        if n < 1:
            raise ValueError("live.smoothing must be >= 1")
        self.labels = tuple(labels)
        self._last: deque[np.ndarray] = deque(maxlen=n)
        self._validated: deque[bool] = deque(maxlen=n)

    def add(self, probs: np.ndarray, validated: bool = True) -> Running:
        """Add one window's (N,) probabilities (``validated``: whether the window was judged inside the
        model's validation, devrecd.pipeline.verdict.with_comparison) and return the running verdict."""
        self._last.append(np.asarray(probs, dtype=np.float64).reshape(-1))
        self._validated.append(bool(validated))
        score = aggregate(np.stack(self._last), self.labels)  # the file verdict's rule, on N windows
        best = self.labels.index(score.label)
        return Running(device=score.label, confidence=score.score,
                       agreement=float(np.mean(score.window_labels == best)), windows=len(self._last),
                       validated=all(self._validated))

    def reset(self) -> None:
        """Forget the history (a different input was opened)."""
        self._last.clear()
        self._validated.clear()


class RunningFeatures:
    """The features of the last ``n`` judged windows, for an open-set scorer's running verdict: the
    registry's scorer judges them together, as it judges the windows of one file."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("live.smoothing must be >= 1")
        self._last: deque[np.ndarray] = deque(maxlen=n)

    @property
    def windows(self) -> int:
        return len(self._last)

    def add(self, feats: np.ndarray) -> np.ndarray:
        """Add one window's (clips, frames, dims) features; the last ``n`` windows' features together
        (``feats`` itself while it is the only one)."""
        self._last.append(feats)
        return feats if len(self._last) == 1 else np.concatenate(list(self._last))

    def reset(self) -> None:
        self._last.clear()
