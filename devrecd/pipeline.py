"""Pure pipeline stages shared by the CLI, training and the daemon: file -> recording -> clips -> features.

Kept free of I/O policy (no queues, no journal) so that any executor (a thread pool, the daemon,
Ray Data) can call them.
"""

from __future__ import annotations

import os
import time
from typing import Any

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


def features_on_device(clips: np.ndarray, frontend: Frontend, device: str) -> tuple[Any, dict[str, float]]:
    """(n, 128, 73) features as a torch tensor left on ``device`` (a GPU backend takes it in place: no
    copy back to the host), and the seconds of the host-to-device copy and of the frontend.

    The current CUDA stream is synchronised after each step, so the times are real GPU times; run
    this on a worker's own stream so that the wait is for this work only, not for inference.
    """
    import torch

    t0 = time.perf_counter()
    x = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float32)).to(device)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.current_stream(x.device).synchronize()
    t1 = time.perf_counter()
    chunk = 256  # as extract() on a GPU: bounds the FFT workspace of a long recording
    feats = frontend(x) if len(x) <= chunk else torch.cat([frontend(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    if cuda:
        torch.cuda.current_stream(x.device).synchronize()
    return feats, {"h2d": t1 - t0, "frontend": time.perf_counter() - t1}
