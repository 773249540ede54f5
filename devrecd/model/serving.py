"""The serving graph: raw features -> FP32 normalisation -> network (fp32|fp16) -> FP32 softmax
(or, for an open-set embedder, -> ``network.embed``).

One module, used by ``devrecd export`` (it is what the ONNX file contains) and by the torch backend,
so that both run exactly the same computation. Normalisation and softmax live in the graph (as
wespeaker's export wrapper does), so a backend needs nothing but the contract to serve it. The
normalisation stays FP32 even in an FP16 graph: the raw pre-Fbank energies reach ~1e6 and overflow
FP16 before they are normalised (``../shared/design/gpu-notes.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from devrecd.errors import ArtifactError
from devrecd.features import FEATURE_DIM

PRECISIONS = ("fp32", "fp16")


class InferenceGraph(torch.nn.Module):
    """``network`` (NORMALISED (B, 128, 73) features -> logits) wrapped to take raw features and
    return probabilities."""

    def __init__(self, network: torch.nn.Module, norm_mean: np.ndarray, norm_std: np.ndarray, *,
                 precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ArtifactError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}", reason="export")
        mean = np.asarray(norm_mean, dtype=np.float32).reshape(FEATURE_DIM)
        std = np.asarray(norm_std, dtype=np.float32).reshape(FEATURE_DIM)
        if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)) or np.any(std <= 0):
            raise ArtifactError("normalisation statistics must be finite with std > 0", reason="checkpoint_invalid")
        self.register_buffer("mean", torch.from_numpy(mean.copy()))
        self.register_buffer("inv_std", torch.from_numpy((1.0 / std).astype(np.float32)))
        self.half_precision = precision == "fp16"
        self.network = network.half() if self.half_precision else network.float()

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """Raw features -> the network's input (in FP32: raw pre-Fbank energies overflow FP16)."""
        x = (features - self.mean) * self.inv_std
        return x.half() if self.half_precision else x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.network(self.normalise(features))
        return torch.softmax(logits.float(), dim=-1)


class EmbeddingGraph(InferenceGraph):
    """The same normalisation, then the network's ``embed``: raw features -> (B, D) float32 embeddings
    (not unit length) of an open-set embedder (``devrecd export-embedder``)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.network.embed(self.normalise(features)).float()


def inference_graph(network: torch.nn.Module, norm_mean: np.ndarray, norm_std: np.ndarray, *,
                    precision: str = "fp32") -> InferenceGraph:
    """:class:`InferenceGraph` of ``network``, in eval mode."""
    return InferenceGraph(network, norm_mean, norm_std, precision=precision).eval()


def graph_for_checkpoint(ckpt: Any, *, precision: str = "fp32") -> InferenceGraph:
    """:func:`inference_graph` of a loaded :class:`~devrecd.model.checkpoint.Checkpoint`."""
    return inference_graph(ckpt.build(), ckpt.norm_mean, ckpt.norm_std, precision=precision)


def embedding_graph(network: torch.nn.Module, norm_mean: np.ndarray, norm_std: np.ndarray) -> EmbeddingGraph:
    """:class:`EmbeddingGraph` of a network that has ``embed``, in eval mode (FP32)."""
    if not callable(getattr(network, "embed", None)):
        raise ArtifactError(f"{type(network).__name__} has no embed(); it is not an embedder", reason="no_embedding")
    return EmbeddingGraph(network, norm_mean, norm_std).eval()
