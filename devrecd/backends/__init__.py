"""Inference backends behind one small interface (:class:`~devrecd.backends.base.Backend`).

``load_backend(cfg.backend, cfg.frontend)`` picks by ``backend.kind``:

- ``onnxruntime``: ``backend.model`` = ``export/NAME.onnx`` (contract beside it), on the CPU.
- ``tensorrt``: ``backend.engine``, or the engine in ``backend.engine_dir`` built from that model
  for this GPU and TensorRT version.
- ``torch``: ``backend.model`` = a checkpoint (run folder or ``.pt``) on ``backend.device`` (the CPU
  for development; a CUDA GPU for serving, with ``autocast`` and ``cuda_graphs``).
- ``auto``: TensorRT when a matching engine exists here; else, with a CUDA GPU and
  ``backend.checkpoint`` (the checkpoint the export came from, sha256 checked against the contract),
  torch on the GPU; else ONNX Runtime on the CPU. A checkpoint as ``model`` is served by torch. The
  choice and the reason are logged (``backend selected``) and exported as the backend metric.

A backend named explicitly that cannot load is an error, never a silent fallback. Every backend is
checked against the configured frontend (and ``backend.labels`` when set) before it is returned.
"""

from __future__ import annotations

import logging
from pathlib import Path

from devrecd.backends.base import Backend, InferenceError, batch_slices
from devrecd.config import BackendConfig
from devrecd.contract import check_frontend, check_labels
from devrecd.errors import ArtifactError, ConfigError, DevrecdError
from devrecd.features import FrontendConfig

log = logging.getLogger("devrecd.backends")

KINDS = ("auto", "onnxruntime", "tensorrt", "torch")

__all__ = ["Backend", "InferenceError", "KINDS", "batch_slices", "load_backend"]


