"""Device embeddings from a trained checkpoint: features (the one frontend) -> normalise -> ``model.embed``.

Any architecture whose module has ``embed(x) -> (B, D)`` is an embedder, selected by the
checkpoint's ``arch``:

* ``paper``: the paper's network; the embedding is its penultimate Dense(128) output, trained with
  the closed-set softmax on many devices.
* ``asp``: our BiLSTM + attentive statistics pooling + cosine head (:mod:`devrecd.model.asp`).

Features come from :func:`devrecd.stages.features_for_file` with the CHECKPOINT's frontend, and
are normalised with the checkpoint's statistics exactly as in training, so there is no second
feature path. The embedder's :attr:`Embedder.fingerprint` (weights, normalisation, frontend, arch)
is stored in every registry so that embeddings of different models are never compared.

:class:`OnnxEmbedder` serves the same network from its embedder export (``devrecd export-embedder``:
``NAME.onnx`` + embedder contract) with ONNX Runtime and no torch; it carries the checkpoint's
fingerprint, so registries enrolled with the checkpoint accept it. :func:`load_embedder` is the one
way to load either.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from devrecd.audio import Recording
from devrecd.config import Config
from devrecd.contract import EMBEDDING_NAME, INPUT_NAME, EmbedderContract, load_for_onnx
from devrecd.errors import ArtifactError
from devrecd.features import FEATURE_DIM, FrontendConfig
from devrecd.stages import features_for_file

EMBED_BATCH = 64  # windows per forward pass (bounded memory on long recordings)


class _EmbeddingModel(ABC):
    """What both embedders share: their description and the one feature path for a file."""

    fingerprint: str
    arch: str
    dim: int
    frontend: FrontendConfig
    labels: tuple[str, ...]
    source: str
    device: str

    def describe(self) -> dict[str, Any]:
        """What a registry records about the model its embeddings come from."""
        return {"fingerprint": self.fingerprint, "arch": self.arch, "dim": self.dim,
                "frontend_sha256": self.frontend.fingerprint(), "source": self.source,
                "training_labels": len(self.labels)}

    @abstractmethod
    def embed_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, 128, 73) raw features -> (n, D) float32 window embeddings (not yet unit length)."""

    def embed_file(self, path: str | os.PathLike, cfg: Config, *, hop_seconds: float | None = None
                   ) -> tuple[Recording, np.ndarray]:
        """Decode a recording and return it with its (windows, D) window embeddings."""
        # The model's frontend, not the config's: the model defines what its input means.
        rec, feats = features_for_file(path, replace(cfg, frontend=self.frontend), device=self.device,
                                       hop_seconds=hop_seconds)
        return rec, self.embed_features(feats)


