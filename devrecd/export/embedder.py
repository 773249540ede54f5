"""``devrecd export-embedder``: an open-set embedder as ``NAME.onnx`` (raw features -> normalisation ->
``embed`` -> ``embedding``) + its embedder contract, its embeddings checked against the torch
embedder's on real windows (:func:`export_embedder`; :func:`export_embedding_graph` for an embedder).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.backends.onnxrt import ort_session
from devrecd.config import Config
from devrecd.contract import EMBEDDING_NAME, INPUT_NAME, EmbedderContract, contract_path_for, embedding_spec, input_spec
from devrecd.errors import ArtifactError
from devrecd.export.onnx_file import (DEFAULT_EXPORTER, DEFAULT_OPSET, ExportResult, onnx_out, software_versions,
                                      write_onnx)
from devrecd.export.parity import EMBEDDING_TOLERANCE, PARITY_CLIPS, embedding_parity, parity_input
from devrecd.fsutil import move_into_place, sha256_artifact

log = logging.getLogger("devrecd.export")


def export_embedding_graph(embedder: Any, out: str | os.PathLike, *, features: np.ndarray, feature_source: str,
                           checkpoint_sha256: str, opset: int = DEFAULT_OPSET, exporter: str = DEFAULT_EXPORTER,
                           tolerance: float = EMBEDDING_TOLERANCE, threads: int = 1, graph: Any = None) -> ExportResult:
    """Export a torch :class:`~devrecd.openset.embedder.Embedder` as ``out`` (normalisation + ``embed``),
    check its embeddings against the embedder's own on ``features``, write the embedder contract.

    ``graph`` is what gets exported (default: the embedder's :func:`~devrecd.model.serving.embedding_graph`);
    its ONNX embeddings are always compared with ``embedder.embed_features``, the torch path that
    enrolled the registries. Above ``tolerance`` nothing is left behind.
    """
    from devrecd.model.serving import embedding_graph

    out, tmp = onnx_out(out)
    graph = embedding_graph(embedder.model, embedder.norm_mean, embedder.norm_std) if graph is None else graph
    t0 = time.perf_counter()
    try:
        write_onnx(graph, tmp, opset=opset, exporter=exporter, output_name=EMBEDDING_NAME)
        seconds = time.perf_counter() - t0
        x = np.ascontiguousarray(features, dtype=np.float32)
        got = ort_session(tmp, threads=threads).run([EMBEDDING_NAME], {INPUT_NAME: x})[0]
        parity = embedding_parity(embedder.embed_features(x), got, tolerance=tolerance, source=feature_source)
        log.info("parity", extra=parity)
        if not parity["passed"]:
            raise ArtifactError(
                f"parity check failed for {out.name}: ONNX Runtime embeddings differ from torch's by up to "
                f"{parity['max_rel_diff']:.3g} of their norm > tolerance {tolerance:g} on {parity['n_clips']} "
                f"windows (lowest cosine {parity['min_cosine']:.6f}); the ONNX file was not written", reason="parity")
        move_into_place(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    contract = EmbedderContract(
        name=out.stem, onnx_file=out.name, onnx_sha256=sha256_artifact(out), onnx_bytes=out.stat().st_size,
        input=input_spec(), output=embedding_spec(embedder.dim), fingerprint=embedder.fingerprint,
        arch=embedder.arch, dim=embedder.dim, frontend=embedder.frontend,
        frontend_fingerprint=embedder.frontend.fingerprint(), labels=tuple(embedder.labels), opset=opset,
        checkpoint_sha256=checkpoint_sha256,
        parity=parity | {"exporter": exporter, "export_seconds": round(seconds, 1)},
        versions=software_versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    contract_path = contract.save(contract_path_for(out))
    return ExportResult(out, contract_path, contract, seconds)


def export_embedder(checkpoint: str | os.PathLike, out: str | os.PathLike, *, cfg: Config,
                    parity_audio: Sequence[str | os.PathLike], opset: int = DEFAULT_OPSET,
                    exporter: str = DEFAULT_EXPORTER, tolerance: float | None = None,
                    max_parity_clips: int = PARITY_CLIPS,
                    on_progress: Callable[[int, int, str], None] | None = None) -> ExportResult:
    """``devrecd export-embedder``: a checkpoint's network as an open-set embedder ``NAME.onnx`` +
    its embedder contract ``NAME.json``, parity-checked against torch on real recordings, so that
    registries enrolled with the checkpoint are served by ONNX Runtime without torch."""
    from devrecd.model.checkpoint import load_checkpoint, resolve_checkpoint_path
    from devrecd.openset.embedder import Embedder

    ckpt = load_checkpoint(checkpoint)
    embedder = Embedder.from_checkpoint(ckpt, source=str(Path(checkpoint).resolve()))  # refuses a net without embed()
    feats, source, step = parity_input(parity_audio, ckpt.frontend, cfg, max_parity_clips, 1, on_progress)
    result = export_embedding_graph(embedder, out, features=feats, feature_source=source,
                                    checkpoint_sha256=sha256_artifact(resolve_checkpoint_path(checkpoint)), opset=opset,
                                    exporter=exporter, threads=cfg.backend.threads,
                                    tolerance=EMBEDDING_TOLERANCE if tolerance is None else tolerance)
    step(f"exported {result.onnx_path.name}")
    return result
