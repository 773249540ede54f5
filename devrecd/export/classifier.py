"""``devrecd export``: a checkpoint's classifier (and its FP16 variant) as ``NAME.onnx`` + ``NAME.ort``
+ contract ``NAME.json``, parity-checked (:func:`export_checkpoint`; :func:`export_graph` for a built graph).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.config import Config
from devrecd.contract import Contract, contract_path_for, input_spec, output_spec
from devrecd.errors import ArtifactError
from devrecd.export.onnx_file import (DEFAULT_EXPORTER, DEFAULT_OPSET, ExportResult, fp16_path_for, onnx_out,
                                      software_versions, write_onnx)
from devrecd.export.ort_format import ort_path_for
from devrecd.export.parity import PARITY_CLIPS, TOLERANCE, check_parity, parity_features_path, parity_input
from devrecd.features import FrontendConfig
from devrecd.fsutil import move_into_place, sha256_artifact

log = logging.getLogger("devrecd.export")


def export_graph(graph: Any, out: str | os.PathLike, *, labels: Sequence[str], frontend: FrontendConfig,
                 features: np.ndarray, feature_source: str, arch: str, checkpoint_sha256: str,
                 dataset_sha256: str = "", precision: str = "fp32", opset: int = DEFAULT_OPSET,
                 exporter: str = DEFAULT_EXPORTER, tolerance: float | None = None, threads: int = 1,
                 reference: Any = None, validated_snr_db: tuple[float, float] | None = None) -> ExportResult:
    """Export a built inference graph, check parity on ``features``, write the contract.

    ``reference`` is the torch graph the ONNX output is compared with (default: ``graph`` itself);
    ``validated_snr_db`` the SNR range the network was trained on (the contract's, None: not recorded).
    """
    out, tmp = onnx_out(out)
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    t0 = time.perf_counter()
    ort_out, ort_tmp = ort_path_for(out), out.with_name(f".{out.stem}.partial.ort")
    try:
        write_onnx(graph, tmp, opset=opset, exporter=exporter)
        seconds = time.perf_counter() - t0
        parity = check_parity(graph if reference is None else reference, tmp, features, tolerance=tolerance,
                              source=feature_source, threads=threads, save_ort=ort_tmp)
        log.info("parity", extra=parity.to_dict() | {"precision": precision})
        if not parity.passed:
            raise ArtifactError(
                f"parity check failed for {out.name}: torch vs ONNX Runtime max abs difference "
                f"{parity.max_abs_diff:.3g} > tolerance {tolerance:g} on {parity.n_clips} clips "
                f"(top-1 agreement {parity.top1_agreement:.1%}); the ONNX file was not written", reason="parity")
        move_into_place(tmp, out)
        move_into_place(ort_tmp, ort_out)
    finally:
        tmp.unlink(missing_ok=True)
        ort_tmp.unlink(missing_ok=True)
    # Keep the parity features: build-engine compares the engine with ONNX Runtime on the same real inputs.
    feats_path = parity_features_path(out)
    np.save(feats_path, np.ascontiguousarray(features, dtype=np.float32))
    versions = software_versions()
    contract = Contract(
        name=out.stem, onnx_file=out.name, onnx_sha256=sha256_artifact(out), onnx_bytes=out.stat().st_size,
        input=input_spec(), output=output_spec(len(labels)), labels=tuple(labels), frontend=frontend,
        frontend_fingerprint=frontend.fingerprint(), precision=precision, opset=opset, arch=arch,
        checkpoint_sha256=checkpoint_sha256, dataset_sha256=dataset_sha256,
        parity=parity.to_dict() | {"exporter": exporter, "export_seconds": round(seconds, 1),
                                   "features_file": feats_path.name, "features_sha256": sha256_artifact(feats_path)},
        versions=versions,
        ort={"file": ort_out.name, "sha256": sha256_artifact(ort_out), "bytes": ort_out.stat().st_size,
             "onnxruntime": versions["onnxruntime"], "optimization": "basic",
             "parity_max_abs_diff": parity.ort_max_abs_diff},
        validated_snr_db=validated_snr_db,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    contract_path = contract.save(contract_path_for(out))
    return ExportResult(out, contract_path, contract, seconds)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, cfg: Config,
                      parity_audio: Sequence[str | os.PathLike], fp16: bool = False, opset: int = DEFAULT_OPSET,
                      exporter: str = DEFAULT_EXPORTER, tolerance: float | None = None,
                      max_parity_clips: int = PARITY_CLIPS,
                      on_progress: Callable[[int, int, str], None] | None = None) -> list[ExportResult]:
    """``devrecd export``: the FP32 model (and with ``fp16`` its FP16 variant), parity-checked.

    ``checkpoint`` is a run folder or a ``.pt`` file (:func:`~devrecd.model.checkpoint.load_checkpoint`).
    Parity features come from ``parity_audio`` (files or folders of real recordings).
    ``on_progress(done, total, what)`` after each step: each parity recording, then each graph exported.
    """
    from devrecd.model.checkpoint import load_checkpoint, resolve_checkpoint_path
    from devrecd.model.serving import graph_for_checkpoint
    from devrecd.train_data import snr_range_origin

    ckpt = load_checkpoint(checkpoint)
    outs = [Path(out)] + ([fp16_path_for(out)] if fp16 else [])
    feats, source, step = parity_input(parity_audio, ckpt.frontend, cfg, max_parity_clips, len(outs), on_progress)
    common = dict(labels=list(ckpt.labels), frontend=ckpt.frontend, features=feats, feature_source=source,
                  arch=ckpt.arch, checkpoint_sha256=sha256_artifact(resolve_checkpoint_path(checkpoint)),
                  dataset_sha256=ckpt.dataset_sha256, validated_snr_db=ckpt.validated_snr_db,
                  opset=opset, exporter=exporter, threads=cfg.backend.threads)
    fp32_graph = graph_for_checkpoint(ckpt)
    results = [export_graph(fp32_graph, out, tolerance=tolerance, **common)]
    step(f"exported {outs[0].name}")
    if fp16:
        results.append(export_graph(graph_for_checkpoint(ckpt, precision="fp16"), outs[1],
                                    precision="fp16", tolerance=None, reference=fp32_graph, **common))
        step(f"exported {outs[1].name}")
    snr = ckpt.validated_snr_db
    origin = snr_range_origin(snr, ckpt.meta.get("training_snr_db")) if snr else ""
    return [replace(r, snr_origin=origin) for r in results]
