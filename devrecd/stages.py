"""Pure stages shared by the CLI, training, the runner and the cluster job: file -> recording -> clips -> features.

Kept free of I/O policy (no queues, no journal) so that any executor (a thread pool, the daemon,
Ray Data) can call them. Also the device choice (:func:`resolve_device`) and why a file failed
(:class:`Failure`). The lowest layer that reads files as a whole: it imports only ``audio``,
``features``, ``config`` and ``errors``, and everything that works on recordings sits above it
(``backends``, ``openset``, ``data``, ``train``, ``export``, and ``pipeline``, the daemon's way
through these stages).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from devrecd.audio import AudioError, EvidenceStream, NonFiniteAudio, Recording, StreamWindower, cut_windows, read_evidence, window_starts
from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.features import FEATURE_DIM, Frontend, FrontendConfig, extract

_FRONTENDS: dict[str, Frontend] = {}
# NVIDIA's driver; AMD's (ROCm builds of torch say "cuda" too); WSL2's GPU paravirtualisation (CUDA on WSL)
_GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu' (also without torch: the serving install
    computes features with numpy on the CPU); anything else is returned as is."""
    if name != "auto":
        return name
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in _GPU_DRIVER_NODES):
        return "cpu"  # no GPU driver: torch (2-3 s and 300 MB to import) could not see a GPU anyway
    try:
        import torch
    except ImportError:
        return "cpu"

    return "cuda" if torch.cuda.is_available() else "cpu"


def frontend_for(cfg: FrontendConfig) -> Frontend:
    """One Frontend per configuration (its tables are built once)."""
    key = cfg.fingerprint()
    if key not in _FRONTENDS:
        _FRONTENDS[key] = Frontend(cfg)
    return _FRONTENDS[key]


def hop_samples(hop_seconds: float, sample_rate: int) -> int:
    """The hop between clips in whole samples at ``sample_rate`` (at least one)."""
    return max(1, int(round(hop_seconds * sample_rate)))


def clips_for(rec: Recording, frontend: FrontendConfig, hop_seconds: float) -> np.ndarray:
    """The recording cut into (n, clip_samples) clips."""
    return cut_windows(rec.samples, frontend.clip_samples, hop_samples(hop_seconds, frontend.sample_rate))


def features_for_file(path: str | os.PathLike, cfg: Config, *, device: str = "cpu", hop_seconds: float | None = None,
                      transform: Callable[[np.ndarray, int], np.ndarray] | None = None) -> tuple[Recording, np.ndarray]:
    """Decode one file and return it with its (windows, 128, 73) features; ``transform(samples, rate)``,
    when given, replaces the decoded samples first (e.g. a transmission channel) and the returned
    recording carries them."""
    rec = read_evidence(path, cfg.frontend.sample_rate, cfg.audio)
    if transform is not None:
        rec = replace(rec, samples=np.ascontiguousarray(transform(rec.samples, rec.sample_rate), dtype=np.float32))
    clips = clips_for(rec, cfg.frontend, cfg.audio.hop_seconds if hop_seconds is None else hop_seconds)
    return rec, finite_features(extract(clips, frontend_for(cfg.frontend), device=device), path)


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




def finite_features(feats: Any, path: str | os.PathLike) -> Any:
    """Refuse features with a NaN or infinity: no backend may ever score them (finite samples can
    still overflow the frontend, e.g. samples of 1e30 squared in float32). Numpy, or a torch tensor
    checked on its own device."""
    if isinstance(feats, np.ndarray):
        ok = np.isfinite(feats).all(axis=(1, 2))
    else:
        ok = feats.isfinite().all(dim=2).all(dim=1).cpu().numpy()
    if not ok.all():
        raise NonFiniteAudio(path, f"{int((~ok).sum())} window(s) give non-finite features (samples far beyond full scale?)")
    return feats


def stream_features(stream: EvidenceStream, cfg: Config, *, device: str = "cpu", hop_seconds: float | None = None,
                    timings: dict[str, float] | None = None, on_device: bool = False,
                    sink: Callable[[Any, int], None] | None = None) -> tuple[Any, np.ndarray]:
    """Decode an opened :class:`~devrecd.audio.EvidenceStream` block by block into its (windows, 128, 73)
    features and the window start times (s), without holding the recording's samples.

    The features are those of :func:`features_for_file` (the same clips through the same frontend):
    a numpy array, or with ``on_device`` a torch tensor left on ``device`` (:func:`features_on_device`).
    Raises the stream's :class:`~devrecd.audio.AudioError` (a silent or too short file fails after
    its last block; non-finite features fail at once). ``timings`` receives the seconds spent in the
    frontend (``features``; on a device also ``h2d`` and ``frontend``).

    With ``sink``, each chunk of features is handed to ``sink(features, first_window)`` as soon as it
    is computed and not kept (the returned features are then None), so a file of any length holds
    one chunk at a time (the sink may block: backpressure). Time spent inside the sink is not
    counted as ``features``.
    """
    fe = cfg.frontend
    hop = hop_samples(cfg.audio.hop_seconds if hop_seconds is None else hop_seconds, fe.sample_rate)
    windower = StreamWindower(fe.clip_samples, hop)
    frontend = frontend_for(fe)
    expected = len(window_starts(max(1, stream.expected_frames), fe.clip_samples, hop)) if stream.expected_frames else 8
    if sink is not None:
        expected = 0
    out = np.empty((0 if on_device else expected, fe.n_frames, FEATURE_DIM), dtype=np.float32)
    on_gpu: list[Any] = []
    spent = timings if timings is not None else {}
    n = 0

    def add(clips: np.ndarray) -> None:
        nonlocal out, n
        if not len(clips):
            return
        t0 = time.perf_counter()
        if on_device:
            feats, steps = features_on_device(clips, frontend, device)
            for k, v in steps.items():
                spent[k] = spent.get(k, 0.0) + v
            feats = finite_features(feats, stream.path)
        else:
            feats = finite_features(extract(clips, frontend, device=device), stream.path)
        spent["features"] = spent.get("features", 0.0) + time.perf_counter() - t0
        if sink is not None:
            sink(feats, n)
        elif on_device:
            on_gpu.append(feats)
        else:
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
            if sum(map(len, pending)) >= (_CLIPS_PER_DEVICE_CALL if on_device else _CLIPS_PER_EXTRACT):
                add(np.concatenate(pending))
                pending = []
        pending.append(windower.finish())
        add(np.concatenate(pending))
    except AudioError as exc:
        raise stream.tag(exc) from None
    starts = np.asarray(windower.starts, dtype=np.float64) / fe.sample_rate
    if sink is not None:
        return None, starts
    if on_device:
        import torch

        return (on_gpu[0] if len(on_gpu) == 1 else torch.cat(on_gpu)), starts
    return (out[:n] if n == len(out) else out[:n].copy()), starts


_CLIPS_PER_DEVICE_CALL = 256  # as extract() on a GPU: large batches, bounded FFT workspace
_CLIPS_PER_EXTRACT = 16  # clips gathered before one frontend call (bounded memory, few small calls)
