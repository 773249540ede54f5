"""ONNX Runtime on the CPU: the default backend. Serves ``export/NAME.onnx`` under its contract.

When the contract names ``NAME.ort`` (ONNX Runtime's own format of the already optimised graph,
written by ``devrecd export``), that file is served instead: its session starts ~3x faster. It is
served only if its size and sha256 are the contract's and the running onnxruntime loads it;
otherwise the ``.onnx`` is served and the log says why (one warning).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from devrecd.backends.base import InferenceError, as_numpy_features, batch_slices, need_model, snr_range_json
from devrecd.contract import INPUT_NAME, OUTPUT_NAME, Contract, contract_path_for, load_for_onnx
from devrecd.errors import ArtifactError
from devrecd.fsutil import sha256_artifact

if TYPE_CHECKING:
    from devrecd.config import BackendConfig

log = logging.getLogger("devrecd.backends")


def ort_session(onnx_path: str | os.PathLike, *, threads: int = 1, save_ort: str | os.PathLike | None = None) -> Any:
    """An ONNX Runtime CPU session with explicit options: the one place sessions are made (serving,
    the export's parity check, build-engine's reference). A path ending in ``.ort`` is read as ORT
    format; ``save_ort`` writes the session's optimised graph there in ORT format."""
    from devrecd.errors import MissingDependency

    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependency(f"onnxruntime is not installed ({exc}): pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1  # one graph, run sequentially: no parallel branches to exploit
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting between ops: spinning intra-op threads steal the cores that the frontend
    # and decoding threads of the daemon need (measured: 5x slower end to end with spinning).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Basic optimisations (constant folding, redundant nodes) only: on the exported network (~9000
    # nodes: 128 unrolled ConvLSTM steps) the extended and layout levels cost 0.3-0.5 s more CPU at
    # every session start and ran batches of 48 no faster (benchmarks/serving.py's machine; same
    # outputs). ORT 1.32 also crashes (SIGSEGV) applying the layout level to the FP16 graph.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3  # errors only: ORT's warnings go to stderr, bypassing our logging
    # No memory pattern: with it ORT plans one block for all of a run's intermediates per input
    # shape and keeps it in the arena, which costs far more than the tensors alive at once
    # (measured, paper network, one thread: peak 530 -> 332 MB at batch 32, 152 -> 127 MB at
    # batch 4, no measurable change in time per window). The arena itself is kept: disabling it
    # did not lower the peak and made runs slower.
    opts.enable_mem_pattern = False
    if Path(onnx_path).suffix == ".ort":
        opts.add_session_config_entry("session.load_model_format", "ORT")
    if save_ort is not None:
        opts.optimized_model_filepath = str(save_ort)
        opts.add_session_config_entry("session.save_model_format", "ORT")
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ArtifactError(f"ONNX Runtime cannot load {onnx_path}: {exc}", reason="onnx_invalid") from None


# Windows per session run. ORT's working memory grows by ~14 MB per window of a run (paper network,
# measured: peak 107 MB at 1 window, 152 MB at 4, 530 MB at 32), while time per window on a CPU
# does not improve past a few windows; a batch the batcher forms is run in slices of this size.
RUN_BATCH = 4


class OnnxRuntimeBackend:
    """An explicit-options ORT session (threads from ``backend.threads``) over a contract-checked model."""

    name = "onnxruntime"

    @classmethod
    def from_config(cls, cfg: BackendConfig, model: Path | None) -> OnnxRuntimeBackend:
        """``backend.model`` (an export) on the CPU with ``backend.threads`` threads."""
        return cls(need_model(model, cls.name), threads=cfg.threads)

    def __init__(self, onnx_path: str | os.PathLike, *, threads: int = 1) -> None:
        self.onnx_path = Path(onnx_path)
        if self.onnx_path.suffix != ".onnx":
            raise ArtifactError(f"the onnxruntime backend serves an exported NAME.onnx, not {self.onnx_path.name!r} "
                                "(export a checkpoint with `devrecd export`, or use backend.kind = \"torch\")",
                                reason="not_onnx")
        self.contract: Contract = load_for_onnx(self.onnx_path)  # sha256 + size checked
        self.contract_sha256 = sha256_artifact(contract_path_for(self.onnx_path))
        self.threads = threads
        self.session: Any = None
        self.served_path, self.served_sha256 = self.onnx_path, self.contract.onnx_sha256
        # Why the .ort is not served ("" when it is): the log says it once, `devrecd doctor` on demand.
        self.ort_problem = ""
        ort_file = self.contract.ort_file()
        if ort_file:
            ort_path = self.onnx_path.with_name(ort_file)
            try:
                self.contract.verify_ort(ort_path)
                self.session = ort_session(ort_path, threads=threads)
                self.served_path, self.served_sha256 = ort_path, self.contract.ort["sha256"]
            except ArtifactError as exc:
                self.ort_problem = f"{exc.reason}: {exc}"
                log.warning("serving the .onnx, not the .ort", extra={"model": str(self.onnx_path),
                            "ort": str(ort_path), "reason": exc.reason, "why": str(exc)})
        else:
            self.ort_problem = ("the contract names no .ort (exported before devrecd wrote one): "
                                "re-export to start faster")
            log.info("serving the .onnx", extra={"model": str(self.onnx_path), "why": self.ort_problem})
        if self.session is None:
            self.session = ort_session(self.onnx_path, threads=threads)
        inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [(INPUT_NAME, "tensor(float)")] or outputs != [OUTPUT_NAME]:
            raise ArtifactError(f"{self.onnx_path}: graph I/O {inputs} -> {outputs} is not the contract's "
                                f"{INPUT_NAME} (float) -> {OUTPUT_NAME}", reason="contract_mismatch")
        self.labels = self.contract.labels
        self.frontend = self.contract.frontend
        self.max_batch: int | None = RUN_BATCH  # bigger batches run in slices (bounded working memory)
        self.concurrency: int | None = None  # InferenceSession.run is thread-safe; each run uses its caller's
        # thread plus threads-1 pool threads, so N concurrent runs of 1 thread use N cores

    def warmup(self) -> None:
        """One run at a typical batch so that the first real request is not the slow one."""
        self.infer(np.zeros((8, *self.contract.input.shape[1:]), np.float32))

    def infer(self, features: Any) -> np.ndarray:
        """(B, 128, 73) raw features (numpy or torch) -> (B, N) float32 probabilities."""
        if self.session is None:
            raise InferenceError("backend is closed", reason="closed")
        x = as_numpy_features(features)
        try:
            parts = [self.session.run([OUTPUT_NAME], {INPUT_NAME: x[sl]})[0] for sl in batch_slices(len(x), self.max_batch)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        except Exception as exc:  # onnxruntime's own exception types
            raise InferenceError(f"ONNX Runtime failed on a batch of {len(x)}: {exc}") from None

    def describe(self) -> dict:
        import onnxruntime

        return {"name": self.name, "version": onnxruntime.__version__, "device": f"cpu ({self.threads} threads)",
                "model": str(self.onnx_path), "model_sha256": self.contract.onnx_sha256,
                "contract_sha256": self.contract_sha256, "precision": self.contract.precision, "engine": "",
                "served_file": self.served_path.name, "served_sha256": self.served_sha256,
                "labels": len(self.labels), "validated_snr_db": snr_range_json(self.contract.validated_snr_db)}

    def close(self) -> None:
        self.session = None
