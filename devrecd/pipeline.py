"""Pure pipeline stages shared by the CLI, training and the daemon: file -> recording -> clips -> features.

Kept free of I/O policy (no queues, no journal) so that any executor (a thread pool, the daemon,
Ray Data) can call them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from devrecd.audio import AudioError, Recording, cut_windows, read_evidence, window_starts
from devrecd.config import Config
from devrecd.errors import DevrecdError
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


def serving_windows(rec: Recording, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The serving windows of a decoded recording (``audio.hop_seconds`` apart): the (n,
    clip_samples) clips and their start times in seconds."""
    hop = max(1, int(round(cfg.audio.hop_seconds * cfg.frontend.sample_rate)))
    clips = clips_for(rec, cfg.frontend, cfg.audio.hop_seconds)
    return clips, window_starts(len(rec.samples), cfg.frontend.clip_samples, hop) / cfg.frontend.sample_rate


def serving_features(rec: Recording, cfg: Config, frontend: Frontend, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The serving windows' start times (s) and their (n, 128, 73) features through the one frontend."""
    clips, starts = serving_windows(rec, cfg)
    return starts, extract(clips, frontend, device=device)


@dataclass(frozen=True)
class Failure:
    """Why a file could not be judged, as its verdict record states it."""

    reason: str  # the label of devrecd_errors_total{reason} and of the journal
    detail: str
    sha256: str | None = None  # when the file was read before it failed
    size: int | None = None


def failure_of(exc: BaseException) -> Failure:
    """The recorded failure for an exception raised while a file was read, decoded or featurised:
    typed errors keep their reason; anything else is ``internal``."""
    sha256, size = getattr(exc, "sha256", None), getattr(exc, "size", None)
    if isinstance(exc, AudioError):
        return Failure(exc.reason, exc.detail, sha256, size)
    if isinstance(exc, DevrecdError):
        return Failure(exc.reason, str(exc), sha256, size)
    return Failure("internal", f"{type(exc).__name__}: {exc}", sha256, size)


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
