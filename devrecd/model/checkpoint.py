"""Self-describing checkpoints: everything needed to rebuild, feed and audit a trained network.

A checkpoint file is a ``torch.save`` of plain data only (tensors, strings, numbers; structured
parts as JSON text) so that it loads with ``torch.load(weights_only=True)``: opening a checkpoint
never runs code from it. ``last.pt`` of a run adds a ``resume`` entry (optimizer, scheduler and RNG
states) that :mod:`devrecd.train` uses to continue an interrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devrecd.errors import ArtifactError
from devrecd.features import FEATURE_DIM, FrontendConfig

FORMAT = "devrecd-checkpoint"
VERSION = 1
BEST = "best.pt"
LAST = "last.pt"


@dataclass
class Checkpoint:
    """A trained network and what it was trained with."""

    arch: str
    hparams: dict
    labels: list[str]
    frontend: FrontendConfig
    norm_mean: np.ndarray  # (73,) float32; the network sees (x - mean) / std
    norm_std: np.ndarray
    state_dict: dict
    dataset_sha256: str
    split: dict
    meta: dict = field(default_factory=dict)  # epoch, metrics, versions, seed, ...
    resume: dict | None = None  # last.pt only: optimizer/scheduler/RNG state

    def build(self) -> Any:
        """The network in eval mode with these weights (normalisation is NOT inside it)."""
        from devrecd.model import build_model

        net = build_model(self.arch, len(self.labels), **self.hparams)
        try:
            net.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise ArtifactError(f"checkpoint weights do not fit architecture {self.arch!r}: {str(exc)[:300]}",
                                reason="checkpoint_mismatch") from None
        return net.eval()

    def normalise(self, feats: Any) -> Any:
        """(…, 73) raw features -> network input, numpy or torch (same device as ``feats``)."""
        if isinstance(feats, np.ndarray):
            return (feats - self.norm_mean) / self.norm_std
        import torch

        mean = torch.as_tensor(self.norm_mean, device=feats.device)
        std = torch.as_tensor(self.norm_std, device=feats.device)
        return (feats - mean) / std

    def check_compatible(self, *, arch: str | None = None, frontend: FrontendConfig | None = None) -> None:
        """Raise :class:`ArtifactError` when this checkpoint is of another architecture or frontend."""
        if arch is not None and arch != self.arch:
            raise ArtifactError(f"checkpoint is architecture {self.arch!r}, not {arch!r}", reason="checkpoint_arch")
        if frontend is not None and frontend != self.frontend:
            raise ArtifactError("checkpoint was trained with another frontend: "
                                + self.frontend.describe_mismatch(frontend), reason="checkpoint_frontend")


def _payload(ckpt: Checkpoint) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "arch": ckpt.arch,
        "hparams": json.dumps(ckpt.hparams, sort_keys=True),
        "labels": list(ckpt.labels),
        "frontend": json.dumps(ckpt.frontend.to_dict(), sort_keys=True),
        "norm_mean": torch.as_tensor(np.asarray(ckpt.norm_mean, dtype=np.float32)),
        "norm_std": torch.as_tensor(np.asarray(ckpt.norm_std, dtype=np.float32)),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "dataset_sha256": ckpt.dataset_sha256,
        "split": json.dumps(ckpt.split, sort_keys=True),
        "meta": json.dumps(ckpt.meta, sort_keys=True, default=str),
    }
    if ckpt.resume is not None:
        out["resume"] = ckpt.resume
    return out


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` atomically (temp file + rename: a kill never leaves half a file); return its sha256."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(_payload(ckpt), fh)
            fh.flush()
            os.fsync(fh.fileno())
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A run folder means its ``best.pt``; anything else is taken as the file itself."""
    path = Path(path)
    return path / BEST if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint from a ``.pt`` file or a run folder (its ``best.pt``); raises :class:`ArtifactError`."""
    import torch

    file = checkpoint_file(path)
    if not file.is_file():
        raise ArtifactError(f"checkpoint not found: {file}", reason="checkpoint_missing")
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged/foreign file; all mean "not ours"
        raise ArtifactError(f"{file} is not a readable checkpoint: {type(exc).__name__}: {str(exc)[:200]}",
                            reason="checkpoint_corrupt") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not a devrecd checkpoint", reason="checkpoint_corrupt")
    if raw.get("version") != VERSION:
        raise ArtifactError(f"{file}: checkpoint format version {raw.get('version')} (this devrecd reads {VERSION})",
                            reason="checkpoint_version")
    try:
        ckpt = Checkpoint(
            arch=raw["arch"], hparams=json.loads(raw["hparams"]), labels=list(raw["labels"]),
            frontend=FrontendConfig.from_dict(json.loads(raw["frontend"])),
            norm_mean=raw["norm_mean"].numpy().astype(np.float32), norm_std=raw["norm_std"].numpy().astype(np.float32),
            state_dict=raw["state_dict"], dataset_sha256=raw["dataset_sha256"], split=json.loads(raw["split"]),
            meta=json.loads(raw["meta"]), resume=raw.get("resume"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{file}: incomplete checkpoint ({type(exc).__name__}: {exc})", reason="checkpoint_corrupt") from None
    if ckpt.norm_mean.shape != (FEATURE_DIM,) or ckpt.norm_std.shape != (FEATURE_DIM,):
        raise ArtifactError(f"{file}: normalisation statistics must have {FEATURE_DIM} dims", reason="checkpoint_corrupt")
    from devrecd.model import ARCHITECTURES

    if ckpt.arch not in ARCHITECTURES:
        raise ArtifactError(f"{file}: unknown architecture {ckpt.arch!r}", reason="checkpoint_arch")
    return ckpt


__all__ = ["BEST", "LAST", "Checkpoint", "checkpoint_file", "load_checkpoint", "save_checkpoint"]
