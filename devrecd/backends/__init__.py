"""Inference backends behind one small interface (:class:`~devrecd.backends.base.Backend`).

:data:`BACKENDS` is the one registry of the backend classes, by the kind each declares (``name``);
the chooser, the CLI's ``--backend`` and the configuration's ``backend.kind`` read it (see
:data:`KINDS`). ``load_backend(cfg.backend, cfg.frontend)`` picks by ``backend.kind``:

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
import typing
from pathlib import Path

from devrecd.backends.base import Backend, InferenceError, batch_slices, cuda_index, is_checkpoint, need_model
from devrecd.backends.onnxrt import OnnxRuntimeBackend
from devrecd.backends.tensorrt import TensorRTBackend, current_target, find_engine
from devrecd.backends.torch_backend import TorchBackend
from devrecd.config import BackendConfig
from devrecd.contract import check_frontend, check_labels, contract_path_for, load_for_onnx
from devrecd.errors import ArtifactError, ConfigError, DevrecdError
from devrecd.features import FrontendConfig
from devrecd.fsutil import sha256_artifact
from devrecd.stages import resolve_device

log = logging.getLogger("devrecd.backends")

AUTO = "auto"
# The registry: each class declares its kind (``name``) and loads itself (``from_config``).
BACKENDS: dict[str, type[OnnxRuntimeBackend | TensorRTBackend | TorchBackend]] = {
    cls.name: cls for cls in (OnnxRuntimeBackend, TensorRTBackend, TorchBackend)}
KINDS = (AUTO, *BACKENDS)
# The configuration sits below this package and cannot import it: its backend.kind names the kinds it
# accepts, and they must be the registry's (docs/architecture.md, "Answered").
if set(typing.get_args(typing.get_type_hints(BackendConfig)["kind"])) != set(KINDS):
    raise ImportError(f"config.BackendConfig.kind does not accept exactly the backend registry's kinds {KINDS}")

__all__ = ["AUTO", "BACKENDS", "Backend", "InferenceError", "KINDS", "batch_slices", "load_backend"]


def load_backend(cfg: BackendConfig, frontend: FrontendConfig | None = None) -> Backend:
    """The configured backend, loaded and checked (see module docstring); not yet warmed up."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"backend.kind must be one of {', '.join(KINDS)}, not {cfg.kind!r}")
    model = Path(cfg.model) if cfg.model else None
    backend = _auto(cfg, model) if cfg.kind == AUTO else BACKENDS[cfg.kind].from_config(cfg, model)
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


def _auto(cfg: BackendConfig, model: Path | None) -> Backend:
    """``backend.kind = "auto"``: TensorRT, torch on the GPU or ONNX Runtime (module docstring), logged."""
    if cfg.engine:  # an engine named explicitly is wanted: failing to load it is an error
        backend = TensorRTBackend.from_config(cfg, model)
        log.info("backend selected", extra={"backend": "tensorrt", "why": f"backend.engine = {cfg.engine}"})
        return backend
    model = need_model(model, AUTO)
    if is_checkpoint(model):
        log.info("backend selected", extra={"backend": "torch", "why": f"{model} is a checkpoint, not an export"})
        return TorchBackend.from_config(cfg, model)
    engine, why = _matching_engine(cfg, model)
    if engine is not None:
        log.info("backend selected", extra={"backend": "tensorrt", "why": why})
        return TensorRTBackend.from_config(cfg, model, engine)
    gpu = _cuda_device(cfg.device)
    if gpu is not None and cfg.checkpoint:
        checkpoint = _export_checkpoint(cfg, model)
        log.info("backend selected", extra={"backend": "torch", "why": f"{why}; {gpu} present: torch serves "
                                            f"{checkpoint.name} (the export's checkpoint) on the GPU"})
        return TorchBackend.from_config(cfg, checkpoint, device=gpu)
    if gpu is not None:
        why += f"; {gpu} present but backend.checkpoint is not set (torch could serve the model on the GPU)"
    log.info("backend selected", extra={"backend": "onnxruntime", "why": why})
    return OnnxRuntimeBackend.from_config(cfg, model)


def _cuda_device(device: str) -> str | None:
    """The CUDA device ``backend.device`` names or implies when torch sees a GPU, else None."""
    device = resolve_device(device)  # 'auto' without a GPU driver is 'cpu' without importing torch
    if not device.startswith("cuda"):
        return None
    import torch

    return device if torch.cuda.is_available() else None


def _export_checkpoint(cfg: BackendConfig, model: Path) -> Path:
    """``backend.checkpoint``, refused unless it is the checkpoint the export ``model`` was made from."""
    from devrecd.model.checkpoint import resolve_checkpoint_path

    checkpoint = need_model(Path(cfg.checkpoint), "auto")
    contract = load_for_onnx(model)
    sha = sha256_artifact(resolve_checkpoint_path(checkpoint))
    if sha != contract.checkpoint_sha256:
        raise ArtifactError(f"backend.checkpoint {checkpoint} is not the checkpoint {model.name} was exported from "
                            f"(sha256 {sha[:12]} != {contract.checkpoint_sha256[:12]})", reason="checkpoint_mismatch")
    return checkpoint


def _matching_engine(cfg: BackendConfig, model: Path) -> tuple[Path | None, str]:
    """For ``auto``: the engine to use, or None and why ONNX Runtime is used instead."""
    try:
        target = current_target(cuda_index(cfg.device))
    except DevrecdError as exc:  # no GPU or no TensorRT: the CPU is the answer, with the reason logged
        return None, str(exc)
    contract = load_for_onnx(model)
    return find_engine(cfg.engine_dir, contract, target, sha256_artifact(contract_path_for(model)))
