"""The one small interface every inference backend implements, and the helpers they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np

from devrecd.errors import ArtifactError, ConfigError, DevrecdError
from devrecd.features import FEATURE_DIM, N_FRAMES, FrontendConfig

INSTALL_GPU_HINT = "pip install 'devrecd[gpu]' (TensorRT + pycuda; needs an NVIDIA GPU and driver)"


class InferenceError(DevrecdError):
    """A batch could not be run (bad shape, runtime failure)."""

    reason = "inference"


@runtime_checkable
class Backend(Protocol):
    """Load an artifact, warm up, infer a batch of features, say what it is: what the pipeline
    needs of a backend. A class of :data:`devrecd.backends.BACKENDS` (the registry, by kind) declares
    its kind (``backend.kind``) as ``name`` and loads from the configuration with
    ``from_config(cfg: BackendConfig, model: Path | None)``."""

    name: str  # the kind: "onnxruntime" | "tensorrt" | "torch"
    labels: tuple[str, ...]
    frontend: FrontendConfig  # what the model was trained with
    max_batch: int | None  # largest batch the artifact takes at once; bigger batches are split
    concurrency: int | None  # infer() calls that may run at once from different threads (None: any)

    def warmup(self) -> None: ...
    def infer(self, features: Any) -> np.ndarray: ...
    def describe(self) -> dict: ...
    def close(self) -> None: ...


def is_checkpoint(path: Path) -> bool:
    """A run folder or a ``.pt``/``.pth`` file (torch serves it), not an export."""
    return path.is_dir() or path.suffix in (".pt", ".pth")


def need_model(model: Path | None, kind: str) -> Path:
    """``backend.model``, refused when not set or not there."""
    if model is None:
        raise ConfigError(f"backend.kind = {kind!r} needs backend.model (export/NAME.onnx, or a checkpoint for torch)")
    if not model.exists():
        raise ArtifactError(f"model not found: {model}", reason="model_missing")
    return model


def cuda_index(device: str) -> int:
    """'cuda:1' -> 1; 'auto', 'cuda' -> 0."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def snr_range_json(snr_range: tuple[float, float] | None) -> list[float] | None:
    """The model's validated SNR range as ``describe()`` gives it (``validated_snr_db``: [low, high] in
    dB, None when the model does not record one); the closed-set verdict reads it there."""
    return None if snr_range is None else [float(snr_range[0]), float(snr_range[1])]


def batch_slices(n: int, max_batch: int | None) -> Iterator[slice]:
    """Consecutive slices of at most ``max_batch`` rows covering ``range(n)`` (one slice if unbounded).

    Sizes are balanced (100 at max 64 -> 50 + 50, not 64 + 36) so that no tiny tail batch runs
    at a shape the engine was not tuned for.
    """
    if n <= 0:
        return
    if not max_batch or n <= max_batch:
        yield slice(0, n)
        return
    parts = -(-n // max_batch)
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield slice(int(lo), int(hi))


def check_features_shape(shape: tuple[int, ...]) -> None:
    """Refuse anything but (B, 128, 73) with B >= 1."""
    if len(shape) != 3 or tuple(shape[1:]) != (N_FRAMES, FEATURE_DIM) or shape[0] < 1:
        raise InferenceError(f"features must be (batch, {N_FRAMES}, {FEATURE_DIM}), got {tuple(shape)}",
                             reason="bad_input")


def as_numpy_features(features: Any) -> np.ndarray:
    """(B, 128, 73) float32 C-contiguous numpy from numpy or a torch tensor (any device)."""
    if hasattr(features, "detach"):  # a torch tensor: copy to host once
        features = features.detach().to("cpu").numpy()
    arr = np.ascontiguousarray(features, dtype=np.float32)
    check_features_shape(arr.shape)
    return arr