def load_backend(cfg: BackendConfig, frontend: FrontendConfig | None = None) -> Backend:
    """The configured backend, loaded and checked (see module docstring); not yet warmed up."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"backend.kind must be one of {', '.join(KINDS)}, not {cfg.kind!r}")
    backend = _load(cfg)
    try:
        if frontend is not None:
            check_frontend(backend.frontend, frontend, model=_model_name(cfg))
        if cfg.labels:
            check_labels(backend.labels, cfg.labels, model=_model_name(cfg), what="configured (backend.labels)")
    except BaseException:
        backend.close()
        raise
    return backend


def _model_name(cfg: BackendConfig) -> str:
    return Path(cfg.model or cfg.engine).name


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() or path.suffix in (".pt", ".pth")


def _load(cfg: BackendConfig) -> Backend:
    model = Path(cfg.model) if cfg.model else None
    if cfg.kind == "torch":
        return _torch(cfg, _need_model(model, "torch"))
    if cfg.kind == "onnxruntime":
        return _onnxruntime(cfg, _need_model(model, "onnxruntime"))
    if cfg.kind == "tensorrt":
        return _tensorrt(cfg, model)
    # auto
    if cfg.engine:  # an engine named explicitly is wanted: failing to load it is an error
        backend = _tensorrt(cfg, model)
        log.info("backend selected", extra={"backend": "tensorrt", "why": f"backend.engine = {cfg.engine}"})
        return backend
    model = _need_model(model, "auto")
    if _is_checkpoint(model):
        log.info("backend selected", extra={"backend": "torch", "why": f"{model} is a checkpoint, not an export"})
        return _torch(cfg, model)
    engine, why = _matching_engine(cfg, model)
    if engine is not None:
        log.info("backend selected", extra={"backend": "tensorrt", "why": why})
        return _tensorrt(cfg, model, engine)
    gpu = _cuda_device(cfg.device)
    if gpu is not None and cfg.checkpoint:
        checkpoint = _export_checkpoint(cfg, model)
        log.info("backend selected", extra={"backend": "torch", "why": f"{why}; {gpu} present: torch serves "
                                            f"{checkpoint.name} (the export's checkpoint) on the GPU"})
        return _torch(cfg, checkpoint, device=gpu)
    if gpu is not None:
        why += f"; {gpu} present but backend.checkpoint is not set (torch could serve the model on the GPU)"
    log.info("backend selected", extra={"backend": "onnxruntime", "why": why})
    return _onnxruntime(cfg, model)


def _need_model(model: Path | None, kind: str) -> Path:
    if model is None:
        raise ConfigError(f"backend.kind = {kind!r} needs backend.model (export/NAME.onnx, or a checkpoint for torch)")
    if not model.exists():
        raise ArtifactError(f"model not found: {model}", reason="model_missing")
    return model


def _onnxruntime(cfg: BackendConfig, model: Path) -> Backend:
    from devrecd.backends.onnxrt import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model, threads=cfg.threads)


def _torch(cfg: BackendConfig, model: Path, device: str | None = None) -> Backend:
    from devrecd.backends.torch_backend import TorchBackend
    from devrecd.pipeline.stages import resolve_device

    if not _is_checkpoint(model):
        raise ArtifactError(f"backend.kind = 'torch' runs a checkpoint (run folder or .pt), not {model.name}",
                            reason="not_checkpoint")
    device = device or resolve_device(cfg.device)
    if cfg.cuda_graphs and not device.startswith("cuda"):  # device = "auto" on a machine without a GPU
        log.warning("backend.cuda_graphs ignored: no CUDA GPU, torch runs on the CPU", extra={"device": device})
    return TorchBackend(model, device=device, autocast=cfg.autocast,
                        cuda_graphs=cfg.cuda_graphs and device.startswith("cuda"))


def _cuda_device(device: str) -> str | None:
    """The CUDA device ``backend.device`` names or implies when torch sees a GPU, else None."""
    from devrecd.pipeline.stages import resolve_device

    device = resolve_device(device)  # 'auto' without a GPU driver is 'cpu' without importing torch
    if not device.startswith("cuda"):
        return None
    import torch

    return device if torch.cuda.is_available() else None


def _export_checkpoint(cfg: BackendConfig, model: Path) -> Path:
    """``backend.checkpoint``, refused unless it is the checkpoint the export ``model`` was made from."""
    from devrecd.contract import load_for_onnx
    from devrecd.audio import sha256_file
    from devrecd.model.checkpoint import resolve_checkpoint_path

    checkpoint = _need_model(Path(cfg.checkpoint), "auto")
    contract = load_for_onnx(model)
    sha = sha256_file(resolve_checkpoint_path(checkpoint))
    if sha != contract.checkpoint_sha256:
        raise ArtifactError(f"backend.checkpoint {checkpoint} is not the checkpoint {model.name} was exported from "
                            f"(sha256 {sha[:12]} != {contract.checkpoint_sha256[:12]})", reason="checkpoint_mismatch")
    return checkpoint


def _cuda_index(device: str) -> int:
    """'cuda:1' -> 1; 'auto', 'cuda' -> 0."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def _matching_engine(cfg: BackendConfig, model: Path) -> tuple[Path | None, str]:
    """For ``auto``: the engine to use, or None and why ONNX Runtime is used instead."""
    from devrecd.audio import sha256_file
    from devrecd.backends.tensorrt import current_target, find_engine
    from devrecd.contract import contract_path_for, load_for_onnx

    try:
        target = current_target(_cuda_index(cfg.device))
    except DevrecdError as exc:  # no GPU or no TensorRT: the CPU is the answer, with the reason logged
        return None, str(exc)
    contract = load_for_onnx(model)
    return find_engine(cfg.engine_dir, contract, target, sha256_file(contract_path_for(model)))


def _tensorrt(cfg: BackendConfig, model: Path | None, engine: Path | None = None) -> Backend:
    from devrecd.audio import sha256_file
    from devrecd.backends.tensorrt import TensorRTBackend, current_target, find_engine
    from devrecd.contract import contract_path_for, load_for_onnx

    device = _cuda_index(cfg.device)
    contract = contract_sha = None
    if model is not None:
        model = _need_model(model, "tensorrt")
        if _is_checkpoint(model):
            raise ArtifactError("backend.kind = 'tensorrt' serves an exported model: export the checkpoint, then "
                                "`devrecd build-engine export/NAME.onnx`", reason="not_onnx")
        contract = load_for_onnx(model)
        contract_sha = sha256_file(contract_path_for(model))
    if engine is None and cfg.engine:
        engine = Path(cfg.engine)
    if engine is None:
        if contract is None:
            raise ConfigError("backend.kind = 'tensorrt' needs backend.engine or backend.model")
        found, why = find_engine(cfg.engine_dir, contract, current_target(device), contract_sha or "")
        if found is None:
            raise ArtifactError(f"{why}: build one with `devrecd build-engine {model}`", reason="engine_missing")
        engine = found
    return TensorRTBackend(engine, contract=contract, contract_sha256=contract_sha or "", device=device)
