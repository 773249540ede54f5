"""``NAME.ort``: the graph after ONNX Runtime's basic optimisations in ORT's own format, written by
the parity check's session (:func:`devrecd.export.parity.check_parity`) and checked here to give
the ``.onnx``'s probabilities.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from devrecd.backends.onnxrt import ort_session
from devrecd.contract import INPUT_NAME, OUTPUT_NAME
from devrecd.errors import ArtifactError


def ort_path_for(onnx_path: str | os.PathLike) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME.ort`` (ONNX Runtime's format of the optimised graph)."""
    return Path(onnx_path).with_suffix(".ort")


def check_ort(ort_path: Path, features: np.ndarray, onnx_probs: np.ndarray, *, tolerance: float,
              threads: int = 1) -> float:
    """The max abs difference between ``ort_path``'s probabilities on ``features`` and the ONNX
    file's (``onnx_probs``); an :class:`ArtifactError` above ``tolerance``."""
    if not ort_path.is_file():
        raise ArtifactError(f"ONNX Runtime wrote no {ort_path.name}", reason="export")
    got = ort_session(ort_path, threads=threads).run([OUTPUT_NAME], {INPUT_NAME: features.astype(np.float32)})[0]
    diff = float(np.max(np.abs(got.astype(np.float64) - onnx_probs))) if got.shape == onnx_probs.shape else float("inf")
    if not diff <= tolerance:
        raise ArtifactError(f"{ort_path.name} does not give the .onnx's probabilities: max abs difference "
                            f"{diff:.3g} > tolerance {tolerance:g} on {len(features)} clips", reason="parity")
    return diff
