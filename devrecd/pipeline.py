"""Pure pipeline stages shared by the CLI, training and the daemon: file -> recording -> clips -> features.

Kept free of I/O policy (no queues, no journal) so that any executor (a thread pool, the daemon,
Ray Data) can call them.
"""

from __future__ import annotations

import os
import time

import numpy as np

from devrecd.audio import AudioError, EvidenceStream, NonFiniteAudio, Recording, StreamWindower, cut_windows, read_evidence, window_starts
from devrecd.config import Config
from devrecd.features import FEATURE_DIM, Frontend, FrontendConfig, extract

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
    return rec, finite_features(extract(clips, frontend_for(cfg.frontend), device=device), path)


def finite_features(feats: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Refuse features with a NaN or infinity: no backend may ever score them (finite samples can
    still overflow the frontend, e.g. samples of 1e30 squared in float32)."""
    if not np.isfinite(feats).all():
        bad = int(np.count_nonzero(~np.isfinite(feats).all(axis=(1, 2))))
        raise NonFiniteAudio(path, f"{bad} window(s) give non-finite features (samples far beyond full scale?)")
    return feats


def stream_features(stream: EvidenceStream, cfg: Config, *, device: str = "cpu", hop_seconds: float | None = None,
                    timings: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode an opened :class:`~devrecd.audio.EvidenceStream` block by block into its (windows, 128, 73)
    features and the window start times (s), without holding the recording's samples.

    The features are those of :func:`features_for_file` (the same clips through the same frontend).
    Raises the stream's :class:`~devrecd.audio.AudioError` (a silent or too short file fails after
    its last block). ``timings["features"]`` receives the seconds spent in the frontend.
    """
    fe = cfg.frontend
    hop = max(1, int(round((cfg.audio.hop_seconds if hop_seconds is None else hop_seconds) * fe.sample_rate)))
    windower = StreamWindower(fe.clip_samples, hop)
    frontend = frontend_for(fe)
    expected = len(window_starts(max(1, stream.expected_frames), fe.clip_samples, hop)) if stream.expected_frames else 8
    out = np.empty((expected, fe.n_frames, FEATURE_DIM), dtype=np.float32)
    n = 0

    def add(clips: np.ndarray) -> None:
        nonlocal out, n
        if not len(clips):
            return
        t0 = time.perf_counter()
        feats = finite_features(extract(clips, frontend, device=device), stream.path)
        if timings is not None:
            timings["features"] = timings.get("features", 0.0) + time.perf_counter() - t0
        if n + len(feats) > len(out):
            grown = np.empty((max(2 * len(out), n + len(feats)),) + out.shape[1:], dtype=np.float32)
            grown[:n] = out[:n]
            out = grown
        out[n : n + len(feats)] = feats
        n += len(feats)

    pending: list[np.ndarray] = []
    try:
        for block in stream.blocks():
            clips = windower.feed(block)
            if len(clips):
                pending.append(clips)
            if sum(map(len, pending)) >= _CLIPS_PER_EXTRACT:
                add(np.concatenate(pending))
                pending = []
        pending.append(windower.finish())
        add(np.concatenate(pending))
    except AudioError as exc:
        raise stream.tag(exc) from None
    feats = out[:n] if n == len(out) else out[:n].copy()
    return feats, np.asarray(windower.starts, dtype=np.float64) / fe.sample_rate


_CLIPS_PER_EXTRACT = 16  # clips gathered before one frontend call (bounded memory, few small calls)
