"""A checkpoint run directly by torch: on the CPU for development, on a CUDA GPU for serving.

On a GPU the features may arrive as a CUDA tensor (the CUDA frontend's output) and are used in
place: no host round trip between the frontend and the network. Two options speed the network up
there (``[backend]`` ``autocast`` and ``cuda_graphs``):

- autocast (``fp16`` / ``bf16``): convolutions, LSTMs and matmuls in half precision. The graph's
  normalisation is elementwise and stays FP32 (the raw pre-Fbank energies overflow FP16), and
  autocast keeps the softmax in FP32.
- CUDA graphs: the network is 128 dependent ConvLSTM steps plus two LSTM directions, so at small
  batches the GPU waits on kernel launches, not arithmetic. Each batch size is padded up to a
  power-of-two bucket whose graph is captured once (on first use) and then replayed with one launch.

Both run the same serving graph (:mod:`devrecd.model.serving`) as the export. The bucketing is plain
Python (:func:`graph_buckets`, :func:`bucket_for`) and is tested without a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from devrecd.backends.base import (InferenceError, as_numpy_features, batch_slices, check_features_shape,
                                   is_checkpoint, need_model, snr_range_json)
from devrecd.errors import ArtifactError, ConfigError
from devrecd.fsutil import sha256_artifact
from devrecd.stages import resolve_device

if TYPE_CHECKING:
    from devrecd.config import BackendConfig

log = logging.getLogger("devrecd.backends")

AUTOCAST = ("none", "fp16", "bf16")
GRAPH_MAX_BATCH = 1024  # largest captured graph; bigger batches are split into balanced chunks


def graph_buckets(max_batch: int = GRAPH_MAX_BATCH) -> tuple[int, ...]:
    """Batch sizes a graph is captured for: powers of two up to ``max_batch`` (and it, if not one)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``n`` rows (``n`` must not exceed the largest)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


