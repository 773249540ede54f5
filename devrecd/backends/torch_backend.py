"""A checkpoint run directly by torch (development, and the GPU baseline for TensorRT)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from devrecd.backends.base import InferenceError, as_numpy_features, check_features_shape


class TorchBackend:
    """The same serving graph as the export (normalisation + network + softmax), from a checkpoint."""

    name = "torch"

    def __init__(self, checkpoint: str | os.PathLike, *, device: str = "cpu", precision: str = "fp32") -> None:
        import torch

        from devrecd.audio import sha256_file
        from devrecd.export import graph_for_checkpoint
        from devrecd.model.checkpoint import load_checkpoint

        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path)
        file = self.path / "best.pt" if self.path.is_dir() else self.path
        self.model_sha256 = sha256_file(file)
        self.device = torch.device(device)
        self.precision = precision
        self.graph = graph_for_checkpoint(ckpt, precision=precision).to(self.device)
        self.labels = tuple(ckpt.labels)
        self.frontend = ckpt.frontend
        self.max_batch: int | None = None
        self.concurrency: int | None = 1  # torch already spreads one batch over every core (or the GPU)

    def warmup(self) -> None:
        self.infer(np.zeros((8, 128, 73), np.float32))
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def infer(self, features: Any) -> np.ndarray:
        """(B, 128, 73) features (numpy, or a torch tensor on any device) -> (B, N) probabilities."""
        import torch

        if self.graph is None:
            raise InferenceError("backend is closed", reason="closed")
        if isinstance(features, torch.Tensor):
            check_features_shape(tuple(features.shape))
            x = features.to(self.device, torch.float32)
        else:
            x = torch.from_numpy(as_numpy_features(features)).to(self.device)
        with torch.inference_mode():
            return self.graph(x).float().cpu().numpy()

    def describe(self) -> dict:
        import torch

        return {"name": self.name, "version": torch.__version__, "device": str(self.device),
                "model": str(self.path), "model_sha256": self.model_sha256, "contract_sha256": "",
                "precision": self.precision, "engine": "", "labels": len(self.labels)}

    def close(self) -> None:
        self.graph = None