class Embedder(_EmbeddingModel):
    """A trained network used as an embedding extractor (eval mode, no gradients)."""

    def __init__(self, model: Any, *, arch: str, hparams: dict[str, Any], frontend: FrontendConfig,
                 norm_mean: np.ndarray, norm_std: np.ndarray, labels: Sequence[str] = (), device: str = "cpu",
                 source: str = "") -> None:
        import torch

        if not callable(getattr(model, "embed", None)):
            raise ArtifactError(f"architecture {arch!r} has no embed(); it cannot be used for enrolment",
                                reason="no_embedding")
        self.model = model.to(device).eval()
        self.arch, self.hparams, self.frontend, self.labels = arch, dict(hparams), frontend, tuple(labels)
        self.norm_mean = np.asarray(norm_mean, dtype=np.float32)
        self.norm_std = np.asarray(norm_std, dtype=np.float32)
        self.device = device
        self.source = source
        self._mean = torch.as_tensor(self.norm_mean, device=device)
        self._std = torch.as_tensor(self.norm_std, device=device)
        self.fingerprint = fingerprint(arch, self.hparams, frontend, self.norm_mean, self.norm_std,
                                       self.model.state_dict())
        with torch.no_grad():
            probe = torch.zeros(2, frontend.n_frames, FEATURE_DIM, device=device)
            self.dim = int(self.model.embed(probe).shape[1])

    @classmethod
    def from_checkpoint(cls, ckpt: Any, *, device: str = "cpu", source: str = "") -> Embedder:
        """From a loaded :class:`devrecd.model.checkpoint.Checkpoint`."""
        return cls(ckpt.build(), arch=ckpt.arch, hparams=ckpt.hparams, frontend=ckpt.frontend,
                   norm_mean=ckpt.norm_mean, norm_std=ckpt.norm_std, labels=ckpt.labels, device=device, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu") -> Embedder:
        """Load from a run directory or a ``.pt`` checkpoint (``devrecd.model.checkpoint.load_checkpoint``)."""
        try:
            from devrecd.model.checkpoint import load_checkpoint
        except ImportError as exc:  # the model package is part of devrecd; this is a broken install
            raise ArtifactError(f"cannot load checkpoints: {exc}", reason="no_model_package") from None
        return cls.from_checkpoint(load_checkpoint(path), device=device, source=str(Path(path).resolve()))

    def embed_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, 128, 73) raw features -> (n, D) float32 window embeddings (not yet unit length)."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(feats), EMBED_BATCH):
                x = torch.as_tensor(np.ascontiguousarray(feats[i:i + EMBED_BATCH], dtype=np.float32), device=self.device)
                out.append(self.model.embed((x - self._mean) / self._std).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class OnnxEmbedder(_EmbeddingModel):
    """An embedder export served by ONNX Runtime on the CPU (no torch): the ``.onnx`` is checked
    against its embedder contract (size, sha256) before a session is made."""

    def __init__(self, onnx_path: str | os.PathLike, *, threads: int = 1) -> None:
        from devrecd.backends.onnxrt import ort_session

        path = Path(onnx_path)
        self.contract: EmbedderContract = load_for_onnx(path, kind=EmbedderContract)  # sha256 + size checked
        self.session = ort_session(path, threads=threads)
        inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [(INPUT_NAME, "tensor(float)")] or outputs != [EMBEDDING_NAME]:
            raise ArtifactError(f"{path}: graph I/O {inputs} -> {outputs} is not the embedder contract's "
                                f"{INPUT_NAME} (float) -> {EMBEDDING_NAME}", reason="contract_mismatch")
        c = self.contract
        self.fingerprint, self.arch, self.dim, self.frontend = c.fingerprint, c.arch, c.dim, c.frontend
        self.labels = c.labels
        self.source = str(path.resolve())
        self.device = "cpu"  # ONNX Runtime's CPU provider: features are computed on the CPU too
        self.threads = threads
        dims = self.session.get_outputs()[0].shape
        if len(dims) != 2 or dims[1] != c.dim:
            raise ArtifactError(f"{path}: the graph's embeddings are {dims}, not the contract's (batch, {c.dim})",
                                reason="contract_mismatch")

    def describe(self) -> dict[str, Any]:
        """The registry's description of the network, plus the served file's identity: the export's
        sha256 (checked against its contract at load) and the checkpoint it was exported from."""
        return {**super().describe(), "onnx_sha256": self.contract.onnx_sha256,
                "checkpoint_sha256": self.contract.checkpoint_sha256}

    def embed_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, 128, 73) raw features -> (n, D) float32 window embeddings (not yet unit length)."""
        from devrecd.backends.base import InferenceError

        try:
            out = [self.session.run([EMBEDDING_NAME], {INPUT_NAME: np.ascontiguousarray(feats[i:i + EMBED_BATCH],
                                                                                        dtype=np.float32)})[0]
                   for i in range(0, len(feats), EMBED_BATCH)]
        except Exception as exc:  # onnxruntime's own exception types
            raise InferenceError(f"ONNX Runtime failed to embed {len(feats)} window(s): {exc}") from None
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, self.dim), np.float32)


def load_embedder(path: str | os.PathLike, *, device: str = "cpu", threads: int = 1) -> Embedder | OnnxEmbedder:
    """The network embedder at ``path``: an embedder export ``NAME.onnx`` -> :class:`OnnxEmbedder`
    (ONNX Runtime, no torch; ``threads`` intra-op threads); a ``.pt`` checkpoint or run directory ->
    :class:`Embedder` (torch, on ``device``). A classifier export is refused (``reason="contract_kind"``)."""
    if Path(path).suffix.lower() == ".onnx":
        return OnnxEmbedder(path, threads=threads)
    return Embedder.load(path, device=device)


def fingerprint(arch: str, hparams: dict[str, Any], frontend: FrontendConfig, norm_mean: np.ndarray,
                norm_std: np.ndarray, state_dict: dict[str, Any]) -> str:
    """sha256 over everything that shapes an embedding: arch, hparams, frontend, normalisation, weights."""
    h = hashlib.sha256()
    h.update(json.dumps({"arch": arch, "hparams": hparams, "frontend": frontend.fingerprint()},
                        sort_keys=True, default=str).encode())
    h.update(np.asarray(norm_mean, dtype=np.float32).tobytes())
    h.update(np.asarray(norm_std, dtype=np.float32).tobytes())
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