class TorchBackend:
    """The same serving graph as the export (normalisation + network + softmax), from a checkpoint."""

    name = "torch"

    @classmethod
    def from_config(cls, cfg: BackendConfig, model: Path | None, device: str | None = None) -> TorchBackend:
        """A checkpoint (run folder or ``.pt``) on ``device`` (default: ``backend.device``)."""
        model = need_model(model, cls.name)
        if not is_checkpoint(model):
            raise ArtifactError(f"backend.kind = 'torch' runs a checkpoint (run folder or .pt), not {model.name}",
                                reason="not_checkpoint")
        device = device or resolve_device(cfg.device)
        if cfg.cuda_graphs and not device.startswith("cuda"):  # device = "auto" on a machine without a GPU
            log.warning("backend.cuda_graphs ignored: no CUDA GPU, torch runs on the CPU", extra={"device": device})
        return cls(model, device=device, autocast=cfg.autocast, cuda_graphs=cfg.cuda_graphs and device.startswith("cuda"))

    def __init__(self, checkpoint: str | os.PathLike, *, device: str = "cpu", precision: str = "fp32",
                 autocast: str = "none", cuda_graphs: bool = False) -> None:
        import torch

        from devrecd.model.serving import graph_for_checkpoint
        from devrecd.model.checkpoint import load_checkpoint, resolve_checkpoint_path

        if autocast not in AUTOCAST:
            raise ConfigError(f"backend.autocast must be one of {', '.join(AUTOCAST)}, not {autocast!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from devrecd.errors import MissingDependency

            raise MissingDependency(f"backend.device = {device!r} but torch {torch.__version__} sees no CUDA GPU")
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"backend.cuda_graphs needs a CUDA device, not {device!r}")
        if precision == "fp16" and autocast != "none":
            raise ConfigError("backend.autocast applies to an FP32 graph: use precision fp32 with autocast")
        self.path = Path(checkpoint)
        file = resolve_checkpoint_path(self.path)  # a run folder's best.pt, else its last.pt
        ckpt = load_checkpoint(file)
        self.model_sha256 = sha256_artifact(file)  # the file loaded
        self.precision = precision
        self.autocast = autocast
        self.cuda_graphs = cuda_graphs
        self.graph = graph_for_checkpoint(ckpt, precision=precision).to(self.device)
        self.labels = tuple(ckpt.labels)
        self.frontend = ckpt.frontend
        self.validated_snr_db = ckpt.validated_snr_db  # the training recordings' SNR range (None: not recorded)
        # Features on this device are used in place (the pipeline keeps CUDA frontend output there).
        self.input_device: str | None = str(self.device) if self.device.type == "cuda" else None
        self.max_batch: int | None = GRAPH_MAX_BATCH if cuda_graphs else None
        self.concurrency: int | None = 1  # torch already spreads one batch over every core (or the GPU)
        self.buckets = graph_buckets() if cuda_graphs else ()
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}  # bucket -> (CUDAGraph, static in, static out)
        self._pool: Any = None
        self._lock = threading.Lock()  # captured graphs share static buffers: one replay at a time

    # --- running ------------------------------------------------------------------------------

    def _autocast(self):
        import contextlib

        import torch

        if self.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.autocast == "fp16" else torch.bfloat16
        # No weight-cast cache: a captured graph must not depend on tensors cached outside it.
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    def _eager(self, x):
        with self._autocast():
            return self.graph(x).float()

    def _captured(self, bucket: int) -> tuple[Any, Any, Any]:
        """The graph for ``bucket`` rows, captured on first use (after warm-up runs on a side stream)."""
        import torch

        if bucket in self._graphs:
            return self._graphs[bucket]
        static_in = torch.zeros((bucket, 128, 73), dtype=torch.float32, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # cuDNN/cuBLAS pick and allocate their workspaces outside the capture
                self._eager(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: decode workers keep using the GPU on their own streams during a capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_out = self._eager(static_in)
        except Exception as exc:  # capture is refused for some kernels; say so rather than run eager
            raise InferenceError(f"CUDA graph capture failed at batch {bucket}: {type(exc).__name__}: {exc} "
                                 "(set backend.cuda_graphs = false)", reason="cuda_graph") from None
        self._graphs[bucket] = (graph, static_in, static_out)
        return self._graphs[bucket]

    def _replay(self, x):
        """Rows of ``x`` through captured graphs (padded to their bucket); returns a new tensor."""
        import torch

        out = torch.empty((x.shape[0], len(self.labels)), dtype=torch.float32, device=self.device)
        with self._lock:
            for rows in batch_slices(x.shape[0], self.buckets[-1]):
                n = rows.stop - rows.start
                graph, static_in, static_out = self._captured(bucket_for(n, self.buckets))
                static_in[:n].copy_(x[rows])
                if n < static_in.shape[0]:
                    static_in[n:].zero_()  # padding rows: finite values, outputs dropped
                graph.replay()
                out[rows].copy_(static_out[:n])
        return out

    def _as_input(self, features: Any):
        import torch

        if isinstance(features, torch.Tensor):
            check_features_shape(tuple(features.shape))
            return features.to(self.device, torch.float32)  # a tensor already here: no copy
        return torch.from_numpy(as_numpy_features(features)).to(self.device)

    def infer_device(self, features: Any) -> Any:
        """(B, 128, 73) features (numpy, or a tensor on any device) -> (B, N) probabilities on this device."""
        import torch

        if self.graph is None:
            raise InferenceError("backend is closed", reason="closed")
        x = self._as_input(features)
        try:
            with torch.inference_mode():
                return self._replay(x) if self.cuda_graphs else self._eager(x)
        except InferenceError:
            raise
        except RuntimeError as exc:  # CUDA out of memory, a device-side error: this batch fails, not the daemon
            raise InferenceError(f"torch failed on a batch of {x.shape[0]} on {self.device}: {exc}") from None

    def infer(self, features: Any) -> np.ndarray:
        """(B, 128, 73) features (numpy, or a torch tensor on any device) -> (B, N) float32 numpy probabilities."""
        return self.infer_device(features).cpu().numpy()

    def warmup(self) -> None:
        """One batch through the network; with CUDA graphs, every bucket's graph captured now, so that no
        request waits for a capture."""
        self.infer(np.zeros((8, 128, 73), np.float32))
        if self.cuda_graphs:
            import torch

            with torch.inference_mode(), self._lock:
                for bucket in self.buckets:
                    self._captured(bucket)
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        import torch

        device = str(self.device)
        if self.device.type == "cuda":
            device += f" {torch.cuda.get_device_name(self.device)}"
        return {"name": self.name, "version": torch.__version__, "device": device,
                "model": str(self.path), "model_sha256": self.model_sha256, "contract_sha256": "",
                "precision": self.precision, "autocast": self.autocast, "cuda_graphs": self.cuda_graphs,
                "engine": "", "labels": len(self.labels), "validated_snr_db": snr_range_json(self.validated_snr_db)}

    def close(self) -> None:
        self.graph = None
        self._graphs.clear()
        self._pool = None
