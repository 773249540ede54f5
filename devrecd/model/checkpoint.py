"""Self-describing checkpoints: everything needed to rebuild, normalise and label the network.

A checkpoint is a ``torch.save``d dict (no pickled classes: only tensors, numbers, strings, lists
and dicts, so ``torch.load(weights_only=True)`` can read it). It is written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devrecd.errors import ArtifactError, ConfigError
from devrecd.features import FEATURE_DIM, FrontendConfig
from devrecd.fsutil import atomic_write, sha256_artifact
from devrecd.validation import read_snr_range

FORMAT = "devrecd-checkpoint/1"


@dataclass
class Checkpoint:
    arch: str
    hparams: dict[str, Any]  # NetConfig fields except num_classes (or another architecture's)
    labels: list[str]
    frontend: FrontendConfig
    norm_mean: np.ndarray  # (73,) float32
    norm_std: np.ndarray  # (73,) float32; features are normalised as (x - mean) / std
    state_dict: dict[str, Any]
    dataset_sha256: str = ""
    split: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, metrics, versions, seed, ...

    def build(self):
        """The network in eval mode with these weights (normalisation NOT included)."""
        from devrecd.model import build_model

        model = build_model(self.arch, len(self.labels), **self.hparams)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise ArtifactError(f"checkpoint weights do not fit architecture {self.arch!r}: {exc}") from None
        return model.eval()

    def normalise(self, features):
        """(x - mean) / std on a numpy array or torch tensor of (..., 73) features."""
        if isinstance(features, np.ndarray):
            return (features - self.norm_mean) / self.norm_std
        import torch

        mean = torch.as_tensor(self.norm_mean, device=features.device)
        std = torch.as_tensor(self.norm_std, device=features.device)
        return (features - mean) / std

    def check_compatible(self, *, arch: str | None = None, frontend: FrontendConfig | None = None) -> None:
        """Raise :class:`ArtifactError` when this checkpoint is of another architecture or frontend."""
        if arch is not None and arch != self.arch:
            raise ArtifactError(f"checkpoint is architecture {self.arch!r}, not {arch!r}", reason="checkpoint_arch")
        if frontend is not None and frontend != self.frontend:
            raise ArtifactError("checkpoint was trained with another frontend (trained != configured: "
                                + self.frontend.describe_mismatch(frontend) + "); use the config it was trained with",
                                reason="checkpoint_frontend")

    @property
    def validated_snr_db(self) -> tuple[float, float] | None:
        """[low, high] SNR (dB) of the recordings the network was trained on (``meta``, written by
        ``devrecd train``), or None for a checkpoint made before it was recorded. Malformed: ArtifactError."""
        try:
            return read_snr_range("meta.validated_snr_db", self.meta.get("validated_snr_db"))
        except ValueError as exc:
            raise ArtifactError(f"checkpoint {exc}", reason="checkpoint_invalid") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "arch": self.arch, "hparams": self.hparams, "labels": list(self.labels),
            "frontend": self.frontend.to_dict(), "norm_mean": self.norm_mean.astype(np.float32).tolist(),
            "norm_std": self.norm_std.astype(np.float32).tolist(), "state_dict": self.state_dict,
            "dataset_sha256": self.dataset_sha256, "split": self.split, "meta": self.meta,
        }


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, extra: dict[str, Any] | None = None) -> str:
    """Write atomically (temp file + rename); returns the file's sha256. ``extra`` adds keys
    (e.g. optimizer state for resuming) that loading ignores."""
    import torch

    blob = ckpt.to_dict()
    if extra:
        blob.update(extra)
    return sha256_artifact(atomic_write(path, lambda fh: torch.save(blob, fh)))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory means its ``best.pt``, else its ``last.pt`` (a run whose first loss was NaN
    never writes best.pt); a file is itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise ArtifactError(f"{path}: no best.pt or last.pt in this run directory")
    if not path.exists():
        raise ArtifactError(f"{path}: no such checkpoint")
    return path


def load_raw(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict, validated (for resuming, which also needs the extra keys)."""
    import torch

    path = resolve_checkpoint_path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        import pickle

        # torch's message for a file that is not a checkpoint is advice about weights_only (not ours to give)
        why = ("not a torch checkpoint" if isinstance(exc, pickle.UnpicklingError)
               else f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}")
        raise ArtifactError(f"{path}: not a readable checkpoint ({why}); expected a .pt written by "
                            f"`devrecd train` / `devrecd train-embedder` or its run directory") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a devrecd checkpoint (format {blob.get('format') if isinstance(blob, dict) else '?'!r})")
    return blob


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a ``.pt`` file or a run directory's ``best.pt``; raises ArtifactError on a bad file."""
    blob = load_raw(path)
    mean = np.asarray(blob["norm_mean"], dtype=np.float32)
    std = np.asarray(blob["norm_std"], dtype=np.float32)
    if mean.shape != (FEATURE_DIM,) or std.shape != (FEATURE_DIM,) or not (std > 0).all():
        raise ArtifactError(f"{path}: normalisation statistics are missing or invalid")
    try:
        frontend = FrontendConfig.from_dict(blob["frontend"])
    except ConfigError as exc:
        raise ArtifactError(f"{path}: bad frontend: {exc}") from None
    return Checkpoint(
        arch=blob["arch"], hparams=dict(blob["hparams"]), labels=list(blob["labels"]),
        frontend=frontend, norm_mean=mean, norm_std=std,
        state_dict=blob["state_dict"], dataset_sha256=blob.get("dataset_sha256", ""),
        split=blob.get("split", {}), meta=blob.get("meta", {}),
    )
