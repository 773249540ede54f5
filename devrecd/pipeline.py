"""Pure pipeline stages shared by the CLI, training and the daemon: file -> recording -> clips -> features.

Kept free of I/O policy (no queues, no journal) so that any executor (a thread pool, the daemon,
Ray Data) can call them.
"""

from __future__ import annotations

import os

import numpy as np

from devrecd.audio import Recording, cut_windows, read_evidence
from devrecd.config import Config
from devrecd.features import Frontend, FrontendConfig, extract

_FRONTENDS: dict[str, Frontend] = {}


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; anything else is returned as is."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def frontend_for(cfg: FrontendConfig) -> Frontend:
    """One Frontend per configuration (its tables are built once)."""
    key = cfg.fingerprint()
    if key not in _FRONTENDS:
        _FRONTENDS[key] = Frontend(cfg)
    return _FRONTENDS[key]


def clips_for(rec: Recording, frontend: FrontendConfig, hop_seconds: float) -> np.ndarray:
    """The recording cut into (n, clip_samples) clips."""
    hop = max(1, int(round(hop_seconds * frontend.sample_rate)))
    return cut_windows(rec.samples, frontend.clip_samples, hop)


def features_for_file(path: str | os.PathLike, cfg: Config, *, device: str = "cpu",
                      hop_seconds: float | None = None) -> tuple[Recording, np.ndarray]:
    """Decode one file and return it with its (windows, 128, 73) features."""
    rec = read_evidence(path, cfg.frontend.sample_rate, cfg.audio)
    clips = clips_for(rec, cfg.frontend, cfg.audio.hop_seconds if hop_seconds is None else hop_seconds)
    return rec, extract(clips, frontend_for(cfg.frontend), device=device)
