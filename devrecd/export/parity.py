"""The parity checks of an export: real feature windows (:func:`parity_features`), torch against
ONNX Runtime on them (:func:`check_parity` for a classifier's probabilities, :func:`embedding_parity`
for an embedder's embeddings), and the features kept beside ``NAME.onnx`` for later checks
(``build-engine``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from devrecd.backends.onnxrt import ort_session
from devrecd.config import Config
from devrecd.contract import INPUT_NAME, OUTPUT_NAME, Contract
from devrecd.errors import ArtifactError, DevrecdError
from devrecd.export.ort_format import check_ort
from devrecd.features import FrontendConfig
from devrecd.fsutil import sha256_artifact
from devrecd.stages import features_for_file

log = logging.getLogger("devrecd.export")

# Max abs difference of probabilities between torch and ONNX Runtime. FP32 graphs agree to ~1e-6
# (reordered float sums); FP16 arithmetic has ~1e-3 relative error through 384 recurrent steps.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
# Embedder exports: max abs difference of an embedding from torch's, relative to the torch embedding's
# norm (embeddings are not unit length; the scorers compare directions). FP32 agrees to ~1e-6.
EMBEDDING_TOLERANCE = 1e-4
PARITY_CLIPS = 48  # real windows used by the parity check (spread over the given recordings)


@dataclass(frozen=True)
class Parity:
    """torch vs ONNX Runtime on the same features."""

    n_clips: int
    max_abs_diff: float
    top1_agreement: float  # fraction of clips with the same argmax
    tolerance: float
    source: str  # what the features came from
    ort_max_abs_diff: float | None = None  # NAME.ort vs NAME.onnx, when the check wrote one (in the contract's "ort")

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"n_clips": self.n_clips, "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement,
                "tolerance": self.tolerance, "source": self.source, "passed": self.passed}


def audio_files(paths: Iterable[str | os.PathLike], cfg: Config) -> list[Path]:
    """Files given directly, plus the audio files found under given folders (:func:`devrecd.audio.files.scan_files`)."""
    from devrecd.audio.files import scan_files

    for p in map(Path, paths):
        if not p.exists():
            raise ArtifactError(f"parity audio not found: {p}", reason="parity_audio")
    return scan_files(paths, cfg.watch)


def parity_features(files: Sequence[Path], frontend: FrontendConfig, cfg: Config, *,
                    max_clips: int = PARITY_CLIPS, on_file: Callable[[Path], None] | None = None) -> np.ndarray:
    """Up to ``max_clips`` real feature windows, spread evenly over ``files`` (model's frontend);
    ``on_file(path)`` after each recording (read or skipped)."""
    if not files:
        raise ArtifactError("the parity check needs real recordings: pass --parity-audio FILE_OR_DIR",
                            reason="parity_audio")
    files = list(files)[:max_clips]
    per_file = max(1, -(-max_clips // len(files)))
    model_cfg = replace(cfg, frontend=frontend)
    chunks: list[np.ndarray] = []
    for path in files:
        try:
            _, feats = features_for_file(path, model_cfg)
        except DevrecdError as exc:  # one bad reference file must not stop the export; it is named
            log.warning("parity audio skipped", extra={"path": str(path), "reason": exc.reason})
            feats = None
        if on_file is not None:
            on_file(path)
        if feats is None:
            continue
        idx = np.linspace(0, len(feats) - 1, num=min(per_file, len(feats))).round().astype(int)
        chunks.append(feats[np.unique(idx)])
    if not chunks:
        raise ArtifactError("none of the parity recordings could be decoded", reason="parity_audio")
    return np.concatenate(chunks)[:max_clips]


def check_parity(reference: Any, onnx_path: Path, features: np.ndarray, *, tolerance: float, source: str,
                 threads: int = 1, save_ort: Path | None = None) -> Parity:
    """Run ``features`` through the torch ``reference`` graph and the ONNX file; compare probabilities.

    For an FP16 export the reference is the FP32 graph: what matters is the error against the model.
    With ``save_ort`` the same ONNX Runtime session also writes its optimised graph there in ORT
    format, which is then checked to give the ONNX file's probabilities (:func:`check_ort`).
    """
    import torch

    with torch.no_grad():
        expected = reference(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()
    session = ort_session(onnx_path, threads=threads, save_ort=save_ort)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: features.astype(np.float32)})[0]
    if got.shape != expected.shape:
        raise ArtifactError(f"parity: ONNX output shape {got.shape} != torch {expected.shape}", reason="parity")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    agree = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    ort_diff = None if save_ort is None else check_ort(save_ort, features, got, tolerance=tolerance, threads=threads)
    return Parity(len(features), diff, agree, tolerance, source, ort_diff)


def embedding_parity(expected: np.ndarray, got: np.ndarray, *, tolerance: float, source: str) -> dict[str, Any]:
    """Compare (n, D) embeddings window by window: ``max_rel_diff`` (max over windows of
    max |got - expected| / ||expected||), ``min_cosine``, and whether it ``passed`` the tolerance."""
    if got.shape != expected.shape:
        raise ArtifactError(f"parity: ONNX embeddings {got.shape} != torch {expected.shape}", reason="parity")
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    norm = np.linalg.norm(expected, axis=1)
    rel = float((np.abs(got - expected).max(axis=1) / np.where(norm > 0, norm, 1.0)).max())
    cos = np.sum(got * expected, axis=1) / np.maximum(norm * np.linalg.norm(got, axis=1), 1e-30)
    return {"n_clips": len(expected), "max_rel_diff": rel, "min_cosine": float(cos.min()), "tolerance": tolerance,
            "source": source, "passed": rel <= tolerance}


def parity_features_path(onnx_path: str | os.PathLike) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME.parity.npy`` (the real features parity was checked on)."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}.parity.npy")


def load_parity_features(onnx_path: str | os.PathLike, contract: Contract) -> tuple[np.ndarray, str]:
    """The export's parity features (sha256-checked against the contract) and where they came from."""
    path = parity_features_path(onnx_path)
    want = contract.parity.get("features_sha256")
    if not path.is_file() or not want or sha256_artifact(path) != want:
        raise ArtifactError(f"parity features {path} are missing or not the ones in the contract: re-export the "
                            "model (they are written beside NAME.onnx)", reason="parity_features")
    return np.load(path), str(contract.parity.get("source", path.name))


def _common_root(files: Sequence[Path]) -> str:
    try:
        return os.path.commonpath([str(f.resolve().parent) for f in files])
    except ValueError:
        return "several folders"


def parity_input(parity_audio: Sequence[str | os.PathLike], frontend: FrontendConfig, cfg: Config, max_clips: int,
                  n_graphs: int, on_progress: Callable[[int, int, str], None] | None
                  ) -> tuple[np.ndarray, str, Callable[[str], None]]:
    """The parity features of an export, where they came from, and the ``step(what)`` that reports
    progress: one step per parity recording (done here), then one per graph the caller exports."""
    files = audio_files(parity_audio, cfg)
    total, done = min(len(files), max_clips) + n_graphs, 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total, what)

    feats = parity_features(files, frontend, cfg, max_clips=max_clips,
                            on_file=lambda path: step(f"parity audio {path.name}"))
    return feats, f"{len(feats)} windows of {len(files)} recording(s) under {_common_root(files)}", step
